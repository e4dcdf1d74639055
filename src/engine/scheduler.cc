#include "engine/scheduler.h"

#include <algorithm>
#include <cmath>
#include <set>

namespace sp {

const char* finish_reason_name(FinishReason r) {
  switch (r) {
    case FinishReason::kNone:
      return "none";
    case FinishReason::kLength:
      return "length";
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kForcedDone:
      return "forced_done";
    case FinishReason::kAbort:
      return "abort";
  }
  return "?";
}

bool spec_eligible(const Request& r) {
  return r.forced.empty() && !r.all_logits && !r.sampling.penalized() && r.sampling.logprobs < 0;
}

namespace {

int pool_blocks(const SchedulerLimits& lim) {
  if (lim.num_blocks > 0) return lim.num_blocks;
  const int64_t per_seq = (lim.max_model_len + lim.block_tokens - 1) / lim.block_tokens;
  return static_cast<int>(lim.max_num_seqs * per_seq);
}

}  // namespace

Scheduler::Scheduler(const SchedulerLimits& lim)
    : lim_(lim), blocks_(pool_blocks(lim), lim.block_tokens) {
  for (int s = lim.max_num_seqs - 1; s >= 0; --s) free_slots_.push_back(s);
  if (lim.prefix_cache_slots > 0)
    cache_ =
        std::make_unique<PrefixCache>(lim.max_num_seqs, lim.prefix_cache_slots, lim.block_tokens);
}

Status Scheduler::add(Request r) {
  if (r.prompt.empty())
    return Status::error(
        str("request ", r.id, ": the prompt is empty; expected at least one token id"));
  for (size_t i = 0; i < r.prompt.size(); ++i)
    if (r.prompt[i] < 0 || r.prompt[i] >= lim_.vocab_size)
      return Status::error(str("request ", r.id, ": prompt token id ", r.prompt[i], " at index ", i,
                               " is outside the vocabulary; expected 0 <= id < ", lim_.vocab_size));
  for (size_t i = 0; i < r.forced.size(); ++i)
    if (r.forced[i] < 0 || r.forced[i] >= lim_.vocab_size)
      return Status::error(
          str("request ", r.id, ": forced token id ", r.forced[i], " is outside the vocabulary"));
  const int64_t need = static_cast<int64_t>(r.prompt.size() + r.forced.size());
  if (need > lim_.max_model_len)
    return Status::error(
        str("request ", r.id, ": ", need, " tokens (prompt ", r.prompt.size(),
            (r.forced.empty() ? std::string() : str(" + forced ", r.forced.size())),
            ") exceed --max-model-len ", lim_.max_model_len));
  if (blocks_.blocks_for_len(need) > blocks_.num_blocks())
    return Status::error(str("request ", r.id, ": ", need, " tokens need ",
                             blocks_.blocks_for_len(need), " state blocks, the pool has ",
                             blocks_.num_blocks()));
  if (r.max_new_tokens < 0)
    return Status::error(str("request ", r.id, ": max_new_tokens must be >= 0"));
  auto s = std::make_unique<Sequence>();
  s->tokens = r.prompt;
  s->tokens.insert(s->tokens.end(), r.forced.begin(), r.forced.end());
  s->prefill_end = static_cast<int64_t>(r.prompt.size());
  s->req = std::move(r);
  waiting_.push_back(std::move(s));
  return Status::ok();
}

int64_t Scheduler::ready_tokens() const {
  int64_t n = 0;
  for (auto& s : running_) {
    if (s->num_scheduled < s->prefill_end)
      n += s->prefill_end - s->num_scheduled;
    else if (s->num_scheduled < static_cast<int64_t>(s->tokens.size()))
      n += 1 + static_cast<int64_t>(s->drafts.size());
  }
  for (auto& s : waiting_) n += s->prefill_end;
  return n;
}

void Scheduler::release(Sequence* s) {
  unpin(s);
  blocks_.release(s->req.id);
  if (s->slot >= 0) free_slots_.push_back(s->slot);
  s->slot = -1;
}

void Scheduler::preempt(size_t i) {
  std::unique_ptr<Sequence> s = std::move(running_[i]);
  running_.erase(running_.begin() + static_cast<long>(i));
  release(s.get());
  // Recompute: every known token is prefilled again; the compressors' windows and the ring are
  // rebuilt by that prefill, the sampled tokens stay (their draws depend on the position only).
  s->num_scheduled = s->num_computed = 0;
  s->prefill_end = static_cast<int64_t>(s->tokens.size());
  s->drafts.clear();
  s->preemptions++;
  preemptions_++;
  waiting_.push_front(std::move(s));
}

bool Scheduler::grow(Sequence* s, int64_t len) {
  while (!blocks_.ensure(s->req.id, len)) {
    if (evict_one()) continue;  // cached prefixes go before running sequences
    // The newest running sequence with no step in flight (not `s`) gives its blocks back.
    size_t victim = running_.size();
    for (size_t i = running_.size(); i-- > 0;)
      if (running_[i].get() != s && running_[i]->in_flight == 0 &&
          blocks_.has(running_[i]->req.id)) {
        victim = i;
        break;
      }
    if (victim == running_.size()) return false;
    preempt(victim);
  }
  return true;
}

// Finished sequences with no step in flight free their slot and blocks.
void Scheduler::retire_finished() {
  for (size_t i = 0; i < running_.size();) {
    if (running_[i]->finish != FinishReason::kNone && running_[i]->in_flight == 0) {
      release(running_[i].get());
      finished_.push_back(std::move(running_[i]));
      running_.erase(running_.begin() + static_cast<long>(i));
    } else {
      ++i;
    }
  }
}

StepPlan Scheduler::schedule(int token_cap) {
  // Admission: first come first served, while a slot is free and the pool holds the whole prefill.
  while (!waiting_.empty() && !free_slots_.empty()) {
    Sequence* s = waiting_.front().get();
    if (s->finish != FinishReason::kNone) break;  // aborted ones leave through abort()
    if (!admit_blocks(s)) break;
    s->slot = free_slots_.back();
    free_slots_.pop_back();
    running_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
  }
  StepPlan plan;
  int budget = lim_.max_num_batched_tokens;
  if (token_cap > 0) budget = std::min(budget, token_cap);
  // A sequence's drafts are verified together or not at all: they may go past the spreading cap,
  // up to the step's real budget.
  int hard_budget = lim_.max_num_batched_tokens;
  auto add_chunk = [&](Sequence* s, int n) {
    prefix_before(plan, s);
    BatchView& b = plan.batch;
    SeqChunk ch;
    ch.slot = s->slot;
    ch.n_tokens = n;
    ch.start_pos = s->num_scheduled;
    ch.offset = b.num_tokens;
    // The sequence's blocks, as many as cover the chunk's last position.
    const std::vector<int32_t>& table = blocks_.table(s->req.id);
    ch.block_table = static_cast<int32_t>(b.block_tables.size());
    ch.num_blocks = static_cast<int32_t>(blocks_.blocks_for_len(s->num_scheduled + n));
    SP_CHECK(ch.num_blocks <= static_cast<int32_t>(table.size()), "sequence needs ", ch.num_blocks,
             " state blocks, it holds ", table.size());
    b.block_tables.insert(b.block_tables.end(), table.begin(), table.begin() + ch.num_blocks);
    b.chunks.push_back(ch);
    const int64_t known = static_cast<int64_t>(s->tokens.size());
    for (int i = 0; i < n; ++i) {
      const int64_t p = s->num_scheduled + i;
      b.token_ids.push_back(p < known ? s->tokens[p] : s->drafts[p - known]);
      b.positions.push_back(static_cast<int32_t>(p));
      b.chunk_of.push_back(static_cast<int32_t>(b.chunks.size() - 1));
      // Logits wanted at every position (all_logits) or where a next token is chosen; never twice
      // for one position (a recompute after preemption passes them again).
      const bool last_known = p == static_cast<int64_t>(s->tokens.size()) - 1;
      if ((s->req.all_logits || p >= s->prompt_len() - 1) && (p >= s->logits_done || last_known)) {
        b.logit_rows.push_back(b.num_tokens + i);
        plan.logit_request.push_back(s->req.id);
        plan.logit_position.push_back(p);
        s->logits_done = std::max(s->logits_done, p + 1);
      }
    }
    const int64_t last = s->num_scheduled + n - 1;
    // Draft tokens ride after the last known one (a verify step); the row of the last known token
    // samples the next token if that token is not given and still wanted, and its logit row is
    // followed by the drafts' rows.
    const int nd = static_cast<int>(std::max<int64_t>(0, last - (known - 1)));
    if (s->req.forced.empty() && last - nd == known - 1 && last - nd >= s->prompt_len() - 1 &&
        s->generated < s->req.max_new_tokens && known < lim_.max_model_len) {
      SampleRow row{static_cast<int32_t>(b.logit_rows.size() - 1 - nd), s->req.id, s->req.sampling};
      row.n_draft = nd;
      row.draft = lim_.spec_tokens > 0 && spec_eligible(s->req);
      // The tokens that end the request: a verify group's tokens stop there, no drafts follow one.
      if ((nd > 0 || row.draft) && !s->req.sampling.ignore_eos) {
        row.stop_offset = static_cast<int32_t>(plan.stop_tokens.size());
        if (eos_ >= 0) plan.stop_tokens.push_back(static_cast<int32_t>(eos_));
        plan.stop_tokens.insert(plan.stop_tokens.end(), s->req.stop_token_ids.begin(),
                                s->req.stop_token_ids.end());
        row.n_stop = static_cast<int32_t>(plan.stop_tokens.size()) - row.stop_offset;
      }
      if (s->req.sampling.penalized()) {
        row.hist_offset = static_cast<int32_t>(plan.penalty_tokens.size());
        row.hist_prompt = s->prompt_len();
        row.hist_output = static_cast<int32_t>(s->tokens.size()) - s->prompt_len();
        plan.penalty_tokens.insert(plan.penalty_tokens.end(), s->tokens.begin(), s->tokens.end());
      }
      plan.samples.push_back(row);
    }
    if (lim_.spec_tokens > 0)
      plan.chunk_next.push_back(!spec_eligible(s->req) ? kNoDrafts
                                : last + 1 < known     ? s->tokens[last + 1]
                                                       : -1);
    b.num_tokens += n;
    plan.seqs.push_back(s);
    plan.chunk_request.push_back(s->req.id);
    s->num_scheduled += n;
    s->in_flight++;
    budget -= n;
    hard_budget -= n;
  };
  // Decodes first: one known, unscheduled token past the prefill. A decode that needs a new block
  // may preempt newer idle sequences; if none can give way it waits for steps in flight, and a
  // sequence alone with the whole pool that still cannot grow ends (length).
  for (size_t i = 0; i < running_.size(); ++i) {
    Sequence* s = running_[i].get();
    if (budget <= 0 || s->finish != FinishReason::kNone || s->num_scheduled < s->prefill_end ||
        s->num_scheduled >= static_cast<int64_t>(s->tokens.size()))
      continue;
    // Drafts ride along within the token budget, as long as every token they could yield is
    // still wanted (max_new_tokens, max_model_len), leaving one token for each later decode.
    const int64_t known = static_cast<int64_t>(s->tokens.size());
    int64_t later = 0;
    for (size_t j = i + 1; j < running_.size(); ++j) {
      const Sequence* q = running_[j].get();
      later += q->finish == FinishReason::kNone && q->num_scheduled >= q->prefill_end &&
               q->num_scheduled < static_cast<int64_t>(q->tokens.size());
    }
    int nd = static_cast<int>(std::max<int64_t>(
        0, std::min<int64_t>({static_cast<int64_t>(s->drafts.size()),
                              int64_t{s->req.max_new_tokens} - s->generated - 1,
                              lim_.max_model_len - known - 1, int64_t{hard_budget} - 1 - later})));
    // No free blocks for the drafts' positions: decode without them (drafts never preempt).
    if (nd > 0 && !blocks_.ensure(s->req.id, s->num_scheduled + 1 + nd)) nd = 0;
    if (!grow(s, s->num_scheduled + 1 + nd)) {
      bool others = false;
      for (auto& q : running_) others |= q.get() != s && blocks_.has(q->req.id);
      if (!others && s->in_flight == 0) s->finish = FinishReason::kLength;
      continue;
    }
    // grow() may have preempted sequences before this one: find it again.
    i = static_cast<size_t>(
        std::find_if(running_.begin(), running_.end(), [&](auto& q) { return q.get() == s; }) -
        running_.begin());
    add_chunk(s, 1 + nd);
  }
  for (auto& s : running_)
    if (budget > 0 && s->finish == FinishReason::kNone && s->num_scheduled < s->prefill_end) {
      add_chunk(s.get(), snapshot_cut(s.get(), static_cast<int>(std::min<int64_t>(
                                                   s->prefill_end - s->num_scheduled, budget))));
      prefix_after(plan, s.get());
    }
  // Sequences that ended here (no room at all) leave now.
  retire_finished();
  if (!plan.empty()) plan.id = next_step_++;
  return plan;
}

void Scheduler::complete(const StepPlan& plan, const std::vector<Sampled>& sampled,
                         const std::vector<Drafted>& drafts) {
  for (size_t ci = 0; ci < plan.seqs.size(); ++ci) {
    Sequence* s = plan.seqs[ci];
    int nd = 0;  // drafts this step verified for the sequence
    for (const SampleRow& r : plan.samples)
      if (r.request == s->req.id) nd = r.n_draft;
    int64_t got = 0;
    for (const Sampled& t : sampled) got += t.request == s->req.id;
    // A verify step keeps the positions of the accepted drafts (the last stage returns them, then
    // its own token); the rest roll back: the next step writes over them.
    const int64_t accepted = std::clamp<int64_t>(got - 1, 0, nd);
    s->num_computed += plan.batch.chunks[ci].n_tokens - nd + accepted;
    if (nd > accepted) {  // the dropped positions' logits were not reported
      s->num_scheduled -= nd - accepted;
      s->logits_done = std::min(s->logits_done, s->num_scheduled);
    }
    s->in_flight--;
    s->drafts.clear();
    if (nd > 0) {
      s->spec_steps++, s->spec_drafted += nd, s->spec_accepted += accepted;
      spec_.drafts++, spec_.draft_tokens += nd, spec_.accepted_tokens += accepted;
    }
  }
  for (const Drafted& d : drafts)
    for (auto* s : plan.seqs)
      if (s->req.id == d.request && s->finish == FinishReason::kNone)
        s->drafts.assign(d.tokens, d.tokens + std::clamp(d.n, 0, kMaxSpecTokens));
  for (const Sampled& t : sampled) {
    Sequence* s = nullptr;
    for (auto* q : plan.seqs)
      if (q->req.id == t.request) s = q;
    SP_CHECK(s != nullptr, "sampled token for request ", t.request, " not in step ", plan.id);
    if (s->finish != FinishReason::kNone) continue;  // aborted while the step ran
    s->tokens.push_back(t.token);
    s->generated++;
    const bool stop_id = std::find(s->req.stop_token_ids.begin(), s->req.stop_token_ids.end(),
                                   t.token) != s->req.stop_token_ids.end();
    if (!s->req.sampling.ignore_eos && ((eos_ >= 0 && t.token == eos_) || stop_id))
      s->finish = FinishReason::kStop;
    else if (s->generated >= s->req.max_new_tokens)
      s->finish = FinishReason::kLength;
    else if (static_cast<int64_t>(s->tokens.size()) >= lim_.max_model_len)
      s->finish = FinishReason::kLength;
  }
  for (auto* s : plan.seqs) {
    if (s->finish != FinishReason::kNone ||
        s->num_computed < static_cast<int64_t>(s->tokens.size()))
      continue;
    // Everything known has run and nothing more will be sampled.
    if (!s->req.forced.empty())
      s->finish = FinishReason::kForcedDone;
    else if (s->generated >= s->req.max_new_tokens ||
             static_cast<int64_t>(s->tokens.size()) >= lim_.max_model_len)
      s->finish = FinishReason::kLength;
  }
  retire_finished();
}

void Scheduler::abort(int64_t request) {
  for (auto it = waiting_.begin(); it != waiting_.end(); ++it)
    if ((*it)->req.id == request) {
      (*it)->finish = FinishReason::kAbort;
      release(it->get());
      finished_.push_back(std::move(*it));
      waiting_.erase(it);
      return;
    }
  for (size_t i = 0; i < running_.size(); ++i)
    if (running_[i]->req.id == request) {
      if (running_[i]->finish == FinishReason::kNone) running_[i]->finish = FinishReason::kAbort;
      if (running_[i]->in_flight == 0) {
        release(running_[i].get());
        finished_.push_back(std::move(running_[i]));
        running_.erase(running_.begin() + static_cast<long>(i));
      }
      return;
    }
}

std::vector<std::unique_ptr<Sequence>> Scheduler::take_finished() {
  return std::exchange(finished_, {});
}

std::string Scheduler::check_invariants() const {
  if (std::string e = blocks_.check_invariants(); !e.empty()) return e;
  if (std::string e = check_prefix_invariants(); !e.empty()) return e;
  std::set<int> slots(free_slots_.begin(), free_slots_.end());
  if (slots.size() != free_slots_.size()) return "a slot is free twice";
  int64_t holders = 0;
  for (auto& s : running_) {
    if (s->slot < 0 || !slots.insert(s->slot).second)
      return str("request ", s->req.id, " has slot ", s->slot, ", free or shared");
    const int64_t have = static_cast<int64_t>(blocks_.table(s->req.id).size());
    if (blocks_.blocks_for_len(s->num_scheduled) > have)
      return str("request ", s->req.id, " scheduled ", s->num_scheduled, " positions on ", have,
                 " blocks");
    holders += blocks_.has(s->req.id);
  }
  for (auto& s : waiting_) {
    if (s->slot >= 0 || blocks_.has(s->req.id))
      return str("waiting request ", s->req.id, " holds a slot or blocks");
  }
  if (static_cast<int>(slots.size()) != lim_.max_num_seqs) return "a slot leaked";
  if (holders != blocks_.num_sequences()) return "blocks held by a sequence that is not running";
  return "";
}

std::vector<SampleSpec> sample_specs(const StepPlan& plan) {
  std::vector<SampleSpec> v;
  for (const SampleRow& r : plan.samples) {
    SampleSpec sp;
    sp.row = r.logit_index;
    sp.temperature = r.params.temperature;
    sp.top_k = r.params.top_k;
    sp.top_p = r.params.top_p;
    sp.seed = r.params.seed;
    sp.stream = r.params.stream;
    sp.min_p = r.params.min_p;
    sp.presence_penalty = r.params.presence_penalty;
    sp.frequency_penalty = r.params.frequency_penalty;
    sp.repetition_penalty = r.params.repetition_penalty;
    sp.logprobs = r.params.logprobs;
    if (r.params.penalized() && r.hist_offset + r.hist_prompt + r.hist_output <=
                                    static_cast<int32_t>(plan.penalty_tokens.size())) {
      sp.prompt_tokens = plan.penalty_tokens.data() + r.hist_offset;
      sp.n_prompt = r.hist_prompt;
      sp.output_tokens = sp.prompt_tokens + r.hist_prompt;
      sp.n_output = r.hist_output;
    }
    sp.counter = plan.logit_position[static_cast<size_t>(r.logit_index)] + 1;
    v.push_back(sp);
  }
  return v;
}

}  // namespace sp
