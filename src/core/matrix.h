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
  bool valid() const { return data != nullptr; }
  // Writes the exact fp32 values of row n (host matrices only).
  void decode_row(int64_t n, float* dst) const;
  // Storage bytes of the values and of the scales.
  int64_t value_bytes() const;
  int64_t scale_bytes() const;
  int64_t nbytes() const { return value_bytes() + scale_bytes(); }
};

}  // namespace sp
