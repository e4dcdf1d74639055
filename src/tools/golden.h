// Golden files in the fixtures' format (tests/data/*/golden.safetensors): per prompt i,
// p{i}.input_ids, p{i}.prefill_logits [L, vocab], p{i}.greedy_tokens, p{i}.decode_logits
// [G, vocab], and for prompt 0 optionally p0.layer{k}.hidden [L, hc_mult, hidden].
#pragma once

#include <string>
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

// One prompt's reference outputs, to be written as a golden file.
struct GoldenRecord {
  std::vector<int32_t> ids, greedy;
  std::vector<float> prefill;  // [L, V]
  std::vector<float> decode;   // [G, V]
};

// Writes prompts in the fixtures' format (token ids as I64); an error names the file.
Status write_golden(const std::string& path, const std::vector<GoldenRecord>& prompts,
                    int64_t vocab);

}  // namespace sp
