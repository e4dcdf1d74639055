// --load-format dummy on the device: a described matrix's bytes computed where they live, so a
// stage needs neither host memory nor host time for its weights. The arithmetic is the host
// generator's (core/dummy.h) step for step: splitmix64 in 64-bit integers; the uniform value
// 24 hash bits * 2^-23 - 1 (exact in fp32); one rounded fp32 product (__fmul_rn: never contracted
// into an FMA); round-to-nearest-even to bf16 as f32_to_bf16 does; e4m3 from the host's own
// 65,536-entry table. The bytes therefore equal the host's, which tests/gpu checks byte for byte.
#include <cuda_runtime.h>

#include <cstdint>

#include "backend/cuda/kernels.h"
#include "core/dummy.h"

namespace sp::cuda {

namespace {

__device__ __forceinline__ uint64_t splitmix_dev(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// mul * uniform(key, i), rounded once.
__device__ __forceinline__ float scaled_uniform(uint64_t key, int64_t i, float mul) {
  const uint32_t bits = static_cast<uint32_t>(splitmix_dev(key + static_cast<uint64_t>(i)) >> 40);
  // bits < 2^24: the conversion is exact; so are the product by 2^-23 and the subtraction.
  const float u = __fsub_rn(__fmul_rn(__uint2float_rn(bits), 2.0f / 16777216.0f), 1.0f);
  return __fmul_rn(mul, u);
}

// f32_to_bf16 of core/dtype.cc (round to nearest even; NaN kept quiet), bit for bit.
__device__ __forceinline__ uint16_t bf16_bits(float f) {
  uint32_t bits = __float_as_uint(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// One unit per thread, grid-stride (the unit count of a vocab-sized matrix exceeds 2^31).
__global__ void dummy_bf16_kernel(uint64_t key, float mul, int64_t units, uint16_t* out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < units;
       i += stride)
    out[i] = bf16_bits(scaled_uniform(key, i, mul));
}

__global__ void dummy_fp8_kernel(uint64_t key, float mul, int64_t units, const uint8_t* table,
                                 uint8_t* out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < units;
       i += stride)
    out[i] = __ldg(table + bf16_bits(scaled_uniform(key, i, mul)));
}

__global__ void dummy_fp4_kernel(uint64_t key, int64_t units, uint8_t* out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < units;
       i += stride)
    out[i] = static_cast<uint8_t>(splitmix_dev(key + static_cast<uint64_t>(i)) >> 56);
}

}  // namespace

void dummy_values(cudaStream_t s, const Matrix& m, uint8_t* values, const uint8_t* e4m3_table) {
  SP_CHECK(m.dummy.on, m.name, ": not a described dummy matrix");
  SP_CHECK(m.format != WeightFormat::kFloat || m.dtype == DType::kBF16, m.name,
           ": a described float matrix is BF16, got ", dtype_name(m.dtype));
  const int64_t units = dummy_value_units(m);
  if (units == 0) return;
  constexpr int kThreads = 256;
  // Enough blocks to fill the GPU several times over; each thread strides over the rest.
  const int64_t want = (units + kThreads - 1) / kThreads;
  const int blocks =
      static_cast<int>(want < int64_t{num_sms()} * 32 ? want : int64_t{num_sms()} * 32);
  switch (m.format) {
    case WeightFormat::kFloat:
      dummy_bf16_kernel<<<blocks, kThreads, 0, s>>>(m.dummy.key, m.dummy.mul, units,
                                                    reinterpret_cast<uint16_t*>(values));
      break;
    case WeightFormat::kFP8:
      SP_CHECK(e4m3_table != nullptr, m.name, ": the e4m3 table is not on the device");
      dummy_fp8_kernel<<<blocks, kThreads, 0, s>>>(m.dummy.key, m.dummy.mul, units, e4m3_table,
                                                   values);
      break;
    case WeightFormat::kFP4:
      dummy_fp4_kernel<<<blocks, kThreads, 0, s>>>(m.dummy.key, units, values);
      break;
  }
  SP_CUDA_LAUNCH();
}

}  // namespace sp::cuda
