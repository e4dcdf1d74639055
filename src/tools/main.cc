// seekpipe command-line entry points: generate, verify, inspect.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <map>
#include <new>
#include <set>
#include <thread>

#include "engine/engine.h"
#include "model/model.h"
#include "model/safetensors.h"
#include "tools/bench_offline.h"
#include "tools/driver.h"
#include "tools/flags.h"
#include "tools/golden.h"
#include "tools/mtp_check.h"
#include "tools/run_summary.h"
#include "tools/text_commands.h"
#if SP_HAVE_SERVER
#include "tools/bench_serve.h"
#include "tools/serve.h"
#endif

namespace sp {
namespace {

constexpr const char* kUsage =
    "seekpipe: DeepSeek-V4 inference engine\n"
    "usage: seekpipe COMMAND [flags]\n"
    "commands:\n"
    "  generate   prefill prompts (text or token ids) and decode new tokens\n"
    "  verify     check the model against a golden file (prefill/decode logits, hidden states)\n"
    "  score      teacher-forced loss, perplexity and top-1 accuracy over a JSONL of texts\n"
    "  tokenize   token ids of a text, or the text of token ids, with a model's tokenizer\n"
    "  inspect    print the parsed config, the tensor table and the memory each part needs\n"
    "  golden     write a golden file (greedy tokens, every position's logits) from this engine\n"
    "  serve      the OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, ...)\n"
    "  bench      bench serve: load a running server with random requests (as vllm bench serve);\n"
    "             bench offline: the same workload and report in this process, without HTTP\n"
    "run 'seekpipe COMMAND --help' for the flags of a command\n";

// FNV-1a over the bits of every logit, in request and position order.
struct LogitsHash {
  uint64_t h = 1469598103934665603ull;
  void add(const float* v, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
      uint32_t bits;
      std::memcpy(&bits, &v[i], 4);
      for (int b = 0; b < 4; ++b) h = (h ^ ((bits >> (8 * b)) & 0xffu)) * 1099511628211ull;
    }
  }
};

// The first maximum (ties to the lower id).
int64_t argmax(const float* v, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i)
    if (v[i] > v[best]) best = i;
  return best;
}

bool wants_help(const std::vector<std::string>& args) {
  for (auto& a : args)
    if (a == "--help" || a == "-h") return true;
  return false;
}

int cmd_generate(const std::vector<std::string>& args) {
  auto specs = common_flags();
  for (auto& p : pipeline_flags()) specs.push_back(p);
  specs.push_back({"prompt-ids",
                   FlagKind::kIntList,
                   "",
                   "prompt as comma-separated token ids; repeat for several prompts",
                   -1e300,
                   1e300,
                   {},
                   true});
  specs.push_back({"prompt",
                   FlagKind::kString,
                   "",
                   "prompt text, tokenized with the model's tokenizer.json; repeat for several "
                   "prompts; prints the continuation as text",
                   -1e300,
                   1e300,
                   {},
                   true});
  specs.push_back(add_bos_flag());
  specs.push_back({"chat", FlagKind::kBool, "",
                   "each --prompt is a user message: rendered with DeepSeek-V4's chat format "
                   "(non-thinking), and the reply printed as its content"});
  specs.push_back(
      {"max-tokens", FlagKind::kInt, "16", "new tokens to generate per prompt", 0, 1 << 30});
  specs.push_back(
      {"temperature", FlagKind::kFloat, "0", "sampling temperature; 0 is greedy", 0, 100});
  specs.push_back({"top-k", FlagKind::kInt, "0", "sample from the k most likely tokens; 0 for all",
                   0, 1 << 30});
  specs.push_back({"top-p", FlagKind::kFloat, "1",
                   "sample from the smallest set with this much probability", 1e-9, 1});
  specs.push_back(
      {"ignore-eos", FlagKind::kBool, "", "keep generating after the end-of-sequence token"});
  Flags f(specs);
  if (wants_help(args)) {
    std::printf(
        "usage: seekpipe generate --model DIR (--prompt TEXT | --prompt-ids 1,2,3) [flags]\n%s",
        f.help().c_str());
    return 0;
  }
  if (Status st = f.parse(args); !st) return fail(st);
  if (f.given("prompt") && f.given("prompt-ids"))
    return fail(
        Status::error("--prompt and --prompt-ids are exclusive: give prompts as text or "
                      "as token ids, not both"));
  if (f.boolean("chat") && !f.given("prompt"))
    return fail(Status::error("--chat needs --prompt: the user message as text"));
  if (!f.given("prompt-ids") && !f.given("prompt"))
    return fail(
        Status::error("--prompt-ids is required: comma-separated token ids, e.g. "
                      "--prompt-ids 1,2,3 (or --prompt TEXT)"));
  std::unique_ptr<ModelText> text;
  auto encoded = f.given("prompt") ? encode_prompts(f, &text) : f.int_lists("prompt-ids");
  if (!encoded) return fail(encoded.status());
  auto cfg = read_config(f);
  if (!cfg) return fail(cfg.status());
  const auto prompts = std::move(*encoded);
  const int64_t V = cfg->vocab_size, eos = cfg->eos_token_id;
  // Last stage: every computed logit row (for the hash) and the sampled tokens.
  std::map<int64_t, std::map<int64_t, std::vector<float>>> logits;
  std::map<int64_t, std::vector<int32_t>> sampled;
  Job job;
  job.add_requests = [&](Scheduler& sched) -> Status {
    for (size_t i = 0; i < prompts.size(); ++i) {
      Request r;
      r.id = static_cast<int64_t>(i);
      r.prompt = prompts[i];
      r.max_new_tokens = static_cast<int>(f.i64("max-tokens"));
      r.sampling = {static_cast<float>(f.f64("temperature")), static_cast<int>(f.i64("top-k")),
                    static_cast<float>(f.f64("top-p")), static_cast<uint64_t>(f.i64("seed")),
                    f.boolean("ignore-eos")};
      SP_RETURN_IF_ERROR(sched.add(std::move(r)));
    }
    return Status::ok();
  };
  job.hooks = [&](const StageEnv& env) {
    StageHooks h;
    if (env.topo.is_last(env.stage)) {
      h.on_logits = [&](int64_t req, int64_t pos, const float* l) {
        logits[req][pos].assign(l, l + V);
      };
      h.on_sampled = [&](const Sampled& t) { sampled[t.request].push_back(t.token); };
    }
    return h;
  };
  job.finish = [&](const StageEnv& env, const std::vector<StageReport>& reports) -> int {
    if (!env.topo.is_last(env.stage)) return 0;
    LogitsHash hash;
    int64_t generated = 0, tokens = 0, prefill = 0;
    for (auto& r : reports) tokens = std::max(tokens, r.tokens);
    double wall = 0;
    for (auto& r : reports) wall = std::max(wall, r.wall_s);
    for (size_t i = 0; i < prompts.size(); ++i) {
      const auto& out = sampled[static_cast<int64_t>(i)];
      std::printf("prompt %zu output ids:", i);
      for (int32_t t : out) std::printf(" %d", t);
      bool stop = !out.empty() && !f.boolean("ignore-eos") && eos >= 0 && out.back() == eos;
      std::printf("  (%s)\n", stop ? "stop: eos" : "length");
      if (text)
        std::printf("prompt %zu %s: %s -> %s\n", i, f.boolean("chat") ? "chat" : "text",
                    json_quoted(f.strings("prompt")[i]).c_str(),
                    json_quoted(f.boolean("chat") ? chat_reply_content(text->decode(out))
                                                  : text->decode(out))
                        .c_str());
      generated += static_cast<int64_t>(out.size());
      prefill += static_cast<int64_t>(prompts[i].size());
    }
    // Prompt tokens found in the prefix cache were not computed.
    prefill -= reports.front().prefix_hits;
    for (size_t i = 0; i < prompts.size(); ++i) {
      for (auto& [pos, v] : logits[static_cast<int64_t>(i)]) hash.add(v.data(), V);
    }
    std::printf("generated %" PRId64 " tokens in %" PRId64
                " steps, %.3f s (%.1f tokens/s over %" PRId64 " prefill + %" PRId64
                " decode tokens)\n",
                generated, reports.back().steps, wall, tokens / std::max(wall, 1e-9), prefill,
                tokens - prefill);
    print_prefix_summary(reports);
    print_pipeline_summary(reports);
    print_spec_summary(reports);
    print_graph_summary(reports);
    if (Status st = maybe_write_trace(f, reports); !st) return fail(st);
    std::printf("logits_hash=%016" PRIx64 "\n", hash.h);
    return 0;
  };
  return run_job(f, job);
}

// Writes a golden file from this engine's own greedy run (every position's logits): the reference
// for checking another backend on the same weights, e.g. the CPU backend's output for a dummy
// full-width model that no Python reference can run.
int cmd_golden(const std::vector<std::string>& args) {
  auto specs = common_flags();
  for (auto& p : pipeline_flags()) specs.push_back(p);
  specs.push_back({"prompt-ids",
                   FlagKind::kIntList,
                   "",
                   "prompt as comma-separated token ids; repeat for several prompts (required)",
                   -1e300,
                   1e300,
                   {},
                   true});
  specs.push_back({"max-tokens", FlagKind::kInt, "8", "greedy tokens per prompt", 1, 1 << 20});
  specs.push_back({"out", FlagKind::kString, "", "golden file to write (required)"});
  specs.push_back({"mtp-out", FlagKind::kString, "",
                   "also write an MTP golden file: the MTP draft layer's logits over each prompt "
                   "and its greedy tokens (p{i}.mtp_logits), computed on one stage of this "
                   "process"});
  Flags f(specs);
  if (wants_help(args)) {
    std::printf(
        "usage: seekpipe golden --model DIR --prompt-ids 1,2,3 --out FILE [--mtp-out FILE] "
        "[flags]\n%s",
        f.help().c_str());
    return 0;
  }
  if (Status st = f.parse(args); !st) return fail(st);
  if (!f.given("prompt-ids") || !f.given("out"))
    return fail(Status::error("--prompt-ids and --out are required"));
  if (f.given("mtp-out") && launched_by_mpi())
    return fail(Status::error(
        "--mtp-out computes the MTP logits on one stage of one process; run it without mpirun"));
  auto cfg = read_config(f);
  if (!cfg) return fail(cfg.status());
  if (f.given("mtp-out"))
    if (Status st = check_mtp_config(*cfg); !st) return fail(st);
  const auto prompts = f.int_lists("prompt-ids");
  const int64_t V = cfg->vocab_size, G = f.i64("max-tokens");
  std::vector<GoldenRecord> rec(prompts.size());
  Job job;
  job.max_logit_rows = static_cast<int>(f.i64("max-num-batched-tokens"));
  job.add_requests = [&](Scheduler& sched) -> Status {
    for (size_t i = 0; i < prompts.size(); ++i) {
      Request r;
      r.id = static_cast<int64_t>(i);
      r.prompt = prompts[i];
      r.max_new_tokens = static_cast<int>(G);
      r.sampling.ignore_eos = true;
      r.all_logits = true;
      SP_RETURN_IF_ERROR(sched.add(std::move(r)));
    }
    return Status::ok();
  };
  job.hooks = [&](const StageEnv& env) {
    StageHooks h;
    if (env.topo.is_last(env.stage)) {
      for (size_t i = 0; i < prompts.size(); ++i) {
        rec[i].ids = prompts[i];
        rec[i].prefill.assign(prompts[i].size() * V, 0.0f);
        rec[i].decode.assign(G * V, 0.0f);
      }
      h.on_logits = [&](int64_t req, int64_t pos, const float* l) {
        GoldenRecord& g = rec[req];
        const int64_t L = static_cast<int64_t>(g.ids.size());
        if (pos < L) std::memcpy(&g.prefill[pos * V], l, V * sizeof(float));
        if (pos >= L - 1 && pos - (L - 1) < G)
          std::memcpy(&g.decode[(pos - (L - 1)) * V], l, V * sizeof(float));
      };
      h.on_sampled = [&](const Sampled& t) { rec[t.request].greedy.push_back(t.token); };
    }
    return h;
  };
  job.finish = [&](const StageEnv& env, const std::vector<StageReport>&) -> int {
    if (!env.topo.is_last(env.stage)) return 0;
    if (Status st = write_golden(f.str("out"), rec, V); !st) return fail(st);
    std::printf("golden written to %s (%zu prompts, %" PRId64 " greedy tokens each)\n",
                f.str("out").c_str(), rec.size(), G);
    return 0;
  };
  const int code = run_job(f, job);
  if (code != 0 || !f.given("mtp-out")) return code;
  // The MTP layer over t = prompt ++ greedy tokens, as the fixtures' mtp_golden.safetensors.
  std::vector<std::vector<int32_t>> seqs;
  for (const GoldenRecord& g : rec) {
    seqs.push_back(g.ids);
    seqs.back().insert(seqs.back().end(), g.greedy.begin(), g.greedy.end());
  }
  auto mtp = mtp_logits_one_stage(f, *cfg, seqs);
  if (!mtp) return fail(mtp.status());
  if (Status st = write_mtp_golden(f.str("mtp-out"), *mtp, V); !st) return fail(st);
  std::printf("MTP golden written to %s (%zu prompts)\n", f.str("mtp-out").c_str(), seqs.size());
  return 0;
}

int cmd_verify(const std::vector<std::string>& args) {
  auto specs = common_flags();
  for (auto& p : pipeline_flags()) specs.push_back(p);
  specs.push_back(
      {"golden", FlagKind::kString, "", "golden file in the fixtures' format (required)"});
  specs.push_back({"atol", FlagKind::kFloat, "5e-5",
                   "cpu: largest allowed absolute error of any logit or hidden value", 0, 1e30});
  specs.push_back({"min-top1", FlagKind::kFloat, "0.99",
                   "cuda: least fraction of positions whose top-1 token matches the golden", 0, 1});
  specs.push_back({"max-median-rel", FlagKind::kFloat, "1e-2",
                   "cuda: largest median over positions of |logits - golden| / |golden| (L2 over "
                   "the vocabulary)",
                   0, 1e30});
  specs.push_back({"mtp-golden", FlagKind::kString, "",
                   "also check the MTP draft layer against this mtp_golden.safetensors (the "
                   "sequences of --golden), on one stage of this process, with the same "
                   "thresholds"});
  Flags f(specs);
  if (wants_help(args)) {
    std::printf("usage: seekpipe verify --model DIR --golden FILE [--mtp-golden FILE] [flags]\n%s",
                f.help().c_str());
    return 0;
  }
  if (Status st = f.parse(args); !st) return fail(st);
  if (!f.given("golden"))
    return fail(Status::error("--golden is required: a golden.safetensors file"));
  if (f.given("mtp-golden") && launched_by_mpi())
    return fail(Status::error(
        "--mtp-golden runs the MTP check on one stage of one process; run it without mpirun"));
  auto gfile = SafetensorsFile::open(f.str("golden"));
  if (!gfile) return fail(gfile.status());
  auto cfg = read_config(f);
  if (!cfg) return fail(cfg.status());
  const Config& c = *cfg;
  auto golden = read_golden(**gfile, c);
  if (!golden) return fail(golden.status());
  if (f.given("mtp-golden")) {  // its errors (file, shapes, no MTP layer) before the long run
    if (Status st = check_mtp_config(c); !st) return fail(st);
    auto mfile = SafetensorsFile::open(f.str("mtp-golden"));
    if (!mfile) return fail(mfile.status());
    if (auto m = read_mtp_golden(**mfile, *golden, c); !m) return fail(m.status());
  }
  const int64_t V = c.vocab_size, hcD = c.hc_dim();
  std::vector<std::vector<float>> logits(golden->size());
  // Per-layer hidden states of prompt 0, where the golden file has them.
  std::vector<const float*> hidden(c.num_layers, nullptr);
  for (int l = 0; l < c.num_layers; ++l) {
    auto it = (*gfile)->tensors().find(str("p0.layer", l, ".hidden"));
    if (it != (*gfile)->tensors().end() && it->second.dtype == DType::kF32 &&
        it->second.shape == std::vector<int64_t>{static_cast<int64_t>((*golden)[0].ids.size()),
                                                 c.hc_mult, c.hidden_size})
      hidden[l] = reinterpret_cast<const float*>(it->second.data);
  }
  int hidden_layers = 0;
  for (auto* h : hidden) hidden_layers += h != nullptr;
  std::vector<double> hidden_err(4096, 0.0);  // per stage
  Job job;
  job.max_logit_rows = static_cast<int>(f.i64("max-num-batched-tokens"));
  job.add_requests = [&](Scheduler& sched) -> Status {
    for (size_t i = 0; i < golden->size(); ++i) {
      const GoldenPrompt& g = (*golden)[i];
      Request r;
      r.id = static_cast<int64_t>(i);
      r.prompt = g.ids;
      r.forced.assign(g.greedy.begin(), g.greedy.end() - (g.greedy.empty() ? 0 : 1));
      r.all_logits = true;
      r.max_new_tokens = 0;
      SP_RETURN_IF_ERROR(sched.add(std::move(r)));
    }
    return Status::ok();
  };
  job.hooks = [&](const StageEnv& env) {
    StageHooks h;
    const int stage = env.stage;
    Backend* be = &env.model->backend();
    if (env.topo.is_last(stage)) {
      for (size_t i = 0; i < golden->size(); ++i)
        logits[i].assign(
            ((*golden)[i].ids.size() + std::max<size_t>((*golden)[i].greedy.size(), 1) - 1) * V,
            0.0f);
      h.on_logits = [&](int64_t req, int64_t pos, const float* l) {
        std::memcpy(&logits[req][pos * V], l, V * sizeof(float));
      };
    }
    h.hook = [&, stage, be](const StepPlan& plan, int layer, Tensor X) {
      if (!hidden[layer]) return;
      std::vector<float> row;
      for (size_t ci = 0; ci < plan.chunk_request.size(); ++ci) {
        if (plan.chunk_request[ci] != 0) continue;
        const SeqChunk& ch = plan.batch.chunks[ci];
        for (int i = 0; i < ch.n_tokens; ++i) {
          const int64_t pos = ch.start_pos + i;
          if (pos >= static_cast<int64_t>((*golden)[0].ids.size())) continue;
          tensor_to_f32(*be, X.slice_rows(ch.offset + i, 1), row);
          for (int64_t k = 0; k < hcD; ++k)
            hidden_err[stage] =
                std::max(hidden_err[stage],
                         static_cast<double>(std::fabs(row[k] - hidden[layer][pos * hcD + k])));
        }
      }
    };
    return h;
  };
  job.finish = [&](const StageEnv& env, const std::vector<StageReport>& reports) -> int {
    auto herr = env.transport->allreduce_max(hidden_err[env.stage]);
    if (!herr) return fail(herr.status());
    if (!env.topo.is_last(env.stage)) return 0;
    const double atol = f.f64("atol");
    // The CPU backend is exact to fp32 rounding: every value within atol. A bf16 GPU backend is
    // judged per position: top-1 agreement and the median relative L2 error of the logits.
    const bool relative = resolve_device(f).value() == "cuda";
    bool ok = true;
    LogitsHash hash;
    std::vector<double> rel;
    int64_t top1 = 0;
    auto position = [&](const float* got, const float* want) {
      double num = 0, den = 0;
      for (int64_t v = 0; v < V; ++v) {
        const double d = static_cast<double>(got[v]) - want[v];
        num += d * d;
        den += static_cast<double>(want[v]) * want[v];
      }
      rel.push_back(std::isfinite(num) ? std::sqrt(num / std::max(den, 1e-300)) : INFINITY);
      top1 += argmax(got, V) == argmax(want, V);
    };
    for (size_t i = 0; i < golden->size(); ++i) {
      const GoldenPrompt& g = (*golden)[i];
      const int64_t L = static_cast<int64_t>(g.ids.size()),
                    G = static_cast<int64_t>(g.greedy.size());
      double pe = 0, de = 0;
      for (int64_t k = 0; k < L * V; ++k)
        pe = std::max(pe, static_cast<double>(std::fabs(logits[i][k] - g.prefill[k])));
      for (int64_t j = 0; j < G; ++j)
        for (int64_t v = 0; v < V; ++v)
          de = std::max(de, static_cast<double>(
                                std::fabs(logits[i][(L - 1 + j) * V + v] - g.decode[j * V + v])));
      std::printf("prompt %zu (%" PRId64 " tokens, %" PRId64
                  " teacher-forced decode steps): prefill_logits max_abs_err %.3e, decode_logits "
                  "max_abs_err %.3e",
                  i, L, G, pe, de);
      if (i == 0 && hidden_layers)
        std::printf(", hidden (%d layers) max_abs_err %.3e", hidden_layers, herr.value());
      std::printf("\n");
      for (int64_t k = 0; k < L; ++k) position(&logits[i][k * V], &g.prefill[k * V]);
      for (int64_t j = 0; j < G; ++j) position(&logits[i][(L - 1 + j) * V], &g.decode[j * V]);
      if (!relative) ok &= pe <= atol && de <= atol && (i != 0 || herr.value() <= atol);
      hash.add(logits[i].data(), static_cast<int64_t>(logits[i].size()));
    }
    double wall = 0;
    for (auto& r : reports) wall = std::max(wall, r.wall_s);
    std::printf("%" PRId64 " steps, %" PRId64 " tokens, %.3f s\n", reports.back().steps,
                reports.back().tokens, wall);
    print_pipeline_summary(reports);
    if (Status st = maybe_write_trace(f, reports); !st) return fail(st);
    std::printf("logits_hash=%016" PRIx64 "\n", hash.h);
    std::sort(rel.begin(), rel.end());
    const double median = rel.empty() ? 0.0 : rel[rel.size() / 2];
    const double agree = rel.empty() ? 1.0 : static_cast<double>(top1) / rel.size();
    std::printf("positions %zu: top1_agreement %.4f, median_rel_err %.3e, max_rel_err %.3e\n",
                rel.size(), agree, median, rel.empty() ? 0.0 : rel.back());
    if (relative) {
      ok = agree >= f.f64("min-top1") && median <= f.f64("max-median-rel");
      std::printf("verify: %s (top1 >= %.3f, median rel <= %.1e)\n", ok ? "PASS" : "FAIL",
                  f.f64("min-top1"), f.f64("max-median-rel"));
    } else {
      std::printf("verify: %s (atol %.1e)\n", ok ? "PASS" : "FAIL", atol);
    }
    return ok ? 0 : 1;
  };
  const int code = run_job(f, job);
  if (code > 1 || !f.given("mtp-golden")) return code;
  std::fflush(stdout);
  return std::max(code, run_mtp_check(f, c, *golden, f.str("mtp-golden")));
}

std::string human(int64_t b) {
  return human_bytes(static_cast<double>(b));
}

int print_pipeline_plan(const Flags& f, const Config& c) {
  const int pp = static_cast<int>(f.i64("pp"));
  const std::string part = f.str("pp-partition") == "vllm" ? "" : f.str("pp-partition");
  CostModelOptions co{static_cast<int>(f.i64("max-num-seqs")), f.i64("max-model-len"),
                      f.str("speculative") == "mtp", f.f64("pp-head-cost")};
  auto topo = make_topology(c, pp, 0, part, co);
  if (!topo) return fail(topo.status());
  if (f.given("stage-ms")) {
    // Measured stage times of a run at this split: the head's cost they imply, and the split
    // --pp-partition auto makes with it.
    std::vector<double> ms;
    for (const std::string& v : split_commas(f.str("stage-ms"))) {
      char* end = nullptr;
      const double x = std::strtod(v.c_str(), &end);
      if (v.empty() || end != v.c_str() + v.size())
        return fail(Status::error(str("--stage-ms: '", v,
                                      "' is not a number of milliseconds "
                                      "(expected a list like 9.11,9.11,9.16,9.32)")));
      ms.push_back(x);
    }
    auto k = fit_head_cost(c, topo->layers, ms, co);
    if (!k) return fail(k.status());
    CostModelOptions fitted = co;
    fitted.head_cost = *k;
    Topology t = *topo;
    t.layers = auto_partition(c, pp, fitted);
    std::printf(
        "\nfitted to --stage-ms at partition %s: --pp-head-cost %.3f (the head costs "
        "%.2fx its bytes' share next to the layers); --pp-partition auto with it: %s\n",
        topo->partition_string().c_str(), *k, *k, t.partition_string().c_str());
  }
  auto costs = stage_costs(c, topo->layers, co);
  double total = 0;
  for (auto& s : costs) total += s.time;
  std::printf("\npipeline plan: %d stages, partition %s (%s)\n", pp,
              topo->partition_string().c_str(),
              part.empty()     ? "vLLM's split"
              : part == "auto" ? "cost model"
                               : "explicit");
  std::printf("  predicted time: decode step of %d sequences at %" PRId64
              " tokens of context, memory-bound (bytes read)\n",
              co.batch, co.context);
  auto slots = prefix_cache_slots(f);
  if (!slots) return fail(slots.status());
  std::printf("  %-6s %-9s %-26s %12s %14s %12s %14s %10s\n", "stage", "layers", "kinds", "weights",
              "state/seq", "state/token", "snapshots", "time share");
  for (size_t i = 0; i < costs.size(); ++i) {
    const StageCost& s = costs[i];
    int swa = 0, csa = 0, hca = 0, hash = 0;
    for (int l = s.first_layer; l < s.end_layer; ++l) {
      swa += c.attn_kinds[l] == AttnKind::kSliding;
      csa += c.attn_kinds[l] == AttnKind::kCSA;
      hca += c.attn_kinds[l] == AttnKind::kHCA;
      hash += c.mlp_kinds[l] == MlpKind::kHashMoe;
    }
    std::string kinds = str(csa, " CSA ", hca, " HCA ", swa, " SWA");
    if (hash) kinds += str(" (", hash, " hash)");
    const bool last = i + 1 == costs.size();
    std::string extras = std::string(i == 0 ? "+embed" : "") + (last ? "+head" : "") +
                         (last && co.mtp ? (i == 0 ? "+mtp" : "+embed copy+mtp") : "");
    std::printf("  %-6zu %-9s %-26s %12s %14s %10" PRId64 " B %14s %9.1f%% %s\n", i,
                str(s.first_layer, "-", s.end_layer - 1).c_str(), kinds.c_str(),
                human(s.weight_bytes).c_str(), human(s.state_per_seq).c_str(), s.state_per_token,
                human(int64_t{*slots} * s.state_per_seq).c_str(), 100 * s.time / total,
                extras.c_str());
  }
  return 0;
}

int cmd_inspect(const std::vector<std::string>& args) {
  auto specs = common_flags();
  for (auto& p : pipeline_flags())
    if (p.name == "pp" || p.name == "pp-partition" || p.name == "pp-head-cost") specs.push_back(p);
  specs.push_back({"stage-ms", FlagKind::kString, "",
                   "with --pp: measured stage times (ms, one per stage, e.g. the compute medians "
                   "of bench/trace_summary.py) of a run at this split; prints the --pp-head-cost "
                   "they imply and the auto split with it"});
  Flags f(specs);
  for (auto& a : args)
    if (a == "--help" || a == "-h") {
      std::printf("usage: seekpipe inspect --model DIR [flags]\n%s", f.help().c_str());
      return 0;
    }
  if (Status st = f.parse(args); !st) return fail(st);
  if (f.given("stage-ms") && !f.given("pp"))
    return fail(
        Status::error("--stage-ms needs --pp (and the --pp-partition the times were "
                      "measured at)"));
  auto cfg = read_config(f);
  if (!cfg) return fail(cfg.status());
  const Config& c = *cfg;
  std::printf("%s", describe_config(c).c_str());
  const bool mtp = f.str("speculative") == "mtp";
  const auto ex = expected_tensors(c, mtp);
  size_t n_main = 0;
  for (auto& t : ex) n_main += t.part != Part::kMtp;
  std::printf("\ntensors (%zu in the main model%s):\n", n_main,
              mtp ? str(", ", ex.size() - n_main, " in the MTP layer").c_str() : "");
  std::unique_ptr<Checkpoint> ck;
  if (f.str("load-format") != "dummy") {
    auto r = Checkpoint::open(f.str("model"));
    if (!r) return fail(r.status());
    ck = std::move(r.value());
    // mtp.* tensors outside the table are ignored: all of them without --speculative mtp (and
    // always for a DSpark draft module), with it those beyond the first MTP layer.
    std::set<std::string> used;
    for (auto& t : ex) used.insert(t.name);
    int ignored = 0;
    for (auto& [name, t] : ck->all()) {
      const bool skip = name.rfind("mtp.", 0) == 0 && !used.count(name) &&
                        !(name.size() > 6 && name.compare(name.size() - 6, 6, ".scale") == 0 &&
                          used.count(name.substr(0, name.size() - 6) + ".weight"));
      ignored += skip;
      std::printf("  %-60s %-8s %s%s\n", name.c_str(), dtype_name(t->dtype),
                  shape_str(t->shape).c_str(), skip ? "  (ignored)" : "");
    }
    if (ignored)
      std::printf("%d mtp.* tensors ignored: %s\n", ignored,
                  c.dspark
                      ? "a DSpark draft module (not supported; the main model runs as plain V4)"
                  : mtp ? "beyond the first MTP layer"
                        : "the MTP draft layer, loaded only with --speculative mtp");
  } else {
    for (auto& t : ex)
      std::printf("  %-60s %-8s %s\n", t.name.c_str(),
                  t.role == TensorRole::kIndex     ? "I32"
                  : t.role == TensorRole::kParam   ? "F32"
                  : t.format == WeightFormat::kFP8 ? "F8_E4M3"
                  : t.format == WeightFormat::kFP4 ? "FP4x2"
                                                   : "BF16",
                  shape_str(t.shape).c_str());
  }
  int64_t embed = 0, head = 0, total = 0, mtp_bytes = 0;
  std::vector<int64_t> layer(c.num_layers, 0);
  for (auto& t : ex) {
    int64_t b = expected_bytes(t);
    total += b;
    if (t.part == Part::kEmbed)
      embed += b;
    else if (t.part == Part::kLayer)
      layer[t.layer] += b;
    else if (t.part == Part::kMtp)
      mtp_bytes += b;
    else
      head += b;
  }
  std::printf(
      "\nweight memory (as held: matrices in their stored format, small parameters fp32):\n");
  std::printf("  embedding                 %s\n", human(embed).c_str());
  int64_t per_seq = 0, per_tok = 0;
  for (int l = 0; l < c.num_layers; ++l) {
    StateBytes sb = layer_state_bytes(c, l);
    per_seq += sb.per_sequence;
    per_tok += sb.per_token;
    std::printf("  layer %3d %-4s%-6s%s   state %s/seq + %" PRId64 " B/token\n", l,
                attn_kind_abbrev(c.attn_kinds[l]),
                c.mlp_kinds[l] == MlpKind::kHashMoe ? "+hash" : "", human(layer[l]).c_str(),
                human(sb.per_sequence).c_str(), sb.per_token);
  }
  std::printf("  hc_head + norm + head     %s\n", human(head).c_str());
  if (mtp) {
    // The MTP layer sits beside the head and embeds the next tokens itself: with more than one
    // stage the last one keeps its own copy of the embedding (docs/speculative.md says why).
    StateBytes sb = layer_state_bytes(c, c.num_layers);
    per_seq += sb.per_sequence;
    per_tok += sb.per_token;
    std::printf("  mtp layer (mtp.0.*)       %s   state %s/seq + %" PRId64 " B/token\n",
                human(mtp_bytes).c_str(), human(sb.per_sequence).c_str(), sb.per_token);
    std::printf("  embedding copy on the last stage (pipelines of 2+ stages): %s\n",
                human(embed).c_str());
  }
  std::printf("  total                     %s\n", human(total).c_str());
  std::printf("weights one decode token reads (batch 1, %d routed experts a layer): %.3f GB\n",
              c.experts_per_tok, decode_bytes_per_token(c) / 1e9);
  const int64_t S = f.i64("max-num-seqs"), Lm = f.i64("max-model-len");
  std::printf("sequence state (fp32 reference layout): %s per sequence + %" PRId64
              " B per token; at --max-num-seqs %" PRId64 " and --max-model-len %" PRId64 ": %s\n",
              human(per_seq).c_str(), per_tok, S, Lm, human(S * (per_seq + per_tok * Lm)).c_str());
  auto slots = prefix_cache_slots(f);
  if (!slots) return fail(slots.status());
  if (*slots > 0)
    std::printf("prefix cache: %d snapshot slots (--prefix-cache-slots) x %s per sequence: %s\n",
                *slots, human(per_seq).c_str(), human(int64_t{*slots} * per_seq).c_str());
  else
    std::printf("prefix cache: off\n");
  if (f.given("pp") || f.given("pp-partition")) return print_pipeline_plan(f, c);
  return 0;
}

}  // namespace
}  // namespace sp

// A function-try-block: an exception that escapes any command (out of memory, a thread that cannot
// start, a filesystem error) is a clean error with exit 2, never std::terminate.
int main(int argc, char** argv) try {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || args[0] == "--help" || args[0] == "-h" || args[0] == "help") {
    std::printf("%s", sp::kUsage);
    return args.empty() ? 2 : 0;
  }
  std::string cmd = args[0];
  args.erase(args.begin());
  if (cmd == "generate") return sp::cmd_generate(args);
  if (cmd == "verify") return sp::cmd_verify(args);
  if (cmd == "golden") return sp::cmd_golden(args);
  if (cmd == "inspect") return sp::cmd_inspect(args);
  if (cmd == "score") return sp::cmd_score(args);
  if (cmd == "tokenize") return sp::cmd_tokenize(args);
  if (cmd == "serve") {
#if SP_HAVE_SERVER
    return sp::cmd_serve(args);
#else
    std::fprintf(stderr,
                 "error: this seekpipe was built without the server (it needs PCRE2, "
                 "cpp-httplib and prometheus-cpp: libpcre2-dev libcpp-httplib-dev "
                 "prometheus-cpp-dev)\n");
    return 2;
#endif
  }
  if (cmd == "bench") {
    const std::string sub = args.empty() ? "" : args[0];
    if (sub != "serve" && sub != "offline") {
      std::fprintf(stderr,
                   "error: expected 'seekpipe bench serve [flags]' or 'seekpipe bench offline "
                   "[flags]', got '%s'\n",
                   sub.c_str());
      return 2;
    }
    args.erase(args.begin());
    if (sub == "offline") return sp::cmd_bench_offline(args);
#if SP_HAVE_SERVER
    return sp::cmd_bench_serve(args);
#else
    std::fprintf(stderr,
                 "error: this seekpipe was built without the server (bench serve needs "
                 "cpp-httplib: libcpp-httplib-dev); 'seekpipe bench offline' runs the same "
                 "workload without HTTP\n");
    return 2;
#endif
  }
  std::fprintf(stderr,
               "error: unknown command '%s'; expected generate, verify, golden, score, tokenize, "
               "serve, bench or inspect\n%s",
               cmd.c_str(), sp::kUsage);
  return 2;
} catch (const std::bad_alloc&) {
  std::fprintf(stderr,
               "error: out of memory; lower --max-model-len or --max-num-seqs, or check the "
               "model's sizes\n");
  return 2;
} catch (const std::exception& e) {
  std::fprintf(stderr, "error: %s\n", e.what());
  return 2;
} catch (...) {
  std::fprintf(stderr, "error: unexpected failure\n");
  return 2;
}
