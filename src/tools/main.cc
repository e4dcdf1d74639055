// seekpipe command-line entry points: generate, verify, inspect.
#include <unistd.h>

#include <chrono>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <map>
#include <thread>

#include "engine/engine.h"
#include "model/model.h"
#include "model/safetensors.h"
#include "tools/flags.h"

namespace sp {
namespace {

constexpr const char* kUsage =
    "seekpipe: DeepSeek-V4 inference engine\n"
    "usage: seekpipe COMMAND [flags]\n"
    "commands:\n"
    "  generate   prefill prompts given as token ids and decode new tokens\n"
    "  verify     check the model against a golden file (prefill/decode logits, hidden states)\n"
    "  inspect    print the parsed config, the tensor table and the memory each part needs\n"
    "run 'seekpipe COMMAND --help' for the flags of a command\n";

std::vector<FlagSpec> common_flags() {
  int hw = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  return {
      {"model", FlagKind::kString, "", "model directory: config.json plus safetensors weights (required)"},
      {"load-format", FlagKind::kString, "auto", "auto/safetensors: read the checkpoint; dummy: generate weights of the config's shapes and formats from --seed",
       -1e300, 1e300, {"auto", "safetensors", "dummy"}},
      {"seed", FlagKind::kInt, "0", "seed for --load-format dummy weights and for sampling", 0, 9.2e18},
      {"threads", FlagKind::kInt, std::to_string(hw), "CPU threads", 1, 1024},
      {"max-num-seqs", FlagKind::kInt, "16", "most sequences in a step (state is sized for this many)", 1, 65536},
      {"max-num-batched-tokens", FlagKind::kInt, "2048", "most tokens in a step; longer prompts are prefilled in chunks", 1, 1 << 24},
      {"max-model-len", FlagKind::kInt, "4096", "longest sequence (prompt + output) in tokens; state is sized for it", 1, 1 << 30},
      {"verbose", FlagKind::kBool, "", "also print config keys the model does not use"},
  };
}

struct Setup {
  Config config;
  std::unique_ptr<ModelWeights> weights;
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Model> model;
};

ProgressFn progress_printer() {
  auto last = std::make_shared<int>(-1);
  return [last](int64_t done, int64_t total) {
    if (total < (int64_t{256} << 20)) return;  // small checkpoints load instantly
    int pct = static_cast<int>(100 * done / std::max<int64_t>(total, 1));
    if (pct / 10 != *last / 10 || done == total) {
      *last = pct;
      std::fprintf(stderr, "loading weights: %3d%% (%.2f / %.2f GB)\n", pct, done / 1e9, total / 1e9);
    }
  };
}

Result<Config> read_config(const Flags& f) {
  if (!f.given("model")) return Status::error("--model is required: a DeepSeek-V4 model directory with config.json");
  SP_ASSIGN_OR_RETURN(Config c, load_config(f.str("model")));
  if (f.boolean("verbose") && !c.ignored_keys.empty()) {
    std::string keys;
    for (auto& k : c.ignored_keys) keys += " " + k;
    std::printf("config keys not used by the model:%s\n", keys.c_str());
  }
  return c;
}

Result<std::unique_ptr<ModelWeights>> read_weights(const Flags& f, const Config& c, const LoadPlan& plan) {
  if (f.str("load-format") == "dummy")
    return dummy_weights(c, plan, static_cast<uint64_t>(f.i64("seed")), progress_printer());
  return load_weights(c, f.str("model"), plan, progress_printer());
}

void print_load_summary(const ModelWeights& w, const Flags& f) {
  const LoadStats& s = w.stats;
  std::printf("loaded %" PRId64 " tensors, %.3f GB (%s) in %.2f s\n", s.tensors, s.bytes / 1e9,
              f.str("load-format") == "dummy" ? "dummy weights" : f.str("model").c_str(), s.seconds);
  if (!s.mtp_tensors.empty())
    std::printf("checkpoint has %zu mtp.* tensors (MTP draft layer): accepted, not used yet\n", s.mtp_tensors.size());
}

Result<Setup> build(const Flags& f, int max_logit_rows) {
  Setup s;
  SP_ASSIGN_OR_RETURN(s.config, read_config(f));
  SP_ASSIGN_OR_RETURN(s.weights, read_weights(f, s.config, LoadPlan::whole(s.config)));
  print_load_summary(*s.weights, f);
  s.backend = make_cpu_backend(static_cast<int>(f.i64("threads")));
  StateLimits lim;
  lim.max_num_seqs = static_cast<int>(f.i64("max-num-seqs"));
  lim.max_model_len = f.i64("max-model-len");
  lim.max_num_batched_tokens = static_cast<int>(f.i64("max-num-batched-tokens"));
  lim.max_logit_rows = max_logit_rows > 0 ? max_logit_rows : lim.max_num_seqs;
  s.model = std::make_unique<Model>(s.config, *s.weights, *s.backend, lim);
  return s;
}

SchedulerLimits scheduler_limits(const Flags& f, const Config& c) {
  return {static_cast<int>(f.i64("max-num-seqs")), static_cast<int>(f.i64("max-num-batched-tokens")),
          f.i64("max-model-len"), c.vocab_size};
}

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

int fail(const Status& s) {
  std::fprintf(stderr, "error: %s\n", s.message().c_str());
  return 2;
}

int cmd_generate(const std::vector<std::string>& args) {
  auto specs = common_flags();
  specs.push_back({"prompt-ids", FlagKind::kIntList, "", "prompt as comma-separated token ids; repeat for several prompts (required)",
                   -1e300, 1e300, {}, true});
  specs.push_back({"max-tokens", FlagKind::kInt, "16", "new tokens to generate per prompt", 0, 1 << 30});
  specs.push_back({"temperature", FlagKind::kFloat, "0", "sampling temperature; 0 is greedy", 0, 100});
  specs.push_back({"top-k", FlagKind::kInt, "0", "sample from the k most likely tokens; 0 for all", 0, 1 << 30});
  specs.push_back({"top-p", FlagKind::kFloat, "1", "sample from the smallest set with this much probability", 1e-9, 1});
  specs.push_back({"ignore-eos", FlagKind::kBool, "", "keep generating after the end-of-sequence token"});
  Flags f(specs);
  for (auto& a : args)
    if (a == "--help" || a == "-h") {
      std::printf("usage: seekpipe generate --model DIR --prompt-ids 1,2,3 [flags]\n%s", f.help().c_str());
      return 0;
    }
  if (Status st = f.parse(args); !st) return fail(st);
  if (!f.given("prompt-ids")) return fail(Status::error("--prompt-ids is required: comma-separated token ids, e.g. --prompt-ids 1,2,3"));
  auto setup = build(f, 0);
  if (!setup) return fail(setup.status());
  Engine engine(*setup->model, scheduler_limits(f, setup->config));
  auto prompts = f.int_lists("prompt-ids");
  for (size_t i = 0; i < prompts.size(); ++i) {
    Request r;
    r.id = static_cast<int64_t>(i);
    r.prompt = prompts[i];
    r.max_new_tokens = static_cast<int>(f.i64("max-tokens"));
    r.sampling = {static_cast<float>(f.f64("temperature")), static_cast<int>(f.i64("top-k")),
                  static_cast<float>(f.f64("top-p")), static_cast<uint64_t>(f.i64("seed")), f.boolean("ignore-eos")};
    if (Status st = engine.scheduler().add(std::move(r)); !st) return fail(st);
  }
  std::map<int64_t, std::map<int64_t, std::vector<float>>> logits;
  const int64_t V = setup->config.vocab_size;
  RunStats rs = engine.run([&](const Sequence& s, int64_t pos, const float* l) {
    logits[s.req.id][pos].assign(l, l + V);
  });
  LogitsHash hash;
  std::map<int64_t, const Sequence*> done;
  for (auto& s : engine.scheduler().finished()) done[s->req.id] = s.get();
  int64_t generated = 0;
  for (auto& [id, s] : done) {
    std::printf("prompt %" PRId64 " output ids:", id);
    for (size_t i = s->prompt_len(); i < s->tokens.size(); ++i) std::printf(" %d", s->tokens[i]);
    std::printf("  (%s)\n", s->finish == FinishReason::kStop ? "stop: eos" : "length");
    generated += s->generated;
    for (auto& [pos, v] : logits[id]) hash.add(v.data(), V);
  }
  std::printf("generated %" PRId64 " tokens in %" PRId64 " steps, %.3f s (%.1f tokens/s incl. prefill of %" PRId64 ")\n",
              generated, rs.steps, rs.seconds, rs.tokens / std::max(rs.seconds, 1e-9), rs.tokens);
  std::printf("logits_hash=%016" PRIx64 "\n", hash.h);
  return 0;
}

struct GoldenPrompt {
  std::vector<int32_t> ids, greedy;
  const float* prefill = nullptr;  // [L, V]
  const float* decode = nullptr;   // [G, V]
};

Result<std::vector<GoldenPrompt>> read_golden(const SafetensorsFile& g, const Config& c) {
  std::vector<GoldenPrompt> out;
  auto ints = [&](const TensorInfo& t) {
    std::vector<int32_t> v(static_cast<size_t>(t.numel()));
    for (int64_t i = 0; i < t.numel(); ++i) {
      int64_t x;
      if (t.dtype == DType::kI64) std::memcpy(&x, t.data + 8 * i, 8);
      else { int32_t y; std::memcpy(&y, t.data + 4 * i, 4); x = y; }
      v[i] = static_cast<int32_t>(x);
    }
    return v;
  };
  for (int i = 0;; ++i) {
    auto it = g.tensors().find(str("p", i, ".input_ids"));
    if (it == g.tensors().end()) break;
    GoldenPrompt p;
    p.ids = ints(it->second);
    auto need = [&](const std::string& name, std::vector<int64_t> shape) -> Result<const TensorInfo*> {
      auto jt = g.tensors().find(name);
      if (jt == g.tensors().end()) return Status::error(str("golden file: missing tensor ", name));
      if (jt->second.dtype != DType::kF32 && shape.size() == 2)
        return Status::error(str("golden file: ", name, ": expected F32"));
      if (!shape.empty() && jt->second.shape != shape)
        return Status::error(str("golden file: ", name, ": expected shape ", shape_str(shape), ", got ", shape_str(jt->second.shape)));
      return &jt->second;
    };
    const int64_t L = static_cast<int64_t>(p.ids.size());
    SP_ASSIGN_OR_RETURN(const TensorInfo* pl, need(str("p", i, ".prefill_logits"), {L, c.vocab_size}));
    SP_ASSIGN_OR_RETURN(const TensorInfo* gt, need(str("p", i, ".greedy_tokens"), {}));
    p.greedy = ints(*gt);
    SP_ASSIGN_OR_RETURN(const TensorInfo* dl, need(str("p", i, ".decode_logits"), {static_cast<int64_t>(p.greedy.size()), c.vocab_size}));
    p.prefill = reinterpret_cast<const float*>(pl->data);
    p.decode = reinterpret_cast<const float*>(dl->data);
    out.push_back(std::move(p));
  }
  if (out.empty()) return Status::error("golden file has no prompts: expected tensors p0.input_ids, p0.prefill_logits, ...");
  return out;
}

int cmd_verify(const std::vector<std::string>& args) {
  auto specs = common_flags();
  specs.push_back({"golden", FlagKind::kString, "", "golden file in the fixtures' format (required)"});
  specs.push_back({"atol", FlagKind::kFloat, "5e-5", "largest allowed absolute error of any logit or hidden value", 0, 1e30});
  Flags f(specs);
  for (auto& a : args)
    if (a == "--help" || a == "-h") {
      std::printf("usage: seekpipe verify --model DIR --golden FILE [flags]\n%s", f.help().c_str());
      return 0;
    }
  if (Status st = f.parse(args); !st) return fail(st);
  if (!f.given("golden")) return fail(Status::error("--golden is required: a golden.safetensors file"));
  auto gfile = SafetensorsFile::open(f.str("golden"));
  if (!gfile) return fail(gfile.status());
  auto cfg = read_config(f);
  if (!cfg) return fail(cfg.status());
  auto golden = read_golden(**gfile, *cfg);
  if (!golden) return fail(golden.status());
  auto setup = build(f, static_cast<int>(f.i64("max-num-batched-tokens")));
  if (!setup) return fail(setup.status());
  const Config& c = setup->config;
  const int64_t V = c.vocab_size, hcD = c.hc_dim();
  Engine engine(*setup->model, scheduler_limits(f, c));
  std::vector<std::vector<float>> logits(golden->size());
  for (size_t i = 0; i < golden->size(); ++i) {
    const GoldenPrompt& g = (*golden)[i];
    Request r;
    r.id = static_cast<int64_t>(i);
    r.prompt = g.ids;
    r.forced.assign(g.greedy.begin(), g.greedy.end() - (g.greedy.empty() ? 0 : 1));
    r.all_logits = true;
    r.max_new_tokens = 0;
    logits[i].assign((g.ids.size() + r.forced.size()) * V, 0.0f);
    if (Status st = engine.scheduler().add(std::move(r)); !st) return fail(st);
  }
  // Per-layer hidden states of prompt 0, where the golden file has them.
  std::vector<const float*> hidden(c.num_layers, nullptr);
  for (int l = 0; l < c.num_layers; ++l) {
    auto it = (*gfile)->tensors().find(str("p0.layer", l, ".hidden"));
    if (it != (*gfile)->tensors().end() && it->second.dtype == DType::kF32 &&
        it->second.shape == std::vector<int64_t>{static_cast<int64_t>((*golden)[0].ids.size()), c.hc_mult, c.hidden_size})
      hidden[l] = reinterpret_cast<const float*>(it->second.data);
  }
  double hidden_err = 0;
  int hidden_layers = 0;
  for (auto* h : hidden) hidden_layers += h != nullptr;
  std::vector<float> row(static_cast<size_t>(hcD));
  auto hook = [&](const StepPlan& plan, int layer, Tensor X) {
    if (!hidden[layer]) return;
    for (size_t ci = 0; ci < plan.seqs.size(); ++ci) {
      if (plan.seqs[ci]->req.id != 0) continue;
      const SeqChunk& ch = plan.batch.chunks[ci];
      for (int i = 0; i < ch.n_tokens; ++i) {
        const int64_t pos = ch.start_pos + i;
        if (pos >= static_cast<int64_t>((*golden)[0].ids.size())) continue;
        setup->backend->to_host(X.slice_rows(ch.offset + i, 1), row.data());
        for (int64_t k = 0; k < hcD; ++k)
          hidden_err = std::max(hidden_err, static_cast<double>(std::fabs(row[k] - hidden[layer][pos * hcD + k])));
      }
    }
  };
  RunStats rs = engine.run(
      [&](const Sequence& s, int64_t pos, const float* l) {
        std::memcpy(&logits[s.req.id][pos * V], l, V * sizeof(float));
      },
      hook);
  const double atol = f.f64("atol");
  bool ok = true;
  LogitsHash hash;
  for (size_t i = 0; i < golden->size(); ++i) {
    const GoldenPrompt& g = (*golden)[i];
    const int64_t L = static_cast<int64_t>(g.ids.size()), G = static_cast<int64_t>(g.greedy.size());
    double pe = 0, de = 0;
    for (int64_t k = 0; k < L * V; ++k) pe = std::max(pe, static_cast<double>(std::fabs(logits[i][k] - g.prefill[k])));
    for (int64_t j = 0; j < G; ++j)
      for (int64_t v = 0; v < V; ++v)
        de = std::max(de, static_cast<double>(std::fabs(logits[i][(L - 1 + j) * V + v] - g.decode[j * V + v])));
    std::printf("prompt %zu (%" PRId64 " tokens, %" PRId64 " teacher-forced decode steps): prefill_logits max_abs_err %.3e, decode_logits max_abs_err %.3e",
                i, L, G, pe, de);
    if (i == 0 && hidden_layers) std::printf(", hidden (%d layers) max_abs_err %.3e", hidden_layers, hidden_err);
    std::printf("\n");
    ok &= pe <= atol && de <= atol && (i != 0 || hidden_err <= atol);
    hash.add(logits[i].data(), static_cast<int64_t>(logits[i].size()));
  }
  std::printf("%" PRId64 " steps, %" PRId64 " tokens, %.3f s\n", rs.steps, rs.tokens, rs.seconds);
  std::printf("logits_hash=%016" PRIx64 "\n", hash.h);
  std::printf("verify: %s (atol %.1e)\n", ok ? "PASS" : "FAIL", atol);
  return ok ? 0 : 1;
}

std::string human(int64_t b) {
  char buf[64];
  if (b >= (int64_t{1} << 30)) std::snprintf(buf, sizeof buf, "%.2f GiB", b / 1073741824.0);
  else if (b >= (1 << 20)) std::snprintf(buf, sizeof buf, "%.2f MiB", b / 1048576.0);
  else std::snprintf(buf, sizeof buf, "%.1f KiB", b / 1024.0);
  return buf;
}

int cmd_inspect(const std::vector<std::string>& args) {
  Flags f(common_flags());
  for (auto& a : args)
    if (a == "--help" || a == "-h") {
      std::printf("usage: seekpipe inspect --model DIR [flags]\n%s", f.help().c_str());
      return 0;
    }
  if (Status st = f.parse(args); !st) return fail(st);
  auto cfg = read_config(f);
  if (!cfg) return fail(cfg.status());
  const Config& c = *cfg;
  std::printf("%s", describe_config(c).c_str());
  const auto ex = expected_tensors(c);
  std::printf("\ntensors (%zu in the main model):\n", ex.size());
  std::unique_ptr<Checkpoint> ck;
  if (f.str("load-format") != "dummy") {
    auto r = Checkpoint::open(f.str("model"));
    if (!r) return fail(r.status());
    ck = std::move(r.value());
    for (auto& [name, t] : ck->all())
      std::printf("  %-60s %-8s %s\n", name.c_str(), dtype_name(t->dtype), shape_str(t->shape).c_str());
  } else {
    for (auto& t : ex)
      std::printf("  %-60s %-8s %s\n", t.name.c_str(),
                  t.role == TensorRole::kIndex ? "I32" : t.role == TensorRole::kParam ? "F32"
                  : t.format == WeightFormat::kFP8 ? "F8_E4M3" : t.format == WeightFormat::kFP4 ? "FP4x2" : "BF16",
                  shape_str(t.shape).c_str());
  }
  int64_t embed = 0, head = 0, total = 0;
  std::vector<int64_t> layer(c.num_layers, 0);
  for (auto& t : ex) {
    int64_t b = expected_bytes(t);
    total += b;
    if (t.part == Part::kEmbed) embed += b;
    else if (t.part == Part::kLayer) layer[t.layer] += b;
    else head += b;
  }
  std::printf("\nweight memory (as held: matrices in their stored format, small parameters fp32):\n");
  std::printf("  embedding                 %s\n", human(embed).c_str());
  for (int l = 0; l < c.num_layers; ++l) {
    StateBytes sb = layer_state_bytes(c, l);
    std::printf("  layer %3d %-4s%-6s%s   state %s/seq + %" PRId64 " B/token\n", l,
                c.attn_kinds[l] == AttnKind::kSliding ? "SWA" : c.attn_kinds[l] == AttnKind::kCSA ? "CSA" : "HCA",
                c.mlp_kinds[l] == MlpKind::kHashMoe ? "+hash" : "", human(layer[l]).c_str(), human(sb.per_sequence).c_str(),
                sb.per_token);
  }
  std::printf("  hc_head + norm + head     %s\n", human(head).c_str());
  std::printf("  total                     %s\n", human(total).c_str());
  int64_t per_seq = 0, per_tok = 0;
  for (int l = 0; l < c.num_layers; ++l) {
    per_seq += layer_state_bytes(c, l).per_sequence;
    per_tok += layer_state_bytes(c, l).per_token;
  }
  const int64_t S = f.i64("max-num-seqs"), Lm = f.i64("max-model-len");
  std::printf("sequence state (fp32 reference layout): %s per sequence + %" PRId64 " B per token; at --max-num-seqs %" PRId64
              " and --max-model-len %" PRId64 ": %s\n",
              human(per_seq).c_str(), per_tok, S, Lm, human(S * (per_seq + per_tok * Lm)).c_str());
  return 0;
}

}  // namespace
}  // namespace sp

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || args[0] == "--help" || args[0] == "-h" || args[0] == "help") {
    std::printf("%s", sp::kUsage);
    return args.empty() ? 2 : 0;
  }
  std::string cmd = args[0];
  args.erase(args.begin());
  if (cmd == "generate") return sp::cmd_generate(args);
  if (cmd == "verify") return sp::cmd_verify(args);
  if (cmd == "inspect") return sp::cmd_inspect(args);
  std::fprintf(stderr, "error: unknown command '%s'; expected generate, verify or inspect\n%s", cmd.c_str(), sp::kUsage);
  return 2;
}
