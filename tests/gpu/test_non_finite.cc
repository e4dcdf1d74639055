// The forward pass's non-finite check on the GPU (Backend::note_non_finite): the flag kernel
// against the CPU backend's scan, the first place winning, the reset per step, and the flag read
// through each of the copies that bring it back.
#include <cfloat>
#include <limits>

#include "tests/gpu/op_harness.h"

namespace sp::test {
namespace {

constexpr int kClean = Backend::kAllFinite;

// A poisoned value at (row, col), or none (row < 0).
struct Poison {
  int64_t row = -1, col = 0;
  float value = 0;
};

// One check of `v` [rows, cols] (as a view of `cols` columns of a [rows, stride] tensor whose
// other columns hold +Inf, which must not count) tagged `where`, on a fresh step.
int check_once(Backend& be, const std::vector<float>& v, int64_t rows, int64_t cols, int64_t stride,
               int where) {
  std::vector<float> full(static_cast<size_t>(rows * stride), INFINITY);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) full[r * stride + c] = v[r * cols + c];
  Tensor t = make_tensor(be, full, rows, stride, DType::kF32);
  t.cols = cols;
  BatchView b;
  be.begin_step(b);
  be.note_non_finite(t, where);
  return be.non_finite_where();
}

TEST(NonFinite, FlagKernelMatchesCpuScan) {
  SP_REQUIRE_GPU();
  Backends be;
  const float qnan = std::numeric_limits<float>::quiet_NaN();
  struct Shape {
    int64_t rows, cols, stride;
  };
  // Vector and scalar paths, one row and more rows than the kernel's row groups (1,024), a strided
  // view, the width of V4-Flash's residual (hc_mult 4 x hidden 4096) at T = 1, 2, 3, 17, 64 and
  // 300 (4 column tiles of 4,096 values a row), its logits (129,280: 32 tiles), an odd vocab
  // (scalar path: 127 tiles of 1,024 values, the last one partial), 4,097 columns (scalar path, a
  // last tile of one value) and 4,100 (vector path, a last tile of one vector).
  const Shape shapes[] = {{1, 4, 4},           {3, 7, 7},           {2, 9, 12},
                          {5, 16384, 16384},   {2048, 64, 64},      {1500, 1028, 1028},
                          {4, 100, 104},       {1, 16384, 16384},   {2, 16384, 16384},
                          {3, 16384, 16388},   {17, 16384, 16384},  {64, 16384, 16384},
                          {300, 16384, 16384}, {1, 129280, 129280}, {3, 129280, 129280},
                          {2, 129281, 129281}, {3, 4097, 4097},     {2, 4100, 4100}};
  const float bad[] = {INFINITY, -INFINITY, qnan, -qnan};
  int cases = 0;
  for (const Shape& s : shapes) {
    auto v = random_vec(s.rows * s.cols, static_cast<uint64_t>(s.rows * 31 + s.cols));
    // Large finite values, subnormals and signed zeros are finite.
    v[0] = FLT_MAX;
    if (v.size() > 1) v[1] = -FLT_MAX;
    if (v.size() > 2) v[2] = FLT_MIN / 4;
    if (v.size() > 3) v[3] = -0.0f;
    std::vector<Poison> poisons = {{}};
    for (float x : bad) {
      poisons.push_back({0, 0, x});
      poisons.push_back({s.rows - 1, s.cols - 1, x});
      poisons.push_back({s.rows / 2, (s.cols * 5) / 7, x});
    }
    for (const Poison& p : poisons) {
      auto w = v;
      if (p.row >= 0) w[p.row * s.cols + p.col] = p.value;
      const int where = 3;
      const int cpu = check_once(*be.cpu, w, s.rows, s.cols, s.stride, where);
      const int gpu = check_once(*be.gpu, w, s.rows, s.cols, s.stride, where);
      EXPECT_EQ(cpu, p.row >= 0 ? where : kClean);  // the oracle itself
      EXPECT_EQ(gpu, cpu) << s.rows << "x" << s.cols << " (stride " << s.stride << ") poison at "
                          << p.row << "," << p.col << " = " << p.value;
      ++cases;
    }
  }
  EXPECT_EQ(cases, 18 * 13);
}

// The first place of a step wins, whatever follows; begin_step starts clean; the tags map back.
TEST(NonFinite, FirstPlaceOfTheStepAndResetPerStep) {
  SP_REQUIRE_GPU();
  Backends be;
  const int64_t R = 6, C = 256;
  auto clean = random_vec(R * C, 7);
  auto bad = clean;
  bad[R * C / 2] = INFINITY;
  Tensor tc = make_tensor(*be.gpu, clean, R, C, DType::kF32);
  Tensor tb = make_tensor(*be.gpu, bad, R, C, DType::kF32);
  BatchView b;
  struct Step {
    std::vector<std::pair<bool, int>> notes;  // (poisoned, where) in order
    int want;
  };
  const int E = Backend::kNonFiniteEmbedding, H = Backend::kNonFiniteHead;
  const Step steps[] = {
      {{{false, E}, {false, 0}, {true, 1}, {true, 2}, {true, H}}, 1},
      {{{false, E}, {false, 0}, {false, 1}, {false, H}}, kClean},  // reset by begin_step
      {{{true, E}, {true, 0}, {true, H}}, E},
      {{{false, 40}, {false, 41}, {true, H}}, H},
      {{{false, 0}, {true, 60}, {true, 61}}, 60},  // a later stage's layers
      {{}, kClean},
  };
  for (const Step& st : steps) {
    be.gpu->begin_step(b);
    be.cpu->begin_step(b);
    for (auto [poisoned, where] : st.notes) {
      be.gpu->note_non_finite(poisoned ? tb : tc, where);
      auto h = poisoned ? bad : clean;
      be.cpu->note_non_finite(Tensor::of(h.data(), R, C), where);
    }
    EXPECT_EQ(be.gpu->non_finite_where(), st.want);
    EXPECT_EQ(be.cpu->non_finite_where(), st.want);
    EXPECT_EQ(be.gpu->non_finite_where(), st.want);  // asking again changes nothing
  }
}

// The flag arrives with the copies a step makes anyway: the sampled ids (packed in front of them)
// and a to_host of the boundary tensor; the ids themselves are unchanged by the packing.
TEST(NonFinite, ReadWithTheSampledIdsAndTheBoundaryCopy) {
  SP_REQUIRE_GPU();
  Backends be;
  const int64_t R = 4, V = 1000;
  auto logits = random_vec(R * V, 11);
  Tensor lg = make_tensor(*be.gpu, logits, R, V, DType::kF32);
  Tensor lc = make_tensor(*be.cpu, logits, R, V, DType::kF32);
  auto bad = random_vec(R * 64, 12);
  bad[5] = -INFINITY;
  Tensor tb = make_tensor(*be.gpu, bad, R, 64, DType::kF32);
  std::vector<SampleSpec> specs(R);
  for (int i = 0; i < R; ++i) specs[i].row = i;
  std::vector<int32_t> want(R), got(R, -1);
  be.cpu->sample(lc, specs, want.data());
  BatchView b;
  for (int path = 0; path < 3; ++path) {
    for (bool poisoned : {false, true}) {
      be.gpu->begin_step(b);
      be.gpu->note_non_finite(poisoned ? tb : lg, 7);
      be.gpu->note_non_finite(lg, Backend::kNonFiniteHead);
      if (path == 0) {
        be.gpu->sample(lg, specs, got.data());
        EXPECT_EQ(got, want);
      } else if (path == 1) {
        std::vector<float> host(static_cast<size_t>(R * 64));
        be.gpu->to_host(tb, host.data());
      } else {
        be.gpu->synchronize();
      }
      EXPECT_EQ(be.gpu->non_finite_where(), poisoned ? 7 : kClean) << "path " << path;
    }
  }
}

}  // namespace
}  // namespace sp::test
