#include "core/dummy.h"

#include <cstring>
#include <vector>

#include "core/dtype.h"
#include "core/status.h"

namespace sp {

const uint8_t* bf16_to_e4m3_table() {
  static const std::vector<uint8_t> t = [] {
    std::vector<uint8_t> v(65536);
    for (int i = 0; i < 65536; ++i) v[i] = f32_to_e4m3(bf16_to_f32(static_cast<uint16_t>(i)));
    return v;
  }();
  return t.data();
}

int64_t dummy_value_units(const Matrix& m) {
  return m.format == WeightFormat::kFP4 ? m.out * m.in / 2 : m.out * m.in;
}

void fill_dummy_values(const Matrix& m, int64_t begin, int64_t end, uint8_t* dst) {
  SP_CHECK(m.dummy.on, m.name, ": not a described dummy matrix");
  SP_CHECK(m.format != WeightFormat::kFloat || m.dtype == DType::kBF16, m.name,
           ": a described float matrix is BF16, got ", dtype_name(m.dtype));
  SP_CHECK(begin >= 0 && begin <= end && end <= dummy_value_units(m), m.name, ": units [", begin,
           ", ", end, ") outside [0, ", dummy_value_units(m), ")");
  const uint64_t key = m.dummy.key;
  const float mul = m.dummy.mul;
  switch (m.format) {
    case WeightFormat::kFloat:
      for (int64_t i = begin; i < end; ++i) {
        const uint16_t b = f32_to_bf16(mul * dummy_uniform(key, i));
        std::memcpy(dst + 2 * (i - begin), &b, 2);
      }
      return;
    case WeightFormat::kFP8: {
      const uint8_t* enc = bf16_to_e4m3_table();
      for (int64_t i = begin; i < end; ++i)
        dst[i - begin] = enc[f32_to_bf16(mul * dummy_uniform(key, i))];
      return;
    }
    case WeightFormat::kFP4:
      for (int64_t i = begin; i < end; ++i)
        dst[i - begin] = static_cast<uint8_t>(dummy_splitmix(key + static_cast<uint64_t>(i)) >> 56);
      return;
  }
}

}  // namespace sp
