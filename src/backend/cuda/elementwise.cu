// Norms, rope, mHC mixing, copies and greedy sampling on the GPU. Activations are read as f32 or
// bf16 and every computation is fp32; reductions use a fixed tree (deterministic).
#include <cuda_bf16.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>

#include "backend/cuda/kernels.h"

namespace sp::cuda {
namespace {

__device__ __forceinline__ float ld(const float* p, int64_t i) {
  return p[i];
}
__device__ __forceinline__ float ld(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}
__device__ __forceinline__ void st(float* p, int64_t i, float v) {
  p[i] = v;
}
__device__ __forceinline__ void st(__nv_bfloat16* p, int64_t i, float v) {
  p[i] = __float2bfloat16_rn(v);
}

// Calls f(T()) with T the storage type of an activation dtype (f32 or bf16).
template <typename F>
void dispatch_act(DType dt, F&& f) {
  if (dt == DType::kF32)
    f(float());
  else if (dt == DType::kBF16)
    f(__nv_bfloat16());
  else
    SP_CHECK(false, "CUDA: activation dtype ", dtype_name(dt), " not supported");
}

constexpr int kThreads = 256;

// Sum over the block; every thread gets the result. `red` holds kThreads / 32 floats.
__device__ float block_sum(float v, float* red) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float s = 0;
  for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) s += red[w];
  return s;
}

__device__ __forceinline__ float sigmoidf(float x) {
  return 1.0f / (1.0f + expf(-x));
}

template <typename TE, typename TX>
__global__ void expand_kernel(const TE* e, int64_t e_stride, int64_t D, int hc, TX* X,
                              int64_t x_stride, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / (hc * D), r = i % (hc * D), d = r % D;
    st(X + t * x_stride, r, ld(e + t * e_stride, d));
  }
}

template <typename TI, typename TO>
__global__ void rms_norm_kernel(const TI* x, int64_t xs, const float* w, int group, int groups,
                                float eps, TO* y, int64_t ys) {
  __shared__ float red[kThreads / 32];
  const int64_t row = blockIdx.x / groups, g = blockIdx.x % groups;
  const TI* src = x + row * xs + g * group;
  TO* dst = y + row * ys + g * group;
  float ss = 0;
  for (int k = threadIdx.x; k < group; k += blockDim.x) {
    float v = ld(src, k);
    ss += v * v;
  }
  ss = block_sum(ss, red);
  const float r = 1.0f / sqrtf(ss / static_cast<float>(group) + eps);
  __syncthreads();  // in place: every read above happened before any write below
  for (int k = threadIdx.x; k < group; k += blockDim.x) {
    float v = ld(src, k) * r;
    st(dst, k, w ? w[k] * v : v);
  }
}

// Four consecutive activations as fp32 (vector loads: f32 rows 16-byte aligned, bf16 rows 8-byte
// aligned) and back.
__device__ __forceinline__ float4 ld4(const float* p) {
  return *reinterpret_cast<const float4*>(p);
}
__device__ __forceinline__ float4 ld4(const __nv_bfloat16* p) {
  const uint2 u = *reinterpret_cast<const uint2*>(p);
  return make_float4(__uint_as_float(u.x << 16), __uint_as_float(u.x & 0xffff0000u),
                     __uint_as_float(u.y << 16), __uint_as_float(u.y & 0xffff0000u));
}
__device__ __forceinline__ void st4(float* p, float4 v) {
  *reinterpret_cast<float4*>(p) = v;
}
__device__ __forceinline__ void st4(__nv_bfloat16* p, float4 v) {
  const __nv_bfloat162 a = __floats2bfloat162_rn(v.x, v.y), b = __floats2bfloat162_rn(v.z, v.w);
  uint2 u;
  u.x = *reinterpret_cast<const uint32_t*>(&a);
  u.y = *reinterpret_cast<const uint32_t*>(&b);
  *reinterpret_cast<uint2*>(p) = u;
}

// ss + the squares of v's four values in order, each an FMA (the fused mHC + norm repeats this
// sum: the same instructions, the same bits).
__device__ __forceinline__ float sum_squares4(float4 v, float ss) {
  ss = fmaf(v.x, v.x, ss);
  ss = fmaf(v.y, v.y, ss);
  ss = fmaf(v.z, v.z, ss);
  return fmaf(v.w, v.w, ss);
}

// RMS norm of one group per block, the group's values held in registers between the sum of squares
// and the scaling (one read of x, every load of a thread in flight at once): thread i takes the
// 4-value vectors i, i + blockDim, ... (at most kNormVecs). The host sizes the block so that the
// vectors fit (group <= 4 * kNormVecs * 1024) and checks the alignment of x, y and w. Sums: a
// thread's vectors in order, then block_sum's fixed tree; deterministic for a given group size.
constexpr int kNormVecs = 4, kNormMaxThreads = 1024;
template <typename TI, typename TO>
__global__ void __launch_bounds__(kNormMaxThreads)
    rms_norm_vec_kernel(const TI* x, int64_t xs, const float* w, int group, int groups, float eps,
                        TO* y, int64_t ys) {
  __shared__ float red[kNormMaxThreads / 32];
  const int64_t row = blockIdx.x / groups, g = blockIdx.x % groups;
  const TI* src = x + row * xs + g * group;
  TO* dst = y + row * ys + g * group;
  const int nvec = group / 4;
  float4 v[kNormVecs], wv[kNormVecs];  // the weight's loads in flight with x's
#pragma unroll
  for (int j = 0; j < kNormVecs; ++j) {
    const int i = threadIdx.x + j * blockDim.x;
    v[j] = i < nvec ? ld4(src + 4 * i) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    wv[j] = i < nvec && w ? *reinterpret_cast<const float4*>(w + 4 * i)
                          : make_float4(1.0f, 1.0f, 1.0f, 1.0f);
  }
  float ss = 0;
#pragma unroll
  for (int j = 0; j < kNormVecs; ++j) ss = sum_squares4(v[j], ss);
  ss = block_sum(ss, red);
  const float r = 1.0f / sqrtf(ss / static_cast<float>(group) + eps);
  // In place (y == x) is safe: each thread writes only the values it read into registers.
#pragma unroll
  for (int j = 0; j < kNormVecs; ++j) {
    const int i = threadIdx.x + j * blockDim.x;
    if (i >= nvec) continue;
    float4 o = make_float4(v[j].x * r, v[j].y * r, v[j].z * r, v[j].w * r);
    if (w) o = make_float4(wv[j].x * o.x, wv[j].y * o.y, wv[j].z * o.z, wv[j].w * o.w);
    st4(dst + 4 * i, o);
  }
}

template <typename T>
__global__ void rope_kernel(T* x, int64_t xs, int heads, int head_dim, int rope_dim,
                            const float* inv_freq, const int32_t* positions, int rows,
                            bool inverse) {
  const int half = rope_dim / 2;
  const int64_t n = static_cast<int64_t>(rows) * heads * half;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / (heads * half);
    const int h = static_cast<int>((i / half) % heads), p = static_cast<int>(i % half);
    const float ang = inv_freq[p] * static_cast<float>(positions[r]);
    const float c = static_cast<float>(cos(static_cast<double>(ang)));
    float s = static_cast<float>(sin(static_cast<double>(ang)));
    if (inverse) s = -s;
    T* v = x + r * xs + static_cast<int64_t>(h) * head_dim + (head_dim - rope_dim) + 2 * p;
    const float a = ld(v, 0), b = ld(v, 1);
    st(v, 0, a * c - b * s);
    st(v, 1, b * c + a * s);
  }
}

// ---- mHC collapse (hc_pre, hc_head) ------------------------------------------------------------
// Two launches whose grids depend only on T and the shapes (so decode steps replay from graphs):
//  1. hc_mix_kernel, blocks of (K-chunk c, tile of kHcTile tokens): for each token of the tile the
//     chunk's partial dot products fn_j . u (j < mix) and its partial sum of squares u . u, each
//     accumulated by a lane over its columns in order, then summed over the warp by a fixed
//     shuffle tree; written to the workspace as part[t][c][0..mix] (index mix: the squares).
//  2. hc_collapse_kernel, blocks of (token t, slice of D): sums the token's partials over the
//     chunks in a fixed order (every block of the token the same way, so the same bits), then
//     rho = 1 / sqrt(sum u^2 / W + eps), mix_j = rho * (fn_j . u), pre_j, and x = sum_j pre_j u_j
//     over the block's slice of D; for hc_pre one more block per token forms post and runs the
//     Sinkhorn iterations on comb (one element per thread, in the CPU backend's order; for hc_mult
//     <= 5 one warp exchanging by shuffles, without barriers).
// The CPU backend normalises first (fn_j . (u rho)); here rho multiplies the finished dot product
// (one rounding of the sum instead of one per term: both within fp32 rounding of the reference,
// whose summation order differs anyway), which lets one pass over X give the squares and the dots.
// The chunk count falls as T grows (about kHcTargetBlocks blocks in kernel 1): at T = 1 the 1.5 MB
// of V4-Flash's fn is read by 128 blocks; at prefill sizes each block walks the whole row (a chunk
// count of 1 or 2) with fn from L2.
constexpr int kWarps = kThreads / 32;
constexpr int kHcTile = kWarps;  // tokens per block of kernel 1: warp w sums the squares of token w
constexpr int kHcRows = 3;       // mix rows per warp per pass (24 = 8 warps x 3 for hc_mult 4)
constexpr int kHcStep = 128;     // columns of one warp step: 32 lanes x 4 consecutive columns
constexpr int kHcTargetBlocks = 1024;
constexpr int kHcSlice = 1024;  // D columns per block of kernel 2
constexpr int kHcMaxHc = 16;
constexpr int kHcMaxP = (2 + kHcMaxHc) * kHcMaxHc + 1;  // mix logits + the sum of squares
static_assert(kHcMaxHc * kHcMaxHc <= kThreads, "Sinkhorn: one element per thread");

// Four consecutive elements k..k+3 of a row as fp32. Vec: one 16-byte (f32) or 8-byte (bf16) load
// (the caller checked alignment and that k + 3 < n); otherwise element loads, zero past n.
template <bool Vec>
__device__ __forceinline__ float4 load4(const float* p, int64_t k, int64_t n) {
  if constexpr (Vec) {
    return *reinterpret_cast<const float4*>(p + k);
  } else {
    return make_float4(k < n ? p[k] : 0.0f, k + 1 < n ? p[k + 1] : 0.0f,
                       k + 2 < n ? p[k + 2] : 0.0f, k + 3 < n ? p[k + 3] : 0.0f);
  }
}
template <bool Vec>
__device__ __forceinline__ float4 load4(const __nv_bfloat16* p, int64_t k, int64_t n) {
  if constexpr (Vec) {
    const uint2 w = *reinterpret_cast<const uint2*>(p + k);  // element k in the low half
    return make_float4(__uint_as_float(w.x << 16), __uint_as_float(w.x & 0xffff0000u),
                       __uint_as_float(w.y << 16), __uint_as_float(w.y & 0xffff0000u));
  } else {
    return make_float4(k < n ? ld(p, k) : 0.0f, k + 1 < n ? ld(p, k + 1) : 0.0f,
                       k + 2 < n ? ld(p, k + 2) : 0.0f, k + 3 < n ? ld(p, k + 3) : 0.0f);
  }
}

__device__ __forceinline__ float dot4(float4 a, float4 b, float acc) {
  acc = fmaf(a.x, b.x, acc);
  acc = fmaf(a.y, b.y, acc);
  acc = fmaf(a.z, b.z, acc);
  return fmaf(a.w, b.w, acc);
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// a * s + b with two roundings, as the CPU backend computes it (no contraction into an FMA).
__device__ __forceinline__ float affine(float a, float s, float b) {
  return __fadd_rn(__fmul_rn(a, s), b);
}

// Kernel 1. X: [T, W] rows of stride xs; fn: [mix, W] rows of stride fs; chunk c covers columns
// [c kc, min(W, (c + 1) kc)), kc a multiple of kHcStep; part: [T, gridDim.x, mix + 1].
// The block's work: chunk c (of nchunk) of the tile of tokens from t0.
template <typename TI, bool Vec>
__device__ __forceinline__ void hc_mix_block(const TI* X, int64_t xs, int64_t T, const float* fn,
                                             int64_t fs, int mix, int64_t W, int64_t kc,
                                             float* part, int c, int nchunk, int64_t t0) {
  const int P = mix + 1;
  const int nt = static_cast<int>(min(static_cast<int64_t>(kHcTile), T - t0));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t kbeg = c * kc, kend = min(W, kbeg + kc);
  // Pass p: this warp's rows j0 + kWarps * i (i < kHcRows); pass 0 always runs (the squares).
  for (int j0 = warp; j0 == warp || j0 < mix; j0 += kWarps * kHcRows) {
    float acc[kHcTile][kHcRows];
#pragma unroll
    for (int t = 0; t < kHcTile; ++t)
#pragma unroll
      for (int i = 0; i < kHcRows; ++i) acc[t][i] = 0.0f;
    float ss = 0.0f;
    for (int64_t k = kbeg + 4 * lane; k < kend; k += kHcStep) {
      float4 f[kHcRows];
#pragma unroll
      for (int i = 0; i < kHcRows; ++i) {
        const int j = j0 + kWarps * i;
        f[i] = j < mix ? load4<Vec>(fn + j * fs, k, W) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      }
#pragma unroll
      for (int t = 0; t < kHcTile; ++t) {
        if (t < nt) {
          const float4 u = load4<Vec>(X + (t0 + t) * xs, k, W);
#pragma unroll
          for (int i = 0; i < kHcRows; ++i) acc[t][i] = dot4(u, f[i], acc[t][i]);
          if (j0 == warp && t == warp) ss = dot4(u, u, ss);
        }
      }
    }
#pragma unroll
    for (int t = 0; t < kHcTile; ++t) {
      if (t >= nt) break;
      float* dst = part + ((t0 + t) * nchunk + c) * P;
#pragma unroll
      for (int i = 0; i < kHcRows; ++i) {
        const int j = j0 + kWarps * i;
        if (j >= mix) break;  // warp-uniform
        const float v = warp_sum(acc[t][i]);
        if (lane == 0) dst[j] = v;
      }
    }
    if (j0 == warp && warp < nt) {
      const float v = warp_sum(ss);
      if (lane == 0) part[((t0 + warp) * nchunk + c) * P + mix] = v;
    }
  }
}

template <typename TI, bool Vec>
__global__ void __launch_bounds__(kThreads)
    hc_mix_kernel(const TI* X, int64_t xs, int64_t T, const float* fn, int64_t fs, int mix,
                  int64_t W, int64_t kc, float* part) {
  hc_mix_block<TI, Vec>(X, xs, T, fn, fs, mix, W, kc, part, blockIdx.x, gridDim.x,
                        static_cast<int64_t>(blockIdx.y) * kHcTile);
}

// One token's comb through the Sinkhorn iterations, element e = j hc + k held by thread e (e <
// hc^2; the other threads take part in the exchanges with a value nobody reads); returns the
// thread's element. Operations and their order are the CPU backend's: row softmax over the last
// index plus hc_eps, a column normalisation, then (iters - 1) row and column normalisations, each
// sum in index order. Warp: hc^2 <= 32, one warp alone (e its lane), values exchanged by shuffles;
// otherwise every thread of the block (e its thread index), through `buf` ([2][kThreads] floats of
// shared memory, one buffer written while the other is read, so one barrier per step). HC > 0:
// hc == HC known at compile time, so each sum's shuffles are unrolled and in flight at once (the
// iterations are a chain of dependent steps: their latency is the kernel's).
template <bool Warp, int HC>
__device__ float sinkhorn_comb(float v, int e, int hc_rt, int iters, float hc_eps, float* buf) {
  const int hc = HC > 0 ? HC : hc_rt;
  const bool act = e < hc * hc;
  const int j = act ? e / hc : 0, k = act ? e % hc : 0;
  int phase = 0;
  float mine = v;
  auto publish = [&](float x) {
    if constexpr (Warp) {
      mine = x;
    } else {
      phase ^= 1;
      buf[phase * kThreads + e] = x;
      __syncthreads();
    }
  };
  auto read = [&](int i) {
    if constexpr (Warp)
      return __shfl_sync(0xffffffffu, mine, i);
    else
      return buf[phase * kThreads + i];
  };
  // Sum of the hc values at first, first + stride, ... in index order.
  auto sum = [&](int first, int stride) {
    float c = 0.0f;
    if constexpr (HC > 0) {
      float r[HC];
#pragma unroll
      for (int q = 0; q < HC; ++q) r[q] = read(first + q * stride);
#pragma unroll
      for (int q = 0; q < HC; ++q) c += r[q];
    } else {
      for (int q = 0; q < hc; ++q) c += read(first + q * stride);
    }
    return c;
  };
  publish(v);
  float mx = -INFINITY;
  for (int q = 0; q < hc; ++q) mx = fmaxf(mx, read(j * hc + q));
  float s = 0.0f;
  for (int q = 0; q < hc; ++q) s += expf(read(j * hc + q) - mx);
  v = expf(v - mx) / s + hc_eps;
  auto col_norm = [&] {
    publish(v);
    v = v / (sum(k, hc) + hc_eps);
  };
  auto row_norm = [&] {
    publish(v);
    v = v / (sum(j * hc, 1) + hc_eps);
  };
  col_norm();
  for (int it = 0; it < iters - 1; ++it) {
    row_norm();
    col_norm();
  }
  return v;
}

// Columns d0 + i0, d0 + i0 + ni, ... below d1 of x = sum_j pre_j u_j for one token (src: its
// row of X, out: its row of the output), each sum in j order. HC > 0: kHcBatch columns' loads in
// flight at once.
constexpr int kHcBatch = 4;
template <int HC, typename TI, typename TO>
__device__ __forceinline__ void hc_collapse_cols(const TI* src, int hc, int64_t D, const float* pre,
                                                 int64_t d0, int64_t d1, int i0, int ni, TO* out) {
  if constexpr (HC > 0) {
    for (int64_t d = d0 + i0; d < d1; d += static_cast<int64_t>(kHcBatch) * ni) {
      float u[kHcBatch][HC];
#pragma unroll
      for (int b = 0; b < kHcBatch; ++b) {
        const int64_t e = d + static_cast<int64_t>(b) * ni;
#pragma unroll
        for (int j = 0; j < HC; ++j) u[b][j] = e < d1 ? ld(src, j * D + e) : 0.0f;
      }
#pragma unroll
      for (int b = 0; b < kHcBatch; ++b) {
        const int64_t e = d + static_cast<int64_t>(b) * ni;
        if (e >= d1) break;
        float s = 0.0f;
#pragma unroll
        for (int j = 0; j < HC; ++j) s += pre[j] * u[b][j];
        st(out, e, s);
      }
    }
  } else {
    for (int64_t d = d0 + i0; d < d1; d += ni) {
      float s = 0.0f;
#pragma unroll 4
      for (int j = 0; j < hc; ++j) s += pre[j] * ld(src, j * D + d);
      st(out, d, s);
    }
  }
}

// Kernel 2. Block (t, y): y < gridDim.y - sinkhorn forms x[t] over columns [y kHcSlice, ...);
// with `sinkhorn` (hc_pre) the last y forms post[t] and comb[t] instead. mix = (2 + hc) hc for
// hc_pre, hc for hc_head (pre only).
template <typename TI, typename TO, int HC>
__global__ void __launch_bounds__(kThreads)
    hc_collapse_kernel(const TI* X, int64_t xs, const float* part, int nchunk, int hc, int mix,
                       int64_t D, const float* base, const float* scale, int iters, float hc_eps,
                       float norm_eps, bool sinkhorn, TO* out, int64_t os, float* post, int64_t ps,
                       float* comb, int64_t cs) {
  __shared__ float m[kHcMaxP];
  __shared__ float pre[kHcMaxHc];
  __shared__ float cb[2][kThreads];
  const int64_t t = blockIdx.x;
  const int P = mix + 1;
  // Sum over the chunks: 8 lanes per value, lane s taking chunks s, s + 8, ... in order, then a
  // fixed 3-step shuffle tree (every lane of the 8 ends with the same bits).
  const float* pt = part + t * nchunk * P;
  for (int j0 = 0; j0 < P; j0 += kThreads / 8) {
    const int j = j0 + static_cast<int>(threadIdx.x) / 8, sub = threadIdx.x % 8;
    float s = 0.0f;
    if (j < P) {
#pragma unroll 16  // up to 128 chunks: every load in flight at once
      for (int c = sub; c < nchunk; c += 8) s += pt[static_cast<int64_t>(c) * P + j];
    }
    s += __shfl_xor_sync(0xffffffffu, s, 4);
    s += __shfl_xor_sync(0xffffffffu, s, 2);
    s += __shfl_xor_sync(0xffffffffu, s, 1);
    if (sub == 0 && j < P) m[j] = s;
  }
  __syncthreads();
  const float r = 1.0f / sqrtf(m[mix] / static_cast<float>(hc * D) + norm_eps);
  if (sinkhorn && blockIdx.y == gridDim.y - 1) {
    const int e = threadIdx.x, n = hc * hc;
    if (e < hc) post[t * ps + e] = 2.0f * sigmoidf(affine(m[hc + e] * r, scale[1], base[hc + e]));
    // Up to 32 elements: warp 0 alone, in registers and shuffles; else the whole block, through
    // shared memory.
    const float logit = e < n ? affine(m[2 * hc + e] * r, scale[2], base[2 * hc + e]) : 0.0f;
    float v;
    if (n <= 32) {
      if (e >= 32) return;
      v = sinkhorn_comb<true, HC>(logit, e, hc, iters, hc_eps, nullptr);
    } else {
      v = sinkhorn_comb<false, HC>(logit, e, hc, iters, hc_eps, &cb[0][0]);
    }
    if (e < n) comb[t * cs + e] = v;
    return;
  }
  const int tid = threadIdx.x;
  if (tid < hc) pre[tid] = sigmoidf(affine(m[tid] * r, scale[0], base[tid])) + hc_eps;
  __syncthreads();
  const int64_t d0 = blockIdx.y * static_cast<int64_t>(kHcSlice);
  hc_collapse_cols<HC>(X + t * xs, hc, D, pre, d0, min(D, d0 + kHcSlice), tid, kThreads,
                       out + t * os);
}

// Small T at hc_mult 4 (decode): both launches in one. Every block does kernel 1's work for its
// chunk (T <= kHcFuseMaxTokens: one tile), then counts itself done on an integer counter in the
// workspace (zero between launches: the last block resets it); the last block sums each token's
// partials as kernel 2 does (the same bits), then with `sinkhorn` (hc_pre) warp t forms post[t]
// and comb[t] (in registers and shuffles) while the other warps form x over the whole of D for
// every token; hc_head: every warp forms x.
constexpr int kHcFuseMaxTokens = 4, kHcFuseHc = 4;
constexpr int kHcNormVirt = 2;  // the fused RMS norm: up to 2 x kThreads threads of rms_norm_vec
constexpr int kHcFuseP = (2 + kHcFuseHc) * kHcFuseHc + 1;
static_assert(kHcFuseMaxTokens <= kHcTile && kHcFuseMaxTokens < kWarps, "fused mHC: one tile");
template <typename TI, typename TO, bool Vec>
__global__ void __launch_bounds__(kThreads)
    hc_fused_kernel(const TI* X, int64_t xs, int T, const float* fn, int64_t fs, int mix, int64_t W,
                    int64_t kc, float* part, unsigned* counter, int64_t D, const float* base,
                    const float* scale, int iters, float hc_eps, float norm_eps, bool sinkhorn,
                    TO* out, int64_t os, float* post, int64_t ps, float* comb, int64_t cs,
                    int norm_threads, const float* nw, TO* y, int64_t ys) {
  constexpr int hc = kHcFuseHc;
  __shared__ float m[kHcFuseMaxTokens][kHcFuseP];
  __shared__ float pre[kHcFuseMaxTokens][hc];
  __shared__ bool last;
  const int nchunk = static_cast<int>(gridDim.x), P = mix + 1;
  hc_mix_block<TI, Vec>(X, xs, T, fn, fs, mix, W, kc, part, static_cast<int>(blockIdx.x), nchunk,
                        0);
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(counter, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  if (threadIdx.x == 0) *counter = 0;
  // Value i = t P + j of the T tokens: 8 lanes, the chunk order and shuffle tree of kernel 2.
  const int TP = T * P;
  for (int i0 = 0; i0 < TP; i0 += kThreads / 8) {
    const int i = i0 + static_cast<int>(threadIdx.x) / 8, sub = threadIdx.x % 8;
    const int t = i / P, j = i % P;
    float s = 0.0f;
    if (i < TP) {
      const float* pt = part + static_cast<int64_t>(t) * nchunk * P;
#pragma unroll 16
      for (int c = sub; c < nchunk; c += 8) s += __ldcg(pt + static_cast<int64_t>(c) * P + j);
    }
    s += __shfl_xor_sync(0xffffffffu, s, 4);
    s += __shfl_xor_sync(0xffffffffu, s, 2);
    s += __shfl_xor_sync(0xffffffffu, s, 1);
    if (sub == 0 && i < TP) m[t][j] = s;
  }
  __syncthreads();
  const int tid = threadIdx.x;
  auto rho = [&](int t) { return 1.0f / sqrtf(m[t][mix] / static_cast<float>(hc * D) + norm_eps); };
  if (tid < T * hc) {
    const int t = tid / hc, j = tid % hc;
    pre[t][j] = sigmoidf(affine(m[t][j] * rho(t), scale[0], base[j])) + hc_eps;
  }
  __syncthreads();
  const int xw = sinkhorn ? T : 0;  // warps below xw: post and comb of token `warp`
  const int warp = tid / 32;
  if (warp < xw) {
    const int t = warp, e = tid % 32, n = hc * hc;
    const float r = rho(t);
    if (e < hc)
      post[t * ps + e] = 2.0f * sigmoidf(affine(m[t][hc + e] * r, scale[1], base[hc + e]));
    const float logit = e < n ? affine(m[t][2 * hc + e] * r, scale[2], base[2 * hc + e]) : 0.0f;
    const float v = sinkhorn_comb<true, hc>(logit, e, hc, iters, hc_eps, nullptr);
    if (e < n) comb[t * cs + e] = v;
  } else {
    for (int t = 0; t < T; ++t)
      hc_collapse_cols<hc>(X + t * xs, hc, D, pre[t], 0, D, tid - 32 * xw, kThreads - 32 * xw,
                           out + t * os);
  }
  if (norm_threads == 0) return;
  // y = rms_norm(x) with rms_norm_vec_kernel's partition of a norm_threads-thread block (thread
  // tid plays its threads tid and tid + kThreads), so the bits are the separate launch's; x is read
  // back as stored. In place (y == out) is safe: each thread writes only what it read.
  __shared__ float red[kHcNormVirt * kWarps];
  __syncthreads();  // x complete
  const int V = norm_threads, nvec = static_cast<int>(D / 4), lane = tid % 32;
  for (int t = 0; t < T; ++t) {
    const TO* xr = out + t * os;
    TO* yr = y + t * ys;
    float ss[kHcNormVirt];
#pragma unroll
    for (int k = 0; k < kHcNormVirt; ++k) {
      const int vt = tid + kThreads * k;
      float4 v[kNormVecs];
#pragma unroll
      for (int j = 0; j < kNormVecs; ++j) {
        const int i = vt + j * V;
        v[j] = vt < V && i < nvec ? ld4(xr + 4 * i) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      }
      ss[k] = 0.0f;
#pragma unroll
      for (int j = 0; j < kNormVecs; ++j) ss[k] = sum_squares4(v[j], ss[k]);
      ss[k] = warp_sum(ss[k]);
      if (lane == 0 && vt < V) red[warp + kWarps * k] = ss[k];
    }
    __syncthreads();
    float tot = 0.0f;
    for (int w = 0; w < V / 32; ++w) tot += red[w];
    const float r = 1.0f / sqrtf(tot / static_cast<float>(D) + norm_eps);
#pragma unroll
    for (int k = 0; k < kHcNormVirt; ++k) {
      const int vt = tid + kThreads * k;
#pragma unroll
      for (int j = 0; j < kNormVecs; ++j) {
        const int i = vt + j * V;
        if (vt >= V || i >= nvec) continue;
        const float4 v = ld4(xr + 4 * i);
        float4 o = make_float4(v.x * r, v.y * r, v.z * r, v.w * r);
        if (nw) {
          const float4 wv = *reinterpret_cast<const float4*>(nw + 4 * i);
          o = make_float4(wv.x * o.x, wv.y * o.y, wv.z * o.z, wv.w * o.w);
        }
        st4(yr + 4 * i, o);
      }
    }
    __syncthreads();  // red is the next token's
  }
}

// HC > 0: hc == HC known at compile time (the streams in registers, every load unrolled and in
// flight at once); 0: any hc up to 16. The same arithmetic either way.
template <typename TF, typename TX, int HC>
__global__ void hc_post_kernel(const TF* f, int64_t fs, const float* post, int64_t ps,
                               const float* comb, int64_t cs, int hc_rt, int64_t D, TX* X,
                               int64_t xs, int64_t n) {
  constexpr int kMax = HC > 0 ? HC : 16;
  const int hc = HC > 0 ? HC : hc_rt;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / D, d = i % D;
    TX* x = X + t * xs;
    float in[kMax];
#pragma unroll
    for (int j = 0; j < kMax; ++j)
      if (j < hc) in[j] = ld(x, j * D + d);
    const float fv = ld(f + t * fs, d);
    const float* c = comb + t * cs;
#pragma unroll
    for (int k = 0; k < kMax; ++k) {
      if (k >= hc) break;
      float s = 0;
#pragma unroll
      for (int j = 0; j < kMax; ++j)
        if (j < hc) s += c[j * hc + k] * in[j];
      st(x, k * D + d, post[t * ps + k] * fv + s);
    }
  }
}

template <typename T>
__global__ void gather_kernel(const T* x, int64_t xs, const int32_t* rows, int n, int64_t cols,
                              T* out, int64_t os) {
  const int64_t total = static_cast<int64_t>(n) * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i % cols;
    out[r * os + c] = x[static_cast<int64_t>(rows[r]) * xs + c];
  }
}

// Greedy rows: the CPU's rule (sample_logits_row: the first maximum, a NaN never wins, and a NaN at
// id 0 keeps id 0), i.e. the lowest id of the largest non-NaN value, or 0 when id 0 is NaN or every
// value is. A row is split over slices of kArgmaxSlice logits, one block each (pass 1: the
// slice's best (value, id) into the workspace), then pass 2 picks the best of the row's slices.
// (value, id) pairs under "larger value, then lower id" are a total order over the non-NaN
// values, so the result is the same whatever the order of the comparisons (deterministic).
constexpr int kArgmaxThreads = 256, kArgmaxPerThread = 8;
constexpr int kArgmaxSlice = kArgmaxThreads * kArgmaxPerThread;
constexpr int32_t kNoId = 0x7fffffff;  // no candidate (every value seen was NaN)
constexpr int kArgmaxRowsFloor = 256;  // 128 KB at V4's vocab

struct ArgBest {
  float v;
  int32_t i;
};

// (v, i) replaces (bv, bi) when it is a candidate that beats it (an absent one is beaten by any).
__device__ __forceinline__ void arg_take(float v, int32_t i, float& bv, int32_t& bi) {
  if (i != kNoId && (bi == kNoId || v > bv || (v == bv && i < bi))) bv = v, bi = i;
}

// Reduces (bv, bi) over the block; thread 0 gets the result. `sh`: kArgmaxThreads / 32 entries.
__device__ __forceinline__ void arg_block(float& bv, int32_t& bi, ArgBest* sh) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int32_t oi = __shfl_xor_sync(0xffffffffu, bi, o);
    arg_take(ov, oi, bv, bi);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) sh[warp] = ArgBest{bv, bi};
  __syncthreads();
  if (threadIdx.x == 0)
    for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w) arg_take(sh[w].v, sh[w].i, bv, bi);
}

// Pass 1: grid (rows, slices): rows on x, which has no 65,535 limit. vec: rows 16-byte aligned
// (float4 loads).
__global__ void __launch_bounds__(kArgmaxThreads)
    argmax_slice_kernel(const float* logits, int64_t ls, int64_t vocab, const SampleSpec* specs,
                        int vec, ArgBest* part) {
  __shared__ ArgBest sh[kArgmaxThreads / 32];
  if (specs[blockIdx.x].temperature > 0.0f) return;  // sampled on the host
  const float* row = logits + static_cast<int64_t>(specs[blockIdx.x].row) * ls;
  const int64_t s0 = static_cast<int64_t>(blockIdx.y) * kArgmaxSlice;
  float bv = -INFINITY;
  int32_t bi = kNoId;
  auto see = [&](float v, int64_t i) {
    if (v == v) arg_take(v, static_cast<int32_t>(i), bv, bi);
  };
  if (vec) {
    float4 q[kArgmaxPerThread / 4];
#pragma unroll
    for (int j = 0; j < kArgmaxPerThread / 4; ++j) {
      const int64_t i = s0 + 4 * (threadIdx.x + j * kArgmaxThreads);
      q[j] = i + 4 <= vocab
                 ? *reinterpret_cast<const float4*>(row + i)
                 : make_float4(i < vocab ? row[i] : NAN, i + 1 < vocab ? row[i + 1] : NAN,
                               i + 2 < vocab ? row[i + 2] : NAN, NAN);
    }
#pragma unroll
    for (int j = 0; j < kArgmaxPerThread / 4; ++j) {
      const int64_t i = s0 + 4 * (threadIdx.x + j * kArgmaxThreads);
      see(q[j].x, i);
      see(q[j].y, i + 1);
      see(q[j].z, i + 2);
      see(q[j].w, i + 3);
    }
  } else {
    float q[kArgmaxPerThread];
#pragma unroll
    for (int j = 0; j < kArgmaxPerThread; ++j) {
      const int64_t i = s0 + threadIdx.x + j * kArgmaxThreads;
      q[j] = i < vocab ? row[i] : NAN;
    }
#pragma unroll
    for (int j = 0; j < kArgmaxPerThread; ++j) see(q[j], s0 + threadIdx.x + j * kArgmaxThreads);
  }
  arg_block(bv, bi, sh);
  if (threadIdx.x == 0) part[static_cast<int64_t>(blockIdx.x) * gridDim.y + blockIdx.y] = {bv, bi};
}

// Pass 2: one warp per row over its `slices` partials.
__global__ void argmax_final_kernel(const float* logits, int64_t ls, const SampleSpec* specs,
                                    const ArgBest* part, int slices, int32_t* ids) {
  if (specs[blockIdx.x].temperature > 0.0f) return;
  const float first =
      logits[static_cast<int64_t>(specs[blockIdx.x].row) * ls];  // with the partials
  const ArgBest* p = part + static_cast<int64_t>(blockIdx.x) * slices;
  float bv = -INFINITY;
  int32_t bi = kNoId;
  for (int k = threadIdx.x; k < slices; k += 32) arg_take(p[k].v, p[k].i, bv, bi);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int32_t oi = __shfl_xor_sync(0xffffffffu, bi, o);
    arg_take(ov, oi, bv, bi);
  }
  if (threadIdx.x == 0) ids[blockIdx.x] = first != first || bi == kNoId ? 0 : bi;
}

int grid_for(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535 * 8));
}

void check_device(Tensor t, const char* what) {
  SP_CHECK(t.device == Device::kCuda, "CUDA ", what, ": tensor is not in device memory");
}

}  // namespace

void expand_streams(cudaStream_t s, Tensor e, int hc, Tensor X) {
  SP_CHECK(X.cols == hc * e.cols, "expand_streams shapes");
  const int64_t n = e.rows * hc * e.cols;
  if (n == 0) return;
  dispatch_act(e.dtype, [&](auto te) {
    dispatch_act(X.dtype, [&](auto tx) {
      using TE = decltype(te);
      using TX = decltype(tx);
      expand_kernel<<<grid_for(n), kThreads, 0, s>>>(e.ptr<TE>(), e.stride, e.cols, hc, X.ptr<TX>(),
                                                     X.stride, n);
    });
  });
  SP_CUDA_LAUNCH();
}

namespace {

// The register path of rms_norm (rms_norm_vec_kernel): groups of whole 4-value vectors that fit one
// block, every row and the weight aligned for the vector loads. The block is as small as holds the
// group in kNormVecs vectors a thread (a 4096-wide row: 256 threads, every load in flight at
// once). Returns its thread count, 0 when the path does not apply.
int norm_vec_threads(const Tensor& x, const float* w, int group, const Tensor& y) {
  auto aligned = [](const Tensor& t) {
    return t.stride % 4 == 0 && reinterpret_cast<uintptr_t>(t.data) % (4 * t.elem_size()) == 0;
  };
  const bool vec = group % 4 == 0 && group <= 4 * kNormVecs * kNormMaxThreads && aligned(x) &&
                   aligned(y) && (!w || reinterpret_cast<uintptr_t>(w) % 16 == 0);
  const int nvec = group / 4;
  return vec ? std::clamp(((nvec + kNormVecs - 1) / kNormVecs + 31) & ~31, 32, kNormMaxThreads) : 0;
}

}  // namespace

void rms_norm(cudaStream_t s, Tensor x, const Tensor* weight, int group, float eps, Tensor y) {
  check_device(x, "rms_norm");
  const int groups = static_cast<int>(x.cols / group);
  const int64_t blocks = x.rows * groups;
  if (blocks == 0) return;
  const float* w = weight ? weight->f32() : nullptr;
  const int vec_threads = norm_vec_threads(x, w, group, y);
  const bool vec = vec_threads > 0;
  dispatch_act(x.dtype, [&](auto ti) {
    dispatch_act(y.dtype, [&](auto to) {
      using TI = decltype(ti);
      using TO = decltype(to);
      if (vec)
        rms_norm_vec_kernel<TI, TO><<<static_cast<unsigned>(blocks), vec_threads, 0, s>>>(
            x.ptr<TI>(), x.stride, w, group, groups, eps, y.ptr<TO>(), y.stride);
      else
        rms_norm_kernel<TI, TO><<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(
            x.ptr<TI>(), x.stride, w, group, groups, eps, y.ptr<TO>(), y.stride);
    });
  });
  SP_CUDA_LAUNCH();
}

void rope(cudaStream_t s, Tensor x, int head_dim, const RopeView& r, const DevBatch& b,
          bool inverse) {
  const int heads = static_cast<int>(x.cols / head_dim);
  const int64_t n = x.rows * heads * (r.rope_dim / 2);
  if (n == 0) return;
  dispatch_act(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    rope_kernel<<<grid_for(n), kThreads, 0, s>>>(x.ptr<T>(), x.stride, heads, head_dim, r.rope_dim,
                                                 r.inv_freq.f32(), b.positions,
                                                 static_cast<int>(x.rows), inverse);
  });
  SP_CUDA_LAUNCH();
}

namespace {

std::atomic<int> g_hc_fuse_max_tokens{1};

// With `norm` (hc_pre_norm, hc_head_norm): returns true when the launch also wrote
// y = rms_norm(out, norm_w) (the one-launch path, a norm that rms_norm would run on its register
// path within kHcNormVirt blocks' worth of threads, y of out's dtype); false: the caller runs it.
bool hc_launch(cudaStream_t s, Workspace& ws, Tensor X, const HcWeights& p, int hc, int iters,
               float hc_eps, float norm_eps, bool head, Tensor out, Tensor post, Tensor comb,
               bool norm = false, const float* norm_w = nullptr, Tensor y = Tensor{}) {
  SP_CHECK(hc >= 1 && hc <= kHcMaxHc, "CUDA mHC supports hc_mult up to ", kHcMaxHc, ", got ", hc);
  const int64_t T = X.rows, W = X.cols, D = W / hc;
  const int mix = head ? hc : (2 + hc) * hc;
  SP_CHECK(D >= 1 && W == hc * D && p.fn.rows >= mix && p.fn.cols == W && p.base.cols >= mix &&
               p.scale.cols >= (head ? 1 : 3) && out.rows == T && out.cols == D,
           "mHC shapes: X ", T, "x", W, ", fn ", p.fn.rows, "x", p.fn.cols, ", scale ",
           p.scale.cols, ", out ", out.rows, "x", out.cols, ", hc ", hc);
  SP_CHECK(head || (post.rows >= T && post.cols >= hc && comb.rows >= T && comb.cols >= hc * hc),
           "mHC shapes: post ", post.rows, "x", post.cols, ", comb ", comb.rows, "x", comb.cols,
           " for ", T, " tokens of hc ", hc);
  if (T == 0) return norm;
  // Launch sizes from T and the shapes only: about kHcTargetBlocks blocks in kernel 1.
  const int64_t tiles = (T + kHcTile - 1) / kHcTile;
  SP_CHECK(tiles <= 65535, "mHC: ", T, " tokens in one call");
  const int64_t steps = (W + kHcStep - 1) / kHcStep;
  int64_t nchunk = std::clamp<int64_t>(kHcTargetBlocks / tiles, 1, steps);
  const int64_t per = (steps + nchunk - 1) / nchunk;  // steps per chunk
  nchunk = (steps + per - 1) / per;
  const int P = mix + 1;
  // At least the size of 8192 tokens' partials from the first call on (the memory estimate counts
  // that much): a decode step after a smaller one would otherwise grow the workspace (T * nchunk
  // peaks at T = 64) and drop the recorded graphs.
  float* part = ws.get<float>(kWsHc, static_cast<size_t>(std::max<int64_t>(T * nchunk, 8192) * P));
  const int64_t fs = p.fn.rows > 1 ? p.fn.stride : W;
  const int64_t xs = T > 1 ? X.stride : W;
  const float* fn = p.fn.f32();
  const int64_t slices = (D + kHcSlice - 1) / kHcSlice;
  const bool sinkhorn = !head;
  // One launch at decode sizes (see hc_fused_kernel); the counter is zero from its allocation on.
  const bool fused = hc == kHcFuseHc && T <= g_hc_fuse_max_tokens.load(std::memory_order_relaxed);
  unsigned* counter = fused ? ws.get<unsigned>(kWsHcCounter, 64) : nullptr;
  int norm_threads = 0;
  if (fused && norm && y.dtype == out.dtype && y.rows >= T && y.cols == D) {
    norm_threads = norm_vec_threads(out, norm_w, static_cast<int>(D), y);
    if (norm_threads > kHcNormVirt * kThreads) norm_threads = 0;
  }
  dispatch_act(X.dtype, [&](auto ti) {
    using TI = decltype(ti);
    const bool vec = W % 4 == 0 && xs % 4 == 0 && fs % 4 == 0 &&
                     reinterpret_cast<uintptr_t>(X.data) % (4 * sizeof(TI)) == 0 &&
                     reinterpret_cast<uintptr_t>(fn) % 16 == 0;
    if (fused) {
      dispatch_act(out.dtype, [&](auto to) {
        using TO = decltype(to);
        auto kern = vec ? hc_fused_kernel<TI, TO, true> : hc_fused_kernel<TI, TO, false>;
        kern<<<static_cast<unsigned>(nchunk), kThreads, 0, s>>>(
            X.ptr<TI>(), xs, static_cast<int>(T), fn, fs, mix, W, per * kHcStep, part, counter, D,
            p.base.f32(), p.scale.f32(), iters, hc_eps, norm_eps, sinkhorn, out.ptr<TO>(),
            out.stride, sinkhorn ? post.f32() : nullptr, sinkhorn ? post.stride : 0,
            sinkhorn ? comb.f32() : nullptr, sinkhorn ? comb.stride : 0, norm_threads, norm_w,
            norm_threads ? y.ptr<TO>() : nullptr, norm_threads ? y.stride : 0);
      });
      return;
    }
    const dim3 g1(static_cast<unsigned>(nchunk), static_cast<unsigned>(tiles));
    if (vec)
      hc_mix_kernel<TI, true>
          <<<g1, kThreads, 0, s>>>(X.ptr<TI>(), xs, T, fn, fs, mix, W, per * kHcStep, part);
    else
      hc_mix_kernel<TI, false>
          <<<g1, kThreads, 0, s>>>(X.ptr<TI>(), xs, T, fn, fs, mix, W, per * kHcStep, part);
    SP_CUDA_LAUNCH();
    dispatch_act(out.dtype, [&](auto to) {
      using TO = decltype(to);
      const dim3 g2(static_cast<unsigned>(T), static_cast<unsigned>(slices + (sinkhorn ? 1 : 0)));
      auto kern = hc == 4 ? hc_collapse_kernel<TI, TO, 4> : hc_collapse_kernel<TI, TO, 0>;
      kern<<<g2, kThreads, 0, s>>>(X.ptr<TI>(), xs, part, static_cast<int>(nchunk), hc, mix, D,
                                   p.base.f32(), p.scale.f32(), iters, hc_eps, norm_eps, sinkhorn,
                                   out.ptr<TO>(), out.stride, sinkhorn ? post.f32() : nullptr,
                                   sinkhorn ? post.stride : 0, sinkhorn ? comb.f32() : nullptr,
                                   sinkhorn ? comb.stride : 0);
    });
  });
  SP_CUDA_LAUNCH();
  return norm_threads > 0;
}

}  // namespace

int set_hc_fuse_max_tokens(int n) {
  return g_hc_fuse_max_tokens.exchange(std::clamp(n, 0, kHcFuseMaxTokens));
}

void hc_pre(cudaStream_t s, Workspace& ws, Tensor X, const HcWeights& p, int hc, int iters,
            float hc_eps, float norm_eps, Tensor x, Tensor post, Tensor comb) {
  SP_CHECK(post.dtype == DType::kF32 && comb.dtype == DType::kF32, "hc_pre: post/comb not f32");
  hc_launch(s, ws, X, p, hc, iters, hc_eps, norm_eps, false, x, post, comb);
}

void hc_pre_norm(cudaStream_t s, Workspace& ws, Tensor X, const HcWeights& p, int hc, int iters,
                 float hc_eps, float norm_eps, const Tensor* weight, Tensor x, Tensor xn,
                 Tensor post, Tensor comb) {
  SP_CHECK(post.dtype == DType::kF32 && comb.dtype == DType::kF32, "hc_pre: post/comb not f32");
  const float* w = weight ? weight->f32() : nullptr;
  if (!hc_launch(s, ws, X, p, hc, iters, hc_eps, norm_eps, false, x, post, comb, true, w, xn))
    rms_norm(s, x, weight, static_cast<int>(x.cols), norm_eps, xn);
}

void hc_head_norm(cudaStream_t s, Workspace& ws, Tensor X, const HcWeights& p, int hc, float hc_eps,
                  float norm_eps, const Tensor* weight, Tensor h) {
  const float* w = weight ? weight->f32() : nullptr;
  if (!hc_launch(s, ws, X, p, hc, 0, hc_eps, norm_eps, true, h, Tensor{}, Tensor{}, true, w, h))
    rms_norm(s, h, weight, static_cast<int>(h.cols), norm_eps, h);
}

void hc_head(cudaStream_t s, Workspace& ws, Tensor X, const HcWeights& p, int hc, float hc_eps,
             float norm_eps, Tensor h) {
  hc_launch(s, ws, X, p, hc, 0, hc_eps, norm_eps, true, h, Tensor{}, Tensor{});
}

void hc_post(cudaStream_t s, Tensor f, Tensor post, Tensor comb, int hc, Tensor X) {
  SP_CHECK(hc <= 16, "CUDA mHC supports hc_mult up to 16");
  const int64_t n = X.rows * f.cols;
  if (n == 0) return;
  dispatch_act(f.dtype, [&](auto tf) {
    dispatch_act(X.dtype, [&](auto tx) {
      using TF = decltype(tf);
      using TX = decltype(tx);
      auto kern = hc == 4 ? hc_post_kernel<TF, TX, 4> : hc_post_kernel<TF, TX, 0>;
      kern<<<grid_for(n), kThreads, 0, s>>>(f.ptr<TF>(), f.stride, post.f32(), post.stride,
                                            comb.f32(), comb.stride, hc, f.cols, X.ptr<TX>(),
                                            X.stride, n);
    });
  });
  SP_CUDA_LAUNCH();
}

void gather_rows(cudaStream_t s, Tensor x, const DevBatch& b, Tensor out) {
  SP_CHECK(x.dtype == out.dtype, "gather_rows: dtypes differ");
  const int64_t n = static_cast<int64_t>(b.num_logit_rows) * x.cols;
  if (n == 0) return;
  auto go = [&](auto tag) {
    using T = decltype(tag);
    gather_kernel<<<grid_for(n), kThreads, 0, s>>>(
        x.ptr<T>(), x.stride, b.logit_rows, b.num_logit_rows, x.cols, out.ptr<T>(), out.stride);
  };
  if (x.elem_size() == 4)
    go(float());
  else
    go(__nv_bfloat16());
  SP_CUDA_LAUNCH();
}

void copy(cudaStream_t s, Tensor src, Tensor dst) {
  SP_CHECK(src.rows == dst.rows && src.cols == dst.cols && src.dtype == dst.dtype, "copy shapes");
  if (src.numel() == 0) return;
  const size_t es = static_cast<size_t>(src.elem_size());
  SP_CUDA(cudaMemcpy2DAsync(dst.data, dst.stride * es, src.data, src.stride * es, src.cols * es,
                            src.rows, cudaMemcpyDeviceToDevice, s));
}

void copy_rows(cudaStream_t s, Tensor t, int64_t src_row, int64_t dst_row, int64_t n) {
  SP_CHECK(n >= 0 && src_row >= 0 && dst_row >= 0 && src_row + n <= t.rows &&
               dst_row + n <= t.rows && (src_row + n <= dst_row || dst_row + n <= src_row),
           "copy_rows ", src_row, " -> ", dst_row, " x ", n, " in ", t.rows, " rows");
  if (n == 0 || t.cols == 0) return;
  const size_t es = static_cast<size_t>(t.elem_size());
  auto* base = static_cast<uint8_t*>(t.data);
  const size_t pitch = static_cast<size_t>(t.stride) * es;
  if (t.contiguous()) {
    SP_CUDA(cudaMemcpyAsync(base + dst_row * pitch, base + src_row * pitch,
                            static_cast<size_t>(n * t.cols) * es, cudaMemcpyDeviceToDevice, s));
    return;
  }
  SP_CUDA(cudaMemcpy2DAsync(base + dst_row * pitch, pitch, base + src_row * pitch, pitch,
                            static_cast<size_t>(t.cols) * es, static_cast<size_t>(n),
                            cudaMemcpyDeviceToDevice, s));
}

void sample(cudaStream_t s, Workspace& ws, Tensor logits, const SampleSpec* specs_dev,
            const SampleSpec*, int n, int32_t* ids_dev) {
  SP_CHECK(logits.dtype == DType::kF32, "sample: logits must be f32");
  SP_CHECK(logits.cols < kNoId, "sample: vocab ", logits.cols, " over the int32 ids");
  if (n == 0 || logits.cols == 0) return;
  const int slices = static_cast<int>((logits.cols + kArgmaxSlice - 1) / kArgmaxSlice);
  // Sized for at least kArgmaxRowsFloor rows, so that sampling batches up to that size never grow
  // the workspace (a reallocation drops the recorded decode graphs).
  ArgBest* part = static_cast<ArgBest*>(
      ws.get(kWsArgmax, sizeof(ArgBest) * slices * std::max(n, kArgmaxRowsFloor)));
  const int vec = logits.stride % 4 == 0 && reinterpret_cast<uintptr_t>(logits.data) % 16 == 0;
  SP_CHECK(slices <= 65535, "sample: vocab ", logits.cols, " over ", 65535, " slices");
  argmax_slice_kernel<<<dim3(static_cast<unsigned>(n), static_cast<unsigned>(slices)),
                        kArgmaxThreads, 0, s>>>(logits.f32(), logits.stride, logits.cols, specs_dev,
                                                vec, part);
  SP_CUDA_LAUNCH();
  argmax_final_kernel<<<n, 32, 0, s>>>(logits.f32(), logits.stride, specs_dev, part, slices,
                                       ids_dev);
  SP_CUDA_LAUNCH();
}

namespace {

// The largest magnitude's bits of a part of the tensor (an exponent of all ones is a NaN or an
// Inf). Grid (column tiles, row groups): block (bx, by) reads columns [bx * tile, + tile) of rows
// by, by + gridDim.y, ..., each thread kNfPer elements or 4-value vectors of a row with all its
// loads in flight at once; one warp vote and one atomic per warp that saw a non-finite value.
// The launch depends on the shape only; the flag is an integer minimum, so the result is exact.
constexpr int kNfThreads = 256, kNfPer = 4, kNfMaxRowGroups = 1024;
__global__ void __launch_bounds__(kNfThreads)
    non_finite_kernel(const float* x, int64_t stride, int64_t rows, int64_t cols, bool vec4,
                      int32_t key, int32_t* flag) {
  __shared__ bool seen;  // read once per block, so the whole block returns or none of it
  if (threadIdx.x == 0) seen = *reinterpret_cast<volatile int32_t*>(flag) <= key;
  __syncthreads();
  if (seen) return;
  uint32_t m = 0;
  const int64_t tile = static_cast<int64_t>(kNfThreads) * kNfPer * (vec4 ? 4 : 1);
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * tile;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const float* row = x + r * stride;
    if (vec4) {
      float4 q[kNfPer];
#pragma unroll
      for (int j = 0; j < kNfPer; ++j) {
        const int64_t c = c0 + 4 * (threadIdx.x + j * static_cast<int64_t>(kNfThreads));
        q[j] = c < cols ? *reinterpret_cast<const float4*>(row + c) : make_float4(0, 0, 0, 0);
      }
#pragma unroll
      for (int j = 0; j < kNfPer; ++j)
        m = max(
            m,
            max(max(__float_as_uint(q[j].x) & 0x7fffffffu, __float_as_uint(q[j].y) & 0x7fffffffu),
                max(__float_as_uint(q[j].z) & 0x7fffffffu, __float_as_uint(q[j].w) & 0x7fffffffu)));
    } else {
      float q[kNfPer];
#pragma unroll
      for (int j = 0; j < kNfPer; ++j) {
        const int64_t c = c0 + threadIdx.x + j * static_cast<int64_t>(kNfThreads);
        q[j] = c < cols ? row[c] : 0.0f;
      }
#pragma unroll
      for (int j = 0; j < kNfPer; ++j) m = max(m, __float_as_uint(q[j]) & 0x7fffffffu);
    }
  }
  if (__any_sync(0xffffffffu, m >= 0x7f800000u) && threadIdx.x % 32 == 0) atomicMin(flag, key);
}

}  // namespace

void note_non_finite(cudaStream_t s, Tensor x, int32_t key, int32_t* flag) {
  SP_CHECK(x.dtype == DType::kF32, "note_non_finite: expected f32, got ", dtype_name(x.dtype));
  if (x.numel() == 0) return;
  const bool vec4 =
      x.cols % 4 == 0 && x.stride % 4 == 0 && reinterpret_cast<uintptr_t>(x.data) % 16 == 0;
  // Column tiles of kNfThreads * kNfPer elements (vectors: 4x that): a row of V4-Flash's residual
  // (16,384 values) is 4 blocks, a row of its logits (129,280) 32; rows go to blockIdx.y, at most
  // kNfMaxRowGroups of them (more rows: a block strides over them).
  const int64_t tile = int64_t{kNfThreads} * kNfPer * (vec4 ? 4 : 1);
  const dim3 grid(static_cast<unsigned>((x.cols + tile - 1) / tile),
                  static_cast<unsigned>(std::min<int64_t>(x.rows, kNfMaxRowGroups)));
  non_finite_kernel<<<grid, kNfThreads, 0, s>>>(x.f32(), x.stride, x.rows, x.cols, vec4, key, flag);
  SP_CUDA_LAUNCH();
}

}  // namespace sp::cuda
