// Parity of the small decode-step kernels against the CPU backend at the shapes where the
// dispatcher picks each path: RMS norm (the register path: groups of whole 4-value vectors up to
// 16,384 values with aligned rows; the strided loop otherwise), greedy sampling (rows split over
// slices of 2,048 logits, float4 loads for aligned rows, scalar loads otherwise; ties, NaN and
// infinities), at T = 1, 2, 3, 17, 64 and 300 rows, and identical bits run twice.
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>

#include "tests/gpu/op_harness.h"

namespace sp::test {
namespace {

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// RMS norm over rows x (cols / group) groups; x on the GPU in `xd`, y in `yd`; `offset` columns
// of padding in front of each row (a view whose rows are not 16-byte aligned: the loop path);
// in_place: y is x (both f32 or both bf16).
void check_norm(Backends& be, int rows, int cols, int group, bool weighted, DType xd, DType yd,
                int offset, bool in_place) {
  const int width = cols + offset;
  auto xv = round_bf16(random_vec(int64_t{rows} * cols, rows * 7 + cols + group, 2.0f));
  auto wv = random_vec(group, 5 + group, 1.0f);
  std::vector<float> xpad(static_cast<size_t>(rows) * width, 0.5f);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c)
      xpad[static_cast<size_t>(r) * width + offset + c] = xv[r * cols + c];
  Tensor wc = make_tensor(*be.cpu, wv, 1, group, DType::kF32);
  Tensor wg = make_tensor(*be.gpu, wv, 1, group, DType::kF32);
  Tensor xc = make_tensor(*be.cpu, xv, rows, cols, DType::kF32);
  Tensor yc = be.cpu->alloc(rows, cols, DType::kF32);
  be.cpu->rms_norm(xc, weighted ? &wc : nullptr, group, 1e-6f, yc);
  const auto want = read_f32(*be.cpu, yc);
  std::vector<float> first;
  for (int run = 0; run < 2; ++run) {
    Tensor xfull = make_tensor(*be.gpu, xpad, rows, width, xd);
    Tensor xg = xfull.slice_cols(offset, cols);
    Tensor yg =
        in_place ? xg : make_tensor(*be.gpu, std::vector<float>(xv.size(), NAN), rows, cols, yd);
    be.gpu->rms_norm(xg, weighted ? &wg : nullptr, group, 1e-6f, yg);
    std::vector<float> got;
    if (in_place) {
      const auto full = read_f32(*be.gpu, xfull);
      for (int r = 0; r < rows; ++r)
        for (int c = 0; c < cols; ++c)
          got.push_back(full[static_cast<size_t>(r) * width + offset + c]);
      for (int r = 0; r < rows; ++r)  // the padding is untouched
        for (int c = 0; c < offset; ++c) ASSERT_EQ(full[static_cast<size_t>(r) * width + c], 0.5f);
    } else {
      got = read_f32(*be.gpu, yg);
    }
    const DType out = in_place ? xd : yd;
    auto ref = out == DType::kBF16 ? round_bf16(want) : want;
    const double e = rel_l2(got, ref);
    EXPECT_LE(e, out == DType::kF32 ? 1e-5 : 1e-2)
        << rows << "x" << cols << "/" << group << " x " << dtype_name(xd) << " y "
        << dtype_name(out) << " offset " << offset << (in_place ? " in place" : "")
        << (weighted ? " weighted" : "");
    if (run == 0)
      first = got;
    else
      EXPECT_TRUE(same_bits(first, got)) << rows << "x" << cols << "/" << group << ": bits differ";
  }
}

TEST(CudaElementwise, RmsNormDecodeAndPrefillShapes) {
  SP_REQUIRE_GPU();
  Backends be;
  // (cols, group): V4-Flash's norms (q_lora 1024, hidden 4096, the 64 heads of 512 of q, kv 512),
  // V4-Pro's hidden 7168, the register path's widest group (16,384: 1,024 threads x 4 vectors), a
  // group of 4 x 1,025 vectors (the block rounded up to 288 threads, the last one partial), small
  // groups (one warp, some lanes idle); then the loop path: a group past 16,384, a group not a
  // multiple of 4.
  const std::tuple<int, int> shapes[] = {
      {4096, 4096}, {1024, 1024}, {64 * 512, 512}, {512, 512},     {7168, 7168}, {16384, 16384},
      {4100, 4100}, {96, 32},     {8, 4},          {16400, 16400}, {4095, 4095}, {3 * 75, 75}};
  for (auto [cols, group] : shapes)
    for (int rows : {1, 2, 3, 17, 64, 300}) {
      if (int64_t{rows} * cols > 300 * 4096 && rows > 17) continue;  // keep the CPU side quick
      check_norm(be, rows, cols, group, true, DType::kBF16, DType::kF32, 0, false);
      check_norm(be, rows, cols, group, rows % 2 == 0, DType::kF32, DType::kBF16, 0, false);
    }
  // Both dtypes each way, unweighted, in place, and rows that are not aligned (the loop path).
  for (DType xd : {DType::kF32, DType::kBF16})
    for (DType yd : {DType::kF32, DType::kBF16})
      for (int rows : {1, 3, 300}) check_norm(be, rows, 4096, 4096, false, xd, yd, 0, false);
  for (DType xd : {DType::kF32, DType::kBF16}) {
    check_norm(be, 1, 4096, 4096, true, xd, xd, 0, true);
    check_norm(be, 17, 64 * 512, 512, false, xd, xd, 0, true);
    check_norm(be, 3, 4096, 4096, true, xd, DType::kF32, 1, false);  // misaligned rows
    check_norm(be, 2, 1024, 1024, true, xd, xd, 2, true);
    check_norm(be, 3, 4096, 4096, true, xd, xd, 4, true);  // aligned view, stride > cols
    check_norm(be, 17, 2048, 1024, true, xd, DType::kF32, 4, false);
  }
  check_norm(be, 4096, 4096, 4096, true, DType::kBF16, DType::kBF16, 0, false);  // prefill
}

// Greedy ids of `n` rows of `vocab` logits (a view of `vocab` columns of rows `width` wide,
// starting `offset` columns in) against the CPU backend, and the same ids run twice. `edit` poisons
// rows.
template <typename Edit>
void check_greedy(Backends& be, int n, int vocab, int width, int offset, uint64_t seed, Edit edit,
                  const char* what) {
  const int rows = n + 1;  // one row no spec reads
  auto lv = random_vec(int64_t{rows} * vocab, seed, 3.0f);
  edit(lv, rows, vocab);
  std::vector<float> full(static_cast<size_t>(rows) * width, 1e30f);  // padding must not count
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < vocab; ++c)
      full[static_cast<size_t>(r) * width + offset + c] = lv[r * vocab + c];
  Tensor lc = make_tensor(*be.cpu, lv, rows, vocab, DType::kF32);
  Tensor lg = make_tensor(*be.gpu, full, rows, width, DType::kF32).slice_cols(offset, vocab);
  std::vector<SampleSpec> specs(n);
  for (int i = 0; i < n; ++i) specs[i].row = (i * 7 + 1) % rows;  // out of order
  std::vector<int32_t> want(n), got(n, -1), again(n, -2);
  be.cpu->sample(lc, specs, want.data());
  be.gpu->sample(lg, specs, got.data());
  be.gpu->sample(lg, specs, again.data());
  EXPECT_EQ(got, want) << what << ": n " << n << " vocab " << vocab << " width " << width
                       << " offset " << offset;
  EXPECT_EQ(again, got) << what;
}

TEST(CudaElementwise, GreedySamplingSlicesTiesAndNaN) {
  SP_REQUIRE_GPU();
  Backends be;
  const float inf = std::numeric_limits<float>::infinity(),
              nan = std::numeric_limits<float>::quiet_NaN();
  auto plain = [](std::vector<float>&, int, int) {};
  // Ties within a slice, across slices (ids 5 and V - 3: first and last slices), at id 0 and at
  // the last id; +Inf twice; a NaN before, at and after the maximum; NaN at id 0 (the CPU keeps
  // id 0); a row of -Inf (id 0) and a row of NaN (id 0).
  auto poisoned = [&](std::vector<float>& v, int rows, int V) {
    auto at = [&](int r, int64_t i) -> float& {  // ids past a small vocab wrap around
      return v[static_cast<size_t>(r) * V + i % V];
    };
    auto row = [&](int r) { return r % rows; };
    at(row(0), 5) = at(row(0), V - 3) = 50.0f;
    at(row(1), 0) = at(row(1), V / 2) = 60.0f;
    at(row(2), V - 1) = 70.0f;
    at(row(3), 3000) = at(row(3), 2047) = inf;
    at(row(4), 1) = nan;
    at(row(4), V / 3) = 80.0f;
    at(row(4), V / 3 + 1) = nan;
    at(row(5), 0) = nan;
    at(row(5), V - 2) = 90.0f;
    for (int64_t i = 0; i < V; ++i) at(row(6), i) = -inf;
    for (int64_t i = 0; i < V; ++i) at(row(7), i) = nan;
    at(row(8), V - 1) = nan;
    at(row(8), V - 2) = at(row(8), V / 2 + 1) = 55.0f;
    at(row(9), 2048) = at(row(9), 2049) = 66.0f;  // the first two ids of the second slice
  };
  for (int V : {129280, 129281, 2048, 2049, 5}) {
    for (int n : {1, 2, 3, 17, 64}) {
      check_greedy(be, n, V, V, 0, V + n, plain, "random");
      check_greedy(be, n, V, V, 0, V + n + 1, poisoned, "ties/NaN");
    }
    // A view 4 columns in (the float4 path where V % 4 == 0) and one 1 column in (scalar path).
    check_greedy(be, 10, V, V + 4, 4, V + 3, poisoned, "aligned view");
    check_greedy(be, 10, V, V + 3, 1, V + 4, poisoned, "misaligned view");
    // Rows padded to a multiple of 4 from an aligned start: the float4 path, and for a vocab not
    // a multiple of 4 its last, partial vector (read value by value).
    check_greedy(be, 10, V, (V + 3) / 4 * 4 + 4, 0, V + 5, poisoned, "padded rows");
  }
  check_greedy(be, 256, 129280, 129280, 0, 9, poisoned, "256 rows");
  // Past the scratch's 256-row floor: the workspace slot grows (a backend reserved for 300
  // logit rows; the default harness limit is 256).
  BackendLimits lim = Backends::default_limits();
  lim.max_logit_rows = 300;
  Backends wide(lim);
  check_greedy(wide, 300, 129280, 129280, 0, 11, poisoned, "300 rows");
}

}  // namespace
}  // namespace sp::test
