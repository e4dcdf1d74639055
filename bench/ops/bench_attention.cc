// Timing of the attention-side CUDA kernels at DeepSeek-V4-Flash sizes (64 heads x 512, window
// 128; CSA ratio 4 top-512, HCA ratio 128; indexer 64 x 128), bf16 activations and state.
// Each case: 3 warm-up runs, then 20 timed runs (CUDA events around the op alone, L2 flushed
// before each), the median reported, with the bytes the op must read and the rate achieved.
//   bench_attention [out.tsv]
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "backend/cuda/kernels.h"
#include "core/dtype.h"

namespace sp::bench {
namespace {

constexpr int kBlockTokens = 256;

struct Dev {
  cudaStream_t s = nullptr;
  std::vector<void*> ptrs;
  void* flush = nullptr;
  size_t flush_bytes = size_t{256} << 20;
  Dev() {
    SP_CUDA(cudaStreamCreate(&s));
    SP_CUDA(cudaMalloc(&flush, flush_bytes));
  }
  ~Dev() {
    cudaStreamSynchronize(s);
    for (void* p : ptrs) cudaFree(p);
    cudaFree(flush);
    cudaStreamDestroy(s);
  }
  void* raw(size_t bytes) {
    void* p = nullptr;
    SP_CUDA(cudaMalloc(&p, std::max<size_t>(bytes, 16)));
    ptrs.push_back(p);
    return p;
  }
  // Random normal values (never zeros: they can run faster than real data).
  Tensor random(int64_t rows, int64_t cols, DType dt, uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    const int64_t n = rows * cols;
    Tensor t{raw(static_cast<size_t>(n * dtype_size(dt))), rows, cols, cols, dt, Device::kCuda};
    if (dt == DType::kF32) {
      std::vector<float> v(n);
      for (auto& x : v) x = nd(rng);
      SP_CUDA(cudaMemcpy(t.data, v.data(), n * 4, cudaMemcpyHostToDevice));
    } else {
      std::vector<uint16_t> v(n);
      for (auto& x : v) x = f32_to_bf16(nd(rng));
      SP_CUDA(cudaMemcpy(t.data, v.data(), n * 2, cudaMemcpyHostToDevice));
    }
    return t;
  }
  template <typename T>
  T* upload(const std::vector<T>& v) {
    void* p = raw(v.size() * sizeof(T));
    if (!v.empty()) SP_CUDA(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
    return static_cast<T*>(p);
  }
  // Median milliseconds of fn over `reps` runs, L2 flushed before each.
  double time(const std::function<void()>& fn, int reps = 20) {
    cudaEvent_t a, b;
    SP_CUDA(cudaEventCreate(&a));
    SP_CUDA(cudaEventCreate(&b));
    for (int i = 0; i < 3; ++i) fn();
    std::vector<float> ms;
    for (int i = 0; i < reps; ++i) {
      SP_CUDA(cudaMemsetAsync(flush, i & 0xff, flush_bytes, s));
      SP_CUDA(cudaEventRecord(a, s));
      fn();
      SP_CUDA(cudaEventRecord(b, s));
      SP_CUDA(cudaEventSynchronize(b));
      float t = 0;
      SP_CUDA(cudaEventElapsedTime(&t, a, b));
      ms.push_back(t);
    }
    SP_CUDA(cudaEventDestroy(a));
    SP_CUDA(cudaEventDestroy(b));
    std::sort(ms.begin(), ms.end());
    return ms[ms.size() / 2];
  }
};

// B sequences (slot i, its own shuffled blocks), each with n tokens ending at position ctx - 1.
struct Step {
  BatchView host;
  cuda::DevBatch dev;
  int64_t pool_blocks = 0;
};

Step make_step(Dev& d, int B, int n, int64_t ctx) {
  Step st;
  BatchView& b = st.host;
  const int per_slot = static_cast<int>((ctx + kBlockTokens - 1) / kBlockTokens);
  st.pool_blocks = int64_t{B} * per_slot;
  std::vector<int32_t> ids(static_cast<size_t>(st.pool_blocks));
  std::iota(ids.begin(), ids.end(), 0);
  std::mt19937_64 rng(3);
  std::shuffle(ids.begin(), ids.end(), rng);
  for (int i = 0; i < B; ++i) {
    SeqChunk ch;
    ch.slot = i;
    ch.n_tokens = n;
    ch.start_pos = ctx - n;
    ch.offset = b.num_tokens;
    ch.block_table = static_cast<int32_t>(b.block_tables.size());
    ch.num_blocks = per_slot;
    for (int j = 0; j < per_slot; ++j) b.block_tables.push_back(ids[i * per_slot + j]);
    for (int t = 0; t < n; ++t) {
      b.token_ids.push_back(0);
      b.positions.push_back(static_cast<int32_t>(ctx - n + t));
      b.chunk_of.push_back(i);
    }
    b.num_tokens += n;
    b.chunks.push_back(ch);
  }
  cuda::DevBatch& db = st.dev;
  db.num_tokens = b.num_tokens;
  db.num_chunks = B;
  db.block_tokens = kBlockTokens;
  db.token_ids = d.upload(b.token_ids);
  db.positions = d.upload(b.positions);
  db.chunk_of = d.upload(b.chunk_of);
  db.chunks = d.upload(b.chunks);
  db.block_tables = d.upload(b.block_tables);
  db.host = &st.host;
  return st;
}

FILE* g_out = nullptr;

void report(const char* what, int B, int T, int64_t ctx, double ms, double bytes) {
  const double gbs = bytes / (ms * 1e-3) / 1e9;
  std::printf("%-34s B=%-3d T=%-5d ctx=%-6lld %9.3f ms  %8.1f MB  %7.1f GB/s\n", what, B, T,
              static_cast<long long>(ctx), ms, bytes / 1e6, gbs);
  if (g_out)
    std::fprintf(g_out, "%s\t%d\t%d\t%lld\t%.4f\t%.0f\t%.1f\n", what, B, T,
                 static_cast<long long>(ctx), ms, bytes, gbs);
}

// Attention (CSA when ratio 4, HCA when 128): B sequences of n tokens at context ctx.
void bench_attention(Dev& d, cuda::Workspace& ws, AttnKind kind, int ratio, int B, int n,
                     int64_t ctx) {
  const int H = 64, dh = 512, W = 128, topk = 512;
  Step st = make_step(d, B, n, ctx);
  const int T = st.host.num_tokens;
  const int64_t pool = st.pool_blocks * (kBlockTokens / ratio);
  Tensor q = d.random(T, H * dh, DType::kBF16, 1), kv = d.random(T, dh, DType::kBF16, 2);
  Tensor o = d.random(T, H * dh, DType::kBF16, 3);
  LayerState ls;
  ls.window = d.random(int64_t{B} * W, dh, DType::kBF16, 4);
  ls.cmp = d.random(pool, dh, DType::kBF16, 5);
  std::vector<float> sinkv(H, 0.5f);
  Tensor sink{d.upload(sinkv), 1, H, H, DType::kF32, Device::kCuda};
  std::vector<int32_t> sel(static_cast<size_t>(T) * topk, -1);
  std::mt19937_64 rng(7);
  double rows = 0;
  for (int t = 0; t < T; ++t) {
    const int64_t p = st.host.positions[t];
    const int ne = static_cast<int>((p + 1) / ratio);
    rows += std::min<int64_t>(p + 1, W);
    if (kind == AttnKind::kCSA) {
      const int k = std::min(topk, ne);
      std::vector<int32_t> all(ne);
      std::iota(all.begin(), all.end(), 0);
      std::shuffle(all.begin(), all.end(), rng);
      std::sort(all.begin(), all.begin() + k);
      std::copy(all.begin(), all.begin() + k, sel.begin() + static_cast<size_t>(t) * topk);
      rows += k;
    } else {
      rows += ne;
    }
  }
  Tensor selt{d.upload(sel), T, topk, topk, DType::kI32, Device::kCuda};
  AttentionArgs a{H, dh, W, ratio, kind, 1.0f / std::sqrt(static_cast<float>(dh)), &sink, W};
  const Tensor* sp = kind == AttnKind::kCSA ? &selt : nullptr;
  const double ms = d.time([&] { cuda::attention(d.s, ws, q, kv, a, st.dev, ls, sp, o); });
  const char* name =
      kind == AttnKind::kCSA ? "attention CSA (KV rows read)" : "attention HCA (KV rows read)";
  report(name, B, T, ctx, ms, rows * dh * 2);
  const double flops = 4.0 * rows * H * dh;
  std::printf("%-34s %38s %.1f TFLOP/s (fp32 CUDA cores)\n", "", "", flops / (ms * 1e-3) / 1e12);
}

void bench_indexer(Dev& d, cuda::Workspace& ws, int B, int n, int64_t ctx) {
  const int heads = 64, dim = 128, ratio = 4, topk = 512;
  Step st = make_step(d, B, n, ctx);
  const int T = st.host.num_tokens;
  const int64_t pool = st.pool_blocks * (kBlockTokens / ratio);
  Tensor q = d.random(T, heads * dim, DType::kBF16, 11),
         keys = d.random(pool, dim, DType::kBF16, 12);
  Tensor wt = d.random(T, heads, DType::kF32, 13);
  Tensor out{d.raw(static_cast<size_t>(T) * topk * 4), T, topk, topk, DType::kI32, Device::kCuda};
  double entries = 0;
  for (int t = 0; t < T; ++t) entries += (st.host.positions[t] + 1) / ratio;
  const double ms = d.time(
      [&] { cuda::indexer_topk(d.s, ws, q, wt, heads, dim, ratio, topk, st.dev, keys, out); });
  report("indexer_topk (keys read)", B, T, ctx, ms, entries * dim * 2);
}

void bench_compress(Dev& d, cuda::Workspace& ws, int ratio, int k, int dim, int B, int n,
                    int64_t ctx) {
  Step st = make_step(d, B, n, ctx);
  const int T = st.host.num_tokens, kd = k * dim;
  const int64_t pool = st.pool_blocks * (kBlockTokens / ratio);
  Tensor a = d.random(T, kd, DType::kF32, 21), g = d.random(T, kd, DType::kF32, 22);
  Tensor buf = d.random(int64_t{B} * k * ratio, 2 * kd, DType::kF32, 23);
  Tensor cache = d.random(pool, dim, DType::kBF16, 25);
  CompressorView w;
  w.ape = d.random(ratio, kd, DType::kF32, 26);
  std::vector<float> ones(dim, 1.0f), freq(32);
  for (int i = 0; i < 32; ++i) freq[i] = static_cast<float>(std::pow(160000.0, -i / 32.0));
  w.norm = Tensor{d.upload(ones), 1, dim, dim, DType::kF32, Device::kCuda};
  RopeView rope{Tensor{d.upload(freq), 1, 32, 32, DType::kF32, Device::kCuda}, 64};
  CompressorArgs args{&w, &rope, ratio, k, dim, 1e-6f, k * ratio};
  const double ms = d.time([&] { cuda::compress(d.s, ws, a, g, args, st.dev, buf, cache); });
  char name[64];
  std::snprintf(name, sizeof name, "compress r=%d k=%d d=%d (a, g read)", ratio, k, dim);
  report(name, B, T, ctx, ms, 2.0 * T * kd * 4);
}

}  // namespace
}  // namespace sp::bench

int main(int argc, char** argv) {
  using namespace sp;
  using namespace sp::bench;
  if (argc > 1) g_out = std::fopen(argv[1], "w");
  cudaDeviceProp prop{};
  SP_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount,
              prop.l2CacheSize >> 20);
  Dev d;
  cuda::Workspace ws(d.s);
  {  // Copy bandwidth ceiling: 1 GiB device to device (bytes read + written).
    void* x = d.raw(size_t{1} << 30);
    void* y = d.raw(size_t{1} << 30);
    const double ms = d.time(
        [&] { SP_CUDA(cudaMemcpyAsync(y, x, size_t{1} << 30, cudaMemcpyDeviceToDevice, d.s)); });
    std::printf("device copy: %.1f GB/s (read + write)\n", 2.0 * (1 << 30) / (ms * 1e-3) / 1e9);
  }
  for (int B : {1, 8, 32, 64}) bench_attention(d, ws, AttnKind::kCSA, 4, B, 1, 4096);
  for (int B : {1, 8, 32, 64}) bench_attention(d, ws, AttnKind::kHCA, 128, B, 1, 4096);
  bench_attention(d, ws, AttnKind::kCSA, 4, 1, 4096, 4096);
  bench_attention(d, ws, AttnKind::kHCA, 128, 1, 4096, 4096);
  for (int B : {1, 64}) bench_indexer(d, ws, B, 1, 4096);
  for (int B : {1, 64}) bench_indexer(d, ws, B, 1, 65536);
  bench_indexer(d, ws, 1, 4096, 4096);
  bench_compress(d, ws, 4, 2, 512, 64, 1, 4096);
  bench_compress(d, ws, 4, 2, 512, 1, 4096, 4096);
  bench_compress(d, ws, 128, 1, 512, 1, 4096, 4096);
  SP_CUDA(cudaDeviceSynchronize());
  if (g_out) std::fclose(g_out);
  return 0;
}
