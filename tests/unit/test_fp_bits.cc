// The bit logic of the MoE tensor-core kernels' weight decoding (backend/cuda/fp_bits.h, compiled
// here for the host) against the dtype decoders: every FP4 / FP8 value in every place of a word,
// every pair of values that share an output register, the scale multiply over the whole E8M0
// range it claims, and the activation staging order.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <random>

#include "backend/cuda/fp_bits.h"
#include "core/dtype.h"

namespace sp {
namespace {

using fpbits::kFp4Shift;
using fpbits::kFp8Shift;

float bf16_lo(uint32_t pair) {
  return std::bit_cast<float>(pair << 16);
}
float bf16_hi(uint32_t pair) {
  return std::bit_cast<float>(pair & 0xffff0000u);
}

// Value i (0..7) of an 8-value group as the decoders place it: pair i & 3, low half for i < 4.
float decoded(const uint32_t (&out)[4], int i) {
  return i < 4 ? bf16_lo(out[i]) : bf16_hi(out[i - 4]);
}

bool same(float a, float b) {
  return a == b && std::signbit(a) == std::signbit(b);
}

void check_fp4_word(uint32_t w) {
  uint32_t out[4];
  fpbits::e2m1x8_to_bf16(w, out);
  for (int i = 0; i < 8; ++i) {
    const uint8_t nib = static_cast<uint8_t>((w >> (4 * i)) & 0xfu);
    const float want = e2m1_to_f32(nib);
    const float got = std::ldexp(decoded(out, i), kFp4Shift);
    ASSERT_TRUE(same(got, want)) << std::hex << "word " << w << " value " << i << " nibble "
                                 << int{nib} << ": " << got << " want " << want;
  }
}

void check_fp8_words(uint32_t w0, uint32_t w1) {
  uint32_t out[4];
  fpbits::e4m3x8_to_bf16(w0, w1, out);
  for (int i = 0; i < 8; ++i) {
    const uint8_t b = static_cast<uint8_t>(((i < 4 ? w0 : w1) >> (8 * (i & 3))) & 0xffu);
    const float want = e4m3_to_f32(b);
    if (std::isnan(want)) continue;  // NaN codes: not in checkpoints (see fp_bits.h)
    const float got = std::ldexp(decoded(out, i), kFp8Shift);
    ASSERT_TRUE(same(got, want)) << std::hex << "words " << w0 << " " << w1 << " value " << i
                                 << " byte " << int{b} << ": " << got << " want " << want;
  }
}

TEST(FpBits, Fp4EveryPairOfEveryRegister) {
  // Pair p holds nibbles p and p + 4: all 256 combinations of each, the other nibbles random.
  std::mt19937 rng(1);
  for (int p = 0; p < 4; ++p)
    for (uint32_t a = 0; a < 16; ++a)
      for (uint32_t b = 0; b < 16; ++b) {
        uint32_t w = rng();
        w &= ~((0xfu << (4 * p)) | (0xfu << (4 * (p + 4))));
        w |= (a << (4 * p)) | (b << (4 * (p + 4)));
        check_fp4_word(w);
      }
  // Every low half with a varying high half, and the reverse.
  for (uint32_t x = 0; x < 65536; ++x) {
    check_fp4_word(x | ((x * 40503u) & 0xffffu) << 16);
    check_fp4_word((x << 16) | ((x * 40503u) & 0xffffu));
  }
}

TEST(FpBits, Fp8EveryPairOfEveryRegister) {
  // Pair p holds byte p of w0 and byte p of w1: all 65536 combinations for each p.
  std::mt19937 rng(2);
  for (int p = 0; p < 4; ++p)
    for (uint32_t a = 0; a < 256; ++a)
      for (uint32_t b = 0; b < 256; ++b) {
        uint32_t w0 = rng(), w1 = rng();
        w0 = (w0 & ~(0xffu << (8 * p))) | (a << (8 * p));
        w1 = (w1 & ~(0xffu << (8 * p))) | (b << (8 * p));
        check_fp8_words(w0, w1);
      }
}

TEST(FpBits, BytePermMatchesTheHardwareDefinition) {
  // __byte_perm(x, y, s): byte i of the result is byte s_i of the 8 bytes y:x (x the low word).
  const uint32_t x = 0x33221100u, y = 0x77665544u;
  EXPECT_EQ(fpbits::byte_perm(x, y, 0x3210u), x);
  EXPECT_EQ(fpbits::byte_perm(x, y, 0x7654u), y);
  EXPECT_EQ(fpbits::byte_perm(x, y, 0x5410u), 0x55441100u);
  EXPECT_EQ(fpbits::byte_perm(x, y, 0x7632u), 0x77663322u);
  EXPECT_EQ(fpbits::byte_perm(x, y, 0x0123u), 0x00112233u);
}

// The bf16 product of a decoded value and pair_scale, as the device's bf16x2 multiply rounds it
// (to nearest even), for values whose product is exact in fp32.
float bf16_mul(float a, float b) {
  const float p = a * b;
  uint32_t u = std::bit_cast<uint32_t>(p);
  u += 0x7fffu + ((u >> 16) & 1u);
  return std::bit_cast<float>(u & 0xffff0000u);
}

TEST(FpBits, ScaleMultiplyIsExactOverItsRange) {
  int fp4_fast = 0, fp8_fast = 0;
  for (uint32_t s = 0; s < 255; ++s) {
    const float scale = e8m0_to_f32(static_cast<uint8_t>(s));
    if (fpbits::fp4_scale_fast(s)) {
      ++fp4_fast;
      const uint32_t f = fpbits::pair_scale(s, kFp4Shift);
      ASSERT_EQ(f >> 16, f & 0xffffu);
      for (uint32_t nib = 0; nib < 16; ++nib) {
        uint32_t out[4];
        fpbits::e2m1x8_to_bf16(nib, out);
        const float got = bf16_mul(bf16_lo(out[0]), bf16_lo(f));
        const float want = e2m1_to_f32(static_cast<uint8_t>(nib)) * scale;
        ASSERT_TRUE(same(got, want)) << "s " << s << " nibble " << nib;
        ASSERT_TRUE(want == 0.0f || std::fabs(want) >= std::ldexp(1.0f, -126)) << s;
      }
    }
    if (fpbits::fp8_scale_fast(s)) {
      ++fp8_fast;
      const uint32_t f = fpbits::pair_scale(s, kFp8Shift);
      for (uint32_t b = 0; b < 256; ++b) {
        const float v = e4m3_to_f32(static_cast<uint8_t>(b));
        if (std::isnan(v)) continue;
        uint32_t out[4];
        fpbits::e4m3x8_to_bf16(b, 0, out);
        const float got = bf16_mul(bf16_lo(out[0]), bf16_lo(f));
        ASSERT_TRUE(same(got, v * scale)) << "s " << s << " byte " << b;
        ASSERT_TRUE(v == 0.0f || std::fabs(v * scale) >= std::ldexp(1.0f, -126)) << s;
      }
    }
  }
  // The ranges cover every scale a checkpoint plausibly holds (2^-125 .. 2 for FP4).
  EXPECT_EQ(fp4_fast, 127);
  EXPECT_EQ(fp8_fast, 125);
  EXPECT_FALSE(fpbits::fp4_scale_fast(1));
  EXPECT_FALSE(fpbits::fp4_scale_fast(129));
  EXPECT_FALSE(fpbits::fp8_scale_fast(9));
  EXPECT_FALSE(fpbits::fp8_scale_fast(135));
}

TEST(FpBits, StageOrderMatchesThePairs) {
  // Activation i of a group sits where the decoders put weight i: pair i & 3, half i >> 2.
  int seen = 0;
  for (int i = 0; i < 8; ++i) {
    const int pos = fpbits::stage_pos(i);
    EXPECT_EQ(pos, 2 * (i & 3) + (i >> 2)) << i;
    // The staging kernel's inverse: src(pos) = (pos >> 1) + 4 (pos & 1).
    EXPECT_EQ((pos >> 1) + 4 * (pos & 1), i);
    seen |= 1 << pos;
  }
  EXPECT_EQ(seen, 0xff);
}

}  // namespace
}  // namespace sp
