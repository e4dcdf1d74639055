#include "engine/engine.h"

#include <chrono>

#include "engine/pipeline.h"

namespace sp {

std::vector<Sampled> finish_step_on_head(Model& model, const StepPlan& plan, Tensor X,
                                         Sampler& sampler, std::vector<float>& host_logits,
                                         const LogitsFn& on_logits) {
  std::vector<Sampled> out;
  if (plan.logit_rows.empty()) return out;
  const int64_t V = model.config().vocab_size;
  Tensor logits = model.head(X, plan.logit_rows);
  host_logits.resize(static_cast<size_t>(logits.rows * logits.cols));
  model.backend().to_host(logits, host_logits.data());
  if (on_logits)
    for (size_t i = 0; i < plan.logit_rows.size(); ++i)
      on_logits(plan.logit_request[i], plan.logit_position[i], host_logits.data() + i * V);
  for (const SampleRow& s : plan.samples)
    out.push_back({s.request,
                   sampler.sample(s.request, s.params, host_logits.data() + s.logit_index * V, V)});
  return out;
}

Engine::Engine(Model& model, const SchedulerLimits& lim) : model_(model), sched_(lim) {
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
