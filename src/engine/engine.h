// Single-stage executor: schedule a step, run the whole model on it, hand back logits.
#pragma once

#include <functional>

#include "engine/scheduler.h"
#include "model/model.h"

namespace sp {

using LogitsFn = std::function<void(const Sequence&, int64_t position, const float* logits)>;
// Called after each layer with the step's plan and the residual X [T, hc * hidden].
using StepLayerHook = std::function<void(const StepPlan&, int layer, Tensor X)>;

struct RunStats {
  int64_t steps = 0;
  int64_t tokens = 0;
  double seconds = 0;
};

class Engine {
 public:
  Engine(Model& model, const SchedulerLimits& lim);
  Scheduler& scheduler() { return sched_; }
  // Runs until every request has finished.
  RunStats run(const LogitsFn& on_logits, const StepLayerHook& hook = nullptr);

 private:
  Model& model_;
  Scheduler sched_;
  std::vector<float> host_logits_;
};

}  // namespace sp
