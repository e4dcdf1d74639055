// bench_ops: times the CUDA projections and the MoE on V4-Flash shapes (random weights generated on
// the device; each case rotates among enough weight copies to exceed 4x the L2 cache). Prints one
// table: time per call, GB/s of weight bytes, TFLOP/s; then mHC pre / hc_head and the small decode
// kernels (bench_small.cu: norms, sampling, the non-finite check, gate and combine).
// BENCH_MOE_ONLY=1 skips the projections, mHC and the small kernels; BENCH_HC_ONLY=1 runs mHC
// alone; BENCH_SMALL_ONLY=1 the small kernels alone; BENCH_COPY_ONLY=1 measures the copy bandwidth
// alone.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "backend/cuda/moe_decode.cuh"
#include "bench_util.cuh"

namespace sp::cuda {
void bench_small(cudaStream_t s, Workspace& ws, double copy_gbs);  // bench_small.cu
namespace {

using namespace bench;

struct Shape {
  const char* name;
  WeightFormat f;
  int64_t N, K;
  int groups;
};

// V4-Flash's projections at decode (M = 1..64) and prefill (M = 4096), bf16 and fp32 activations:
// GB/s of weight bytes and its fraction of the copy bandwidth measured in the same run; TFLOP/s.
// "us" is the time per call of back-to-back calls; "us 1" of one call alone between two events
// (launch latency included).
void bench_linear(cudaStream_t s, Workspace& ws, int64_t l2, double copy_gbs) {
  const Shape shapes[] = {
      {"wq_a fp8", WeightFormat::kFP8, 1024, 4096, 1},
      {"wq_b fp8", WeightFormat::kFP8, 32768, 1024, 1},
      {"wkv fp8", WeightFormat::kFP8, 512, 4096, 1},
      {"wo_a fp8 g8", WeightFormat::kFP8, 8192, 4096, 8},
      {"wo_b fp8", WeightFormat::kFP8, 4096, 8192, 1},
      {"expert w1 fp4", WeightFormat::kFP4, 2048, 4096, 1},
      {"head bf16", WeightFormat::kFloat, 129280, 4096, 1},
  };
  std::printf("%-14s %4s %6s %7s %6s %9s %9s %9s %7s %9s\n", "linear", "x", "M", "N", "K", "us",
              "us 1", "GB/s", "of copy", "TFLOP/s");
  for (const Shape& sh : shapes) {
    Matrix probe = device_matrix(sh.f, sh.N, sh.K, 1);
    const int64_t bytes = probe.nbytes();
    const int copies = static_cast<int>(std::max<int64_t>(1, (4 * l2 + bytes - 1) / bytes + 1));
    std::vector<Matrix> ws_m{probe};
    for (int c = 1; c < copies; ++c) ws_m.push_back(device_matrix(sh.f, sh.N, sh.K, 1 + c));
    for (DType xd : {DType::kBF16, DType::kF32}) {
      for (int64_t M : {1, 2, 4, 8, 16, 32, 64, 4096}) {
        if (sh.f == WeightFormat::kFP4 && M > 64) continue;
        Tensor x = device_tensor(M, sh.K * sh.groups, xd, 7);
        Tensor y = device_tensor(M, sh.N, DType::kBF16, 8);
        const double flop = 2.0 * M * sh.N * sh.K;
        const bool big = flop > 1e12;
        auto call = [&](int i) {
          if (sh.groups > 1)
            grouped_linear(s, ws, x, ws_m[i % copies], sh.groups, y);
          else
            linear(s, ws, x, ws_m[i % copies], y);
        };
        const float ms = time_batch_ms(s, big ? 3 : 10, big ? copies : std::max(copies, 16), call);
        const float ms1 = big ? ms : time_ms(s, 20, call);
        const double gbs = bytes / (ms * 1e-3) / 1e9;
        std::printf("%-14s %4s %6lld %7lld %6lld %9.1f %9.1f %9.0f %6.0f%% %9.1f\n", sh.name,
                    dtype_name(xd), static_cast<long long>(M), static_cast<long long>(sh.N),
                    static_cast<long long>(sh.K), ms * 1e3, ms1 * 1e3, gbs, 100.0 * gbs / copy_gbs,
                    flop / (ms * 1e-3) / 1e12);
        cudaFree(x.data);
        cudaFree(y.data);
      }
    }
    for (Matrix& m : ws_m) free_matrix(m);
  }
}

// The whole moe() call (gate, route, sort, experts, combine) on V4-Flash shapes: FP4 routed
// experts, FP8 shared expert, learned routing, for both tensor-core minimums ("tc": experts of one
// token on the CUDA-core decode kernels at 2, on the tensor cores at 1). GB/s counts the weight
// bytes a call touches (the experts hit, the shared expert, the gate), each once per chunk of
// 1,024 tokens (above 1,024 tokens: the last chunk's hit count times the chunks); "of copy" is
// that against the copy bandwidth measured at start-up; TFLOP/s counts the experts' multiply-adds
// (2 T (K + 1) 3 I D).
void bench_moe(cudaStream_t s, Workspace& ws, double copy_gbs) {
  const int E = 256, D = 4096, I = 2048, K = 6, vocab = 4096, most_tokens = 16384;
  MoeWeights w;
  w.kind = MlpKind::kMoe;
  w.gate = device_matrix(WeightFormat::kFloat, E, D, 11);
  for (int e = 0; e < E; ++e) {
    w.w1.push_back(device_matrix(WeightFormat::kFP4, I, D, 100 + 3 * e));
    w.w2.push_back(device_matrix(WeightFormat::kFP4, D, I, 101 + 3 * e));
    w.w3.push_back(device_matrix(WeightFormat::kFP4, I, D, 102 + 3 * e));
  }
  w.sw1 = device_matrix(WeightFormat::kFP8, I, D, 5);
  w.sw2 = device_matrix(WeightFormat::kFP8, D, I, 6);
  w.sw3 = device_matrix(WeightFormat::kFP8, I, D, 7);
  std::vector<float> bias(E, 0.0f);
  void* bias_d = nullptr;
  SP_CUDA(cudaMalloc(&bias_d, E * 4));
  SP_CUDA(cudaMemcpy(bias_d, bias.data(), E * 4, cudaMemcpyHostToDevice));
  w.gate_bias = Tensor{bias_d, 1, E, E, DType::kF32, Device::kCuda};
  prepare_moe(w, s);
  std::vector<int32_t> ids(most_tokens);
  std::mt19937 rng(3);
  for (auto& v : ids) v = static_cast<int32_t>(rng() % vocab);
  int32_t* ids_d = nullptr;
  SP_CUDA(cudaMalloc(&ids_d, ids.size() * 4));
  SP_CUDA(cudaMemcpy(ids_d, ids.data(), ids.size() * 4, cudaMemcpyHostToDevice));
  const double expert_bytes = 3.0 * w.w1[0].nbytes(), shared_bytes = 3.0 * w.sw1.nbytes();
  {
    // The gate alone (part of every call): [T, 4096] x [256, 4096]^T bf16.
    Tensor x = device_tensor(1, D, DType::kBF16, 40);
    Tensor lg = device_tensor(1, E, DType::kF32, 41);
    const float ms = time_ms(s, 40, [&](int) { linear(s, ws, x, w.gate, lg); });
    std::printf("\nmoe gate alone (T = 1): %.1f us\n", ms * 1e3);
    cudaFree(x.data);
    cudaFree(lg.data);
  }
  std::printf("%-14s %3s %6s %5s %10s %12s %9s %8s %9s\n", "moe (Flash)", "tc", "T", "x", "us",
              "experts hit", "GB/s", "of copy", "TFLOP/s");
  const int tc_default = ws.moe_tc_min_tokens;
  for (int tc_min : {2, 1}) {
    ws.moe_tc_min_tokens = tc_min;
    for (DType xd : {DType::kBF16, DType::kF32}) {
      for (int T : {1, 2, 4, 8, 16, 32, 64, 4096, most_tokens}) {
        const bool big = T > 1024;
        const int inputs = big ? 2 : 8;  // distinct inputs hit distinct experts
        std::vector<Tensor> xs;
        for (int i = 0; i < inputs; ++i) xs.push_back(device_tensor(T, D, xd, 40 + i));
        Tensor y = device_tensor(T, D, xd, 9);
        BatchView host;
        host.num_tokens = T;
        DevBatch b;
        b.num_tokens = T;
        b.token_ids = ids_d;
        b.host = &host;
        MoeArgs a{&w, K, 1.5f, 10.0f};
        const float ms =
            time_ms(s, big ? 5 : 40, [&](int i) { moe(s, ws, xs[i % inputs], a, b, y); });
        // Hit count of the last call's last chunk (the sort's metadata: the active count follows
        // 3 (E + 1) ints).
        moe(s, ws, xs[0], a, b, y);
        int nact = 0;
        const int* meta = static_cast<const int*>(ws.get(kWsMoeMeta, 0));
        SP_CUDA(cudaMemcpyAsync(&nact, meta + 3 * (E + 1), 4, cudaMemcpyDeviceToHost, s));
        SP_CUDA(cudaStreamSynchronize(s));
        const int chunks = (T + 1023) / 1024;
        const double bytes = chunks * ((nact - 1) * expert_bytes + shared_bytes +
                                       static_cast<double>(w.gate.nbytes()));
        const double gbs = bytes / (ms * 1e-3) / 1e9;
        const double flop = 2.0 * T * (K + 1) * 3.0 * I * D;
        std::printf("%-14s %3d %6d %5s %10.1f %12d %9.0f %7.0f%% %9.1f\n", "moe", tc_min, T,
                    dtype_name(xd), ms * 1e3, nact - 1, gbs, 100.0 * gbs / copy_gbs,
                    flop / (ms * 1e-3) / 1e12);
        if (T >= 8) {
          // The tensor-core expert kernels alone (moe_tc: staging, up and down passes over every
          // token range) on the routing of the last call's last chunk (up to 1,024 tokens, left
          // in the workspace): without the gate, the sort, the combine and (tc 2) the one-token
          // experts' decode kernels; TFLOP/s counts every pair's multiply-adds.
          const int Tc = std::min(T, 1024);
          MoeTcStep ts;
          ts.tab = static_cast<const DevExpert*>(w.table.data);
          ts.meta = meta;
          ts.pairs = static_cast<const int*>(ws.get(kWsMoePairs, 0));
          ts.T = Tc;
          ts.K = K;
          ts.E = E;
          ts.min_tok = tc_min;
          ts.x = xs[0].data;
          ts.ldx = xs[0].stride;
          ts.x_bf16 = xd == DType::kBF16;
          ts.D = D;
          ts.Imax = I;
          ts.I = I;
          ts.Is = I;
          ts.limit = 10.0f;
          ts.o = static_cast<float*>(ws.get(kWsMoeO, 0));
          const float ems = time_ms(s, big ? 10 : 40, [&](int) { moe_tc(s, ws, ts); });
          const double eflop = 2.0 * Tc * (K + 1) * 3.0 * I * D;
          std::printf("%-14s %3d %6d %5s %10.1f %12s %9s %8s %9.1f\n", "moe experts", tc_min, Tc,
                      dtype_name(xd), ems * 1e3, "-", "-", "-", eflop / (ems * 1e-3) / 1e12);
        }
        for (auto& x : xs) cudaFree(x.data);
        cudaFree(y.data);
      }
    }
  }
  ws.moe_tc_min_tokens = tc_default;
}

// mHC pre (hc_pre) and hc_head on V4-Flash shapes (hc_mult 4, hidden 4096: fn [24, 16384] f32,
// 1.5 MB; X [T, 16384] f32, the residual streams): each call rotates among enough fn / X copies
// to exceed 4x the L2 cache, as a decode step whose 86 calls each read another layer's fn. GB/s
// counts fn + X read once and x written (f32); "of copy" is that against the copy bandwidth.
void bench_hc(cudaStream_t s, Workspace& ws, int64_t l2, double copy_gbs) {
  const int hc = 4;
  const int64_t D = 4096, W = hc * D;
  std::printf("\n%-14s %6s %5s %9s %9s %9s %8s\n", "mhc (Flash)", "T", "x", "us", "us 1", "GB/s",
              "of copy");
  for (bool head : {false, true}) {
    const int mix = head ? hc : (2 + hc) * hc;
    for (int64_t T : {1, 2, 8, 64, 4096}) {
      if (head && T > 8) continue;  // hc_head runs on the sampled rows only
      const double bytes = 4.0 * (mix * W + T * W + T * D);
      const int copies = static_cast<int>(std::max<int64_t>(
          2, (4 * l2 + static_cast<int64_t>(bytes) - 1) / static_cast<int64_t>(bytes) + 1));
      std::vector<HcWeights> ps;
      std::vector<Tensor> Xs;
      for (int c = 0; c < copies; ++c) {
        HcWeights p;
        p.fn = device_tensor(mix, W, DType::kF32, 60 + c, 4);
        p.base = device_tensor(1, mix, DType::kF32, 61 + c, 4);
        p.scale = device_tensor(1, head ? 1 : 3, DType::kF32, 62 + c, 4);
        ps.push_back(p);
        Xs.push_back(device_tensor(T, W, DType::kF32, 70 + c, 4));
      }
      // Up to 2 tokens: the one-launch path ("fused", the default) and the two launches ("split").
      for (int limit : {2, 0})
        for (DType xd : {DType::kF32, DType::kBF16}) {
          if (limit == 0 && T > 2) continue;
          const int prev_limit = set_hc_fuse_max_tokens(limit);
          const char* label = T > 2   ? (head ? "hc_head" : "hc_pre")
                              : limit ? (head ? "hc_head fused" : "hc_pre fused")
                                      : (head ? "hc_head split" : "hc_pre split");
          Tensor x = device_tensor(T, D, xd, 80);
          Tensor post = device_tensor(T, hc, DType::kF32, 81, 4);
          Tensor comb = device_tensor(T, hc * hc, DType::kF32, 82, 4);
          auto call = [&](int i) {
            const int c = i % copies;
            if (head)
              hc_head(s, ws, Xs[c], ps[c], hc, 1e-6f, 1e-6f, x);
            else
              hc_pre(s, ws, Xs[c], ps[c], hc, 20, 1e-6f, 1e-6f, x, post, comb);
          };
          const float ms = time_batch_ms(s, 10, std::max(copies, 16), call);
          const float ms1 = time_ms(s, 20, call);
          const double gbs = bytes / (ms * 1e-3) / 1e9;
          std::printf("%-14s %6lld %5s %9.1f %9.1f %9.0f %7.0f%%\n", label,
                      static_cast<long long>(T), dtype_name(xd), ms * 1e3, ms1 * 1e3, gbs,
                      100.0 * gbs / copy_gbs);
          // The same followed by the sublayer's RMS norm of x (hc_pre_norm / hc_head_norm: inside
          // the one launch where it runs, else a second call).
          Tensor xn = device_tensor(T, D, xd, 83);
          Tensor nw = device_tensor(1, D, DType::kF32, 84, 4);
          auto call_norm = [&](int i) {
            const int c = i % copies;
            if (head)
              hc_head_norm(s, ws, Xs[c], ps[c], hc, 1e-6f, 1e-6f, &nw, x);
            else
              hc_pre_norm(s, ws, Xs[c], ps[c], hc, 20, 1e-6f, 1e-6f, &nw, x, xn, post, comb);
          };
          const float msn = time_batch_ms(s, 10, std::max(copies, 16), call_norm);
          const float msn1 = time_ms(s, 20, call_norm);
          std::printf("%-14s %6lld %5s %9.1f %9.1f\n", "  + rms norm", static_cast<long long>(T),
                      dtype_name(xd), msn * 1e3, msn1 * 1e3);
          set_hc_fuse_max_tokens(prev_limit);
          cudaFree(xn.data);
          cudaFree(nw.data);
          cudaFree(x.data);
          cudaFree(post.data);
          cudaFree(comb.data);
        }
      for (int c = 0; c < copies; ++c) {
        cudaFree(ps[c].fn.data);
        cudaFree(ps[c].base.data);
        cudaFree(ps[c].scale.data);
        cudaFree(Xs[c].data);
      }
    }
  }
}

}  // namespace
}  // namespace sp::cuda

int main() {
  using namespace sp::cuda;
  cudaDeviceProp prop{};
  SP_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount,
              prop.l2CacheSize >> 20);
  cudaStream_t s;
  SP_CUDA(cudaStreamCreate(&s));
  {
    Workspace ws(s);
    // Copy bandwidth ceiling: device-to-device copy of 1 GB (bytes read + written).
    void *a = nullptr, *b = nullptr;
    const size_t n = size_t{1} << 30;
    SP_CUDA(cudaMalloc(&a, n));
    SP_CUDA(cudaMalloc(&b, n));
    const float ms = time_ms(
        s, 10, [&](int) { SP_CUDA(cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice, s)); });
    const double copy_gbs = 2.0 * n / (ms * 1e-3) / 1e9;
    std::printf("copy 1 GB: %.0f GB/s (read + write)\n\n", copy_gbs);
    cudaFree(a);
    cudaFree(b);
    // BENCH_COPY_ONLY=1: the ceiling alone (the floors of the whole-model benchmarks use it).
    if (getenv("BENCH_HC_ONLY")) {
      bench_hc(s, ws, prop.l2CacheSize, copy_gbs);
    } else if (getenv("BENCH_SMALL_ONLY")) {
      bench_small(s, ws, copy_gbs);
    } else if (!getenv("BENCH_COPY_ONLY")) {
      if (!getenv("BENCH_MOE_ONLY")) bench_linear(s, ws, prop.l2CacheSize, copy_gbs);
      bench_moe(s, ws, copy_gbs);
      if (!getenv("BENCH_MOE_ONLY")) {
        bench_hc(s, ws, prop.l2CacheSize, copy_gbs);
        bench_small(s, ws, copy_gbs);
      }
    }
  }
  SP_CUDA(cudaStreamDestroy(s));
  return 0;
}
