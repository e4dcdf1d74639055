// Norms, rope, mHC mixing, copies and greedy sampling on the GPU. Activations are read as f32 or
// bf16 and every computation is fp32; reductions use a fixed tree (deterministic).
#include <cuda_bf16.h>

#include <algorithm>
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
  for (int j = 0; j < kNormVecs; ++j) {
    ss += v[j].x * v[j].x;
    ss += v[j].y * v[j].y;
    ss += v[j].z * v[j].z;
    ss += v[j].w * v[j].w;
  }
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

// mHC collapse. One block per token; the token's streams live in shared memory as fp32.
// mix = (2 + hc) * hc logits m = fn . normalised(u), then pre / post / Sinkhorn(comb), then
// x = sum_j pre_j u_j. With `head`, mix = hc and only pre is formed (hc_head).
template <typename TI, typename TO>
__global__ void hc_kernel(const TI* X, int64_t xs, const float* fn, const float* base,
                          const float* scale, int hc, int64_t D, int iters, float hc_eps,
                          float norm_eps, bool head, TO* out, int64_t os, float* post, int64_t ps,
                          float* comb, int64_t cs) {
  extern __shared__ float smem[];
  const int64_t W = hc * D;
  const int mix = head ? hc : (2 + hc) * hc;
  float* u = smem;        // [W]
  float* m = smem + W;    // [mix]
  float* pre = m + mix;   // [hc]
  float* red = pre + 16;  // [32]
  const int64_t t = blockIdx.x;
  const TI* src = X + t * xs;
  float ss = 0;
  for (int64_t k = threadIdx.x; k < W; k += blockDim.x) {
    float v = ld(src, k);
    u[k] = v;
    ss += v * v;
  }
  ss = block_sum(ss, red);
  const float r = 1.0f / sqrtf(ss / static_cast<float>(W) + norm_eps);
  // One warp per mixing logit (fixed lane order, then a fixed shuffle tree).
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = blockDim.x / 32;
  for (int j = warp; j < mix; j += nwarps) {
    const float* f = fn + static_cast<int64_t>(j) * W;
    float acc = 0;
    for (int64_t k = lane; k < W; k += 32) acc += (u[k] * r) * f[k];
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) m[j] = acc;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int j = 0; j < hc; ++j) pre[j] = sigmoidf(m[j] * scale[0] + base[j]) + hc_eps;
    if (!head) {
      for (int j = 0; j < hc; ++j)
        post[t * ps + j] = 2.0f * sigmoidf(m[hc + j] * scale[1] + base[hc + j]);
      float c[16 * 16];
      for (int j = 0; j < hc; ++j) {  // row softmax, then Sinkhorn
        float mx = -INFINITY;
        for (int k = 0; k < hc; ++k) {
          c[j * hc + k] = m[2 * hc + j * hc + k] * scale[2] + base[2 * hc + j * hc + k];
          mx = fmaxf(mx, c[j * hc + k]);
        }
        float s = 0;
        for (int k = 0; k < hc; ++k) s += (c[j * hc + k] = expf(c[j * hc + k] - mx));
        for (int k = 0; k < hc; ++k) c[j * hc + k] = c[j * hc + k] / s + hc_eps;
      }
      auto col_norm = [&] {
        for (int k = 0; k < hc; ++k) {
          float s = 0;
          for (int j = 0; j < hc; ++j) s += c[j * hc + k];
          for (int j = 0; j < hc; ++j) c[j * hc + k] /= s + hc_eps;
        }
      };
      auto row_norm = [&] {
        for (int j = 0; j < hc; ++j) {
          float s = 0;
          for (int k = 0; k < hc; ++k) s += c[j * hc + k];
          for (int k = 0; k < hc; ++k) c[j * hc + k] /= s + hc_eps;
        }
      };
      col_norm();
      for (int it = 0; it < iters - 1; ++it) {
        row_norm();
        col_norm();
      }
      for (int i = 0; i < hc * hc; ++i) comb[t * cs + i] = c[i];
    }
  }
  __syncthreads();
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float s = 0;
    for (int j = 0; j < hc; ++j) s += pre[j] * u[j * D + d];
    st(out + t * os, d, s);
  }
}

template <typename TF, typename TX>
__global__ void hc_post_kernel(const TF* f, int64_t fs, const float* post, int64_t ps,
                               const float* comb, int64_t cs, int hc, int64_t D, TX* X, int64_t xs,
                               int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / D, d = i % D;
    TX* x = X + t * xs;
    float in[16];
    for (int j = 0; j < hc; ++j) in[j] = ld(x, j * D + d);
    const float fv = ld(f + t * fs, d);
    const float* c = comb + t * cs;
    for (int k = 0; k < hc; ++k) {
      float s = 0;
      for (int j = 0; j < hc; ++j) s += c[j * hc + k] * in[j];
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
constexpr int kWsArgmax = 24;          // workspace slot: the slices' best [rows, slices]
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

// Pass 1: grid (slices, rows). vec: rows 16-byte aligned (float4 loads).
__global__ void __launch_bounds__(kArgmaxThreads)
    argmax_slice_kernel(const float* logits, int64_t ls, int64_t vocab, const SampleSpec* specs,
                        int vec, ArgBest* part) {
  __shared__ ArgBest sh[kArgmaxThreads / 32];
  if (specs[blockIdx.y].temperature > 0.0f) return;  // sampled on the host
  const float* row = logits + static_cast<int64_t>(specs[blockIdx.y].row) * ls;
  const int64_t s0 = static_cast<int64_t>(blockIdx.x) * kArgmaxSlice;
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
  if (threadIdx.x == 0) part[static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x] = {bv, bi};
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

void rms_norm(cudaStream_t s, Tensor x, const Tensor* weight, int group, float eps, Tensor y) {
  check_device(x, "rms_norm");
  const int groups = static_cast<int>(x.cols / group);
  const int64_t blocks = x.rows * groups;
  if (blocks == 0) return;
  const float* w = weight ? weight->f32() : nullptr;
  // The register path: groups of whole 4-value vectors that fit one block, every row and the weight
  // aligned for the vector loads. The block is as small as holds the group in kNormVecs vectors a
  // thread (a 4096-wide row: 256 threads, every load in flight at once).
  auto aligned = [](const Tensor& t) {
    return t.stride % 4 == 0 && reinterpret_cast<uintptr_t>(t.data) % (4 * t.elem_size()) == 0;
  };
  const bool vec = group % 4 == 0 && group <= 4 * kNormVecs * kNormMaxThreads && aligned(x) &&
                   aligned(y) && (!w || reinterpret_cast<uintptr_t>(w) % 16 == 0);
  const int nvec = group / 4;
  const int vec_threads =
      std::clamp(((nvec + kNormVecs - 1) / kNormVecs + 31) & ~31, 32, kNormMaxThreads);
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

void hc_launch(cudaStream_t s, Tensor X, const HcWeights& p, int hc, int iters, float hc_eps,
               float norm_eps, bool head, Tensor out, Tensor post, Tensor comb) {
  SP_CHECK(hc >= 1 && hc <= 16, "CUDA mHC supports hc_mult up to 16, got ", hc);
  if (X.rows == 0) return;
  const int64_t D = X.cols / hc;
  const int mix = head ? hc : (2 + hc) * hc;
  const size_t smem = (static_cast<size_t>(X.cols) + mix + 16 + 32) * sizeof(float);
  dispatch_act(X.dtype, [&](auto ti) {
    dispatch_act(out.dtype, [&](auto to) {
      using TI = decltype(ti);
      using TO = decltype(to);
      auto k = hc_kernel<TI, TO>;
      allow_dynamic_smem(reinterpret_cast<const void*>(k), smem);
      k<<<static_cast<unsigned>(X.rows), kThreads, smem, s>>>(
          X.ptr<TI>(), X.stride, p.fn.f32(), p.base.f32(), p.scale.f32(), hc, D, iters, hc_eps,
          norm_eps, head, out.ptr<TO>(), out.stride, head ? nullptr : post.f32(),
          head ? 0 : post.stride, head ? nullptr : comb.f32(), head ? 0 : comb.stride);
    });
  });
  SP_CUDA_LAUNCH();
}

}  // namespace

void hc_pre(cudaStream_t s, Workspace&, Tensor X, const HcWeights& p, int hc, int iters,
            float hc_eps, float norm_eps, Tensor x, Tensor post, Tensor comb) {
  SP_CHECK(post.dtype == DType::kF32 && comb.dtype == DType::kF32, "hc_pre: post/comb not f32");
  hc_launch(s, X, p, hc, iters, hc_eps, norm_eps, false, x, post, comb);
}

void hc_head(cudaStream_t s, Workspace&, Tensor X, const HcWeights& p, int hc, float hc_eps,
             float norm_eps, Tensor h) {
  hc_launch(s, X, p, hc, 0, hc_eps, norm_eps, true, h, Tensor{}, Tensor{});
}

void hc_post(cudaStream_t s, Tensor f, Tensor post, Tensor comb, int hc, Tensor X) {
  SP_CHECK(hc <= 16, "CUDA mHC supports hc_mult up to 16");
  const int64_t n = X.rows * f.cols;
  if (n == 0) return;
  dispatch_act(f.dtype, [&](auto tf) {
    dispatch_act(X.dtype, [&](auto tx) {
      using TF = decltype(tf);
      using TX = decltype(tx);
      hc_post_kernel<<<grid_for(n), kThreads, 0, s>>>(f.ptr<TF>(), f.stride, post.f32(),
                                                      post.stride, comb.f32(), comb.stride, hc,
                                                      f.cols, X.ptr<TX>(), X.stride, n);
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
  argmax_slice_kernel<<<dim3(static_cast<unsigned>(slices), static_cast<unsigned>(n)),
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
