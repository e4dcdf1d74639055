// Integer-only decode of packed e4m3 weights into f16 pairs, written once for the device kernels
// (gemm.cu) and the host unit test that checks it against the CPU decoder over every code
// (tests/unit/test_weight_bits.cc). Plain C++ when not compiled by nvcc: no CUDA headers here.
//
// The f16 bits (b & 0x80) << 8 | (b & 0x7f) << 7 of an e4m3 byte b are exactly the e4m3 value
// times 2^-8: the sign lands on f16's sign, e4m3's 4-bit exponent (bias 7) on the low 4 bits of
// f16's 5-bit exponent (bias 15, so 2^(e - 15) = 2^(e - 7) * 2^-8) and the 3 mantissa bits on the
// top of f16's 10. e4m3 subnormals (e = 0, m / 8 * 2^-6) become f16 subnormals (m << 7 * 2^-24 =
// m * 2^-17 = m / 8 * 2^-6 * 2^-8), zero stays zero. The NaN codes 0x7f / 0xff are the one
// exception: they come out as +-1.875 (480 * 2^-8); callers detect them with e4m3x16_has_nan and
// turn the chunk's scale into NaN, which is what decoding them to NaN gives (the result of every
// product that reads one is NaN).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SP_HD __host__ __device__ __forceinline__
#else
#define SP_HD inline
#endif

namespace sp::cuda {

// PTX prmt.b32 in its default mode: byte i of the result is byte (sel >> 4i) & 7 of {b:a} (a is
// bytes 0..3), or, when bit 3 of that selector nibble is set, that byte's sign bit replicated
// over 8 bits.
SP_HD uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
#if defined(__CUDA_ARCH__)
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
  return r;
#else
  const uint64_t both = (uint64_t{b} << 32) | a;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) {
    const uint32_t s = (sel >> (4 * i)) & 0xfu;
    uint32_t byte = static_cast<uint32_t>(both >> (8 * (s & 7u))) & 0xffu;
    if (s & 8u) byte = (byte & 0x80u) ? 0xffu : 0x00u;
    r |= byte << (8 * i);
  }
  return r;
#endif
}

SP_HD uint32_t rotr1(uint32_t x) {
#if defined(__CUDA_ARCH__)
  return __funnelshift_r(x, x, 1);
#else
  return (x >> 1) | (x << 31);
#endif
}

// Bytes (b_lo, b_hi) of a, picked by kSel, as an f16 pair (b_lo in the low half) of their values
// times 2^-8. kSel places sx(b_hi) in byte 0, b_lo in byte 1, sx(b_lo) in byte 2 and b_hi in
// byte 3 (sx: the sign replicated); rotating right by one then puts b_lo's magnitude at bits
// 7..13, its sign (bit 0 of byte 2) at bit 15, b_hi's magnitude at 23..29 and its sign (bit 0 of
// byte 0) at bit 31; the mask clears the other bits. Three instructions: PRMT, SHF, LOP3.
template <uint32_t kSel>
SP_HD uint32_t e4m3x2_to_f16x2_bits(uint32_t a) {
  return rotr1(prmt(a, 0, kSel)) & 0xbf80bf80u;
}
constexpr uint32_t kSelPair01 = 0x1809u;  // bytes 0, 1
constexpr uint32_t kSelPair23 = 0x3a2bu;  // bytes 2, 3

// The four e4m3 values of a (byte i = value i) as two f16 pairs times 2^-8: lo = values 0, 1;
// hi = values 2, 3.
SP_HD void e4m3x4_to_f16x2_bits(uint32_t a, uint32_t& lo, uint32_t& hi) {
  lo = e4m3x2_to_f16x2_bits<kSelPair01>(a);
  hi = e4m3x2_to_f16x2_bits<kSelPair23>(a);
}

// True when one of the 16 bytes is a NaN code (low 7 bits all ones): adding 1 to the low 7 bits
// of each byte carries into bit 7 only for 0x7f, and never into the next byte.
SP_HD bool e4m3x16_has_nan(uint32_t w0, uint32_t w1, uint32_t w2, uint32_t w3) {
  constexpr uint32_t kMag = 0x7f7f7f7fu, kOne = 0x01010101u;
  const uint32_t t =
      ((w0 & kMag) + kOne) | ((w1 & kMag) + kOne) | ((w2 & kMag) + kOne) | ((w3 & kMag) + kOne);
  return (t & 0x80808080u) != 0;
}

// Eight e2m1 values of one word (nibble j = value j, low nibble first) as four f16 pairs times
// 2^-14: pair i holds values i (low half) and i + 4 (high half), so that each pair needs one mask
// and shift per field: a nibble (s e e m) puts e e m at f16 bits 9..11 and s at bit 15, which is
// the e2m1 value times 2^-14 (normals, and the 0.5 subnormal as an f16 subnormal).
SP_HD void e2m1x8_to_f16x2_bits(uint32_t w, uint32_t (&h)[4]) {
  h[0] = ((w & 0x00070007u) << 9) | ((w & 0x00080008u) << 12);
  h[1] = ((w & 0x00700070u) << 5) | ((w & 0x00800080u) << 8);
  h[2] = ((w & 0x07000700u) << 1) | ((w & 0x08000800u) << 4);
  h[3] = ((w & 0x70007000u) >> 3) | (w & 0x80008000u);
}

}  // namespace sp::cuda
