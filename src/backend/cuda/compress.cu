// Compressor (CSA: overlapping windows, k = 2; HCA: k = 1): the CPU backend's token-by-token
// state machine, computed in parallel. Every value a completed window needs is either one of this
// step's rows (a, g + ape) or a row of the slot's input ring left by earlier steps (position q at
// row slot * ring + q % ring: values, then gates with ape), so
//   1. compress_entries_kernel: one block per (chunk, window completed in this step), threads over
//      channels: per-channel softmax pooling, RMS norm, rope at the window's first position, the
//      entry into the pool;
//   2. compress_state_kernel (after 1, which reads the old ring): writes this step's rows into the
//      ring (each chunk's last `ring` positions).
#include <algorithm>

#include "backend/cuda/attn_common.cuh"

namespace sp::cuda {

namespace {

using attn::load_f;
using attn::store_f;

struct CmpParams {
  const float* a;
  int64_t a_stride;
  const float* g;
  int64_t g_stride;
  const float* ape;  // [r, kd]
  int64_t ape_stride;
  const float* norm;      // [d]
  const float* inv_freq;  // [rope_dim / 2]
  float* buf;             // [slots * ring, 2 kd]: values, then gates (ape included)
  int64_t buf_stride;
  int ring;  // rows per slot
  void* cache;
  int64_t cache_stride;
  bool cache_bf;
  int r, k, d, rope_dim, block_tokens;
  float eps;
};

// Value and gate (ape included) of slot j of window u at column col (< k*d): this step's row, the
// ring's row of an earlier position, or nothing (window -1 of CSA: value 0, gate -inf).
__device__ __forceinline__ void slot_vg(const CmpParams& P, const SeqChunk& ch, int64_t u, int j,
                                        int col, float* v, float* gt) {
  const int64_t pos = u * P.r + j;
  if (pos >= ch.start_pos) {  // this step's row
    const int64_t row = ch.offset + (pos - ch.start_pos);
    *v = P.a[row * P.a_stride + col];
    *gt = P.g[row * P.g_stride + col] + P.ape[j * P.ape_stride + col];
  } else if (pos >= 0) {  // an earlier step's row, in the ring
    const float* rv =
        P.buf + (static_cast<int64_t>(ch.slot) * P.ring + pos % P.ring) * P.buf_stride;
    *v = rv[col];
    *gt = rv[P.k * P.d + col];
  } else {  // window -1 of a sequence (CSA only)
    *v = 0.0f;
    *gt = -INFINITY;
  }
}

constexpr int kCmpThreads = 256;

__global__ void __launch_bounds__(kCmpThreads) compress_entries_kernel(CmpParams P, DevBatch b) {
  extern __shared__ float pooled[];  // [d]
  __shared__ float red[kCmpThreads / 32];
  __shared__ float rn_s;
  const SeqChunk ch = b.chunks[blockIdx.y];
  const int64_t first = ch.start_pos / P.r;
  const int64_t last = (ch.start_pos + ch.n_tokens) / P.r;  // windows [first, last) complete
  const int64_t w = first + blockIdx.x;
  if (w >= last) return;
  if (w * P.r / P.block_tokens >= ch.num_blocks) __trap();  // entry outside the chunk's blocks
  const int tid = threadIdx.x;
  const int n = P.k == 2 ? 2 * P.r : P.r;
  float ss = 0.0f;
  for (int c = tid; c < P.d; c += blockDim.x) {
    // Pass 1: the max gate; pass 2: the softmax sum; pass 3: the weighted values (as the CPU).
    float mx = -INFINITY;
    for (int j = 0; j < n; ++j) {
      float v, gt;
      if (P.k == 2)
        j < P.r ? slot_vg(P, ch, w - 1, j, c, &v, &gt)
                : slot_vg(P, ch, w, j - P.r, P.d + c, &v, &gt);
      else
        slot_vg(P, ch, w, j, c, &v, &gt);
      mx = fmaxf(mx, gt);
    }
    float sum = 0.0f;
    for (int j = 0; j < n; ++j) {
      float v, gt;
      if (P.k == 2)
        j < P.r ? slot_vg(P, ch, w - 1, j, c, &v, &gt)
                : slot_vg(P, ch, w, j - P.r, P.d + c, &v, &gt);
      else
        slot_vg(P, ch, w, j, c, &v, &gt);
      sum += expf(gt - mx);
    }
    float acc = 0.0f;
    for (int j = 0; j < n; ++j) {
      float v, gt;
      if (P.k == 2)
        j < P.r ? slot_vg(P, ch, w - 1, j, c, &v, &gt)
                : slot_vg(P, ch, w, j - P.r, P.d + c, &v, &gt);
      else
        slot_vg(P, ch, w, j, c, &v, &gt);
      acc += v * (expf(gt - mx) / sum);
    }
    pooled[c] = acc;
    ss += acc * acc;
  }
  // Sum of squares: per warp, then the warps in order.
#pragma unroll
  for (int o = 16; o >= 1; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if ((tid & 31) == 0) red[tid >> 5] = ss;
  __syncthreads();
  if (tid == 0) {
    float tot = 0.0f;
    for (int i = 0; i < static_cast<int>(blockDim.x / 32); ++i) tot += red[i];
    rn_s = 1.0f / sqrtf(tot / static_cast<float>(P.d) + P.eps);
  }
  __syncthreads();
  const float rn = rn_s;
  const int64_t row = dev_entry_row(b, ch, w, P.r);
  void* e = static_cast<uint8_t*>(P.cache) + row * P.cache_stride * (P.cache_bf ? 2 : 4);
  const int nope = P.d - P.rope_dim;
  const float pos = static_cast<float>(w * P.r);
  for (int c = tid; c < nope; c += blockDim.x)
    store_f(e, c, P.norm[c] * (pooled[c] * rn), P.cache_bf);
  for (int i = tid; i < P.rope_dim / 2; i += blockDim.x) {
    const int c = nope + 2 * i;
    const float x = P.norm[c] * (pooled[c] * rn), y = P.norm[c + 1] * (pooled[c + 1] * rn);
    const float ang = P.inv_freq[i] * pos;
    const float cs = static_cast<float>(cos(static_cast<double>(ang)));
    const float sn = static_cast<float>(sin(static_cast<double>(ang)));
    store_f(e, c, x * cs - y * sn, P.cache_bf);
    store_f(e, c + 1, y * cs + x * sn, P.cache_bf);
  }
}

__global__ void compress_state_kernel(CmpParams P, DevBatch b) {
  const SeqChunk ch = b.chunks[blockIdx.y];
  const int kd = P.k * P.d;
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= kd || ch.n_tokens == 0) return;
  const int64_t start = ch.start_pos, end = ch.start_pos + ch.n_tokens;
  // The chunk's last `ring` positions: each ring row written once.
  for (int64_t pos = max(start, end - P.ring); pos < end; ++pos) {
    const int64_t row = ch.offset + (pos - start);
    float* dst = P.buf + (static_cast<int64_t>(ch.slot) * P.ring + pos % P.ring) * P.buf_stride;
    dst[col] = P.a[row * P.a_stride + col];
    dst[kd + col] = P.g[row * P.g_stride + col] + P.ape[(pos % P.r) * P.ape_stride + col];
  }
}

}  // namespace

void compress(cudaStream_t s, Workspace&, Tensor a, Tensor g, const CompressorArgs& args,
              const DevBatch& b, Tensor buf, Tensor cache) {
  const BatchView& hb = *b.host;
  if (hb.chunks.empty()) return;
  const int r = args.ratio, k = args.overlap, d = args.dim;
  SP_CHECK(a.dtype == DType::kF32 && g.dtype == DType::kF32 && buf.dtype == DType::kF32,
           "compress: a, g and the compressor state must be f32");
  attn::check_float(cache, "compress cache");
  SP_CHECK(a.cols == static_cast<int64_t>(k) * d && g.cols == a.cols && buf.cols == 2 * a.cols,
           "compress: shapes");
  SP_CHECK(args.ring >= k * r, "compress: input ring of ", args.ring, " rows for ratio ", r,
           " overlap ", k);
  SP_CHECK(args.w->ape.dtype == DType::kF32 && args.w->norm.dtype == DType::kF32 &&
               args.rope->inv_freq.dtype == DType::kF32,
           "compress: ape, norm and inv_freq must be f32");
  SP_CHECK(args.rope->rope_dim <= d && args.rope->rope_dim % 2 == 0, "compress: rope_dim");
  SP_CHECK(b.block_tokens % r == 0, "compress: block_tokens ", b.block_tokens,
           " not a multiple of ", r);
  CmpParams P{};
  P.a = a.ptr<float>(), P.a_stride = a.stride;
  P.g = g.ptr<float>(), P.g_stride = g.stride;
  P.ape = args.w->ape.ptr<float>(), P.ape_stride = args.w->ape.stride;
  P.norm = args.w->norm.ptr<float>();
  P.inv_freq = args.rope->inv_freq.ptr<float>();
  P.buf = buf.ptr<float>(), P.buf_stride = buf.stride, P.ring = args.ring;
  P.cache = cache.data, P.cache_stride = cache.stride, P.cache_bf = attn::is_bf16(cache);
  P.r = r, P.k = k, P.d = d, P.rope_dim = args.rope->rope_dim, P.block_tokens = b.block_tokens;
  P.eps = args.eps;
  // A chunk of n tokens completes at most ceil(n / r) windows; blocks past a chunk's completed
  // windows return at once. Sized by the chunk lengths only (not the positions), so every decode
  // step launches alike (CUDA graphs).
  int64_t windows = 0;
  for (const SeqChunk& ch : hb.chunks)
    windows = std::max<int64_t>(windows, (static_cast<int64_t>(ch.n_tokens) + r - 1) / r);
  const int nchunks = static_cast<int>(hb.chunks.size());
  if (windows > 0) {
    compress_entries_kernel<<<dim3(static_cast<unsigned>(windows), nchunks), kCmpThreads,
                              d * sizeof(float), s>>>(P, b);
    SP_CUDA_LAUNCH();
  }
  const int cols = k * d;
  compress_state_kernel<<<dim3((cols + 127) / 128, nchunks), 128, 0, s>>>(P, b);
  SP_CUDA_LAUNCH();
}

}  // namespace sp::cuda
