// Attention with sink over the sliding window and the compressed entries, and the window ring
// update. (Compressors: compress.cu; lightning indexer: indexer.cu.)
//
// attention(): one block per (token, group of 8 heads, split of the token's rows). The token's
// rows (window positions, then compressed entries) go through shared memory in tiles of 32 rows,
// converted to fp32 once and shared by the 8 heads; per tile the block computes the 8 x 32 scores
// (each warp 4 heads x 8 rows: its lanes split the head dimension, the 4 heads' query slices stay
// in registers, a transposing butterfly sums 16 values per 31 shuffles), an online-softmax update
// per head (one warp per head, one lane per row) and o += P V (each thread owns columns of all 8
// heads). When the grid would not fill the GPU (decode), a token's rows are split over several
// blocks that write (max, sum, acc) partials, merged in split order by a second kernel. Every
// reduction runs in a fixed order: results do not depend on the run.
#include <algorithm>

#include "backend/cuda/attn_common.cuh"

namespace sp::cuda {

namespace {

using attn::load_f;
using attn::store_f;

constexpr int kHG = 8;   // heads per block
constexpr int kTR = 32;  // rows per tile
constexpr int kThreads = 256;
constexpr int kMaxSplits = 64;

struct AttnParams {
  const void* q;
  int64_t q_stride;
  const void* kv;
  int64_t kv_stride;
  const void* ring;
  int64_t ring_stride;
  const void* cmp;
  int64_t cmp_stride;
  const int32_t* sel;
  int64_t sel_stride;
  void* o;
  int64_t o_stride;
  float* part;  // [T][H][splits][dh + 2]: m, l, acc
  const float* sink;
  int topk, H, dh, W, ratio, kind;  // kind: 0 sliding, 1 HCA, 2 CSA
  int ring_rows;                    // window ring rows per slot
  float scale;
  int splits;
  bool q_bf, kv_bf, ring_bf, cmp_bf, o_bf;
};

__device__ __forceinline__ int token_rows(const AttnParams& P, int64_t p, int* nwin) {
  *nwin = static_cast<int>(p + 1 < P.W ? p + 1 : P.W);
  int ncmp = 0;
  if (P.kind == 1)
    ncmp = static_cast<int>((p + 1) / P.ratio);
  else if (P.kind == 2)
    ncmp = P.topk;
  return *nwin + ncmp;
}

// Loads 8 consecutive elements [d, d + 8) of a row (zeros past dh) as fp32.
__device__ __forceinline__ void load8(const void* row, bool bf, int d, int dh, float* out) {
  if (row == nullptr || d >= dh) {
#pragma unroll
    for (int e = 0; e < 8; ++e) out[e] = 0.0f;
    return;
  }
  const uintptr_t addr = reinterpret_cast<uintptr_t>(row);
  if (bf && d + 8 <= dh && ((addr + 2 * d) & 15) == 0) {
    uint4 raw = *reinterpret_cast<const uint4*>(static_cast<const __nv_bfloat16*>(row) + d);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float2 f = __bfloat1622float2(h[e]);
      out[2 * e] = f.x;
      out[2 * e + 1] = f.y;
    }
  } else if (!bf && d + 8 <= dh && ((addr + 4 * d) & 15) == 0) {
    const float4* p = reinterpret_cast<const float4*>(static_cast<const float*>(row) + d);
    float4 a = p[0], b = p[1];
    out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w;
    out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) out[e] = d + e < dh ? load_f(row, d + e, bf) : 0.0f;
  }
}

// NC: head_dim in chunks of 128 (rows padded with zeros to NC * 128 in shared memory).
template <int NC>
__global__ void __launch_bounds__(kThreads, 2) attention_kernel(AttnParams P, DevBatch b) {
  constexpr int DP = NC * 128;
  constexpr int NK = (DP + kThreads - 1) / kThreads;  // output columns per thread
  extern __shared__ float4 smem4[];
  float* Rs = reinterpret_cast<float*>(smem4);  // [kTR][DP]
  float* Ps = Rs + kTR * DP;                    // [kTR][kHG]
  float* Ss = Ps + kTR * kHG;                   // [kHG][kTR]
  __shared__ const void* rptr[kTR];
  __shared__ bool rbf[kTR];
  __shared__ float alpha_s[kHG], m_s[kHG], l_s[kHG];

  const int t = blockIdx.x, hg0 = blockIdx.y * kHG, split = blockIdx.z;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const SeqChunk ch = b.chunks[b.chunk_of[t]];
  const int64_t p = b.positions[t];
  int nwin;
  const int nrows = token_rows(P, p, &nwin);
  const int64_t p0 = p - nwin + 1;
  // This token's rows split evenly (in whole tiles) over the splits: the split count is fixed by
  // the launch, the split sizes follow this token's own rows.
  const int rows_per_split = ((nrows + kTR - 1) / kTR + P.splits - 1) / P.splits * kTR;
  const int r_begin = split * rows_per_split;
  const int r_end = min(nrows, r_begin + rows_per_split);

  // This warp's 4 heads' query slices: dims 4 * lane + 128 * c.
  const int hh = warp & 1, rg = warp >> 1;
  float4 qr[4][NC];
  {
    const void* qrow = attn::row_ptr(P.q, t, P.q_stride, P.q_bf);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int h = hg0 + 4 * hh + i;
#pragma unroll
      for (int c = 0; c < NC; ++c) {
        float v[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int d = 4 * lane + 128 * c + e;
          v[e] = (h < P.H && d < P.dh) ? load_f(qrow, static_cast<int64_t>(h) * P.dh + d, P.q_bf)
                                       : 0.0f;
        }
        qr[i][c] = make_float4(v[0], v[1], v[2], v[3]);
      }
    }
  }
  float acc[kHG][NK];
#pragma unroll
  for (int h = 0; h < kHG; ++h)
#pragma unroll
    for (int k = 0; k < NK; ++k) acc[h][k] = 0.0f;
  float m_run = -INFINITY, l_run = 0.0f;  // head hg0 + warp (all lanes alike)

  for (int r0 = r_begin; r0 < r_end; r0 += kTR) {
    // 1. Where each row of the tile lives.
    if (tid < kTR) {
      const int j = r0 + tid;
      const void* ptr = nullptr;
      bool bf = false;
      if (j < r_end) {
        if (j < nwin) {
          const int64_t pp = p0 + j;
          if (pp < ch.start_pos) {
            ptr = attn::row_ptr(P.ring,
                                static_cast<int64_t>(ch.slot) * P.ring_rows + pp % P.ring_rows,
                                P.ring_stride, P.ring_bf);
            bf = P.ring_bf;
          } else {
            ptr = attn::row_ptr(P.kv, ch.offset + (pp - ch.start_pos), P.kv_stride, P.kv_bf);
            bf = P.kv_bf;
          }
        } else {
          const int idx = j - nwin;
          const int64_t w = P.kind == 1 ? idx : P.sel[t * P.sel_stride + idx];
          if (w >= 0) {
            ptr = attn::row_ptr(P.cmp, dev_entry_row(b, ch, w, P.ratio), P.cmp_stride, P.cmp_bf);
            bf = P.cmp_bf;
          }
        }
      }
      rptr[tid] = ptr;
      rbf[tid] = bf;
    }
    __syncthreads();
    // 2. The rows into shared memory as fp32 (8 elements per task).
    {
      constexpr int per_row = DP / 8, tasks = kTR * per_row;
#pragma unroll 4
      for (int task = tid; task < tasks; task += kThreads) {
        const int r = task / per_row, d = (task % per_row) * 8;
        float v[8];
        load8(rptr[r], rbf[r], d, P.dh, v);
        float4* dst = reinterpret_cast<float4*>(Rs + r * DP + d);
        dst[0] = make_float4(v[0], v[1], v[2], v[3]);
        dst[1] = make_float4(v[4], v[5], v[6], v[7]);
      }
    }
    __syncthreads();
    // 3. Scores: warp (hh, rg) takes heads 4hh..4hh+3 and rows 8rg..8rg+7, 4 rows at a time.
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      const int rbase = rg * 8 + s * 4;
      float v[16];
#pragma unroll
      for (int i = 0; i < 16; ++i) v[i] = 0.0f;
#pragma unroll
      for (int c = 0; c < NC; ++c) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float4 r =
              *reinterpret_cast<const float4*>(Rs + (rbase + i) * DP + 4 * lane + 128 * c);
#pragma unroll
          for (int hd = 0; hd < 4; ++hd) {
            const float4 qv = qr[hd][c];
            v[i * 4 + hd] += qv.x * r.x + qv.y * r.y + qv.z * r.z + qv.w * r.w;
          }
        }
      }
      // Transposing butterfly: afterwards lane L holds the sum of value L % 16 over 16 lanes.
#pragma unroll
      for (int o = 8; o >= 1; o >>= 1) {
        const bool upper = (lane & o) != 0;
#pragma unroll
        for (int i = 0; i < o; ++i) {
          const float send = upper ? v[i] : v[i + o];
          const float keep = upper ? v[i + o] : v[i];
          v[i] = keep + __shfl_xor_sync(0xffffffffu, send, o);
        }
      }
      v[0] += __shfl_xor_sync(0xffffffffu, v[0], 16);
      if (lane < 16) {
        const int row = rbase + (lane >> 2), head = 4 * hh + (lane & 3);
        Ss[head * kTR + row] = rptr[row] ? v[0] * P.scale : -INFINITY;
      }
    }
    __syncthreads();
    // 4. Online softmax: warp h takes head h, lane r row r.
    {
      const float sc = Ss[warp * kTR + lane];
      float mx = sc;
#pragma unroll
      for (int o = 16; o >= 1; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const float m_new = fmaxf(m_run, mx);
      const float pr = sc == -INFINITY ? 0.0f : expf(sc - m_new);
      const float alpha = m_run == -INFINITY ? 0.0f : expf(m_run - m_new);
      float sum = pr;
#pragma unroll
      for (int o = 16; o >= 1; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      sum = __shfl_sync(0xffffffffu, sum, 0);
      l_run = l_run * alpha + sum;
      m_run = m_new;
      Ps[lane * kHG + warp] = pr;
      if (lane == 0) alpha_s[warp] = alpha;
    }
    __syncthreads();
    // 5. acc = acc * alpha + P V.
    {
      float al[kHG];
#pragma unroll
      for (int h = 0; h < kHG; ++h) al[h] = alpha_s[h];
#pragma unroll
      for (int h = 0; h < kHG; ++h)
#pragma unroll
        for (int k = 0; k < NK; ++k) acc[h][k] *= al[h];
      const int nr = min(kTR, r_end - r0);
      for (int r = 0; r < nr; ++r) {
        const float4 pa = *reinterpret_cast<const float4*>(Ps + r * kHG);
        const float4 pb = *reinterpret_cast<const float4*>(Ps + r * kHG + 4);
        const float pv[kHG] = {pa.x, pa.y, pa.z, pa.w, pb.x, pb.y, pb.z, pb.w};
#pragma unroll
        for (int k = 0; k < NK; ++k) {
          const int c = tid + kThreads * k;
          const float x = (DP % kThreads == 0 || c < DP) ? Rs[r * DP + c] : 0.0f;
#pragma unroll
          for (int h = 0; h < kHG; ++h) acc[h][k] += pv[h] * x;
        }
      }
    }
  }
  if (lane == 0) {
    m_s[warp] = m_run;
    l_s[warp] = l_run;
  }
  __syncthreads();
#pragma unroll
  for (int h = 0; h < kHG; ++h) {
    const int head = hg0 + h;
    if (head >= P.H) break;
    const float m = m_s[h], l = l_s[h];
    if (P.splits == 1) {
      const float sink = P.sink[head];
      const float M = fmaxf(m, sink);
      const float e = m == -INFINITY ? 0.0f : expf(m - M);
      const float inv = 1.0f / (l * e + expf(sink - M));
      void* orow = static_cast<uint8_t*>(P.o) + t * P.o_stride * (P.o_bf ? 2 : 4);
#pragma unroll
      for (int k = 0; k < NK; ++k) {
        const int c = tid + kThreads * k;
        if (c < P.dh)
          store_f(orow, static_cast<int64_t>(head) * P.dh + c, acc[h][k] * e * inv, P.o_bf);
      }
    } else {
      float* part =
          P.part + ((static_cast<int64_t>(t) * P.H + head) * P.splits + split) * (P.dh + 2);
      if (tid == 0) {
        part[0] = m;
        part[1] = l;
      }
#pragma unroll
      for (int k = 0; k < NK; ++k) {
        const int c = tid + kThreads * k;
        if (c < P.dh) part[2 + c] = acc[h][k];
      }
    }
  }
}

// Merges the splits of each (token, head) in split order, the sink included. The splits' (m, l)
// pairs go to shared memory first (one load each, all in flight) and warp 0 forms the max M, each
// split's weight exp(m - M) and the denominator (in split order); then each thread forms its
// columns (at most kCombineCols: head_dim <= kCombineThreads * kCombineCols) over the splits in
// order, kCombineUnroll splits' loads in flight at once. The arithmetic is the per-column loop's
// (max, weights, sums in split order), its loads no longer one dependent chain per split.
constexpr int kCombineThreads = 256, kCombineCols = 2, kCombineUnroll = 8;
static_assert(kCombineThreads * kCombineCols >= 512, "combine: head_dim up to 512");
__global__ void __launch_bounds__(kCombineThreads) attention_combine_kernel(AttnParams P) {
  __shared__ float m_sh[kMaxSplits], l_sh[kMaxSplits], w_sh[kMaxSplits];
  __shared__ float inv_sh;
  const int t = blockIdx.x, head = blockIdx.y, tid = threadIdx.x;
  const int64_t stride = P.dh + 2;
  const float* part = P.part + (static_cast<int64_t>(t) * P.H + head) * P.splits * stride;
  const int splits = P.splits;
  if (tid < splits) {
    m_sh[tid] = part[tid * stride];
    l_sh[tid] = part[tid * stride + 1];
  }
  __syncthreads();
  if (tid < 32) {
    const float sink = P.sink[head];
    // The max over the sink and the splits (exact whatever the order).
    float M = sink;
    for (int s = tid; s < splits; s += 32) M = fmaxf(M, m_sh[s]);
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
    for (int s = tid; s < splits; s += 32) {
      const float m = m_sh[s];
      w_sh[s] = m == -INFINITY ? 0.0f : expf(m - M);
    }
    __syncwarp();
    if (tid == 0) {
      float denom = expf(sink - M);
      for (int s = 0; s < splits; ++s)
        if (m_sh[s] != -INFINITY) denom += l_sh[s] * w_sh[s];
      inv_sh = 1.0f / denom;
    }
  }
  __syncthreads();
  const float inv = inv_sh;
  float o[kCombineCols];
#pragma unroll
  for (int k = 0; k < kCombineCols; ++k) o[k] = 0.0f;
  for (int s0 = 0; s0 < splits; s0 += kCombineUnroll) {
    float a[kCombineUnroll][kCombineCols];
#pragma unroll
    for (int u = 0; u < kCombineUnroll; ++u)
#pragma unroll
      for (int k = 0; k < kCombineCols; ++k) {
        const int c = tid + kCombineThreads * k;
        a[u][k] = s0 + u < splits && c < P.dh ? part[(s0 + u) * stride + 2 + c] : 0.0f;
      }
#pragma unroll
    for (int u = 0; u < kCombineUnroll; ++u) {
      if (s0 + u >= splits) break;
      if (m_sh[s0 + u] == -INFINITY) continue;
      const float w = w_sh[s0 + u];
#pragma unroll
      for (int k = 0; k < kCombineCols; ++k) o[k] += a[u][k] * w;
    }
  }
  void* orow = static_cast<uint8_t*>(P.o) + t * P.o_stride * (P.o_bf ? 2 : 4);
#pragma unroll
  for (int k = 0; k < kCombineCols; ++k) {
    const int c = tid + kCombineThreads * k;
    if (c < P.dh) store_f(orow, static_cast<int64_t>(head) * P.dh + c, o[k] * inv, P.o_bf);
  }
}

template <int NC>
void launch_attention(cudaStream_t s, const AttnParams& P, const DevBatch& b, dim3 grid) {
  constexpr int DP = NC * 128;
  const size_t smem = (kTR * DP + 2 * kTR * kHG) * sizeof(float);
  allow_dynamic_smem(reinterpret_cast<const void*>(attention_kernel<NC>), smem);
  attention_kernel<NC><<<grid, kThreads, smem, s>>>(P, b);
  SP_CUDA_LAUNCH();
}

__global__ void window_update_kernel(const void* kv, int64_t kv_stride, bool kv_bf, void* ring,
                                     int64_t ring_stride, bool ring_bf, int cols, int window,
                                     int ring_rows, DevBatch b) {
  (void)window;  // the ring holds more: each chunk's last ring_rows positions are written
  const SeqChunk ch = b.chunks[blockIdx.y];
  const int i = max(0, ch.n_tokens - ring_rows) + static_cast<int>(blockIdx.x);
  if (i >= ch.n_tokens) return;
  const int64_t p = ch.start_pos + i;
  const void* src = attn::row_ptr(kv, ch.offset + i, kv_stride, kv_bf);
  void* dst = const_cast<void*>(attn::row_ptr(
      ring, static_cast<int64_t>(ch.slot) * ring_rows + p % ring_rows, ring_stride, ring_bf));
  for (int c = threadIdx.x; c < cols; c += blockDim.x)
    store_f(dst, c, load_f(src, c, kv_bf), ring_bf);
}

}  // namespace

void attention(cudaStream_t s, Workspace& ws, Tensor q, Tensor kv, const AttentionArgs& a,
               const DevBatch& b, const LayerState& st, const Tensor* selected, Tensor o) {
  const BatchView& hb = *b.host;
  const int T = hb.num_tokens;
  if (T == 0) return;
  attn::check_float(q, "attention q");
  attn::check_float(kv, "attention kv");
  attn::check_float(o, "attention o");
  attn::check_float(st.window, "attention window");
  SP_CHECK(a.head_dim <= 512, "attention: head_dim ", a.head_dim, " over 512");
  SP_CHECK(q.cols == static_cast<int64_t>(a.num_heads) * a.head_dim && kv.cols == a.head_dim &&
               o.cols == q.cols && q.rows >= T && kv.rows >= T && o.rows >= T,
           "attention shapes");
  AttnParams P{};
  P.q = q.data, P.q_stride = q.stride, P.q_bf = attn::is_bf16(q);
  P.kv = kv.data, P.kv_stride = kv.stride, P.kv_bf = attn::is_bf16(kv);
  P.ring = st.window.data, P.ring_stride = st.window.stride, P.ring_bf = attn::is_bf16(st.window);
  P.o = o.data, P.o_stride = o.stride, P.o_bf = attn::is_bf16(o);
  P.sink = a.sink->ptr<float>();
  P.H = a.num_heads, P.dh = a.head_dim, P.W = a.window, P.ratio = a.ratio, P.scale = a.scale;
  P.ring_rows = a.ring;
  SP_CHECK(a.ring >= a.window, "attention: window ring of ", a.ring, " rows for window ", a.window);
  P.kind = a.kind == AttnKind::kHCA ? 1 : a.kind == AttnKind::kCSA ? 2 : 0;
  if (a.ratio <= 0) P.kind = 0;
  if (P.kind != 0) {
    attn::check_float(st.cmp, "attention compressed entries");
    P.cmp = st.cmp.data, P.cmp_stride = st.cmp.stride, P.cmp_bf = attn::is_bf16(st.cmp);
  }
  if (P.kind == 2) {
    SP_CHECK(selected && selected->dtype == DType::kI32, "CSA attention needs the selection");
    P.sel = selected->ptr<int32_t>(), P.sel_stride = selected->stride,
    P.topk = static_cast<int>(selected->cols);
  }
  // The split of each token's rows over blocks: as many splits as give the grid about two blocks
  // per SM, at most one per tile of the most rows a token can have (window + top-k for CSA;
  // window + every compressed entry of the longest sequence for HCA). Fixed by the kind, the
  // limits and T only, never by this step's positions: a token's result does not depend on the
  // other tokens of its step, and decode steps launch alike (CUDA graphs).
  int64_t max_rows = P.W;
  if (P.kind == 2) max_rows += P.topk;
  if (P.kind == 1 && b.max_positions > 0) max_rows += b.max_positions / P.ratio;
  if (P.kind == 1 && b.max_positions <= 0)  // no limit given (op tests): the longest sequence
    for (int t = 0; t < T; ++t)
      max_rows = std::max<int64_t>(max_rows, P.W + (hb.positions[t] + 1) / P.ratio);
  const int hgroups = (P.H + kHG - 1) / kHG;
  const int64_t base = static_cast<int64_t>(T) * hgroups;
  const int64_t max_tiles = std::max<int64_t>(1, (max_rows + kTR - 1) / kTR);
  const int splits = static_cast<int>(std::min<int64_t>(
      {max_tiles, std::max<int64_t>(1, (2 * num_sms() + base - 1) / base), kMaxSplits}));
  P.splits = splits;
  if (splits > 1)
    P.part = ws.get<float>(kWsAttnPartials, static_cast<size_t>(T) * P.H * splits * (P.dh + 2));
  dim3 grid(T, hgroups, splits);
  const int nc = (P.dh + 127) / 128;
  switch (nc) {
    case 1:
      launch_attention<1>(s, P, b, grid);
      break;
    case 2:
      launch_attention<2>(s, P, b, grid);
      break;
    case 3:
      launch_attention<3>(s, P, b, grid);
      break;
    default:
      launch_attention<4>(s, P, b, grid);
      break;
  }
  if (splits > 1) {
    attention_combine_kernel<<<dim3(T, P.H), kCombineThreads, 0, s>>>(P);
    SP_CUDA_LAUNCH();
  }
}

void window_update(cudaStream_t s, Tensor kv, int window, int ring_rows, const DevBatch& b,
                   Tensor ring) {
  const BatchView& hb = *b.host;
  if (hb.chunks.empty()) return;
  attn::check_float(kv, "window_update kv");
  attn::check_float(ring, "window_update ring");
  SP_CHECK(kv.cols == ring.cols, "window_update: kv ", kv.cols, " cols, ring ", ring.cols);
  SP_CHECK(ring_rows >= window, "window_update: ring of ", ring_rows, " rows, window ", window);
  int rows = 0;
  // Each chunk's last ring_rows positions (speculative rollback keeps the slack rows valid).
  for (const SeqChunk& ch : hb.chunks) rows = std::max(rows, std::min(ch.n_tokens, ring_rows));
  if (rows == 0) return;
  window_update_kernel<<<dim3(rows, hb.chunks.size()), 128, 0, s>>>(
      kv.data, kv.stride, attn::is_bf16(kv), ring.data, ring.stride, attn::is_bf16(ring),
      static_cast<int>(kv.cols), window, ring_rows, b);
  SP_CUDA_LAUNCH();
}

}  // namespace sp::cuda
