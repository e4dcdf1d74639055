#include "server/api.h"

#include <cmath>

namespace sp::server {

Json error_body(const ApiError& e) {
  Json err = Json::object();
  err["message"] = e.message;
  err["type"] = e.type;
  err["param"] = e.param.empty() ? Json() : Json(e.param);
  err["code"] = e.code.empty() ? Json() : Json(e.code);
  return Json{{"error", err}};
}

namespace {

ApiError bad(const std::string& param, const std::string& message,
             const std::string& code = "invalid_value") {
  ApiError e;
  e.param = param;
  e.message = message;
  e.code = code;
  return e;
}

std::string type_name(const Json& v) {
  if (v.is_number_integer()) return "integer";
  if (v.is_number()) return "number";
  return v.type_name();
}

// A number field within [lo, hi] (or absent). `integer`: whole numbers only.
std::optional<ApiError> number(const Json& body, const char* key, double lo, double hi,
                               bool integer, double* out) {
  auto it = body.find(key);
  if (it == body.end() || it->is_null()) return std::nullopt;
  if (!it->is_number() || it->is_boolean() || (integer && !it->is_number_integer()))
    return bad(
        key,
        str("'", key, "' must be ", integer ? "an integer" : "a number", ", got ", type_name(*it)),
        "invalid_type");
  const double v = it->get<double>();
  if (!(v >= lo && v <= hi))
    return bad(key, str("'", key, "' must be between ", lo, " and ", hi, ", got ", it->dump()));
  *out = v;
  return std::nullopt;
}

std::optional<ApiError> boolean(const Json& body, const char* key, bool* out) {
  auto it = body.find(key);
  if (it == body.end() || it->is_null()) return std::nullopt;
  if (!it->is_boolean())
    return bad(key, str("'", key, "' must be a boolean, got ", type_name(*it)), "invalid_type");
  *out = it->get<bool>();
  return std::nullopt;
}

std::optional<ApiError> token_list(const Json& v, const std::string& param, int64_t vocab,
                                   std::vector<int32_t>* out) {
  for (size_t i = 0; i < v.size(); ++i) {
    if (!v[i].is_number_integer())
      return bad(
          param,
          str("'", param, "' must hold token ids (integers); item ", i, " is ", type_name(v[i])),
          "invalid_type");
    const int64_t id = v[i].get<int64_t>();
    if (id < 0 || id >= vocab)
      return bad(param, str("'", param, "' item ", i, ": token id ", id,
                            " is outside the vocabulary [0, ", vocab, ")"));
    out->push_back(static_cast<int32_t>(id));
  }
  return std::nullopt;
}

std::optional<ApiError> parse_sampling(const Json& b, const ServeLimits& lim, uint64_t seed,
                                       GenRequest* r) {
  double v = 0;
  SamplingParams& s = r->sampling;
  s.temperature = 1.0f;  // OpenAI's default
  if (auto e = number(b, "temperature", 0, 2, false, &(v = 1))) return e;
  s.temperature = static_cast<float>(v);
  if (auto e = number(b, "top_p", 0, 1, false, &(v = 1))) return e;
  if (v <= 0) return bad("top_p", "'top_p' must be in (0, 1], got 0");
  s.top_p = static_cast<float>(v);
  if (auto e = number(b, "top_k", -1, 1e9, true, &(v = 0))) return e;
  s.top_k = v < 0 ? 0 : static_cast<int>(v);
  if (auto e = number(b, "min_p", 0, 1, false, &(v = 0))) return e;
  s.min_p = static_cast<float>(v);
  if (auto e = number(b, "presence_penalty", -2, 2, false, &(v = 0))) return e;
  s.presence_penalty = static_cast<float>(v);
  if (auto e = number(b, "frequency_penalty", -2, 2, false, &(v = 0))) return e;
  s.frequency_penalty = static_cast<float>(v);
  if (auto e = number(b, "repetition_penalty", 0, 100, false, &(v = 1))) return e;
  if (v <= 0) return bad("repetition_penalty", "'repetition_penalty' must be > 0, got 0");
  s.repetition_penalty = static_cast<float>(v);
  s.seed = seed;
  if (auto e = number(b, "seed", -9.2e18, 9.2e18, true, &(v = 0))) return e;
  if (b.contains("seed") && !b["seed"].is_null())
    s.seed = static_cast<uint64_t>(b["seed"].get<int64_t>());
  if (auto e = boolean(b, "ignore_eos", &s.ignore_eos)) return e;
  if (auto e = number(b, "n", 1, lim.max_n, true, &(v = 1))) return e;
  r->n = static_cast<int>(v);
  // Stop strings: a string or a list of non-empty strings.
  if (auto it = b.find("stop"); it != b.end() && !it->is_null()) {
    if (it->is_string()) {
      r->stop.push_back(it->get<std::string>());
    } else if (it->is_array()) {
      for (auto& x : *it) {
        if (!x.is_string())
          return bad("stop", "'stop' must be a string or a list of strings", "invalid_type");
        r->stop.push_back(x.get<std::string>());
      }
    } else {
      return bad("stop", "'stop' must be a string or a list of strings, got " + type_name(*it),
                 "invalid_type");
    }
    for (auto& x : r->stop)
      if (x.empty()) return bad("stop", "'stop' strings must not be empty");
  }
  if (auto it = b.find("stop_token_ids"); it != b.end() && !it->is_null()) {
    if (!it->is_array())
      return bad("stop_token_ids", "'stop_token_ids' must be a list of token ids", "invalid_type");
    if (auto e = token_list(*it, "stop_token_ids", lim.vocab_size, &r->stop_token_ids)) return e;
  }
  if (auto e = boolean(b, "stream", &r->stream)) return e;
  if (auto it = b.find("stream_options"); it != b.end() && !it->is_null()) {
    if (!it->is_object())
      return bad("stream_options", "'stream_options' must be an object", "invalid_type");
    if (!r->stream)
      return bad("stream_options", "'stream_options' is only allowed when 'stream' is true");
    if (auto e = boolean(*it, "include_usage", &r->include_usage)) {
      e->param = "stream_options.include_usage";
      return e;
    }
  }
  // logprobs: an integer 0..20 for completions; a boolean plus top_logprobs for chat.
  if (r->chat) {
    bool want = false;
    if (auto e = boolean(b, "logprobs", &want)) return e;
    if (auto e = number(b, "top_logprobs", 0, kMaxTopLogprobs, true, &(v = 0))) return e;
    if (b.contains("top_logprobs") && !b["top_logprobs"].is_null() && !want)
      return bad("top_logprobs", "'top_logprobs' needs 'logprobs': true");
    r->logprobs = want ? static_cast<int>(v) : -1;
  } else {
    if (auto e = number(b, "logprobs", 0, kMaxTopLogprobs, true, &(v = -1))) return e;
    r->logprobs = static_cast<int>(v);
  }
  s.logprobs = r->logprobs;
  if (lim.allow_replay)
    if (auto it = b.find("debug_replay_text"); it != b.end()) {
      if (!it->is_string())
        return bad("debug_replay_text", "'debug_replay_text' must be a string", "invalid_type");
      r->replay = it->get<std::string>();
    }
  return std::nullopt;
}

}  // namespace

std::optional<ApiError> parse_request(const std::string& text, bool chat, const ServeLimits& lim,
                                      const PromptEncoder& enc, uint64_t seed, GenRequest* r) {
  Json b;
  try {
    b = Json::parse(text);
  } catch (const Json::exception& e) {
    return bad("", str("the body is not valid JSON: ", e.what()), "invalid_json");
  }
  if (!b.is_object()) return bad("", "the body must be a JSON object", "invalid_json");
  r->chat = chat;
  auto m = b.find("model");
  if (m == b.end() || m->is_null())
    return bad("model", "'model' is required", "missing_required_parameter");
  if (!m->is_string()) return bad("model", "'model' must be a string", "invalid_type");
  r->model = m->get<std::string>();
  if (r->model != lim.model_name) {
    ApiError e = bad(
        "model",
        str("the model '", r->model, "' does not exist; this server serves '", lim.model_name, "'"),
        "model_not_found");
    return e;
  }
  if (auto e = parse_sampling(b, lim, seed, r)) return e;
  std::string prompt_param = chat ? "messages" : "prompt";
  if (chat) {
    auto msgs = b.find("messages");
    if (msgs == b.end())
      return bad("messages", "'messages' is required", "missing_required_parameter");
    if (!msgs->is_array() || msgs->empty())
      return bad("messages", "'messages' must be a non-empty list of messages", "invalid_type");
    chat::ChatOptions opt;
    opt.thinking = lim.default_thinking;
    if (auto k = b.find("chat_template_kwargs"); k != b.end() && !k->is_null()) {
      if (!k->is_object())
        return bad("chat_template_kwargs", "'chat_template_kwargs' must be an object",
                   "invalid_type");
      if (Status st = chat::apply_chat_template_kwargs(*k, &opt); !st)
        return bad("chat_template_kwargs", st.message());
    }
    Json tools = b.value("tools", Json());
    if (!tools.is_null() && !tools.is_array())
      return bad("tools", "'tools' must be a list of tools", "invalid_type");
    r->has_tools = tools.is_array() && !tools.empty();
    r->thinking = opt.thinking;
    auto rendered = chat::encode_chat(*msgs, tools, opt);
    if (!rendered) {
      const std::string msg = rendered.status().message();
      return bad(msg.rfind("tools", 0) == 0 ? "tools" : "messages", msg);
    }
    auto ids = enc.encode_text(*rendered, /*add_bos=*/false);
    if (!ids) return bad("messages", ids.status().message());
    r->prompt = std::move(*ids);
  } else {
    auto p = b.find("prompt");
    if (p == b.end() || p->is_null())
      return bad("prompt", "'prompt' is required", "missing_required_parameter");
    const Json* one = &*p;
    if (p->is_array() && p->size() == 1 && ((*p)[0].is_string() || (*p)[0].is_array()))
      one = &(*p)[0];  // a batch of one
    if (one->is_string()) {
      if (one->get<std::string>().empty()) return bad("prompt", "'prompt' must not be empty");
      auto ids = enc.encode_text(one->get<std::string>(), /*add_bos=*/true);
      if (!ids) return bad("prompt", ids.status().message());
      r->prompt = std::move(*ids);
    } else if (one->is_array() && !one->empty()) {
      if (auto e = token_list(*one, "prompt", lim.vocab_size, &r->prompt)) return e;
    } else if (p->is_array() && p->size() > 1 && (*p)[0].is_string()) {
      return bad("prompt", "a batch of several prompts is not supported; send one per request");
    } else {
      return bad("prompt", "'prompt' must be a string or a list of token ids", "invalid_type");
    }
  }
  const int64_t plen = static_cast<int64_t>(r->prompt.size());
  if (plen >= lim.max_model_len)
    return bad(
        prompt_param,
        str("the prompt is ", plen, " tokens; this model's context is ", lim.max_model_len,
            " tokens (prompt and output), so at most ", lim.max_model_len - 1, " prompt tokens"),
        "context_length_exceeded");
  double v = 0;
  const char* mt =
      chat && b.contains("max_completion_tokens") ? "max_completion_tokens" : "max_tokens";
  if (auto e = number(b, mt, 1, 1e12, true, &(v = -1))) return e;
  if (v < 0) {
    r->max_tokens = static_cast<int>(chat ? lim.max_model_len - plen
                                          : std::min<int64_t>(16, lim.max_model_len - plen));
  } else {
    if (plen + static_cast<int64_t>(v) > lim.max_model_len)
      return bad(mt,
                 str("'", mt, "' is ", static_cast<int64_t>(v), " but the prompt is ", plen,
                     " tokens and the context ", lim.max_model_len, ": at most ",
                     lim.max_model_len - plen, " new tokens fit"),
                 "context_length_exceeded");
    r->max_tokens = static_cast<int>(v);
  }
  return std::nullopt;
}

}  // namespace sp::server
