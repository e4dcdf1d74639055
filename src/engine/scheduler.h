// Requests, sequences and the step scheduler (pure host code).
// A step holds decodes first (one token each), then prefill chunks within the token budget, as
// vLLM's chunked-prefill scheduler does; a prompt longer than the budget is prefilled in chunks.
// With a pipeline, several steps (micro-batches) are in flight at once: a sequence's next prefill
// chunk (or next teacher-forced token) may be scheduled while its previous chunk is still in the
// pipeline, because every stage runs micro-batches in order; a sampled decode waits for its token.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "core/status.h"

namespace sp {

struct SamplingParams {
  float temperature = 0.0f;  // 0: greedy
  int top_k = 0;             // 0: all
  float top_p = 1.0f;
  uint64_t seed = 0;  // with the position, decides every random draw (see SampleSpec)
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
  int64_t num_scheduled = 0;    // positions sent into the model
  int64_t num_computed = 0;     // positions whose step has completed
  int generated = 0;
  int in_flight = 0;  // steps holding this sequence that have not completed
  FinishReason finish = FinishReason::kNone;
  int prompt_len() const { return static_cast<int>(req.prompt.size()); }
};

struct SchedulerLimits {
  int max_num_seqs = 1;
  int max_num_batched_tokens = 1;
  int64_t max_model_len = 1;
  int64_t vocab_size = 1;
  // State blocks: positions per block (Model::block_tokens) and blocks a slot owns. Each slot owns
  // a fixed run of blocks today; a paging block manager will hand them out on demand.
  int block_tokens = 1 << 30;
  int blocks_per_seq = 1;
};

// A row whose logits choose the sequence's next token.
struct SampleRow {
  int32_t logit_index = 0;  // index into the step's logit rows
  int64_t request = 0;
  SamplingParams params;
};

// One scheduled step: the batch every stage sees (batch.logit_rows: which rows' logits the last
// stage computes), and what they are for.
struct StepPlan {
  int64_t id = 0;
  BatchView batch;
  std::vector<Sequence*> seqs;          // per chunk (scheduling rank only)
  std::vector<int64_t> chunk_request;   // request id per chunk
  std::vector<int64_t> logit_request;   // request id per logit row
  std::vector<int64_t> logit_position;  // position per logit row
  std::vector<SampleRow> samples;
  bool empty() const { return batch.num_tokens == 0; }
};

// Sampled token of a request, sent back from the last stage.
struct Sampled {
  int64_t request;
  int32_t token;
};

class Scheduler {
 public:
  explicit Scheduler(const SchedulerLimits& lim);
  void set_eos(int64_t eos) { eos_ = eos; }
  // Validates and queues a request (ids in the vocabulary, fits max_model_len).
  Status add(Request r);
  // Next step from the work that can run now, within the limits and `token_cap` (> 0 lowers the
  // budget: the pipeline spreads load over micro-batches). May be empty.
  StepPlan schedule(int token_cap = 0);
  // Applies a completed step and the tokens sampled from it. Finished sequences free their slots.
  void complete(const StepPlan& plan, const std::vector<Sampled>& sampled);
  bool idle() const { return waiting_.empty() && running_.empty(); }
  // Tokens that could be scheduled right now (for spreading load over micro-batches).
  int64_t ready_tokens() const;
  const std::vector<std::unique_ptr<Sequence>>& finished() const { return finished_; }

 private:
  SchedulerLimits lim_;
  std::deque<std::unique_ptr<Sequence>> waiting_;
  std::vector<std::unique_ptr<Sequence>> running_;
  std::vector<std::unique_ptr<Sequence>> finished_;
  std::vector<int> free_slots_;
  int64_t eos_ = -1;
  int64_t next_step_ = 0;
};

// The backend's sampling specs of a step's sample rows (counter: the position of the token chosen).
std::vector<SampleSpec> sample_specs(const StepPlan& plan);

}  // namespace sp
