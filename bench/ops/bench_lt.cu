// bench_lt: the --activation-quant fp8 projections (activation quantiser + cuBLASLt block-scaled
// FP8 GEMM) on V4-Flash shapes, against the exact kernels (bf16 activations, mma.sync) and against
// ceilings measured in the same run: cuBLASLt's per-tensor-scaled FP8 GEMM and its bf16 GEMM at
// 8192^3. Each case rotates among enough weight copies to exceed 4x the L2 cache.
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <vector>

#include "backend/cuda/gemm_lt.h"
#include "bench_util.cuh"

namespace sp::cuda {
namespace {

using namespace bench;

Matrix fp8_matrix(int64_t out, int64_t in, uint64_t seed) {
  return device_matrix(WeightFormat::kFP8, out, in, seed);
}

Tensor tensor(int64_t rows, int64_t cols, DType dt, uint64_t seed) {
  return device_tensor(rows, cols, dt, seed, dt == DType::kF32 ? 4 : 3);
}

// Median over 5 rounds of the mean time of `reps` back-to-back calls (queued without waiting, as a
// forward pass queues them), after 3 warm-up calls.
template <typename Fn>
float time_queued_ms(cudaStream_t s, int reps, Fn fn) {
  return time_batch_ms(s, 5, reps, fn, 3);
}

void lt_ok(cublasStatus_t st, const char* what) {
  if (st != CUBLAS_STATUS_SUCCESS) {
    std::fprintf(stderr, "%s: %s\n", what, cublasLtGetStatusName(st));
    std::exit(1);
  }
}

// TFLOP/s of cuBLASLt's plain GEMM at n^3 (TN, bf16 output): e4m3 inputs with per-tensor scales
// (the default scalar 1) or bf16 inputs.
double lt_peak(cudaStream_t s, int64_t n, bool fp8) {
  cublasLtHandle_t h;
  lt_ok(cublasLtCreate(&h), "create");
  const cudaDataType_t in = fp8 ? CUDA_R_8F_E4M3 : CUDA_R_16BF;
  const size_t esz = fp8 ? 1 : 2;
  void* A = dalloc(n * n * esz);
  void* B = dalloc(n * n * esz);
  void* D = dalloc(n * n * 2);
  fill(A, n * n * esz, 1, fp8 ? 1 : 3);
  fill(B, n * n * esz, 2, fp8 ? 1 : 3);
  void* ws = dalloc(kLtWorkspaceBytes);
  cublasLtMatmulDesc_t desc;
  lt_ok(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "desc");
  const int32_t tA = CUBLAS_OP_T, tB = CUBLAS_OP_N;
  cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &tA, sizeof(tA));
  cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &tB, sizeof(tB));
  cublasLtMatrixLayout_t la, lb, ld;
  cublasLtMatrixLayoutCreate(&la, in, n, n, n);
  cublasLtMatrixLayoutCreate(&lb, in, n, n, n);
  cublasLtMatrixLayoutCreate(&ld, CUDA_R_16BF, n, n, n);
  cublasLtMatmulPreference_t pref;
  cublasLtMatmulPreferenceCreate(&pref);
  const uint64_t wsb = kLtWorkspaceBytes;
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsb,
                                       sizeof(wsb));
  cublasLtMatmulHeuristicResult_t res{};
  int found = 0;
  lt_ok(cublasLtMatmulAlgoGetHeuristic(h, desc, la, lb, ld, ld, pref, 1, &res, &found), "heur");
  double tf = 0;
  if (found > 0) {
    const float alpha = 1, beta = 0;
    const float ms = time_queued_ms(s, 4, [&](int) {
      lt_ok(cublasLtMatmul(h, desc, &alpha, A, la, B, lb, &beta, D, ld, D, ld, &res.algo, ws,
                           kLtWorkspaceBytes, s),
            "matmul");
    });
    tf = 2.0 * n * n * n / (ms * 1e-3) / 1e12;
  }
  cublasLtMatmulPreferenceDestroy(pref);
  cublasLtMatrixLayoutDestroy(la);
  cublasLtMatrixLayoutDestroy(lb);
  cublasLtMatrixLayoutDestroy(ld);
  cublasLtMatmulDescDestroy(desc);
  cublasLtDestroy(h);
  cudaFree(A);
  cudaFree(B);
  cudaFree(D);
  cudaFree(ws);
  return tf;
}

struct Shape {
  const char* name;
  int64_t N, K;
};

}  // namespace
}  // namespace sp::cuda

int main(int argc, char** argv) {
  using namespace sp;
  using namespace sp::cuda;
  cudaDeviceProp prop{};
  SP_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount,
              prop.l2CacheSize >> 20);
  cudaStream_t s;
  SP_CUDA(cudaStreamCreate(&s));
  const double fp8_peak = lt_peak(s, 8192, true), bf16_peak = lt_peak(s, 8192, false);
  std::printf(
      "ceilings (cuBLASLt 8192^3, bf16 out): fp8 per-tensor %.0f TFLOP/s, bf16 %.0f "
      "TFLOP/s\n\n",
      fp8_peak, bf16_peak);
  const Shape shapes[] = {{"wq_a", 1024, 4096},
                          {"wq_b", 32768, 1024},
                          {"wkv", 512, 4096},
                          {"wo_b", 4096, 8192},
                          {"idx_wq_b", 8192, 1024}};
  std::vector<int64_t> Ms = {32, 64, 128, 256, 512, 4096, 16384};
  if (argc > 1) Ms = {std::atoll(argv[1])};
  std::printf(
      "TFLOP/s; 'exact': bf16 x through the existing kernels; 'fp8': quantiser + cuBLASLt (x bf16 "
      "or f32, y bf16); 'gemm': fp8 minus the quantiser; %% of the fp8 ceiling\n");
  std::printf("%-9s %6s %6s %5s | %8s %6s | %8s %6s %5s | %8s %6s | %7s %7s | %6s %5s\n", "shape",
              "M", "N", "K", "exact us", "TF", "fp8 us", "TF", "%pk", "fp8f32us", "TF", "q bf16",
              "q f32", "gemmTF", "%pk");
  {
    Workspace ws(s);
    LtGemm lt(0);
    Workspace ws_lt(s);
    for (const Shape& sh : shapes) {
      Matrix probe = fp8_matrix(sh.N, sh.K, 1);
      const int64_t bytes = probe.nbytes();
      const int copies =
          static_cast<int>(std::max<int64_t>(1, (4 * prop.l2CacheSize + bytes - 1) / bytes + 1));
      std::vector<Matrix> wm{probe};
      for (int c = 1; c < copies; ++c) wm.push_back(fp8_matrix(sh.N, sh.K, 1 + c));
      for (Matrix& m : wm) lt.prepare(s, m);
      for (int64_t M : Ms) {
        Tensor xb = tensor(M, sh.K, DType::kBF16, 7), xf = tensor(M, sh.K, DType::kF32, 9);
        Tensor y = tensor(M, sh.N, DType::kBF16, 8);
        const double flop = 2.0 * M * sh.N * sh.K;
        const int reps = flop > 2e12 ? 2 : flop > 1e11 ? 5 : 20;
        const float t_exact =
            time_queued_ms(s, reps, [&](int i) { linear(s, ws, xb, wm[i % copies], y); });
        // The fp8 path at any M (min_rows 1: below kLtMinRows too, to place the threshold).
        bool took = true;
        const float t_lt = time_queued_ms(
            s, reps, [&](int i) { took = lt.run(s, ws_lt, xb, wm[i % copies], y, 1) && took; });
        const float t_ltf = time_queued_ms(
            s, reps, [&](int i) { took = lt.run(s, ws_lt, xf, wm[i % copies], y, 1) && took; });
        const int64_t Mg = (M + 3) / 4 * 4, G = (sh.K + 127) / 128;
        uint8_t* q = static_cast<uint8_t*>(dalloc(Mg * sh.K));
        float* sc = static_cast<float*>(dalloc(G * Mg * 4));
        const float t_qb = time_queued_ms(s, 10, [&](int) { quantize_act_fp8(s, xb, Mg, q, sc); });
        const float t_qf = time_queued_ms(s, 10, [&](int) { quantize_act_fp8(s, xf, Mg, q, sc); });
        cudaFree(q);
        cudaFree(sc);
        auto tf = [&](float ms) { return flop / (ms * 1e-3) / 1e12; };
        std::printf(
            "%-9s %6lld %6lld %5lld | %8.1f %6.0f | %8.1f %6.0f %4.0f%% | %8.1f %6.0f | %7.1f "
            "%7.1f | %6.0f %4.0f%%%s\n",
            sh.name, static_cast<long long>(M), static_cast<long long>(sh.N),
            static_cast<long long>(sh.K), t_exact * 1e3, tf(t_exact), t_lt * 1e3, tf(t_lt),
            100 * tf(t_lt) / fp8_peak, t_ltf * 1e3, tf(t_ltf), t_qb * 1e3, t_qf * 1e3,
            tf(t_lt - t_qb), 100 * tf(t_lt - t_qb) / fp8_peak,
            took ? "" : "  (fp8 path declined: exact kernels)");
        cudaFree(xb.data);
        cudaFree(xf.data);
        cudaFree(y.data);
      }
      for (Matrix& m : wm) {
        cudaFree(const_cast<uint8_t*>(m.data));
        cudaFree(const_cast<uint8_t*>(m.scale));
      }
    }
  }
  SP_CUDA(cudaStreamDestroy(s));
  return 0;
}
