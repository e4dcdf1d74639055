// libFuzzer target: the step descriptor and sampled-token messages that cross stage boundaries.
// A decoded message must be self-consistent (every index in range) and re-encode to the same bytes.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "engine/step_codec.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::vector<uint8_t> bytes(data, data + size);
  sp::StepKind kind;
  auto step = sp::decode_step(bytes, &kind);
  if (step.is_ok() && kind == sp::StepKind::kStep) {
    const sp::StepPlan& p = *step;
    const int64_t n = p.batch.num_tokens;
    for (int32_t c : p.batch.chunk_of)
      if (c < 0 || c >= static_cast<int64_t>(p.batch.chunks.size())) __builtin_trap();
    for (const auto& ch : p.batch.chunks)
      if (ch.offset < 0 || ch.n_tokens < 0 || int64_t{ch.offset} + ch.n_tokens > n)
        __builtin_trap();
    for (int32_t r : p.batch.logit_rows)
      if (r < 0 || r >= n) __builtin_trap();
    for (const auto& s : p.samples) {
      if (s.logit_index < 0 || s.logit_index >= static_cast<int64_t>(p.batch.logit_rows.size()))
        __builtin_trap();
      volatile bool b = s.params.ignore_eos;  // UBSan: a bool byte other than 0/1
      (void)b;
      // Verify rows and stop tokens stay inside the step.
      if (s.n_draft < 0 ||
          s.logit_index + s.n_draft >= static_cast<int64_t>(p.batch.logit_rows.size()) ||
          s.stop_offset < 0 || s.n_stop < 0 ||
          s.stop_offset + int64_t{s.n_stop} > static_cast<int64_t>(p.stop_tokens.size()))
        __builtin_trap();
    }
    for (const auto* copies : {&p.copies_before, &p.copies_after})
      for (const sp::SlotCopy& c : *copies)
        if (c.src < 0 || c.dst < 0 || c.src == c.dst) __builtin_trap();
    if (sp::encode_step(p) != bytes) __builtin_trap();
  }
  int64_t id = 0;
  std::vector<double> times;
  std::vector<sp::Drafted> drafts;
  auto sampled = sp::decode_sampled(bytes, &id, &times, &drafts);
  if (sampled.is_ok()) {
    for (const auto& d : drafts)
      if (d.n < 0 || d.n > sp::kMaxSpecTokens) __builtin_trap();
    if (sp::encode_sampled(id, *sampled, times, drafts) != bytes) __builtin_trap();
  }
  return 0;
}
