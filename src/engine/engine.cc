#include "engine/engine.h"

#include <chrono>

#include "engine/pipeline.h"

namespace sp {

std::vector<Sampled> finish_step_on_head(Model& model, const StepPlan& plan, Tensor X,
                                         std::vector<float>& host_logits,
                                         const LogitsFn& on_logits) {
  std::vector<Sampled> out;
  if (plan.batch.logit_rows.empty()) return out;
  const int64_t V = model.config().vocab_size;
  Tensor logits = model.head(plan.batch, X);
  if (!plan.samples.empty()) {
    std::vector<int32_t> ids(plan.samples.size());
    std::vector<TokenLogprobs> lps(plan.samples.size());
    model.backend().sample(logits, sample_specs(plan), ids.data(), lps.data());
    for (size_t i = 0; i < ids.size(); ++i)
      out.push_back({plan.samples[i].request, ids[i], lps[i]});
  }
  if (on_logits) {
    host_logits.resize(static_cast<size_t>(logits.rows * logits.cols));
    model.backend().to_host(logits, host_logits.data());
    for (size_t i = 0; i < plan.batch.logit_rows.size(); ++i)
      on_logits(plan.logit_request[i], plan.logit_position[i], host_logits.data() + i * V);
  }
  return out;
}

SchedulerLimits with_state_blocks(SchedulerLimits lim, const Model& model) {
  lim.block_tokens = model.block_tokens();
  lim.num_blocks = model.num_blocks();
  return lim;
}

Engine::Engine(Model& model, const SchedulerLimits& lim)
    : model_(model), sched_(with_state_blocks(lim, model)) {
  sched_.set_eos(model.config().eos_token_id);
}

RunStats Engine::run(const LogitsFn& on_logits, const StepLayerHook& hook) {
  Topology topo{1, 0, {model_.config().num_layers}};
  auto tr = make_local_transports(1);
  std::vector<StageReport> reports;
  auto t0 = std::chrono::steady_clock::now();
  Status st = run_stage(model_, topo, *tr[0], &sched_, StageHooks{on_logits, nullptr, hook},
                        PipelineOptions{}, &reports);
  SP_CHECK(st.is_ok(), st.message());
  RunStats rs;
  rs.steps = reports[0].steps;
  rs.tokens = reports[0].tokens;
  rs.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return rs;
}

}  // namespace sp
