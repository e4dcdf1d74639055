// Storage-format decoders against hand-computed values.
#include <gtest/gtest.h>

#include <cmath>

#include "core/dtype.h"
#include "model/weights.h"

namespace sp {
namespace {

TEST(E4M3, HandComputedValues) {
  EXPECT_EQ(e4m3_to_f32(0x00), 0.0f);
  EXPECT_FALSE(std::signbit(e4m3_to_f32(0x00)));
  EXPECT_EQ(e4m3_to_f32(0x80), 0.0f);  // negative zero
  EXPECT_TRUE(std::signbit(e4m3_to_f32(0x80)));
  EXPECT_EQ(e4m3_to_f32(0x38), 1.0f);     // 0 0111 000: 2^(7-7)
  EXPECT_EQ(e4m3_to_f32(0x3c), 1.5f);     // mantissa 100
  EXPECT_EQ(e4m3_to_f32(0xb9), -1.125f);  // sign, 0111, 001
  EXPECT_EQ(e4m3_to_f32(0x7e), 448.0f);   // largest: 1111 110 = 1.75 * 2^8
  EXPECT_EQ(e4m3_to_f32(0xfe), -448.0f);
  EXPECT_TRUE(std::isnan(e4m3_to_f32(0x7f)));
  EXPECT_TRUE(std::isnan(e4m3_to_f32(0xff)));
  EXPECT_EQ(e4m3_to_f32(0x01), std::ldexp(1.0f, -9));  // smallest subnormal: 1/8 * 2^-6
  EXPECT_EQ(e4m3_to_f32(0x07), 7 * std::ldexp(1.0f, -9));
  EXPECT_EQ(e4m3_to_f32(0x08), std::ldexp(1.0f, -6));  // smallest normal
}

TEST(E4M3, EncodeRoundsToNearestEvenAndSaturates) {
  for (int c = 0; c < 256; ++c) {
    if ((c & 0x7f) == 0x7f) continue;
    EXPECT_EQ(f32_to_e4m3(e4m3_to_f32(static_cast<uint8_t>(c))), c) << c;
  }
  EXPECT_EQ(f32_to_e4m3(1.0625f), 0x38);  // halfway 1.0 / 1.125: even code
  EXPECT_EQ(f32_to_e4m3(1.1875f), 0x3a);  // halfway 1.125 / 1.25: even code 1.25
  EXPECT_EQ(f32_to_e4m3(1000.0f), 0x7e);
  EXPECT_EQ(f32_to_e4m3(-1000.0f), 0xfe);
}

TEST(E8M0, PowersOfTwo) {
  EXPECT_EQ(e8m0_to_f32(127), 1.0f);
  EXPECT_EQ(e8m0_to_f32(128), 2.0f);
  EXPECT_EQ(e8m0_to_f32(120), 1.0f / 128);
  EXPECT_EQ(e8m0_to_f32(0), std::ldexp(1.0f, -127));
  EXPECT_EQ(e8m0_to_f32(254), std::ldexp(1.0f, 127));
  EXPECT_TRUE(std::isnan(e8m0_to_f32(255)));
}

TEST(E2M1, EveryCode) {
  const float expect[16] = {0, 0.5f, 1, 1.5f, 2, 3, 4, 6, -0.0f, -0.5f, -1, -1.5f, -2, -3, -4, -6};
  for (int c = 0; c < 16; ++c) {
    EXPECT_EQ(e2m1_to_f32(static_cast<uint8_t>(c)), expect[c]) << c;
    EXPECT_EQ(std::signbit(e2m1_to_f32(static_cast<uint8_t>(c))), c >= 8) << c;
  }
}

TEST(BF16, RoundTripAndRounding) {
  EXPECT_EQ(bf16_to_f32(0x3f80), 1.0f);
  EXPECT_EQ(bf16_to_f32(0xc000), -2.0f);
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(f32_to_bf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);  // tie to even
  EXPECT_EQ(f32_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);
  EXPECT_EQ(f16_to_f32(0x3c00), 1.0f);
  EXPECT_EQ(f16_to_f32(0x0001), std::ldexp(1.0f, -24));
}

TEST(Linear, Fp8BlockScalesDecodeExactly) {
  // [2, 130] e4m3 with a 1 x 2 grid of 128 x 128 block scales: 2^0 and 2^-3.
  std::vector<uint8_t> v(2 * 130, 0x38);  // 1.0
  v[129] = 0xbc;                          // -1.5, in the second column block
  uint8_t scale[2] = {127, 124};
  Linear w;
  w.format = WeightFormat::kFP8;
  w.out = 2;
  w.in = 130;
  w.data = v.data();
  w.scale = scale;
  w.scale_cols = 2;
  std::vector<float> row(130);
  w.decode_row(0, row.data());
  EXPECT_EQ(row[0], 1.0f);
  EXPECT_EQ(row[127], 1.0f);
  EXPECT_EQ(row[128], 0.125f);
  EXPECT_EQ(row[129], -1.5f * 0.125f);
}

TEST(Linear, Fp4PackedLowNibbleFirst) {
  // One row of 64 inputs: two groups of 32 with scales 2^1 and 2^-1.
  std::vector<uint8_t> packed(32, 0x00);
  packed[0] = 0x21;   // k=0: code 1 (0.5), k=1: code 2 (1.0)
  packed[16] = 0xf7;  // k=32: code 7 (6.0), k=33: code 15 (-6.0)
  packed[17] = 0x08;  // k=34: code 8 (-0.0)
  uint8_t scale[2] = {128, 126};
  Linear w;
  w.format = WeightFormat::kFP4;
  w.out = 1;
  w.in = 64;
  w.data = packed.data();
  w.scale = scale;
  w.scale_cols = 2;
  std::vector<float> row(64);
  w.decode_row(0, row.data());
  EXPECT_EQ(row[0], 1.0f);
  EXPECT_EQ(row[1], 2.0f);
  EXPECT_EQ(row[32], 3.0f);
  EXPECT_EQ(row[33], -3.0f);
  EXPECT_EQ(row[34], 0.0f);
  EXPECT_TRUE(std::signbit(row[34]));
}

}  // namespace
}  // namespace sp
