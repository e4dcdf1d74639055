#include "engine/engine.h"

#include <chrono>

namespace sp {

Engine::Engine(Model& model, const SchedulerLimits& lim) : model_(model), sched_(lim) {
  sched_.set_eos(model.config().eos_token_id);
}

RunStats Engine::run(const LogitsFn& on_logits, const StepLayerHook& hook) {
  RunStats st;
  auto t0 = std::chrono::steady_clock::now();
  const int64_t V = model_.config().vocab_size;
  while (!sched_.idle()) {
    StepPlan plan = sched_.schedule();
    SP_CHECK(!plan.empty(), "scheduler produced an empty step with work pending");
    Tensor X = model_.residual(plan.batch.num_tokens);
    model_.embed(plan.batch, X);
    LayerHook lh;
    if (hook) lh = [&](int layer, Tensor x) { hook(plan, layer, x); };
    model_.run_layers(plan.batch, X, lh);
    const float* lp = nullptr;
    if (!plan.logit_rows.empty()) {
      Tensor logits = model_.head(X, plan.logit_rows);
      host_logits_.resize(static_cast<size_t>(logits.rows * logits.cols));
      model_.backend().to_host(logits, host_logits_.data());
      lp = host_logits_.data();
    }
    sched_.complete(plan, lp, V, [&](const Sequence& s, int64_t pos, const float* l) { on_logits(s, pos, l); });
    st.steps++;
    st.tokens += plan.batch.num_tokens;
  }
  st.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return st;
}

}  // namespace sp
