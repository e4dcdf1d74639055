// /v1/completions and /v1/chat/completions: one HTTP request becomes n engine requests (its
// choices), whose tokens come back through one channel and are turned into text (stop strings
// held back until they cannot match), parsed (chat: reasoning and tool calls) and sent whole or
// as server-sent events.
#include <httplib.h>

#include <algorithm>
#include <chrono>
#include <random>

#include "server/server.h"
#include "text/chat_parse.h"
#include "text/tokenizer.h"

namespace sp::server {

namespace {

using Clock = std::chrono::steady_clock;

std::string dump(const Json& j) {
  return j.dump(-1, ' ', false, Json::error_handler_t::replace);
}

std::string random_hex(int n) {
  static thread_local std::mt19937_64 rng(std::random_device{}());
  std::string s;
  for (int i = 0; i < n; ++i) s += "0123456789abcdef"[rng() % 16];
  return s;
}

struct Choice {
  int index = 0;
  int64_t id = 0;
  std::unique_ptr<Detokenizer> detok;
  std::string text;  // decoded so far (cut at a stop string)
  size_t sent = 0;   // bytes of `text` already released
  int generated = 0;
  bool done = false;
  std::string finish_reason;
  std::vector<Json> lp_pending, lp_all;
  std::unique_ptr<chat::StreamingParser> parser;
  bool role_sent = false, saw_tool_call = false;
  Clock::time_point last_token;
};

// One HTTP request's generation; shared between the handler and the response provider.
class Generation {
 public:
  Generation(const GenRequest& g, const Tokenizer& tok, int64_t eos, EngineLoop& loop,
             Metrics& metrics, Clock::time_point t0)
      : g_(g), tok_(tok), eos_(eos), loop_(loop), metrics_(metrics), t0_(t0) {
    for (auto& s : g.stop) max_stop_ = std::max(max_stop_, s.size());
    id_ = (g.chat ? "chatcmpl-" : "cmpl-") + random_hex(24);
    created_ = static_cast<int64_t>(std::time(nullptr));
    channel = std::make_shared<RequestChannel>();
  }

  std::vector<Request> requests() {
    std::vector<Request> out;
    for (int i = 0; i < g_.n; ++i) {
      Choice& c = choices_.emplace_back();
      c.index = i;
      c.id = loop_.next_id();
      c.detok = std::make_unique<Detokenizer>(tok_, /*skip_special=*/true);
      if (g_.chat)
        c.parser = std::make_unique<chat::StreamingParser>(
            chat::ParseOptions{g_.thinking, static_cast<uint64_t>(c.id) * 7919 + 1});
      Request r;
      r.id = c.id;
      r.prompt = g_.prompt;
      r.max_new_tokens = g_.max_tokens;
      r.sampling = g_.sampling;
      r.sampling.stream = static_cast<uint64_t>(i);
      r.stop_token_ids = g_.stop_token_ids;
      out.push_back(std::move(r));
    }
    return out;
  }

  // Test-only: the replayed text's tokens stand for every choice's output.
  void replay(const std::string& text) {
    auto ids = tok_.encode(text);
    for (Choice& c : choices_) {
      if (ids)
        for (int32_t t : *ids) {
          EngineEvent e;
          e.request = c.id;
          e.token = t;
          channel->push(e);
        }
      EngineEvent f;
      f.kind = EngineEvent::Kind::kFinish;
      f.request = c.id;
      f.reason = FinishReason::kStop;
      channel->push(f);
    }
  }

  // Applies events; returns SSE payloads to send when streaming.
  std::vector<std::string> apply(const std::vector<EngineEvent>& events) {
    std::vector<std::string> out;
    for (const EngineEvent& e : events) {
      Choice* c = find(e.request);
      if (!c || c->done) continue;
      if (e.kind == EngineEvent::Kind::kToken) {
        on_token(*c, e);
      } else if (e.kind == EngineEvent::Kind::kError) {
        error_ = e.error;
        c->done = true;
        c->finish_reason = "error";
      } else {
        finish(*c, e.reason == FinishReason::kStop     ? "stop"
                   : e.reason == FinishReason::kLength ? "length"
                                                       : "abort");
      }
    }
    if (g_.stream)
      for (Choice& c : choices_) stream_chunk(c, &out);
    return out;
  }

  bool all_done() const {
    return std::all_of(choices_.begin(), choices_.end(), [](const Choice& c) { return c.done; });
  }
  void abort_all() {
    for (Choice& c : choices_)
      if (!c.done) loop_.abort(c.id);
  }
  // The streaming tail: usage (when asked) and [DONE].
  std::vector<std::string> stream_end() {
    std::vector<std::string> out;
    if (g_.include_usage) {
      Json j = envelope();
      j["choices"] = Json::array();
      j["usage"] = usage();
      out.push_back(dump(j));
    }
    out.push_back("[DONE]");
    return out;
  }
  Json response() {
    Json j = envelope();
    j["choices"] = Json::array();
    for (Choice& c : choices_) {
      Json ch{{"index", c.index}};
      if (g_.chat) {
        auto parsed = chat::parse_completion(
            c.text, chat::ParseOptions{g_.thinking, static_cast<uint64_t>(c.id) * 7919 + 1});
        ch["message"] = chat::to_openai_message(parsed, g_.thinking);
        ch["logprobs"] = g_.logprobs >= 0 ? Json{{"content", c.lp_all}} : Json();
        ch["finish_reason"] = !parsed.tool_calls.empty() && c.finish_reason == "stop"
                                  ? "tool_calls"
                                  : c.finish_reason;
      } else {
        ch["text"] = c.text;
        ch["logprobs"] = g_.logprobs >= 0 ? completion_logprobs(c.lp_all) : Json();
        ch["finish_reason"] = c.finish_reason;
      }
      j["choices"].push_back(ch);
    }
    j["usage"] = usage();
    return j;
  }
  const std::string& error() const { return error_; }
  void record_end() {
    metrics_.e2e(std::chrono::duration<double>(Clock::now() - t0_).count());
    for (Choice& c : choices_)
      metrics_.finished(c.finish_reason.empty() ? "abort" : c.finish_reason);
  }
  std::shared_ptr<RequestChannel> channel;

 private:
  Choice* find(int64_t id) {
    for (Choice& c : choices_)
      if (c.id == id) return &c;
    return nullptr;
  }

  Json envelope() const {
    return Json{{"id", id_},
                {"object", g_.chat ? (g_.stream ? "chat.completion.chunk" : "chat.completion")
                                   : "text_completion"},
                {"created", created_},
                {"model", g_.model}};
  }
  Json usage() const {
    int64_t gen = 0;
    for (const Choice& c : choices_) gen += c.generated;
    const int64_t p = static_cast<int64_t>(g_.prompt.size());
    return Json{{"prompt_tokens", p}, {"completion_tokens", gen}, {"total_tokens", p + gen}};
  }

  std::string piece(int32_t id) const { return tok_.decode({id}); }
  static Json bytes_of(const std::string& s) {
    Json b = Json::array();
    for (unsigned char ch : s) b.push_back(static_cast<int>(ch));
    return b;
  }
  Json logprob_entry(int32_t token, const TokenLogprobs& lp) const {
    if (g_.chat) {
      Json top = Json::array();
      for (int i = 0; i < lp.n_top; ++i) {
        const std::string t = piece(lp.top_ids[i]);
        top.push_back(Json{{"token", t}, {"logprob", lp.top_logprobs[i]}, {"bytes", bytes_of(t)}});
      }
      const std::string t = piece(token);
      return Json{
          {"token", t}, {"logprob", lp.logprob}, {"bytes", bytes_of(t)}, {"top_logprobs", top}};
    }
    Json top = Json::object();
    for (int i = 0; i < lp.n_top; ++i) top[piece(lp.top_ids[i])] = lp.top_logprobs[i];
    return Json{{"token", piece(token)}, {"logprob", lp.logprob}, {"top", top}};
  }
  static Json completion_logprobs(const std::vector<Json>& entries) {
    Json tokens = Json::array(), lps = Json::array(), tops = Json::array(), offs = Json::array();
    size_t off = 0;
    for (const Json& e : entries) {
      tokens.push_back(e["token"]);
      lps.push_back(e["logprob"]);
      tops.push_back(e["top"]);
      offs.push_back(off);
      off += e["token"].get<std::string>().size();
    }
    return Json{
        {"tokens", tokens}, {"token_logprobs", lps}, {"top_logprobs", tops}, {"text_offset", offs}};
  }

  void on_token(Choice& c, const EngineEvent& e) {
    const auto now = Clock::now();
    if (c.generated == 0 && !first_token_seen_) {
      first_token_seen_ = true;
      metrics_.ttft(std::chrono::duration<double>(now - t0_).count());
    } else if (c.generated > 0) {
      metrics_.itl(std::chrono::duration<double>(now - c.last_token).count());
    }
    c.last_token = now;
    c.generated++;
    metrics_.generation_tokens(1);
    if (g_.logprobs >= 0) {
      Json entry = logprob_entry(e.token, e.lp);
      c.lp_pending.push_back(entry);
      c.lp_all.push_back(std::move(entry));
    }
    const bool stop_token =
        !g_.sampling.ignore_eos &&
        (e.token == eos_ || std::find(g_.stop_token_ids.begin(), g_.stop_token_ids.end(),
                                      e.token) != g_.stop_token_ids.end());
    if (stop_token) return;  // not part of the text (the engine ends the sequence)
    const size_t before = c.text.size();
    c.text += c.detok->push(e.token);
    check_stop(c, before);
  }

  // Cuts the text at the first stop string that ends in the new text, and ends the choice.
  void check_stop(Choice& c, size_t before) {
    if (g_.stop.empty() || c.done) return;
    const size_t from = before > max_stop_ ? before - max_stop_ : 0;
    size_t best = std::string::npos;
    for (const std::string& s : g_.stop) best = std::min(best, c.text.find(s, from));
    if (best == std::string::npos) return;
    c.text.resize(best);
    c.done = true;
    c.finish_reason = "stop";
    loop_.abort(c.id);
  }

  void finish(Choice& c, const std::string& reason) {
    const size_t before = c.text.size();
    c.text += c.detok->finish();
    check_stop(c, before);
    if (c.done) return;
    c.done = true;
    c.finish_reason = reason;
  }

  // Bytes of the text that can be released: all once done, else all but what a stop string could
  // still complete, cut back to a character boundary.
  size_t releasable(const Choice& c) const {
    if (c.done) return c.text.size();
    const size_t hold = max_stop_ > 0 ? max_stop_ - 1 : 0;
    size_t n = c.text.size() > hold ? c.text.size() - hold : 0;
    while (n > c.sent && n < c.text.size() &&
           (static_cast<unsigned char>(c.text[n]) & 0xC0) == 0x80)
      --n;
    return std::max(n, c.sent);
  }

  void stream_chunk(Choice& c, std::vector<std::string>* out) {
    const size_t n = releasable(c);
    std::string delta = c.text.substr(c.sent, n - c.sent);
    c.sent = n;
    const bool finishing = c.done && !c.finish_reason.empty() && !finish_sent(c);
    Json lp = Json();
    if (g_.logprobs >= 0 && !c.lp_pending.empty()) {
      lp = g_.chat ? Json{{"content", c.lp_pending}} : completion_logprobs(c.lp_pending);
      c.lp_pending.clear();
    }
    auto emit = [&](Json choice) {
      Json j = envelope();
      j["choices"] = Json::array({choice});
      if (g_.include_usage) j["usage"] = Json();
      out->push_back(dump(j));
    };
    if (!g_.chat) {
      if (!delta.empty() || !lp.is_null())
        emit(
            Json{{"index", c.index}, {"text", delta}, {"logprobs", lp}, {"finish_reason", Json()}});
      if (finishing)
        emit(Json{{"index", c.index},
                  {"text", ""},
                  {"logprobs", Json()},
                  {"finish_reason", c.finish_reason}});
    } else {
      if (!c.role_sent) {
        c.role_sent = true;
        emit(Json{{"index", c.index},
                  {"delta", Json{{"role", "assistant"}, {"content", ""}}},
                  {"logprobs", Json()},
                  {"finish_reason", Json()}});
      }
      std::vector<chat::StreamDelta> deltas;
      if (!delta.empty()) deltas.push_back(c.parser->feed(delta));
      if (finishing) deltas.push_back(c.parser->finish());
      bool lp_used = false;
      for (const chat::StreamDelta& d : deltas) {
        if (d.empty()) continue;
        Json dj = Json::object();
        if (!d.reasoning_content.empty()) dj["reasoning_content"] = d.reasoning_content;
        if (!d.content.empty()) dj["content"] = d.content;
        if (!d.tool_calls.empty()) {
          c.saw_tool_call = true;
          Json calls = Json::array();
          for (const chat::ToolCallDelta& t : d.tool_calls)
            calls.push_back(Json{{"index", t.index},
                                 {"id", t.id},
                                 {"type", "function"},
                                 {"function", Json{{"name", t.name}, {"arguments", t.arguments}}}});
          dj["tool_calls"] = calls;
        }
        emit(Json{{"index", c.index},
                  {"delta", dj},
                  {"logprobs", lp_used ? Json() : lp},
                  {"finish_reason", Json()}});
        lp_used = true;
      }
      if (!lp_used && !lp.is_null())
        emit(Json{{"index", c.index},
                  {"delta", Json::object()},
                  {"logprobs", lp},
                  {"finish_reason", Json()}});
      if (finishing)
        emit(Json{{"index", c.index},
                  {"delta", Json::object()},
                  {"logprobs", Json()},
                  {"finish_reason",
                   c.saw_tool_call && c.finish_reason == "stop" ? "tool_calls" : c.finish_reason}});
    }
    if (finishing) finished_sent_.push_back(c.index);
  }
  bool finish_sent(const Choice& c) const {
    return std::find(finished_sent_.begin(), finished_sent_.end(), c.index) != finished_sent_.end();
  }

  GenRequest g_;
  const Tokenizer& tok_;
  int64_t eos_;
  EngineLoop& loop_;
  Metrics& metrics_;
  Clock::time_point t0_;
  size_t max_stop_ = 0;
  std::string id_, error_;
  int64_t created_ = 0;
  std::deque<Choice> choices_;
  std::vector<int> finished_sent_;
  bool first_token_seen_ = false;
};

class TextEncoder : public PromptEncoder {
 public:
  explicit TextEncoder(const ModelText& t) : t_(t) {}
  Result<std::vector<int32_t>> encode_text(const std::string& text, bool add_bos) const override {
    if (add_bos) return t_.encode(text);
    return t_.tokenizer()->encode(text);
  }

 private:
  const ModelText& t_;
};

}  // namespace

void Server::generate(const httplib::Request& req, httplib::Response& res, bool chat) {
  const auto t0 = Clock::now();
  auto reject = [&](const ApiError& e) {
    send_error(res, e);
    metrics_.request_done(e.status);
  };
  if (static_cast<int64_t>(req.body.size()) > opt_.max_body_bytes) {
    ApiError e;
    e.param = "body";
    e.code = "body_too_large";
    e.message = str("the request body is ", req.body.size(), " bytes; at most ",
                    opt_.max_body_bytes, " are accepted (--max-body-bytes)");
    return reject(e);
  }
  GenRequest g;
  TextEncoder enc(text_);
  const uint64_t seed = opt_.seed * 0x9e3779b97f4a7c15ull + seed_counter_.fetch_add(1) + 1;
  if (auto e = parse_request(req.body, chat, opt_.limits, enc, seed, &g)) return reject(*e);
  // The state-block pool may be smaller than the context: a prompt it cannot hold is refused here.
  const LoopStats ls = loop_.stats();
  const int64_t plen = static_cast<int64_t>(g.prompt.size());
  if (ls.block_tokens > 0 && (plen + ls.block_tokens - 1) / ls.block_tokens > ls.blocks_total) {
    ApiError e;
    e.param = chat ? "messages" : "prompt";
    e.code = "context_length_exceeded";
    e.message = str("the prompt is ", plen, " tokens; the server's state-block pool holds ",
                    ls.blocks_total * ls.block_tokens, " positions (--num-state-blocks)");
    return reject(e);
  }
  auto gen = std::make_shared<Generation>(g, *text_.tokenizer(), opt_.eos_id, loop_, metrics_, t0);
  std::vector<Request> reqs = gen->requests();
  if (g.replay) {
    gen->replay(*g.replay);
  } else {
    std::vector<std::shared_ptr<RequestChannel>> chans(reqs.size(), gen->channel);
    if (!loop_.submit(std::move(reqs), chans)) {
      ApiError e;
      e.status = 429;
      e.type = "rate_limit_error";
      e.code = "queue_full";
      e.message = "the server's request queue is full; retry later";
      res.set_header("Retry-After", "1");
      return reject(e);
    }
  }
  metrics_.prompt_tokens(static_cast<int64_t>(g.prompt.size()) * g.n);
  const bool stream = g.stream;
  auto last_write = std::make_shared<Clock::time_point>(Clock::now());
  auto provider = [gen, stream, last_write](size_t, httplib::DataSink& sink) -> bool {
    auto write = [&](const std::string& s) {
      *last_write = Clock::now();
      return sink.write(s.data(), s.size());
    };
    std::vector<std::string> out = gen->apply(gen->channel->pop(std::chrono::milliseconds(100)));
    if (stream)
      for (const std::string& s : out)
        if (!write("data: " + s + "\n\n")) return false;
    if (gen->all_done()) {
      if (stream) {
        if (!gen->error().empty()) {
          ApiError e;
          e.message = gen->error();
          if (!write("data: " + dump(error_body(e)) + "\n\n")) return false;
        }
        for (const std::string& s : gen->stream_end())
          if (!write("data: " + s + "\n\n")) return false;
      } else if (!gen->error().empty()) {
        ApiError e;
        e.message = gen->error();
        if (!write(dump(error_body(e)))) return false;
      } else if (!write(dump(gen->response()))) {
        return false;
      }
      sink.done();
      return true;
    }
    // Keep-alive: finds a client that went away (its request is then aborted). JSON allows
    // leading whitespace; SSE ignores comment lines.
    if (Clock::now() - *last_write > std::chrono::milliseconds(500))
      if (!write(stream ? ": keep-alive\n\n" : " ")) return false;
    return true;
  };
  auto release = [gen, this](bool success) {
    if (!gen->all_done()) gen->abort_all();
    gen->record_end();
    metrics_.request_done(success ? 200 : 499);
  };
  if (stream) res.set_header("Cache-Control", "no-cache");
  res.set_chunked_content_provider(stream ? "text/event-stream" : "application/json", provider,
                                   release);
}

}  // namespace sp::server
