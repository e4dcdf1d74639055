// Helpers shared by the attention-side kernels (attention.cu, compress.cu, indexer.cu).
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "backend/cuda/kernels.h"

namespace sp::cuda::attn {

// Storage of a float tensor as the kernels see it: f32 or bf16 (checked on the host).
__device__ __forceinline__ float load_f(const void* base, int64_t i, bool bf16) {
  if (bf16) return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
  return static_cast<const float*>(base)[i];
}

__device__ __forceinline__ void store_f(void* base, int64_t i, float v, bool bf16) {
  if (bf16)
    static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(v);
  else
    static_cast<float*>(base)[i] = v;
}

// Element pointer of row r of a tensor (bytes).
__device__ __forceinline__ const void* row_ptr(const void* base, int64_t r, int64_t stride,
                                               bool bf16) {
  return static_cast<const uint8_t*>(base) + r * stride * (bf16 ? 2 : 4);
}

inline bool is_bf16(const Tensor& t) {
  return t.dtype == DType::kBF16;
}

inline void check_float(const Tensor& t, const char* what) {
  SP_CHECK(t.dtype == DType::kF32 || t.dtype == DType::kBF16, what, ": dtype must be f32 or bf16");
  SP_CHECK(t.device == Device::kCuda || t.data == nullptr, what, ": not device memory");
}

// Order-preserving map of a float to uint32 (larger float -> larger key); -0 is folded onto +0.
__device__ __forceinline__ uint32_t order_key(float f) {
  uint32_t u = __float_as_uint(f + 0.0f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

}  // namespace sp::cuda::attn
