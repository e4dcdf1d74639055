#include "engine/engine.h"

#include <chrono>

#include "engine/pipeline.h"

namespace sp {

SchedulerLimits with_state_blocks(SchedulerLimits lim, const Model& model) {
  lim.block_tokens = model.block_tokens();
  lim.num_blocks = model.num_blocks();
  return lim;
}

Engine::Engine(Model& model, const SchedulerLimits& lim)
    : model_(model), sched_(with_state_blocks(lim, model)) {
  sched_.set_eos(model.config().eos_token_id);
}

RunStats Engine::run(const LogitsFn& on_logits, const StepLayerHook& hook, DraftSource* drafter) {
  Topology topo{1, 0, {model_.config().num_layers}};
  auto tr = make_local_transports(1);
  std::vector<StageReport> reports;
  auto t0 = std::chrono::steady_clock::now();
  StageHooks hooks{on_logits, nullptr, hook};
  hooks.drafter = drafter;
  Status st = run_stage(model_, topo, *tr[0], &sched_, hooks, PipelineOptions{}, &reports);
  SP_CHECK(st.is_ok(), st.message());
  RunStats rs;
  rs.steps = reports[0].steps;
  rs.tokens = reports[0].tokens;
  rs.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return rs;
}

}  // namespace sp
