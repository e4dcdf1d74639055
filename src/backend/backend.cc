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

namespace {

// Log-softmax of the raw logits: the chosen token's and the `k` most likely (ties to the lower id).
void fill_logprobs(const float* logits, int64_t vocab, int32_t chosen, int k, TokenLogprobs* lp) {
  double mx = logits[0];
  for (int64_t i = 1; i < vocab; ++i) mx = std::max(mx, static_cast<double>(logits[i]));
  double sum = 0;
  for (int64_t i = 0; i < vocab; ++i) sum += std::exp(static_cast<double>(logits[i]) - mx);
  const double lse = mx + std::log(sum);
  lp->logprob = static_cast<float>(logits[chosen] - lse);
  k = std::clamp<int>(k, 0, static_cast<int>(std::min<int64_t>(kMaxTopLogprobs, vocab)));
  std::vector<int32_t> idx(static_cast<size_t>(vocab));
  for (int64_t i = 0; i < vocab; ++i) idx[i] = static_cast<int32_t>(i);
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  });
  lp->n_top = k;
  for (int i = 0; i < k; ++i) {
    lp->top_ids[i] = idx[i];
    lp->top_logprobs[i] = static_cast<float>(logits[idx[i]] - lse);
  }
}

}  // namespace

SamplingDist sampling_distribution(const SampleSpec& sp, const float* raw, int64_t vocab) {
  const float* logits = raw;
  std::vector<float> pen;
  if (sp.presence_penalty != 0.0f || sp.frequency_penalty != 0.0f ||
      sp.repetition_penalty != 1.0f) {
    pen.assign(raw, raw + vocab);
    std::vector<int32_t> count(static_cast<size_t>(vocab), 0);
    std::vector<uint8_t> seen(static_cast<size_t>(vocab), 0);
    for (int32_t i = 0; i < sp.n_output; ++i) {
      const int32_t t = sp.output_tokens[i];
      if (t >= 0 && t < vocab) count[t]++, seen[t] = 1;
    }
    for (int32_t i = 0; i < sp.n_prompt; ++i) {
      const int32_t t = sp.prompt_tokens[i];
      if (t >= 0 && t < vocab) seen[t] = 1;
    }
    for (int64_t v = 0; v < vocab; ++v) {
      if (seen[v] && sp.repetition_penalty != 1.0f)
        pen[v] = pen[v] > 0 ? pen[v] / sp.repetition_penalty : pen[v] * sp.repetition_penalty;
      pen[v] -= sp.frequency_penalty * static_cast<float>(count[v]) +
                sp.presence_penalty * (count[v] > 0 ? 1.0f : 0.0f);
    }
    logits = pen.data();
  }
  SamplingDist d;
  if (sp.temperature <= 0.0f) {
    int64_t best = 0;
    for (int64_t i = 1; i < vocab; ++i)
      if (logits[i] > logits[best]) best = i;
    d.ids = {static_cast<int32_t>(best)};
    d.w = {1.0};
    d.total = 1.0;
    return d;
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
  if (sp.min_p > 0.0f) {  // p[0] is the largest: the rest are sorted below it
    int64_t k = 1;
    while (k < keep && p[k] >= sp.min_p * p[0]) ++k;
    keep = k;
  }
  idx.resize(keep);
  p.resize(keep);
  for (int64_t i = 0; i < keep; ++i) d.total += p[i];
  d.ids = std::move(idx);
  d.w = std::move(p);
  return d;
}

int32_t SamplingDist::draw(double u01) const {
  double u = u01 * total;
  for (size_t i = 0; i < w.size(); ++i) {
    if (u < w[i]) return ids[i];
    u -= w[i];
  }
  return ids.back();
}

double SamplingDist::prob(int32_t id) const {
  for (size_t i = 0; i < ids.size(); ++i)
    if (ids[i] == id) return w[i] / total;
  return 0.0;
}

int32_t sample_logits_row(const SampleSpec& sp, const float* raw, int64_t vocab,
                          TokenLogprobs* lp) {
  const SamplingDist d = sampling_distribution(sp, raw, vocab);
  const int32_t chosen =
      sp.temperature <= 0.0f ? d.ids[0] : d.draw(counter_uniform(sp.seed, sp.stream, sp.counter));
  if (lp && sp.logprobs >= 0) fill_logprobs(raw, vocab, chosen, sp.logprobs, lp);
  return chosen;
}

#ifndef SP_HAVE_CUDA
bool cuda_backend_built() {
  return false;
}
bool cuda_device_available() {
  return false;
}
int cuda_device_count() {
  return 0;
}
double cuda_copy_bandwidth_gbs(int, size_t) {
  return 0;
}
Status cuda_memory_info(int, int64_t*, int64_t*) {
  return Status::error("this seekpipe was built without the CUDA backend");
}
Result<std::unique_ptr<Backend>> make_cuda_backend(int, DType, DType, ActQuant) {
  return Status::error(
      "--device cuda: this seekpipe was built without the CUDA backend (CMake found no nvcc); "
      "rebuild on a machine with the CUDA toolkit, or use --device cpu");
}
#endif

}  // namespace sp
