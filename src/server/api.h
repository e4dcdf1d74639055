// The OpenAI request schema of `seekpipe serve`: parsing and validating /v1/completions and
// /v1/chat/completions bodies into what the engine runs. Every mistake is an ApiError that names
// the field (OpenAI's error body: {"error": {"message", "type", "param", "code"}}).
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "engine/scheduler.h"
#include "text/chat_format.h"

namespace sp::server {

using Json = nlohmann::ordered_json;

struct ApiError {
  int status = 400;
  std::string message;
  std::string param;  // empty: null
  std::string code;   // empty: null
  std::string type = "invalid_request_error";
};
Json error_body(const ApiError& e);

// What the server knows that a request is checked against.
struct ServeLimits {
  std::string model_name;
  int64_t max_model_len = 0;
  int64_t vocab_size = 0;
  int max_n = 16;
  bool default_thinking = false;
  bool allow_replay = false;  // --debug-replay: requests may carry "debug_replay_text"
};

struct GenRequest {
  bool chat = false;
  std::string model;
  std::vector<int32_t> prompt;
  int n = 1;
  int max_tokens = 0;
  SamplingParams sampling;
  std::vector<std::string> stop;
  std::vector<int32_t> stop_token_ids;
  bool stream = false;
  bool include_usage = false;
  int logprobs = -1;  // -1: none; else top-k count (0: the chosen token only)
  bool thinking = false;
  bool has_tools = false;
  std::optional<std::string> replay;  // test-only: this text stands for the model's output
};

// The text side: a chat request's prompt is rendered by the DeepSeek-V4 chat encoder and
// tokenized; a completion's string prompt is tokenized (BOS by the model's rule).
struct PromptEncoder {
  virtual ~PromptEncoder() = default;
  virtual Result<std::vector<int32_t>> encode_text(const std::string& text, bool add_bos) const = 0;
};

// Parses and validates a body. `seed` is used when the request gives none.
std::optional<ApiError> parse_request(const std::string& body, bool chat, const ServeLimits& lim,
                                      const PromptEncoder& enc, uint64_t seed, GenRequest* out);

}  // namespace sp::server
