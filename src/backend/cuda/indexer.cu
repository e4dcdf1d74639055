// Lightning indexer: scores of every visible compressed entry, then the top-k per token.
//   1. indexer_score_kernel: blocks per token striding over its tiles of 64 entries: the [heads x
//   dim] x
//      [dim x 64] product through shared memory in 64-head x 32-dim tiles (each thread a 4 x 4
//      register tile), relu, scale, the head weights, and the sum over heads in a fixed order;
//      scores into Workspace scratch [tokens, entries].
//   2. indexer_select_kernel: one block per token: a radix select (4 passes of 8 bits over the
//      order-preserving keys) finds the k-th largest score; then one ordered pass takes every entry
//      above it and the lowest-index entries equal to it (ties to the lower index), which writes
//      the selection already sorted ascending; -1 padding.
// Tokens go in sub-batches so that the scratch stays under kMaxScoreFloats.
#include <algorithm>
#include <cub/block/block_scan.cuh>

#include "backend/cuda/attn_common.cuh"

namespace sp::cuda {

namespace {

using attn::load_f;

constexpr int kET = 64;  // entries per block
constexpr int kHT = 64;  // heads per smem tile
constexpr int kDT = 32;  // dims per smem tile
constexpr int kScoreThreads = 256;
constexpr int kSelThreads = 512;
constexpr int64_t kMaxScoreFloats = int64_t{1} << 26;  // 256 MiB of scratch

struct IdxParams {
  const void* q;
  int64_t q_stride;
  const float* wt;
  int64_t wt_stride;
  const void* keys;
  int64_t keys_stride;
  int32_t* out;
  int64_t out_stride;
  float* scores;  // [tokens of the sub-batch][ld]
  int64_t ld;
  int heads, dim, ratio, topk, t0;
  float qscale, wscale;
  bool q_bf, keys_bf;
};

__global__ void __launch_bounds__(kScoreThreads) indexer_score_kernel(IdxParams P, DevBatch b) {
  __shared__ __align__(16) float Qs[kDT][kHT + 4];  // padded: fewer store conflicts
  __shared__ __align__(16) float Ks[kDT][kET + 4];
  __shared__ float red[kHT / 4][kET + 1];
  __shared__ const void* kptr[kET];
  const int tl = blockIdx.y, t = P.t0 + tl;
  const int n = (b.positions[t] + 1) / P.ratio;
  const SeqChunk ch = b.chunks[b.chunk_of[t]];
  // The token's tiles of 64 entries, strided over the grid's x blocks (the grid is sized by the
  // token count, not by the entries: a step launches alike whatever its sequences' lengths).
  for (int e0 = blockIdx.x * kET; e0 < n; e0 += gridDim.x * kET) {
    const int tid = threadIdx.x, hg = tid / 16, eg = tid % 16;
    if (tid < kET) {
      const int w = e0 + tid;
      kptr[tid] =
          w < n ? attn::row_ptr(P.keys, dev_entry_row(b, ch, w, P.ratio), P.keys_stride, P.keys_bf)
                : nullptr;
    }
    const void* qrow = attn::row_ptr(P.q, t, P.q_stride, P.q_bf);
    const float* wrow = P.wt + static_cast<int64_t>(t) * P.wt_stride;
    float score = 0.0f;  // entry e0 + tid (tid < kET)
    __syncthreads();
    for (int h0 = 0; h0 < P.heads; h0 += kHT) {
      float acc[4][4] = {};
      for (int k0 = 0; k0 < P.dim; k0 += kDT) {
        // Q tile [kDT][kHT] and key tile [kDT][kET] (zeros outside).
#pragma unroll
        for (int i = 0; i < kDT * kHT / kScoreThreads; ++i) {
          const int idx = tid + i * kScoreThreads, h = idx / kDT, kk = idx % kDT;
          const int hh = h0 + h, d = k0 + kk;
          Qs[kk][h] = (hh < P.heads && d < P.dim)
                          ? load_f(qrow, static_cast<int64_t>(hh) * P.dim + d, P.q_bf)
                          : 0.0f;
        }
#pragma unroll
        for (int i = 0; i < kDT * kET / kScoreThreads; ++i) {
          const int idx = tid + i * kScoreThreads, e = idx / kDT, kk = idx % kDT;
          const int d = k0 + kk;
          Ks[kk][e] = (kptr[e] && d < P.dim) ? load_f(kptr[e], d, P.keys_bf) : 0.0f;
        }
        __syncthreads();
#pragma unroll 8
        for (int kk = 0; kk < kDT; ++kk) {
          const float4 qa = *reinterpret_cast<const float4*>(&Qs[kk][hg * 4]);
          const float4 kb = *reinterpret_cast<const float4*>(&Ks[kk][eg * 4]);
          const float qv[4] = {qa.x, qa.y, qa.z, qa.w}, kv[4] = {kb.x, kb.y, kb.z, kb.w};
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] += qv[i] * kv[j];
        }
        __syncthreads();
      }
      // relu, scale, head weight; this thread's 4 heads summed in order.
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int hh = h0 + hg * 4 + i;
          if (hh < P.heads) s += fmaxf(acc[i][j], 0.0f) * P.qscale * (wrow[hh] * P.wscale);
        }
        red[hg][eg * 4 + j] = s;
      }
      __syncthreads();
      if (tid < kET) {
        for (int i = 0; i < kHT / 4; ++i) score += red[i][tid];
      }
      __syncthreads();
    }
    if (tid < kET && e0 + tid < n) P.scores[static_cast<int64_t>(tl) * P.ld + e0 + tid] = score;
    __syncthreads();  // kptr and the tiles are reused by the next tile
  }
}

__global__ void __launch_bounds__(kSelThreads) indexer_select_kernel(IdxParams P, DevBatch b) {
  using Scan = cub::BlockScan<int, kSelThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ int hist[256];
  __shared__ uint32_t prefix_s;
  __shared__ int need_s, base_s, eq_base_s;
  const int tl = blockIdx.x, t = P.t0 + tl, tid = threadIdx.x;
  const int n = (b.positions[t] + 1) / P.ratio;
  int32_t* out = P.out + static_cast<int64_t>(t) * P.out_stride;
  const int k = min(P.topk, n);
  for (int i = k + tid; i < P.topk; i += kSelThreads) out[i] = -1;
  if (k == 0) return;
  if (k == n) {  // everything visible is selected
    for (int i = tid; i < n; i += kSelThreads) out[i] = i;
    return;
  }
  const float* sc = P.scores + static_cast<int64_t>(tl) * P.ld;
  // Radix select of the k-th largest key.
  uint32_t prefix = 0, mask = 0;
  int need = k;  // how many of the entries matching prefix/mask are still to take
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = tid; i < 256; i += kSelThreads) hist[i] = 0;
    __syncthreads();
    for (int i = tid; i < n; i += kSelThreads) {
      const uint32_t u = attn::order_key(sc[i]);
      if ((u & mask) == prefix) atomicAdd(&hist[(u >> shift) & 255], 1);
    }
    __syncthreads();
    if (tid == 0) {
      int cum = 0, bin = 255;
      for (; bin > 0; --bin) {
        if (cum + hist[bin] >= need) break;
        cum += hist[bin];
      }
      need_s = need - cum;
      prefix_s = prefix | (static_cast<uint32_t>(bin) << shift);
    }
    __syncthreads();
    need = need_s;
    prefix = prefix_s;
    mask |= 255u << shift;
    __syncthreads();
  }
  // prefix: the k-th largest key; take all keys above it and the first `need` equal to it.
  if (tid == 0) base_s = 0, eq_base_s = 0;
  __syncthreads();
  for (int i0 = 0; i0 < n; i0 += kSelThreads) {
    const int i = i0 + tid;
    const uint32_t u = i < n ? attn::order_key(sc[i]) : 0;
    const int eq = (i < n && u == prefix) ? 1 : 0;
    int eq_rank, eq_total;
    Scan(scan_tmp).ExclusiveSum(eq, eq_rank, eq_total);
    const int eq_base = eq_base_s, base = base_s;
    const int take = (i < n && (u > prefix || (eq && eq_base + eq_rank < need))) ? 1 : 0;
    __syncthreads();
    int pos, total;
    Scan(scan_tmp).ExclusiveSum(take, pos, total);
    if (take) out[base + pos] = i;
    __syncthreads();
    if (tid == 0) base_s = base + total, eq_base_s = eq_base + eq_total;
    __syncthreads();
  }
}

}  // namespace

void indexer_topk(cudaStream_t s, Workspace& ws, Tensor q, Tensor weights, int heads, int dim,
                  int ratio, int topk, const DevBatch& b, Tensor keys, Tensor out) {
  const BatchView& hb = *b.host;
  const int T = hb.num_tokens;
  if (T == 0) return;
  attn::check_float(q, "indexer q");
  attn::check_float(keys, "indexer keys");
  SP_CHECK(weights.dtype == DType::kF32, "indexer weights must be f32");
  SP_CHECK(out.dtype == DType::kI32 && out.cols == topk && out.rows >= T, "indexer output ",
           out.rows, "x", out.cols);
  SP_CHECK(q.cols == static_cast<int64_t>(heads) * dim && keys.cols == dim, "indexer shapes");
  IdxParams P{};
  P.q = q.data, P.q_stride = q.stride, P.q_bf = attn::is_bf16(q);
  P.wt = weights.ptr<float>(), P.wt_stride = weights.stride;
  P.keys = keys.data, P.keys_stride = keys.stride, P.keys_bf = attn::is_bf16(keys);
  P.out = out.ptr<int32_t>(), P.out_stride = out.stride;
  P.heads = heads, P.dim = dim, P.ratio = ratio, P.topk = topk;
  P.qscale = 1.0f / std::sqrt(static_cast<float>(dim));
  P.wscale = 1.0f / std::sqrt(static_cast<float>(heads));
  // Entries of the longest sequence: of this step, or, for a decode-shaped step, of the limit
  // (the score blocks past a token's own entries return at once), so that every decode step
  // launches alike (CUDA graphs). The selection does not depend on which.
  int max_n = 0;
  if (b.static_shapes)
    max_n = static_cast<int>(b.max_positions / ratio);
  else
    for (int t = 0; t < T; ++t) max_n = std::max(max_n, (hb.positions[t] + 1) / ratio);
  P.ld = std::max(1, max_n);
  const int sub = static_cast<int>(std::clamp<int64_t>(kMaxScoreFloats / P.ld, 1, T));
  P.scores = ws.get<float>(kWsIndexerScores, static_cast<size_t>(sub) * P.ld);
  // Blocks per token: enough for about two per SM over the step's tokens, at most one per tile of
  // the longest sequence (each block strides over its token's tiles).
  const int64_t all_tiles = std::max(1, (max_n + kET - 1) / kET);
  for (int t0 = 0; t0 < T; t0 += sub) {
    P.t0 = t0;
    const int nt = std::min(sub, T - t0);
    if (max_n > topk) {  // otherwise every visible entry is selected: no scores needed
      const int tiles = static_cast<int>(
          std::min<int64_t>(all_tiles, std::max<int64_t>(1, (2 * num_sms() + nt - 1) / nt)));
      indexer_score_kernel<<<dim3(tiles, nt), kScoreThreads, 0, s>>>(P, b);
      SP_CUDA_LAUNCH();
    }
    indexer_select_kernel<<<nt, kSelThreads, 0, s>>>(P, b);
    SP_CUDA_LAUNCH();
  }
}

}  // namespace sp::cuda
