// Weight decode and the weight-streaming GEMV core shared by the projections (gemm.cu) and the
// experts (moe.cu). Device code only; included by .cu files.
//
// Weights are read in 16-byte chunks along K: 4 f32, 8 bf16/f16, 16 e4m3 or 32 e2m1 values. A chunk
// never straddles a scale block (FP8 blocks are 128 wide, FP4 groups 32), so each chunk has one
// scale. Decoding is exact (every value of every format, times its power-of-two or f32 scale, is
// what Matrix::decode_row computes); arithmetic is fp32 FMA.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "backend/cuda/kernels.h"
#include "backend/cuda/weight_bits.h"

namespace sp::cuda {

enum WFmt : int32_t { kWF32 = 0, kWBF16 = 1, kWF16 = 2, kWFP8 = 3, kWFP4 = 4 };

// A Matrix as the kernels see it (trivially copyable: kernel parameters and device tables).
struct DevMat {
  const uint8_t* data = nullptr;   // [out, row_bytes]
  const uint8_t* scale = nullptr;  // FP8: [ceil(out/128), scale_cols]; FP4: [out, scale_cols]
  int64_t out = 0, in = 0, scale_cols = 0;
  int64_t row_bytes = 0;  // bytes of one stored row
  int32_t fmt = kWF32;
  int32_t scale_f32 = 0;  // 1: F32 scales, 0: E8M0
  int32_t vec = 0;        // 1: every row starts 16-byte aligned (vector loads allowed)
  int32_t pad_ = 0;
};

inline DevMat dev_mat(const Matrix& w) {
  DevMat d;
  d.data = w.data;
  d.scale = w.scale;
  d.out = w.out;
  d.in = w.in;
  d.scale_cols = w.scale_cols;
  switch (w.format) {
    case WeightFormat::kFloat:
      d.fmt = w.dtype == DType::kF32 ? kWF32 : w.dtype == DType::kBF16 ? kWBF16 : kWF16;
      SP_CHECK(dtype_is_float(w.dtype), w.name, ": float matrix of dtype ", dtype_name(w.dtype));
      d.row_bytes = w.in * dtype_size(w.dtype);
      break;
    case WeightFormat::kFP8:
      d.fmt = kWFP8;
      d.row_bytes = w.in;
      break;
    case WeightFormat::kFP4:
      SP_CHECK(w.in % 32 == 0, w.name, ": FP4 needs in % 32 == 0, got ", w.in);
      d.fmt = kWFP4;
      d.row_bytes = w.in / 2;
      break;
  }
  d.scale_f32 = w.scale_dtype == DType::kF32 ? 1 : 0;
  d.vec = (reinterpret_cast<uintptr_t>(w.data) % 16 == 0 && d.row_bytes % 16 == 0) ? 1 : 0;
  return d;
}

template <int F>
struct FmtTraits;
template <>
struct FmtTraits<kWF32> {
  static constexpr int kVals = 4;
};
template <>
struct FmtTraits<kWBF16> {
  static constexpr int kVals = 8;
};
template <>
struct FmtTraits<kWF16> {
  static constexpr int kVals = 8;
};
template <>
struct FmtTraits<kWFP8> {
  static constexpr int kVals = 16;
};
template <>
struct FmtTraits<kWFP4> {
  static constexpr int kVals = 32;
};

__device__ __forceinline__ float e8m0_dev(uint8_t v) {
  const uint32_t bits = v == 0 ? 0x00400000u : v == 255 ? 0x7fc00000u : uint32_t(v) << 23;
  return __uint_as_float(bits);
}

// Streaming 16-byte load that skips L1 (weights are read once per call).
__device__ __forceinline__ uint4 ld_stream16(const uint8_t* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

// Bytes [b0, b0 + 16) of a row of row_bytes bytes; bytes past the end read as zero (zero decodes to
// zero in every format).
__device__ __forceinline__ uint4 ld_chunk(const uint8_t* row, int64_t b0, int64_t row_bytes,
                                          bool vec) {
  if (vec && b0 + 16 <= row_bytes) return ld_stream16(row + b0);
  uint32_t w[4] = {0, 0, 0, 0};
#pragma unroll
  for (int i = 0; i < 16; ++i)
    if (b0 + i < row_bytes) w[i / 4] |= uint32_t(row[b0 + i]) << (8 * (i % 4));
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// The scale of the chunk holding values [k, k + kVals) of row n (1 for float formats). FP4 folds in
// the 2^14 of the f16 decode trick (see decode4).
template <int F>
__device__ __forceinline__ float chunk_scale(const DevMat& w, int64_t n, int64_t k) {
  if constexpr (F == kWFP8 || F == kWFP4) {
    const int64_t si = F == kWFP8 ? (n / 128) * w.scale_cols + k / 128 : n * w.scale_cols + k / 32;
    float s;
    if (w.scale_f32)
      s = __ldg(reinterpret_cast<const float*>(w.scale) + si);
    else
      s = e8m0_dev(__ldg(w.scale + si));
    return F == kWFP4 ? s * 16384.0f : s;
  } else {
    return 1.0f;
  }
}

__device__ __forceinline__ uint32_t word_of(const uint4& c, int i) {
  return i == 0 ? c.x : i == 1 ? c.y : i == 2 ? c.z : c.w;
}

// Values [4p, 4p + 4) of a chunk, times its scale. p must be a compile-time constant after
// unrolling.
template <int F>
__device__ __forceinline__ void decode4(const uint4& c, int p, float s, float (&v)[4]) {
  if constexpr (F == kWF32) {
    v[0] = __uint_as_float(c.x);
    v[1] = __uint_as_float(c.y);
    v[2] = __uint_as_float(c.z);
    v[3] = __uint_as_float(c.w);
  } else if constexpr (F == kWBF16) {
    const uint32_t a = word_of(c, 2 * p), b = word_of(c, 2 * p + 1);
    v[0] = __uint_as_float(a << 16);
    v[1] = __uint_as_float(a & 0xffff0000u);
    v[2] = __uint_as_float(b << 16);
    v[3] = __uint_as_float(b & 0xffff0000u);
  } else if constexpr (F == kWF16) {
    const uint32_t a = word_of(c, 2 * p), b = word_of(c, 2 * p + 1);
    const float2 fa = __half22float2(*reinterpret_cast<const __half2*>(&a));
    const float2 fb = __half22float2(*reinterpret_cast<const __half2*>(&b));
    v[0] = fa.x;
    v[1] = fa.y;
    v[2] = fb.x;
    v[3] = fb.y;
  } else if constexpr (F == kWFP8) {
    // e4m3 -> f16 is exact; the scale multiply is the one rounding, as on the CPU.
    const uint32_t a = word_of(c, p);
    const __half2_raw lo = __nv_cvt_fp8x2_to_halfraw2(a & 0xffff, __NV_E4M3);
    const __half2_raw hi = __nv_cvt_fp8x2_to_halfraw2(a >> 16, __NV_E4M3);
    const float2 fl = __half22float2(*reinterpret_cast<const __half2*>(&lo));
    const float2 fh = __half22float2(*reinterpret_cast<const __half2*>(&hi));
    v[0] = fl.x * s;
    v[1] = fl.y * s;
    v[2] = fh.x * s;
    v[3] = fh.y * s;
  } else {
    // e2m1 nibble (s e e m) placed at f16 bits 15 and 11..9 is an f16 equal to the e2m1 value
    // times 2^-14 (normals and the 0.5 subnormal alike); the scale carries the 2^14 back.
    const uint32_t q = (word_of(c, p / 2) >> (16 * (p % 2))) & 0xffff;
    const uint32_t h01 =
        ((q & 0x7u) << 9) | ((q & 0x8u) << 12) | ((q & 0x70u) << 21) | ((q & 0x80u) << 24);
    const uint32_t q2 = q >> 8;
    const uint32_t h23 =
        ((q2 & 0x7u) << 9) | ((q2 & 0x8u) << 12) | ((q2 & 0x70u) << 21) | ((q2 & 0x80u) << 24);
    const float2 f01 = __half22float2(*reinterpret_cast<const __half2*>(&h01));
    const float2 f23 = __half22float2(*reinterpret_cast<const __half2*>(&h23));
    v[0] = f01.x * s;
    v[1] = f01.y * s;
    v[2] = f23.x * s;
    v[3] = f23.y * s;
  }
}

// An f16 pair given as bits (low half first) in fp32: exact, subnormals included.
__device__ __forceinline__ float2 f16x2_bits_to_float2(uint32_t h) {
  return __half22float2(*reinterpret_cast<const __half2*>(&h));
}

// The 4 e4m3 values of one word (byte i = value i) in fp32, times 2^-8 and without the scale:
// integer ops to f16 (weight_bits.h), then f16 -> f32. NaN codes read as +-1.875 (check the chunk
// with e4m3x16_has_nan).
__device__ __forceinline__ void decode4_e4m3_raw(uint32_t word, float (&v)[4]) {
  uint32_t lo, hi;
  e4m3x4_to_f16x2_bits(word, lo, hi);
  const float2 a = f16x2_bits_to_float2(lo), b = f16x2_bits_to_float2(hi);
  v[0] = a.x;
  v[1] = a.y;
  v[2] = b.x;
  v[3] = b.y;
}

__device__ __forceinline__ bool chunk_has_e4m3_nan(const uint4& c) {
  return e4m3x16_has_nan(c.x, c.y, c.z, c.w);
}

__device__ __forceinline__ float to_float(float v) {
  return v;
}
__device__ __forceinline__ float to_float(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

// x[k, k + 4) of one activation row of K values (zeros past K). vec: the row is aligned for a
// 4-element vector load.
__device__ __forceinline__ void load_x4(const float* xr, int64_t k, int64_t K, bool vec,
                                        float (&v)[4]) {
  if (vec && k + 4 <= K) {
    const float4 f = __ldg(reinterpret_cast<const float4*>(xr + k));
    v[0] = f.x;
    v[1] = f.y;
    v[2] = f.z;
    v[3] = f.w;
    return;
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) v[i] = k + i < K ? __ldg(xr + k + i) : 0.0f;
}
__device__ __forceinline__ void load_x4(const __nv_bfloat16* xr, int64_t k, int64_t K, bool vec,
                                        float (&v)[4]) {
  if (vec && k + 4 <= K) {
    const uint2 u = __ldg(reinterpret_cast<const uint2*>(xr + k));
    v[0] = __uint_as_float(u.x << 16);
    v[1] = __uint_as_float(u.x & 0xffff0000u);
    v[2] = __uint_as_float(u.y << 16);
    v[3] = __uint_as_float(u.y & 0xffff0000u);
    return;
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) v[i] = k + i < K ? __bfloat162float(xr[k + i]) : 0.0f;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// acc[r][m] += sum over this thread's chunks of W[n0 + r, k] * x_m[k], for rows r < nv and
// activation rows m with xr[m] != nullptr. Threads of the block take chunks c = threadIdx.x,
// threadIdx.x + blockDim.x, ... in order, so every partial sum has a fixed order.
template <int F, int R, int MT, typename XT>
__device__ __forceinline__ void gemv_accum(const DevMat& w, int64_t n0, int nv,
                                           const XT* const (&xr)[MT], bool xvec,
                                           float (&acc)[R][MT]) {
  constexpr int V = FmtTraits<F>::kVals;
  constexpr int kBytesPerVal2 = F == kWF32 ? 8 : F == kWFP8 ? 2 : F == kWFP4 ? 1 : 4;  // x2
  const int64_t K = w.in;
  const int64_t nchunks = (K + V - 1) / V;
  const bool wvec = w.vec != 0;
  for (int64_t c = threadIdx.x; c < nchunks; c += blockDim.x) {
    const int64_t k0 = c * V;
    const int64_t b0 = k0 * kBytesPerVal2 / 2;
    uint4 wc[R];
    float sc[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r < nv) {
        wc[r] = ld_chunk(w.data + (n0 + r) * w.row_bytes, b0, w.row_bytes, wvec);
        sc[r] = chunk_scale<F>(w, n0 + r, k0);
      } else {
        wc[r] = make_uint4(0, 0, 0, 0);
        sc[r] = 0.0f;
      }
    }
#pragma unroll
    for (int p = 0; p < V / 4; ++p) {
      const int64_t k = k0 + 4 * p;
      float wv[R][4];
#pragma unroll
      for (int r = 0; r < R; ++r) decode4<F>(wc[r], p, sc[r], wv[r]);
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (xr[m] == nullptr) continue;
        float xv[4];
        load_x4(xr[m], k, K, xvec, xv);
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[r][m] = fmaf(wv[r][i], xv[i], acc[r][m]);
      }
    }
  }
}

// Sums acc over the block (warp shuffles, then the warps in order) into out[r * MT + m] (shared,
// visible to every thread on return). red: shared scratch of 32 * R * MT floats.
template <int R, int MT>
__device__ __forceinline__ void block_sum(float (&acc)[R][MT], float* red, float* out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const float v = warp_sum(acc[r][m]);
      if (lane == 0) red[warp * R * MT + r * MT + m] = v;
    }
  __syncthreads();
  for (int i = threadIdx.x; i < R * MT; i += blockDim.x) {
    float s = 0.0f;
    for (int wi = 0; wi < nwarps; ++wi) s += red[wi * R * MT + i];
    out[i] = s;
  }
  __syncthreads();
}

// Threads per block for a GEMV over rows of K values: enough to give every thread one chunk, at
// most 256 (a whole number of warps).
inline int gemv_threads(int fmt, int64_t K) {
  const int V = fmt == kWF32 ? 4 : fmt == kWFP8 ? 16 : fmt == kWFP4 ? 32 : 8;
  const int64_t chunks = (K + V - 1) / V;
  int64_t t = (chunks + 31) / 32 * 32;
  return static_cast<int>(t < 32 ? 32 : t > 256 ? 256 : t);
}

}  // namespace sp::cuda
