// The long-running engine loop of `seekpipe serve`, on stage 0. Other threads (the HTTP server)
// never touch the scheduler or the model: they submit requests into a bounded queue and abort
// them by id; the loop (running inside stage 0's StageRunner, through StageHooks::poll/on_step)
// moves them into the scheduler between steps and streams each request's tokens and its end into
// the request's own channel.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "engine/pipeline.h"

namespace sp {

struct EngineEvent {
  enum class Kind { kToken, kFinish, kError };
  Kind kind = Kind::kToken;
  int64_t request = 0;
  int32_t token = 0;
  TokenLogprobs lp;
  FinishReason reason = FinishReason::kNone;
  std::string error;
};

// One request's output: the loop pushes, the request's HTTP thread pops.
class RequestChannel {
 public:
  void push(EngineEvent e);
  // Waits up to `timeout` for events; returns what is there (maybe nothing).
  std::vector<EngineEvent> pop(std::chrono::milliseconds timeout);

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<EngineEvent> q_;
};

// A snapshot for /metrics and /health.
struct LoopStats {
  bool ready = false;
  int64_t queued = 0;  // submitted, not yet in the scheduler
  int64_t waiting = 0, running = 0;
  int64_t blocks_used = 0, blocks_total = 0, block_tokens = 0;
  int64_t preemptions = 0;
  SpecCounters spec;  // speculative decoding (zero without it)
  // Prefix cache (vLLM's prefix_cache_queries / prefix_cache_hits): prompt tokens looked up and
  // found cached.
  int64_t prefix_queries = 0, prefix_hits = 0;
  int64_t blocks_cached = 0;       // held only by the prefix cache (not counted in blocks_used)
  std::vector<double> stage_busy;  // per stage, busy / wall since start
};

class EngineLoop {
 public:
  // `max_pending`: most requests queued or waiting for a slot; more are refused (HTTP 429).
  explicit EngineLoop(int max_pending) : max_pending_(max_pending) {}

  int64_t next_id() { return next_id_.fetch_add(1); }
  // Queues requests (a request's n choices together: all or none). False when the queue is full or
  // the loop is shutting down.
  bool submit(std::vector<Request> reqs, std::vector<std::shared_ptr<RequestChannel>> channels);
  void abort(int64_t id);
  // Ends the loop once the work in the scheduler is done; pending requests are aborted.
  void shutdown();
  LoopStats stats() const;

  // The stage-0 hooks that run the loop.
  StageHooks hooks();

 private:
  bool poll(Scheduler& s, bool wait);
  void on_step(Scheduler& s, const StepPlan& plan, const std::vector<Sampled>& sampled,
               const std::vector<double>& times);
  // Finished sequences' last events; channels forgotten. Called with mu_ held.
  void publish_finished(Scheduler& s);
  void update_stats(const Scheduler& s);

  const int max_pending_;
  std::atomic<int64_t> next_id_{1};
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Request> pending_;
  std::vector<std::shared_ptr<RequestChannel>> pending_channels_;
  std::vector<int64_t> aborts_;
  bool shutdown_ = false;
  std::map<int64_t, std::shared_ptr<RequestChannel>> live_;  // in the scheduler
  LoopStats stats_;
};

}  // namespace sp
