// Speculative decoding, last-stage side: verifying a step's draft tokens against the target
// model's logits, and proposing the next drafts (the MTP layer, or any DraftSource).
//
// A verify step feeds [last token, d1 .. dK] of a sequence at positions L .. L+K; the head computes
// the target's logits at every one of them. Greedy: d_j is accepted while it equals the target's
// argmax at position L+j-1, and the target's token after the last accepted draft is emitted too.
// Sampling (temperature > 0): d_j (drawn from the draft distribution q) is accepted with
// probability min(1, p(d_j) / q(d_j)), p the target distribution under the request's sampling
// parameters; the first rejected one is replaced by a draw from max(0, p - q) (normalised), and
// when all are accepted one more token is drawn from the target. The emitted tokens are then
// distributed exactly as the target's own samples. Every draw is counter-based (seed, stream,
// position), with its own stream salt per kind of draw, so a run is reproducible in any batch or
// split.
//
// The dropped drafts' positions are rolled back by the scheduler (the next step writes over them);
// the state rings keep `slack` extra rows so nothing a later step reads was overwritten.
#pragma once

#include <map>
#include <memory>
#include <vector>

#include "engine/scheduler.h"
#include "model/model.h"

namespace sp {

// What the last stage returns for a step: the tokens it accepted (per request, in order) and the
// next drafts.
struct StepOutput {
  std::vector<Sampled> sampled;
  std::vector<Drafted> drafts;
};

// Stream salts of the speculative draws (xor-ed into SamplingParams::stream).
inline constexpr uint64_t kDraftStreamSalt = 0x6d74702d64726166ull;   // a draft token
inline constexpr uint64_t kAcceptStreamSalt = 0x6d74702d61636365ull;  // accept / reject
inline constexpr uint64_t kResidualStreamSalt = 0x6d74702d72657369ull;

// The tokens a verify group emits. `targets` [n_draft + 1]: the target's own choice at each row
// (greedy: the argmax); `drafts` [n_draft]. Greedy acceptance: drafts while they equal the target.
std::vector<int32_t> accept_greedy(const std::vector<int32_t>& targets,
                                   const std::vector<int32_t>& drafts);

// Rejection sampling for one verify group. p[j]: target distribution at row j (j = 0 .. n_draft),
// q[j]: the draft distribution d_{j+1} was drawn from; `spec` carries seed and stream; `first_pos`
// the position of the group's first row (row j's token lands at first_pos + j + 1).
std::vector<int32_t> accept_sampled(const std::vector<SamplingDist>& p,
                                    const std::vector<SamplingDist>& q,
                                    const std::vector<int32_t>& drafts, const SampleSpec& spec,
                                    int64_t first_pos);

// Cuts the emitted tokens after the first one that stops the request.
void cut_at_stop(std::vector<int32_t>& tokens, const int32_t* stop, int n_stop);

// One chunk of a step as the drafter sees it after verification: its first `rows` rows stand (a
// verify chunk: the accepted ones), row i followed by next[i] (-1: not known, the row is not
// drafted from); `sample` the chunk's sample row (null: none) and whether drafts are wanted.
struct ChunkAfterVerify {
  int chunk = 0;
  int rows = 0;
  std::vector<int32_t> next;
  const SampleRow* sample = nullptr;
  bool draft = false;
};

// The distributions a sampled (temperature > 0) request's pending drafts were drawn from, kept on
// the last stage for the next step's verification; by sequence slot.
struct DraftDists {
  int64_t request = -1;
  std::vector<SamplingDist> q;
};

// Proposes drafts on the last stage after a step's verification. X: the step's last-layer streams.
// For a sampled request, (*q)[slot] receives the distributions its drafts were drawn from.
class DraftSource {
 public:
  virtual ~DraftSource() = default;
  virtual void propose(const StepPlan& plan, Tensor X, const std::vector<ChunkAfterVerify>& chunks,
                       std::vector<Drafted>* out, std::map<int, DraftDists>* q) = 0;
};

// The MTP layer as draft source: K drafts per sequence, the layer fed its own output for k > 1.
std::unique_ptr<DraftSource> make_mtp_drafter(Model& model, int num_tokens);

// The last stage's work of a step: head on the wanted rows, sampling / verification, logits to
// `on_logits` for the rows that stand, and the next drafts when `drafter` is set.
class HeadStage {
 public:
  HeadStage(Model& model, DraftSource* drafter) : model_(model), drafter_(drafter) {}
  StepOutput finish(const StepPlan& plan, Tensor X,
                    const std::function<void(int64_t, int64_t, const float*)>& on_logits);
  // Verify steps, drafts verified and accepted so far.
  const SpecCounters& spec_counters() const { return spec_; }
  // Where the step's target pass first produced a NaN / Inf (Backend::non_finite_where), read
  // before the draft layer runs (its steps reset the backend's flag); kAllFinite if none.
  int target_non_finite() const { return target_non_finite_; }

 private:
  Model& model_;
  DraftSource* drafter_;
  std::vector<float> host_logits_;
  std::map<int, DraftDists> q_;
  SpecCounters spec_;
  int target_non_finite_ = Backend::kAllFinite;
};

}  // namespace sp
