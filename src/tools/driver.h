// Runs a job (generate, verify, bench) on one stage or a pipeline: in-process threads
// (`--pp N`) or one MPI process per stage (started by mpirun). Each stage loads only its own
// weights and allocates only its own state.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "engine/pipeline.h"
#include "model/model.h"
#include "tools/flags.h"

namespace sp {

std::vector<FlagSpec> common_flags();
// Snapshot slots of the prefix cache: --prefix-cache-slots, or 0 with --no-enable-prefix-caching
// (an error for contradicting flags).
Result<int> prefix_cache_slots(const Flags& f);
// --device resolved to "cpu" or "cuda" (auto: cuda when built and a GPU is present).
Result<std::string> resolve_device(const Flags& f);
// A backend tensor as host fp32 (converted from its dtype).
void tensor_to_f32(Backend& be, Tensor t, std::vector<float>& out);
std::vector<FlagSpec> pipeline_flags();

struct StageEnv {
  int stage = 0;
  Topology topo;
  Transport* transport = nullptr;
  Model* model = nullptr;
  const ModelWeights* weights = nullptr;
};

struct Job {
  int max_logit_rows = 0;  // 0: --max-num-seqs
  // Stage 0: queue the requests.
  std::function<Status(Scheduler&)> add_requests;
  // Per stage: hooks (logits on the last stage, layer outputs on every stage).
  std::function<StageHooks(const StageEnv&)> hooks;
  // Per stage, after the run: reductions and (on the last stage) the report. Returns the exit code
  // this stage proposes; every stage exits with the largest.
  std::function<int(const StageEnv&, const std::vector<StageReport>& reports)> finish;
};

// --model's config (with --override-config); also checks the speculative flags against it.
Result<Config> read_config(const Flags& f);
// --speculative / --num-speculative-tokens (K without --speculative mtp is an error).
constexpr int kMaxSpeculativeTokens = 8;
Result<SpeculativeConfig> speculative_config(const Flags& f);
// "1.23 GiB", "4.56 MiB", "7.8 KiB".
std::string human_bytes(double bytes);
// GPU memory plan: the bytes GPU stage `plan` needs (weights, sequence state at the flags' limits,
// workspace), and a split of the layers over `stages` stages in which each needs at most `cap`
// (empty if there is none): what a refused GPU memory check suggests.
double gpu_stage_bytes(const Flags& f, const Config& c, const LoadPlan& plan, int max_logit_rows);
std::vector<int> gpu_fitting_partition(const Flags& f, const Config& c, int stages, double cap,
                                       int max_logit_rows);
// Runs the job; returns the process exit code (errors are printed and give 2).
int run_job(const Flags& f, const Job& job);
int fail(const Status& s);

}  // namespace sp
