// Storage dtypes of upstream DeepSeek-V4 checkpoints and their exact decoders.
// Decoders are exact: every e4m3, ue8m0, e2m1 and bf16 value is representable in fp32.
#pragma once

#include <cstdint>
#include <cstring>
#include <optional>
#include <string>

namespace sp {

enum class DType { kF32, kBF16, kF16, kE4M3, kE8M0, kI8, kI32, kI64 };

// Bytes per element in storage (packed FP4 is stored as I8 holding two values).
int dtype_size(DType t);
// safetensors name ("F32", "BF16", "F8_E4M3", ...).
const char* dtype_name(DType t);
std::optional<DType> dtype_from_name(const std::string& name);
bool dtype_is_float(DType t);  // F32, BF16, F16: plain float tensors that convert exactly

inline float bf16_to_f32(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
// Round-to-nearest-even; NaN stays NaN.
uint16_t f32_to_bf16(float f);
float f16_to_f32(uint16_t v);
// FP8 e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa; no infinities; 0x7f/0xff are NaN; max 448.
float e4m3_to_f32(uint8_t v);
// Round-to-nearest-even with saturation to +-448 (the OCP "satfinite" conversion).
uint8_t f32_to_e4m3(float f);
// ue8m0: a power of two 2^(v-127); 0xff is NaN.
float e8m0_to_f32(uint8_t v);
// FP4 e2m1 nibble: sign in bit 3; magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}.
float e2m1_to_f32(uint8_t nibble);

// Converts n elements of a float-typed storage dtype (F32/BF16/F16) to fp32.
void to_f32(DType t, const void* src, float* dst, int64_t n);

}  // namespace sp
