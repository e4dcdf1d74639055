// A weight matrix [out, in] exactly as stored: plain floats, FP8 e4m3 with 128x128 block scales,
// or FP4 e2m1 (two per byte, low nibble first) with a scale per 32 inputs. Quantised values and
// their scales stay separate ({values, scales, scheme}); a scale is never hidden in a dtype.
// The same view describes the checkpoint's bytes (host) and a backend's copy (`device`).
#pragma once

#include <cstdint>
#include <string>

#include "core/dtype.h"
#include "core/kinds.h"
#include "core/tensor.h"

namespace sp {

// A generated (--load-format dummy) matrix described by its generator's parameters instead of its
// bytes: the backend's upload makes the bytes where they will live (core/dummy.h is the host
// generator, the CUDA backend has a kernel that computes the same bytes on the device). Values
// unit i (an element for kFloat / kFP8, a packed byte for kFP4) is a function of (key, i) only.
struct DummyGen {
  bool on = false;
  uint64_t key = 0;  // splitmix64(seed ^ fnv1a(name))
  // kFloat: the amplitude (bf16 value = round(mul * u)); kFP8: amplitude * 2^-scale_exp (e4m3 code
  // = encode(round_bf16(mul * u))); kFP4: unused (the packed byte is the hash's top byte).
  float mul = 0.0f;
  int scale_exp = 0;  // kFP8 / kFP4: every ue8m0 scale byte is scale_exp + 127
};

struct Matrix {
  std::string name;
  WeightFormat format = WeightFormat::kFloat;
  DType dtype = DType::kF32;  // value dtype (float formats: F32 / BF16 / F16)
  int64_t out = 0, in = 0;
  const uint8_t* data = nullptr;     // kFloat: [out, in]; kFP8: e4m3 [out, in]; kFP4: [out, in/2]
  const uint8_t* scale = nullptr;    // kFP8: [ceil(out/128), ceil(in/128)]; kFP4: [out, in/32]
  DType scale_dtype = DType::kE8M0;  // E8M0 upstream; F32 accepted as well
  int64_t scale_cols = 0;
  Device device = Device::kHost;
  // With dummy.on, data and scale are null until a backend's upload generates them (value dtype
  // BF16 for kFloat, E4M3 for kFP8, I8 for kFP4; scales E8M0).
  DummyGen dummy;
  bool valid() const { return data != nullptr || dummy.on; }
  // Writes the exact fp32 values of row n (host matrices only).
  void decode_row(int64_t n, float* dst) const;
  // Storage bytes of the values and of the scales.
  int64_t value_bytes() const;
  int64_t scale_bytes() const;
  int64_t nbytes() const { return value_bytes() + scale_bytes(); }
};

}  // namespace sp
