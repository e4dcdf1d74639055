// Test driver for sp_chat: reads a JSON list of cases on stdin, writes a JSON list of results.
//
// Case: {"op": "encode_chat", "messages": [...], "tools": [...]|null, "options": {...}}
//       {"op": "encode_messages", "messages": [...], "context": [...]|null, "options": {...}}
//       {"op": "parse", "text": "...", "thinking": bool}
// options: {"thinking", "drop_thinking", "add_bos": bool, "reasoning_effort": str|null,
//           "chat_template_kwargs": {...}} (kwargs applied after the rest).
// Result: {"ok": true, "prompt": "..."} / {"ok": true, "message": {...}} / {"ok": false,
// "error": "..."}.
#include <iostream>
#include <iterator>
#include <string>

#include "text/chat_format.h"
#include "text/chat_parse.h"

namespace {

using sp::chat::Json;

sp::Result<sp::chat::ChatOptions> read_options(const Json& o) {
  sp::chat::ChatOptions opt;
  if (o.is_null()) return opt;
  opt.thinking = o.value("thinking", false);
  opt.drop_thinking = o.value("drop_thinking", true);
  opt.add_bos = o.value("add_bos", true);
  if (o.contains("reasoning_effort")) {
    SP_ASSIGN_OR_RETURN(opt.reasoning_effort,
                        sp::chat::parse_reasoning_effort(o["reasoning_effort"]));
  }
  if (o.contains("chat_template_kwargs")) {
    SP_RETURN_IF_ERROR(sp::chat::apply_chat_template_kwargs(o["chat_template_kwargs"], &opt));
  }
  return opt;
}

Json run_case(const Json& c) {
  Json r = Json::object();
  const std::string op = c.value("op", "");
  if (op == "parse") {
    sp::chat::ParseOptions po;
    po.thinking = c.value("thinking", false);
    po.id_seed = 1;
    auto parsed = sp::chat::parse_completion(c.at("text").get<std::string>(), po);
    r["ok"] = true;
    r["message"] = sp::chat::to_openai_message(parsed, po.thinking);
    return r;
  }
  auto opt = read_options(c.contains("options") ? c["options"] : Json());
  sp::Result<std::string> prompt = opt.status();
  if (opt) {
    const Json null;
    const Json& messages = c.contains("messages") ? c["messages"] : null;
    if (op == "encode_chat") {
      prompt = sp::chat::encode_chat(messages, c.contains("tools") ? c["tools"] : null, *opt);
    } else if (op == "encode_messages") {
      prompt =
          sp::chat::encode_messages(messages, *opt, c.contains("context") ? c["context"] : null);
    } else {
      prompt = sp::Status::error("unknown op '" + op + "'");
    }
  }
  r["ok"] = prompt.is_ok();
  if (prompt) {
    r["prompt"] = *prompt;
  } else {
    r["error"] = prompt.status().message();
  }
  return r;
}

}  // namespace

int main() {
  std::string input((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
  Json cases = Json::parse(input, nullptr, false);
  if (cases.is_discarded() || !cases.is_array()) {
    std::cerr << "chat_encode: stdin is not a JSON list\n";
    return 2;
  }
  Json results = Json::array();
  for (const auto& c : cases) results.push_back(run_case(c));
  // Strings the driver got are valid UTF-8 (they came through the JSON parser), so dump() is safe.
  std::cout << results.dump(-1, ' ', false, Json::error_handler_t::replace) << "\n";
  return 0;
}
