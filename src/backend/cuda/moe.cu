// Routed and shared experts.
//
// One moe() call is six launches over a chunk of up to 1024 tokens:
//   gate     logits = x gate^T (f32)                          linear()
//   route    per token: sqrt(softplus) scores, hash or biased top-k (ties to the lower id), weights
//   sort     a counting sort of the (token, slot) pairs by expert, tokens ascending inside an
//            expert; the shared expert is expert E and gets every token
//   up       per (hit expert, 2 rows of W1/W3): h = silu(min(W1 x, L)) * clamp(W3 x, -L, L) for
//   every
//            token of the expert, each weight chunk read once and applied to 8 tokens at a time
//   down     per (hit expert, 4 rows of W2): o = W2 h
//   combine  y[t] = sum over the token's experts in ascending id of w * o, then + shared o
// Grids are sized for the most experts a step can hit; blocks of slots past the hit count exit.
// Every sum has a fixed order (no float atomics), so results are bitwise reproducible.
#include <algorithm>
#include <mutex>
#include <vector>

#include "backend/cuda/gemm_core.cuh"

namespace sp::cuda {
namespace {

// The per-expert descriptors prepare_moe uploads; expert E (the last) is the shared expert.
struct DevExpert {
  DevMat w1, w2, w3;
};

// Device tables live until exit (one per MoE layer, allocated once at load).
struct TableRegistry {
  std::mutex mu;
  std::vector<void*> ptrs;
  ~TableRegistry() {
    for (void* p : ptrs) cudaFree(p);  // errors at exit (context gone) are ignored
  }
};
TableRegistry& registry() {
  static TableRegistry r;
  return r;
}

constexpr int kWsLogits = 9, kWsRoute = 10, kWsMeta = 11, kWsPairs = 12, kWsH = 13, kWsO = 14;
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
    if (!hash) biased[e] = s[e] + bias[e];
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
// p = T * K + t; pairs[pos] = p sorted by (expert, token); pos_of[p] = pos.
__global__ void moe_sort_kernel(const int32_t* eidx, int T, int K, int E, int* meta, int* pairs,
                                int* pos_of) {
  extern __shared__ int sh[];
  int* cnt = sh;
  int* off = sh + E + 1;
  const int TK = T * K;
  for (int e = threadIdx.x; e <= E; e += blockDim.x) cnt[e] = 0;
  __syncthreads();
  for (int p = threadIdx.x; p < TK; p += blockDim.x) atomicAdd(&cnt[eidx[p]], 1);  // integers
  __syncthreads();
  if (threadIdx.x == 0) {
    cnt[E] = T;
    int o = 0, na = 0;
    for (int e = 0; e <= E; ++e) {
      off[e] = o;
      o += cnt[e];
      meta[e] = cnt[e];
      meta[E + 1 + e] = off[e];
      if (cnt[e] > 0) meta[2 * (E + 1) + na++] = e;
    }
    meta[3 * (E + 1)] = na;
  }
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
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

// y[t] = sum over the token's experts in ascending id of w * o, then + the shared expert's o.
__global__ void moe_combine_kernel(const float* o, int64_t D, const int32_t* eidx, const float* ew,
                                   const int* pos_of, int T, int K, void* y, int64_t ldy,
                                   int y_bf16) {
  __shared__ int pos[kMaxTopK];
  __shared__ float wt[kMaxTopK];
  const int t = blockIdx.x;
  if (threadIdx.x == 0) {
    int ex[kMaxTopK];
    for (int j = 0; j < K; ++j) {
      int e = eidx[t * K + j], p = pos_of[t * K + j];
      float w = ew[t * K + j];
      int i = j;
      for (; i > 0 && ex[i - 1] > e; --i) ex[i] = ex[i - 1], pos[i] = pos[i - 1], wt[i] = wt[i - 1];
      ex[i] = e, pos[i] = p, wt[i] = w;
    }
  }
  __syncthreads();
  const int64_t sp = pos_of[T * K + t];
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.0f;
    for (int j = 0; j < K; ++j) acc = __fadd_rn(acc, __fmul_rn(o[pos[j] * D + d], wt[j]));
    const float v = __fadd_rn(acc, o[sp * D + d]);
    if (y_bf16)
      static_cast<__nv_bfloat16*>(y)[t * ldy + d] = __float2bfloat16_rn(v);
    else
      static_cast<float*>(y)[t * ldy + d] = v;
  }
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
  TableRegistry& reg = registry();
  std::lock_guard<std::mutex> lock(reg.mu);
  if (moe.table.data) {
    auto it = std::find(reg.ptrs.begin(), reg.ptrs.end(), moe.table.data);
    if (it != reg.ptrs.end()) {
      SP_CUDA(cudaStreamSynchronize(s));
      SP_CUDA(cudaFree(*it));
      reg.ptrs.erase(it);
    }
  }
  void* p = nullptr;
  const size_t bytes = h.size() * sizeof(DevExpert);
  SP_CUDA(cudaMalloc(&p, bytes));
  SP_CUDA(cudaMemcpyAsync(p, h.data(), bytes, cudaMemcpyHostToDevice, s));
  SP_CUDA(cudaStreamSynchronize(s));  // h goes away
  reg.ptrs.push_back(p);
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

  for (int64_t c0 = 0; c0 < T; c0 += kTokenChunk) {
    const int64_t Tc = std::min(kTokenChunk, T - c0);
    const int64_t TK = Tc * K, npairs = TK + Tc;
    const Tensor xc = x.slice_rows(c0, Tc), yc = y.slice_rows(c0, Tc);
    float* logits = ws.get<float>(kWsLogits, static_cast<size_t>(Tc * E));
    linear(s, ws, xc, L.gate, Tensor{logits, Tc, E, E, DType::kF32, Device::kCuda});
    int32_t* eidx = ws.get<int32_t>(kWsRoute, static_cast<size_t>(2 * TK));
    float* ew = reinterpret_cast<float*>(eidx + TK);
    moe_route_kernel<<<static_cast<unsigned>(Tc), 256, 2 * E * sizeof(float), s>>>(
        logits, static_cast<int>(E), static_cast<int>(K), hash ? 1 : 0,
        hash ? L.tid2eid.ptr<int32_t>() : nullptr, b.token_ids + c0,
        hash ? nullptr : L.gate_bias.ptr<float>(), a.routed_scale, eidx, ew);
    SP_CUDA_LAUNCH();
    int* meta = ws.get<int>(kWsMeta, static_cast<size_t>(3 * (E + 1) + 1));
    int* pairs = ws.get<int>(kWsPairs, static_cast<size_t>(2 * npairs));
    int* pos_of = pairs + npairs;
    moe_sort_kernel<<<1, 1024, 2 * (E + 1) * sizeof(int), s>>>(
        eidx, static_cast<int>(Tc), static_cast<int>(K), static_cast<int>(E), meta, pairs, pos_of);
    SP_CUDA_LAUNCH();
    // At most min(E, T*K) routed experts are hit, plus the shared one.
    const unsigned slots = static_cast<unsigned>(std::min<int64_t>(E, TK) + 1);
    const int64_t ldh = (Imax + 3) / 4 * 4;
    float* h = ws.get<float>(kWsH, static_cast<size_t>(npairs * ldh));
    float* o = ws.get<float>(kWsO, static_cast<size_t>(npairs * D));
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
    const dim3 up_grid(static_cast<unsigned>((Imax + kUpRows - 1) / kUpRows), slots);
    if (x_bf16)
      moe_up_kernel<__nv_bfloat16><<<up_grid, up_threads, 0, s>>>(ea);
    else
      moe_up_kernel<float><<<up_grid, up_threads, 0, s>>>(ea);
    SP_CUDA_LAUNCH();
    ea.x = h;
    ea.ldx = ldh;
    ea.xvec = 1;
    ea.out = o;
    ea.ldo = D;
    const dim3 down_grid(static_cast<unsigned>((D + kDownRows - 1) / kDownRows), slots);
    moe_down_kernel<<<down_grid, down_threads, 0, s>>>(ea);
    SP_CUDA_LAUNCH();
    moe_combine_kernel<<<static_cast<unsigned>(Tc), 256, 0, s>>>(
        o, D, eidx, ew, pos_of, static_cast<int>(Tc), static_cast<int>(K), yc.data, y.stride,
        y.dtype == DType::kBF16 ? 1 : 0);
    SP_CUDA_LAUNCH();
  }
}

}  // namespace sp::cuda
