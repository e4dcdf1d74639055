#include "tools/driver.h"

#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <new>
#include <nlohmann/json.hpp>
#include <sstream>
#include <system_error>
#include <thread>

#include "core/checked.h"
#include "model/strict_json.h"
#include "parallel/device_link.h"

namespace sp {

std::vector<FlagSpec> common_flags() {
  int hw = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  return {
      {"model", FlagKind::kString, "",
       "model directory: config.json plus safetensors weights (required)"},
      {"load-format",
       FlagKind::kString,
       "auto",
       "auto/safetensors: read the checkpoint; dummy: generate weights of the config's shapes and "
       "formats from --seed",
       -1e300,
       1e300,
       {"auto", "safetensors", "dummy"}},
      {"seed", FlagKind::kInt, "0", "seed for --load-format dummy weights and for sampling", 0,
       9.2e18},
      {"threads", FlagKind::kInt, std::to_string(hw),
       "CPU threads per stage; when not given, this machine's cores are shared by the stages on it",
       1, 1024},
      {"max-num-seqs", FlagKind::kInt, "16",
       "most sequences in flight (state is sized for this many)", 1, 65536},
      {"max-num-batched-tokens", FlagKind::kInt, "2048",
       "most tokens in a step; longer prompts are prefilled in chunks", 1, 1 << 24},
      {"max-model-len", FlagKind::kInt, "4096",
       "longest sequence (prompt + output) in tokens; state is sized for it", 1, 1 << 30},
      {"num-state-blocks", FlagKind::kInt, "0",
       "state blocks in each stage's pool (compressed entries and indexer keys, paged); 0: sized "
       "from the memory left after weights, at most enough for every sequence at "
       "--max-model-len; every stage uses the smallest stage's count",
       0, 1 << 30},
      {"enable-prefix-caching", FlagKind::kBool, "",
       "reuse the state of a cached prompt prefix (block-aligned) instead of computing it again "
       "(on by default, as in vLLM)"},
      {"no-enable-prefix-caching", FlagKind::kBool, "", "turn prefix caching off"},
      {"prefix-cache-slots", FlagKind::kInt, "16",
       "prefix caching: state slots for snapshots of cached prefixes (each as large as a "
       "sequence's per-slot state, on every stage)",
       1, 65536},
      {"verbose", FlagKind::kBool, "", "also print config keys the model does not use"},
      {"override-config", FlagKind::kString, "",
       "JSON object merged into config.json before it is checked (as vLLM's --hf-overrides); "
       "a smaller num_hidden_layers keeps the first N layers' kinds"},
      {"kv-cache-dtype",
       FlagKind::kString,
       "auto",
       "storage of the attention state (window rings, compressed entries, indexer keys): auto "
       "(fp32 on cpu, bf16 on cuda), bf16, fp32 (cuda: for diagnosis), fp8 (not supported yet)",
       -1e300,
       1e300,
       {"auto", "bf16", "fp32", "fp8"}},
      {"activation-dtype",
       FlagKind::kString,
       "auto",
       "activations between ops: auto (fp32), fp32, or bf16 (cuda only: faster prefill, "
       "about 4e-3 relative logit error); the residual streams stay fp32",
       -1e300,
       1e300,
       {"auto", "bf16", "fp32"}},
      {"enforce-eager", FlagKind::kBool, "",
       "cuda: launch every step's kernels one by one instead of replaying decode steps from "
       "CUDA graphs (as vLLM's flag; results are bit-identical either way)"},
      {"activation-quant",
       FlagKind::kString,
       "none",
       "quantisation of the activations before the FP8 projections: none (exact), or fp8 (cuda "
       "only: the reference's 1x128 e4m3 quantisation with power-of-two scales, and cuBLASLt's "
       "block-scaled FP8 GEMM, for projections of at least 128 rows)",
       -1e300,
       1e300,
       {"none", "fp8"}},
      {"speculative",
       FlagKind::kString,
       "none",
       "speculative decoding: none, or mtp (the checkpoint's MTP draft layer, mtp.0.*, loaded and "
       "run on the last stage; vLLM's name)",
       -1e300,
       1e300,
       {"none", "mtp"}},
      {"num-speculative-tokens", FlagKind::kInt, "1",
       "draft tokens per step with --speculative mtp (the MTP layer fed its own output for more "
       "than one)",
       1, kMaxSpeculativeTokens},
      {"device",
       FlagKind::kString,
       "auto",
       "where the model runs: cpu (the fp32 reference backend), cuda (one GPU per stage), or "
       "auto (cuda when this build has it and a GPU is present, else cpu)",
       -1e300,
       1e300,
       {"auto", "cpu", "cuda"}},
  };
}

Result<int> prefix_cache_slots(const Flags& f) {
  const bool on = f.given("enable-prefix-caching") && f.boolean("enable-prefix-caching");
  const bool off = f.given("no-enable-prefix-caching") && f.boolean("no-enable-prefix-caching");
  if (on && off)
    return Status::error(
        "--enable-prefix-caching and --no-enable-prefix-caching contradict each other; give one");
  if (f.given("enable-prefix-caching") && !on)
    return Status::error(
        "--enable-prefix-caching=false: to turn prefix caching off, use "
        "--no-enable-prefix-caching");
  if (f.given("no-enable-prefix-caching") && !off)
    return Status::error(
        "--no-enable-prefix-caching=false: prefix caching is on by default; drop the flag");
  if (off && f.given("prefix-cache-slots"))
    return Status::error(
        "--prefix-cache-slots has no effect with --no-enable-prefix-caching; drop one of them");
  return off ? 0 : static_cast<int>(f.i64("prefix-cache-slots"));
}

namespace {
// After run_job checked the flags (inspect checks them itself).
int slots_or_zero(const Flags& f) {
  auto r = prefix_cache_slots(f);
  return r ? *r : 0;
}
}  // namespace

Result<std::string> resolve_device(const Flags& f) {
  const std::string d = f.str("device");
  if (d == "cpu") return d;
  if (d == "auto")
    return std::string(cuda_backend_built() && cuda_device_available() ? "cuda" : "cpu");
  if (!cuda_backend_built())
    return Status::error(
        "--device cuda: this seekpipe was built without the CUDA backend (CMake found no nvcc); "
        "rebuild with the CUDA toolkit installed, or use --device cpu");
  if (!cuda_device_available())
    return Status::error(
        "--device cuda: no usable CUDA GPU is visible to this process; use "
        "--device cpu");
  return d;
}

void tensor_to_f32(Backend& be, Tensor t, std::vector<float>& out) {
  out.resize(static_cast<size_t>(t.numel()));
  if (t.dtype == DType::kF32) {
    be.to_host(t, out.data());
    return;
  }
  std::vector<uint8_t> raw(static_cast<size_t>(t.numel() * t.elem_size()));
  be.to_host(t, raw.data());
  to_f32(t.dtype, raw.data(), out.data(), t.numel());
}

std::vector<FlagSpec> pipeline_flags() {
  std::vector<FlagSpec> specs = {
      {"pp", FlagKind::kInt, "1",
       "pipeline stages: threads of this process, or under mpirun the number of ranks", 1, 4096},
      {"pp-partition", FlagKind::kString, "vllm",
       "layers per stage: vllm (vLLM's split), auto (cost model of layer kinds, time and memory), "
       "or a list like 11,11,11,10"},
      {"micro-batches", FlagKind::kInt, "0",
       "steps in flight in the pipeline; 0 means one per stage", 0, 4096},
      {"trace", FlagKind::kString, "",
       "write a Chrome trace (Perfetto / chrome://tracing) of every stage to this file"},
      {"fault-inject", FlagKind::kString, "",
       "STAGE:STEP[:kill|error|stall|cuda|nccl] makes a stage fail at a step (tests): kill ends "
       "the process at once (mpirun), error reports and brings the pipeline down, stall stops the "
       "stage without ending it (SIGSTOP under mpirun) for the watchdog to find, cuda makes its "
       "GPU fault (an invalid memory access), nccl makes it stop sending on its NCCL link while "
       "its host messages go on; STAGE:load:stall stops it while it loads its weights"},
      {"stage-timeout", FlagKind::kFloat, "300",
       "seconds a stage may wait without hearing from the stage it waits on before the run is "
       "stopped naming that stage as stalled or unreachable (exit 5); must exceed the longest "
       "step of one stage; 0 turns the watchdog off",
       0, 1e6},
  };
  specs.push_back(
      {"stage-transport",
       FlagKind::kString,
       "auto",
       "how the boundary tensor travels between stages: auto (nccl when every stage runs "
       "on a GPU and this build has NCCL, else host), nccl (device to device; an error "
       "when not possible), host (through host memory with the step descriptor)",
       -1e300,
       1e300,
       {"auto", "nccl", "host"}});
  specs.push_back(
      {"devices", FlagKind::kString, "",
       "GPUs of the stages on this machine, in stage order, e.g. 0,2 (--device cuda; one "
       "per stage on this machine); default: the machine's i-th stage on GPU i"});
  specs[1].validate = validate_pp_partition;
  specs[4].validate = validate_fault_inject;
  specs.back().validate = validate_devices;
  specs.push_back({"pp-head-cost", FlagKind::kFloat, "1",
                   "for --pp-partition auto: the head's time per byte relative to a layer's (1: "
                   "bytes alone); `seekpipe inspect --stage-ms` fits it from a run's stage times",
                   0.01, 100});
  return specs;
}

int fail(const Status& s) {
  std::fprintf(stderr, "error: %s\n", s.message().c_str());
  return 2;
}

namespace {

// vLLM's --hf-overrides: objects merge key by key, anything else replaces.
void merge_json(nlohmann::json& into, const nlohmann::json& over) {
  for (auto it = over.begin(); it != over.end(); ++it) {
    if (it->is_object() && into.contains(it.key()) && into[it.key()].is_object())
      merge_json(into[it.key()], *it);
    else
      into[it.key()] = *it;
  }
}

// A smaller num_hidden_layers keeps the first N layers' kinds: per-layer lists are cut to N
// (compress_ratios keeps its trailing draft-module entries), num_hash_layers to at most N.
void truncate_layers(nlohmann::json& j, int64_t old_n, int64_t n) {
  if (n >= old_n) return;
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (!it->is_array()) continue;
    const int64_t len = static_cast<int64_t>(it->size());
    if (len == old_n) {
      it->erase(it->begin() + n, it->end());
    } else if (len > old_n && len <= old_n + 3 && it.key() == "compress_ratios") {
      // The draft module's trailing entries (1 for MTP, 3 for DSpark) stay.
      nlohmann::json draft(it->begin() + old_n, it->end());
      it->erase(it->begin() + n, it->end());
      for (auto& e : draft) it->push_back(e);
    }
  }
  if (j.contains("num_hash_layers") && j["num_hash_layers"].is_number_integer() &&
      j["num_hash_layers"].get<int64_t>() > n)
    j["num_hash_layers"] = n;
}

}  // namespace

Result<SpeculativeConfig> speculative_config(const Flags& f) {
  SpeculativeConfig s;
  s.mtp = f.str("speculative") == "mtp";
  if (f.given("num-speculative-tokens") && !s.mtp)
    return Status::error(
        "--num-speculative-tokens needs --speculative mtp: draft tokens come from the MTP layer, "
        "and speculation is off (--speculative none)");
  s.num_tokens = static_cast<int>(f.i64("num-speculative-tokens"));
  return s;
}

Result<Config> read_config(const Flags& f) {
  if (!f.given("model"))
    return Status::error("--model is required: a DeepSeek-V4 model directory with config.json");
  auto loaded = load_config(f.str("model"));
  if (!loaded) return loaded.status();
  Config c = std::move(loaded.value());
  if (f.given("override-config")) {
    const std::string path = f.str("model") + "/config.json";
    SP_ASSIGN_OR_RETURN(std::string text, read_regular_file(path, int64_t{1} << 20, "config"));
    SP_ASSIGN_OR_RETURN(nlohmann::json base, parse_json_strict(text, path));
    auto parsed = parse_json_strict(f.str("override-config"), "--override-config");
    if (!parsed) return parsed.status();
    nlohmann::json over = std::move(parsed.value());
    if (!over.is_object())
      return Status::error(
          str("--override-config: expected a JSON object such as "
              "'{\"num_hidden_layers\": 4}', got '",
              f.str("override-config").substr(0, 200), "'"));
    const int64_t old_n = c.num_layers;
    merge_json(base, over);
    if (over.contains("num_hidden_layers") && over["num_hidden_layers"].is_number_integer())
      truncate_layers(base, old_n, over["num_hidden_layers"].get<int64_t>());
    auto merged = parse_config(base.dump(), path + " with --override-config");
    if (!merged) return merged.status();
    c = std::move(merged.value());
  }
  SP_ASSIGN_OR_RETURN(SpeculativeConfig spec, speculative_config(f));
  if (spec.mtp) SP_RETURN_IF_ERROR(check_mtp_config(c));
  if (f.boolean("verbose") && !c.ignored_keys.empty()) {
    std::string keys;
    for (auto& k : c.ignored_keys) keys += " " + k;
    std::printf("config keys not used by the model:%s\n", keys.c_str());
  }
  return c;
}

std::string human_bytes(double b) {
  char buf[64];
  if (b >= 1073741824.0)
    std::snprintf(buf, sizeof buf, "%.2f GiB", b / 1073741824.0);
  else if (b >= 1048576.0)
    std::snprintf(buf, sizeof buf, "%.2f MiB", b / 1048576.0);
  else
    std::snprintf(buf, sizeof buf, "%.1f KiB", b / 1024.0);
  return buf;
}

namespace {

ProgressFn progress_printer(int stage) {
  auto last = std::make_shared<int>(-1);
  return [last, stage](int64_t done, int64_t total) {
    if (total < (int64_t{256} << 20)) return;  // small checkpoints load instantly
    int pct = static_cast<int>(100 * done / std::max<int64_t>(total, 1));
    if (pct / 10 != *last / 10 || done == total) {
      *last = pct;
      std::fprintf(stderr, "stage %d: loading weights %3d%% (%.2f / %.2f GB)\n", stage, pct,
                   done / 1e9, total / 1e9);
    }
  };
}

Result<FaultInjection> parse_fault(const std::string& text) {
  FaultInjection f;
  if (text.empty()) return f;
  if (int stage = -1, end = 0; std::sscanf(text.c_str(), "%d:load:stall%n", &stage, &end) == 1 &&
                               stage >= 0 && text[static_cast<size_t>(end)] == '\0' && end > 0) {
    f.stage = stage;
    f.stall = true;
    f.at_load = true;
    return f;
  }
  int stage = -1;
  long long step = -1;
  char mode[16] = "error";
  int n = std::sscanf(text.c_str(), "%d:%lld:%15s", &stage, &step, mode);
  std::string m = mode;
  if (n < 2 || stage < 0 || step < 0 ||
      (m != "kill" && m != "error" && m != "stall" && m != "cuda" && m != "nccl"))
    return Status::error(
        str("--fault-inject '", text,
            "': expected STAGE:STEP or STAGE:STEP:kill|error|stall|cuda|nccl, e.g. 1:3:kill"));
  f.stage = stage;
  f.step = step;
  f.kill = m == "kill";
  f.stall = m == "stall";
  f.cuda = m == "cuda";
  f.nccl = m == "nccl";
  return f;
}

// --fault-inject S:load:stall: stops this stage while it loads, as a stalled file system would
// (a thread that never returns) or, under mpirun, a stopped process (SIGSTOP).
void stall_loading(int stage, bool mpi) {
  std::fprintf(stderr, "stage %d: injected stall while loading\n", stage);
  std::fflush(stderr);
  if (mpi) raise(SIGSTOP);
  while (true) std::this_thread::sleep_for(std::chrono::hours(1));
}

// Identity of what a rank was started with; every rank must agree.
std::string fingerprint(const Flags& f, const Config& c, const Topology& t) {
  std::ifstream in(f.str("model") + "/config.json");
  std::stringstream ss;
  ss << in.rdbuf();
  uint64_t h = 1469598103934665603ull;
  for (char ch : ss.str()) h = (h ^ static_cast<uint8_t>(ch)) * 1099511628211ull;
  char hex[17];
  for (char ch : f.str("override-config")) h = (h ^ static_cast<uint8_t>(ch)) * 1099511628211ull;
  std::snprintf(hex, sizeof hex, "%016" PRIx64, h);
  return str("partition=", t.partition_string(), ";config=", hex, ";layers=", c.num_layers,
             ";load-format=", f.str("load-format"), ";seed=", f.i64("seed"),
             ";max-num-seqs=", f.i64("max-num-seqs"),
             ";max-num-batched-tokens=", f.i64("max-num-batched-tokens"),
             ";max-model-len=", f.i64("max-model-len"), ";micro-batches=", f.i64("micro-batches"),
             ";num-state-blocks=", f.i64("num-state-blocks"),
             ";prefix-cache-slots=", slots_or_zero(f), ";device=", f.str("device"),
             ";kv-cache-dtype=", f.str("kv-cache-dtype"),
             ";activation-dtype=", f.str("activation-dtype"),
             ";activation-quant=", f.str("activation-quant"),
             ";stage-transport=", f.str("stage-transport"),
             ";stage-timeout=", f.f64("stage-timeout"), ";speculative=", f.str("speculative"),
             ";num-speculative-tokens=", f.i64("num-speculative-tokens"));
}

// The fields two fingerprints disagree on, as "name: a vs b".
std::string differences(const std::string& a, const std::string& b) {
  auto split = [](const std::string& s) {
    std::vector<std::string> v;
    std::stringstream ss(s);
    std::string item;
    while (std::getline(ss, item, ';')) v.push_back(item);
    return v;
  };
  auto va = split(a), vb = split(b);
  std::string out;
  for (size_t i = 0; i < std::min(va.size(), vb.size()); ++i)
    if (va[i] != vb[i]) {
      auto eq = va[i].find('=');
      out += str(out.empty() ? "" : ", ", va[i].substr(0, eq), " ", vb[i].substr(eq + 1),
                 " (rank 0 has ", va[i].substr(eq + 1), ")");
    }
  return out;
}

// What a stage allocates on the host (CPU backend), in bytes: sequence state (per sequence, and
// per sequence and token of context), a generous bound of the workspace (residual, sublayer
// activations, logits) and, with --load-format dummy, its generated weights. Loaded weights are
// mapped from the checkpoint files (page cache) and not counted.
struct StageNeed {
  int stage = 0;
  double per_seq = 0, per_seq_token = 0, work = 0, weights = 0;
  double snapshots = 0;  // prefix-cache snapshot slots (per-slot state each)
  double total(double S, double L) const {
    return S * (per_seq + per_seq_token * L) + work + weights + snapshots;
  }
};

// The layers whose sequence state a stage holds: its own, and the MTP layer (index num_layers)
// on the last stage with --speculative mtp.
std::vector<int> stage_state_layers(const Config& c, const LoadPlan& plan) {
  std::vector<int> v;
  for (int l = plan.first_layer; l < plan.end_layer; ++l) v.push_back(l);
  if (plan.mtp) v.push_back(c.num_layers);
  return v;
}

// The MTP layer's workspace beyond the main model's (fp32 bound): the hidden-state buffer, the
// normed streams and the output streams [T, hc * hidden], ones and identities for the stream
// broadcast.
double mtp_work_bytes(const Config& c, const LoadPlan& plan, double T) {
  if (!plan.mtp) return 0.0;
  return T * 4.0 * (3.0 * c.hc_dim() + c.hc_mult + c.hc_mult * c.hc_mult);
}

StageNeed stage_need(const Flags& f, const Config& c, const LoadPlan& plan, int stage,
                     int max_logit_rows) {
  StageNeed n;
  n.stage = stage;
  for (int l : stage_state_layers(c, plan)) {
    StateBytes b = layer_state_bytes(c, l);
    n.per_seq += static_cast<double>(b.per_sequence);
    n.per_seq_token += static_cast<double>(b.per_token);
  }
  n.snapshots = slots_or_zero(f) * n.per_seq;
  const double T = static_cast<double>(f.i64("max-num-batched-tokens"));
  n.work = T * 4.0 * (2.0 * c.hc_dim() + 2.0 * c.num_heads * c.head_dim + 8.0 * c.hidden_size) +
           (plan.head ? max_logit_rows * 4.0 * static_cast<double>(c.vocab_size) : 0.0) +
           mtp_work_bytes(c, plan, T);
  if (f.str("load-format") == "dummy")
    for (const ExpectedTensor& t : expected_tensors(c, plan.mtp))
      if (plan.owns(t)) n.weights += static_cast<double>(expected_bytes(t));
  return n;
}

int max_logit_rows(const Flags& f, const Job& job) {
  if (job.max_logit_rows > 0) return job.max_logit_rows;
  // A speculative step computes the target's logits at the last token and at every draft.
  const int64_t per_seq =
      f.str("speculative") == "mtp" ? 1 + f.i64("num-speculative-tokens") : int64_t{1};
  return static_cast<int>(
      std::min(f.i64("max-num-seqs") * per_seq, f.i64("max-num-batched-tokens")));
}

// A limit in bytes read from a cgroup file ("max" or a huge number: none).
double read_limit(const std::string& path) {
  std::ifstream in(path);
  std::string v;
  if (!(in >> v) || v == "max") return 0;
  char* end = nullptr;
  const double x = std::strtod(v.c_str(), &end);
  return end && *end == '\0' && x > 0 && x < 1e18 ? x : 0;
}

// What the stages of one host may use: the smaller of its RAM and this process's memory cgroup
// limit (v2 memory.max, or v1 memory.limit_in_bytes); `per_process` (ulimit -v: address space
// left to this process) applies to the stages of one process.
struct HostMemory {
  double bytes = 0, per_process = 0;
  std::string what;  // "RAM 23.5 GiB", "cgroup limit 8 GiB"...
};
HostMemory host_memory() {
  HostMemory h;
  h.bytes =
      static_cast<double>(sysconf(_SC_PHYS_PAGES)) * static_cast<double>(sysconf(_SC_PAGESIZE));
  h.what = str("RAM ", human_bytes(h.bytes));
  std::ifstream cg("/proc/self/cgroup");
  std::string line;
  while (std::getline(cg, line)) {
    // "0::/path" (v2) or "N:memory:/path" (v1).
    const size_t a = line.find(':'), b = line.find(':', a + 1);
    if (a == std::string::npos || b == std::string::npos) continue;
    const std::string ctrl = line.substr(a + 1, b - a - 1), path = line.substr(b + 1);
    double lim = 0;
    if (ctrl.empty())
      lim = read_limit("/sys/fs/cgroup" + path + "/memory.max");
    else if (ctrl.find("memory") != std::string::npos)
      lim = read_limit("/sys/fs/cgroup/memory" + path + "/memory.limit_in_bytes");
    if (lim > 0 && lim < h.bytes) {
      h.bytes = lim;
      h.what = str("cgroup memory limit ", human_bytes(lim));
    }
  }
  struct rlimit rl;
  if (getrlimit(RLIMIT_AS, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY) {
    double used = 0;  // address space this process already holds
    std::ifstream statm("/proc/self/statm");
    if (double pages; statm >> pages) used = pages * static_cast<double>(sysconf(_SC_PAGESIZE));
    h.per_process = std::max(0.0, static_cast<double>(rl.rlim_cur) - used);
  }
  return h;
}

// Refuses, before anything is allocated, stages that together cannot fit the memory of the host
// (and, for the stages of one process, its ulimit -v) they run on, with what would fit.
Status check_host_memory(const Flags& f, const std::vector<StageNeed>& stages,
                         const HostMemory& host, bool one_process, const std::string& where) {
  const double S = static_cast<double>(f.i64("max-num-seqs")),
               L = static_cast<double>(f.i64("max-model-len"));
  StageNeed sum;
  double largest = 0;
  std::string each;
  for (const StageNeed& n : stages) {
    sum.per_seq += n.per_seq;
    sum.per_seq_token += n.per_seq_token;
    sum.work += n.work;
    sum.weights += n.weights;
    sum.snapshots += n.snapshots;
    largest = std::max(largest, n.total(S, L));
    each += str(each.empty() ? "" : ", ", n.stage, ": ", human_bytes(n.total(S, L)));
  }
  const double need = sum.total(S, L);
  double have = host.bytes;
  std::string what = host.what;
  if (one_process && host.per_process > 0 && host.per_process < have) {
    have = host.per_process;
    what = str("ulimit -v leaves ", human_bytes(have), " to this process");
  }
  if (have <= 0 || need <= have) return Status::ok();
  const std::string who = stages.size() == 1
                              ? str("stage ", stages[0].stage, " needs ")
                              : str("the ", stages.size(), " stages ", where, " need ");
  // What would fit: the context or the batch that fits these stages here, or more hosts.
  std::string fits;
  const double fixed = sum.work + sum.weights + sum.snapshots;
  const double fit_len =
      std::floor((have - fixed - S * sum.per_seq) / std::max(1.0, S * sum.per_seq_token));
  const double fit_seqs =
      std::floor((have - fixed) / std::max(1.0, sum.per_seq + sum.per_seq_token * L));
  if (fit_len >= 1) fits += str("--max-model-len ", static_cast<int64_t>(fit_len), " would fit");
  if (fit_seqs >= 1)
    fits += str(fits.empty() ? "" : ", or ", "--max-num-seqs ", static_cast<int64_t>(fit_seqs),
                " would fit");
  const bool per_process = what != host.what;
  if (stages.size() > 1 && largest <= have && per_process)
    fits += str(fits.empty() ? "" : ", or ",
                "run each stage as its own process under mpirun (ulimit -v is per process)");
  else if (stages.size() > 1 && largest <= have)
    fits += str(fits.empty() ? "" : ", or ", "spread the stages over at least ",
                static_cast<int64_t>(std::ceil(need / have)),
                " hosts (mpirun, docs/pipeline_parallel.md)");
  if (stages.size() == 1 || largest > have)
    fits += str(fits.empty() ? "" : ", or ",
                "split the layers over more stages on more hosts (a stage alone needs up to ",
                human_bytes(largest), ")");
  return Status::error(
      str(who, human_bytes(need), " in total (", stages.size() > 1 ? "stage " : "", each,
          "; sequence state for --max-num-seqs ", f.i64("max-num-seqs"), " x --max-model-len ",
          f.i64("max-model-len"), ": ", human_bytes(S * (sum.per_seq + sum.per_seq_token * L)),
          sum.weights > 0 ? str("; dummy weights: ", human_bytes(sum.weights)) : std::string(),
          sum.snapshots > 0 ? str("; prefix-cache snapshots (--prefix-cache-slots ",
                                  slots_or_zero(f), "): ", human_bytes(sum.snapshots))
                            : std::string(),
          ") but ", per_process ? "" : "this host has ", what, ": ", fits));
}

// --threads, or the machine's cores divided among the stages that run on it (the threads of this
// process, or the ranks mpirun placed on this node).
int threads_per_stage(const Flags& f, const Topology& topo) {
  if (f.given("threads")) return static_cast<int>(f.i64("threads"));
  int local = topo.world;
  if (launched_by_mpi()) {
    const char* n = std::getenv("OMPI_COMM_WORLD_LOCAL_SIZE");
    local = n ? std::max(1, std::atoi(n)) : 1;
  }
  return std::max(1, static_cast<int>(f.i64("threads")) / local);
}

// This stage's index among the stages on this machine, and their number (the threads of this
// process, or the ranks mpirun placed on this node).
int local_index(const Topology& topo) {
  if (launched_by_mpi()) {
    const char* r = std::getenv("OMPI_COMM_WORLD_LOCAL_RANK");
    return r ? std::max(0, std::atoi(r)) : 0;
  }
  return topo.rank;
}
int local_count(const Topology& topo) {
  if (launched_by_mpi()) {
    const char* n = std::getenv("OMPI_COMM_WORLD_LOCAL_SIZE");
    return n ? std::max(1, std::atoi(n)) : 1;
  }
  return topo.world;
}

// This stage's GPU: --devices' entry for its local index, else the local index itself.
int local_gpu(const Flags& f, const Topology& topo) {
  const int i = local_index(topo);
  if (!f.given("devices")) return i;
  auto list = parse_int_list("devices", f.str("devices"));
  return list && i < static_cast<int>(list->size()) ? (*list)[i] : i;
}

// Refuses a placement that cannot work: --devices with a count other than the stages on this
// machine, or a GPU this process cannot see.
Status check_placement(const Flags& f, const Topology& topo) {
  const int s = topo.rank, here = local_count(topo), visible = cuda_device_count();
  const std::string where = launched_by_mpi()
                                ? str("the ", here, " ranks mpirun placed on this machine")
                                : str("--pp ", topo.world);
  if (f.given("devices")) {
    auto list = parse_int_list("devices", f.str("devices"));
    if (!list) return list.status();
    if (static_cast<int>(list->size()) != here)
      return Status::error(str("--devices ", f.str("devices"), " lists ", list->size(),
                               " GPU(s) but this machine runs ", here, " stage(s) (", where,
                               "): give one GPU per stage"));
    const int g = (*list)[local_index(topo)];
    if (g >= visible)
      return Status::error(str("--devices ", f.str("devices"), ": GPU ", g, " (stage ", s,
                               ") is not visible: this process sees ", visible,
                               " GPU(s), ordinals 0 to ", visible - 1));
    return Status::ok();
  }
  const int g = local_index(topo);
  if (g >= visible)
    return Status::error(str("stage ", s, " runs on GPU ", g, " (one GPU per stage: ", where,
                             ") but this process sees only ", visible, " GPU(s); run at most ",
                             visible, " stages per machine, or choose GPUs with --devices"));
  return Status::ok();
}

// What a GPU stage needs: weights, sequence state at the limits (fp32 sizes: an upper bound of the
// bf16 state) and workspace (activations, logits, kernels' scratch, the CUDA context's reserve).
struct GpuNeed {
  double weights = 0, state = 0, work = 0;
  double total() const { return weights + state + work; }
};

GpuNeed gpu_need(const Flags& f, const Config& c, const LoadPlan& plan, int max_logit_rows,
                 bool with_base_work = true) {
  const double S = static_cast<double>(f.i64("max-num-seqs")),
               L = static_cast<double>(f.i64("max-model-len")),
               T = static_cast<double>(f.i64("max-num-batched-tokens"));
  GpuNeed n;
  for (const ExpectedTensor& t : expected_tensors(c, plan.mtp))
    if (plan.owns(t)) n.weights += static_cast<double>(expected_bytes(t));
  for (int l : stage_state_layers(c, plan)) {
    StateBytes b = layer_state_bytes(c, l);  // fp32 sizes: an upper bound of the bf16 state
    n.state += (S + slots_or_zero(f)) * static_cast<double>(b.per_sequence) +
               S * static_cast<double>(b.per_token) * L;
  }
  // The mHC partials of the CUDA backend (elementwise.cu): at most (mix + 1) x max(T + 7, 8192)
  // floats.
  const double hc_partials = 4.0 * (c.hc_mix() + 1) * std::max(T + 7.0, 8192.0);
  n.work =
      (with_base_work
           ? T * 4.0 * (4.0 * c.hc_dim() + 2.0 * c.num_heads * c.head_dim + 8.0 * c.hidden_size) +
                 hc_partials + double{1 << 30}
           : 0.0) +
      (plan.head ? max_logit_rows * 4.0 * static_cast<double>(c.vocab_size) : 0.0) +
      mtp_work_bytes(c, plan, T);
  return n;
}

// A split of the layers over `stages` GPU stages in which every stage needs at most `cap` (empty if
// there is none): the least cap for which packing the layers greedily from the first needs at most
// `stages` stages (binary search), then the longest stages split until there are `stages`.
std::vector<int> fitting_partition(const Flags& f, const Config& c, int stages, double cap,
                                   int rows) {
  const int n = c.num_layers;
  if (stages < 1 || stages > n) return {};
  std::vector<double> layer(n);
  for (int l = 0; l < n; ++l)
    layer[l] = gpu_need(f, c, LoadPlan{l, l + 1, false, false}, rows, false).total();
  const double base = gpu_need(f, c, LoadPlan{0, 0, false, false}, rows).total();
  const double embed = gpu_need(f, c, LoadPlan{0, 0, true, false}, rows, false).total();
  const double head = gpu_need(f, c, LoadPlan{0, 0, false, true}, rows, false).total();
  auto pack = [&](double limit) {
    std::vector<int> parts;
    double used = base + embed;
    int count = 0;
    for (int l = 0; l < n; ++l) {
      if (count > 0 && used + layer[l] > limit) {
        parts.push_back(count);
        used = base;
        count = 0;
      }
      if (used + layer[l] > limit) return std::vector<int>{};
      used += layer[l];
      ++count;
    }
    if (used + head > limit) return std::vector<int>{};  // the last stage also holds the head
    parts.push_back(count);
    return parts;
  };
  std::vector<int> best = pack(cap);
  if (best.empty() || static_cast<int>(best.size()) > stages) return {};
  double lo = 0, hi = cap;
  for (int i = 0; i < 60; ++i) {
    const double mid = 0.5 * (lo + hi);
    std::vector<int> p = pack(mid);
    if (!p.empty() && static_cast<int>(p.size()) <= stages) {
      best = p;
      hi = mid;
    } else {
      lo = mid;
    }
  }
  while (static_cast<int>(best.size()) < stages) {  // splitting a stage never makes one larger
    auto it = std::max_element(best.begin(), best.end());
    const int half = *it / 2;
    *it -= half;
    best.insert(it + 1, half);
  }
  return best;
}

std::string join(const std::vector<int>& v) {
  std::string out;
  for (int x : v) out += str(out.empty() ? "" : ",", x);
  return out;
}

// Refuses, before loading, a stage whose weights, sequence state and workspace cannot fit its GPU,
// with what would fit: a split of the layers over these GPUs, more stages, or a shorter context.
Status check_gpu_memory(const Flags& f, const Config& c, const Topology& topo, const LoadPlan& plan,
                        int stage, int gpu, int max_logit_rows) {
  int64_t free_b = 0, total_b = 0;
  SP_RETURN_IF_ERROR(cuda_memory_info(gpu, &free_b, &total_b));
  const GpuNeed n = gpu_need(f, c, plan, max_logit_rows);
  const double S = static_cast<double>(f.i64("max-num-seqs")),
               L = static_cast<double>(f.i64("max-model-len"));
  const double need = n.total(), have = static_cast<double>(free_b);
  if (need <= have) return Status::ok();
  std::string fits;
  // Assumes the other GPUs have as much free memory as this one.
  if (std::vector<int> p = fitting_partition(f, c, topo.world, have, max_logit_rows); !p.empty()) {
    fits = str("--pp-partition ", join(p), " would fit");
  } else {
    for (int more = topo.world + 1; more <= c.num_layers; ++more)
      if (std::vector<int> q = fitting_partition(f, c, more, have, max_logit_rows); !q.empty()) {
        fits = str("--pp ", more, " --pp-partition ", join(q), " would fit (GPUs like this one)");
        break;
      }
  }
  const double per_len = S * std::max(1.0, n.state / std::max(1.0, S * L));
  const double fit_len = std::floor((have - n.weights - n.work) / std::max(1.0, per_len));
  if (fit_len >= 1)
    fits += str(fits.empty() ? "" : ", or ", "--max-model-len ", static_cast<int64_t>(fit_len),
                " would fit");
  if (fits.empty()) fits = "no split of the layers fits GPUs like this one at these limits";
  return Status::error(str("stage ", stage, " needs ", human_bytes(need), " on GPU ", gpu,
                           " (weights ", human_bytes(n.weights),
                           ", sequence state for --max-num-seqs ", f.i64("max-num-seqs"),
                           " x --max-model-len ", f.i64("max-model-len"), " at most ",
                           human_bytes(n.state), ", workspace ", human_bytes(n.work), ") but only ",
                           human_bytes(have), " of ", human_bytes(static_cast<double>(total_b)),
                           " is free: ", human_bytes(need - have), " missing; ", fits));
}

// The stage's backend: the CPU backend, or the CUDA backend on this stage's GPU.
std::unique_ptr<Backend> make_stage_backend(const Flags& f, const Topology& topo, Transport& tr) {
  auto device = resolve_device(f);
  if (!device) tr.fail(device.status().message(), 2);
  if (*device == "cpu") return make_cpu_backend(threads_per_stage(f, topo));
  const std::string kv = f.str("kv-cache-dtype");
  auto be =
      make_cuda_backend(local_gpu(f, topo), kv == "fp32" ? DType::kF32 : DType::kBF16,
                        f.str("activation-dtype") == "bf16" ? DType::kBF16 : DType::kF32,
                        f.str("activation-quant") == "fp8" ? ActQuant::kFP8 : ActQuant::kNone);
  if (!be) tr.fail(str("stage ", topo.rank, ": ", be.status().message()), 2);
  return std::move(*be);
}

// This stage's state-block pool: --num-state-blocks, or what the memory left after this stage's
// weights and workspace holds (half of it on the CPU, which other processes share; 90% of a GPU's
// free memory), never more than every slot at --max-model-len needs.
int64_t stage_state_blocks(const Flags& f, const Config& c, const LoadPlan& plan,
                           const Topology& topo, bool gpu, int max_logit_rows) {
  const int bt = state_block_tokens(c);
  const int64_t cap = f.i64("max-num-seqs") * blocks_for(f.i64("max-model-len"), bt);
  if (f.i64("num-state-blocks") > 0) return f.i64("num-state-blocks");
  double per_block = 0;
  for (int l = plan.first_layer; l < plan.end_layer; ++l)
    per_block += static_cast<double>(layer_state_bytes(c, l).per_token) * bt;
  if (per_block <= 0) return cap;  // sliding-only stage: nothing grows with the sequence
  const double T = static_cast<double>(f.i64("max-num-batched-tokens"));
  double weights = 0;
  if (gpu || f.str("load-format") == "dummy")
    for (const ExpectedTensor& t : expected_tensors(c, plan.mtp))
      if (plan.owns(t)) weights += static_cast<double>(expected_bytes(t));
  const double work =
      T * 4.0 * (4.0 * c.hc_dim() + 2.0 * c.num_heads * c.head_dim + 8.0 * c.hidden_size) +
      (plan.head ? max_logit_rows * 4.0 * static_cast<double>(c.vocab_size) : 0.0) +
      mtp_work_bytes(c, plan, T);
  double left = 0;
  if (gpu) {
    int64_t free_b = 0, total_b = 0;
    if (!cuda_memory_info(local_gpu(f, topo), &free_b, &total_b)) return cap;
    left = 0.9 * static_cast<double>(free_b) - weights - work - double{1 << 30};
  } else {
    const double avail =
        static_cast<double>(sysconf(_SC_AVPHYS_PAGES)) * static_cast<double>(sysconf(_SC_PAGESIZE));
    const int here = launched_by_mpi() ? 1 : topo.world;
    left = 0.5 * avail / here - weights - work;
  }
  const int64_t fit = static_cast<int64_t>(std::max(0.0, left / per_block));
  return std::clamp<int64_t>(fit, 1, cap);
}

// The boundary tensor's path (--stage-transport): NCCL when every stage can use it (decided
// together: one allreduce, so the stages never disagree), else null (host memory).
std::unique_ptr<DeviceLink> make_stage_link(const Flags& f, const Topology& topo, Transport& tr,
                                            Backend& be, bool gpu, const StateLimits& lim) {
  const std::string want = f.str("stage-transport");
  if (topo.world == 1 || want == "host") return nullptr;
  const std::string why = !gpu ? std::string("it does not run on a GPU") : nccl_unavailable();
  auto cannot = tr.allreduce_max(why.empty() ? 0 : 1);
  if (!cannot) tr.fail(cannot.status().message(), 4);
  if (*cannot > 0) {
    if (want == "nccl")
      tr.fail(str("--stage-transport nccl: stage ", topo.rank,
                  why.empty() ? str(" could use NCCL, but another stage cannot")
                              : str(" cannot use NCCL: ", why),
                  "; use --stage-transport host or auto"),
              2);
    if (!why.empty() && gpu)
      std::fprintf(stderr,
                   "stage %d: NCCL unavailable (%s): the boundary tensor goes through host "
                   "memory\n",
                   topo.rank, why.c_str());
    return nullptr;
  }
  DeviceLinkOptions o;
  o.device = be.device_ordinal();
  o.stream = be.native_stream();
  o.slots = std::max(1, lim.residual_buffers);
  o.timeout_s = f.f64("stage-timeout");
  auto link = make_nccl_link(tr, o);
  if (!link)
    tr.fail(str("stage ", topo.rank, " (rank ", tr.rank(),
                "): NCCL stage transport: ", link.status().message()),
            4);
  return std::move(*link);
}

// One stage's whole life: load its part, run, finish. Returns its exit code.
//
// Start-up runs under the watchdog in two phases (Transport::start_up, each a barrier): 0 reads
// the weights (a tick per tensor), 1 builds the model on the backend (a tick per layer uploaded)
// and stage 0's scheduler. Between them the stages agree on the state-block count.
int run_one_stage(const Flags& f, const Config& c, const Topology& topo, Transport& tr,
                  const Job& job, const PipelineOptions& popt) {
  const int s = topo.rank;
  LoadPlan plan = LoadPlan::stage(topo.layers, s, popt.speculative.mtp);
  const int logit_rows = max_logit_rows(f, job);
  const bool gpu = resolve_device(f).value() == "cuda";
  tr.set_stage_timeout(f.f64("stage-timeout"));
  if (gpu)
    if (Status st = check_placement(f, topo); !st) tr.fail(st.message(), 2);
  std::unique_ptr<ModelWeights> weights;
  int64_t my_blocks = 0;
  const bool load_stall = popt.fault.at_load && popt.fault.stage == s;
  Status loaded = tr.start_up(0, [&](const std::function<void()>& tick) -> Status {
    if (gpu)  // the host memory of CPU stages is checked for all the stages of a host at start-up
      SP_RETURN_IF_ERROR(check_gpu_memory(f, c, topo, plan, s, local_gpu(f, topo), logit_rows));
    ProgressFn printer = progress_printer(s);
    int64_t tensors = 0;
    ProgressFn progress = [&](int64_t done, int64_t total) {
      printer(done, total);
      tick();
      if (load_stall && ++tensors == 3) stall_loading(s, tr.name() == "mpi");
    };
    // A GPU stage's dummy matrices are made on the device at upload (no host copy of them).
    auto w = f.str("load-format") == "dummy"
                 ? dummy_weights(c, plan, static_cast<uint64_t>(f.i64("seed")), progress,
                                 gpu ? DummyMatrices::kAtUpload : DummyMatrices::kHost)
                 : load_weights(c, f.str("model"), plan, progress);
    if (!w) return Status::error(str("stage ", s, " (rank ", s, "): ", w.status().message()));
    weights = std::move(*w);
    my_blocks = stage_state_blocks(f, c, plan, topo, gpu, logit_rows);
    return Status::ok();
  });
  if (!loaded) tr.fail(loaded.message(), 2);
  const LoadStats& ls = weights->stats;
  std::string who = topo.world > 1
                        ? str("stage ", s, "/", topo.world, " (layers ", plan.first_layer, "-",
                              plan.end_layer - 1, (plan.embed ? ", embedding" : ""),
                              (plan.head ? ", head" : ""), "): ")
                        : std::string();
  std::printf("%sloaded %" PRId64 " tensors, %.3f GB (%s) in %.2f s\n", who.c_str(), ls.tensors,
              ls.bytes / 1e9,
              f.str("load-format") == "dummy" ? "dummy weights" : f.str("model").c_str(),
              ls.seconds);
  if (plan.mtp)
    std::printf("MTP draft layer loaded on the last stage (with its own copy of the embedding)\n");
  if (!ls.mtp_tensors.empty() && topo.is_last(s))
    std::printf("checkpoint has %zu mtp.* tensors not used%s\n", ls.mtp_tensors.size(),
                c.dspark   ? " (a DSpark draft module: not supported, ignored)"
                : plan.mtp ? " (beyond the first MTP layer)"
                           : " (the MTP draft layer: --speculative mtp runs it)");
  std::fflush(stdout);
  auto backend = make_stage_backend(f, topo, tr);
  StateLimits lim;
  lim.max_num_seqs = static_cast<int>(f.i64("max-num-seqs"));
  lim.max_model_len = f.i64("max-model-len");
  lim.max_num_batched_tokens = static_cast<int>(f.i64("max-num-batched-tokens"));
  lim.max_logit_rows = logit_rows;
  lim.residual_buffers = popt.micro_batches > 0 ? popt.micro_batches : topo.world;
  lim.mtp = plan.mtp;
  // Every stage's rings keep room for the drafts a verify step may write and then drop.
  lim.spec_slack = popt.speculative.mtp ? popt.speculative.num_tokens : 0;
  lim.snapshot_slots = slots_or_zero(f);
  lim.step_graphs = !(f.given("enforce-eager") && f.boolean("enforce-eager"));
  // Block ids travel with each step and address every stage's pool: all use the smallest count.
  auto agreed_blocks = tr.allreduce_max(-static_cast<double>(my_blocks));
  if (!agreed_blocks) tr.fail(agreed_blocks.status().message(), 4);
  lim.num_blocks = static_cast<int>(-agreed_blocks.value());
  std::unique_ptr<Model> model;
  std::unique_ptr<Scheduler> sched;
  int built_code = 4;
  Status built = tr.start_up(1, [&](const std::function<void()>& tick) -> Status {
    backend->use_on_this_thread();
    model = std::make_unique<Model>(c, *weights, *backend, lim, tick);
    if (topo.is_first(s)) {
      SchedulerLimits sl{lim.max_num_seqs, lim.max_num_batched_tokens, lim.max_model_len,
                         c.vocab_size};
      sl.spec_tokens = lim.spec_slack;
      sl.prefix_cache_slots = lim.snapshot_slots;
      sched = std::make_unique<Scheduler>(with_state_blocks(sl, *model));
      sched->set_eos(c.eos_token_id);
      built_code = 2;  // a request the scheduler refuses is the user's
      SP_RETURN_IF_ERROR(job.add_requests(*sched));
    }
    return Status::ok();
  });
  if (!built) tr.fail(built.message(), built_code);
  backend->use_on_this_thread();
  StageEnv env{s, topo, &tr, model.get(), weights.get()};
  std::vector<StageReport> reports;
  StageHooks hooks = job.hooks(env);
  std::unique_ptr<DraftSource> drafter;
  if (plan.mtp) {
    drafter = make_mtp_drafter(*model, popt.speculative.num_tokens);
    hooks.drafter = drafter.get();
  }
  std::unique_ptr<DeviceLink> link = make_stage_link(f, topo, tr, *backend, gpu, lim);
  Status st = Status::ok();
  try {
    st = run_stage(*model, topo, tr, sched.get(), hooks, popt, &reports, link.get());
  } catch (const StageFailure&) {
    throw;
  } catch (const std::exception& e) {
    // A CUDA error (thrown by the backend) fails the pipeline here, before this stage's GPU
    // resources unwind: the other stages hear of it at once.
    tr.fail(str("stage ", s, " (rank ", tr.rank(), "): ", e.what()), 4);
  }
  if (!st) tr.fail(st.message(), 4);
  int code = job.finish(env, reports);
  auto agreed = tr.allreduce_max(code);
  if (!agreed) tr.fail(agreed.status().message(), 4);
  return static_cast<int>(agreed.value());
}

// This host's identity: hostname and kernel boot id (stages with the same share one RAM).
std::string host_key() {
  char name[256] = {0};
  gethostname(name, sizeof name - 1);
  std::ifstream in("/proc/sys/kernel/random/boot_id");
  std::string boot;
  in >> boot;
  return str(name, "/", boot);
}

// Under mpirun: every rank shares its need and its host's memory; every rank reaches the same
// verdict, rank 0 prints it.
Status check_memory_mpi(const Flags& f, const Config& c, const Topology& topo, Transport& t,
                        const Job& job) {
  const bool mtp = f.str("speculative") == "mtp";
  const StageNeed mine = stage_need(f, c, LoadPlan::stage(topo.layers, topo.rank, mtp), topo.rank,
                                    max_logit_rows(f, job));
  const HostMemory hm = host_memory();
  char buf[512];
  std::snprintf(buf, sizeof buf, "%a %a %a %a %a %a %a ", hm.bytes, hm.per_process, mine.per_seq,
                mine.per_seq_token, mine.work, mine.weights, mine.snapshots);
  std::vector<std::string> all;
  SP_RETURN_IF_ERROR(t.allgather(str(buf, host_key(), " ", hm.what), &all));
  struct Rank {
    std::string key;
    HostMemory hm;
    StageNeed need;
  };
  std::vector<Rank> ranks;
  for (int r = 0; r < static_cast<int>(all.size()); ++r) {
    std::istringstream in(all[r]);
    Rank x;
    std::string v[7];
    for (auto& e : v) in >> e;
    in >> x.key;
    std::getline(in >> std::ws, x.hm.what);
    x.hm.bytes = std::strtod(v[0].c_str(), nullptr);
    x.hm.per_process = std::strtod(v[1].c_str(), nullptr);
    x.need = {r,
              std::strtod(v[2].c_str(), nullptr),
              std::strtod(v[3].c_str(), nullptr),
              std::strtod(v[4].c_str(), nullptr),
              std::strtod(v[5].c_str(), nullptr),
              std::strtod(v[6].c_str(), nullptr)};
    ranks.push_back(x);
  }
  for (size_t r = 0; r < ranks.size(); ++r) {  // each process against its ulimit -v
    SP_RETURN_IF_ERROR(check_host_memory(f, {ranks[r].need}, ranks[r].hm, true, ""));
  }
  std::vector<bool> seen(ranks.size(), false);
  for (size_t r = 0; r < ranks.size(); ++r) {  // the stages of each host against its memory
    if (seen[r]) continue;
    std::vector<StageNeed> group;
    for (size_t q = r; q < ranks.size(); ++q)
      if (ranks[q].key == ranks[r].key) {
        seen[q] = true;
        group.push_back(ranks[q].need);
      }
    HostMemory host = ranks[r].hm;
    host.per_process = 0;
    const std::string name = ranks[r].key.substr(0, ranks[r].key.find('/'));
    SP_RETURN_IF_ERROR(check_host_memory(f, group, host, false, str("on host ", name)));
  }
  return Status::ok();
}

}  // namespace

std::vector<int> gpu_fitting_partition(const Flags& f, const Config& c, int stages, double cap,
                                       int max_logit_rows) {
  return fitting_partition(f, c, stages, cap, max_logit_rows);
}

double gpu_stage_bytes(const Flags& f, const Config& c, const LoadPlan& plan, int max_logit_rows) {
  return gpu_need(f, c, plan, max_logit_rows).total();
}

int run_job(const Flags& f, const Job& job) {
  auto cfg = read_config(f);
  if (!cfg) return fail(cfg.status());
  const Config& c = *cfg;
  auto dev = resolve_device(f);
  if (!dev) return fail(dev.status());
  const std::string kv = f.str("kv-cache-dtype");
  if (kv == "fp8")
    return fail(
        Status::error("--kv-cache-dtype fp8: not supported yet (bf16 is the GPU default); "
                      "use auto or bf16"));
  if (*dev == "cpu" && f.str("activation-dtype") == "bf16")
    return fail(
        Status::error("--activation-dtype bf16: the CPU backend computes in fp32 (it is "
                      "the exact reference); use auto or --device cuda"));
  if (*dev == "cpu" && f.str("activation-quant") != "none")
    return fail(Status::error(str("--activation-quant ", f.str("activation-quant"),
                                  ": the CPU backend computes in fp32 (it is the exact "
                                  "reference); use none or --device cuda")));
  if (*dev == "cpu" && kv != "auto" && kv != "fp32")
    return fail(Status::error(str("--kv-cache-dtype ", kv,
                                  ": the CPU backend keeps its state in fp32 (it is the exact "
                                  "reference); use auto or --device cuda")));
  if (auto slots = prefix_cache_slots(f); !slots) return fail(slots.status());
  auto fault = parse_fault(f.str("fault-inject"));
  if (!fault) return fail(fault.status());
  if (f.given("devices") && *dev != "cuda")
    return fail(Status::error(str("--devices ", f.str("devices"),
                                  ": GPU placement is for --device cuda; this run uses the cpu")));
  if (f.str("stage-transport") == "nccl" && *dev != "cuda")
    return fail(Status::error(
        "--stage-transport nccl: the boundary tensor goes device to device only between GPU "
        "stages (--device cuda); this run uses the cpu: use auto or host"));
  if (f.str("stage-transport") == "nccl" && !nccl_link_built())
    return fail(Status::error(
        "--stage-transport nccl: this seekpipe was built without NCCL (CMake found no nccl.h / "
        "libnccl); use auto or host"));
  if ((fault->cuda && *dev != "cuda") ||
      (fault->nccl && (*dev != "cuda" || f.str("stage-transport") == "host" || !nccl_link_built())))
    return fail(Status::error(str("--fault-inject ", f.str("fault-inject"), ": ",
                                  fault->cuda ? "a CUDA fault needs --device cuda"
                                              : "an NCCL fault needs the NCCL stage transport "
                                                "(--device cuda, a build with NCCL, "
                                                "--stage-transport auto or nccl)")));
  // NVLink SHARP (multicast) is off unless the user set it: it is not needed for point-to-point
  // sends and its multicast objects fail on machines that do not lend them (see
  // docs/pipeline_parallel.md).
  setenv("NCCL_NVLS_ENABLE", "0", 0);
  if (f.given("trace"))  // fail now, not after the run (and leave the file alone until then)
    if (Status st = check_trace_path(f.str("trace")); !st) return fail(st);
  PipelineOptions popt;
  popt.micro_batches = static_cast<int>(f.i64("micro-batches"));
  popt.trace = f.given("trace");
  popt.fault = *fault;
  popt.speculative = speculative_config(f).value();  // checked by read_config
  const std::string part = f.str("pp-partition") == "vllm" ? "" : f.str("pp-partition");
  // Requests are checked before any weight is read (a bad prompt should not cost a long load).
  Scheduler probe(SchedulerLimits{static_cast<int>(f.i64("max-num-seqs")),
                                  static_cast<int>(f.i64("max-num-batched-tokens")),
                                  f.i64("max-model-len"), c.vocab_size});
  const Status requests_ok = job.add_requests(probe);
  CostModelOptions co{static_cast<int>(f.i64("max-num-seqs")), f.i64("max-model-len"), false,
                      f.f64("pp-head-cost")};
  if (f.given("pp-head-cost") && part != "auto")
    return fail(
        Status::error(str("--pp-head-cost: used only by --pp-partition auto (the split "
                          "here is ",
                          part.empty() ? "vllm" : part, ")")));

  if (launched_by_mpi()) {
    auto tr = make_mpi_transport(nullptr, nullptr);
    if (!tr) return fail(tr.status());
    Transport& t = **tr;
    const int world = t.world();
    if (!requests_ok) {
      if (t.rank() == 0) fail(requests_ok);
      return 2;
    }
    if (f.given("pp") && f.i64("pp") != world) {
      if (t.rank() == 0)
        fail(
            Status::error(str("--pp ", f.i64("pp"), " but mpirun started ", world,
                              " ranks; under mpirun the number of ranks is the number of stages")));
      return 2;
    }
    auto topo = make_topology(c, world, t.rank(), part, co);
    if (!topo) {
      if (t.rank() == 0) fail(topo.status());
      return 2;
    }
    std::vector<std::string> all;
    std::string mine = fingerprint(f, c, *topo);
    if (Status st = t.allgather(mine, &all); !st) return fail(st);
    for (int r = 1; r < world; ++r)
      if (all[r] != all[0]) {
        if (t.rank() == 0)
          fail(Status::error(
              str("rank ", r, " was started differently from rank 0: ", differences(all[0], all[r]),
                  "; every rank must run the same model, config and partition")));
        return 2;
      }
    if (fault->stage >= world) {
      if (t.rank() == 0)
        fail(Status::error(
            str("--fault-inject: stage ", fault->stage, " does not exist (", world, " stages)")));
      return 2;
    }
    if (*dev == "cpu")
      if (Status st = check_memory_mpi(f, c, *topo, t, job); !st) {
        if (t.rank() == 0) fail(st);
        return 2;
      }
    try {
      return run_one_stage(f, c, *topo, t, job, popt);
    } catch (const std::exception& e) {
      t.fail(str("stage ", t.rank(), " (rank ", t.rank(), "): ", e.what()), 4);
    }
  }

  if (!requests_ok) return fail(requests_ok);
  const int pp = static_cast<int>(f.i64("pp"));
  auto topo = make_topology(c, pp, 0, part, co);
  if (!topo) return fail(topo.status());
  if (fault->stage >= pp)
    return fail(Status::error(
        str("--fault-inject: stage ", fault->stage, " does not exist (", pp, " stages)")));
  if (*dev == "cpu") {  // every stage is in this process
    std::vector<StageNeed> needs;
    for (int s = 0; s < pp; ++s)
      needs.push_back(stage_need(f, c, LoadPlan::stage(topo->layers, s, popt.speculative.mtp), s,
                                 max_logit_rows(f, job)));
    if (Status st = check_host_memory(f, needs, host_memory(), true, "of this process"); !st)
      return fail(st);
  }
  auto transports = make_local_transports(pp);
  std::vector<int> codes(pp, 0);
  std::vector<std::string> errors(pp);
  std::vector<std::thread> threads;
  // A stalled stage's thread never returns: once a stage has failed, the others get a grace
  // period to unwind and then the process ends without them.
  std::mutex done_mu;
  std::condition_variable done_cv;
  int finished = 0;
  bool any_failed = false;
  std::vector<char> stopped(pp, 0);
  for (int s = 0; s < pp; ++s) {
    auto stage = [&, s] {
      struct Done {
        std::mutex& mu;
        std::condition_variable& cv;
        int& finished;
        bool& any_failed;
        const std::string& error;
        char& stopped;
        ~Done() {
          std::lock_guard<std::mutex> lk(mu);
          ++finished;
          stopped = 1;
          any_failed = any_failed || !error.empty();
          cv.notify_all();
        }
      } done{done_mu, done_cv, finished, any_failed, errors[s], stopped[s]};
      Topology t = *topo;
      t.rank = s;
      try {
        codes[s] = run_one_stage(f, c, t, *transports[s], job, popt);
      } catch (const StageFailure& e) {
        codes[s] = e.exit_code;
        errors[s] = e.message;
      } catch (const std::exception& e) {  // anything else still brings the pipeline down
        // Exhausted resources (memory, threads: ulimit) are the user's limits, exit 2.
        const bool limits = dynamic_cast<const std::system_error*>(&e) != nullptr ||
                            dynamic_cast<const std::bad_alloc*>(&e) != nullptr;
        try {
          transports[s]->fail(str("stage ", s, ": ", e.what()), limits ? 2 : 4);
        } catch (const StageFailure& f) {
          codes[s] = f.exit_code;
          errors[s] = f.message;
        }
      }
    };
    try {
      threads.emplace_back(stage);
    } catch (const std::system_error& e) {
      // No thread for this stage (ulimit, memory): bring down the stages already started, whose
      // threads must be joined before they are destroyed.
      try {
        transports[s]->fail(str("stage ", s, ": cannot start its thread: ", e.what()), 2);
      } catch (const StageFailure& f) {
        codes[s] = f.exit_code;
        errors[s] = f.message;
      }
      std::lock_guard<std::mutex> lk(done_mu);
      any_failed = true;
      for (int u = s; u < pp; ++u) stopped[u] = 1;  // never started
      break;
    }
  }
  const int started = static_cast<int>(threads.size());
  bool all_done = false;
  {
    std::unique_lock<std::mutex> lk(done_mu);
    done_cv.wait(lk, [&] { return finished == started || any_failed; });
    all_done = done_cv.wait_for(lk, std::chrono::seconds(3), [&] { return finished == started; });
  }
  if (all_done)
    for (auto& t : threads) t.join();
  std::lock_guard<std::mutex> lk(done_mu);
  int code = 0;
  std::string first_error;
  for (int s = 0; s < pp; ++s) {
    code = std::max(code, codes[s]);
    if (!errors[s].empty() && first_error.empty()) first_error = errors[s];
  }
  if (!first_error.empty()) std::fprintf(stderr, "error: %s\n", first_error.c_str());
  if (!all_done) {  // a stage thread is stuck: end the process without it
    std::string stuck;
    for (int s = 0; s < pp; ++s)
      if (!stopped[s]) stuck += str(stuck.empty() ? "" : ", ", s);
    std::fprintf(stderr, "error: stage(s) %s still running 3 s after the failure; exiting\n",
                 stuck.c_str());
    std::fflush(stdout);
    std::fflush(stderr);
    std::_Exit(std::max(code, 1));
  }
  return code;
}

}  // namespace sp
