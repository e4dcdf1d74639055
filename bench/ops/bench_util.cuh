// Shared by the op benchmarks (bench_ops, bench_lt): device-side random weights and activations,
// and event timing. Device code; included by .cu files of bench/ops only.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

#include "backend/cuda/kernels.h"

namespace sp::cuda::bench {

// Random bytes by kind: 0 any; 1 e4m3 without NaN codes; 2 E8M0 scales near 2^-9; 3 small finite
// bf16 values; 4 small finite f32 values.
__global__ void fill_bytes(uint8_t* p, int64_t n, uint64_t seed, int kind) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    uint64_t z = (i + 1) * 0x9e3779b97f4a7c15ull + seed;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    uint8_t b = static_cast<uint8_t>(z);
    if (kind == 1 && (b & 0x7f) == 0x7f) b &= 0xfe;                           // e4m3 without NaN
    if (kind == 2) b = static_cast<uint8_t>(118 + (z >> 8) % 4);              // e8m0 scales ~2^-9
    if (kind == 3) b = (i % 2) ? static_cast<uint8_t>(0x3c + (b & 0x3)) : b;  // small bf16
    if (kind == 4) b = (i % 4 == 3) ? static_cast<uint8_t>(0x3c + (b & 0x3)) : b;  // small f32
    p[i] = b;
  }
}

void fill(void* p, int64_t n, uint64_t seed, int kind) {
  fill_bytes<<<1024, 256>>>(static_cast<uint8_t*>(p), n, seed, kind);
  SP_CUDA_LAUNCH();
}

Matrix device_matrix(WeightFormat f, int64_t out, int64_t in, uint64_t seed) {
  Matrix m;
  m.name = "bench";
  m.format = f;
  m.out = out;
  m.in = in;
  m.device = Device::kCuda;
  if (f == WeightFormat::kFloat) {
    m.dtype = DType::kBF16;
  } else if (f == WeightFormat::kFP8) {
    m.dtype = DType::kE4M3;
    m.scale_cols = (in + 127) / 128;
  } else {
    m.dtype = DType::kI8;
    m.scale_cols = in / 32;
  }
  void* d = nullptr;
  SP_CUDA(cudaMalloc(&d, m.value_bytes()));
  fill(d, m.value_bytes(), seed, f == WeightFormat::kFP8 ? 1 : f == WeightFormat::kFloat ? 3 : 0);
  m.data = static_cast<uint8_t*>(d);
  if (f != WeightFormat::kFloat) {
    void* s = nullptr;
    SP_CUDA(cudaMalloc(&s, m.scale_bytes()));
    fill(s, m.scale_bytes(), seed + 1, 2);
    m.scale = static_cast<uint8_t*>(s);
  }
  return m;
}

void free_matrix(Matrix& m) {
  cudaFree(const_cast<uint8_t*>(m.data));
  if (m.scale) cudaFree(const_cast<uint8_t*>(m.scale));
}

// kind 3: bytes that are small finite bf16 values (read as f32 too); 4: small finite f32 values.
Tensor device_tensor(int64_t rows, int64_t cols, DType dt, uint64_t seed, int kind = 3) {
  void* p = nullptr;
  SP_CUDA(cudaMalloc(&p, rows * cols * dtype_size(dt)));
  fill(p, rows * cols * dtype_size(dt), seed, kind);
  return Tensor{p, rows, cols, cols, dt, Device::kCuda};
}

// Median over `reps` of the time per call of `batch` back-to-back calls fn(i) (i rotates the
// inputs), after `warmup` calls (default `batch`): the device stays busy, so the host's launch
// latency is not counted (as in a decode step that the host enqueues ahead).
template <typename Fn>
float time_batch_ms(cudaStream_t s, int reps, int batch, Fn fn, int warmup = -1) {
  for (int i = 0; i < (warmup < 0 ? batch : warmup); ++i) fn(i);
  std::vector<float> t;
  cudaEvent_t a, b;
  SP_CUDA(cudaEventCreate(&a));
  SP_CUDA(cudaEventCreate(&b));
  for (int r = 0; r < reps; ++r) {
    SP_CUDA(cudaEventRecord(a, s));
    for (int i = 0; i < batch; ++i) fn(r * batch + i);
    SP_CUDA(cudaEventRecord(b, s));
    SP_CUDA(cudaEventSynchronize(b));
    float ms = 0;
    SP_CUDA(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms / batch);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// Median of `reps` timed calls of fn(i) (i rotates the inputs), each timed alone (the host's
// launch latency included), after 3 warm-up calls.
template <typename Fn>
float time_ms(cudaStream_t s, int reps, Fn fn) {
  return time_batch_ms(s, reps, 1, fn, 3);
}

void* dalloc(size_t n) {
  void* p = nullptr;
  SP_CUDA(cudaMalloc(&p, n));
  return p;
}

}  // namespace sp::cuda::bench
