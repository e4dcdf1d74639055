// FP8 projections through cuBLASLt's block-scaled FP8 GEMM (--activation-quant fp8): the
// reference's dynamic activation quantisation (1x128 groups, power-of-two ue8m0 scales, amax floor
// 1e-4) followed by an e4m3 x e4m3 GEMM with the activations' per-(row, 128-column group) scales
// (CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F) and the weights' 128x128 block scales
// (CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F), fp32 accumulation.
//
// cuBLASLt is column-major: y [M, N] row-major is D [N, M] column-major, computed as
// D = op(A) B with A = W (e4m3 [N, K] row-major = K x N column-major, op T) and B = q (the
// quantised x, [Mg, K] row-major = K x Mg column-major). Scale layouts:
// - weights: fp32 [ceil(N/128), ceil(K/128)] row-major with the row stride rounded up to a multiple
//   of 4 (what cuBLASLt reads; a compact stride gives wrong results when ceil(K/128) % 4 != 0),
//   the E8M0 scales decoded once per weight into a cached buffer (F32 scales copied the same way);
// - activations: fp32 [ceil(K/128), Mg] row-major (the row index is contiguous), Mg = M rounded up
//   to a multiple of 4 (16-byte aligned columns); when Mg > M the GEMM runs on Mg rows (the
//   quantiser zero-fills the padding) into a scratch output and the M rows are copied to y.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <string>
#include <tuple>
#include <unordered_map>

#include "backend/cuda/kernels.h"

namespace sp::cuda {

// The smallest M that takes the cuBLASLt path (smaller M keep the existing kernels, which are
// faster there; measured with bench_lt).
constexpr int64_t kLtMinRows = 128;
// cuBLASLt's workspace (split-K partials and the like), one fixed Workspace slot.
constexpr size_t kLtWorkspaceBytes = size_t{32} << 20;

// x [M, K] f32 or bf16 (row stride x.stride) -> q e4m3 [Mg, K] (row-major, ld K) and scales fp32
// [ceil(K/128), Mg] (scales[g * Mg + m]): per (row, 128-column group) a = max(amax |x|, 1e-4),
// s = 2^ceil(log2(a / 448)) (a / 448 rounded to fp32 first, as the reference), q = e4m3_rne(x / s)
// saturated to +-448. Rows M..Mg-1 are written as zeros with scale 1.
void quantize_act_fp8(cudaStream_t s, Tensor x, int64_t Mg, uint8_t* q, float* scales);

// Empty when cuBLASLt could be opened (it is opened at run time), else why not.
std::string lt_unavailable();

class LtGemm {
 public:
  explicit LtGemm(int device);
  ~LtGemm();
  LtGemm(const LtGemm&) = delete;
  LtGemm& operator=(const LtGemm&) = delete;

  // The fp32 block scales of an FP8 weight, made once (keyed by the weight's scale pointer: device
  // weights live as long as the backend). Called at upload; run() makes them on first use too.
  const float* prepare(cudaStream_t s, const Matrix& w);
  // y = AQ8(x) W^T when W is FP8, M >= min_rows and the shape is one this path takes (K and N
  // multiples of 16, 16-byte aligned y rows, an algorithm cuBLASLt accepts); otherwise returns
  // false having enqueued nothing (the caller runs its own kernels).
  bool run(cudaStream_t s, Workspace& ws, Tensor x, const Matrix& w, Tensor y,
           int64_t min_rows = kLtMinRows);
  // Projections that took the path / that were FP8 with M >= min_rows but declined (shape).
  int64_t taken() const { return taken_; }
  int64_t declined() const { return declined_; }

 private:
  struct Plan {
    cublasLtMatmulDescOpaque_t desc;
    cublasLtMatmulAlgo_t algo;
    cudaDataType_t d_type = CUDA_R_32F;
    bool ok = false;
  };
  // (M bucket, N, K, y is bf16)
  using Key = std::tuple<int64_t, int64_t, int64_t, int>;
  Plan& plan(int64_t bucket, int64_t N, int64_t K, bool y_bf16);
  // (Mg, N, K, ldd, D type): whether the bucket's algorithm takes this exact shape.
  using CheckKey = std::tuple<int64_t, int64_t, int64_t, int64_t, int>;
  std::map<CheckKey, bool> checked_;

  cublasLtHandle_t handle_ = nullptr;
  std::map<Key, Plan> plans_;
  std::unordered_map<const void*, float*> wscale_;
  float* dummy_scales_ = nullptr;  // [64] zeros: the scale pointers the heuristic sees
  int64_t taken_ = 0, declined_ = 0;
};

}  // namespace sp::cuda
