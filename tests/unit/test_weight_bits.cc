// The integer decodes of the CUDA projections (src/backend/cuda/weight_bits.h) against the CPU
// decoders, over every code at every position of a word. Host-only: the header's PRMT and rotate
// have exact C++ equivalents used here and asm versions on the device.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>

#include "backend/cuda/weight_bits.h"
#include "core/dtype.h"

namespace sp::cuda {
namespace {

float f16_lo(uint32_t h) {
  return f16_to_f32(static_cast<uint16_t>(h & 0xffffu));
}
float f16_hi(uint32_t h) {
  return f16_to_f32(static_cast<uint16_t>(h >> 16));
}

bool is_e4m3_nan(uint32_t b) {
  return (b & 0x7fu) == 0x7fu;
}

// Bit-exact equality of a decoded value and the reference (signed zeros told apart).
void expect_same(float got, float want, uint32_t code, int pos) {
  EXPECT_EQ(std::signbit(got), std::signbit(want))
      << "code 0x" << std::hex << code << " pos " << pos;
  EXPECT_EQ(got, want) << "code 0x" << std::hex << code << " pos " << pos;
}

TEST(WeightBits, PrmtSignReplicate) {
  // Selector nibbles 0..7 copy bytes of {b:a}; bit 3 replicates the selected byte's sign.
  EXPECT_EQ(prmt(0x44332211u, 0x88776655u, 0x3210u), 0x44332211u);
  EXPECT_EQ(prmt(0x44332211u, 0x88776655u, 0x7654u), 0x88776655u);
  EXPECT_EQ(prmt(0x00800001u, 0u, 0x8a98u), 0x00ff0000u);  // bytes: sx(b0)=0, sx(b1)=0, sx(b2)=ff
  EXPECT_EQ(prmt(0x80000000u, 0u, 0xbbbbu), 0xffffffffu);
  EXPECT_EQ(rotr1(0x00000001u), 0x80000000u);
  EXPECT_EQ(rotr1(0x80000002u), 0x40000001u);
}

// Every e4m3 code at every byte position of a word, the other bytes random: the f16 pairs are the
// CPU's values times 2^-8 exactly (subnormals and both zeros included); NaN codes are the one
// exception and decode to +-1.875.
TEST(WeightBits, E4m3ToF16EveryCodeEveryPosition) {
  std::mt19937 rng(7);
  int checked = 0;
  for (uint32_t code = 0; code < 256; ++code) {
    for (int pos = 0; pos < 4; ++pos) {
      for (int rep = 0; rep < 8; ++rep) {
        uint32_t a = rng();
        a = (a & ~(0xffu << (8 * pos))) | (code << (8 * pos));
        uint32_t lo = 0, hi = 0;
        e4m3x4_to_f16x2_bits(a, lo, hi);
        const float got[4] = {f16_lo(lo), f16_hi(lo), f16_lo(hi), f16_hi(hi)};
        for (int i = 0; i < 4; ++i) {
          const uint32_t b = (a >> (8 * i)) & 0xffu;
          if (is_e4m3_nan(b)) {
            EXPECT_EQ(got[i], (b & 0x80u) ? -1.875f : 1.875f) << std::hex << b;
            continue;
          }
          expect_same(got[i] * 256.0f, e4m3_to_f32(static_cast<uint8_t>(b)), b, i);
          ++checked;
        }
      }
    }
  }
  EXPECT_GT(checked, 256 * 4 * 8 * 3);
}

// The formula the header states, byte by byte: (b & 0x80) << 8 | (b & 0x7f) << 7.
TEST(WeightBits, E4m3F16BitsFormula) {
  for (uint32_t b = 0; b < 256; ++b) {
    const uint32_t want = ((b & 0x80u) << 8) | ((b & 0x7fu) << 7);
    uint32_t lo = 0, hi = 0;
    e4m3x4_to_f16x2_bits(b | (b << 8) | (b << 16) | (b << 24), lo, hi);
    EXPECT_EQ(lo, want | (want << 16)) << b;
    EXPECT_EQ(hi, want | (want << 16)) << b;
  }
}

TEST(WeightBits, E4m3NanDetectEveryCodeEveryWordAndByte) {
  std::mt19937 rng(11);
  // Random words without NaN codes; then one byte of one word set to each code in turn.
  auto no_nan = [&] {
    uint32_t w = rng();
    for (int i = 0; i < 4; ++i)
      if (((w >> (8 * i)) & 0x7fu) == 0x7fu) w ^= 1u << (8 * i);
    return w;
  };
  for (int rep = 0; rep < 64; ++rep) {
    uint32_t w[4] = {no_nan(), no_nan(), no_nan(), no_nan()};
    EXPECT_FALSE(e4m3x16_has_nan(w[0], w[1], w[2], w[3]));
    for (int wi = 0; wi < 4; ++wi)
      for (int pos = 0; pos < 4; ++pos)
        for (uint32_t code = 0; code < 256; ++code) {
          uint32_t v[4] = {w[0], w[1], w[2], w[3]};
          v[wi] = (v[wi] & ~(0xffu << (8 * pos))) | (code << (8 * pos));
          EXPECT_EQ(e4m3x16_has_nan(v[0], v[1], v[2], v[3]), is_e4m3_nan(code))
              << "code " << code << " word " << wi << " byte " << pos;
        }
  }
  EXPECT_TRUE(e4m3x16_has_nan(0xffffffffu, 0, 0, 0));
  EXPECT_FALSE(e4m3x16_has_nan(0x7e7e7e7eu, 0xfefefefeu, 0x80808080u, 0));
}

// Every e2m1 nibble at every position of a word: pair i holds values i and i + 4, each the CPU's
// value times 2^-14.
TEST(WeightBits, E2m1ToF16EveryCodeEveryPosition) {
  std::mt19937 rng(3);
  for (uint32_t code = 0; code < 16; ++code)
    for (int pos = 0; pos < 8; ++pos)
      for (int rep = 0; rep < 16; ++rep) {
        uint32_t w = rng();
        w = (w & ~(0xfu << (4 * pos))) | (code << (4 * pos));
        uint32_t h[4];
        e2m1x8_to_f16x2_bits(w, h);
        for (int j = 0; j < 8; ++j) {
          const uint32_t nib = (w >> (4 * j)) & 0xfu;
          const float got = (j < 4 ? f16_lo(h[j]) : f16_hi(h[j - 4])) * 16384.0f;
          expect_same(got, e2m1_to_f32(static_cast<uint8_t>(nib)), nib, j);
        }
      }
}

}  // namespace
}  // namespace sp::cuda
