#include "server/metrics.h"

#include <prometheus/text_serializer.h>

#include <mutex>

namespace sp::server {

using namespace prometheus;

namespace {

Histogram::BucketBoundaries latency_buckets() {
  return {0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 60};
}

}  // namespace

Metrics::Metrics(int num_stages) : stages_(num_stages), reg_(std::make_shared<Registry>()) {
  requests_ = &BuildCounter()
                   .Name("seekpipe_requests_total")
                   .Help("HTTP requests to the generation endpoints by response status code")
                   .Register(*reg_);
  finish_ = &BuildCounter()
                 .Name("seekpipe_request_finish_total")
                 .Help("Finished choices by finish reason (stop, length, tool_calls, abort)")
                 .Register(*reg_);
  prompt_tokens_ = &BuildCounter()
                        .Name("seekpipe_prompt_tokens_total")
                        .Help("Prompt tokens of accepted requests")
                        .Register(*reg_)
                        .Add({});
  generation_tokens_ = &BuildCounter()
                            .Name("seekpipe_generation_tokens_total")
                            .Help("Generated tokens")
                            .Register(*reg_)
                            .Add({});
  preemptions_ = &BuildCounter()
                      .Name("seekpipe_preemptions_total")
                      .Help("Sequences preempted (recomputed later) because state blocks ran out")
                      .Register(*reg_)
                      .Add({});
  auto counter = [&](const char* name, const char* help) {
    return &BuildCounter().Name(name).Help(help).Register(*reg_).Add({});
  };
  spec_drafts_ = counter("seekpipe_spec_decode_num_drafts_total",
                         "Speculative decoding: decode steps that verified draft tokens");
  spec_draft_tokens_ = counter("seekpipe_spec_decode_num_draft_tokens_total",
                               "Speculative decoding: draft tokens verified");
  spec_accepted_ = counter("seekpipe_spec_decode_num_accepted_tokens_total",
                           "Speculative decoding: draft tokens accepted");
  prefix_queries_ = &BuildCounter()
                         .Name("seekpipe_prefix_cache_queries_total")
                         .Help("Prompt tokens looked up in the prefix cache")
                         .Register(*reg_)
                         .Add({});
  prefix_hits_ = &BuildCounter()
                      .Name("seekpipe_prefix_cache_hits_total")
                      .Help("Prompt tokens found in the prefix cache (not computed)")
                      .Register(*reg_)
                      .Add({});
  ttft_ = &BuildHistogram()
               .Name("seekpipe_time_to_first_token_seconds")
               .Help("From request arrival to the first generated token")
               .Register(*reg_)
               .Add({}, latency_buckets());
  itl_ = &BuildHistogram()
              .Name("seekpipe_inter_token_latency_seconds")
              .Help("Between consecutive generated tokens of a choice")
              .Register(*reg_)
              .Add({}, latency_buckets());
  e2e_ = &BuildHistogram()
              .Name("seekpipe_e2e_request_latency_seconds")
              .Help("From request arrival to its last token")
              .Register(*reg_)
              .Add({}, latency_buckets());
  queue_ = &BuildGauge()
                .Name("seekpipe_queue_length")
                .Help("Requests accepted but not yet handed to the scheduler")
                .Register(*reg_)
                .Add({});
  running_ = &BuildGauge()
                  .Name("seekpipe_num_requests_running")
                  .Help("Sequences holding a state slot")
                  .Register(*reg_)
                  .Add({});
  waiting_ = &BuildGauge()
                  .Name("seekpipe_num_requests_waiting")
                  .Help("Sequences waiting for a slot or state blocks")
                  .Register(*reg_)
                  .Add({});
  blocks_cached_ = &BuildGauge()
                        .Name("seekpipe_prefix_cache_blocks")
                        .Help(
                            "State blocks held only by the prefix cache (evicted on demand; "
                            "not counted as used)")
                        .Register(*reg_)
                        .Add({});
  blocks_used_ = &BuildGauge()
                      .Name("seekpipe_state_blocks_used")
                      .Help("State blocks in use per pipeline stage")
                      .Register(*reg_);
  blocks_total_ = &BuildGauge()
                       .Name("seekpipe_state_blocks_total")
                       .Help("State blocks in the pool per pipeline stage")
                       .Register(*reg_);
  busy_ = &BuildGauge()
               .Name("seekpipe_stage_busy_fraction")
               .Help("Fraction of wall time each pipeline stage spent computing")
               .Register(*reg_);
}

void Metrics::request_done(int status) {
  requests_->Add({{"status", std::to_string(status)}}).Increment();
}

void Metrics::finished(const std::string& reason) {
  finish_->Add({{"reason", reason}}).Increment();
}

std::string Metrics::render(const LoopStats& s) {
  static std::mutex mu;  // render is the only writer of the gauges
  std::lock_guard<std::mutex> l(mu);
  queue_->Set(static_cast<double>(s.queued));
  blocks_cached_->Set(static_cast<double>(s.blocks_cached));
  running_->Set(static_cast<double>(s.running));
  waiting_->Set(static_cast<double>(s.waiting + s.queued));
  if (s.preemptions > preemptions_seen_) {
    preemptions_->Increment(static_cast<double>(s.preemptions) - preemptions_seen_);
    preemptions_seen_ = static_cast<double>(s.preemptions);
  }
  auto advance = [](prometheus::Counter* c, int64_t now, int64_t& seen) {
    if (now > seen) c->Increment(static_cast<double>(now - seen));
    seen = std::max(seen, now);
  };
  advance(spec_drafts_, s.spec.drafts, spec_seen_.drafts);
  advance(spec_draft_tokens_, s.spec.draft_tokens, spec_seen_.draft_tokens);
  advance(spec_accepted_, s.spec.accepted_tokens, spec_seen_.accepted_tokens);
  if (s.prefix_queries > prefix_queries_seen_) {
    prefix_queries_->Increment(static_cast<double>(s.prefix_queries) - prefix_queries_seen_);
    prefix_queries_seen_ = static_cast<double>(s.prefix_queries);
  }
  if (s.prefix_hits > prefix_hits_seen_) {
    prefix_hits_->Increment(static_cast<double>(s.prefix_hits) - prefix_hits_seen_);
    prefix_hits_seen_ = static_cast<double>(s.prefix_hits);
  }
  // Every stage addresses the same block ids (stage 0's tables travel with each step), and each
  // stage's pool has the agreed (smallest stage's) size: the counts are the same on every stage.
  for (int i = 0; i < stages_; ++i) {
    const std::string st = std::to_string(i);
    blocks_used_->Add({{"stage", st}}).Set(static_cast<double>(s.blocks_used));
    blocks_total_->Add({{"stage", st}}).Set(static_cast<double>(s.blocks_total));
    busy_->Add({{"stage", st}})
        .Set(i < static_cast<int>(s.stage_busy.size()) ? s.stage_busy[static_cast<size_t>(i)]
                                                       : 0.0);
  }
  return TextSerializer().Serialize(reg_->Collect());
}

}  // namespace sp::server
