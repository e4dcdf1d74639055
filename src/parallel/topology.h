// Pipeline topology: world size, rank, and which global layers each stage owns. A pure value.
//
// Partitions:
//  * default: vLLM's get_pp_indices (layers / pp each; the remainder adds one layer to each stage
//    before the last, starting from the second-to-last), so users moving from vLLM get the same
//    stages: 43 layers at 4 stages -> 11,11,11,10; 6 at 4 -> 1,2,2,1;
//  * explicit: --pp-partition 11,11,11,10;
//  * auto: a cost model of the real layer kinds and of the end stages' extras, balancing
//    predicted time and memory (see StageCost).
#pragma once

#include <string>
#include <vector>

#include "core/status.h"
#include "model/config.h"

namespace sp {

struct Topology {
  int world = 1;            // number of stages
  int rank = 0;             // this process's / thread's stage
  std::vector<int> layers;  // layers per stage

  int first_layer(int stage) const;
  int end_layer(int stage) const;  // exclusive
  bool is_first(int stage) const { return stage == 0; }
  bool is_last(int stage) const { return stage == world - 1; }
  std::string partition_string() const;  // "11,11,11,10"
};

std::vector<int> vllm_partition(int num_layers, int pp);
// Validates an explicit partition: pp entries, each >= 1, summing to the layer count.
Result<std::vector<int>> parse_partition(const std::string& text, int num_layers, int pp);

// What a stage costs, from the config alone.
struct CostModelOptions {
  int batch = 16;          // sequences decoding together (--max-num-seqs)
  int64_t context = 4096;  // tokens of context each attends over (--max-model-len)
  bool mtp = false;        // MTP draft layer on the last stage
  // The head's time per predicted byte relative to a layer's (--pp-head-cost; 1: bytes alone).
  // Kernels that run the head closer to the copy bandwidth than the layers make it less than 1;
  // fit_head_cost measures it from a run's stage times.
  double head_cost = 1.0;
};
struct StageCost {
  int first_layer = 0, end_layer = 0;
  int64_t weight_bytes = 0;     // weights this stage holds
  int64_t state_per_token = 0;  // growing sequence state, bytes per token
  int64_t state_per_seq = 0;    // fixed sequence state
  double time = 0;              // predicted decode-step cost (bytes moved; memory-bound model)
};
// Predicted decode cost of one layer and of the end-stage extras, in bytes moved per decode step.
double layer_time_cost(const Config& c, int layer, const CostModelOptions& o);
double embed_time_cost(const Config& c, const CostModelOptions& o);
double head_time_cost(const Config& c, const CostModelOptions& o);
std::vector<StageCost> stage_costs(const Config& c, const std::vector<int>& partition,
                                   const CostModelOptions& o);
// Contiguous partition minimising the largest stage share, a stage's share being the larger of its
// share of predicted time and its share of memory (weights + state at the given batch and context).
std::vector<int> auto_partition(const Config& c, int pp, const CostModelOptions& o);

// Fits CostModelOptions::head_cost to measured stage times (`stage_ms`, one per stage of
// `partition`, at least 2 stages, the batch and context of `o`): a stage's time is taken as a x its
// predicted layer (and embedding) cost, plus b x the head's predicted cost on the last stage; a
// comes from the stages before the last, and head_cost = b / a. An error when the times cannot
// give it (a wrong count, a time not positive, a last stage no slower than its layers predict).
Result<double> fit_head_cost(const Config& c, const std::vector<int>& partition,
                             const std::vector<double>& stage_ms, const CostModelOptions& o);

// Resolves --pp and --pp-partition ("" for vLLM's split, "auto", or a list).
Result<Topology> make_topology(const Config& c, int pp, int rank, const std::string& partition,
                               const CostModelOptions& o);

}  // namespace sp
