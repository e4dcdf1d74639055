#include "backend/backend.h"

namespace sp {

double counter_uniform(uint64_t seed, uint64_t stream, int64_t counter) {
  auto mix = [](uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  };
  uint64_t h = mix(seed + 0x9e3779b97f4a7c15ull);
  h = mix(h ^ (stream * 0xd1b54a32d192ed03ull + 0x9e3779b97f4a7c15ull));
  h = mix(h ^ (static_cast<uint64_t>(counter) + 0x8cb92ba72f3d8dd7ull));
  return static_cast<double>(h >> 11) * (1.0 / 9007199254740992.0);
}

#ifndef SP_HAVE_CUDA
bool cuda_backend_built() {
  return false;
}
bool cuda_device_available() {
  return false;
}
Result<std::unique_ptr<Backend>> make_cuda_backend(int) {
  return Status::error(
      "--device cuda: this seekpipe was built without the CUDA backend (CMake found no nvcc); "
      "rebuild on a machine with the CUDA toolkit, or use --device cpu");
}
#endif

}  // namespace sp
