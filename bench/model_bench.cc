// seekpipe_bench_model: times the whole model on one backend, step by step (no pipeline, no
// server): B sequences prefilled to a context of C tokens, then decode steps of B tokens each.
// Reports the median decode step time, decode tokens/s, prefill tokens/s, and next to the batch-1
// step time its floor: the weight bytes a decode token reads over the measured copy bandwidth.
// Every timed step runs all B sequences (the requests may generate every token the steps before
// the last timed one can add, the decodes of the first sequences while the others prefill
// included).
//
//   seekpipe_bench_model --model DIR [--load-format dummy] [--override-config JSON] --device cuda
//                        [--batch 1,8,32] [--context 4096] [--decode-steps 32] [--prefill 4096]
//                        [--enforce-eager] [--profile-step N] [--profile-prefill]
//                        [--speculative-tokens 1,2,3]
//
// --speculative-tokens K1,K2,..: MTP speculative decoding's step times as well. The model is built
// with its MTP layer (a config or checkpoint without one is refused) and rings with max(K) rows of
// slack; per batch size, after one prefill, --decode-steps plain decode steps (t_decode, the table
// above) and then, for each K, --decode-steps verify steps: B chunks of K + 1 tokens (the newest
// token and K drafts) through embedding, layers and head (K + 1 logit rows a sequence) with the
// greedy verification (t_verify(K), median), each followed by the drafter's K chained MTP passes
// over B rows (t_draft(K), median; its time is not in t_verify, nor in t_decode or prefill). The
// steps are the engine's own: the MTP drafter of engine/mtp_drafter.cc proposes, the scheduler
// rolls the dropped drafts back (docs/speculative.md), so every state a step reads is valid. It
// prints the per-token time at acceptance a = 0.5 .. 0.8,
// (t_verify(K) + t_draft(K)) (1 - a) / (1 - a^(K+1)), labelled derived (dummy weights accept
// nothing: the measured acceptance is printed next to it).
#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "core/status.h"
#include "engine/engine.h"
#include "engine/speculative.h"
#include "model/weights.h"
#include "tools/driver.h"

namespace sp {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// An error of the MTP checks (worded for --speculative mtp), reworded for --speculative-tokens.
Status spec_error(const std::string& message) {
  std::string m = message;
  const std::string prefix = "--speculative mtp: ";
  if (m.rfind(prefix, 0) == 0) m = m.substr(prefix.size());
  const std::string hint = "run without --speculative";
  if (size_t at = m.find(hint); at != std::string::npos)
    m.replace(at, hint.size(), "run without --speculative-tokens");
  return Status::error("--speculative-tokens needs the MTP layer: " + m);
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// The step times of one speculative phase (one K).
struct SpecPhase {
  int k = 0;
  int64_t context = 0;         // the first sequence's position at the phase's first step
  std::vector<double> verify;  // target steps (embedding .. head and verification)
  std::vector<double> draft;   // the drafter's K chained passes after each of them
  int64_t draft_tokens = 0, accepted = 0;
};

struct Timing {
  double prefill_s = 0;
  int64_t prefill_tokens = 0;
  std::vector<double> decode_steps;
  std::vector<SpecPhase> spec;  // with --speculative-tokens: one per K
};

// The MTP drafter of every K up to the largest, timed: a proposal runs between two
// synchronisations of the backend, so the rest of the step is the target's time.
class TimedDrafter : public DraftSource {
 public:
  TimedDrafter(Model& model, int max_k) : be_(model.backend()) {
    for (int k = 1; k <= max_k; ++k) drafters_.push_back(make_mtp_drafter(model, k));
  }
  // The next proposals draft k tokens a sequence (k >= 1).
  void use(int k) { k_ = k; }
  void propose(const StepPlan& plan, Tensor X, const std::vector<ChunkAfterVerify>& chunks,
               std::vector<Drafted>* out, std::map<int, DraftDists>* q) override {
    be_.synchronize();
    const auto t0 = Clock::now();
    drafters_[static_cast<size_t>(k_ - 1)]->propose(plan, X, chunks, out, q);
    be_.synchronize();
    seconds_ += seconds_since(t0);
  }
  // Seconds spent proposing since the last call.
  double take() {
    const double s = seconds_;
    seconds_ = 0;
    return s;
  }

 private:
  Backend& be_;
  std::vector<std::unique_ptr<DraftSource>> drafters_;
  int k_ = 1;
  double seconds_ = 0;
};

// B sequences prefilled to `context`, then `decode_steps` timed decode steps; with speculative
// `ks` (ascending, distinct), then `decode_steps` timed verify steps for each K in turn.
Result<Timing> run_once(const Config& c, const ModelWeights& w, Backend& be, int batch, int context,
                        int decode_steps, int budget, bool graphs, int profile_step,
                        bool profile_prefill, const std::vector<int>& ks) {
  const bool spec = !ks.empty();
  const int kmax = spec ? ks.back() : 0;
  // Positions the steps may add to a sequence: one a decode step, at most K + 1 a verify step (all
  // drafts accepted). Requests may generate that many tokens and K more, so no sequence ends and no
  // draft is cut short by max_new_tokens or max_model_len before the timed steps end.
  // The sequences prefilled first decode one token a step while the others still prefill (the
  // scheduler puts decodes first): at most one a step until every prompt is in, and each such step
  // prefills at least budget - (B - 1) tokens. Without these tokens in max_new_tokens, the first
  // sequences would finish before the last timed steps, which would then time fewer than B.
  const int64_t tokens = std::max<int64_t>(budget, int64_t{batch} * (kmax + 1));
  const int64_t per_prefill_step = tokens - (batch - 1);
  int64_t advance = (int64_t{batch} * context + per_prefill_step - 1) / per_prefill_step;
  advance += decode_steps;
  for (int k : ks) advance += int64_t{decode_steps} * (k + 1);
  const int64_t new_tokens = advance + kmax + 2;
  if (tokens > (int64_t{1} << 30) || context + new_tokens > (int64_t{1} << 30))
    return Status::error(str("benchmark: a context of ", context, " + ", new_tokens,
                             " generated tokens is too long (--batch, --context, --prefill, "
                             "--decode-steps)"));
  StateLimits lim;
  lim.step_graphs = graphs;
  lim.max_num_seqs = batch;
  lim.max_model_len = context + new_tokens;
  lim.max_num_batched_tokens = static_cast<int>(tokens);
  lim.max_logit_rows = lim.max_num_batched_tokens;
  // The MTP layer (weights, its window state, workspace) and max(K) rows of slack in every ring:
  // a verify step writes K positions that the next step may drop.
  lim.mtp = spec;
  lim.spec_slack = kmax;
  Model model(c, w, be, lim);
  SchedulerLimits sl{batch, lim.max_num_batched_tokens, lim.max_model_len, c.vocab_size};
  sl.spec_tokens = kmax;
  Engine engine(model, sl);
  Scheduler& sched = engine.scheduler();
  std::mt19937 rng(1);
  for (int i = 0; i < batch; ++i) {
    Request r;
    r.id = i;
    for (int k = 0; k < context; ++k)
      r.prompt.push_back(static_cast<int32_t>(rng() % static_cast<uint32_t>(c.vocab_size)));
    r.max_new_tokens = static_cast<int>(new_tokens);
    r.sampling.ignore_eos = true;  // greedy (temperature 0): drafts verified on the backend
    SP_RETURN_IF_ERROR(sched.add(std::move(r)));
  }
  Timing t;
  for (int k : ks) t.spec.push_back(SpecPhase{k, 0, {}, {}, 0, 0});
  std::unique_ptr<TimedDrafter> drafter;
  if (spec) drafter = std::make_unique<TimedDrafter>(model, kmax);
  HeadStage head(model, drafter.get());
  // Timed steps after the prefill: phase 0 decodes, phase p >= 1 verifies ks[p - 1] drafts.
  const int phases = 1 + static_cast<int>(ks.size());
  const int total = decode_steps * phases;
  auto k_of_step = [&](int i) { return i / decode_steps == 0 ? 0 : ks[i / decode_steps - 1]; };
  int done = 0;
  bool prefill_profiled = false;
  while (done < total) {
    StepPlan plan = sched.schedule();
    if (plan.empty()) {
      if (sched.idle()) break;
      return Status::error("benchmark: the scheduler stalled before the timed steps ended");
    }
    // A step after the prefill (every chunk at or past the context): decode or verify.
    const bool timed = std::all_of(plan.batch.chunks.begin(), plan.batch.chunks.end(),
                                   [&](const SeqChunk& ch) { return ch.start_pos >= context; });
    const int phase = timed ? done / decode_steps : 0;
    const int k_step = timed ? k_of_step(done) : 0;
    if (timed)
      for (const SeqChunk& ch : plan.batch.chunks)
        if (ch.n_tokens != k_step + 1 || static_cast<int>(plan.batch.chunks.size()) != batch)
          return Status::error(str("benchmark: step ", done, " after the prefill has ",
                                   plan.batch.chunks.size(), " chunks of ", ch.n_tokens,
                                   " tokens; expected ", batch, " of ", k_step + 1,
                                   " (the newest token and K = ", k_step, " drafts)"));
    // The drafts this step proposes are verified by the next step, if that one is a verify step
    // of K; otherwise they are dropped (the MTP layer still runs: its window state must see every
    // position).
    const int next = timed ? done + 1 : 0;
    const int k_next = spec && next < total ? k_of_step(next) : 0;
    if (drafter) drafter->use(std::max(1, k_next));
    if (timed && phase > 0 && t.spec[static_cast<size_t>(phase - 1)].verify.empty())
      t.spec[static_cast<size_t>(phase - 1)].context = plan.batch.chunks.front().start_pos;
    const SpecCounters before = head.spec_counters();
    be.synchronize();
    // The profiled step: decode step `profile_step`, or (--profile-prefill) the first prefill step.
    const bool profiled = (timed && phase == 0 && done == profile_step) ||
                          (!timed && profile_prefill && !prefill_profiled);
    prefill_profiled = prefill_profiled || (profiled && !timed);
    if (profiled) be.profile(true);
    auto t0 = Clock::now();
    Tensor X = model.residual(0, plan.batch.num_tokens);
    model.begin_step(plan.batch);
    model.embed(plan.batch, X);
    model.run_layers(plan.batch, X);
    StepOutput out = head.finish(plan, X, nullptr);
    be.synchronize();
    double dt = seconds_since(t0);
    if (profiled) be.profile(false);
    const double draft_s = drafter ? drafter->take() : 0.0;
    dt -= draft_s;
    if (!timed) {
      t.prefill_s += dt;
      t.prefill_tokens += plan.batch.num_tokens;
    } else if (phase == 0) {
      t.decode_steps.push_back(dt);
    } else {
      SpecPhase& ph = t.spec[static_cast<size_t>(phase - 1)];
      ph.verify.push_back(dt);
      ph.draft_tokens += head.spec_counters().draft_tokens - before.draft_tokens;
      ph.accepted += head.spec_counters().accepted_tokens - before.accepted_tokens;
    }
    // The draft pass belongs to the phase of the step that verifies its drafts.
    if (k_next > 0) t.spec[static_cast<size_t>(next / decode_steps - 1)].draft.push_back(draft_s);
    if (timed) ++done;
    sched.complete(plan, out.sampled, k_next > 0 ? out.drafts : std::vector<Drafted>{});
  }
  if (done < total)
    return Status::error(
        str("benchmark: the sequences ended after ", done, " of ", total, " timed steps"));
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
  specs.push_back({"profile-prefill", FlagKind::kBool, "",
                   "bracket the first prefill step (--prefill tokens of the first sequence) for "
                   "the profiler instead of, or as well as, a decode step"});
  specs.push_back({"speculative-tokens", FlagKind::kIntList, "",
                   "also time MTP speculative decoding with K = each of these draft tokens (1..8): "
                   "a target step verifying K drafts per sequence, the drafter's K passes, and "
                   "the per-token time they give at acceptance 0.5 .. 0.8 (derived)"});
  Flags f(specs);
  std::vector<std::string> args(argv + 1, argv + argc);
  if (Status st = f.parse(args); !st) return fail(st);
  if (f.given("speculative") || f.given("num-speculative-tokens"))
    return fail(Status::error(
        "seekpipe_bench_model: --speculative / --num-speculative-tokens do not apply; "
        "--speculative-tokens K1,K2,.. times MTP speculative decoding for each K"));
  std::vector<int> ks;
  if (f.given("speculative-tokens")) {
    for (const auto& list : f.int_lists("speculative-tokens"))
      for (int32_t k : list) {
        if (k < 1 || k > kMaxSpecTokens)
          return fail(Status::error(str("--speculative-tokens: expected draft token counts in [1, ",
                                        kMaxSpecTokens, "], got ", k)));
        ks.push_back(k);
      }
    std::sort(ks.begin(), ks.end());
    ks.erase(std::unique(ks.begin(), ks.end()), ks.end());
  }
  const bool spec = !ks.empty();
  auto cfg = read_config(f);
  if (!cfg) return fail(cfg.status());
  const Config& c = *cfg;
  if (spec)
    if (Status st = check_mtp_config(c); !st) return fail(spec_error(st.message()));
  auto dev = resolve_device(f);
  if (!dev) return fail(dev.status());
  auto t0 = Clock::now();
  const LoadPlan plan = LoadPlan::whole(c, spec);
  auto w = f.str("load-format") == "dummy"
               ? dummy_weights(c, plan, static_cast<uint64_t>(f.i64("seed")), nullptr)
               : load_weights(c, f.str("model"), plan, nullptr);
  if (!w) return fail(spec ? spec_error(w.status().message()) : w.status());
  std::printf("weights: %.2f GB in %.1f s%s\n", (*w)->stats.bytes / 1e9, seconds_since(t0),
              spec ? " (with the MTP layer)" : "");
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
  if (spec)
    std::printf(
        "(the model has its MTP layer and rings with %d rows of slack; the draft passes' "
        "time is not in the decode or prefill columns)\n",
        ks.back());
  std::printf("%6s %8s %14s %14s %16s %14s\n", "batch", "context", "decode ms/step", "decode tok/s",
              "prefill tok/s", "vs floor (b=1)");
  struct SpecRow {
    int batch;
    double t_decode;
    SpecPhase phase;
  };
  std::vector<SpecRow> rows;
  for (const auto& list : f.int_lists("batch"))
    for (int32_t batch : list) {
      auto be = make_backend();
      if (!be) return fail(be.status());
      auto t = run_once(c, **w, **be, batch, static_cast<int>(f.i64("context")),
                        static_cast<int>(f.i64("decode-steps")), static_cast<int>(f.i64("prefill")),
                        !(f.given("enforce-eager") && f.boolean("enforce-eager")),
                        static_cast<int>(f.i64("profile-step")),
                        f.given("profile-prefill") && f.boolean("profile-prefill"), ks);
      if (!t) return fail(t.status());
      const double med = median(t->decode_steps);
      char ratio[32] = "-";
      if (batch == 1 && copy_gbs > 0)
        std::snprintf(ratio, sizeof ratio, "%.2fx", med / (bytes_tok / (copy_gbs * 1e9)));
      std::printf("%6d %8" PRId64 " %14.3f %14.1f %16.1f %14s\n", batch, f.i64("context"),
                  med * 1e3, med > 0 ? batch / med : 0.0,
                  t->prefill_s > 0 ? t->prefill_tokens / t->prefill_s : 0.0, ratio);
      std::fflush(stdout);
      for (const SpecPhase& ph : t->spec) rows.push_back({batch, med, ph});
    }
  if (!spec) return 0;
  // Tokens a verify step of K drafts yields on average at acceptance a (each draft accepted with
  // probability a, independently, until the first rejection): 1 + a + .. + a^K.
  const double alphas[] = {0.5, 0.6, 0.7, 0.8};
  std::printf(
      "\nMTP speculative decoding (greedy), ms, medians over %" PRId64
      " steps: t_verify(K) = a target step verifying K drafts per sequence (B x (K + 1) tokens), "
      "t_draft(K) = the drafter's K chained MTP passes over B rows; 'accepted' = the drafts this "
      "checkpoint accepted (dummy weights: none); derived (not measured) = the per-token time at "
      "acceptance a, (t_verify + t_draft) (1 - a) / (1 - a^(K + 1)), to compare with t_decode\n",
      f.i64("decode-steps"));
  std::printf("%-4s %6s %3s %8s %9s %12s %11s %9s %14s %14s %14s %14s\n", "", "batch", "K",
              "context", "t_decode", "t_verify(K)", "t_draft(K)", "accepted", "derived a=0.5",
              "derived a=0.6", "derived a=0.7", "derived a=0.8");
  for (const SpecRow& r : rows) {
    const double tv = median(r.phase.verify), td = median(r.phase.draft);
    std::printf("%-4s %6d %3d %8" PRId64 " %9.3f %12.3f %11.3f %9.3f", "spec", r.batch, r.phase.k,
                r.phase.context, r.t_decode * 1e3, tv * 1e3, td * 1e3,
                r.phase.draft_tokens > 0 ? static_cast<double>(r.phase.accepted) /
                                               static_cast<double>(r.phase.draft_tokens)
                                         : 0.0);
    for (double a : alphas) {
      const double per_step = (1.0 - std::pow(a, r.phase.k + 1)) / (1.0 - a);
      std::printf(" %14.3f", (tv + td) / per_step * 1e3);
    }
    std::printf("\n");
  }
  std::fflush(stdout);
  return 0;
}

}  // namespace
}  // namespace sp

int main(int argc, char** argv) {
  return sp::bench_main(argc, argv);
}
