#include "engine/engine_loop.h"

#include <algorithm>

namespace sp {

void RequestChannel::push(EngineEvent e) {
  {
    std::lock_guard<std::mutex> l(mu_);
    q_.push_back(std::move(e));
  }
  cv_.notify_all();
}

std::vector<EngineEvent> RequestChannel::pop(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> l(mu_);
  cv_.wait_for(l, timeout, [&] { return !q_.empty(); });
  std::vector<EngineEvent> out(std::make_move_iterator(q_.begin()),
                               std::make_move_iterator(q_.end()));
  q_.clear();
  return out;
}

bool EngineLoop::submit(std::vector<Request> reqs,
                        std::vector<std::shared_ptr<RequestChannel>> channels) {
  {
    std::lock_guard<std::mutex> l(mu_);
    if (shutdown_ ||
        static_cast<int64_t>(pending_.size() + reqs.size()) + stats_.waiting > max_pending_)
      return false;
    for (size_t i = 0; i < reqs.size(); ++i) {
      pending_.push_back(std::move(reqs[i]));
      pending_channels_.push_back(std::move(channels[i]));
    }
    stats_.queued = static_cast<int64_t>(pending_.size());
  }
  cv_.notify_all();
  return true;
}

void EngineLoop::abort(int64_t id) {
  {
    std::lock_guard<std::mutex> l(mu_);
    aborts_.push_back(id);
  }
  cv_.notify_all();
}

void EngineLoop::shutdown() {
  {
    std::lock_guard<std::mutex> l(mu_);
    shutdown_ = true;
  }
  cv_.notify_all();
}

LoopStats EngineLoop::stats() const {
  std::lock_guard<std::mutex> l(mu_);
  return stats_;
}

StageHooks EngineLoop::hooks() {
  StageHooks h;
  h.poll = [this](Scheduler& s, bool wait) { return poll(s, wait); };
  h.on_step = [this](Scheduler& s, const StepPlan& p, const std::vector<Sampled>& t,
                     const std::vector<double>& times) { on_step(s, p, t, times); };
  return h;
}

bool EngineLoop::poll(Scheduler& s, bool wait) {
  std::unique_lock<std::mutex> l(mu_);
  stats_.ready = true;
  if (wait && pending_.empty() && aborts_.empty() && !shutdown_)
    cv_.wait_for(l, std::chrono::milliseconds(20));
  for (size_t i = 0; i < pending_.size(); ++i) {
    const int64_t id = pending_[i].id;
    Status st = s.add(std::move(pending_[i]));
    if (!st) {
      EngineEvent e;
      e.kind = EngineEvent::Kind::kError;
      e.request = id;
      e.error = st.message();
      pending_channels_[i]->push(std::move(e));
      continue;
    }
    live_[id] = std::move(pending_channels_[i]);
  }
  pending_.clear();
  pending_channels_.clear();
  if (shutdown_)
    for (auto& [id, ch] : live_) aborts_.push_back(id);
  for (int64_t id : aborts_) s.abort(id);
  aborts_.clear();
  publish_finished(s);
  update_stats(s);
  return !shutdown_;
}

void EngineLoop::on_step(Scheduler& s, const StepPlan& plan, const std::vector<Sampled>& sampled,
                         const std::vector<double>& times) {
  std::lock_guard<std::mutex> l(mu_);
  for (const Sampled& t : sampled) {
    auto it = live_.find(t.request);
    if (it == live_.end()) continue;
    const Sequence* seq = nullptr;
    for (const Sequence* q : plan.seqs)
      if (q->req.id == t.request) seq = q;
    if (seq && seq->finish == FinishReason::kAbort) continue;  // the token was dropped
    EngineEvent e;
    e.request = t.request;
    e.token = t.token;
    e.lp = t.lp;
    it->second->push(std::move(e));
  }
  stats_.stage_busy.assign(times.size() / 2, 0.0);
  for (size_t i = 0; i + 1 < times.size(); i += 2)
    stats_.stage_busy[i / 2] = times[i + 1] > 0 ? times[i] / times[i + 1] : 0.0;
  publish_finished(s);
  update_stats(s);
}

void EngineLoop::publish_finished(Scheduler& s) {
  for (auto& seq : s.take_finished()) {
    auto it = live_.find(seq->req.id);
    if (it == live_.end()) continue;
    EngineEvent e;
    e.kind = EngineEvent::Kind::kFinish;
    e.request = seq->req.id;
    e.reason = seq->finish;
    it->second->push(std::move(e));
    live_.erase(it);
  }
}

void EngineLoop::update_stats(const Scheduler& s) {
  stats_.queued = static_cast<int64_t>(pending_.size());
  stats_.waiting = s.num_waiting();
  stats_.running = s.num_running();
  // As vLLM counts them: blocks only the prefix cache holds are evicted on demand, so not in use.
  stats_.blocks_cached = s.blocks().cache_only_blocks();
  stats_.blocks_used = s.blocks().used_blocks() - stats_.blocks_cached;
  stats_.blocks_total = s.blocks().num_blocks();
  stats_.block_tokens = s.blocks().block_tokens();
  stats_.preemptions = s.preemptions();
  stats_.spec = s.spec_counters();
  if (const PrefixCache* pc = s.prefix_cache()) {
    stats_.prefix_queries = pc->stats.queries;
    stats_.prefix_hits = pc->stats.hits;
  }
}

}  // namespace sp
