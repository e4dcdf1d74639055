// --load-format dummy on the GPU: the bytes the CUDA backend's upload computes on the device from
// a described matrix equal the host generator's, byte for byte, for every matrix of flash-mini
// (bf16, FP8 with block scales, FP4 experts with their scales) and for shapes that end mid-block
// and need the kernels' grid-stride loop.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "core/dummy.h"
#include "model/config.h"
#include "model/weights.h"
#include "tests/gpu/op_harness.h"

namespace sp {
namespace {

// The device bytes of an uploaded matrix: values, then scales.
std::vector<uint8_t> device_bytes(Backend& gpu, const uint8_t* p, int64_t n) {
  std::vector<uint8_t> v(static_cast<size_t>(n));
  if (n > 0)
    gpu.to_host(Tensor::of(const_cast<uint8_t*>(p), 1, n, DType::kI8, Device::kCuda), v.data());
  return v;
}

std::vector<uint8_t> host_bytes(const uint8_t* p, int64_t n) {
  return std::vector<uint8_t>(p, p + n);
}

// The described matrix `d` uploaded to the GPU equals `h` (host bytes) exactly.
void expect_same_on_device(Backend& gpu, const Matrix& d, const Matrix& h) {
  SCOPED_TRACE(h.name);
  ASSERT_TRUE(d.dummy.on);
  ASSERT_EQ(d.data, nullptr);
  const Matrix u = gpu.upload(d);
  ASSERT_EQ(u.device, Device::kCuda);
  ASSERT_FALSE(u.dummy.on);
  ASSERT_EQ(u.value_bytes(), h.value_bytes());
  const auto got = device_bytes(gpu, u.data, u.value_bytes());
  const auto want = host_bytes(h.data, h.value_bytes());
  size_t first = 0;
  while (first < got.size() && got[first] == want[first]) ++first;
  EXPECT_EQ(first, got.size()) << "first differing byte " << first << " of " << got.size();
  ASSERT_EQ(u.scale_bytes(), h.scale_bytes());
  if (h.scale_bytes() > 0) {
    EXPECT_EQ(device_bytes(gpu, u.scale, u.scale_bytes()), host_bytes(h.scale, h.scale_bytes()));
  }
}

TEST(DummyWeightsGpu, EveryMatrixOfFlashMiniMatchesTheHostGenerator) {
  SP_REQUIRE_GPU();
  const Config c = load_config(std::string(SP_TEST_DATA) + "/configs/flash-mini").value();
  const LoadPlan plan = LoadPlan::whole(c, /*mtp=*/true);
  auto host = std::move(dummy_weights(c, plan, 3, nullptr, DummyMatrices::kHost).value());
  auto desc = std::move(dummy_weights(c, plan, 3, nullptr, DummyMatrices::kAtUpload).value());
  std::vector<Linear> want, got;
  for_each_matrix(*host, [&](const Linear& m) { want.push_back(m); });
  for_each_matrix(*desc, [&](const Linear& m) { got.push_back(m); });
  ASSERT_EQ(want.size(), got.size());
  // Both activation-quant settings: the fp8 path also prepares the scales at upload.
  for (ActQuant q : {ActQuant::kNone, ActQuant::kFP8}) {
    auto gpu = make_cuda_backend(0, DType::kBF16, DType::kBF16, q);
    ASSERT_TRUE(gpu.is_ok()) << gpu.status().message();
    (*gpu)->reserve(test::Backends::default_limits());
    int formats[3] = {0, 0, 0};
    for (size_t i = 0; i < want.size(); ++i) {
      if (!want[i].valid()) continue;
      expect_same_on_device(**gpu, got[i], want[i]);
      ++formats[static_cast<int>(want[i].format)];
    }
    EXPECT_GT(formats[0], 0);
    EXPECT_GT(formats[1], 0);
    EXPECT_GT(formats[2], 0);
  }
}

// Shapes the kernels see at full size: odd element counts, FP8 blocks cut at both edges, and a
// bf16 matrix of 16.8M units (more than one pass of the grid: the grid-stride loop).
TEST(DummyWeightsGpu, AwkwardAndLargeShapesMatchTheHostGenerator) {
  SP_REQUIRE_GPU();
  auto gpu = make_cuda_backend(0);
  ASSERT_TRUE(gpu.is_ok()) << gpu.status().message();
  (*gpu)->reserve(test::Backends::default_limits());
  auto cpu = make_cpu_backend(2);
  struct Case {
    WeightFormat f;
    int64_t out, in;
  };
  const Case cases[] = {{WeightFormat::kFloat, 3, 77},    {WeightFormat::kFloat, 4096, 4097},
                        {WeightFormat::kFP8, 1, 1},       {WeightFormat::kFP8, 130, 200},
                        {WeightFormat::kFP8, 2049, 4097}, {WeightFormat::kFP4, 5, 64},
                        {WeightFormat::kFP4, 4096, 2048}};
  int k = 0;
  for (const Case& cs : cases) {
    Matrix m;
    m.name = "awkward." + std::to_string(k++) + ".weight";
    m.format = cs.f;
    m.dtype = cs.f == WeightFormat::kFloat ? DType::kBF16
              : cs.f == WeightFormat::kFP8 ? DType::kE4M3
                                           : DType::kI8;
    m.out = cs.out;
    m.in = cs.in;
    m.scale_dtype = DType::kE8M0;
    m.scale_cols = cs.f == WeightFormat::kFP8 ? (cs.in + 127) / 128 : cs.in / 32;
    m.dummy.on = true;
    m.dummy.key = dummy_splitmix(9 ^ dummy_name_hash(m.name));
    // Amplitudes that reach e4m3's subnormals and its top binade after the scale.
    m.dummy.mul = cs.f == WeightFormat::kFP8 ? 440.0f : 0.0371f;
    m.dummy.scale_exp = -7;
    const Matrix h = cpu->upload(m);  // the host generator (checked against dummy_weights on CPU)
    expect_same_on_device(**gpu, m, h);
  }
}

}  // namespace
}  // namespace sp
