// The CUDA backend's memory plumbing: allocation, host copies, uploads.
#include "tests/gpu/op_harness.h"

namespace sp::test {
namespace {

TEST(CudaBackend, HostRoundTripKeepsBits) {
  SP_REQUIRE_GPU();
  Backends b;
  auto v = random_vec(37 * 5, 1);
  Tensor t = make_tensor(*b.gpu, v, 37, 5, DType::kF32);
  EXPECT_EQ(t.device, Device::kCuda);
  EXPECT_EQ(read_f32(*b.gpu, t), v);
  Tensor h = make_tensor(*b.gpu, v, 37, 5, DType::kBF16);
  EXPECT_EQ(read_f32(*b.gpu, h), round_bf16(v));
}

}  // namespace
}  // namespace sp::test
