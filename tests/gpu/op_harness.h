// Op parity harness: the same op on the CPU backend (the oracle) and the CUDA backend, on random
// inputs, compared by relative L2 error. Every test skips when no GPU is present.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "backend/backend.h"
#include "core/dtype.h"

namespace sp::test {

#define SP_REQUIRE_GPU()                                               \
  do {                                                                 \
    if (!::sp::cuda_device_available()) GTEST_SKIP() << "no CUDA GPU"; \
  } while (0)

struct Backends {
  std::unique_ptr<Backend> cpu, gpu;
  Backends(const BackendLimits& lim = default_limits()) {
    cpu = make_cpu_backend(2, 1);
    auto g = make_cuda_backend(0);
    EXPECT_TRUE(g.is_ok()) << g.status().message();
    if (g) gpu = std::move(*g);
    cpu->reserve(lim);
    if (gpu) gpu->reserve(lim);
  }
  static BackendLimits default_limits() {
    BackendLimits l;
    l.max_tokens = 4096;
    l.max_seqs = 64;
    l.max_logit_rows = 256;
    l.max_blocks = 4096;
    l.vocab = 1 << 17;
    l.block_tokens = 256;
    return l;
  }
};

inline std::vector<float> random_vec(int64_t n, uint64_t seed, float scale = 1.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = d(rng);
  return v;
}

// Rounds values to bf16 (so both backends see the same inputs when the GPU stores bf16).
inline std::vector<float> round_bf16(std::vector<float> v) {
  for (auto& x : v) x = bf16_to_f32(f32_to_bf16(x));
  return v;
}

// A backend tensor [rows, cols] of `dtype` holding `v` (converted).
inline Tensor make_tensor(Backend& be, const std::vector<float>& v, int64_t rows, int64_t cols,
                          DType dtype) {
  Tensor t = be.alloc(rows, cols, dtype);
  if (dtype == DType::kF32) {
    be.from_host(v.data(), t);
  } else if (dtype == DType::kBF16) {
    std::vector<uint16_t> b(v.size());
    for (size_t i = 0; i < v.size(); ++i) b[i] = f32_to_bf16(v[i]);
    be.from_host(b.data(), t);
  } else {
    ADD_FAILURE() << "make_tensor: unsupported dtype";
  }
  return t;
}

inline Tensor make_i32(Backend& be, const std::vector<int32_t>& v, int64_t rows, int64_t cols) {
  Tensor t = be.alloc(rows, cols, DType::kI32);
  be.from_host(v.data(), t);
  return t;
}

inline std::vector<float> read_f32(Backend& be, Tensor t) {
  std::vector<float> out(static_cast<size_t>(t.numel()));
  if (t.dtype == DType::kF32) {
    be.to_host(t, out.data());
    return out;
  }
  std::vector<uint8_t> raw(static_cast<size_t>(t.numel() * t.elem_size()));
  be.to_host(t, raw.data());
  to_f32(t.dtype, raw.data(), out.data(), t.numel());
  return out;
}

inline std::vector<int32_t> read_i32(Backend& be, Tensor t) {
  std::vector<int32_t> out(static_cast<size_t>(t.numel()));
  be.to_host(t, out.data());
  return out;
}

// ||a - b|| / ||b|| (b: the reference). NaN anywhere gives infinity.
inline double rel_l2(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    if (!std::isfinite(a[i]) || !std::isfinite(b[i])) return INFINITY;
    double d = static_cast<double>(a[i]) - b[i];
    num += d * d;
    den += static_cast<double>(b[i]) * b[i];
  }
  if (a.size() != b.size()) return INFINITY;
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

// A random host weight matrix in the given format (values a quantised weight can hold), with its
// storage kept alive by `keep`.
struct HostMatrix {
  Matrix m;
  std::vector<uint8_t> data, scale;
};

inline HostMatrix random_matrix(WeightFormat f, int64_t out, int64_t in, uint64_t seed,
                                DType float_dtype = DType::kBF16, float scale = 0.05f) {
  HostMatrix h;
  Matrix& m = h.m;
  m.name = "test.weight";
  m.format = f;
  m.out = out;
  m.in = in;
  std::mt19937_64 rng(seed);
  if (f == WeightFormat::kFloat) {
    m.dtype = float_dtype;
    auto v = random_vec(out * in, seed, scale);
    h.data.resize(static_cast<size_t>(out * in * dtype_size(float_dtype)));
    for (int64_t i = 0; i < out * in; ++i) {
      if (float_dtype == DType::kF32) {
        std::memcpy(h.data.data() + i * 4, &v[i], 4);
      } else {
        uint16_t b = f32_to_bf16(v[i]);
        std::memcpy(h.data.data() + i * 2, &b, 2);
      }
    }
  } else if (f == WeightFormat::kFP8) {
    m.dtype = DType::kE4M3;
    h.data.resize(static_cast<size_t>(out * in));
    for (auto& b : h.data) {
      b = static_cast<uint8_t>(rng() & 0xff);
      if ((b & 0x7f) == 0x7f) b &= 0xfe;  // no NaN
    }
    m.scale_cols = (in + 127) / 128;
    h.scale.resize(static_cast<size_t>(((out + 127) / 128) * m.scale_cols));
    for (auto& s : h.scale) s = static_cast<uint8_t>(127 - 10 + rng() % 4);  // ~2^-10..2^-7
  } else {
    m.dtype = DType::kI8;
    h.data.resize(static_cast<size_t>(out * in / 2));
    for (auto& b : h.data) b = static_cast<uint8_t>(rng() & 0xff);
    m.scale_cols = in / 32;
    h.scale.resize(static_cast<size_t>(out * m.scale_cols));
    for (auto& s : h.scale) s = static_cast<uint8_t>(127 - 6 + rng() % 3);
  }
  m.data = h.data.data();
  m.scale = h.scale.empty() ? nullptr : h.scale.data();
  return h;
}

// Turns h's E8M0 scales into F32 scales that are not powers of two (as Base checkpoints store
// them): each the E8M0 value times a factor in [1, 1.9) drawn from `seed`.
inline void use_f32_scales(HostMatrix& h, uint64_t seed) {
  std::mt19937_64 rng(seed * 13 + 5);
  std::uniform_real_distribution<float> u(1.0f, 1.9f);
  std::vector<uint8_t> s(h.scale.size() * 4);
  for (size_t i = 0; i < h.scale.size(); ++i) {
    const float v = e8m0_to_f32(h.scale[i]) * u(rng);
    std::memcpy(s.data() + i * 4, &v, 4);
  }
  h.scale = std::move(s);
  h.m.scale_dtype = DType::kF32;
  h.m.scale = h.scale.data();
}

}  // namespace sp::test
