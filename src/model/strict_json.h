// JSON from untrusted files (config.json, model.safetensors.index.json, safetensors headers):
// bounded nesting, no duplicate keys at any level (JSON parsers disagree on which duplicate wins,
// so a file with one means different things to different readers), and error messages that never
// echo more than a short excerpt of the input.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

#include "core/status.h"

namespace sp {

// Far deeper than any real file (config.json nests 3 levels, headers 3).
constexpr int kMaxJsonDepth = 64;

Result<nlohmann::json> parse_json_strict(std::string_view text, const std::string& source,
                                         int max_depth = kMaxJsonDepth);

// A value for an error message: its JSON text, truncated.
std::string json_brief(const nlohmann::json& v, size_t max_chars = 120);

}  // namespace sp
