// The seeded generator of --load-format dummy weights, shared by the loader (model/weights.cc),
// the CPU backend (which makes a described matrix's bytes on the host at upload) and the CUDA
// backend (whose kernel computes the same bytes on the device, with the e4m3 table below).
// Every value is a function of (key, unit index) only, so any split of the work (threads, blocks)
// gives the same bytes.
#pragma once

#include <cstdint>
#include <string>

#include "core/matrix.h"

namespace sp {

inline uint64_t dummy_splitmix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
// FNV-1a of a tensor name.
inline uint64_t dummy_name_hash(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (char ch : s) h = (h ^ static_cast<uint8_t>(ch)) * 1099511628211ull;
  return h;
}
// Uniform in [-1, 1): 24 hash bits times 2^-23, minus 1. Every step is exact in fp32 (a multiple
// of 2^-23 below 1 in magnitude), so the result does not depend on FMA contraction.
inline float dummy_uniform(uint64_t key, int64_t i) {
  return static_cast<float>(dummy_splitmix(key + static_cast<uint64_t>(i)) >> 40) *
             (2.0f / 16777216.0f) -
         1.0f;
}
// The e4m3 code of every bf16 bit pattern (65,536 bytes): the dummy generator's FP8 encoder
// (values are rounded to bf16 first, then looked up). Built once, thread-safe.
const uint8_t* bf16_to_e4m3_table();

// Value units of a described matrix: elements for kFloat / kFP8, packed bytes for kFP4.
int64_t dummy_value_units(const Matrix& m);
// Writes value units [begin, end) of the described matrix `m` (m.dummy.on) to `dst`, which points
// at unit `begin`'s bytes (2 per unit for kFloat's bf16, 1 otherwise).
void fill_dummy_values(const Matrix& m, int64_t begin, int64_t end, uint8_t* dst);
// The ue8m0 byte every scale of a described kFP8 / kFP4 matrix holds.
inline uint8_t dummy_scale_byte(const DummyGen& g) {
  return static_cast<uint8_t>(g.scale_exp + 127);
}

}  // namespace sp
