#include "engine/speculative.h"

#include <algorithm>

namespace sp {

std::vector<int32_t> accept_greedy(const std::vector<int32_t>& targets,
                                   const std::vector<int32_t>& drafts) {
  SP_CHECK(targets.size() == drafts.size() + 1, "verify: ", targets.size(), " targets for ",
           drafts.size(), " drafts");
  std::vector<int32_t> out{targets[0]};
  for (size_t j = 0; j < drafts.size() && drafts[j] == targets[j]; ++j)
    out.push_back(targets[j + 1]);
  return out;
}

std::vector<int32_t> accept_sampled(const std::vector<SamplingDist>& p,
                                    const std::vector<SamplingDist>& q,
                                    const std::vector<int32_t>& drafts, const SampleSpec& spec,
                                    int64_t first_pos) {
  const size_t nd = drafts.size();
  SP_CHECK(p.size() == nd + 1 && q.size() >= nd, "verify: ", p.size(), " target and ", q.size(),
           " draft distributions for ", nd, " drafts");
  std::vector<int32_t> out;
  for (size_t j = 0; j < nd; ++j) {
    const int64_t pos = first_pos + static_cast<int64_t>(j) + 1;  // where draft j lands
    const int32_t d = drafts[j];
    const double pd = p[j].prob(d), qd = q[j].prob(d);
    const double u = counter_uniform(spec.seed, spec.stream ^ kAcceptStreamSalt, pos);
    if (qd > 0 && u * qd < pd) {  // accepted with probability min(1, p / q)
      out.push_back(d);
      continue;
    }
    // Rejected: draw from max(0, p - q), normalised (over p's candidates: elsewhere it is 0).
    SamplingDist r;
    for (size_t i = 0; i < p[j].ids.size(); ++i) {
      const double w = p[j].w[i] / p[j].total - q[j].prob(p[j].ids[i]);
      if (w > 0) {
        r.ids.push_back(p[j].ids[i]);
        r.w.push_back(w);
        r.total += w;
      }
    }
    // p == q on every candidate (only possible when the draft had probability 0 under q, or
    // rounding): p itself is then the residual.
    const SamplingDist& from = r.ids.empty() ? p[j] : r;
    out.push_back(from.draw(counter_uniform(spec.seed, spec.stream ^ kResidualStreamSalt, pos)));
    return out;
  }
  // Every draft accepted: one more token from the target, the draw a plain decode would make.
  out.push_back(p[nd].draw(counter_uniform(spec.seed, spec.stream, first_pos + nd + 1)));
  return out;
}

void cut_at_stop(std::vector<int32_t>& tokens, const int32_t* stop, int n_stop) {
  for (size_t i = 0; i < tokens.size(); ++i)
    if (std::find(stop, stop + n_stop, tokens[i]) != stop + n_stop) {
      tokens.resize(i + 1);
      return;
    }
}

StepOutput HeadStage::finish(const StepPlan& plan, Tensor X,
                             const std::function<void(int64_t, int64_t, const float*)>& on_logits) {
  StepOutput out;
  const BatchView& b = plan.batch;
  const int64_t V = model_.config().vocab_size;
  Backend& be = model_.backend();
  Tensor logits;
  if (!b.logit_rows.empty()) logits = model_.head(b, X);
  // One spec per row the target samples at: each sample row and its draft rows.
  const std::vector<SampleSpec> base = sample_specs(plan);
  std::vector<SampleSpec> specs;
  std::vector<size_t> first(plan.samples.size());
  bool host_needed = static_cast<bool>(on_logits);
  for (size_t i = 0; i < plan.samples.size(); ++i) {
    const SampleRow& r = plan.samples[i];
    first[i] = specs.size();
    for (int j = 0; j <= r.n_draft; ++j) {
      SampleSpec s = base[i];
      s.row = r.logit_index + j;
      s.counter = plan.logit_position[static_cast<size_t>(s.row)] + 1;
      specs.push_back(s);
    }
    host_needed |= r.n_draft > 0 && r.params.temperature > 0.0f;
  }
  std::vector<int32_t> ids(specs.size());
  std::vector<TokenLogprobs> lps(specs.size());
  if (!specs.empty()) be.sample(logits, specs, ids.data(), lps.data());
  if (host_needed && logits.data) {
    host_logits_.resize(static_cast<size_t>(logits.rows * logits.cols));
    be.to_host(logits, host_logits_.data());
  }
  // Verification: the tokens each sample row emits; the logit rows that stand.
  std::vector<uint8_t> stands(b.logit_rows.size(), 1);
  std::vector<std::vector<int32_t>> emitted(plan.samples.size());
  for (size_t i = 0; i < plan.samples.size(); ++i) {
    const SampleRow& r = plan.samples[i];
    const size_t k = first[i];
    std::vector<int32_t>& e = emitted[i];
    const int chunk = b.chunk_of[static_cast<size_t>(b.logit_rows[r.logit_index])];
    const int slot = b.chunks[static_cast<size_t>(chunk)].slot;
    if (r.n_draft == 0) {
      e = {ids[k]};
      out.sampled.push_back({r.request, ids[k], lps[k]});
    } else {
      std::vector<int32_t> drafts(static_cast<size_t>(r.n_draft));
      for (int j = 1; j <= r.n_draft; ++j)
        drafts[j - 1] = b.token_ids[static_cast<size_t>(b.logit_rows[r.logit_index + j])];
      if (r.params.temperature <= 0.0f) {
        e = accept_greedy(std::vector<int32_t>(ids.begin() + static_cast<long>(k),
                                               ids.begin() + static_cast<long>(k) + r.n_draft + 1),
                          drafts);
      } else {
        auto it = q_.find(slot);
        SP_CHECK(it != q_.end() && it->second.request == r.request &&
                     static_cast<int>(it->second.q.size()) >= r.n_draft,
                 "verify: no draft distributions for request ", r.request);
        std::vector<SamplingDist> p;
        for (int j = 0; j <= r.n_draft; ++j)
          p.push_back(sampling_distribution(specs[k + j],
                                            host_logits_.data() + (r.logit_index + j) * V, V));
        e = accept_sampled(p, it->second.q, drafts, base[i],
                           plan.logit_position[static_cast<size_t>(r.logit_index)]);
      }
      cut_at_stop(e, plan.stop_tokens.data() + r.stop_offset, r.n_stop);
      spec_.drafts++;
      spec_.draft_tokens += r.n_draft;
      spec_.accepted_tokens += static_cast<int64_t>(e.size()) - 1;
      for (int32_t t : e) out.sampled.push_back({r.request, t, TokenLogprobs{}});
      for (int j = static_cast<int>(e.size()); j <= r.n_draft; ++j) stands[r.logit_index + j] = 0;
    }
    q_.erase(slot);
  }
  if (on_logits && logits.data)
    for (size_t i = 0; i < b.logit_rows.size(); ++i)
      if (stands[i])
        on_logits(plan.logit_request[i], plan.logit_position[i], host_logits_.data() + i * V);
  target_non_finite_ = Backend::kAllFinite;
  if (!drafter_) return out;
  // The draft layer's own steps reset the backend's non-finite flag: read the target's first (after
  // sampling it costs no wait), and draft nothing from a broken step.
  target_non_finite_ = be.non_finite_where();
  if (target_non_finite_ != Backend::kAllFinite) return out;
  // What stands of every chunk, and the token after each standing row.
  std::vector<ChunkAfterVerify> chunks;
  for (size_t ci = 0; ci < b.chunks.size(); ++ci) {
    if (!plan.chunk_next.empty() && plan.chunk_next[ci] == kNoDrafts) continue;
    const SeqChunk& ch = b.chunks[ci];
    ChunkAfterVerify c;
    c.chunk = static_cast<int>(ci);
    int nd = 0;
    const std::vector<int32_t>* e = nullptr;
    for (size_t i = 0; i < plan.samples.size(); ++i)
      if (plan.samples[i].request == plan.chunk_request[ci]) {
        c.sample = &plan.samples[i];
        nd = plan.samples[i].n_draft;
        e = &emitted[i];
      }
    c.rows = ch.n_tokens - nd + (e ? static_cast<int>(e->size()) - 1 : 0);
    for (int i = 0; i + 1 < c.rows; ++i) c.next.push_back(b.token_ids[ch.offset + i + 1]);
    if (c.rows > 0)
      c.next.push_back(e ? e->back() : plan.chunk_next.empty() ? -1 : plan.chunk_next[ci]);
    const bool stopped =
        e && c.sample->n_stop > 0 &&
        std::find(plan.stop_tokens.data() + c.sample->stop_offset,
                  plan.stop_tokens.data() + c.sample->stop_offset + c.sample->n_stop,
                  e->back()) != plan.stop_tokens.data() + c.sample->stop_offset + c.sample->n_stop;
    c.draft = e && c.sample->draft && !stopped;
    chunks.push_back(std::move(c));
  }
  drafter_->propose(plan, X, chunks, &out.drafts, &q_);
  return out;
}

}  // namespace sp
