#include "core/matrix.h"

#include <algorithm>
#include <cstring>

namespace sp {

namespace {

const float* e4m3_table() {
  static float t[256];
  static bool init = [] {
    for (int i = 0; i < 256; ++i) t[i] = e4m3_to_f32(static_cast<uint8_t>(i));
    return true;
  }();
  (void)init;
  return t;
}

// Both e2m1 values of every packed byte (low nibble first).
const float* e2m1_pair_table() {
  static float t[512];
  static bool init = [] {
    for (int b = 0; b < 256; ++b) {
      t[2 * b] = e2m1_to_f32(static_cast<uint8_t>(b & 0xf));
      t[2 * b + 1] = e2m1_to_f32(static_cast<uint8_t>(b >> 4));
    }
    return true;
  }();
  (void)init;
  return t;
}

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

}  // namespace

void Matrix::decode_row(int64_t n, float* dst) const {
  switch (format) {
    case WeightFormat::kFloat:
      to_f32(dtype, data + n * in * dtype_size(dtype), dst, in);
      return;
    case WeightFormat::kFP8: {
      const float* lut = e4m3_table();
      const uint8_t* row = data + n * in;
      for (int64_t kb = 0; kb * 128 < in; ++kb) {
        int64_t si = (n / 128) * scale_cols + kb;
        float s;
        if (scale_dtype == DType::kE8M0)
          s = e8m0_to_f32(scale[si]);
        else
          std::memcpy(&s, scale + si * 4, 4);
        int64_t end = std::min(in, (kb + 1) * 128);
        for (int64_t k = kb * 128; k < end; ++k) dst[k] = lut[row[k]] * s;
      }
      return;
    }
    case WeightFormat::kFP4: {
      // Exact: every e2m1 value times a power-of-two scale is representable in fp32.
      const float* pairs = e2m1_pair_table();
      const uint8_t* row = data + n * (in / 2);
      for (int64_t g = 0; g < in / 32; ++g) {
        int64_t si = n * scale_cols + g;
        float s;
        if (scale_dtype == DType::kE8M0)
          s = e8m0_to_f32(scale[si]);
        else
          std::memcpy(&s, scale + si * 4, 4);
        float* out = dst + g * 32;
        const uint8_t* in_bytes = row + g * 16;
        for (int c = 0; c < 16; ++c) {
          const float* p = pairs + 2 * in_bytes[c];
          out[2 * c] = p[0] * s;
          out[2 * c + 1] = p[1] * s;
        }
      }
      return;
    }
  }
}

int64_t Matrix::value_bytes() const {
  switch (format) {
    case WeightFormat::kFloat:
      return out * in * dtype_size(dtype);
    case WeightFormat::kFP8:
      return out * in;
    case WeightFormat::kFP4:
      return out * in / 2;
  }
  return 0;
}

int64_t Matrix::scale_bytes() const {
  switch (format) {
    case WeightFormat::kFloat:
      return 0;
    case WeightFormat::kFP8:
      return ceil_div(out, 128) * scale_cols * dtype_size(scale_dtype);
    case WeightFormat::kFP4:
      return out * scale_cols * dtype_size(scale_dtype);
  }
  return 0;
}

}  // namespace sp
