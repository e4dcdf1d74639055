#include "tools/text_commands.h"

#include <algorithm>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "text/chat_format.h"
#include "text/chat_parse.h"
#include "tools/driver.h"
#if SP_HAVE_TOKENIZER
#include "text/tokenizer.h"
#endif

namespace sp {

using json = nlohmann::json;

FlagSpec add_bos_flag() {
  return {"add-bos",
          FlagKind::kString,
          "auto",
          "put BOS before each text: auto follows add_bos_token of the model's "
          "tokenizer_config.json (the demo models: yes; DeepSeek-V4's own: no, its chat encoder "
          "adds it)",
          -1e300,
          1e300,
          {"auto", "yes", "no"}};
}

std::string json_quoted(const std::string& s) {
  return json(s).dump(-1, ' ', false, json::error_handler_t::replace);
}

#if SP_HAVE_TOKENIZER

namespace {

class TokenizerText : public ModelText {
 public:
  std::unique_ptr<Tokenizer> tok;
  int32_t bos = -1;
  bool add_bos = false;
  Result<std::vector<int32_t>> encode(const std::string& text) const override {
    if (text.empty()) return Status::error("empty text: nothing to tokenize");
    SP_ASSIGN_OR_RETURN(std::vector<int32_t> ids, tok->encode(text));
    if (add_bos) ids.insert(ids.begin(), bos);
    return ids;
  }
  std::string decode(const std::vector<int32_t>& ids) const override {
    return tok->decode(ids, /*skip_special=*/true);
  }
  bool adds_bos() const override { return add_bos; }
  int32_t bos_id() const override { return bos; }
  const Tokenizer* tokenizer() const override { return tok.get(); }
};

}  // namespace

Result<std::unique_ptr<ModelText>> ModelText::open(const std::string& dir,
                                                   const std::string& add_bos) {
  auto t = std::make_unique<TokenizerText>();
  const std::string path = dir + "/tokenizer.json";
  if (!std::ifstream(path))
    return Status::error(str("cannot open ", path,
                             ": text prompts need the model's tokenizer.json beside config.json "
                             "(or give token ids with --prompt-ids)"));
  SP_ASSIGN_OR_RETURN(t->tok, Tokenizer::load(path));
  // tokenizer_config.json: add_bos_token and bos_token (a string or {"content": ...}).
  const std::string cpath = dir + "/tokenizer_config.json";
  json cfg = json::object();
  if (std::ifstream in(cpath); in) {
    try {
      cfg = json::parse(in);
    } catch (const json::exception& e) {
      return Status::error(str(cpath, ": not valid JSON: ", e.what()));
    }
    if (!cfg.is_object()) return Status::error(str(cpath, ": expected a JSON object"));
  }
  bool want = false;
  if (add_bos == "auto") {
    if (auto it = cfg.find("add_bos_token"); it != cfg.end() && !it->is_null()) {
      if (!it->is_boolean())
        return Status::error(
            str(cpath, ": field 'add_bos_token': expected true or false, got ", it->dump()));
      want = it->get<bool>();
    }
  } else {
    want = add_bos == "yes";
  }
  if (want) {
    std::string content;
    if (auto it = cfg.find("bos_token"); it != cfg.end()) {
      if (it->is_string())
        content = it->get<std::string>();
      else if (it->is_object() && it->contains("content") && (*it)["content"].is_string())
        content = (*it)["content"].get<std::string>();
      else
        return Status::error(str(cpath,
                                 ": field 'bos_token': expected a string or an object "
                                 "with a string 'content', got ",
                                 it->dump()));
    } else {
      return Status::error(
          str(cpath.c_str(), ": no 'bos_token' to put before the text (or pass --add-bos no)"));
    }
    auto id = t->tok->token_id(content);
    if (!id)
      return Status::error(
          str(cpath, ": bos_token ", json_quoted(content), " is not a token of ", path));
    t->bos = *id;
  }
  t->add_bos = want;
  return std::unique_ptr<ModelText>(std::move(t));
}

#else

Result<std::unique_ptr<ModelText>> ModelText::open(const std::string& dir, const std::string&) {
  return Status::error(
      str("seekpipe was built without PCRE2 (Debian's libpcre2-dev), so it has "
          "no tokenizer for ",
          dir,
          "/tokenizer.json; install libpcre2-dev and rebuild, or give "
          "token ids with --prompt-ids"));
}

#endif

std::string chat_reply_content(const std::string& generated) {
  return chat::parse_completion(generated, chat::ParseOptions{}).content;
}

Result<std::vector<std::vector<int32_t>>> encode_prompts(const Flags& f,
                                                         std::unique_ptr<ModelText>* text) {
  if (!f.given("model"))
    return Status::error("--model is required: a DeepSeek-V4 model directory with config.json");
  SP_ASSIGN_OR_RETURN(*text, ModelText::open(f.str("model"), f.str("add-bos")));
  std::vector<std::vector<int32_t>> out;
  const auto prompts = f.strings("prompt");
  for (size_t i = 0; i < prompts.size(); ++i) {
    if (f.given("chat") && f.boolean("chat")) {
      // The chat format renders BOS itself: tokenize the rendered text as it is.
      chat::Json messages = chat::Json::array({{{"role", "user"}, {"content", prompts[i]}}});
      auto rendered = chat::encode_chat(messages, chat::Json::array(), chat::ChatOptions{});
      if (!rendered) return Status::error(str("--prompt ", i, ": ", rendered.status().message()));
#if SP_HAVE_TOKENIZER
      if (!(*text)->tokenizer())
        return Status::error("--chat: this seekpipe was built without the tokenizer (PCRE2)");
      auto ids = (*text)->tokenizer()->encode(*rendered);
      if (!ids) return Status::error(str("--prompt ", i, ": ", ids.status().message()));
      out.push_back(std::move(*ids));
      continue;
#else
      return Status::error("--chat: this seekpipe was built without the tokenizer (PCRE2)");
#endif
    }
    auto ids = (*text)->encode(prompts[i]);
    if (!ids) return Status::error(str("--prompt ", i, ": ", ids.status().message()));
    if (ids->empty())
      return Status::error(str("--prompt ", i, ": ", json_quoted(prompts[i]), " gives no tokens"));
    out.push_back(std::move(*ids));
  }
  return out;
}

namespace {

// Index of the largest logit, ties to the lower id (as the reference top-1 was computed).
int32_t top1_of(const float* v, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i)
    if (v[i] > v[best]) best = i;
  return static_cast<int32_t>(best);
}

struct ScoreText {
  int64_t line = 0;
  std::vector<int32_t> ids;
};

// Reads the JSONL and tokenizes each text: BOS (per the rule), first `max_tokens` tokens.
Result<std::vector<ScoreText>> read_texts(const std::string& path, const std::string& field,
                                          int64_t max_tokens, const ModelText& text) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status::error(str("--data: cannot open ", path));
  std::vector<ScoreText> out;
  std::string line;
  for (int64_t n = 1; std::getline(in, line); ++n) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") == std::string::npos) continue;  // blank lines
    const std::string where = str(path, " line ", n);
    json obj;
    try {
      obj = json::parse(line);
    } catch (const json::exception& e) {
      return Status::error(str(where, ": not valid JSON: ", e.what()));
    }
    if (!obj.is_object()) return Status::error(str(where, ": expected a JSON object"));
    auto it = obj.find(field);
    if (it == obj.end())
      return Status::error(str(where, ": no field '", field, "' (choose it with --field)"));
    if (!it->is_string())
      return Status::error(
          str(where, ": field '", field, "' must be a string, got ", it->type_name()));
    auto ids = text.encode(it->get<std::string>());
    if (!ids) return Status::error(str(where, ": ", ids.status().message()));
    if (static_cast<int64_t>(ids->size()) > max_tokens) ids->resize(max_tokens);
    if (ids->size() < 2)
      return Status::error(str(where, ": the text gives ", ids->size(),
                               " token(s); at least 2 are needed to predict one"));
    out.push_back({n, std::move(*ids)});
  }
  if (out.empty()) return Status::error(str("--data: ", path, " has no texts"));
  return out;
}

}  // namespace

int cmd_score(const std::vector<std::string>& args) {
  auto specs = common_flags();
  for (auto& p : pipeline_flags()) specs.push_back(p);
  specs.push_back({"data", FlagKind::kString, "",
                   "JSONL file, one JSON object per line with the text to score (required)"});
  specs.push_back({"field", FlagKind::kString, "text", "the field of each line that is scored"});
  specs.push_back({"max-tokens-per-text", FlagKind::kInt, "512",
                   "score only the first N tokens of each text (BOS included)", 2, 1 << 30});
  specs.push_back(add_bos_flag());
  Flags f(specs);
  for (auto& a : args)
    if (a == "--help" || a == "-h") {
      std::printf(
          "usage: seekpipe score --model DIR --data FILE.jsonl [flags]\n"
          "Teacher-forced mean negative log-likelihood of each next token, perplexity and top-1 "
          "accuracy over the texts (log-softmax in double on the host).\n%s",
          f.help().c_str());
      return 0;
    }
  if (Status st = f.parse(args); !st) return fail(st);
  if (!f.given("model"))
    return fail(Status::error("--model is required: a DeepSeek-V4 model directory"));
  if (!f.given("data"))
    return fail(Status::error("--data is required: a JSONL file with a text per line"));
  auto text = ModelText::open(f.str("model"), f.str("add-bos"));
  if (!text) return fail(text.status());
  auto texts = read_texts(f.str("data"), f.str("field"), f.i64("max-tokens-per-text"), **text);
  if (!texts) return fail(texts.status());
  auto cfg = read_config(f);
  if (!cfg) return fail(cfg.status());
  const int64_t V = cfg->vocab_size;
  // Per text and position: NLL of the next token and whether it was the argmax. Summed in order
  // at the end, so every split and schedule gives the same bits.
  std::vector<std::vector<double>> nll(texts->size());
  std::vector<std::vector<uint8_t>> hit(texts->size());
  int64_t through = 0;
  for (auto& t : *texts) through += static_cast<int64_t>(t.ids.size());
  Job job;
  job.max_logit_rows = static_cast<int>(f.i64("max-num-batched-tokens"));
  job.add_requests = [&](Scheduler& sched) -> Status {
    for (size_t i = 0; i < texts->size(); ++i) {
      Request r;
      r.id = static_cast<int64_t>(i);
      r.prompt = (*texts)[i].ids;
      r.all_logits = true;
      r.max_new_tokens = 0;
      Status st = sched.add(std::move(r));
      if (!st)
        return Status::error(str(f.str("data"), " line ", (*texts)[i].line, ": ", st.message()));
    }
    return Status::ok();
  };
  job.hooks = [&](const StageEnv& env) {
    StageHooks h;
    if (env.topo.is_last(env.stage)) {
      for (size_t i = 0; i < texts->size(); ++i) {
        nll[i].assign((*texts)[i].ids.size() - 1, 0.0);
        hit[i].assign((*texts)[i].ids.size() - 1, 0);
      }
      h.on_logits = [&](int64_t req, int64_t pos, const float* l) {
        const auto& ids = (*texts)[req].ids;
        if (pos + 1 >= static_cast<int64_t>(ids.size())) return;
        const int32_t target = ids[pos + 1];
        const int32_t best = top1_of(l, V);
        double mx = l[best], sum = 0;
        for (int64_t v = 0; v < V; ++v) sum += std::exp(static_cast<double>(l[v]) - mx);
        nll[req][pos] = mx + std::log(sum) - static_cast<double>(l[target]);
        hit[req][pos] = best == target;
      };
    }
    return h;
  };
  job.finish = [&](const StageEnv& env, const std::vector<StageReport>& reports) -> int {
    if (!env.topo.is_last(env.stage)) return 0;
    double total = 0;
    int64_t count = 0, correct = 0;
    for (size_t i = 0; i < nll.size(); ++i)
      for (size_t p = 0; p < nll[i].size(); ++p) {
        total += nll[i][p];
        correct += hit[i][p];
        ++count;
      }
    double wall = 0;
    for (auto& r : reports) wall = std::max(wall, r.wall_s);
    const double loss = total / static_cast<double>(count);
    std::printf("scored %zu texts (%s, field '%s', first %" PRId64 " tokens%s): %" PRId64
                " predicted tokens, %" PRId64 " tokens through the model\n",
                texts->size(), f.str("data").c_str(), f.str("field").c_str(),
                f.i64("max-tokens-per-text"), (*text)->adds_bos() ? ", BOS first" : "", count,
                through);
    std::printf("%" PRId64 " steps, %.3f s, %.1f tokens/s\n", reports.back().steps, wall,
                static_cast<double>(through) / std::max(wall, 1e-9));
    std::printf("loss %.8f  perplexity %.6f  top1 %.8f\n", loss, std::exp(loss),
                static_cast<double>(correct) / static_cast<double>(count));
    if (f.given("trace")) {
      if (Status st = write_chrome_trace(f.str("trace"), reports); !st) return fail(st);
      std::printf("trace written to %s\n", f.str("trace").c_str());
    }
    return 0;
  };
  return run_job(f, job);
}

int cmd_tokenize(const std::vector<std::string>& args) {
  std::vector<FlagSpec> specs = {
      {"model", FlagKind::kString, "", "model directory with tokenizer.json (required)"},
      {"text", FlagKind::kString, "", "text to tokenize; repeatable", -1e300, 1e300, {}, true},
      {"ids",
       FlagKind::kIntList,
       "",
       "token ids to decode instead; repeatable",
       -1e300,
       1e300,
       {},
       true},
      add_bos_flag(),
  };
  Flags f(specs);
  for (auto& a : args)
    if (a == "--help" || a == "-h") {
      std::printf("usage: seekpipe tokenize --model DIR (--text TEXT | --ids 1,2,3)\n%s",
                  f.help().c_str());
      return 0;
    }
  if (Status st = f.parse(args); !st) return fail(st);
  if (!f.given("model")) return fail(Status::error("--model is required: a model directory"));
  if (f.given("text") == f.given("ids"))
    return fail(Status::error("give either --text or --ids (one of them)"));
  auto text = ModelText::open(f.str("model"), f.str("add-bos"));
  if (!text) return fail(text.status());
  for (const std::string& t : f.strings("text")) {
    auto ids = (*text)->encode(t);
    if (!ids) return fail(ids.status());
    std::printf("%zu tokens:", ids->size());
    for (int32_t id : *ids) std::printf(" %d", id);
    std::printf("\n");
  }
  for (const auto& ids : f.int_lists("ids"))
    std::printf("%s\n", json_quoted((*text)->decode(ids)).c_str());
  return 0;
}

}  // namespace sp
