// --load-format dummy with the matrices described (DummyMatrices::kAtUpload): the bytes a
// backend's upload makes from the description equal the host generator's (DummyMatrices::kHost),
// for every matrix of a config with every kind (bf16, FP8 with block scales, FP4 experts).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "core/dummy.h"
#include "model/config.h"
#include "model/weights.h"

namespace sp {
namespace {

std::vector<Linear> matrices(const ModelWeights& w) {
  std::vector<Linear> v;
  for_each_matrix(w, [&](const Linear& m) { v.push_back(m); });
  return v;
}

struct Pair {
  Config c;
  std::unique_ptr<ModelWeights> host, described;
};

Pair flash_mini(uint64_t seed) {
  Pair p;
  p.c = load_config(std::string(SP_TEST_DATA) + "/configs/flash-mini").value();
  const LoadPlan plan = LoadPlan::whole(p.c, /*mtp=*/true);
  p.host = std::move(dummy_weights(p.c, plan, seed, nullptr, DummyMatrices::kHost).value());
  p.described =
      std::move(dummy_weights(p.c, plan, seed, nullptr, DummyMatrices::kAtUpload).value());
  return p;
}

bool same_bytes(const uint8_t* a, const uint8_t* b, int64_t n) {
  return std::memcmp(a, b, static_cast<size_t>(n)) == 0;
}

TEST(DummyWeights, DescribedMatricesUploadToTheHostGeneratorsBytes) {
  Pair p = flash_mini(11);
  const auto want = matrices(*p.host), got = matrices(*p.described);
  ASSERT_EQ(want.size(), got.size());
  auto be = make_cpu_backend(2);
  int formats[3] = {0, 0, 0};
  int64_t checked = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const Linear& h = want[i];
    const Linear& d = got[i];
    ASSERT_EQ(h.valid(), d.valid()) << h.name;
    if (!h.valid()) continue;
    SCOPED_TRACE(h.name);
    // The description holds no bytes, and the same shape and formats as the host's matrix.
    EXPECT_TRUE(d.dummy.on);
    EXPECT_FALSE(h.dummy.on);
    EXPECT_EQ(d.data, nullptr);
    EXPECT_EQ(d.scale, nullptr);
    EXPECT_EQ(d.name, h.name);
    EXPECT_EQ(d.format, h.format);
    EXPECT_EQ(d.dtype, h.dtype);
    EXPECT_EQ(d.scale_dtype, h.scale_dtype);
    EXPECT_EQ(d.out, h.out);
    EXPECT_EQ(d.in, h.in);
    EXPECT_EQ(d.scale_cols, h.scale_cols);
    ASSERT_EQ(d.value_bytes(), h.value_bytes());
    ASSERT_EQ(d.scale_bytes(), h.scale_bytes());
    const Matrix u = be->upload(d);
    ASSERT_NE(u.data, nullptr);
    EXPECT_FALSE(u.dummy.on);
    EXPECT_TRUE(same_bytes(u.data, h.data, h.value_bytes()));
    if (h.scale_bytes() > 0) {
      ASSERT_NE(u.scale, nullptr);
      EXPECT_TRUE(same_bytes(u.scale, h.scale, h.scale_bytes()));
    }
    // A decoded row is the same too (what the CPU backend's ops read).
    std::vector<float> a(static_cast<size_t>(h.in)), b(a.size());
    h.decode_row(h.out - 1, a.data());
    u.decode_row(h.out - 1, b.data());
    EXPECT_EQ(a, b);
    ++formats[static_cast<int>(h.format)];
    ++checked;
  }
  // Every kind is exercised: bf16 (embedding, head, compressors), FP8 (projections), FP4 (experts).
  EXPECT_GT(formats[static_cast<int>(WeightFormat::kFloat)], 0);
  EXPECT_GT(formats[static_cast<int>(WeightFormat::kFP8)], 0);
  EXPECT_GT(formats[static_cast<int>(WeightFormat::kFP4)], 0);
  EXPECT_GT(checked, 100);
  // The small tensors are made on the host either way.
  EXPECT_EQ(p.described->final_norm, p.host->final_norm);
  EXPECT_EQ(p.described->hc_head.fn, p.host->hc_head.fn);
  for (size_t l = 0; l < p.host->layers.size(); ++l) {
    const LayerWeights& h = p.host->layers[l];
    const LayerWeights& d = p.described->layers[l];
    EXPECT_EQ(d.attn_norm, h.attn_norm);
    EXPECT_EQ(d.hc_attn.fn, h.hc_attn.fn);
    EXPECT_EQ(d.attn_sink, h.attn_sink);
    EXPECT_EQ(d.compressor.ape, h.compressor.ape);
    EXPECT_EQ(d.gate_bias, h.gate_bias);
    EXPECT_EQ(d.tid2eid, h.tid2eid);
  }
  EXPECT_EQ(p.described->stats.tensors, p.host->stats.tensors);
  EXPECT_EQ(p.described->stats.bytes, p.host->stats.bytes);
}

// The descriptor path is the host generator's, not a constant: another seed or another name
// changes the bytes (so the comparison above can fail).
TEST(DummyWeights, BytesDependOnSeedAndName) {
  Pair a = flash_mini(11), b = flash_mini(12);
  const auto ma = matrices(*a.described), mb = matrices(*b.described);
  auto be = make_cpu_backend(1);
  for (size_t i = 0; i < ma.size(); ++i) {
    if (!ma[i].valid() || ma[i].value_bytes() < 64) continue;
    const Matrix x = be->upload(ma[i]), y = be->upload(mb[i]);
    EXPECT_FALSE(same_bytes(x.data, y.data, x.value_bytes())) << ma[i].name;
  }
  const auto m = matrices(*a.described);
  ASSERT_GT(m.size(), 3u);
  EXPECT_NE(m[0].dummy.key, m[1].dummy.key);
}

// Any split of the units gives the same bytes (the CPU backend's threads, the GPU's blocks), on
// shapes that end mid-block: odd element counts, FP8 rows and columns not multiples of 128.
TEST(DummyWeights, FillIsIndependentOfTheSplit) {
  for (WeightFormat f : {WeightFormat::kFloat, WeightFormat::kFP8, WeightFormat::kFP4}) {
    Matrix m;
    m.name = "test.weight";
    m.format = f;
    m.dtype = f == WeightFormat::kFloat ? DType::kBF16
              : f == WeightFormat::kFP8 ? DType::kE4M3
                                        : DType::kI8;
    m.out = 131;
    m.in = f == WeightFormat::kFP4 ? 96 : 201;
    m.dummy.on = true;
    m.dummy.key = dummy_splitmix(5 ^ dummy_name_hash(m.name));
    m.dummy.mul = 0.75f;
    const int64_t units = dummy_value_units(m), ub = f == WeightFormat::kFloat ? 2 : 1;
    ASSERT_EQ(units * ub, m.value_bytes());
    std::vector<uint8_t> whole(static_cast<size_t>(units * ub)), parts(whole.size());
    fill_dummy_values(m, 0, units, whole.data());
    for (int64_t b = 0; b < units; b += 97)
      fill_dummy_values(m, b, std::min(units, b + 97), parts.data() + b * ub);
    EXPECT_EQ(whole, parts) << weight_format_name(f);
  }
}

}  // namespace
}  // namespace sp
