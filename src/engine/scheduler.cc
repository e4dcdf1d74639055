#include "engine/scheduler.h"

#include <algorithm>
#include <cmath>

namespace sp {

Scheduler::Scheduler(const SchedulerLimits& lim) : lim_(lim) {
  for (int s = lim.max_num_seqs - 1; s >= 0; --s) free_slots_.push_back(s);
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
  if (r.max_new_tokens < 0)
    return Status::error(str("request ", r.id, ": max_new_tokens must be >= 0"));
  auto s = std::make_unique<Sequence>();
  s->tokens = r.prompt;
  s->tokens.insert(s->tokens.end(), r.forced.begin(), r.forced.end());
  s->req = std::move(r);
  waiting_.push_back(std::move(s));
  return Status::ok();
}

int64_t Scheduler::ready_tokens() const {
  int64_t n = 0;
  for (auto& s : running_) {
    if (s->num_scheduled < s->prompt_len())
      n += s->prompt_len() - s->num_scheduled;
    else if (s->num_scheduled < static_cast<int64_t>(s->tokens.size()))
      n += 1;
  }
  for (auto& s : waiting_) n += s->prompt_len();
  return n;
}

StepPlan Scheduler::schedule(int token_cap) {
  while (!waiting_.empty() && !free_slots_.empty()) {
    waiting_.front()->slot = free_slots_.back();
    free_slots_.pop_back();
    running_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
  }
  StepPlan plan;
  int budget = lim_.max_num_batched_tokens;
  if (token_cap > 0) budget = std::min(budget, token_cap);
  auto add_chunk = [&](Sequence* s, int n) {
    BatchView& b = plan.batch;
    SeqChunk ch;
    ch.slot = s->slot;
    ch.n_tokens = n;
    ch.start_pos = s->num_scheduled;
    ch.offset = b.num_tokens;
    // The slot's own run of blocks, as many as cover the chunk's last position.
    ch.block_table = static_cast<int32_t>(b.block_tables.size());
    ch.num_blocks =
        static_cast<int32_t>((s->num_scheduled + n + lim_.block_tokens - 1) / lim_.block_tokens);
    SP_CHECK(ch.num_blocks <= lim_.blocks_per_seq, "sequence needs ", ch.num_blocks,
             " state blocks, a slot has ", lim_.blocks_per_seq);
    for (int i = 0; i < ch.num_blocks; ++i)
      b.block_tables.push_back(s->slot * lim_.blocks_per_seq + i);
    b.chunks.push_back(ch);
    for (int i = 0; i < n; ++i) {
      const int64_t p = s->num_scheduled + i;
      b.token_ids.push_back(s->tokens[p]);
      b.positions.push_back(static_cast<int32_t>(p));
      b.chunk_of.push_back(static_cast<int32_t>(b.chunks.size() - 1));
      // Logits wanted at every position (all_logits) or where a next token is chosen.
      if (s->req.all_logits || p >= s->prompt_len() - 1) {
        b.logit_rows.push_back(b.num_tokens + i);
        plan.logit_request.push_back(s->req.id);
        plan.logit_position.push_back(p);
      }
    }
    const int64_t last = s->num_scheduled + n - 1;
    // The chunk's last row samples the next token if that token is not given and still wanted.
    if (s->req.forced.empty() && last == static_cast<int64_t>(s->tokens.size()) - 1 &&
        last >= s->prompt_len() - 1 && s->generated < s->req.max_new_tokens &&
        static_cast<int64_t>(s->tokens.size()) < lim_.max_model_len) {
      plan.samples.push_back(
          SampleRow{static_cast<int32_t>(b.logit_rows.size() - 1), s->req.id, s->req.sampling});
    }
    b.num_tokens += n;
    plan.seqs.push_back(s);
    plan.chunk_request.push_back(s->req.id);
    s->num_scheduled += n;
    s->in_flight++;
    budget -= n;
  };
  for (auto& s : running_)  // decodes first: one known, unscheduled token past the prompt
    if (budget > 0 && s->finish == FinishReason::kNone && s->num_scheduled >= s->prompt_len() &&
        s->num_scheduled < static_cast<int64_t>(s->tokens.size()))
      add_chunk(s.get(), 1);
  for (auto& s : running_)
    if (budget > 0 && s->num_scheduled < s->prompt_len())
      add_chunk(s.get(),
                static_cast<int>(std::min<int64_t>(s->prompt_len() - s->num_scheduled, budget)));
  if (!plan.empty()) plan.id = next_step_++;
  return plan;
}

void Scheduler::complete(const StepPlan& plan, const std::vector<Sampled>& sampled) {
  for (size_t ci = 0; ci < plan.seqs.size(); ++ci) {
    Sequence* s = plan.seqs[ci];
    s->num_computed += plan.batch.chunks[ci].n_tokens;
    s->in_flight--;
  }
  for (const Sampled& t : sampled) {
    Sequence* s = nullptr;
    for (auto* q : plan.seqs)
      if (q->req.id == t.request) s = q;
    SP_CHECK(s != nullptr, "sampled token for request ", t.request, " not in step ", plan.id);
    s->tokens.push_back(t.token);
    s->generated++;
    if (!s->req.sampling.ignore_eos && eos_ >= 0 && t.token == eos_)
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
  for (size_t i = 0; i < running_.size();) {
    if (running_[i]->finish != FinishReason::kNone && running_[i]->in_flight == 0) {
      free_slots_.push_back(running_[i]->slot);
      finished_.push_back(std::move(running_[i]));
      running_.erase(running_.begin() + static_cast<long>(i));
    } else {
      ++i;
    }
  }
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
    sp.counter = plan.logit_position[static_cast<size_t>(r.logit_index)] + 1;
    v.push_back(sp);
  }
  return v;
}

}  // namespace sp
