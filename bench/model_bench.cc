// seekpipe_bench_model: times the whole model on one backend, step by step (no pipeline, no
// server): B sequences prefilled to a context of C tokens, then decode steps of B tokens each.
// Reports the median decode step time, decode tokens/s, prefill tokens/s, and next to the batch-1
// step time its floor: the weight bytes a decode token touches over the measured copy bandwidth.
//
//   seekpipe_bench_model --model DIR [--load-format dummy] [--override-config JSON] --device cuda
//                        [--batch 1,8,32] [--context 4096] [--decode-steps 32] [--prefill 4096]
//                        [--enforce-eager] [--profile-step N]
#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <random>

#include "engine/engine.h"
#include "tools/driver.h"

namespace sp {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Bytes of weights one decode token reads: everything the stage owns except the routed experts,
// plus experts_per_tok routed experts per layer and one row of the embedding.
double decode_bytes_per_token(const Config& c) {
  double bytes = 0, expert = 0;
  for (const ExpectedTensor& t : expected_tensors(c)) {
    const double b = static_cast<double>(expected_bytes(t));
    if (t.name.find(".ffn.experts.") != std::string::npos) {
      if (t.name.find(".ffn.experts.0.") != std::string::npos) expert += b;
    } else if (t.name == "embed.weight") {
      bytes += b / static_cast<double>(c.vocab_size);
    } else {
      bytes += b;
    }
  }
  return bytes + expert * c.experts_per_tok * c.num_layers;
}

struct Timing {
  double prefill_s = 0;
  int64_t prefill_tokens = 0;
  std::vector<double> decode_steps;
};

Timing run_once(const Config& c, const ModelWeights& w, Backend& be, int batch, int context,
                int decode_steps, int budget, bool graphs, int profile_step) {
  StateLimits lim;
  lim.step_graphs = graphs;
  lim.max_num_seqs = batch;
  lim.max_model_len = context + decode_steps + 1;
  lim.max_num_batched_tokens = std::max(budget, batch);
  lim.max_logit_rows = std::max(budget, batch);
  Model model(c, w, be, lim);
  Engine engine(model, {batch, lim.max_num_batched_tokens, lim.max_model_len, c.vocab_size});
  Scheduler& sched = engine.scheduler();
  std::mt19937 rng(1);
  for (int i = 0; i < batch; ++i) {
    Request r;
    r.id = i;
    for (int k = 0; k < context; ++k)
      r.prompt.push_back(static_cast<int32_t>(rng() % static_cast<uint32_t>(c.vocab_size)));
    r.max_new_tokens = decode_steps + 1;
    r.sampling.ignore_eos = true;
    SP_CHECK(sched.add(std::move(r)).is_ok(), "request");
  }
  Timing t;
  HeadStage head(model, nullptr);
  while (!sched.idle()) {
    StepPlan plan = sched.schedule();
    if (plan.empty()) break;
    const bool decode = std::all_of(
        plan.batch.chunks.begin(), plan.batch.chunks.end(),
        [&](const SeqChunk& ch) { return ch.n_tokens == 1 && ch.start_pos >= context; });
    be.synchronize();
    const bool profiled = decode && static_cast<int>(t.decode_steps.size()) == profile_step;
    if (profiled) be.profile(true);
    auto t0 = Clock::now();
    Tensor X = model.residual(0, plan.batch.num_tokens);
    model.begin_step(plan.batch);
    model.embed(plan.batch, X);
    model.run_layers(plan.batch, X);
    StepOutput out = head.finish(plan, X, nullptr);
    be.synchronize();
    const double dt = seconds_since(t0);
    if (profiled) be.profile(false);
    if (decode) {
      t.decode_steps.push_back(dt);
    } else {
      t.prefill_s += dt;
      t.prefill_tokens += plan.batch.num_tokens;
    }
    sched.complete(plan, out.sampled, out.drafts);
  }
  return t;
}

int bench_main(int argc, char** argv) {
  auto specs = common_flags();
  specs.push_back({"batch", FlagKind::kIntList, "1,8,32", "decode batch sizes"});
  specs.push_back(
      {"context", FlagKind::kInt, "4096", "tokens of context per sequence", 1, 1 << 24});
  specs.push_back({"decode-steps", FlagKind::kInt, "32", "timed decode steps", 1, 1 << 20});
  specs.push_back({"prefill", FlagKind::kInt, "4096", "tokens per prefill step (the token budget)",
                   1, 1 << 20});
  specs.push_back({"profile-step", FlagKind::kInt, "-1",
                   "decode step (0-based) bracketed for a profiler that starts paused "
                   "(ncu --profile-from-start off); -1: none",
                   -1, 1 << 20});
  Flags f(specs);
  std::vector<std::string> args(argv + 1, argv + argc);
  if (Status st = f.parse(args); !st) return fail(st);
  auto cfg = read_config(f);
  if (!cfg) return fail(cfg.status());
  const Config& c = *cfg;
  auto dev = resolve_device(f);
  if (!dev) return fail(dev.status());
  auto t0 = Clock::now();
  auto w = f.str("load-format") == "dummy"
               ? dummy_weights(c, LoadPlan::whole(c), static_cast<uint64_t>(f.i64("seed")), nullptr)
               : load_weights(c, f.str("model"), LoadPlan::whole(c), nullptr);
  if (!w) return fail(w.status());
  std::printf("weights: %.2f GB in %.1f s\n", (*w)->stats.bytes / 1e9, seconds_since(t0));
  // A fresh backend per measurement: a backend keeps what it allocated (weights, state) until it
  // is destroyed.
  auto make_backend = [&]() -> Result<std::unique_ptr<Backend>> {
    if (*dev == "cpu") return make_cpu_backend(static_cast<int>(f.i64("threads")));
    return make_cuda_backend(0, f.str("kv-cache-dtype") == "fp32" ? DType::kF32 : DType::kBF16,
                             f.str("activation-dtype") == "bf16" ? DType::kBF16 : DType::kF32);
  };
  double copy_gbs = 0;
  if (*dev == "cuda") copy_gbs = cuda_copy_bandwidth_gbs(0, size_t{4} << 30);
  const double bytes_tok = decode_bytes_per_token(c);
  std::printf("device %s (activations %s%s); decode weight bytes per token (batch 1) %.3f GB",
              dev->c_str(), f.str("activation-dtype").c_str(),
              f.given("enforce-eager") && f.boolean("enforce-eager") ? ", eager" : ", CUDA graphs",
              bytes_tok / 1e9);
  if (copy_gbs > 0)
    std::printf("; copy bandwidth %.0f GB/s -> floor %.3f ms/token", copy_gbs,
                bytes_tok / (copy_gbs * 1e9) * 1e3);
  std::printf("\n");
  std::printf("%6s %8s %14s %14s %16s %14s\n", "batch", "context", "decode ms/step", "decode tok/s",
              "prefill tok/s", "vs floor (b=1)");
  for (const auto& list : f.int_lists("batch"))
    for (int32_t batch : list) {
      auto be = make_backend();
      if (!be) return fail(be.status());
      Timing t =
          run_once(c, **w, **be, batch, static_cast<int>(f.i64("context")),
                   static_cast<int>(f.i64("decode-steps")), static_cast<int>(f.i64("prefill")),
                   !(f.given("enforce-eager") && f.boolean("enforce-eager")),
                   static_cast<int>(f.i64("profile-step")));
      std::vector<double> d = t.decode_steps;
      std::sort(d.begin(), d.end());
      const double med = d.empty() ? 0 : d[d.size() / 2];
      char ratio[32] = "-";
      if (batch == 1 && copy_gbs > 0)
        std::snprintf(ratio, sizeof ratio, "%.2fx", med / (bytes_tok / (copy_gbs * 1e9)));
      std::printf("%6d %8" PRId64 " %14.3f %14.1f %16.1f %14s\n", batch, f.i64("context"),
                  med * 1e3, med > 0 ? batch / med : 0.0,
                  t.prefill_s > 0 ? t.prefill_tokens / t.prefill_s : 0.0, ratio);
      std::fflush(stdout);
    }
  return 0;
}

}  // namespace
}  // namespace sp

int main(int argc, char** argv) {
  return sp::bench_main(argc, argv);
}
