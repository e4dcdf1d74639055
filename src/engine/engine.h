// Executors. The single-stage Engine runs the whole model in one process; the pipeline executor
// (engine/pipeline.h) runs one stage per thread or process. Both share the last-stage work below.
#pragma once

#include <functional>

#include "engine/scheduler.h"
#include "engine/speculative.h"
#include "model/model.h"

namespace sp {

// Logits of one position of one request (on the stage that owns the head).
using LogitsFn = std::function<void(int64_t request, int64_t position, const float* logits)>;
// Called after each layer with the step's plan and the residual X [T, hc * hidden].
using StepLayerHook = std::function<void(const StepPlan&, int layer, Tensor X)>;

struct RunStats {
  int64_t steps = 0;
  int64_t tokens = 0;
  double seconds = 0;
};

// The model's state-block geometry in scheduler limits (block size, blocks in the pool).
SchedulerLimits with_state_blocks(SchedulerLimits lim, const Model& model);

// The whole model in this thread: the pipeline executor with one stage.
class Engine {
 public:
  Engine(Model& model, const SchedulerLimits& lim);
  Scheduler& scheduler() { return sched_; }
  // Runs until every request has finished; `drafter` proposes draft tokens (speculative decoding).
  RunStats run(const LogitsFn& on_logits, const StepLayerHook& hook = nullptr,
               DraftSource* drafter = nullptr);

 private:
  Model& model_;
  Scheduler sched_;
};

}  // namespace sp
