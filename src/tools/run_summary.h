// The lines the engine commands print after a run, from the stages' reports: the prefix cache's
// hits, each stage's busy fraction and the pipeline bubble, where the boundary tensors went, the
// speculative decoding counters, the CUDA graph replays, and the Chrome trace (--trace).
#pragma once

#include <vector>

#include "core/status.h"
#include "engine/pipeline.h"
#include "tools/flags.h"

namespace sp {

// Stage 0's prefix cache: prompt tokens looked up and found (nothing when prefix caching is off).
void print_prefix_summary(const std::vector<StageReport>& reports);
// Busy fraction of each stage and the pipeline bubble (nothing for one stage).
void print_pipeline_summary(const std::vector<StageReport>& reports);
// Decode steps replayed from CUDA graphs, per stage (nothing on the CPU or with --enforce-eager).
void print_graph_summary(const std::vector<StageReport>& reports);
// The last stage's speculative decoding counters (nothing without speculation).
void print_spec_summary(const std::vector<StageReport>& reports);
// Writes --trace's file when the flag was given.
Status maybe_write_trace(const Flags& f, const std::vector<StageReport>& reports);

}  // namespace sp
