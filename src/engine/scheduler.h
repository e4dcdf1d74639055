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
#include "engine/block_manager.h"
#include "engine/prefix_cache.h"

namespace sp {

// Trivially copyable: it travels in the step descriptor (SampleRow) by its bytes.
struct SamplingParams {
  float temperature = 0.0f;  // 0: greedy
  int top_k = 0;             // 0: all
  float top_p = 1.0f;
  uint64_t seed = 0;  // with the position, decides every random draw (see SampleSpec)
  bool ignore_eos = false;
  float min_p = 0.0f;
  float presence_penalty = 0.0f, frequency_penalty = 0.0f, repetition_penalty = 1.0f;
  int32_t logprobs = -1;  // -1: none; 0: the chosen token's; k: and the k most likely
  uint64_t stream = 0;    // a request's n choices draw from their own streams
  bool penalized() const {
    return presence_penalty != 0.0f || frequency_penalty != 0.0f || repetition_penalty != 1.0f;
  }
};

// Most draft tokens a speculative step verifies per sequence (--num-speculative-tokens).
inline constexpr int kMaxSpecTokens = 8;
// StepPlan::chunk_next of a chunk whose request is not speculated.
inline constexpr int32_t kNoDrafts = -2;

// Whether a request's decode may be speculated: its tokens are sampled (not forced) and its
// sampling needs no per-token history or logprobs (penalties and logprobs decode one token a step).
bool spec_eligible(const struct Request& r);

struct Request {
  int64_t id = 0;
  std::vector<int32_t> prompt;
  int max_new_tokens = 16;
  SamplingParams sampling;
  // Teacher forcing (verify): these tokens follow the prompt and are fed one per decode step
  // instead of sampled ones.
  std::vector<int32_t> forced;
  bool all_logits = false;  // report logits at every position, not only the sampled ones
  std::vector<int32_t> stop_token_ids;  // like EOS (kept when ignore_eos is off)
};

// kAbort: the caller gave up on it (client gone, stop string found). kNoSpace never happens in a
// well-sized server: a lone sequence outgrew the whole block pool.
enum class FinishReason { kNone, kLength, kStop, kForcedDone, kAbort };
const char* finish_reason_name(FinishReason r);

struct Sequence {
  Request req;
  int slot = -1;
  std::vector<int32_t> tokens;  // prompt, then generated or forced tokens
  int64_t num_scheduled = 0;    // positions sent into the model
  int64_t num_computed = 0;     // positions whose step has completed
  int generated = 0;
  int in_flight = 0;  // steps holding this sequence that have not completed
  FinishReason finish = FinishReason::kNone;
  // Positions [0, prefill_end) are prefilled in chunks: the prompt (and forced tokens are decoded
  // one by one), or after a preemption every token known then (recompute).
  int64_t prefill_end = 0;
  int64_t logits_done = 0;  // positions whose logits were already reported (not again on recompute)
  int preemptions = 0;
  // Speculative decoding: the draft tokens proposed after tokens.back() (verified by the next
  // decode step), and this sequence's counters.
  std::vector<int32_t> drafts;
  int64_t spec_steps = 0, spec_drafted = 0, spec_accepted = 0;
  // Prefix cache: the entry whose snapshot this sequence's first step restores into its slot
  // (-1: none pending), and the prompt positions it did not compute thanks to a hit.
  int64_t restore_entry = -1;
  int64_t cached_tokens = 0;
  int prompt_len() const { return static_cast<int>(req.prompt.size()); }
};

// Speculative decoding counters (vLLM's names): verify steps that carried drafts, draft tokens
// verified, draft tokens accepted.
struct SpecCounters {
  int64_t drafts = 0, draft_tokens = 0, accepted_tokens = 0;
  double acceptance_rate() const {
    return draft_tokens > 0 ? static_cast<double>(accepted_tokens) / draft_tokens : 0.0;
  }
  // Tokens each verify step produced on average: accepted drafts + the target's own token.
  double mean_accepted_length() const {
    return drafts > 0 ? 1.0 + static_cast<double>(accepted_tokens) / drafts : 0.0;
  }
};

struct SchedulerLimits {
  int max_num_seqs = 1;
  int max_num_batched_tokens = 1;
  int64_t max_model_len = 1;
  int64_t vocab_size = 1;
  // State blocks: positions per block (Model::block_tokens) and blocks in the pool, handed out on
  // demand by the BlockManager (0: enough for every slot at max_model_len).
  int block_tokens = 1 << 30;
  int num_blocks = 0;
  // Draft tokens verified per decode step (0: no speculation).
  int spec_tokens = 0;
  // Prefix caching: snapshot slots (state slots max_num_seqs .. + this - 1); 0 turns it off.
  int prefix_cache_slots = 0;
};

// A row whose logits choose the sequence's next token.
struct SampleRow {
  int32_t logit_index = 0;  // index into the step's logit rows
  int64_t request = 0;
  SamplingParams params;
  // Penalties: the prompt's and the generated tokens, StepPlan::penalty_tokens[offset, +n_prompt)
  // then [offset + n_prompt, + n_output).
  int32_t hist_offset = 0, hist_prompt = 0, hist_output = 0;
  // Speculative decoding: this row and the next n_draft logit rows verify the drafts, which are the
  // step's token ids at the rows after this one; the tokens that stop the request (EOS unless
  // ignored, its stop ids) are StepPlan::stop_tokens[stop_offset, + n_stop); `draft` asks the last
  // stage for new drafts after the tokens it accepts.
  int32_t n_draft = 0;
  int32_t stop_offset = 0, n_stop = 0;
  int32_t draft = 0;
};

// A copy of one whole state slot to another (every per-slot buffer of every layer of every stage):
// prefix-cache snapshots and restores.
struct SlotCopy {
  int32_t src = 0, dst = 0;
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
  std::vector<int32_t> penalty_tokens;  // see SampleRow
  std::vector<int32_t> stop_tokens;     // see SampleRow
  // Speculative decoding: per chunk, the token that follows its last position when it is already
  // known (a prompt that continues in a later chunk), else -1; empty without speculation.
  std::vector<int32_t> chunk_next;
  // Slot copies every stage makes before the step's layers run (restores of cached prefixes) and
  // after (snapshots of prefixes this step completed); in step order, so they are consistent with
  // the steps around them on every stage, however many steps are in flight.
  std::vector<SlotCopy> copies_before, copies_after;
  // Busy and wall seconds of each stage the step has passed (appended as it goes down the
  // pipeline, then back to stage 0 with the sampled tokens): live per-stage busy fractions.
  std::vector<double> stage_times;
  bool empty() const { return batch.num_tokens == 0; }
};

// Sampled token of a request, sent back from the last stage (with its logprobs when asked). A
// speculative step may return several tokens of one request, in order.
struct Sampled {
  int64_t request = 0;
  int32_t token = 0;
  TokenLogprobs lp;
};

// Draft tokens proposed for a request after the tokens of this step (trivially copyable: it travels
// by its bytes with the sampled tokens).
struct Drafted {
  int64_t request = 0;
  int32_t n = 0;
  int32_t tokens[kMaxSpecTokens] = {};
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
  // With speculation, a verify step's sampled tokens are those the last stage accepted (its drafts
  // past them are dropped: the sequence rolls back) and `drafts` the next proposals.
  void complete(const StepPlan& plan, const std::vector<Sampled>& sampled,
                const std::vector<Drafted>& drafts = {});
  // Ends a request wherever it is: waiting ones at once, running ones once no step holds them.
  // Unknown (already finished) ids are ignored.
  void abort(int64_t request);
  bool idle() const { return waiting_.empty() && running_.empty(); }
  // Tokens that could be scheduled right now (for spreading load over micro-batches).
  int64_t ready_tokens() const;
  const std::vector<std::unique_ptr<Sequence>>& finished() const { return finished_; }
  // Hands over (and forgets) the sequences finished so far.
  std::vector<std::unique_ptr<Sequence>> take_finished();
  const BlockManager& blocks() const { return blocks_; }
  int num_waiting() const { return static_cast<int>(waiting_.size()); }
  int num_running() const { return static_cast<int>(running_.size()); }
  int64_t preemptions() const { return preemptions_; }
  const SpecCounters& spec_counters() const { return spec_; }
  // Null when prefix caching is off.
  const PrefixCache* prefix_cache() const { return cache_.get(); }
  const SchedulerLimits& limits() const { return lim_; }
  // Empty when consistent: the block manager's own invariants, every running sequence's table
  // covers what was scheduled, slots distinct, waiting sequences hold nothing.
  std::string check_invariants() const;

 private:
  // Frees what a sequence holds (slot and blocks).
  void retire_finished();
  void release(Sequence* s);
  // Puts a running sequence (no step in flight) back at the head of the queue, freeing its slot
  // and blocks; it is prefilled again from its tokens later.
  void preempt(size_t running_index);
  // Makes room for `s` to cover `len` positions, evicting cached prefixes and then preempting the
  // newest idle sequences if needed.
  bool grow(Sequence* s, int64_t len);
  // Prefix caching (scheduler_prefix.cc). Admission's blocks: the longest cached prefix is shared
  // (and its snapshot restored before the first chunk), the rest allocated, evicting cached
  // prefixes when the pool needs their blocks; false when the pool cannot hold the prefill.
  bool admit_blocks(Sequence* s);
  // Evicts least recently used cache entries until `need` blocks are free; false (evicting
  // nothing) when even evicting every unpinned entry would not free enough.
  bool evict_for(int64_t need);
  bool evict_one();
  // A prefill chunk of `n` tokens ends at the prompt's last block boundary when a snapshot is to
  // be taken there.
  int snapshot_cut(const Sequence* s, int n) const;
  // After `s`'s chunk is in `plan`: its pending restore goes before the step, and a snapshot
  // after it when the chunk ended on the prompt's last block boundary not cached yet.
  void prefix_before(StepPlan& plan, Sequence* s);
  void prefix_after(StepPlan& plan, Sequence* s);
  int64_t snapshot_boundary(const Sequence* s) const;
  void unpin(Sequence* s);
  std::string check_prefix_invariants() const;
  SchedulerLimits lim_;
  BlockManager blocks_;
  int64_t preemptions_ = 0;
  SpecCounters spec_;
  std::deque<std::unique_ptr<Sequence>> waiting_;
  std::vector<std::unique_ptr<Sequence>> running_;
  std::vector<std::unique_ptr<Sequence>> finished_;
  std::vector<int> free_slots_;
  std::unique_ptr<PrefixCache> cache_;
  int64_t eos_ = -1;
  int64_t next_step_ = 0;
};

// The backend's sampling specs of a step's sample rows (counter: the position of the token chosen).
std::vector<SampleSpec> sample_specs(const StepPlan& plan);

}  // namespace sp
