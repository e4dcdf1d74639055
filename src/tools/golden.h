// Golden files in the fixtures' format (tests/data/*/golden.safetensors): per prompt i,
// p{i}.input_ids, p{i}.prefill_logits [L, vocab], p{i}.greedy_tokens, p{i}.decode_logits
// [G, vocab], and for prompt 0 optionally p0.layer{k}.hidden [L, hc_mult, hidden].
#pragma once

#include <vector>

#include "core/status.h"
#include "model/config.h"
#include "model/safetensors.h"

namespace sp {

struct GoldenPrompt {
  std::vector<int32_t> ids, greedy;
  const float* prefill = nullptr;  // [L, V]
  const float* decode = nullptr;   // [G, V]
};

// The prompts of a golden file, checked against the config's vocabulary size. The pointers stay
// valid while `g` is open.
Result<std::vector<GoldenPrompt>> read_golden(const SafetensorsFile& g, const Config& c);

}  // namespace sp
