#include "text/chat_parse.h"

#include <algorithm>
#include <initializer_list>
#include <random>
#include <set>
#include <utility>

namespace sp::chat {
namespace {

constexpr std::string_view kBlockOpener = "\n\n<｜DSML｜tool_calls>";  // as the encoder writes it

// Length of the longest proper prefix of `pattern` that `s` ends with.
size_t partial_suffix(std::string_view s, std::string_view pattern) {
  for (size_t n = std::min(s.size(), pattern.size() - 1); n > 0; --n) {
    if (s.substr(s.size() - n) == pattern.substr(0, n)) return n;
  }
  return 0;
}

// The largest m <= n such that s[0, m) does not end inside a UTF-8 sequence.
size_t utf8_boundary(std::string_view s, size_t n) {
  size_t lead = n;
  for (int back = 0; back < 4 && lead > 0; ++back) {
    --lead;
    const auto c = static_cast<unsigned char>(s[lead]);
    if ((c & 0xC0) != 0x80) {
      size_t len = 1;
      if ((c & 0xE0) == 0xC0)
        len = 2;
      else if ((c & 0xF0) == 0xE0)
        len = 3;
      else if ((c & 0xF8) == 0xF0)
        len = 4;
      return lead + len > n ? lead : n;
    }
  }
  return n;  // not UTF-8 (continuation bytes only): nothing to wait for
}

std::string make_id(uint64_t seed, size_t index) {
  // splitmix64 of (seed, index): ids are unique within a response and reproducible for tests.
  static const char kHex[] = "0123456789abcdef";
  std::string id = "call_";
  uint64_t x = seed + 0x9E3779B97F4A7C15ull * (index + 1);
  for (int word = 0; word < 2; ++word) {
    x += 0x9E3779B97F4A7C15ull;
    uint64_t z = x;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    for (int d = 0; d < (word == 0 ? 16 : 8); ++d) id.push_back(kHex[(z >> (4 * d)) & 15]);
  }
  return id;
}

uint64_t resolve_seed(uint64_t seed) {
  if (seed != 0) return seed;
  std::random_device rd;
  return (static_cast<uint64_t>(rd()) << 32) ^ rd() ^ 1;
}

// ---------------------------------------------------------------------------------------------
// The tool-call block. The grammar is vLLM's (whitespace between tags is free; names are
// non-empty and quote-free; a value runs to the first parameter end tag):
//   <｜DSML｜tool_calls> ws ( <｜DSML｜invoke ws+ name="N" ws > ws
//       ( <｜DSML｜parameter ws+ name="P" ws+ string="true|false" ws > VALUE </｜DSML｜parameter>
//       ws )*
//     </｜DSML｜invoke> ws )* </｜DSML｜tool_calls>
// Every decision is taken on bytes already present and kNeedMore only at the end of the input, so
// a prefix's verdict (complete or malformed) holds for every extension: the streaming parser and
// parse_completion() agree.

enum class Step { kOk, kNeedMore, kMalformed };

struct BlockResult {
  Step step = Step::kMalformed;
  size_t end = 0;  // past the closing tag when kOk
  std::vector<ToolCall> calls;
};

bool is_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

class Scanner {
 public:
  explicit Scanner(std::string_view s) : s_(s) {}
  size_t pos() const { return pos_; }

  Step ws(bool required) {
    const size_t start = pos_;
    while (pos_ < s_.size() && is_space(s_[pos_])) ++pos_;
    if (pos_ == s_.size()) return Step::kNeedMore;
    return required && pos_ == start ? Step::kMalformed : Step::kOk;
  }
  // Index of the literal that matches at the cursor (and steps over it).
  Step alt(std::initializer_list<std::string_view> lits, size_t* which) {
    const std::string_view rest = s_.substr(pos_);
    bool prefix = false;
    size_t i = 0;
    for (std::string_view lit : lits) {
      if (rest.substr(0, lit.size()) == lit) {
        pos_ += lit.size();
        *which = i;
        return Step::kOk;
      }
      prefix = prefix || lit.substr(0, rest.size()) == rest;
      ++i;
    }
    return prefix ? Step::kNeedMore : Step::kMalformed;
  }
  Step lit(std::string_view l) {
    size_t unused = 0;
    return alt({l}, &unused);
  }
  // Text up to the first `term`, stepping over it.
  Step until(std::string_view term, std::string* out) {
    const size_t at = s_.find(term, pos_);
    if (at == std::string_view::npos) return Step::kNeedMore;
    out->assign(s_.substr(pos_, at - pos_));
    pos_ = at + term.size();
    return Step::kOk;
  }
  Step quoted_name(std::string* out) {
    Step st = lit("\"");
    if (st != Step::kOk) return st;
    st = until("\"", out);
    if (st == Step::kOk && out->empty()) return Step::kMalformed;
    return st;
  }

 private:
  std::string_view s_;
  size_t pos_ = 0;
};

#define SP_STEP(expr)                          \
  do {                                         \
    const Step _st = (expr);                   \
    if (_st != Step::kOk) return {_st, 0, {}}; \
  } while (0)

BlockResult parse_block(std::string_view s) {
  Scanner sc(s);
  SP_STEP(sc.lit(kToolCallsStart));
  std::vector<ToolCall> calls;
  while (true) {
    SP_STEP(sc.ws(false));
    size_t which = 0;
    SP_STEP(sc.alt({kToolCallsEnd, kInvokeStart}, &which));
    if (which == 0) break;
    ToolCall call;
    SP_STEP(sc.ws(true));
    SP_STEP(sc.lit("name="));
    SP_STEP(sc.quoted_name(&call.name));
    SP_STEP(sc.ws(false));
    SP_STEP(sc.lit(">"));
    std::string args = "{";
    std::set<std::string> seen;
    while (true) {
      SP_STEP(sc.ws(false));
      SP_STEP(sc.alt({kInvokeEnd, kParameterStart}, &which));
      if (which == 0) break;
      std::string name, value;
      SP_STEP(sc.ws(true));
      SP_STEP(sc.lit("name="));
      SP_STEP(sc.quoted_name(&name));
      SP_STEP(sc.ws(true));
      SP_STEP(sc.lit("string=\""));
      size_t is_json = 0;
      SP_STEP(sc.alt({"true\"", "false\""}, &is_json));
      SP_STEP(sc.ws(false));
      SP_STEP(sc.lit(">"));
      SP_STEP(sc.until(kParameterEnd, &value));
      if (!seen.insert(name).second) return {Step::kMalformed, 0, {}};
      if (is_json == 1 && !Json::accept(value)) return {Step::kMalformed, 0, {}};
      // decode_dsml_to_arguments() of the reference: JSON values go in as written.
      if (args.size() > 1) args += ", ";
      args += python_json_dumps(Json(name)) + ": ";
      args += is_json == 1 ? value : python_json_dumps(Json(value));
    }
    call.arguments = args + "}";
    calls.push_back(std::move(call));
  }
  if (calls.empty()) return {Step::kMalformed, 0, {}};
  return {Step::kOk, sc.pos(), std::move(calls)};
}

#undef SP_STEP

}  // namespace

ParsedCompletion parse_completion(std::string_view text, const ParseOptions& options) {
  const uint64_t seed = resolve_seed(options.id_seed);
  ParsedCompletion out;
  text = text.substr(0, text.find(kEos));
  if (options.thinking) {
    const size_t end = text.find(kThinkEnd);
    if (end == std::string_view::npos) {
      out.reasoning_content = text;
      return out;
    }
    out.reasoning_content = text.substr(0, end);
    text.remove_prefix(end + kThinkEnd.size());
  }
  const size_t open = text.find(kToolCallsStart);
  if (open != std::string_view::npos) {
    BlockResult block = parse_block(text.substr(open));
    if (block.step == Step::kOk) {
      std::string_view before = text.substr(0, open);
      if (before.size() >= 2 && before.substr(before.size() - 2) == "\n\n") before.remove_suffix(2);
      out.content = before;
      out.tool_calls = std::move(block.calls);
      for (size_t i = 0; i < out.tool_calls.size(); ++i) out.tool_calls[i].id = make_id(seed, i);
      return out;
    }
  }
  out.content = text;
  return out;
}

Json to_openai_message(const ParsedCompletion& parsed, bool thinking) {
  Json m = Json::object();
  m["role"] = "assistant";
  if (parsed.content.empty() && !parsed.tool_calls.empty()) {
    m["content"] = nullptr;
  } else {
    m["content"] = parsed.content;
  }
  if (thinking) m["reasoning_content"] = parsed.reasoning_content;
  if (!parsed.tool_calls.empty()) {
    Json calls = Json::array();
    for (const auto& c : parsed.tool_calls) {
      Json fn = Json::object();
      fn["name"] = c.name;
      fn["arguments"] = c.arguments;
      Json call = Json::object();
      call["id"] = c.id;
      call["type"] = "function";
      call["function"] = std::move(fn);
      calls.push_back(std::move(call));
    }
    m["tool_calls"] = std::move(calls);
  }
  return m;
}

// ---------------------------------------------------------------------------------------------
// Streaming

StreamingParser::StreamingParser(const ParseOptions& options)
    : id_seed_(resolve_seed(options.id_seed)),
      state_(options.thinking ? State::kReasoning : State::kContent) {}

StreamDelta StreamingParser::feed(std::string_view delta) {
  StreamDelta out;
  if (stopped_ || finished_) return out;
  // The end-of-sentence token ends the text; a possible start of it waits for the next delta.
  std::string text = eos_held_ + std::string(delta);
  eos_held_.clear();
  const size_t eos = text.find(kEos);
  if (eos != std::string::npos) {
    feed_inner(std::string_view(text).substr(0, eos), &out);
    finish_inner(&out);
    stopped_ = true;
    return out;
  }
  const size_t held = partial_suffix(text, kEos);
  eos_held_ = text.substr(text.size() - held);
  feed_inner(std::string_view(text).substr(0, text.size() - held), &out);
  return out;
}

StreamDelta StreamingParser::finish() {
  StreamDelta out;
  if (stopped_ || finished_) return out;
  finished_ = true;
  feed_inner(eos_held_, &out);
  eos_held_.clear();
  finish_inner(&out);
  return out;
}

void StreamingParser::emit(size_t held, bool all, bool reasoning, StreamDelta* out) {
  size_t n = all ? buf_.size() : utf8_boundary(buf_, buf_.size() - held);
  (reasoning ? out->reasoning_content : out->content).append(buf_, 0, n);
  buf_.erase(0, n);
}

void StreamingParser::feed_inner(std::string_view text, StreamDelta* out) {
  if (state_ == State::kDone) return;
  buf_ += text;
  process(out);
}

// Advances through every state change the buffered text decides.
void StreamingParser::process(StreamDelta* out) {
  while (true) {
    switch (state_) {
      case State::kReasoning: {
        const size_t end = buf_.find(kThinkEnd);
        if (end == std::string::npos) {
          emit(partial_suffix(buf_, kThinkEnd), false, true, out);
          return;
        }
        out->reasoning_content.append(buf_, 0, end);
        buf_.erase(0, end + kThinkEnd.size());
        state_ = State::kContent;
        break;
      }
      case State::kContent: {
        const size_t open = buf_.find(kToolCallsStart);
        if (open == std::string::npos) {
          const size_t held =
              std::max(partial_suffix(buf_, kBlockOpener), partial_suffix(buf_, kToolCallsStart));
          emit(held, false, false, out);
          return;
        }
        const bool lead = open >= 2 && buf_.compare(open - 2, 2, "\n\n") == 0;
        out->content.append(buf_, 0, lead ? open - 2 : open);
        block_lead_ = lead ? "\n\n" : "";
        buf_.erase(0, open);
        state_ = State::kBlock;
        break;
      }
      case State::kBlock: {
        BlockResult block = parse_block(buf_);
        if (block.step == Step::kNeedMore) return;
        if (block.step == Step::kOk) {
          for (size_t i = 0; i < block.calls.size(); ++i) {
            out->tool_calls.push_back({static_cast<int>(i), make_id(id_seed_, i),
                                       std::move(block.calls[i].name),
                                       std::move(block.calls[i].arguments)});
          }
          buf_.clear();
          state_ = State::kDone;
          return;
        }
        buf_ = block_lead_ + buf_;  // not a tool call: the block is content after all
        state_ = State::kPlain;
        break;
      }
      case State::kPlain:
        emit(0, false, false, out);
        return;
      case State::kDone:
        buf_.clear();
        return;
    }
  }
}

void StreamingParser::finish_inner(StreamDelta* out) {
  if (state_ == State::kBlock) {
    // Unterminated at the end of the text: content.
    buf_ = block_lead_ + buf_;
    state_ = State::kPlain;
  }
  if (state_ != State::kDone) emit(0, true, state_ == State::kReasoning, out);
  buf_.clear();
  state_ = State::kDone;
}

}  // namespace sp::chat
