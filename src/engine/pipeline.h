// The pipeline executor: one stage of a pipeline-parallel run, over any Transport.
//
// Stage 0 owns the scheduler. It keeps up to `micro_batches` steps in flight (default: the number
// of stages), spreading the ready tokens over the free micro-batch slots so a burst does not land
// in one; a sampled decode re-enters only after its token is back from the last stage, while a
// long prefill's chunks follow each other through the stages. Every stage runs its layers on the
// boundary tensor [tokens, hc_mult * hidden] and passes it on with the step descriptor; the last
// stage applies the head, reports logits, samples and sends the tokens back to stage 0.
// With one stage the same loop runs the whole model in place.
#pragma once

#include <string>
#include <vector>

#include "engine/engine.h"
#include "engine/speculative.h"
#include "engine/trace.h"
#include "parallel/device_link.h"
#include "parallel/topology.h"
#include "parallel/transport.h"

namespace sp {

struct TraceEvent {
  std::string name;  // compute, send, receive, wait
  int64_t step = -1;
  double start_us = 0, dur_us = 0;
};

struct StageReport {
  int stage = 0;
  double busy_s = 0;  // computing
  double wall_s = 0;  // from the stage's start to its end
  int64_t steps = 0;
  int64_t tokens = 0;
  SpecCounters spec;  // last stage: speculative decoding counters (not sent between stages)
  // Stage 0: the prefix cache's prompt tokens looked up and found cached (0 when it is off).
  int64_t prefix_queries = 0, prefix_hits = 0;
  int64_t host_bytes = 0;    // boundary tensor bytes this stage sent through host memory
  int64_t device_bytes = 0;  // ... and device to device (DeviceLink)
  int64_t graph_steps = 0;   // steps whose layers ran as a replayed CUDA graph
  std::vector<TraceEvent> events;
};

// Reproducible failures for tests: stage `stage` fails when it reaches step `step` (kill: the
// process dies at once, as if killed; error: it reports an error and brings the pipeline down;
// stall: it stops without dying, as a hung GPU or driver call looks: the process stops itself
// with SIGSTOP under mpirun, the thread blocks forever with threads; cuda: the stage's GPU
// faults (an invalid memory access queued before the step's kernels); nccl: the stage stops
// sending on its NCCL link while its host messages go on, as a peer gone from NCCL looks).
struct FaultInjection {
  int stage = -1;
  int64_t step = -1;
  bool kill = false;
  bool stall = false;
  bool at_load = false;  // STAGE:load:stall: stops while loading (at its third tensor)
  bool cuda = false;
  bool nccl = false;
};

// Speculative decoding (--speculative mtp --num-speculative-tokens K): the MTP draft layer on the
// last stage proposes `num_tokens` tokens per step (chained through its own output streams).
struct SpeculativeConfig {
  bool mtp = false;    // --speculative mtp (the last stage loads and runs the MTP layer)
  int num_tokens = 1;  // --num-speculative-tokens, 1..8
};

struct PipelineOptions {
  int micro_batches = 0;  // 0: one per stage
  bool trace = false;     // keep per-event timings
  FaultInjection fault;
  SpeculativeConfig speculative;
};

struct StageHooks {
  LogitsFn on_logits;                              // last stage
  std::function<void(const Sampled&)> on_sampled;  // last stage, each token it samples
  StepLayerHook hook;                              // every stage, after each of its layers
  // Last stage: proposes draft tokens after each step (speculative decoding; null: none).
  DraftSource* drafter = nullptr;
  // Stage 0 of a long-running loop (serve). `poll` moves new requests and aborts into the
  // scheduler between steps; `wait` says nothing can run now, so it may block briefly for work.
  // The loop ends when poll returns false and nothing is left to run or in flight.
  std::function<bool(Scheduler&, bool wait)> poll;
  // Stage 0, after a step's tokens were applied to the scheduler: `stage_times` holds every
  // stage's (busy seconds, wall seconds) so far.
  std::function<void(Scheduler&, const StepPlan&, const std::vector<Sampled>&,
                     const std::vector<double>& stage_times)>
      on_step;
};

// Runs this transport's stage to the end of the work. `sched` is stage 0's (null elsewhere).
// On the last stage `all` receives every stage's report (for the run summary and the trace).
// `link` (GPU stages, NCCL): the boundary tensor goes device to device through it, the step
// descriptors still through `tr`; null: both through `tr` (the tensor staged in host memory).
Status run_stage(Model& model, const Topology& topo, Transport& tr, Scheduler* sched,
                 const StageHooks& hooks, const PipelineOptions& opt, std::vector<StageReport>* all,
                 DeviceLink* link = nullptr);

}  // namespace sp
