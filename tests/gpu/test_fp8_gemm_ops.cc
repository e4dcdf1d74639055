// The --activation-quant fp8 path (gemm_lt.cu): the activation quantiser bit for bit against a
// CPU implementation of the reference's rule, and the cuBLASLt block-scaled FP8 GEMM against the
// CPU backend's linear on the dequantised activations, on V4-Flash shapes and awkward ones; shapes
// the path declines must give the exact kernels' bits.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstring>

#include "backend/cuda/gemm_lt.h"
#include "tests/gpu/op_harness.h"

namespace sp::test {
namespace {

// The reference's AQ8(x, 128) on the host: per (row, 128-column group) a = max(amax, 1e-4),
// s = 2^ceil(log2(fp32(a / 448))), q = e4m3_rne(x / s) saturated.
struct HostQuant {
  std::vector<uint8_t> q;  // [M, K]
  std::vector<float> s;    // [M, groups]
};

HostQuant host_quant(const std::vector<float>& x, int64_t M, int64_t K) {
  const int64_t G = (K + 127) / 128;
  HostQuant h;
  h.q.resize(static_cast<size_t>(M * K));
  h.s.resize(static_cast<size_t>(M * G));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      const int64_t k1 = std::min(K, (g + 1) * 128);
      float amax = 0.0f;
      for (int64_t k = g * 128; k < k1; ++k) amax = std::max(amax, std::fabs(x[m * K + k]));
      const float r = std::max(amax, 1e-4f) / 448.0f;
      uint32_t b;
      std::memcpy(&b, &r, 4);
      const int e = static_cast<int>((b >> 23) & 0xff) - 127 + ((b & 0x7fffff) != 0 ? 1 : 0);
      const float s = std::ldexp(1.0f, e), inv = std::ldexp(1.0f, -e);
      h.s[m * G + g] = s;
      for (int64_t k = g * 128; k < k1; ++k) h.q[m * K + k] = f32_to_e4m3(x[m * K + k] * inv);
    }
  return h;
}

// Activations with the awkward cases: a zero row (the amax floor), huge and tiny groups (e4m3
// subnormals after scaling), exact powers of two.
std::vector<float> awkward_x(int64_t M, int64_t K, uint64_t seed, bool bf16) {
  auto v = random_vec(M * K, seed, 1.0f);
  for (int64_t k = 0; k < K; ++k) {
    if (M > 1) v[1 * K + k] = 0.0f;
    if (M > 2) v[2 * K + k] *= 3e4f;
    if (M > 3) v[3 * K + k] *= 1e-6f;
    if (M > 4) v[4 * K + k] = std::ldexp(1.0f, static_cast<int>(k % 9) - 4);
  }
  return bf16 ? round_bf16(v) : v;
}

struct Gpu {
  std::unique_ptr<Backend> be;
  cudaStream_t s = nullptr;
  Gpu() {
    auto g = make_cuda_backend(0);
    EXPECT_TRUE(g.is_ok()) << g.status().message();
    if (g) be = std::move(*g);
    be->reserve(Backends::default_limits());
    EXPECT_EQ(cudaStreamCreate(&s), cudaSuccess);
  }
  ~Gpu() { cudaStreamDestroy(s); }
};

TEST(Fp8Quant, BitExactAgainstHostRule) {
  SP_REQUIRE_GPU();
  Gpu gpu;
  struct Case {
    int64_t M, K, pad;
    DType dt;
  };
  const Case cases[] = {{5, 4096, 0, DType::kF32},
                        {129, 1024, 0, DType::kBF16},
                        {7, 192, 0, DType::kF32},
                        {64, 320, 4, DType::kF32},
                        {33, 8192, 0, DType::kBF16},
                        {130, 256, 8, DType::kBF16},
                        // Rows not 16-byte aligned (scalar loads), K not a multiple of 8.
                        {9, 1024, 1, DType::kF32},
                        {6, 512, 2, DType::kBF16},
                        {4, 100, 0, DType::kF32}};
  for (const Case& c : cases) {
    const int64_t Mg = (c.M + 3) / 4 * 4, G = (c.K + 127) / 128;
    auto xv = awkward_x(c.M, c.K, 17 + c.M, c.dt == DType::kBF16);
    std::vector<float> wide(static_cast<size_t>(c.M * (c.K + c.pad)), 0.0f);
    for (int64_t m = 0; m < c.M; ++m)
      for (int64_t k = 0; k < c.K; ++k) wide[m * (c.K + c.pad) + k] = xv[m * c.K + k];
    Tensor x = make_tensor(*gpu.be, wide, c.M, c.K + c.pad, c.dt).slice_cols(0, c.K);
    uint8_t* q = nullptr;
    float* sc = nullptr;
    ASSERT_EQ(cudaMalloc(&q, Mg * c.K), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&sc, G * Mg * 4), cudaSuccess);
    cudaMemset(q, 0x55, Mg * c.K);
    cudaMemset(sc, 0xff, G * Mg * 4);
    cuda::quantize_act_fp8(gpu.s, x, Mg, q, sc);
    ASSERT_EQ(cudaStreamSynchronize(gpu.s), cudaSuccess);
    std::vector<uint8_t> gq(static_cast<size_t>(Mg * c.K));
    std::vector<float> gs(static_cast<size_t>(G * Mg));
    cudaMemcpy(gq.data(), q, gq.size(), cudaMemcpyDeviceToHost);
    cudaMemcpy(gs.data(), sc, gs.size() * 4, cudaMemcpyDeviceToHost);
    cudaFree(q);
    cudaFree(sc);
    const HostQuant h = host_quant(xv, c.M, c.K);
    int64_t bad_q = 0, bad_s = 0, bad_pad = 0;
    for (int64_t m = 0; m < Mg; ++m) {
      for (int64_t k = 0; k < c.K; ++k) {
        const uint8_t want = m < c.M ? h.q[m * c.K + k] : 0;
        if (gq[m * c.K + k] != want) (m < c.M ? bad_q : bad_pad) += 1;
      }
      for (int64_t g = 0; g < G; ++g) {
        const float want = m < c.M ? h.s[m * G + g] : 1.0f;
        if (gs[g * Mg + m] != want) (m < c.M ? bad_s : bad_pad) += 1;
      }
    }
    std::printf("  quant M=%-4lld K=%-5lld pad=%lld %s: %lld q, %lld scales, %lld padding differ\n",
                static_cast<long long>(c.M), static_cast<long long>(c.K),
                static_cast<long long>(c.pad), dtype_name(c.dt), static_cast<long long>(bad_q),
                static_cast<long long>(bad_s), static_cast<long long>(bad_pad));
    EXPECT_EQ(bad_q, 0) << "M=" << c.M << " K=" << c.K;
    EXPECT_EQ(bad_s, 0) << "M=" << c.M << " K=" << c.K;
    EXPECT_EQ(bad_pad, 0) << "M=" << c.M << " K=" << c.K;
  }
}

// An FP8 weight with E8M0 scales, or F32 scales that are not powers of two (Base checkpoints).
HostMatrix fp8_matrix(int64_t N, int64_t K, uint64_t seed, bool f32_scales) {
  HostMatrix h = random_matrix(WeightFormat::kFP8, N, K, seed);
  if (f32_scales) use_f32_scales(h, seed);
  h.m.data = h.data.data();
  h.m.scale = h.scale.data();
  return h;
}

struct GemmCase {
  int64_t M, N, K;
  DType x_dt, y_dt;
  bool f32_scales = false;
};

// Rows the CPU reference computes (all of a small M; the edges and a spread of a large one).
std::vector<int64_t> check_rows(int64_t M) {
  std::vector<int64_t> r;
  if (M <= 160) {
    for (int64_t m = 0; m < M; ++m) r.push_back(m);
    return r;
  }
  for (int64_t m = 0; m < 32; ++m) r.push_back(m);
  for (int64_t i = 0; i < 32; ++i) r.push_back(32 + (M - 64) * i / 32);
  for (int64_t m = M - 32; m < M; ++m) r.push_back(m);
  return r;
}

TEST(Fp8Gemm, CublasLtAgainstCpuOnQuantisedActivations) {
  SP_REQUIRE_GPU();
  Gpu gpu;
  auto cpu = make_cpu_backend(16, 1);
  cpu->reserve(Backends::default_limits());
  const DType f32 = DType::kF32, bf16 = DType::kBF16;
  const GemmCase cases[] = {
      // V4-Flash: wq_a, wq_b, wkv, wo_b, at M = 128, 129, 1000, 4096.
      {128, 1024, 4096, f32, f32},
      {129, 1024, 4096, bf16, bf16},
      {1000, 1024, 4096, f32, bf16},
      {4096, 1024, 4096, bf16, f32},
      {128, 32768, 1024, bf16, bf16},
      {129, 32768, 1024, f32, f32},
      {1000, 32768, 1024, bf16, f32},
      {4096, 32768, 1024, f32, bf16},
      {128, 512, 4096, bf16, f32},
      {129, 512, 4096, f32, bf16},
      {1000, 512, 4096, f32, f32},
      {4096, 512, 4096, bf16, bf16},
      {128, 4096, 8192, f32, bf16},
      {129, 4096, 8192, bf16, f32},
      {1000, 4096, 8192, bf16, bf16},
      {4096, 4096, 8192, f32, f32},
      // F32 block scales; the trained fixtures' small K (1 or 2 scale columns, 2 block rows);
      // a partial last group (K = 192); M not a multiple of 4 with f32 output.
      {256, 1024, 4096, bf16, bf16, true},
      {200, 256, 256, f32, f32},
      {131, 256, 128, bf16, bf16},
      {150, 256, 192, f32, f32},
      {140, 256, 320, bf16, f32},
      {133, 528, 4096, f32, f32, true},
  };
  for (const GemmCase& c : cases) {
    cuda::Workspace ws(gpu.s);
    cuda::LtGemm lt(0);
    ws.fp8_gemm = &lt;
    HostMatrix hm = fp8_matrix(c.N, c.K, 3 + c.N + c.K, c.f32_scales);
    Matrix mg = gpu.be->upload(hm.m);
    Matrix mc = cpu->upload(hm.m);
    auto xv = random_vec(c.M * c.K, 100 + c.M, 1.0f);
    if (c.x_dt == bf16) xv = round_bf16(xv);
    Tensor x = make_tensor(*gpu.be, xv, c.M, c.K, c.x_dt);
    Tensor y = gpu.be->alloc(c.M, c.N, c.y_dt);
    gpu.be->synchronize();
    // Poisoned with NaN (all-ones bytes are a NaN in f32 and bf16): an unwritten element fails.
    ASSERT_EQ(cudaMemset(y.data, 0xff, static_cast<size_t>(y.numel() * y.elem_size())),
              cudaSuccess);
    cuda::linear(gpu.s, ws, x, mg, y);
    ASSERT_EQ(cudaStreamSynchronize(gpu.s), cudaSuccess);
    const auto got = read_f32(*gpu.be, y);
    // Reference: the CPU linear on the dequantised activations of the checked rows.
    const auto rows = check_rows(c.M);
    const int64_t R = static_cast<int64_t>(rows.size());
    std::vector<float> xs(static_cast<size_t>(R * c.K)), gs(static_cast<size_t>(R * c.N));
    for (int64_t i = 0; i < R; ++i) {
      std::memcpy(&xs[i * c.K], &xv[rows[i] * c.K], c.K * 4);
      std::memcpy(&gs[i * c.N], &got[rows[i] * c.N], c.N * 4);
    }
    const HostQuant h = host_quant(xs, R, c.K);
    const int64_t G = (c.K + 127) / 128;
    std::vector<float> xd(xs.size());
    for (int64_t i = 0; i < R * c.K; ++i)
      xd[i] = e4m3_to_f32(h.q[i]) * h.s[(i / c.K) * G + (i % c.K) / 128];
    Tensor xc = make_tensor(*cpu, xd, R, c.K, f32);
    Tensor yc = cpu->alloc(R, c.N, f32);
    cpu->linear(xc, mc, yc);
    auto ref = read_f32(*cpu, yc);
    if (c.y_dt == bf16) ref = round_bf16(ref);
    int64_t unwritten = 0;
    for (float v : got) unwritten += std::isfinite(v) ? 0 : 1;
    const double err = rel_l2(gs, ref);
    std::printf("  lt M=%-5lld N=%-6lld K=%-5lld x=%s y=%s scales=%s  taken=%lld  rel_l2=%.3g\n",
                static_cast<long long>(c.M), static_cast<long long>(c.N),
                static_cast<long long>(c.K), dtype_name(c.x_dt), dtype_name(c.y_dt),
                c.f32_scales ? "f32" : "e8m0", static_cast<long long>(lt.taken()), err);
    EXPECT_EQ(lt.taken(), 1) << "M=" << c.M << " N=" << c.N << " K=" << c.K;
    EXPECT_EQ(unwritten, 0) << "M=" << c.M << " N=" << c.N << " K=" << c.K;
    EXPECT_LE(err, 1e-2) << "M=" << c.M << " N=" << c.N << " K=" << c.K;
  }
}

// Bits of y after one linear on `ws` (with or without the fp8 path).
std::vector<uint8_t> run_bits(Gpu& gpu, cuda::Workspace& ws, Tensor x, const Matrix& w, Tensor y) {
  cuda::linear(gpu.s, ws, x, w, y);
  EXPECT_EQ(cudaStreamSynchronize(gpu.s), cudaSuccess);
  std::vector<uint8_t> b(static_cast<size_t>(y.numel() * y.elem_size()));
  gpu.be->to_host(y, b.data());
  return b;
}

TEST(Fp8Gemm, DeclinedShapesKeepTheExactKernelsAndRunsRepeat) {
  SP_REQUIRE_GPU();
  Gpu gpu;
  cuda::Workspace ws_lt(gpu.s), ws_exact(gpu.s);
  cuda::LtGemm lt(0);
  ws_lt.fp8_gemm = &lt;
  struct Case {
    int64_t M, N, K;
    bool taken;
  };
  // Odd N (y rows not 16-byte aligned), K not a multiple of 16, M below the threshold: declined
  // or not attempted, so the exact kernels' bits. The last two take the path: twice the same bits.
  const Case cases[] = {{256, 1001, 1024, false},
                        {300, 512, 200, false},
                        {cuda::kLtMinRows - 1, 1024, 4096, false},
                        {1000, 1024, 4096, true},
                        {129, 32768, 1024, true}};
  for (const Case& c : cases) {
    HostMatrix hm = fp8_matrix(c.N, c.K, 7 + c.N, false);
    Matrix mg = gpu.be->upload(hm.m);
    Tensor x =
        make_tensor(*gpu.be, round_bf16(random_vec(c.M * c.K, 5 + c.M)), c.M, c.K, DType::kBF16);
    Tensor y = gpu.be->alloc(c.M, c.N, DType::kBF16);
    const int64_t before = lt.taken();
    const auto a = run_bits(gpu, ws_lt, x, mg, y);
    const bool taken = lt.taken() > before;
    const auto b = c.taken ? run_bits(gpu, ws_lt, x, mg, y) : run_bits(gpu, ws_exact, x, mg, y);
    std::printf("  M=%-5lld N=%-6lld K=%-5lld taken=%d declined=%lld identical=%d\n",
                static_cast<long long>(c.M), static_cast<long long>(c.N),
                static_cast<long long>(c.K), taken ? 1 : 0, static_cast<long long>(lt.declined()),
                a == b ? 1 : 0);
    EXPECT_EQ(taken, c.taken) << "M=" << c.M << " N=" << c.N << " K=" << c.K;
    EXPECT_TRUE(a == b) << "M=" << c.M << " N=" << c.N << " K=" << c.K;
  }
  EXPECT_EQ(lt.declined(), 2);
}

}  // namespace
}  // namespace sp::test
