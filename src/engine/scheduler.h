// Requests, sequences and the step scheduler (pure host code, no backend types beyond BatchView).
// A step holds decodes first (one token each), then prefill chunks within the token budget, as
// vLLM's chunked-prefill scheduler does; a prompt longer than the budget is prefilled in chunks.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "core/status.h"

namespace sp {

struct SamplingParams {
  float temperature = 0.0f;  // 0: greedy
  int top_k = 0;             // 0: all
  float top_p = 1.0f;
  uint64_t seed = 0;
  bool ignore_eos = false;
};

struct Request {
  int64_t id = 0;
  std::vector<int32_t> prompt;
  int max_new_tokens = 16;
  SamplingParams sampling;
  // Teacher forcing (verify): these tokens follow the prompt and are fed one per decode step
  // instead of sampled ones.
  std::vector<int32_t> forced;
  bool all_logits = false;  // report logits at every position, not only the sampled ones
};

enum class FinishReason { kNone, kLength, kStop, kForcedDone };

struct Sequence {
  Request req;
  int slot = -1;
  std::vector<int32_t> tokens;  // prompt, then generated or forced tokens
  int64_t num_computed = 0;     // positions already through the model
  int generated = 0;
  bool in_flight = false;       // scheduled, result not back yet (pipeline)
  FinishReason finish = FinishReason::kNone;
  std::mt19937_64 rng;
  int prompt_len() const { return static_cast<int>(req.prompt.size()); }
  bool prefilling() const { return num_computed < prompt_len(); }
};

struct SchedulerLimits {
  int max_num_seqs = 1;
  int max_num_batched_tokens = 1;
  int64_t max_model_len = 1;
  int64_t vocab_size = 1;
};

// One scheduled step: the batch every stage sees, and which rows' logits the last stage returns.
struct StepPlan {
  BatchView batch;
  std::vector<Sequence*> seqs;      // per chunk
  std::vector<int32_t> logit_rows;  // batch rows whose logits are needed
  std::vector<std::pair<Sequence*, int64_t>> logit_owner;  // (sequence, position) per logit row
  bool empty() const { return batch.num_tokens == 0; }
};

class Scheduler {
 public:
  explicit Scheduler(const SchedulerLimits& lim);
  // Validates and queues a request (ids in the vocabulary, fits max_model_len).
  Status add(Request r);
  // Next step within the limits, from sequences not in flight. `token_cap` can lower the budget
  // (pipeline micro-batches split it).
  StepPlan schedule(int token_cap = 0);
  // Applies a finished step: advances positions and, for each logit row, hands the logits to
  // `on_logits` and samples (or takes the forced token). Finished sequences free their slots.
  template <typename F>
  void complete(StepPlan& plan, const float* logits, int64_t vocab, F&& on_logits);
  bool idle() const { return waiting_.empty() && running_.empty(); }
  int num_running() const { return static_cast<int>(running_.size()); }
  const std::vector<std::unique_ptr<Sequence>>& finished() const { return finished_; }

 private:
  void finish_step(StepPlan& plan, const float* logits, int64_t vocab);
  int32_t sample(Sequence& s, const float* logits, int64_t vocab);

  SchedulerLimits lim_;
  std::deque<std::unique_ptr<Sequence>> waiting_;
  std::vector<std::unique_ptr<Sequence>> running_;
  std::vector<std::unique_ptr<Sequence>> finished_;
  std::vector<int> free_slots_;
  int64_t eos_ = -1;

 public:
  void set_eos(int64_t eos) { eos_ = eos; }
};

// Greedy argmax, ties to the lower token id.
int32_t argmax(const float* v, int64_t n);

template <typename F>
void Scheduler::complete(StepPlan& plan, const float* logits, int64_t vocab, F&& on_logits) {
  for (size_t i = 0; i < plan.logit_owner.size(); ++i)
    on_logits(*plan.logit_owner[i].first, plan.logit_owner[i].second, logits + i * vocab);
  finish_step(plan, logits, vocab);
}

}  // namespace sp
