// Routed and shared experts.
//
// One moe() call is four to fourteen launches over a chunk of up to 1024 tokens:
//   gate     logits = x gate^T (f32)                          linear()
//   route    per token: sqrt(softplus) scores, hash or biased top-k (ties to the lower id), weights
//   sort     a counting sort of the (token, slot) pairs by expert, tokens ascending inside an
//            expert; the shared expert is expert E and gets every token (route and sort are one
//            single-block launch up to 64 tokens)
//   up       h = silu(min(W1 x, L)) * clamp(W3 x, -L, L) for every token of every hit expert (the
//            tensor-core path first stages the tokens as bf16 hi + lo: moe_decode.cu)
//   down     o = W2 h
//   combine  y[t] = sum over the token's experts in ascending id of w * o, then + shared o
// Three pairs of up/down kernels, chosen per expert by its token count (so the result depends on
// the routing, never on the run):
// - decode (count <= dec_max, FP4 / FP8 experts only; with the tensor-core kernels on, the experts
//   below their minimum, ws.moe_tc_min_tokens; by default one token in a one-token step, none
//   in larger steps):
//   each warp owns whole rows (2 rows of W1 and W3, or 4 rows of W2) and streams them in 16-byte
//   chunks, every lane with 4-8 chunk loads (and their scales) in flight before any use; the
//   expert's tokens (up to 8) are staged in shared memory once per block, in f32, swizzled so a
//   quarter-warp's 16-byte reads hit distinct banks, and applied 1, 2 or 4 at a time (a template
//   parameter, so one token does not pay for four); a warp-shuffle reduction per row.
// - tensor cores (ws.moe_tc_min_tokens tokens or more, every expert FP4 / FP8 with E8M0 scales):
//   moe_decode.cu, mma.sync with the expert's rows as M and its tokens as N, persistent blocks
//   over a work list of (expert, row tile, token group) items built on the device.
// - general (larger counts of other formats): per (hit expert, 2 rows of W1/W3 or 4 rows of W2),
//   each weight chunk read once and applied to 8 tokens at a time, block-wide reductions.
// The decode and general grids are sized for the most experts a step can hit; blocks of slots past
// the hit count exit.
// Every sum has a fixed order (no float atomics), so results are bitwise reproducible.
#include <algorithm>
#include <limits>
#include <mutex>
#include <vector>

#include "backend/cuda/gemm_core.cuh"
#include "backend/cuda/moe_decode.cuh"

namespace sp::cuda {
namespace {

// Device tables live until exit (one per MoE layer, allocated once at load).
struct TableRegistry {
  std::mutex mu;
  std::vector<void*> ptrs;
  std::vector<bool> dec_ok;  // per table: every expert FP4 / FP8 (the decode kernels' formats)
  std::vector<bool> tc_ok;   // per table: the tensor-core kernels' formats (tc_experts_ok)
  ~TableRegistry() {
    for (void* p : ptrs) cudaFree(p);  // errors at exit (context gone) are ignored
  }
};
TableRegistry& registry() {
  static TableRegistry r;
  return r;
}

constexpr int64_t kTokenChunk = 1024;
constexpr int kMaxTopK = 16;
constexpr int kUpRows = 2, kDownRows = 4, kTok = 8;

// torch.nn.functional.softplus (beta 1, threshold 20).
__device__ __forceinline__ float softplus_dev(float x) {
  return x > 20.0f ? x : log1pf(expf(x));
}

// One block per token. eidx/ew: [T, K] in selection order (as the CPU).
__global__ void moe_route_kernel(const float* logits, int E, int K, int hash,
                                 const int32_t* tid2eid, const int32_t* ids, const float* bias,
                                 float routed_scale, int32_t* eidx, float* ew) {
  extern __shared__ float sm[];
  float* s = sm;
  float* biased = sm + E;
  __shared__ int chosen[kMaxTopK];
  __shared__ float wbest[32];
  __shared__ int ibest[32];
  const int64_t t = blockIdx.x;
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    s[e] = sqrtf(softplus_dev(logits[t * E + e]));
    if (!hash) biased[e] = s[e] + bias[e] != s[e] + bias[e] ? -INFINITY : s[e] + bias[e];  // NaN
  }
  __syncthreads();
  if (hash) {
    if (threadIdx.x < K)
      chosen[threadIdx.x] = tid2eid[static_cast<int64_t>(ids[t]) * K + threadIdx.x];
  } else {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int j = 0; j < K; ++j) {
      float bv = -INFINITY;
      int bi = 0x7fffffff;
      for (int e = threadIdx.x; e < E; e += blockDim.x) {
        const float v = biased[e];
        if (v > bv || (v == bv && e < bi)) bv = v, bi = e;
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) bv = ov, bi = oi;
      }
      if (lane == 0) wbest[warp] = bv, ibest[warp] = bi;
      __syncthreads();
      if (threadIdx.x == 0) {
        float v = wbest[0];
        int i = ibest[0];
        for (int w = 1; w < nw; ++w)
          if (wbest[w] > v || (wbest[w] == v && ibest[w] < i)) v = wbest[w], i = ibest[w];
        chosen[j] = i;
        biased[i] = -INFINITY;
      }
      __syncthreads();
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float sum = 0.0f;
    for (int j = 0; j < K; ++j) sum += s[chosen[j]];
    for (int j = 0; j < K; ++j) {
      eidx[t * K + j] = chosen[j];
      ew[t * K + j] = s[chosen[j]] / (sum + 1e-20f) * routed_scale;
    }
  }
}

// meta: cnt[E + 1] | off[E + 1] | act[E + 1] | nact. Pairs: routed p = t * K + j, shared
// p = T * K + t; pairs[pos] = p sorted by (expert, token); pos_of[p] = pos. cnt, off: shared
// [E + 1] each. Counts are integer atomics (exact); offsets and the active list are one warp's
// scan over the experts in order.
__device__ __forceinline__ void sort_pairs(const int32_t* eidx, int T, int K, int E, int* meta,
                                           int* pairs, int* pos_of, int* cnt, int* off) {
  const int TK = T * K;
  for (int e = threadIdx.x; e <= E; e += blockDim.x) cnt[e] = e == E ? T : 0;
  __syncthreads();
  for (int p = threadIdx.x; p < TK; p += blockDim.x) atomicAdd(&cnt[eidx[p]], 1);  // integers
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  if (warp == 0) {
    const int n = E + 1, per = (n + 31) / 32, e0 = lane * per, e1 = e0 + per < n ? e0 + per : n;
    int sum = 0, act = 0;
    for (int e = e0; e < e1; ++e) sum += cnt[e], act += cnt[e] > 0 ? 1 : 0;
    int isum = sum, iact = act;  // inclusive scans over the lanes
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int ys = __shfl_up_sync(0xffffffffu, isum, o);
      const int ya = __shfl_up_sync(0xffffffffu, iact, o);
      if (lane >= o) isum += ys, iact += ya;
    }
    int o = isum - sum, na = iact - act;
    for (int e = e0; e < e1; ++e) {
      off[e] = o;
      meta[e] = cnt[e];
      meta[E + 1 + e] = o;
      o += cnt[e];
      if (cnt[e] > 0) meta[2 * (E + 1) + na++] = e;
    }
    if (lane == 31) meta[3 * (E + 1)] = iact;
  }
  __syncthreads();
  for (int e = warp; e < E; e += nw) {
    if (cnt[e] == 0) continue;
    int base = off[e];
    for (int p0 = 0; p0 < TK; p0 += 32) {
      const int p = p0 + lane;
      const bool pred = p < TK && eidx[p] == e;
      const unsigned mask = __ballot_sync(0xffffffffu, pred);
      if (pred) {
        const int r = base + __popc(mask & ((1u << lane) - 1u));
        pairs[r] = p;
        pos_of[p] = r;
      }
      base += __popc(mask);
    }
  }
  for (int t = threadIdx.x; t < T; t += blockDim.x) {
    const int r = off[E] + t;
    pairs[r] = TK + t;
    pos_of[TK + t] = r;
  }
}

__global__ void moe_sort_kernel(const int32_t* eidx, int T, int K, int E, int* meta, int* pairs,
                                int* pos_of) {
  extern __shared__ int sh[];
  sort_pairs(eidx, T, K, E, meta, pairs, pos_of, sh, sh + E + 1);
}

// Routing of tokens warp, warp + nw, ... by the warps of one block (the same selection and
// weights as moe_route_kernel: the best biased score, ties to the lower id, K times; weights
// summed in selection order). bs: shared [nw][E] floats. Logits are read through L2 (another
// block of the same launch may have written them).
// kShared: logits and bias in this block's shared memory (plain loads). A lane's scores are loaded
// at once (E <= 32 * kRouteLaneScores, which both callers check), not one L2 round trip each.
constexpr int kRouteLaneScores = 16;
template <bool kShared = false>
__device__ __forceinline__ void route_tokens(const float* logits, int T, int E, int K, int hash,
                                             const int32_t* tid2eid, const int32_t* ids,
                                             const float* bias, float routed_scale, int32_t* eidx,
                                             float* ew, float* sm) {
  auto logit = [](const float* p) {
    if constexpr (kShared)
      return *p;
    else
      return __ldcg(p);
  };
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  float* bs = sm + warp * E;
  for (int t = warp; t < T; t += nw) {
    const float* lg = logits + static_cast<int64_t>(t) * E;
    int chosen = 0;  // lane j < K: the j-th choice
    if (hash) {
      if (lane < K) chosen = tid2eid[static_cast<int64_t>(ids[t]) * K + lane];
    } else {
      // A NaN score selects like -inf (the lowest ids): an index always comes out; the NaN
      // itself reaches the routing weights and the non-finite check names the layer.
      float lv[kRouteLaneScores], lb[kRouteLaneScores];
#pragma unroll
      for (int i = 0; i < kRouteLaneScores; ++i) {
        const int e = lane + 32 * i;
        lv[i] = e < E ? logit(lg + e) : 0.0f;
        lb[i] = e < E ? bias[e] : 0.0f;
      }
#pragma unroll
      for (int i = 0; i < kRouteLaneScores; ++i) {
        const int e = lane + 32 * i;
        if (e >= E) break;
        const float v = sqrtf(softplus_dev(lv[i])) + lb[i];
        bs[e] = v != v ? -INFINITY : v;
      }
      __syncwarp();
      for (int j = 0; j < K; ++j) {
        float bv = -INFINITY;
        int bi = 0x7fffffff;
        for (int e = lane; e < E; e += 32) {
          const float v = bs[e];
          if (v > bv || (v == bv && e < bi)) bv = v, bi = e;
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
          const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
          const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
          if (ov > bv || (ov == bv && oi < bi)) bv = ov, bi = oi;
        }
        if (lane == j) chosen = bi;
        __syncwarp();
        if (lane == 0) bs[bi] = -INFINITY;
        __syncwarp();
      }
    }
    const float sj = lane < K ? sqrtf(softplus_dev(logit(lg + chosen))) : 0.0f;
    float sum = 0.0f;
    for (int j = 0; j < K; ++j) sum += __shfl_sync(0xffffffffu, sj, j);
    if (lane < K) {
      eidx[t * K + lane] = chosen;
      ew[t * K + lane] = sj / (sum + 1e-20f) * routed_scale;
    }
    __syncwarp();
  }
  __syncthreads();  // eidx (global) written by this block is visible to it after the barrier
}

// Small steps: routing and the sort in one block. shared: [nw][E] floats.
constexpr int kRouteSortThreads = 512, kRouteSortMaxE = 512, kRouteSortMaxT = 64;
static_assert(kRouteSortMaxE <= 32 * kRouteLaneScores, "route_tokens' per-lane scores");
__global__ void __launch_bounds__(kRouteSortThreads)
    moe_route_sort_kernel(const float* logits, int T, int E, int K, int hash,
                          const int32_t* tid2eid, const int32_t* ids, const float* bias,
                          float routed_scale, int32_t* eidx, float* ew, int* meta, int* pairs,
                          int* pos_of) {
  extern __shared__ float sm[];
  route_tokens(logits, T, E, K, hash, tid2eid, ids, bias, routed_scale, eidx, ew, sm);
  int* sh = reinterpret_cast<int*>(sm);
  sort_pairs(eidx, T, K, E, meta, pairs, pos_of, sh, sh + E + 1);
}

// Decode steps (T <= 8, BF16 or F32 gate with 16-byte aligned rows): the gate GEMV, then routing
// and the sort by the last block to finish, in one launch. The GEMV is spread over a grid of (row
// groups, K slices): warp w of block (b, s) owns gate row kGateRows * b + w over the chunks of
// slice s (at most 32 * kGateLaneChunks chunks: every lane's loads in flight at once), each chunk
// applied to the T tokens read through L1; a warp-shuffle sum into the partials [slices, T, E].
// The last block (an integer counter, reset by that block) sums each logit's partials in slice
// order into shared memory, routes (a warp per token, from shared memory) and sorts. Every sum has
// a fixed order, so the bits depend on the shapes only.
constexpr int kGateThreads = 256, kGateMaxT = 8, kGateRows = kGateThreads / 32;
constexpr int kGateLaneChunks = 4;
struct GateRouteArgs {
  DevMat gate;
  const void* x = nullptr;  // [T, ldx]
  int64_t ldx = 0;
  int xvec = 0;
  int T = 0, E = 0, K = 0, hash = 0;
  const int32_t* tid2eid = nullptr;
  const int32_t* ids = nullptr;
  const float* bias = nullptr;
  float routed_scale = 0.0f;
  float* part = nullptr;     // [slices, T, E]
  int64_t slice_chunks = 0;  // 16-byte chunks of a row per K slice
  int32_t* eidx = nullptr;
  float* ew = nullptr;
  int *meta = nullptr, *pairs = nullptr, *pos_of = nullptr;
  unsigned* counter = nullptr;  // 0 between launches
};

template <int F, typename XT>
__global__ void __launch_bounds__(kGateThreads) moe_gate_route_kernel(GateRouteArgs a) {
  __shared__ float lgs[kGateMaxT * kRouteSortMaxE];  // the logits [T, E]
  __shared__ float bias_s[kRouteSortMaxE];
  __shared__ float sm[kGateRows * kRouteSortMaxE];  // routing's scores; then the sort's counts
  __shared__ bool last;
  constexpr int V = FmtTraits<F>::kVals;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kGateRows + warp;
  if (n < a.E) {
    const int64_t K = a.gate.in, nch = (K + V - 1) / V;
    const int64_t c0 = static_cast<int64_t>(blockIdx.y) * a.slice_chunks;
    const int64_t c1 = c0 + a.slice_chunks < nch ? c0 + a.slice_chunks : nch;
    const uint8_t* row = a.gate.data + n * a.gate.row_bytes;
    float acc[kGateMaxT];
#pragma unroll
    for (int m = 0; m < kGateMaxT; ++m) acc[m] = 0.0f;
    uint4 wc[kGateLaneChunks];
#pragma unroll
    for (int u = 0; u < kGateLaneChunks; ++u) {
      const int64_t c = c0 + lane + 32 * u;
      wc[u] = c < c1 ? ld_chunk(row, c * 16, a.gate.row_bytes, true) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kGateLaneChunks; ++u) {
      const int64_t c = c0 + lane + 32 * u;
      if (c >= c1) break;
#pragma unroll
      for (int m = 0; m < kGateMaxT; ++m) {
        if (m >= a.T) break;
        const XT* xr = static_cast<const XT*>(a.x) + m * a.ldx;
#pragma unroll
        for (int p = 0; p < V / 4; ++p) {
          float wv[4], xv[4];
          decode4<F>(wc[u], p, 1.0f, wv);
          load_x4(xr, V * c + 4 * p, K, a.xvec != 0, xv);
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[m] = fmaf(wv[i], xv[i], acc[m]);
        }
      }
    }
#pragma unroll
    for (int m = 0; m < kGateMaxT; ++m) {
      if (m >= a.T) break;
      const float v = warp_sum(acc[m]);
      if (lane == 0) a.part[(static_cast<int64_t>(blockIdx.y) * a.T + m) * a.E + n] = v;
    }
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(a.counter, 1u) == gridDim.x * gridDim.y - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  if (threadIdx.x == 0) *a.counter = 0;
  const int TE = a.T * a.E, slices = static_cast<int>(gridDim.y);
  for (int i = threadIdx.x; i < TE; i += blockDim.x) {
    float v = 0.0f;
    for (int k = 0; k < slices; ++k) v += __ldcg(a.part + static_cast<int64_t>(k) * TE + i);
    lgs[i] = v;
  }
  if (!a.hash)
    for (int e = threadIdx.x; e < a.E; e += blockDim.x) bias_s[e] = a.bias[e];
  __syncthreads();
  route_tokens<true>(lgs, a.T, a.E, a.K, a.hash, a.tid2eid, a.ids, bias_s, a.routed_scale, a.eidx,
                     a.ew, sm);
  int* sh = reinterpret_cast<int*>(sm);
  sort_pairs(a.eidx, a.T, a.K, a.E, a.meta, a.pairs, a.pos_of, sh, sh + a.E + 1);
}

struct ExpertArgs {
  const DevExpert* tab = nullptr;  // [E + 1]
  const void* x = nullptr;         // up: tokens [T, ldx]; down: h
  int64_t ldx = 0;
  int xvec = 0;
  const int* meta = nullptr;
  const int* pairs = nullptr;
  int T = 0, K = 0, E = 0;
  float* out = nullptr;  // up: h [pairs, ldo]; down: o [pairs, ldo]
  int64_t ldo = 0;
  float limit = 0.0f;
  int dec_max = 0;  // the general kernels skip experts of at most dec_max tokens (decode path's)
};

template <int R, int MT, typename XT>
__device__ __forceinline__ void accum_any(const DevMat& w, int64_t n0, int nv,
                                          const XT* const (&xr)[MT], bool xvec,
                                          float (&acc)[R][MT]) {
  switch (w.fmt) {
    case kWF32:
      gemv_accum<kWF32, R, MT, XT>(w, n0, nv, xr, xvec, acc);
      break;
    case kWBF16:
      gemv_accum<kWBF16, R, MT, XT>(w, n0, nv, xr, xvec, acc);
      break;
    case kWF16:
      gemv_accum<kWF16, R, MT, XT>(w, n0, nv, xr, xvec, acc);
      break;
    case kWFP8:
      gemv_accum<kWFP8, R, MT, XT>(w, n0, nv, xr, xvec, acc);
      break;
    default:
      gemv_accum<kWFP4, R, MT, XT>(w, n0, nv, xr, xvec, acc);
      break;
  }
}

template <typename XT>
__global__ void __launch_bounds__(256) moe_up_kernel(ExpertArgs a) {
  constexpr int R = kUpRows, MT = kTok;
  __shared__ float red[32 * R * MT];
  __shared__ float sums[2 * R * MT];
  const int E1 = a.E + 1;
  if (static_cast<int>(blockIdx.y) >= a.meta[3 * E1]) return;
  const int e = a.meta[2 * E1 + blockIdx.y];
  const DevMat w1 = a.tab[e].w1, w3 = a.tab[e].w3;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * R;
  if (n0 >= w1.out) return;
  const int nv = static_cast<int>(w1.out - n0 < R ? w1.out - n0 : R);
  const int count = a.meta[e], start = a.meta[E1 + e];
  if (count <= a.dec_max) return;
  const int TK = a.T * a.K;
  for (int m0 = 0; m0 < count; m0 += MT) {
    const XT* xr[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      xr[m] = nullptr;
      if (m0 + m < count) {
        const int p = a.pairs[start + m0 + m];
        const int64_t t = p < TK ? p / a.K : p - TK;
        xr[m] = static_cast<const XT*>(a.x) + t * a.ldx;
      }
    }
    float acc1[R][MT], acc3[R][MT];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int m = 0; m < MT; ++m) acc1[r][m] = acc3[r][m] = 0.0f;
    accum_any<R, MT, XT>(w1, n0, nv, xr, a.xvec != 0, acc1);
    accum_any<R, MT, XT>(w3, n0, nv, xr, a.xvec != 0, acc3);
    block_sum<R, MT>(acc1, red, sums);
    block_sum<R, MT>(acc3, red, sums + R * MT);
    if (threadIdx.x < R * MT) {
      const int r = threadIdx.x / MT, m = threadIdx.x % MT;
      if (r < nv && m0 + m < count) {
        const float gt = fminf(sums[threadIdx.x], a.limit);
        const float up = fminf(fmaxf(sums[R * MT + threadIdx.x], -a.limit), a.limit);
        a.out[(start + m0 + m) * a.ldo + n0 + r] = gt * (1.0f / (1.0f + expf(-gt))) * up;
      }
    }
  }
}

__global__ void __launch_bounds__(256) moe_down_kernel(ExpertArgs a) {
  constexpr int R = kDownRows, MT = kTok;
  __shared__ float red[32 * R * MT];
  __shared__ float sums[R * MT];
  const int E1 = a.E + 1;
  if (static_cast<int>(blockIdx.y) >= a.meta[3 * E1]) return;
  const int e = a.meta[2 * E1 + blockIdx.y];
  const DevMat w2 = a.tab[e].w2;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * R;
  if (n0 >= w2.out) return;
  const int nv = static_cast<int>(w2.out - n0 < R ? w2.out - n0 : R);
  const int count = a.meta[e], start = a.meta[E1 + e];
  if (count <= a.dec_max) return;
  const float* h = static_cast<const float*>(a.x);
  for (int m0 = 0; m0 < count; m0 += MT) {
    const float* xr[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m)
      xr[m] = m0 + m < count ? h + static_cast<int64_t>(start + m0 + m) * a.ldx : nullptr;
    float acc[R][MT];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int m = 0; m < MT; ++m) acc[r][m] = 0.0f;
    accum_any<R, MT, float>(w2, n0, nv, xr, a.xvec != 0, acc);
    block_sum<R, MT>(acc, red, sums);
    if (threadIdx.x < R * MT) {
      const int r = threadIdx.x / MT, m = threadIdx.x % MT;
      if (r < nv && m0 + m < count) a.out[(start + m0 + m) * a.ldo + n0 + r] = sums[threadIdx.x];
    }
  }
}

// ---- decode path -------------------------------------------------------------------------------

constexpr int kDecThreads = 256, kDecWarps = kDecThreads / 32;
constexpr int kDecMaxTok = 8;      // most tokens per expert the decode kernels take
constexpr int kDecUpRows = 2;      // rows of W1 (and of W3) per warp step
constexpr int kDecDownRows = 4;    // rows of W2 per warp step
constexpr int kDecUpBlock = 16;    // a block's W1/W3 rows: a multiple of kDecWarps * 2
constexpr int kDecDownBlock = 32;  // a block's W2 rows: a multiple of kDecWarps * 4
constexpr int64_t kDecUpMinRows = 64, kDecDownMinRows = 128;
constexpr int64_t kDecTargetBlocks = 264;       // two per SM of an H100 / H200 (132 SMs)
constexpr int64_t kDecSmemBudget = 160 * 1024;  // staged activations per block, bytes

// An activation row of kpad floats is staged in shared memory with float4 slot f at
// swz(f): the low 3 bits XOR bits 3..5, so the 8 lanes of a quarter-warp reading chunks c..c+7
// (each lane 16 bytes of its own chunk, at the same offset) hit 8 different bank groups.
__device__ __forceinline__ int swz(int f) {
  return (f & ~7) | ((f & 7) ^ ((f >> 3) & 7));
}

// Starts moving [p, p + bytes) into L2 (no registers held; skipped unless 16-byte aligned).
__device__ __forceinline__ void prefetch_l2(const void* p, int64_t bytes) {
  if (((reinterpret_cast<uintptr_t>(p) | static_cast<uintptr_t>(bytes)) & 15) != 0 || bytes <= 0)
    return;
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p),
               "r"(static_cast<uint32_t>(bytes))
               : "memory");
}

// Lane l < 2 G R of a warp prefetches rows [n0, n0 + R) of matrix g (their values, then their
// scale rows), so a warp step's loads find them in L2: issued one step ahead.
template <int R>
__device__ __forceinline__ void prefetch_rows(const DevMat& w, int g, int64_t n0, int64_t n_end) {
  const int lane = threadIdx.x & 31;
  const int i = lane - 2 * R * g;
  if (i < 0 || i >= 2 * R || n0 + i % R >= n_end) return;
  const int64_t n = n0 + i % R;
  if (i < R) {
    prefetch_l2(w.data + n * w.row_bytes, w.row_bytes);
  } else {
    const int esize = w.scale_f32 ? 4 : 1;
    if (w.fmt == kWFP4)
      prefetch_l2(w.scale + n * w.scale_cols * esize, w.scale_cols * esize);
    else if (i == R)
      prefetch_l2(w.scale + (n / 128) * w.scale_cols * esize, w.scale_cols * esize);
  }
}

// The values of one 32-bit word of a chunk, in order, without the chunk's scale (applied once
// per chunk and token instead, or to the decoded values). FP8: 4 values (e4m3 -> f16 exact).
// FP4: 8 values times 2^-14 (chunk_scale carries the 2^14): e2m1 (s e e m) placed at f16 bits
// 15 and 11..9 is that f16 (normals and the 0.5 subnormal alike). Values i and i + 4 sit at the
// same place in the word's two 16-bit halves, so one shift and mask pair builds both halves of
// an f16 pair.
template <int F>
__device__ __forceinline__ void dec_word(uint32_t w, float (&v)[F == kWFP4 ? 8 : 4]) {
  if constexpr (F == kWFP8) {
    const __half2_raw lo = __nv_cvt_fp8x2_to_halfraw2(w & 0xffff, __NV_E4M3);
    const __half2_raw hi = __nv_cvt_fp8x2_to_halfraw2(w >> 16, __NV_E4M3);
    const float2 fl = __half22float2(*reinterpret_cast<const __half2*>(&lo));
    const float2 fh = __half22float2(*reinterpret_cast<const __half2*>(&hi));
    v[0] = fl.x;
    v[1] = fl.y;
    v[2] = fh.x;
    v[3] = fh.y;
  } else {
    const uint32_t h04 = ((w & 0x00070007u) << 9) | ((w & 0x00080008u) << 12);
    const uint32_t h15 = ((w & 0x00700070u) << 5) | ((w & 0x00800080u) << 8);
    const uint32_t h26 = ((w & 0x07000700u) << 1) | ((w & 0x08000800u) << 4);
    const uint32_t h37 = ((w & 0x70007000u) >> 3) | (w & 0x80008000u);
    const float2 f04 = __half22float2(*reinterpret_cast<const __half2*>(&h04));
    const float2 f15 = __half22float2(*reinterpret_cast<const __half2*>(&h15));
    const float2 f26 = __half22float2(*reinterpret_cast<const __half2*>(&h26));
    const float2 f37 = __half22float2(*reinterpret_cast<const __half2*>(&h37));
    v[0] = f04.x;
    v[4] = f04.y;
    v[1] = f15.x;
    v[5] = f15.y;
    v[2] = f26.x;
    v[6] = f26.y;
    v[3] = f37.x;
    v[7] = f37.y;
  }
}

// G matrices of the same shape and format (W1 and W3, or W2), rows [n0, n0 + R) of each (rows r
// >= nv are past the matrix).
template <int G>
struct RowGroup {
  const uint8_t* row[G];    // row n0 of each matrix
  const uint8_t* scale[G];  // its scale row: FP4 [in / 32], FP8 the row block's [in / 128]
  int64_t row_bytes = 0;
  int64_t scale_step = 0;  // bytes from one row's scales to the next row's (FP8: 0, one block)
  int64_t K = 0;
  int nv = 0;
  bool vec = false, scale_f32 = false;
};

template <int G>
__device__ __forceinline__ void set_rows(RowGroup<G>& rg, int g, const DevMat& w, int64_t n0,
                                         int nv) {
  const int esize = w.scale_f32 ? 4 : 1;
  rg.row[g] = w.data + n0 * w.row_bytes;
  rg.scale[g] = w.scale + (w.fmt == kWFP4 ? n0 : n0 / 128) * w.scale_cols * esize;
  rg.row_bytes = w.row_bytes;
  rg.scale_step = w.fmt == kWFP4 ? w.scale_cols * esize : 0;
  rg.K = w.in;
  rg.nv = nv;
  rg.vec = g == 0 ? w.vec != 0 : rg.vec && w.vec != 0;
  rg.scale_f32 = w.scale_f32 != 0;
}

// acc[g * R + r][m] += row r of matrix g . x_m for the NT staged activation rows xs[m * kpad..].
// Lane l takes chunks l, l + 32, ... in order, U per row loaded (with their scales) before any
// is used. NT <= 2 sums each chunk unscaled and then adds scale * partial (one multiply per chunk
// and token instead of one per value; exact for E8M0 scales up to the rounding of the partial
// sums); larger NT scales the decoded weights (fewer registers).
template <int F, int G, int R, int U, int NT>
__device__ __forceinline__ void dec_accum(const RowGroup<G>& rg, const float* xs, int kpad,
                                          float (&acc)[G * R][NT]) {
  constexpr int S = G * R, V = FmtTraits<F>::kVals, P = V / 4;
  constexpr bool kDefer = NT <= 2;
  const int lane = threadIdx.x & 31;
  const int64_t nchunks = (rg.K + V - 1) / V;
  // Shared-memory float offset of float4 p of this lane's chunks (see swz; chunks c = lane + 32j
  // all have the same low bits).
  const int hsw = ((lane * P) >> 3) & 7, lsw = (lane * P) & 7;
  for (int64_t cb = 0; cb < nchunks; cb += 32 * U) {
    uint4 wc[U][S];
    float sc[U][S];
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int s = 0; s < S; ++s) {
        const int g = s / R, r = s % R;
        const int64_t c = cb + lane + 32 * u;
        wc[u][s] = make_uint4(0, 0, 0, 0);
        sc[u][s] = 0.0f;
        if (r < rg.nv && c < nchunks) {
          wc[u][s] = ld_chunk(rg.row[g] + r * rg.row_bytes, c * 16, rg.row_bytes, rg.vec);
          const int64_t si = F == kWFP4 ? c : c / 8;  // FP8: 8 chunks of 16 per 128-block
          const uint8_t* sp = rg.scale[g] + r * rg.scale_step;
          const float v = rg.scale_f32 ? __ldg(reinterpret_cast<const float*>(sp) + si)
                                       : e8m0_dev(__ldg(sp + si));
          sc[u][s] = F == kWFP4 ? v * 16384.0f : v;
        }
      }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t c = cb + lane + 32 * u;
      if (c >= nchunks) continue;
      const float* xc = xs + ((c * P) & ~int64_t{7}) * 4;
      float part[S][NT];
      if constexpr (kDefer) {
#pragma unroll
        for (int s = 0; s < S; ++s)
#pragma unroll
          for (int m = 0; m < NT; ++m) part[s][m] = 0.0f;
      }
#pragma unroll
      for (int q = 0; q < 4; ++q) {  // the chunk's 32-bit words: 8 FP4 or 4 FP8 values each
        constexpr int VW = F == kWFP4 ? 8 : 4;
        float wv[S][VW];
#pragma unroll
        for (int s = 0; s < S; ++s) {
          dec_word<F>(word_of(wc[u][s], q), wv[s]);
          if constexpr (!kDefer) {
#pragma unroll
            for (int i = 0; i < VW; ++i) wv[s][i] *= sc[u][s];
          }
        }
#pragma unroll
        for (int hf = 0; hf < VW / 4; ++hf) {
          const int off = 4 * ((lsw + q * (VW / 4) + hf) ^ hsw);
#pragma unroll
          for (int m = 0; m < NT; ++m) {
            const float4 xv = *reinterpret_cast<const float4*>(xc + m * kpad + off);
#pragma unroll
            for (int s = 0; s < S; ++s) {
              float& d = kDefer ? part[s][m] : acc[s][m];
              d = fmaf(wv[s][4 * hf + 0], xv.x, d);
              d = fmaf(wv[s][4 * hf + 1], xv.y, d);
              d = fmaf(wv[s][4 * hf + 2], xv.z, d);
              d = fmaf(wv[s][4 * hf + 3], xv.w, d);
            }
          }
        }
      }
      if constexpr (kDefer) {
#pragma unroll
        for (int s = 0; s < S; ++s)
#pragma unroll
          for (int m = 0; m < NT; ++m) acc[s][m] = fmaf(part[s][m], sc[u][s], acc[s][m]);
      }
    }
  }
}

struct DecArgs {
  const DevExpert* tab = nullptr;  // [E + 1]
  const void* x = nullptr;         // up: tokens [T, ldx] (XT); down: h [pairs, ldx] f32
  int64_t ldx = 0;
  int xvec = 0;
  const int* meta = nullptr;
  const int* pairs = nullptr;
  int T = 0, K = 0, E = 0;
  float* out = nullptr;  // up: h [pairs, ldo]; down: o [pairs, ldo]
  int64_t ldo = 0;
  float limit = 0.0f;
  int dec_max = 0;         // experts with more tokens are left to the general kernels
  int rows_per_block = 0;  // multiple of kDecUpBlock (up) / kDecDownBlock (down)
  int kpad = 0;            // floats per staged row: >= every expert's in, rounded up to 32
};

// Up rows [n_begin, n_end) of one expert: 2 rows of W1 and W3 per warp step, SwiGLU fused. The
// tokens go NT at a time; a second pass over a step's rows re-reads them from L2.
template <int F, int NT>
__device__ __forceinline__ void dec_up_rows(const DecArgs& a, const DevMat& w1, const DevMat& w3,
                                            int count, int start, const float* xs, int64_t n_begin,
                                            int64_t n_end) {
  constexpr int R = kDecUpRows, S = 2 * R, U = NT <= 2 ? 2 : 1;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t n0 = n_begin + warp * R; n0 < n_end; n0 += kDecWarps * R) {
    const int nv = static_cast<int>(n_end - n0 < R ? n_end - n0 : R);
    prefetch_rows<R>(w1, 0, n0 + kDecWarps * R, n_end);
    prefetch_rows<R>(w3, 1, n0 + kDecWarps * R, n_end);
    RowGroup<2> rg;
    set_rows(rg, 0, w1, n0, nv);
    set_rows(rg, 1, w3, n0, nv);
    for (int m0 = 0; m0 < count; m0 += NT) {
      float acc[S][NT];
#pragma unroll
      for (int s = 0; s < S; ++s)
#pragma unroll
        for (int m = 0; m < NT; ++m) acc[s][m] = 0.0f;
      dec_accum<F, 2, R, U, NT>(rg, xs + m0 * a.kpad, a.kpad, acc);
#pragma unroll
      for (int s = 0; s < S; ++s)
#pragma unroll
        for (int m = 0; m < NT; ++m) acc[s][m] = warp_sum(acc[s][m]);
      if (lane == 0) {
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int m = 0; m < NT; ++m) {
            if (r >= nv || m0 + m >= count) continue;
            const float gt = fminf(acc[r][m], a.limit);
            const float up = fminf(fmaxf(acc[R + r][m], -a.limit), a.limit);
            a.out[(start + m0 + m) * a.ldo + n0 + r] = gt * (1.0f / (1.0f + expf(-gt))) * up;
          }
      }
    }
  }
}

// Down rows [n_begin, n_end) of one expert: 4 rows of W2 per warp step, NT tokens a pass.
template <int F, int NT>
__device__ __forceinline__ void dec_down_rows(const DecArgs& a, const DevMat& w2, int count,
                                              int start, const float* xs, int64_t n_begin,
                                              int64_t n_end) {
  constexpr int R = kDecDownRows, U = NT <= 2 ? 2 : 1;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t n0 = n_begin + warp * R; n0 < n_end; n0 += kDecWarps * R) {
    const int nv = static_cast<int>(n_end - n0 < R ? n_end - n0 : R);
    prefetch_rows<R>(w2, 0, n0 + kDecWarps * R, n_end);
    RowGroup<1> rg;
    set_rows(rg, 0, w2, n0, nv);
    for (int m0 = 0; m0 < count; m0 += NT) {
      float acc[R][NT];
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int m = 0; m < NT; ++m) acc[r][m] = 0.0f;
      dec_accum<F, 1, R, U, NT>(rg, xs + m0 * a.kpad, a.kpad, acc);
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int m = 0; m < NT; ++m) acc[r][m] = warp_sum(acc[r][m]);
      if (lane == 0) {
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int m = 0; m < NT; ++m)
            if (r < nv && m0 + m < count) a.out[(start + m0 + m) * a.ldo + n0 + r] = acc[r][m];
      }
    }
  }
}

template <int F, bool kUp>
__device__ __forceinline__ void dec_dispatch(const DecArgs& a, const DevExpert& ex, int count,
                                             int start, const float* xs, int64_t n_begin,
                                             int64_t n_end) {
  if (count == 1) {
    if constexpr (kUp)
      dec_up_rows<F, 1>(a, ex.w1, ex.w3, count, start, xs, n_begin, n_end);
    else
      dec_down_rows<F, 1>(a, ex.w2, count, start, xs, n_begin, n_end);
  } else if (count == 2) {
    if constexpr (kUp)
      dec_up_rows<F, 2>(a, ex.w1, ex.w3, count, start, xs, n_begin, n_end);
    else
      dec_down_rows<F, 2>(a, ex.w2, count, start, xs, n_begin, n_end);
  } else {
    if constexpr (kUp)
      dec_up_rows<F, 4>(a, ex.w1, ex.w3, count, start, xs, n_begin, n_end);
    else
      dec_down_rows<F, 4>(a, ex.w2, count, start, xs, n_begin, n_end);
  }
}

// grid (row blocks, expert slots). kUp: x = the tokens (XT), out = h; else x = h, out = o.
template <typename XT, bool kUp>
__global__ void __launch_bounds__(kDecThreads, 2) moe_dec_kernel(DecArgs a) {
  extern __shared__ float4 xs4[];
  float* xs = reinterpret_cast<float*>(xs4);
  const int E1 = a.E + 1;
  if (static_cast<int>(blockIdx.y) >= a.meta[3 * E1]) return;
  const int e = a.meta[2 * E1 + blockIdx.y];
  const int count = a.meta[e];
  if (count > a.dec_max) return;
  const int start = a.meta[E1 + e];
  const DevExpert& ex = a.tab[e];
  const DevMat& w = kUp ? ex.w1 : ex.w2;
  const int64_t n_begin = static_cast<int64_t>(blockIdx.x) * a.rows_per_block;
  if (n_begin >= w.out) return;
  const int64_t n_end = n_begin + a.rows_per_block < w.out ? n_begin + a.rows_per_block : w.out;
  const int warp = threadIdx.x >> 5;
  // The first step's weight bytes start moving while the activations are staged.
  if constexpr (kUp) {
    prefetch_rows<kDecUpRows>(ex.w1, 0, n_begin + warp * kDecUpRows, n_end);
    prefetch_rows<kDecUpRows>(ex.w3, 1, n_begin + warp * kDecUpRows, n_end);
  } else {
    prefetch_rows<kDecDownRows>(ex.w2, 0, n_begin + warp * kDecDownRows, n_end);
  }
  const int64_t K = w.in;
  const int nf = a.kpad / 4;
  const int TK = a.T * a.K;
  for (int i = threadIdx.x; i < count * nf; i += kDecThreads) {
    const int m = i / nf, f = i % nf;
    float v[4];
    if constexpr (kUp) {
      const int p = a.pairs[start + m];
      const int64_t t = p < TK ? p / a.K : p - TK;
      load_x4(static_cast<const XT*>(a.x) + t * a.ldx, 4 * int64_t{f}, K, a.xvec != 0, v);
    } else {
      load_x4(static_cast<const float*>(a.x) + (start + m) * a.ldx, 4 * int64_t{f}, K, true, v);
    }
    xs4[m * nf + swz(f)] = make_float4(v[0], v[1], v[2], v[3]);
  }
  __syncthreads();
  if (w.fmt == kWFP4)
    dec_dispatch<kWFP4, kUp>(a, ex, count, start, xs, n_begin, n_end);
  else
    dec_dispatch<kWFP8, kUp>(a, ex, count, start, xs, n_begin, n_end);
}

// y[t] = sum over the token's experts in ascending id of w * o, then + the shared expert's o.
// Grid (column tiles, tokens): a token's row is spread over ceil(D / (4 * kCombineThreads))
// blocks, each thread 4 consecutive columns (one float4 of each of the token's K + 1 expert
// outputs in flight at once when kVec). Warp 0 of every block orders the token's choices by
// expert id (a rank by comparison: ids ascending, equal ids in selection order, as a stable
// insertion sort). The sum per column is in that fixed order, so the bits do not depend on the
// tiling.
constexpr int kCombineThreads = 128;
template <bool kVec>
__global__ void __launch_bounds__(kCombineThreads)
    moe_combine_kernel(const float* o, int64_t D, const int32_t* eidx, const float* ew,
                       const int* pos_of, int T, int K, void* y, int64_t ldy, int y_bf16) {
  __shared__ int pos[kMaxTopK];
  __shared__ float wt[kMaxTopK];
  const int t = blockIdx.y;
  const int64_t sp = pos_of[T * K + t];  // in flight with warp 0's loads
  if (threadIdx.x < 32) {
    const int j = threadIdx.x;
    const int e = j < K ? eidx[t * K + j] : 0x7fffffff;
    const int p = j < K ? pos_of[t * K + j] : 0;
    const float w = j < K ? ew[t * K + j] : 0.0f;
    int rank = 0;
    for (int i = 0; i < K; ++i) {
      const int ei = __shfl_sync(0xffffffffu, e, i);
      rank += ei < e || (ei == e && i < j) ? 1 : 0;
    }
    if (j < K) pos[rank] = p, wt[rank] = w;
  }
  __syncthreads();
  const int64_t d0 = 4 * (static_cast<int64_t>(blockIdx.x) * kCombineThreads + threadIdx.x);
  if (d0 >= D) return;
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f}, sv[4];
  if (kVec) {
    float4 v[kMaxTopK];
#pragma unroll
    for (int j = 0; j < kMaxTopK; ++j)
      if (j < K) v[j] = *reinterpret_cast<const float4*>(o + pos[j] * D + d0);
    const float4 sh = *reinterpret_cast<const float4*>(o + sp * D + d0);
#pragma unroll
    for (int j = 0; j < kMaxTopK; ++j) {
      if (j >= K) break;
      acc[0] = __fadd_rn(acc[0], __fmul_rn(v[j].x, wt[j]));
      acc[1] = __fadd_rn(acc[1], __fmul_rn(v[j].y, wt[j]));
      acc[2] = __fadd_rn(acc[2], __fmul_rn(v[j].z, wt[j]));
      acc[3] = __fadd_rn(acc[3], __fmul_rn(v[j].w, wt[j]));
    }
    sv[0] = sh.x, sv[1] = sh.y, sv[2] = sh.z, sv[3] = sh.w;
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (d0 + i >= D) break;
      for (int j = 0; j < K; ++j)
        acc[i] = __fadd_rn(acc[i], __fmul_rn(o[pos[j] * D + d0 + i], wt[j]));
      sv[i] = o[sp * D + d0 + i];
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (d0 + i >= D) break;
    const float v = __fadd_rn(acc[i], sv[i]);
    if (y_bf16)
      static_cast<__nv_bfloat16*>(y)[t * ldy + d0 + i] = __float2bfloat16_rn(v);
    else
      static_cast<float*>(y)[t * ldy + d0 + i] = v;
  }
}

// Rows per block of the decode kernels: about kDecTargetBlocks blocks over the slots, but at
// least min_rows (each warp several steps, so the block's start-up is paid once per several
// steps and the next step's rows are prefetched while one is computed), a multiple of `mult`.
int dec_rows_per_block(int64_t rows, int64_t slots, int64_t min_rows, int64_t mult) {
  const int64_t most = std::max<int64_t>(1, (rows + min_rows - 1) / min_rows);
  const int64_t per_expert = std::clamp<int64_t>((kDecTargetBlocks + slots - 1) / slots, 1, most);
  const int64_t r = (rows + per_expert - 1) / per_expert;
  return static_cast<int>((r + mult - 1) / mult * mult);
}

template <typename XT, bool kUp>
void launch_dec(cudaStream_t s, dim3 grid, size_t smem, const DecArgs& a) {
  allow_dynamic_smem(reinterpret_cast<const void*>(moe_dec_kernel<XT, kUp>), smem);
  moe_dec_kernel<XT, kUp><<<grid, kDecThreads, smem, s>>>(a);
  SP_CUDA_LAUNCH();
}

}  // namespace

void prepare_moe(MoeWeights& moe, cudaStream_t s) {
  const int64_t E = static_cast<int64_t>(moe.w1.size());
  SP_CHECK(moe.w2.size() == moe.w1.size() && moe.w3.size() == moe.w1.size(),
           "moe: expert lists differ in length");
  std::vector<DevExpert> h(static_cast<size_t>(E + 1));
  auto fill = [](DevExpert& d, const Matrix& w1, const Matrix& w2, const Matrix& w3) {
    SP_CHECK(w1.device == Device::kCuda && w2.device == Device::kCuda && w3.device == Device::kCuda,
             w1.name, ": experts must be uploaded before prepare_moe");
    SP_CHECK(w1.out == w3.out && w1.in == w3.in && w2.in == w1.out && w2.out == w1.in, w1.name,
             ": expert shapes");
    d.w1 = dev_mat(w1);
    d.w2 = dev_mat(w2);
    d.w3 = dev_mat(w3);
  };
  for (int64_t e = 0; e < E; ++e) fill(h[e], moe.w1[e], moe.w2[e], moe.w3[e]);
  fill(h[E], moe.sw1, moe.sw2, moe.sw3);
  bool dec = true;
  for (const DevExpert& d : h) {
    auto quant = [](const DevMat& m) { return m.fmt == kWFP4 || m.fmt == kWFP8; };
    dec = dec && quant(d.w1) && quant(d.w2) && d.w3.fmt == d.w1.fmt;
  }
  TableRegistry& reg = registry();
  std::lock_guard<std::mutex> lock(reg.mu);
  if (moe.table.data) {
    auto it = std::find(reg.ptrs.begin(), reg.ptrs.end(), moe.table.data);
    if (it != reg.ptrs.end()) {
      SP_CUDA(cudaStreamSynchronize(s));
      SP_CUDA(cudaFree(*it));
      reg.dec_ok.erase(reg.dec_ok.begin() + (it - reg.ptrs.begin()));
      reg.tc_ok.erase(reg.tc_ok.begin() + (it - reg.ptrs.begin()));
      reg.ptrs.erase(it);
    }
  }
  void* p = nullptr;
  const size_t bytes = h.size() * sizeof(DevExpert);
  // The table, then the gate kernel's block counter (zero between launches).
  SP_CUDA(cudaMalloc(&p, bytes + 16));
  SP_CUDA(cudaMemcpyAsync(p, h.data(), bytes, cudaMemcpyHostToDevice, s));
  SP_CUDA(cudaMemsetAsync(static_cast<uint8_t*>(p) + bytes, 0, 16, s));
  SP_CUDA(cudaStreamSynchronize(s));  // h goes away
  reg.ptrs.push_back(p);
  reg.dec_ok.push_back(dec);
  reg.tc_ok.push_back(dec && tc_experts_ok(h.data(), static_cast<int64_t>(h.size())));
  const int64_t w = static_cast<int64_t>(sizeof(DevExpert));
  moe.table = Tensor{p, E + 1, w, w, DType::kI8, Device::kCuda};
}

void moe(cudaStream_t s, Workspace& ws, Tensor x, const MoeArgs& a, const DevBatch& b, Tensor y) {
  const MoeWeights& L = *a.w;
  const int64_t T = x.rows, D = x.cols, E = L.gate.out, K = a.experts_per_tok;
  SP_CHECK(L.table.data != nullptr && L.table.rows == E + 1, "moe: prepare_moe not run (table ",
           L.table.rows, " rows, experts ", E, ")");
  SP_CHECK(y.rows == T && y.cols == D && L.gate.in == D, "moe: x ", T, "x", D, " y ", y.rows, "x",
           y.cols);
  SP_CHECK(K >= 1 && K <= kMaxTopK && K <= E && E <= 4096, "moe: top-k ", K, " of ", E);
  SP_CHECK(x.dtype == DType::kF32 || x.dtype == DType::kBF16, "moe: x dtype");
  SP_CHECK(y.dtype == DType::kF32 || y.dtype == DType::kBF16, "moe: y dtype");
  const bool hash = L.kind == MlpKind::kHashMoe;
  SP_CHECK(!hash || (L.tid2eid.data && L.tid2eid.cols == K), "moe: hash routing table");
  SP_CHECK(hash || L.gate_bias.data, "moe: gate bias");
  if (T == 0) return;
  const int64_t I = L.w1.empty() ? 0 : L.w1[0].out;
  const int64_t Imax = std::max(I, L.sw1.out);
  SP_CHECK(L.sw2.out == D && (L.w2.empty() || L.w2[0].out == D), "moe: expert outputs of ",
           L.sw2.out, " columns, hidden size ", D);
  const DevExpert* tab = static_cast<const DevExpert*>(L.table.data);
  int up_threads = gemv_threads(dev_mat(L.sw1).fmt, D);
  int down_threads = gemv_threads(dev_mat(L.sw2).fmt, L.sw2.in);
  if (!L.w1.empty()) {
    up_threads = std::max(up_threads, gemv_threads(dev_mat(L.w1[0]).fmt, D));
    down_threads = std::max(down_threads, gemv_threads(dev_mat(L.w2[0]).fmt, I));
  }
  const bool x_bf16 = x.dtype == DType::kBF16;
  const int xvec =
      (x.stride % 4 == 0 && reinterpret_cast<uintptr_t>(x.data) % (4 * x.elem_size()) == 0) ? 1 : 0;
  // The decode kernels take the experts of at most dec_max tokens: as many as the staged
  // activations of the widest input (D for W1/W3, I for W2) fit the shared-memory budget.
  bool dec_ok = false, tc_ok = false;
  {
    TableRegistry& reg = registry();
    std::lock_guard<std::mutex> lock(reg.mu);
    auto it = std::find(reg.ptrs.begin(), reg.ptrs.end(), L.table.data);
    if (it != reg.ptrs.end()) {
      dec_ok = reg.dec_ok[static_cast<size_t>(it - reg.ptrs.begin())];
      tc_ok = reg.tc_ok[static_cast<size_t>(it - reg.ptrs.begin())];
    }
  }
  const int64_t kpad_up = (D + 31) / 32 * 32, kpad_down = (Imax + 31) / 32 * 32;
  int dec_max = 0;
  if (dec_ok) {
    dec_max = kDecMaxTok;
    while (dec_max > 0 && dec_max * std::max(kpad_up, kpad_down) * 4 > kDecSmemBudget) dec_max /= 2;
  }
  // With the tensor-core kernels (moe_decode.cu): experts below tc_min tokens on the decode
  // kernels, the others on the tensor cores (the general kernels then take nothing).
  // The default (0): in a step of one token every expert has that one token, and the decode
  // kernels stream it faster (about 130 against 195 us for V4-Flash's layer on an H200); in a step
  // of 2 tokens or more one-token experts take the tensor cores too (faster at every T measured
  // from 2 to 16,384: docs/benchmarks.md).
  const int tc_min = ws.moe_tc_min_tokens > 0 ? ws.moe_tc_min_tokens : (T >= 2 ? 1 : 2);
  SP_CHECK(tc_min >= 1 && tc_min <= kTcSmallTok, "moe: tensor-core minimum ", tc_min);
  if (dec_max < tc_min - 1) tc_ok = false;  // someone must take the experts below tc_min
  if (tc_ok) dec_max = tc_min - 1;
  // The general kernels take the experts of more tokens.
  const int general_min = tc_ok ? std::numeric_limits<int>::max() : dec_max;

  for (int64_t c0 = 0; c0 < T; c0 += kTokenChunk) {
    const int64_t Tc = std::min(kTokenChunk, T - c0);
    const int64_t TK = Tc * K, npairs = TK + Tc;
    const Tensor xc = x.slice_rows(c0, Tc), yc = y.slice_rows(c0, Tc);
    float* logits = ws.get<float>(kWsMoeLogits, static_cast<size_t>(Tc * E));
    int32_t* eidx = ws.get<int32_t>(kWsMoeRoute, static_cast<size_t>(2 * TK));
    float* ew = reinterpret_cast<float*>(eidx + TK);
    int* meta = ws.get<int>(kWsMoeMeta, static_cast<size_t>(3 * (E + 1) + 1));
    int* pairs = ws.get<int>(kWsMoePairs, static_cast<size_t>(2 * npairs));
    int* pos_of = pairs + npairs;
    const int32_t* tid2eid = hash ? L.tid2eid.ptr<int32_t>() : nullptr;
    const float* bias = hash ? nullptr : L.gate_bias.ptr<float>();
    const DevMat gate = dev_mat(L.gate);
    const bool gx_vec =
        x.stride % 4 == 0 && reinterpret_cast<uintptr_t>(x.data) % (4 * x.elem_size()) == 0;
    if (Tc <= kGateMaxT && E <= kRouteSortMaxE && (gate.fmt == kWBF16 || gate.fmt == kWF32) &&
        gate.vec) {
      // K slices of at most 32 * kGateLaneChunks chunks (V4-Flash's bf16 gate, 512 chunks a row:
      // 4 slices, 32 x 4 = 128 blocks), balanced.
      const int64_t nch = (D + (gate.fmt == kWBF16 ? 7 : 3)) / (gate.fmt == kWBF16 ? 8 : 4);
      const int64_t most = 32 * kGateLaneChunks;
      const int64_t slices = (nch + most - 1) / most;
      GateRouteArgs g;
      g.slice_chunks = (nch + slices - 1) / slices;
      // Sized for kGateMaxT tokens whatever Tc, so that decode steps of 1..8 tokens share one
      // buffer (a reallocation drops the recorded decode graphs).
      g.part = ws.get<float>(kWsMoeGatePart, static_cast<size_t>(slices * kGateMaxT * E));
      g.gate = gate;
      g.x = xc.data;
      g.ldx = x.stride;
      g.xvec = gx_vec ? 1 : 0;
      g.T = static_cast<int>(Tc);
      g.E = static_cast<int>(E);
      g.K = static_cast<int>(K);
      g.hash = hash ? 1 : 0;
      g.tid2eid = tid2eid;
      g.ids = b.token_ids + c0;
      g.bias = bias;
      g.routed_scale = a.routed_scale;
      g.eidx = eidx;
      g.ew = ew;
      g.meta = meta;
      g.pairs = pairs;
      g.pos_of = pos_of;
      g.counter = reinterpret_cast<unsigned*>(static_cast<uint8_t*>(L.table.data) +
                                              L.table.rows * L.table.stride);
      const dim3 grid(static_cast<unsigned>((E + kGateRows - 1) / kGateRows),
                      static_cast<unsigned>(slices));
      if (gate.fmt == kWBF16) {
        if (x_bf16)
          moe_gate_route_kernel<kWBF16, __nv_bfloat16><<<grid, kGateThreads, 0, s>>>(g);
        else
          moe_gate_route_kernel<kWBF16, float><<<grid, kGateThreads, 0, s>>>(g);
      } else {
        if (x_bf16)
          moe_gate_route_kernel<kWF32, __nv_bfloat16><<<grid, kGateThreads, 0, s>>>(g);
        else
          moe_gate_route_kernel<kWF32, float><<<grid, kGateThreads, 0, s>>>(g);
      }
      SP_CUDA_LAUNCH();
    } else if (Tc <= kRouteSortMaxT && E <= kRouteSortMaxE) {
      linear(s, ws, xc, L.gate, Tensor{logits, Tc, E, E, DType::kF32, Device::kCuda});
      const size_t smem =
          std::max<size_t>((kRouteSortThreads / 32) * E * sizeof(float), 2 * (E + 1) * sizeof(int));
      moe_route_sort_kernel<<<1, kRouteSortThreads, smem, s>>>(
          logits, static_cast<int>(Tc), static_cast<int>(E), static_cast<int>(K), hash ? 1 : 0,
          tid2eid, b.token_ids + c0, bias, a.routed_scale, eidx, ew, meta, pairs, pos_of);
      SP_CUDA_LAUNCH();
    } else {
      linear(s, ws, xc, L.gate, Tensor{logits, Tc, E, E, DType::kF32, Device::kCuda});
      moe_route_kernel<<<static_cast<unsigned>(Tc), 256, 2 * E * sizeof(float), s>>>(
          logits, static_cast<int>(E), static_cast<int>(K), hash ? 1 : 0, tid2eid, b.token_ids + c0,
          bias, a.routed_scale, eidx, ew);
      SP_CUDA_LAUNCH();
      moe_sort_kernel<<<1, 1024, 2 * (E + 1) * sizeof(int), s>>>(
          eidx, static_cast<int>(Tc), static_cast<int>(K), static_cast<int>(E), meta, pairs,
          pos_of);
      SP_CUDA_LAUNCH();
    }
    // At most min(E, T*K) routed experts are hit, plus the shared one.
    const unsigned slots = static_cast<unsigned>(std::min<int64_t>(E, TK) + 1);
    const int64_t ldh = (Imax + 3) / 4 * 4;
    float* h = ws.get<float>(kWsMoeH, static_cast<size_t>(npairs * ldh));
    float* o = ws.get<float>(kWsMoeO, static_cast<size_t>(npairs * D));
    ExpertArgs ea;
    ea.tab = tab;
    ea.meta = meta;
    ea.pairs = pairs;
    ea.T = static_cast<int>(Tc);
    ea.K = static_cast<int>(K);
    ea.E = static_cast<int>(E);
    ea.limit = a.swiglu_limit;
    ea.x = xc.data;
    ea.ldx = x.stride;
    ea.xvec = xvec;
    ea.out = h;
    ea.ldo = ldh;
    ea.dec_max = general_min;
    const bool general = Tc > general_min;  // some expert may have more tokens
    DecArgs da;
    da.tab = tab;
    da.meta = meta;
    da.pairs = pairs;
    da.T = ea.T;
    da.K = ea.K;
    da.E = ea.E;
    da.limit = a.swiglu_limit;
    da.dec_max = dec_max;
    // Tokens go 1, 2 or 4 at a time (4 from 3 tokens on), so the last group of 4 may read rows
    // past the expert's tokens (their results are dropped): round the staged rows up to 4.
    const int64_t most = std::min<int64_t>(Tc, dec_max);
    const int64_t staged = most <= 2 ? most : (most + 3) / 4 * 4;
    if (dec_max > 0) {
      da.x = xc.data;
      da.ldx = x.stride;
      da.xvec = xvec;
      da.out = h;
      da.ldo = ldh;
      da.kpad = static_cast<int>(kpad_up);
      da.rows_per_block = dec_rows_per_block(Imax, slots, kDecUpMinRows, kDecUpBlock);
      const dim3 grid(static_cast<unsigned>((Imax + da.rows_per_block - 1) / da.rows_per_block),
                      slots);
      const size_t smem = static_cast<size_t>(staged * kpad_up * 4);
      if (x_bf16)
        launch_dec<__nv_bfloat16, true>(s, grid, smem, da);
      else
        launch_dec<float, true>(s, grid, smem, da);
    }
    if (general) {
      const dim3 up_grid(static_cast<unsigned>((Imax + kUpRows - 1) / kUpRows), slots);
      if (x_bf16)
        moe_up_kernel<__nv_bfloat16><<<up_grid, up_threads, 0, s>>>(ea);
      else
        moe_up_kernel<float><<<up_grid, up_threads, 0, s>>>(ea);
      SP_CUDA_LAUNCH();
    }
    if (dec_max > 0) {
      da.x = h;
      da.ldx = ldh;
      da.xvec = 1;
      da.out = o;
      da.ldo = D;
      da.kpad = static_cast<int>(kpad_down);
      da.rows_per_block = dec_rows_per_block(D, slots, kDecDownMinRows, kDecDownBlock);
      const dim3 grid(static_cast<unsigned>((D + da.rows_per_block - 1) / da.rows_per_block),
                      slots);
      launch_dec<float, false>(s, grid, static_cast<size_t>(staged * kpad_down * 4), da);
    }
    if (general) {
      ea.x = h;
      ea.ldx = ldh;
      ea.xvec = 1;
      ea.out = o;
      ea.ldo = D;
      const dim3 down_grid(static_cast<unsigned>((D + kDownRows - 1) / kDownRows), slots);
      moe_down_kernel<<<down_grid, down_threads, 0, s>>>(ea);
      SP_CUDA_LAUNCH();
    }
    if (tc_ok) {
      MoeTcStep ts;
      ts.tab = tab;
      ts.meta = meta;
      ts.pairs = pairs;
      ts.T = static_cast<int>(Tc);
      ts.K = static_cast<int>(K);
      ts.E = static_cast<int>(E);
      ts.min_tok = tc_min;
      ts.x = xc.data;
      ts.ldx = x.stride;
      ts.x_bf16 = x_bf16;
      ts.D = D;
      ts.Imax = Imax;
      ts.I = I;
      ts.Is = L.sw1.out;
      ts.limit = a.swiglu_limit;
      ts.o = o;
      moe_tc(s, ws, ts);
    }
    const dim3 comb_grid(
        static_cast<unsigned>((D + 4 * kCombineThreads - 1) / (4 * kCombineThreads)),
        static_cast<unsigned>(Tc));
    // o rows (D floats from a 256-byte aligned base) take float4 loads when D % 4 == 0.
    if (D % 4 == 0)
      moe_combine_kernel<true><<<comb_grid, kCombineThreads, 0, s>>>(
          o, D, eidx, ew, pos_of, static_cast<int>(Tc), static_cast<int>(K), yc.data, y.stride,
          y.dtype == DType::kBF16 ? 1 : 0);
    else
      moe_combine_kernel<false><<<comb_grid, kCombineThreads, 0, s>>>(
          o, D, eidx, ew, pos_of, static_cast<int>(Tc), static_cast<int>(K), yc.data, y.stride,
          y.dtype == DType::kBF16 ? 1 : 0);
    SP_CUDA_LAUNCH();
  }
}

}  // namespace sp::cuda
