// bench_ops' small decode kernels: RMS norm, greedy sampling (argmax over V4-Flash's vocab), the
// non-finite check and the MoE's gate + routing + combine (a layer whose experts are tiny, so the
// gate, routing and combine dominate), at T = 1, 8 and 64 rows on V4-Flash shapes. "us" is the
// time per call of back-to-back calls (the host's launch latency hidden, as in a decode step
// enqueued ahead or replayed from a graph); "us 1" one call alone between two events. GB/s counts
// the bytes each call must read once (inputs, weights) and write.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <random>
#include <tuple>
#include <utility>
#include <vector>

#include "backend/cuda/kernels.h"
#include "core/dtype.h"

namespace sp::cuda {
namespace {

void* dev(size_t n) {
  void* p = nullptr;
  SP_CUDA(cudaMalloc(&p, n));
  return p;
}

// A device tensor of random small values (host-made, so no kernel of this file runs before the
// timings).
Tensor rand_tensor(int64_t rows, int64_t cols, DType dt, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  const size_t n = static_cast<size_t>(rows * cols);
  void* p = dev(n * dtype_size(dt));
  if (dt == DType::kF32) {
    std::vector<float> h(n);
    for (auto& v : h) v = d(rng);
    SP_CUDA(cudaMemcpy(p, h.data(), n * 4, cudaMemcpyHostToDevice));
  } else {
    std::vector<uint16_t> h(n);
    for (auto& v : h) v = f32_to_bf16(d(rng));
    SP_CUDA(cudaMemcpy(p, h.data(), n * 2, cudaMemcpyHostToDevice));
  }
  return Tensor{p, rows, cols, cols, dt, Device::kCuda};
}

Matrix rand_matrix(WeightFormat f, int64_t out, int64_t in, uint64_t seed) {
  Matrix m;
  m.name = "bench";
  m.format = f;
  m.out = out;
  m.in = in;
  m.device = Device::kCuda;
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> v;
  if (f == WeightFormat::kFloat) {
    m.dtype = DType::kBF16;
    v.resize(static_cast<size_t>(out * in * 2));
    std::normal_distribution<float> d(0.0f, 0.05f);
    for (size_t i = 0; i < v.size(); i += 2) {
      const uint16_t b = f32_to_bf16(d(rng));
      v[i] = static_cast<uint8_t>(b & 0xff);
      v[i + 1] = static_cast<uint8_t>(b >> 8);
    }
  } else {
    m.dtype = f == WeightFormat::kFP8 ? DType::kE4M3 : DType::kI8;
    m.scale_cols = f == WeightFormat::kFP8 ? (in + 127) / 128 : in / 32;
    v.resize(static_cast<size_t>(m.value_bytes()));
    for (auto& b : v) {
      b = static_cast<uint8_t>(rng());
      if (f == WeightFormat::kFP8 && (b & 0x7f) == 0x7f) b &= 0xfe;  // no NaN codes
    }
    std::vector<uint8_t> sc(static_cast<size_t>(m.scale_bytes()), 120);  // 2^-7
    void* s = dev(sc.size());
    SP_CUDA(cudaMemcpy(s, sc.data(), sc.size(), cudaMemcpyHostToDevice));
    m.scale = static_cast<uint8_t*>(s);
  }
  void* d = dev(v.size());
  SP_CUDA(cudaMemcpy(d, v.data(), v.size(), cudaMemcpyHostToDevice));
  m.data = static_cast<uint8_t*>(d);
  return m;
}

// Median us per call: back-to-back batches of `batch` calls, and single calls.
template <typename Fn>
void time_us(cudaStream_t s, Fn fn, float* batched, float* single) {
  cudaEvent_t a, b;
  SP_CUDA(cudaEventCreate(&a));
  SP_CUDA(cudaEventCreate(&b));
  for (int i = 0; i < 20; ++i) fn();
  std::vector<float> tb, t1;
  for (int r = 0; r < 15; ++r) {
    SP_CUDA(cudaEventRecord(a, s));
    for (int i = 0; i < 50; ++i) fn();
    SP_CUDA(cudaEventRecord(b, s));
    SP_CUDA(cudaEventSynchronize(b));
    float ms = 0;
    SP_CUDA(cudaEventElapsedTime(&ms, a, b));
    tb.push_back(ms * 1e3f / 50);
    SP_CUDA(cudaEventRecord(a, s));
    fn();
    SP_CUDA(cudaEventRecord(b, s));
    SP_CUDA(cudaEventSynchronize(b));
    SP_CUDA(cudaEventElapsedTime(&ms, a, b));
    t1.push_back(ms * 1e3f);
  }
  std::sort(tb.begin(), tb.end());
  std::sort(t1.begin(), t1.end());
  *batched = tb[tb.size() / 2];
  *single = t1[t1.size() / 2];
  cudaEventDestroy(a);
  cudaEventDestroy(b);
}

void row(const char* op, const char* shape, int T, float us, float us1, double bytes,
         double copy_gbs) {
  const double gbs = bytes / (us * 1e-6) / 1e9;
  std::printf("%-22s %-22s %4d %8.2f %8.2f %9.0f %6.1f%%\n", op, shape, T, us, us1, gbs,
              100.0 * gbs / copy_gbs);
}

}  // namespace

void bench_small(cudaStream_t s, Workspace& ws, double copy_gbs) {
  std::printf("\n%-22s %-22s %4s %8s %8s %9s %7s\n", "small op", "shape", "T", "us", "us 1", "GB/s",
              "of copy");
  // RMS norm: V4-Flash's hidden (4096), q_lora (1024), the 64 q heads of 512, and a 16,384 row.
  for (auto [cols, group, name] : {std::tuple{4096, 4096, "hidden 4096"},
                                   {1024, 1024, "q_lora 1024"},
                                   {64 * 512, 512, "q 64 heads x 512"},
                                   {16384, 16384, "16384"}}) {
    Tensor w = rand_tensor(1, group, DType::kF32, 3);
    for (DType xd : {DType::kF32, DType::kBF16}) {
      for (int T : {1, 8, 64, 4096}) {
        if (T == 4096 && cols > 4096) continue;
        // The register path on aligned rows, and the strided loop (the kernel every norm ran on
        // before) on the same shape seen one column in (rows not aligned).
        Tensor x = rand_tensor(T, cols + 1, xd, 4 + T), y = rand_tensor(T, cols + 1, xd, 5 + T);
        Tensor xa = rand_tensor(T, cols, xd, 4 + T), ya = rand_tensor(T, cols, xd, 5 + T);
        const double bytes = 2.0 * T * cols * dtype_size(xd) + group * 4.0;
        char shape[64];
        std::snprintf(shape, sizeof shape, "%s %s", name, dtype_name(xd));
        float us, us1;
        time_us(
            s, [&] { rms_norm(s, xa, &w, group, 1e-6f, ya); }, &us, &us1);
        row("rms_norm", shape, T, us, us1, bytes, copy_gbs);
        const Tensor xv = x.slice_cols(1, cols), yv = y.slice_cols(1, cols);
        time_us(
            s, [&] { rms_norm(s, xv, &w, group, 1e-6f, yv); }, &us, &us1);
        row("rms_norm (loop)", shape, T, us, us1, bytes, copy_gbs);
        for (Tensor t : {x, y, xa, ya}) cudaFree(t.data);
      }
    }
    cudaFree(w.data);
  }
  // Greedy sampling over V4-Flash's vocab.
  {
    const int V = 129280;
    SampleSpec* specs = static_cast<SampleSpec*>(dev(sizeof(SampleSpec) * 64));
    std::vector<SampleSpec> hs(64);
    for (int i = 0; i < 64; ++i) hs[i].row = i;
    SP_CUDA(cudaMemcpy(specs, hs.data(), sizeof(SampleSpec) * 64, cudaMemcpyHostToDevice));
    int32_t* ids = static_cast<int32_t*>(dev(4 * 64));
    for (int T : {1, 8, 64}) {
      Tensor lg = rand_tensor(T, V, DType::kF32, 20 + T);
      float us, us1;
      time_us(
          s, [&] { sample(s, ws, lg, specs, hs.data(), T, ids); }, &us, &us1);
      row("sample (argmax)", "vocab 129280", T, us, us1, 4.0 * T * V, copy_gbs);
      cudaFree(lg.data);
    }
    cudaFree(specs);
    cudaFree(ids);
  }
  // The non-finite check: the residual streams (4 x 4096) and the logits.
  {
    int32_t* flag = static_cast<int32_t*>(dev(4));
    SP_CUDA(cudaMemset(flag, 0x7f, 4));
    for (auto [cols, name] : {std::pair{16384, "residual 4x4096"}, {129280, "logits 129280"}}) {
      for (int T : {1, 8, 64}) {
        Tensor x = rand_tensor(T, cols, DType::kF32, 30 + T);
        float us, us1;
        time_us(
            s, [&] { note_non_finite(s, x, 5, flag); }, &us, &us1);
        row("note_non_finite", name, T, us, us1, 4.0 * T * cols, copy_gbs);
        cudaFree(x.data);
      }
    }
    cudaFree(flag);
  }
  // MoE with V4-Flash's gate (256 x 4096 bf16), K = 6 and tiny FP4 experts (I = 32) and shared
  // expert: the call is mostly the gate, the routing and sort, and the combine. Bytes: the gate,
  // x and y.
  {
    const int E = 256, D = 4096, I = 32, K = 6;
    MoeWeights w;
    w.kind = MlpKind::kMoe;
    w.gate = rand_matrix(WeightFormat::kFloat, E, D, 11);
    for (int e = 0; e < E; ++e) {
      w.w1.push_back(rand_matrix(WeightFormat::kFP4, I, D, 100 + 3 * e));
      w.w2.push_back(rand_matrix(WeightFormat::kFP4, D, I, 101 + 3 * e));
      w.w3.push_back(rand_matrix(WeightFormat::kFP4, I, D, 102 + 3 * e));
    }
    w.sw1 = rand_matrix(WeightFormat::kFP8, I, D, 5);
    w.sw2 = rand_matrix(WeightFormat::kFP8, D, I, 6);
    w.sw3 = rand_matrix(WeightFormat::kFP8, I, D, 7);
    w.gate_bias = rand_tensor(1, E, DType::kF32, 8);
    prepare_moe(w, s);
    int32_t* tok = static_cast<int32_t*>(dev(4 * 64));
    SP_CUDA(cudaMemset(tok, 0, 4 * 64));
    for (DType xd : {DType::kF32, DType::kBF16}) {
      for (int T : {1, 8, 64}) {
        Tensor x = rand_tensor(T, D, xd, 50 + T), y = rand_tensor(T, D, xd, 60 + T);
        BatchView host;
        host.num_tokens = T;
        DevBatch b;
        b.num_tokens = T;
        b.token_ids = tok;
        b.host = &host;
        MoeArgs a{&w, K, 1.5f, 10.0f};
        float us, us1;
        time_us(
            s, [&] { moe(s, ws, x, a, b, y); }, &us, &us1);
        char shape[64];
        std::snprintf(shape, sizeof shape, "gate 256x4096, I=32 %s", dtype_name(xd));
        row("moe (tiny experts)", shape, T, us, us1, 2.0 * E * D + 2.0 * T * D * dtype_size(xd),
            copy_gbs);
        cudaFree(x.data);
        cudaFree(y.data);
      }
    }
    cudaFree(tok);
  }
}

}  // namespace sp::cuda
