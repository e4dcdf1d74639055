// Bit-level decoding of FP4 (e2m1) and FP8 (e4m3) weight words into bf16 pairs, for the MoE's
// tensor-core kernels (moe_decode.cu). Plain integer logic, compiled for the host too, so the unit
// tests (tests/unit/test_fp_bits.cc) check it exhaustively against the dtype decoders.
//
// Both decoders give the same pair order for 8 consecutive values v0..v7: pair p (p = 0..3) is
// (v_p, v_{p+4}), v_p in the low half. The activations are staged in the matching order
// ([x0, x4, x1, x5, x2, x6, x3, x7] per 8 values, stage_pos), so a weight pair and an activation
// pair at the same place multiply the same k.
//
// The decoded values are the weights times a fixed power of two (FP4 2^-126, FP8 2^-120): one
// multiply of a bf16 pair by the scale times the inverse power (pair_scale) gives the exact scaled
// weight as long as it is a normal bf16 (fp4_scale_fast / fp8_scale_fast); other scales take the
// fp32 route.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SP_FPBITS_FN __host__ __device__ __forceinline__
#else
#define SP_FPBITS_FN inline
#endif

namespace sp::fpbits {

// __byte_perm(a, b, sel) for selector nibbles 0..7 (the only ones used here): byte i of the result
// is byte (sel >> 4i) & 7 of the 8 bytes {b, a} (a the low word).
SP_FPBITS_FN uint32_t byte_perm(uint32_t a, uint32_t b, uint32_t sel) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(a, b, sel);
#else
  const uint64_t v = (static_cast<uint64_t>(b) << 32) | a;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i)
    r |= static_cast<uint32_t>((v >> (8 * ((sel >> (4 * i)) & 7))) & 0xff) << (8 * i);
  return r;
#endif
}

// FP4: w holds v0..v7 (nibble i = bits 4i..4i+3: sign, e1, e0, m). Shifted so nibble p sits at
// bits 12..15 (and nibble p + 4 at 28..31), the sign goes to bf16 bit 15 and the magnitude bits
// (e1 e0 m) to bits 8..6: exponent field e and top mantissa bit m, i.e. (1 + m/2) 2^(e - 127) for
// e >= 1 and the subnormal m 2^-127 for e = 0: the e2m1 value times 2^-126 in every case. About 4
// integer instructions per pair.
SP_FPBITS_FN void e2m1x8_to_bf16(uint32_t w, uint32_t (&out)[4]) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int p = 0; p < 4; ++p) {
    const uint32_t q = w << (12 - 4 * p);
    out[p] = (q & 0x80008000u) | ((q >> 6) & 0x01c001c0u);
  }
}

// FP8: w0 holds v0..v3, w1 v4..v7 (byte i = value i). Bytes regrouped as (v0, v1, v4, v5) and
// (v2, v3, v6, v7); each e4m3 byte (s eeee mmm) goes to bf16 bit 15 (sign), bits 10..7 (the
// exponent field's low 4 bits) and 6..4 (the top mantissa bits): 2^(e - 127)(1 + m/8) for e >= 1,
// the subnormal (m/8) 2^-126 for e = 0, i.e. the e4m3 value times 2^-120. NaN (0x7f, 0xff) becomes
// a finite value (checkpoints hold none).
SP_FPBITS_FN void e4m3x8_to_bf16(uint32_t w0, uint32_t w1, uint32_t (&out)[4]) {
  const uint32_t r01 = byte_perm(w0, w1, 0x5410u);                   // v0 v1 v4 v5
  const uint32_t r23 = byte_perm(w0, w1, 0x7632u);                   // v2 v3 v6 v7
  out[0] = ((r01 << 8) & 0x80008000u) | ((r01 << 4) & 0x07f007f0u);  // (v0, v4)
  out[1] = (r01 & 0x80008000u) | ((r01 >> 4) & 0x07f007f0u);         // (v1, v5)
  out[2] = ((r23 << 8) & 0x80008000u) | ((r23 << 4) & 0x07f007f0u);  // (v2, v6)
  out[3] = (r23 & 0x80008000u) | ((r23 >> 4) & 0x07f007f0u);         // (v3, v7)
}

// Decoded value times 2^kFp4Shift (FP4) / 2^kFp8Shift (FP8) is the format's value.
constexpr int kFp4Shift = 126, kFp8Shift = 120;

// E8M0 scale byte s (2^(s - 127)): the multiply by 2^(s - 127 + shift) is exact (the product a
// normal bf16) for every value of the format when the factor is a normal bf16 and the smallest
// non-zero magnitude (FP4 0.5, FP8 2^-9) times 2^(s - 127) is at least 2^-126.
SP_FPBITS_FN bool fp4_scale_fast(uint32_t s) {
  return s >= 2 && s <= 128;
}
SP_FPBITS_FN bool fp8_scale_fast(uint32_t s) {
  return s >= 10 && s <= 134;
}

// bf16 pair (both halves) of 2^(s - 127 + shift); valid where the *_scale_fast test holds.
SP_FPBITS_FN uint32_t pair_scale(uint32_t s, int shift) {
  const uint32_t h = (s + static_cast<uint32_t>(shift)) << 7;  // biased exponent: s + shift
  return h | (h << 16);
}

// Place of value i (0..7) of an 8-value group in the staged activation order.
SP_FPBITS_FN int stage_pos(int i) {
  return 2 * (i & 3) + (i >> 2);
}

}  // namespace sp::fpbits
