// DeepSeek-V4 completions -> OpenAI assistant messages: reasoning, content and DSML tool calls.
//
// The inverse of how chat_format renders an assistant turn:
//   [reasoning "</think>"] content ["\n\n<｜DSML｜tool_calls>" invokes "</｜DSML｜tool_calls>"]
//   [EOS]
// (reasoning only in thinking mode). parse_completion() takes the whole generated text;
// StreamingParser takes it in deltas of any split and its deltas add up to exactly what
// parse_completion() returns. Rules (docs/chat_format.md has the long form):
//  - Text after the first end-of-sentence token is ignored.
//  - Thinking mode: reasoning runs to the first "</think>"; without one, all text is reasoning.
//  - The first "<｜DSML｜tool_calls>" opens the tool-call block; content is the text before it,
//  less
//    one "\n\n" directly before it. Text after the block's end is dropped (as vLLM does).
//  - A block that is malformed (unterminated at the end of the text, a broken tag, a string="false"
//    value that is not JSON, a repeated parameter name) or has no invoke is not a tool call: the
//    whole text after the reasoning becomes content, as vLLM's DeepSeek tool parser falls back.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "text/chat_format.h"

namespace sp::chat {

struct ToolCall {
  std::string id;  // "call_" + 24 hex digits
  std::string name;
  std::string arguments;  // a JSON object, as text
  bool operator==(const ToolCall&) const = default;
};

struct ParsedCompletion {
  std::string reasoning_content;  // empty in chat mode
  std::string content;
  std::vector<ToolCall> tool_calls;
  bool operator==(const ParsedCompletion&) const = default;
};

struct ParseOptions {
  bool thinking = false;  // the prompt ended "<｜Assistant｜><think>"
  // Tool-call ids are derived from this seed and the call's index; 0 draws a random seed.
  uint64_t id_seed = 0;
};

ParsedCompletion parse_completion(std::string_view text, const ParseOptions& options);

// {"role": "assistant", "content": ..., "reasoning_content": ... (thinking mode),
//  "tool_calls": [{"id", "type": "function", "function": {"name", "arguments"}}] (when any)}.
// content is null when it is empty and there are tool calls.
Json to_openai_message(const ParsedCompletion& parsed, bool thinking);

struct ToolCallDelta {
  int index = 0;
  std::string id;
  std::string name;
  std::string arguments;
  bool operator==(const ToolCallDelta&) const = default;
};

struct StreamDelta {
  std::string reasoning_content;
  std::string content;
  std::vector<ToolCallDelta> tool_calls;  // each call once, whole, when its block has closed
  bool empty() const { return reasoning_content.empty() && content.empty() && tool_calls.empty(); }
};

// Incremental parser. Text that may still turn out to be part of a tag ("</think>", the tool-call
// opener with its "\n\n", the end-of-sentence token) is held back until it is decided, and so is
// an incomplete UTF-8 sequence at the end of a delta. A tool-call block is held until it closes:
// only then is it known to be well formed (else it is content, as in parse_completion()).
class StreamingParser {
 public:
  explicit StreamingParser(const ParseOptions& options);
  StreamDelta feed(std::string_view delta);
  // End of generation: flushes what was held back.
  StreamDelta finish();

 private:
  enum class State { kReasoning, kContent, kBlock, kPlain, kDone };
  void feed_inner(std::string_view text, StreamDelta* out);
  void finish_inner(StreamDelta* out);
  void process(StreamDelta* out);
  // Moves the decided part of buf_ (all of it when `all`) to `out` as reasoning or content.
  void emit(size_t held, bool all, bool reasoning, StreamDelta* out);

  uint64_t id_seed_;
  State state_;
  bool stopped_ = false;  // an end-of-sentence token was seen
  bool finished_ = false;
  std::string eos_held_;    // a possible start of the end-of-sentence token
  std::string buf_;         // undecided text of the current state
  std::string block_lead_;  // "\n\n" before the tool-call opener, if it had one
};

}  // namespace sp::chat
