// Prometheus metrics of `seekpipe serve` (prometheus-cpp's registry and text serializer).
#pragma once

#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <memory>
#include <string>

#include "engine/engine_loop.h"

namespace sp::server {

class Metrics {
 public:
  explicit Metrics(int num_stages);
  void request_done(int http_status);
  void finished(const std::string& reason);
  void prompt_tokens(int64_t n) { prompt_tokens_->Increment(static_cast<double>(n)); }
  void generation_tokens(int64_t n) { generation_tokens_->Increment(static_cast<double>(n)); }
  void ttft(double s) { ttft_->Observe(s); }
  void itl(double s) { itl_->Observe(s); }
  void e2e(double s) { e2e_->Observe(s); }
  // The exposition text, with the engine's gauges refreshed from `stats`.
  std::string render(const LoopStats& stats);

 private:
  int stages_;
  std::shared_ptr<prometheus::Registry> reg_;
  prometheus::Family<prometheus::Counter>* requests_;
  prometheus::Family<prometheus::Counter>* finish_;
  prometheus::Counter *prompt_tokens_, *generation_tokens_, *preemptions_, *prefix_queries_,
      *prefix_hits_;
  // Speculative decoding (vLLM's spec_decode counters): verify steps, draft tokens, accepted.
  prometheus::Counter *spec_drafts_, *spec_draft_tokens_, *spec_accepted_;
  prometheus::Histogram *ttft_, *itl_, *e2e_;
  prometheus::Gauge *queue_, *running_, *waiting_, *blocks_cached_;
  prometheus::Family<prometheus::Gauge>*blocks_used_, *blocks_total_, *busy_;
  double preemptions_seen_ = 0, prefix_queries_seen_ = 0, prefix_hits_seen_ = 0;
  SpecCounters spec_seen_;
};

}  // namespace sp::server
