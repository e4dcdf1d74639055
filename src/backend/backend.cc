#include "backend/backend.h"

#include <algorithm>
#include <cmath>

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

// Greedy: the first maximum (ties to the lower id). Otherwise temperature, then top-k, then
// top-p over the sorted candidates, and one counter-based uniform draw.
int32_t sample_logits_row(const SampleSpec& sp, const float* logits, int64_t vocab) {
  if (sp.temperature <= 0.0f) {
    int64_t best = 0;
    for (int64_t i = 1; i < vocab; ++i)
      if (logits[i] > logits[best]) best = i;
    return static_cast<int32_t>(best);
  }
  std::vector<int32_t> idx(vocab);
  for (int64_t i = 0; i < vocab; ++i) idx[i] = static_cast<int32_t>(i);
  std::stable_sort(idx.begin(), idx.end(),
                   [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  const int64_t n = sp.top_k > 0 ? std::min<int64_t>(sp.top_k, vocab) : vocab;
  std::vector<double> p(n);
  double mx = logits[idx[0]], sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += (p[i] = std::exp((logits[idx[i]] - mx) / sp.temperature));
  double cum = 0;
  int64_t keep = n;
  for (int64_t i = 0; i < n; ++i) {
    cum += p[i] / sum;
    if (cum >= sp.top_p) {
      keep = i + 1;
      break;
    }
  }
  double total = 0;
  for (int64_t i = 0; i < keep; ++i) total += p[i];
  double u = counter_uniform(sp.seed, sp.stream, sp.counter) * total;
  for (int64_t i = 0; i < keep; ++i) {
    if (u < p[i]) return idx[i];
    u -= p[i];
  }
  return idx[keep - 1];
}

#ifndef SP_HAVE_CUDA
bool cuda_backend_built() {
  return false;
}
bool cuda_device_available() {
  return false;
}
double cuda_copy_bandwidth_gbs(int, size_t) {
  return 0;
}
Status cuda_memory_info(int, int64_t*, int64_t*) {
  return Status::error("this seekpipe was built without the CUDA backend");
}
Result<std::unique_ptr<Backend>> make_cuda_backend(int, DType, DType) {
  return Status::error(
      "--device cuda: this seekpipe was built without the CUDA backend (CMake found no nvcc); "
      "rebuild on a machine with the CUDA toolkit, or use --device cpu");
}
#endif

}  // namespace sp
