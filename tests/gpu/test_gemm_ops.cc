// Parity of the CUDA projections (linear, grouped_linear) and the embedding gather against the CPU
// backend, for every weight format and activation dtype, on awkward and V4-Flash shapes. Outputs
// are poisoned with NaN before each run, so an unwritten element fails the check.
#include <cstdio>
#include <string>

#include "tests/gpu/op_harness.h"

namespace sp::test {
namespace {

// A weight format case: the matrix format, its value dtype (float formats) and scale dtype.
struct Fmt {
  WeightFormat f;
  DType dtype;
  DType scale;
  const char* name;
};

const Fmt kFormats[] = {
    {WeightFormat::kFloat, DType::kF32, DType::kE8M0, "f32"},
    {WeightFormat::kFloat, DType::kBF16, DType::kE8M0, "bf16"},
    {WeightFormat::kFloat, DType::kF16, DType::kE8M0, "f16"},
    {WeightFormat::kFP8, DType::kE4M3, DType::kE8M0, "fp8/e8m0"},
    {WeightFormat::kFP8, DType::kE4M3, DType::kF32, "fp8/f32"},
    {WeightFormat::kFP4, DType::kI8, DType::kE8M0, "fp4/e8m0"},
    {WeightFormat::kFP4, DType::kI8, DType::kF32, "fp4/f32"},
};

// random_matrix plus F16 values and F32 scales (not powers of two, so no exact bf16 path).
HostMatrix make_matrix(const Fmt& fmt, int64_t out, int64_t in, uint64_t seed) {
  const bool f16 = fmt.f == WeightFormat::kFloat && fmt.dtype == DType::kF16;
  HostMatrix h = random_matrix(fmt.f, out, in, seed, f16 ? DType::kBF16 : fmt.dtype);
  if (f16) {
    // Random finite halves of magnitude ~2^-5..2^1.
    std::mt19937_64 rng(seed * 7 + 1);
    for (int64_t i = 0; i < out * in; ++i) {
      const uint16_t v =
          static_cast<uint16_t>(((rng() & 1) << 15) | ((10 + rng() % 7) << 10) | (rng() & 0x3ff));
      std::memcpy(h.data.data() + i * 2, &v, 2);
    }
    h.m.dtype = DType::kF16;
  }
  if (fmt.f != WeightFormat::kFloat && fmt.scale == DType::kF32) use_f32_scales(h, seed);
  h.m.data = h.data.data();
  h.m.scale = h.scale.empty() ? nullptr : h.scale.data();
  return h;
}

// A [rows, cols] view of a [rows, cols + pad] backend buffer (strided rows when pad > 0).
Tensor make_strided(Backend& be, const std::vector<float>& v, int64_t rows, int64_t cols,
                    int64_t pad, DType dt) {
  std::vector<float> wide(static_cast<size_t>(rows * (cols + pad)), 0.0f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) wide[r * (cols + pad) + c] = v[r * cols + c];
  return make_tensor(be, wide, rows, cols + pad, dt).slice_cols(0, cols);
}

Tensor poisoned(Backend& be, int64_t rows, int64_t cols, DType dt) {
  return make_tensor(be, std::vector<float>(static_cast<size_t>(rows * cols), NAN), rows, cols, dt);
}

struct LinearCase {
  Fmt fmt;
  int64_t M, N, K;
  DType x_dt, y_dt;
  int groups = 1;
  int64_t x_pad = 0;
  uint64_t seed = 1;
};

// Runs one case on both backends; returns the relative L2 error (checks it against the bound).
double check_linear(Backends& be, const LinearCase& c, std::vector<float>* gpu_out = nullptr) {
  const int64_t xcols = c.K * c.groups;
  HostMatrix hm = make_matrix(c.fmt, c.N, c.K, c.seed);
  Matrix mc = be.cpu->upload(hm.m);
  Matrix mg = be.gpu->upload(hm.m);
  auto xv = random_vec(c.M * xcols, c.seed + 100, 1.0f);
  if (c.x_dt == DType::kBF16) xv = round_bf16(xv);
  Tensor xc = make_tensor(*be.cpu, xv, c.M, xcols, DType::kF32);
  Tensor xg = make_strided(*be.gpu, xv, c.M, xcols, c.x_pad, c.x_dt);
  Tensor yc = be.cpu->alloc(c.M, c.N, DType::kF32);
  Tensor yg = poisoned(*be.gpu, c.M, c.N, c.y_dt);
  if (c.groups > 1) {
    be.cpu->grouped_linear(xc, mc, c.groups, yc);
    be.gpu->grouped_linear(xg, mg, c.groups, yg);
  } else {
    be.cpu->linear(xc, mc, yc);
    be.gpu->linear(xg, mg, yg);
  }
  be.gpu->synchronize();
  auto ref = read_f32(*be.cpu, yc);
  auto got = read_f32(*be.gpu, yg);
  if (c.y_dt == DType::kBF16) ref = round_bf16(ref);
  int64_t unwritten = 0;
  for (float v : got) unwritten += std::isfinite(v) ? 0 : 1;
  const double err = rel_l2(got, ref);
  const double tol = c.y_dt == DType::kBF16 ? 1e-2 : 1e-5;
  std::printf("  %-9s M=%-5lld N=%-6lld K=%-5lld G=%d x=%s y=%s pad=%lld  rel_l2=%.3g\n",
              c.fmt.name, static_cast<long long>(c.M), static_cast<long long>(c.N),
              static_cast<long long>(c.K), c.groups, dtype_name(c.x_dt), dtype_name(c.y_dt),
              static_cast<long long>(c.x_pad), err);
  EXPECT_EQ(unwritten, 0) << c.fmt.name << " M=" << c.M << " N=" << c.N << " K=" << c.K;
  EXPECT_LE(err, tol) << c.fmt.name << " M=" << c.M << " N=" << c.N << " K=" << c.K
                      << " x=" << dtype_name(c.x_dt) << " y=" << dtype_name(c.y_dt);
  if (gpu_out) *gpu_out = std::move(got);
  return err;
}

TEST(CudaLinear, EveryFormatAndDtypeAwkwardShapes) {
  SP_REQUIRE_GPU();
  Backends be;
  uint64_t seed = 1;
  for (const Fmt& f : kFormats) {
    // K not a multiple of 128 (partial FP8 blocks; FP4 needs K % 32 == 0), N not of 128 either.
    const int64_t K = f.f == WeightFormat::kFP4 ? 224 : 200;
    for (int64_t M : {1, 3, 17, 64, 300})
      for (DType xd : {DType::kF32, DType::kBF16})
        for (DType yd : {DType::kF32, DType::kBF16})
          check_linear(be, {f, M, 300, K, xd, yd, 1, M == 3 ? 8 : 0, seed++});
  }
}

TEST(CudaLinear, OddStridesAndTails) {
  SP_REQUIRE_GPU();
  Backends be;
  uint64_t seed = 500;
  // Row strides that defeat vector loads, K tails inside a chunk.
  for (const Fmt& f : kFormats) {
    const int64_t K = f.f == WeightFormat::kFP4 ? 96 : 131;
    for (int64_t M : {1, 5, 40})
      check_linear(be, {f, M, 129, K, DType::kBF16, DType::kF32, 1, 3, seed++});
  }
}

TEST(CudaLinear, PrefillM4096) {
  SP_REQUIRE_GPU();
  Backends be;
  uint64_t seed = 900;
  for (const Fmt& f : kFormats)
    for (DType xd : {DType::kF32, DType::kBF16})
      check_linear(be, {f, 4096, 192, 256, xd, DType::kF32, 1, 0, seed++});
}

TEST(CudaLinear, GroupedLinear) {
  SP_REQUIRE_GPU();
  Backends be;
  uint64_t seed = 1300;
  for (const Fmt& f : {kFormats[1], kFormats[3], kFormats[4], kFormats[5]}) {
    for (int64_t M : {1, 17, 64, 300}) {
      // 128 rows per group (tensor-core eligible) and 75 (a block straddles groups).
      check_linear(be, {f, M, 512, 256, DType::kBF16, DType::kF32, 4, 0, seed++});
      check_linear(be, {f, M, 300, 64, DType::kBF16, DType::kBF16, 4, 0, seed++});
    }
  }
}

TEST(CudaLinear, FlashShapes) {
  SP_REQUIRE_GPU();
  Backends be;
  const Fmt fp8 = kFormats[3], fp4 = kFormats[5], bf16 = kFormats[1];
  uint64_t seed = 2000;
  for (int64_t M : {1, 8, 64}) {
    check_linear(be, {fp8, M, 1024, 4096, DType::kBF16, DType::kBF16, 1, 0, seed++});  // wq_a
    check_linear(be, {fp8, M, 1024, 4096, DType::kBF16, DType::kF32, 1, 0, seed++});
  }
  for (int64_t M : {1, 8}) {
    check_linear(be, {fp8, M, 32768, 1024, DType::kBF16, DType::kBF16, 1, 0, seed++});  // wq_b
    check_linear(be, {fp4, M, 2048, 4096, DType::kBF16, DType::kF32, 1, 0, seed++});    // w1
    check_linear(be, {fp4, M, 4096, 2048, DType::kBF16, DType::kF32, 1, 0, seed++});    // w2
  }
  // wo_a: 8 groups of 1024 rows.
  check_linear(be, {fp8, 8, 8192, 512, DType::kBF16, DType::kBF16, 8, 0, seed++});
  for (int64_t M : {1, 8})
    check_linear(be, {bf16, M, 129280, 4096, DType::kBF16, DType::kF32, 1, 0, seed++});  // head
  // fp32 activations (the default): wq_b, wo_b, wo_a (8 groups of 1024 rows), head.
  for (int64_t M : {1, 4, 32}) {
    check_linear(be, {fp8, M, 32768, 1024, DType::kF32, DType::kBF16, 1, 0, seed++});
    check_linear(be, {fp8, M, 4096, 8192, DType::kF32, DType::kF32, 1, 0, seed++});
    check_linear(be, {fp8, M, 8192, 1024, DType::kF32, DType::kBF16, 8, 0, seed++});
  }
  check_linear(be, {bf16, 1, 129280, 4096, DType::kF32, DType::kF32, 1, 0, seed++});
}

// The dispatcher's paths by M: M = 1 the one-row GEMV (every format); M = 2..64 the skinny
// tensor-core kernel for weights exact in bf16 (BF16, FP8/FP4 with E8M0 scales), with fp32
// activations split into two bf16 halves; M > 64 the tensor-core tiles (fp32 activations split the
// same way); the remaining formats (F32, F16, F32-scaled FP8/FP4) the CUDA-core GEMV. The shapes
// below put every path at its edges: M around the tile sizes (8, 16, 32, 64), N not a multiple of
// the 64-row blocks, K not a multiple of a k-step, fp32 and bf16 activations and outputs.
TEST(CudaLinear, SkinnyAndOneRowEveryPath) {
  SP_REQUIRE_GPU();
  Backends be;
  uint64_t seed = 4000;
  for (const Fmt& f : kFormats) {
    const int64_t K = f.f == WeightFormat::kFP4 ? 224 : f.dtype == DType::kBF16 ? 203 : 200;
    for (int64_t M : {1, 2, 3, 8, 9, 17, 33, 64, 65})
      for (DType xd : {DType::kF32, DType::kBF16})
        for (DType yd : {DType::kF32, DType::kBF16})
          check_linear(be, {f, M, 301, K, xd, yd, 1, M == 9 ? 5 : 0, seed++});
  }
}

// Long K: the skinny kernel's K split across blocks (ordered partials) and the one-row GEMV's K
// split across warps; fp32 activations against the fp32 bound.
TEST(CudaLinear, LongKSplits) {
  SP_REQUIRE_GPU();
  Backends be;
  const Fmt fp8 = kFormats[3], fp4 = kFormats[5], bf16 = kFormats[1];
  uint64_t seed = 4500;
  for (int64_t M : {1, 2, 4, 8, 16, 33, 64}) {
    check_linear(be, {fp8, M, 1024, 4096, DType::kF32, DType::kF32, 1, 0, seed++});
    check_linear(be, {bf16, M, 777, 1000, DType::kF32, DType::kF32, 1, 0, seed++});
    check_linear(be, {fp4, M, 512, 2048, DType::kF32, DType::kBF16, 1, 0, seed++});
    check_linear(be, {fp8, M, 200, 8192, DType::kBF16, DType::kF32, 1, 0, seed++});
  }
}

// Grouped projections on the skinny path (64-row blocks inside a group, K tails inside a group)
// and where it cannot tile (groups of 75 rows: CUDA-core GEMV), fp32 activations.
TEST(CudaLinear, GroupedSkinnyFp32) {
  SP_REQUIRE_GPU();
  Backends be;
  uint64_t seed = 5000;
  for (const Fmt& f : {kFormats[1], kFormats[3], kFormats[5]}) {
    const int64_t K = f.f == WeightFormat::kFP4 ? 224 : 200;
    for (int64_t M : {1, 2, 9, 64, 65}) {
      check_linear(be, {f, M, 512, K, DType::kF32, DType::kF32, 4, 0, seed++});
      check_linear(be, {f, M, 300, 64, DType::kF32, DType::kBF16, 4, 0, seed++});
    }
  }
}

// e4m3 NaN codes (0x7f, 0xff): the CPU decodes them to NaN, so every output of a row holding one
// is NaN. The GPU paths must give NaN exactly there (the one-row GEMV's integer decode turns the
// chunk's scale into NaN; the other paths decode to NaN) and the CPU's values elsewhere. Rows with
// a NaN code at the start, in a K tail and in a chunk of the second 128-block; M = 1 (one-row
// GEMV, E8M0 and F32 scales, split-K warps at K = 4096), 3 (skinny), 300 (tiles).
TEST(CudaLinear, E4m3NanCodesLikeCpu) {
  SP_REQUIRE_GPU();
  Backends be;
  uint64_t seed = 6000;
  for (const Fmt& f : {kFormats[3], kFormats[4]})
    for (int64_t K : {200, 4096})
      for (int64_t M : {1, 3, 300}) {
        if (K == 4096 && M == 300) continue;
        const int64_t N = 260;
        HostMatrix hm = make_matrix(f, N, K, seed);
        const int64_t nan_rows[] = {0, 5, 130, 259};
        const int64_t nan_cols[] = {0, K - 1, 140, K / 2 + 3};
        for (int i = 0; i < 4; ++i)
          hm.data[static_cast<size_t>(nan_rows[i] * K + nan_cols[i])] = i % 2 ? 0xff : 0x7f;
        Matrix mc = be.cpu->upload(hm.m);
        Matrix mg = be.gpu->upload(hm.m);
        auto xv = random_vec(M * K, seed + 100, 1.0f);
        ++seed;
        Tensor xc = make_tensor(*be.cpu, xv, M, K, DType::kF32);
        Tensor xg = make_tensor(*be.gpu, xv, M, K, DType::kF32);
        Tensor yc = be.cpu->alloc(M, N, DType::kF32);
        Tensor yg = poisoned(*be.gpu, M, N, DType::kF32);
        be.cpu->linear(xc, mc, yc);
        be.gpu->linear(xg, mg, yg);
        be.gpu->synchronize();
        const auto ref = read_f32(*be.cpu, yc);
        const auto got = read_f32(*be.gpu, yg);
        std::vector<float> rf, gf;
        int64_t nan_ref = 0, mismatched = 0;
        for (size_t i = 0; i < ref.size(); ++i) {
          nan_ref += std::isnan(ref[i]) ? 1 : 0;
          if (std::isnan(ref[i]) != std::isnan(got[i]) || std::isinf(got[i])) ++mismatched;
          if (!std::isnan(ref[i]) && std::isfinite(got[i])) {
            rf.push_back(ref[i]);
            gf.push_back(got[i]);
          }
        }
        const double err = rel_l2(gf, rf);
        std::printf("  nan codes %-9s M=%-4lld K=%-5lld nan outputs %lld  rel_l2=%.3g\n", f.name,
                    static_cast<long long>(M), static_cast<long long>(K),
                    static_cast<long long>(nan_ref), err);
        EXPECT_EQ(nan_ref, 4 * M) << f.name;  // the CPU oracle: 4 rows, every token
        EXPECT_EQ(mismatched, 0) << f.name << " M=" << M << " K=" << K;
        EXPECT_LE(err, 1e-5) << f.name << " M=" << M << " K=" << K;
      }
}

// The one-row GEMV on FP8 / FP4 with E8M0 scales computes the chunk sums of weights decoded times
// 2^-8 (FP8) or 2^-14 (FP4) and scales them back: on the CPU oracle's bound at Flash-like K, fp32
// activations and output, both scale kinds, rows grouped and not.
TEST(CudaLinear, OneRowIntegerDecode) {
  SP_REQUIRE_GPU();
  Backends be;
  uint64_t seed = 6500;
  for (const Fmt& f : {kFormats[3], kFormats[4], kFormats[5], kFormats[6]}) {
    for (int64_t K : {128, 512, 4096}) {
      check_linear(be, {f, 1, 384, K, DType::kF32, DType::kF32, 1, 0, seed++});
      check_linear(be, {f, 1, 384, K, DType::kBF16, DType::kF32, 1, 0, seed++});
    }
    // Grouped: 4 groups of 96 rows (R = 4 rows per warp) and of 75 rows (one row per warp).
    check_linear(be, {f, 1, 384, 256, DType::kF32, DType::kF32, 4, 0, seed++});
    check_linear(be, {f, 1, 300, 256, DType::kF32, DType::kF32, 4, 0, seed++});
  }
}

TEST(CudaLinear, Deterministic) {
  SP_REQUIRE_GPU();
  Backends be;
  for (DType xd : {DType::kBF16, DType::kF32})
    for (int64_t M : {1, 3, 8, 64, 300}) {
      LinearCase c{kFormats[3], M, 1024, 4096, xd, DType::kF32, 1, 0, 77};
      std::vector<float> a, b;
      check_linear(be, c, &a);
      check_linear(be, c, &b);
      ASSERT_EQ(a.size(), b.size());
      EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0)
          << "M=" << M << " x=" << dtype_name(xd);
    }
}

TEST(CudaEmbed, EveryFormatExact) {
  SP_REQUIRE_GPU();
  Backends be;
  uint64_t seed = 3000;
  for (const Fmt& f : kFormats) {
    const int64_t vocab = 1000, dim = f.f == WeightFormat::kFP4 ? 288 : 300;
    HostMatrix hm = make_matrix(f, vocab, dim, seed++);
    Matrix mc = be.cpu->upload(hm.m);
    Matrix mg = be.gpu->upload(hm.m);
    for (int T : {1, 5, 300}) {
      BatchView b;
      b.num_tokens = T;
      std::mt19937_64 rng(seed++);
      for (int t = 0; t < T; ++t) {
        b.token_ids.push_back(static_cast<int32_t>(rng() % vocab));
        b.positions.push_back(t);
        b.chunk_of.push_back(0);
      }
      SeqChunk ch;
      ch.n_tokens = T;
      ch.num_blocks = 1;
      b.chunks.push_back(ch);
      b.block_tables.push_back(0);
      be.cpu->begin_step(b);
      be.gpu->begin_step(b);
      Tensor oc = be.cpu->alloc(T, dim, DType::kF32);
      be.cpu->embed(mc, b, oc);
      auto ref = read_f32(*be.cpu, oc);
      for (DType od : {DType::kF32, DType::kBF16}) {
        Tensor og = poisoned(*be.gpu, T, dim, od);
        be.gpu->embed(mg, b, og);
        auto got = read_f32(*be.gpu, og);
        auto want = od == DType::kBF16 ? round_bf16(ref) : ref;
        EXPECT_EQ(got, want) << f.name << " T=" << T << " out=" << dtype_name(od);
      }
    }
  }
}

}  // namespace
}  // namespace sp::test
