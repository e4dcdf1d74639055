// Parity of the CUDA backend's norms, rope, mHC mixing, copies and greedy sampling against the CPU
// backend, on random inputs of awkward and V4-Flash shapes.
#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

#include "backend/cuda/kernels.h"
#include "tests/gpu/op_harness.h"

namespace sp::test {
namespace {

// A batch of `n` tokens of one sequence at positions start..start+n-1 (slot 0).
BatchView one_sequence(int n, int start) {
  BatchView b;
  b.num_tokens = n;
  for (int i = 0; i < n; ++i) {
    b.token_ids.push_back(i % 7);
    b.positions.push_back(start + i);
    b.chunk_of.push_back(0);
  }
  SeqChunk ch;
  ch.n_tokens = n;
  ch.start_pos = start;
  ch.num_blocks = (start + n + 255) / 256;
  for (int i = 0; i < ch.num_blocks; ++i) b.block_tables.push_back(i);
  b.chunks.push_back(ch);
  return b;
}

TEST(CudaElementwise, RmsNormGroupsAndDtypes) {
  SP_REQUIRE_GPU();
  Backends be;
  for (auto [rows, cols, group] : {std::tuple{1, 4096, 4096},
                                   {7, 1024, 1024},
                                   {33, 3 * 512, 512},
                                   {5, 96, 32},
                                   {300, 4096, 4096}}) {
    for (bool weighted : {true, false}) {
      auto xv = round_bf16(random_vec(int64_t{rows} * cols, rows + cols, 3.0f));
      auto wv = random_vec(group, 5, 1.0f);
      Tensor wc = make_tensor(*be.cpu, wv, 1, group, DType::kF32);
      Tensor wg = make_tensor(*be.gpu, wv, 1, group, DType::kF32);
      Tensor xc = make_tensor(*be.cpu, xv, rows, cols, DType::kF32);
      Tensor yc = be.cpu->alloc(rows, cols, DType::kF32);
      be.cpu->rms_norm(xc, weighted ? &wc : nullptr, group, 1e-6f, yc);
      for (DType out : {DType::kF32, DType::kBF16}) {
        Tensor xg = make_tensor(*be.gpu, xv, rows, cols, DType::kBF16);
        Tensor yg = make_tensor(*be.gpu, std::vector<float>(xv.size(), NAN), rows, cols, out);
        be.gpu->rms_norm(xg, weighted ? &wg : nullptr, group, 1e-6f, yg);
        double e = rel_l2(read_f32(*be.gpu, yg), read_f32(*be.cpu, yc));
        EXPECT_LE(e, out == DType::kF32 ? 1e-5 : 1e-2) << rows << "x" << cols << "/" << group;
      }
    }
  }
}

TEST(CudaElementwise, RopeForwardAndInverse) {
  SP_REQUIRE_GPU();
  Backends be;
  const int head_dim = 512, rope_dim = 64, heads = 3;
  std::vector<float> inv(rope_dim / 2);
  for (int i = 0; i < rope_dim / 2; ++i) inv[i] = std::pow(10000.0f, -2.0f * i / rope_dim);
  for (int n : {1, 9, 200}) {
    BatchView b = one_sequence(n, 5000);
    auto xv = round_bf16(random_vec(int64_t{n} * heads * head_dim, n, 1.0f));
    RopeView rc{make_tensor(*be.cpu, inv, 1, rope_dim / 2, DType::kF32), rope_dim};
    RopeView rg{make_tensor(*be.gpu, inv, 1, rope_dim / 2, DType::kF32), rope_dim};
    for (bool inverse : {false, true}) {
      Tensor xc = make_tensor(*be.cpu, xv, n, heads * head_dim, DType::kF32);
      Tensor xg = make_tensor(*be.gpu, xv, n, heads * head_dim, DType::kF32);
      be.cpu->begin_step(b);
      be.gpu->begin_step(b);
      be.cpu->rope(xc, head_dim, rc, b, inverse);
      be.gpu->rope(xg, head_dim, rg, b, inverse);
      EXPECT_LE(rel_l2(read_f32(*be.gpu, xg), read_f32(*be.cpu, xc)), 1e-5) << n << inverse;
    }
  }
}

struct HcSet {
  HcWeights cpu, gpu;
};

HcSet make_hc(Backends& be, int hc, int64_t D, bool head, uint64_t seed) {
  const int mix = head ? hc : (2 + hc) * hc;
  // The logits' spread independent of the width (Flash's at hc * D = 16384): at small widths a
  // fixed amplitude would give logits so flat that 20 Sinkhorn iterations converge whatever their
  // order, and a wrong order, a missing iteration or a race would pass.
  auto fn =
      random_vec(mix * hc * D, seed, 0.02f * std::sqrt(16384.0f / static_cast<float>(hc * D)));
  auto base = random_vec(mix, seed + 1, 0.5f);
  std::vector<float> scale = head ? std::vector<float>{0.7f} : std::vector<float>{0.7f, 0.9f, 1.1f};
  HcSet s;
  for (auto [b, w] : {std::pair{be.cpu.get(), &s.cpu}, {be.gpu.get(), &s.gpu}}) {
    w->fn = make_tensor(*b, fn, mix, hc * D, DType::kF32);
    w->base = make_tensor(*b, base, 1, mix, DType::kF32);
    w->scale = make_tensor(*b, scale, 1, static_cast<int64_t>(scale.size()), DType::kF32);
  }
  return s;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// A GPU tensor of `dtype` filled with NaN (so an element the kernel misses shows).
Tensor nan_tensor(Backend& be, int64_t rows, int64_t cols, DType dtype) {
  return make_tensor(be, std::vector<float>(static_cast<size_t>(rows * cols), NAN), rows, cols,
                     dtype);
}

// mHC pre and head on one shape against the CPU backend: X stored f32 and bf16 (the same values),
// x / h stored f32 and bf16; post and comb f32. X is a column view [T, hc * D] of a [T, hc * D +
// pad] tensor starting at column `off` (pad or off not a multiple of 4: the kernels' element-load
// path). Every GPU call runs twice, outputs poisoned with NaN in between: the same bits.
void check_mhc(Backends& be, int T, int hc, int64_t D, int64_t pad, int64_t off) {
  SCOPED_TRACE(testing::Message() << "T " << T << " hc " << hc << " D " << D << " pad " << pad
                                  << " off " << off);
  const int64_t W = hc * D, ld = W + pad;
  auto Xv = round_bf16(random_vec(T * ld, 1000 + T * 31 + hc, 1.0f));
  HcSet pre = make_hc(be, hc, D, false, 11 + hc), head = make_hc(be, hc, D, true, 12 + hc);
  Tensor Xc = make_tensor(*be.cpu, Xv, T, ld, DType::kF32).slice_cols(off, W);
  Tensor xc = be.cpu->alloc(T, D, DType::kF32), hh = be.cpu->alloc(T, D, DType::kF32);
  Tensor pc = be.cpu->alloc(T, hc, DType::kF32), cc = be.cpu->alloc(T, hc * hc, DType::kF32);
  be.cpu->hc_pre(Xc, pre.cpu, hc, 20, 1e-6f, 1e-6f, xc, pc, cc);
  be.cpu->hc_head(Xc, head.cpu, hc, 1e-6f, 1e-6f, hh);
  const auto x_ref = read_f32(*be.cpu, xc), h_ref = read_f32(*be.cpu, hh);
  const auto p_ref = read_f32(*be.cpu, pc), c_ref = read_f32(*be.cpu, cc);
  for (DType xd : {DType::kF32, DType::kBF16}) {
    Tensor Xg = make_tensor(*be.gpu, Xv, T, ld, xd).slice_cols(off, W);
    for (DType od : {DType::kF32, DType::kBF16}) {
      SCOPED_TRACE(testing::Message() << "X " << dtype_name(xd) << " out " << dtype_name(od));
      const double tol = od == DType::kF32 ? 1e-5 : 1e-2;
      std::vector<float> first[4];
      for (int run = 0; run < 2; ++run) {
        Tensor xg = nan_tensor(*be.gpu, T, D, od), hg = nan_tensor(*be.gpu, T, D, od);
        Tensor pg = nan_tensor(*be.gpu, T, hc, DType::kF32);
        Tensor cg = nan_tensor(*be.gpu, T, hc * hc, DType::kF32);
        be.gpu->hc_pre(Xg, pre.gpu, hc, 20, 1e-6f, 1e-6f, xg, pg, cg);
        be.gpu->hc_head(Xg, head.gpu, hc, 1e-6f, 1e-6f, hg);
        std::vector<float> got[4] = {read_f32(*be.gpu, xg), read_f32(*be.gpu, pg),
                                     read_f32(*be.gpu, cg), read_f32(*be.gpu, hg)};
        if (run == 0) {
          EXPECT_LE(rel_l2(got[0], x_ref), tol) << "x";
          EXPECT_LE(rel_l2(got[1], p_ref), 1e-5) << "post";
          EXPECT_LE(rel_l2(got[2], c_ref), 1e-5) << "comb";
          EXPECT_LE(rel_l2(got[3], h_ref), tol) << "head";
          for (int i = 0; i < 4; ++i) first[i] = std::move(got[i]);
        } else {
          for (int i = 0; i < 4; ++i) EXPECT_TRUE(same_bits(got[i], first[i])) << "output " << i;
        }
      }
    }
  }
}

// Decode and MTP-verify sizes (T = 1..64: many K-chunks), prefill sizes (one or a few chunks) on
// V4-Flash's shapes (hc_mult 4, hidden 4096); then strided and misaligned views (element loads),
// a width that is not a multiple of 4 or of a warp step, hc_mult 7 and 16 (mix rows over several
// passes, the Sinkhorn over the whole block instead of one warp), a width of one warp step (one
// chunk at every T) and a hidden size that is not a multiple of the collapse kernel's slice.
TEST(CudaElementwise, MhcPreAndHead) {
  SP_REQUIRE_GPU();
  Backends be;
  for (int T : {1, 2, 3, 17, 64, 300, 2048}) check_mhc(be, T, 4, 4096, 0, 0);
  for (auto [T, hc, D, pad, off] : {std::tuple{5, 4, 4096, 4, 0},
                                    {9, 4, 4096, 1, 0},
                                    {1, 4, 4096, 3, 1},
                                    {3, 4, 256, 0, 0},
                                    {5, 4, 1100, 0, 0},
                                    {2, 7, 96, 0, 0},
                                    {33, 7, 96, 0, 0},
                                    {17, 3, 45, 0, 0},
                                    {1, 2, 50, 0, 0},
                                    {40, 2, 50, 0, 0},
                                    {9, 16, 64, 0, 0},
                                    {3, 5, 64, 0, 0},  // the last Sinkhorn in one warp (25 values)
                                    {3, 6, 64, 0, 0},  // the first over the block (36)
                                    {2, 1, 64, 0, 0},  // hc_mult 1: a one-value Sinkhorn
                                    {8200, 2, 50, 0, 0}})  // one chunk, T past 8192 partial rows
    check_mhc(be, T, hc, D, pad, off);
}

// Decode sizes at hc_mult 4 through the one-launch path (every T up to its limit of 4), against
// the CPU; then the same bits as the two launches (the partial sums and the collapse are the same
// arithmetic in both). The default limit (2) is restored however the test ends.
TEST(CudaElementwise, MhcOneLaunch) {
  SP_REQUIRE_GPU();
  Backends be;
  struct Restore {
    int prev = cuda::set_hc_fuse_max_tokens(4);
    ~Restore() { cuda::set_hc_fuse_max_tokens(prev); }
  } restore;
  const std::tuple<int64_t, int64_t, int64_t> shapes[] = {
      {4096, 0, 0}, {4096, 3, 1}, {256, 0, 0}, {1100, 0, 0}, {45, 2, 0}};
  for (auto [D, pad, off] : shapes)
    for (int T : {1, 2, 3, 4}) check_mhc(be, T, 4, D, pad, off);
  // One launch against two, the same bits.
  for (auto [D, pad, off] : shapes) {
    for (int T : {1, 2, 4}) {
      SCOPED_TRACE(testing::Message() << "one vs two launches: T " << T << " D " << D << " pad "
                                      << pad << " off " << off);
      const int hc = 4;
      const int64_t W = hc * D, ld = W + pad;
      auto Xv = round_bf16(random_vec(T * ld, 77 + T, 1.0f));
      HcSet pre = make_hc(be, hc, D, false, 21), head = make_hc(be, hc, D, true, 22);
      for (DType xd : {DType::kF32, DType::kBF16}) {
        Tensor Xg = make_tensor(*be.gpu, Xv, T, ld, xd).slice_cols(off, W);
        for (DType od : {DType::kF32, DType::kBF16}) {
          SCOPED_TRACE(testing::Message() << "X " << dtype_name(xd) << " out " << dtype_name(od));
          std::vector<float> got[2][4];
          for (int limit : {4, 0}) {
            cuda::set_hc_fuse_max_tokens(limit);
            Tensor xg = nan_tensor(*be.gpu, T, D, od), hg = nan_tensor(*be.gpu, T, D, od);
            Tensor pg = nan_tensor(*be.gpu, T, hc, DType::kF32);
            Tensor cg = nan_tensor(*be.gpu, T, hc * hc, DType::kF32);
            be.gpu->hc_pre(Xg, pre.gpu, hc, 20, 1e-6f, 1e-6f, xg, pg, cg);
            be.gpu->hc_head(Xg, head.gpu, hc, 1e-6f, 1e-6f, hg);
            auto& g = got[limit == 0];
            g[0] = read_f32(*be.gpu, xg);
            g[1] = read_f32(*be.gpu, pg);
            g[2] = read_f32(*be.gpu, cg);
            g[3] = read_f32(*be.gpu, hg);
          }
          for (int i = 0; i < 4; ++i) {
            EXPECT_TRUE(same_bits(got[0][i], got[1][i])) << "output " << i;
            for (float v : got[0][i]) ASSERT_TRUE(std::isfinite(v)) << "output " << i;
          }
        }
      }
    }
  }
}

// hc_pre_norm / hc_head_norm (mHC collapse, then the sublayer's input norm / the final norm in
// place) at hc_mult 4 against the CPU backend (its default: the two calls), and the same bits as
// the CUDA backend's two calls (hc_pre + rms_norm, hc_head + rms_norm). The norm runs inside the
// one-launch mHC when that path and rms_norm's register path both apply (D a multiple of 4 up to
// 8192: norm blocks of 96, 256 and 512 threads below), else as a second call (D = 45, 16384, T
// over the limit).
void check_mhc_norm(Backends& be, int T, int64_t D, int64_t pad, int64_t off) {
  SCOPED_TRACE(testing::Message() << "norm: T " << T << " D " << D << " pad " << pad << " off "
                                  << off);
  const int hc = 4;
  const int64_t W = hc * D, ld = W + pad;
  auto Xv = round_bf16(random_vec(T * ld, 300 + T, 1.0f));
  auto wv = random_vec(D, 301, 0.2f);
  for (auto& v : wv) v += 1.0f;
  HcSet pre = make_hc(be, hc, D, false, 31), head = make_hc(be, hc, D, true, 32);
  Tensor Xc = make_tensor(*be.cpu, Xv, T, ld, DType::kF32).slice_cols(off, W);
  Tensor wc = make_tensor(*be.cpu, wv, 1, D, DType::kF32),
         wg = make_tensor(*be.gpu, wv, 1, D, DType::kF32);
  Tensor xc = be.cpu->alloc(T, D, DType::kF32), xnc = be.cpu->alloc(T, D, DType::kF32);
  Tensor hh = be.cpu->alloc(T, D, DType::kF32);
  Tensor pc = be.cpu->alloc(T, hc, DType::kF32), cc = be.cpu->alloc(T, hc * hc, DType::kF32);
  be.cpu->hc_pre_norm(Xc, pre.cpu, hc, 20, 1e-6f, 1e-6f, &wc, xc, xnc, pc, cc);
  be.cpu->hc_head_norm(Xc, head.cpu, hc, 1e-6f, 1e-6f, &wc, hh);
  const auto xn_ref = read_f32(*be.cpu, xnc), h_ref = read_f32(*be.cpu, hh);
  for (DType xd : {DType::kF32, DType::kBF16}) {
    Tensor Xg = make_tensor(*be.gpu, Xv, T, ld, xd).slice_cols(off, W);
    for (DType od : {DType::kF32, DType::kBF16}) {
      SCOPED_TRACE(testing::Message() << "X " << dtype_name(xd) << " out " << dtype_name(od));
      const double tol = od == DType::kF32 ? 1e-5 : 1e-2;
      std::vector<float> got[2][5];
      for (int way = 0; way < 2; ++way) {
        Tensor xg = nan_tensor(*be.gpu, T, D, od), xng = nan_tensor(*be.gpu, T, D, od);
        Tensor hg = nan_tensor(*be.gpu, T, D, od);
        Tensor pg = nan_tensor(*be.gpu, T, hc, DType::kF32);
        Tensor cg = nan_tensor(*be.gpu, T, hc * hc, DType::kF32);
        if (way == 0) {
          be.gpu->hc_pre_norm(Xg, pre.gpu, hc, 20, 1e-6f, 1e-6f, &wg, xg, xng, pg, cg);
          be.gpu->hc_head_norm(Xg, head.gpu, hc, 1e-6f, 1e-6f, &wg, hg);
        } else {
          be.gpu->hc_pre(Xg, pre.gpu, hc, 20, 1e-6f, 1e-6f, xg, pg, cg);
          be.gpu->rms_norm(xg, &wg, static_cast<int>(D), 1e-6f, xng);
          be.gpu->hc_head(Xg, head.gpu, hc, 1e-6f, 1e-6f, hg);
          be.gpu->rms_norm(hg, &wg, static_cast<int>(D), 1e-6f, hg);
        }
        got[way][0] = read_f32(*be.gpu, xng);
        got[way][1] = read_f32(*be.gpu, hg);
        got[way][2] = read_f32(*be.gpu, xg);
        got[way][3] = read_f32(*be.gpu, pg);
        got[way][4] = read_f32(*be.gpu, cg);
      }
      EXPECT_LE(rel_l2(got[0][0], xn_ref), tol) << "xn";
      EXPECT_LE(rel_l2(got[0][1], h_ref), tol) << "head";
      for (int i = 0; i < 5; ++i) EXPECT_TRUE(same_bits(got[0][i], got[1][i])) << "output " << i;
    }
  }
}

TEST(CudaElementwise, MhcNorm) {
  SP_REQUIRE_GPU();
  Backends be;
  for (int T : {1, 2, 3, 17, 64, 300}) check_mhc_norm(be, T, 4096, 0, 0);
  for (int T : {1, 2}) {
    check_mhc_norm(be, T, 4096, 3, 1);
    check_mhc_norm(be, T, 1100, 0, 0);
    check_mhc_norm(be, T, 8192, 0, 0);
    check_mhc_norm(be, T, 45, 0, 0);
  }
  check_mhc_norm(be, 1, 16384, 0, 0);
  struct Restore {
    int prev = cuda::set_hc_fuse_max_tokens(4);
    ~Restore() { cuda::set_hc_fuse_max_tokens(prev); }
  } restore;
  for (int T : {3, 4}) check_mhc_norm(be, T, 4096, 0, 0);
}

// X stored f32 (fp32 tolerance) and bf16; hc_mult 4 (the unrolled kernel) at decode and prefill
// sizes, other hc_mult (the generic one); each GPU call twice from the same X: the same bits.
TEST(CudaElementwise, MhcPost) {
  SP_REQUIRE_GPU();
  Backends be;
  for (auto [T, hc, D] : {std::tuple{1, 4, 4096},
                          {2, 4, 4096},
                          {3, 4, 256},
                          {17, 4, 4096},
                          {64, 4, 4096},
                          {65, 4, 4096},
                          {300, 4, 1100},
                          {2, 7, 96},
                          {17, 16, 64},
                          {5, 1, 64}}) {
    const int64_t W = int64_t{hc} * D;
    auto Xv = round_bf16(random_vec(T * W, T + hc, 1.0f));
    Tensor Xc = make_tensor(*be.cpu, Xv, T, W, DType::kF32);
    auto pv = random_vec(T * hc, 7, 1.0f), cv = random_vec(T * hc * hc, 8, 0.5f);
    Tensor pc = make_tensor(*be.cpu, pv, T, hc, DType::kF32);
    Tensor cc = make_tensor(*be.cpu, cv, T, hc * hc, DType::kF32);
    Tensor pg = make_tensor(*be.gpu, pv, T, hc, DType::kF32);
    Tensor cg = make_tensor(*be.gpu, cv, T, hc * hc, DType::kF32);
    // The same sublayer output (rounded to bf16) on both sides.
    auto fv = round_bf16(random_vec(T * D, 99, 1.0f));
    Tensor fc = make_tensor(*be.cpu, fv, T, D, DType::kF32);
    be.cpu->hc_post(fc, pc, cc, hc, Xc);
    const auto want = read_f32(*be.cpu, Xc);
    for (DType xd : {DType::kF32, DType::kBF16}) {
      SCOPED_TRACE(testing::Message()
                   << "T " << T << " hc " << hc << " D " << D << " X " << dtype_name(xd));
      Tensor fg = make_tensor(*be.gpu, fv, T, D, xd);
      std::vector<float> first;
      for (int run = 0; run < 2; ++run) {
        Tensor Xg = make_tensor(*be.gpu, Xv, T, W, xd);
        be.gpu->hc_post(fg, pg, cg, hc, Xg);
        auto got = read_f32(*be.gpu, Xg);
        if (run == 0) {
          EXPECT_LE(rel_l2(got, want), xd == DType::kF32 ? 1e-5 : 1e-2) << "post X";
          first = std::move(got);
        } else {
          EXPECT_TRUE(same_bits(got, first));
        }
      }
    }
  }
}

TEST(CudaElementwise, ExpandGatherCopy) {
  SP_REQUIRE_GPU();
  Backends be;
  const int T = 9, D = 40, hc = 4;
  auto ev = round_bf16(random_vec(T * D, 3, 1.0f));
  Tensor eg = make_tensor(*be.gpu, ev, T, D, DType::kBF16);
  Tensor Xg = be.gpu->alloc(T, hc * D, DType::kBF16);
  be.gpu->expand_streams(eg, hc, Xg);
  auto X = read_f32(*be.gpu, Xg);
  for (int t = 0; t < T; ++t)
    for (int j = 0; j < hc; ++j)
      for (int d = 0; d < D; ++d) ASSERT_EQ(X[(t * hc + j) * D + d], ev[t * D + d]);
  BatchView b = one_sequence(T, 0);
  b.logit_rows = {8, 0, 3};
  be.gpu->begin_step(b);
  Tensor out = be.gpu->alloc(3, hc * D, DType::kBF16);
  be.gpu->gather_logit_rows(Xg, b, out);
  auto o = read_f32(*be.gpu, out);
  for (int i = 0; i < 3; ++i)
    for (int k = 0; k < hc * D; ++k) ASSERT_EQ(o[i * hc * D + k], X[b.logit_rows[i] * hc * D + k]);
  Tensor c = be.gpu->alloc(T, hc * D, DType::kBF16);
  be.gpu->copy(Xg, c);
  EXPECT_EQ(read_f32(*be.gpu, c), X);
}

// Slot copies of the prefix cache: whole rows within one state tensor, contiguous and strided
// views, bf16 and f32; both backends end with the same bits.
TEST(CudaElementwise, CopyRowsWithinStateTensor) {
  SP_REQUIRE_GPU();
  Backends be;
  for (DType dt : {DType::kF32, DType::kBF16}) {
    const int64_t R = 37, C = 72;
    auto v = round_bf16(random_vec(R * C, 11, 1.0f));
    Tensor tc = make_tensor(*be.cpu, v, R, C, dt), tg = make_tensor(*be.gpu, v, R, C, dt);
    be.cpu->copy_rows(tc, 3, 20, 9);
    be.gpu->copy_rows(tg, 3, 20, 9);
    be.cpu->copy_rows(tc, 30, 0, 7);
    be.gpu->copy_rows(tg, 30, 0, 7);
    // A column view (stride > cols) exercises the 2-D copy.
    be.cpu->copy_rows(tc.slice_cols(8, 40), 12, 1, 5);
    be.gpu->copy_rows(tg.slice_cols(8, 40), 12, 1, 5);
    const auto got = read_f32(*be.gpu, tg), want = read_f32(*be.cpu, tc);
    EXPECT_EQ(got, want);
    EXPECT_NE(want, v);  // the copies changed something
    for (int64_t c = 0; c < C; ++c) ASSERT_EQ(want[20 * C + c], v[3 * C + c]);
  }
}

TEST(CudaElementwise, GreedySamplingTiesToLowerId) {
  SP_REQUIRE_GPU();
  Backends be;
  const int rows = 4, V = 129280;
  auto lv = random_vec(int64_t{rows} * V, 17, 3.0f);
  lv[1 * V + 777] = lv[1 * V + 90000] = 50.0f;  // a tie: the lower id wins
  lv[2 * V + V - 1] = 60.0f;                    // the last id
  Tensor lc = make_tensor(*be.cpu, lv, rows, V, DType::kF32);
  Tensor lg = make_tensor(*be.gpu, lv, rows, V, DType::kF32);
  std::vector<SampleSpec> specs(rows);
  for (int i = 0; i < rows; ++i) specs[i].row = rows - 1 - i;
  specs[3].temperature = 0.8f;  // one sampled row: host reference path, same draw
  specs[3].top_k = 50;
  specs[3].seed = 5;
  specs[3].counter = 12;
  std::vector<int32_t> a(rows), g(rows);
  be.cpu->sample(lc, specs, a.data());
  be.gpu->sample(lg, specs, g.data());
  EXPECT_EQ(a, g);
  EXPECT_EQ(g[2], 777);
  EXPECT_EQ(g[1], V - 1);
}

}  // namespace
}  // namespace sp::test
