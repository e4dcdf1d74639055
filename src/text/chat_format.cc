#include "text/chat_format.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <map>
#include <optional>
#include <utility>
#include <vector>

namespace sp::chat {
namespace {

// ---------------------------------------------------------------------------------------------
// Python's json.dumps(ensure_ascii=False)

void dump_string(std::string_view s, std::string* out) {
  static const char kHex[] = "0123456789abcdef";
  out->push_back('"');
  for (char c : s) {
    const auto u = static_cast<unsigned char>(c);
    switch (c) {
      case '"':
        *out += "\\\"";
        break;
      case '\\':
        *out += "\\\\";
        break;
      case '\n':
        *out += "\\n";
        break;
      case '\r':
        *out += "\\r";
        break;
      case '\t':
        *out += "\\t";
        break;
      case '\b':
        *out += "\\b";
        break;
      case '\f':
        *out += "\\f";
        break;
      default:
        if (u < 0x20) {
          *out += "\\u00";
          out->push_back(kHex[u >> 4]);
          out->push_back(kHex[u & 15]);
        } else {
          out->push_back(c);  // DEL and every non-ASCII byte stay as they are
        }
    }
  }
  out->push_back('"');
}

// float.__repr__: the shortest digits that round-trip, positional when the decimal exponent is in
// [-4, 16), scientific (at least two exponent digits) otherwise; integral values keep ".0".
void dump_float(double v, std::string* out) {
  if (std::isnan(v)) {
    *out += "NaN";
    return;
  }
  if (std::isinf(v)) {
    *out += v < 0 ? "-Infinity" : "Infinity";
    return;
  }
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof(buf), v, std::chars_format::scientific);
  std::string_view sci(buf, static_cast<size_t>(res.ptr - buf));  // "-1.2345e+17"
  std::string sign;
  if (!sci.empty() && sci[0] == '-') {
    sign = "-";
    sci.remove_prefix(1);
  }
  const size_t e_pos = sci.find('e');
  std::string digits;
  for (char c : sci.substr(0, e_pos)) {
    if (c != '.') digits.push_back(c);
  }
  int exp10 = 0;
  std::from_chars(sci.data() + e_pos + 1 + (sci[e_pos + 1] == '+' ? 1 : 0), sci.data() + sci.size(),
                  exp10);
  *out += sign;
  if (exp10 >= -4 && exp10 < 16) {
    const int n = static_cast<int>(digits.size());
    if (exp10 < 0) {
      *out += "0.";
      out->append(static_cast<size_t>(-exp10 - 1), '0');
      *out += digits;
    } else if (exp10 + 1 >= n) {
      *out += digits;
      out->append(static_cast<size_t>(exp10 + 1 - n), '0');
      *out += ".0";
    } else {
      *out += digits.substr(0, static_cast<size_t>(exp10 + 1));
      *out += '.';
      *out += digits.substr(static_cast<size_t>(exp10 + 1));
    }
    return;
  }
  *out += digits.substr(0, 1);
  if (digits.size() > 1) {
    *out += '.';
    *out += digits.substr(1);
  }
  *out += exp10 < 0 ? "e-" : "e+";
  const int a = exp10 < 0 ? -exp10 : exp10;
  if (a < 10) out->push_back('0');
  *out += std::to_string(a);
}

void dump_value(const Json& v, std::string* out) {
  switch (v.type()) {
    case Json::value_t::null:
      *out += "null";
      break;
    case Json::value_t::boolean:
      *out += v.get<bool>() ? "true" : "false";
      break;
    case Json::value_t::number_integer:
      *out += std::to_string(v.get<int64_t>());
      break;
    case Json::value_t::number_unsigned:
      *out += std::to_string(v.get<uint64_t>());
      break;
    case Json::value_t::number_float:
      dump_float(v.get<double>(), out);
      break;
    case Json::value_t::string:
      dump_string(v.get_ref<const std::string&>(), out);
      break;
    case Json::value_t::array: {
      out->push_back('[');
      bool first = true;
      for (const auto& e : v) {
        if (!first) *out += ", ";
        first = false;
        dump_value(e, out);
      }
      out->push_back(']');
      break;
    }
    case Json::value_t::object: {
      out->push_back('{');
      bool first = true;
      for (const auto& [k, e] : v.items()) {
        if (!first) *out += ", ";
        first = false;
        dump_string(k, out);
        *out += ": ";
        dump_value(e, out);
      }
      out->push_back('}');
      break;
    }
    case Json::value_t::binary:
    case Json::value_t::discarded:
      *out += "null";
      break;
  }
}

// ---------------------------------------------------------------------------------------------
// Validated messages

const char* type_name(const Json& v) {
  switch (v.type()) {
    case Json::value_t::null:
      return "null";
    case Json::value_t::boolean:
      return "boolean";
    case Json::value_t::number_integer:
    case Json::value_t::number_unsigned:
    case Json::value_t::number_float:
      return "number";
    case Json::value_t::string:
      return "string";
    case Json::value_t::array:
      return "array";
    case Json::value_t::object:
      return "object";
    default:
      return "binary";
  }
}

constexpr std::string_view kTasks[][2] = {
    {"action", "<｜action｜>"}, {"query", "<｜query｜>"}, {"authority", "<｜authority｜>"},
    {"domain", "<｜domain｜>"}, {"title", "<｜title｜>"}, {"read_url", "<｜read_url｜>"},
};

std::optional<std::string_view> task_token(std::string_view task) {
  for (const auto& t : kTasks) {
    if (t[0] == task) return t[1];
  }
  return std::nullopt;
}

struct ToolCallIn {
  std::string id;
  std::string name;
  Json arguments;  // the parsed object (the reference's json.loads), or {"arguments": raw}
};

// A user message after merge_tool_messages(): text blocks and tool results.
struct Block {
  bool tool_result = false;
  std::string text;
  std::string tool_use_id;
};

struct Msg {
  std::string role;  // system developer user assistant latest_reminder (tool only before merge)
  std::optional<std::string> content;
  std::vector<Block> blocks;  // user messages only, after merge
  Json tools;                 // array of function specs (OpenAI "function" objects) or null
  Json response_format;       // null when absent
  std::vector<ToolCallIn> tool_calls;
  std::optional<std::string> reasoning;
  std::optional<std::string> task;
  bool wo_eos = false;
  std::string tool_call_id;  // tool messages
};

// `content` as a string: a string, null/missing (nullopt), or a list of text parts joined with
// "\n" (what vLLM hands its DeepSeek encoder).
Status read_text(const Json& msg, const std::string& where, const char* field,
                 std::optional<std::string>* out) {
  out->reset();
  auto it = msg.find(field);
  if (it == msg.end() || it->is_null()) return Status::ok();
  if (it->is_string()) {
    *out = it->get<std::string>();
    return Status::ok();
  }
  if (!it->is_array()) {
    return Status::error(str(where, ".", field,
                             ": expected a string, null or a list of text parts, got ",
                             type_name(*it)));
  }
  std::string joined;
  for (size_t p = 0; p < it->size(); ++p) {
    const Json& part = (*it)[p];
    const std::string pw = str(where, ".", field, "[", p, "]");
    if (!part.is_object()) {
      return Status::error(str(pw, ": expected a content part object, got ", type_name(part)));
    }
    auto type = part.find("type");
    if (type == part.end() || !type->is_string()) {
      return Status::error(str(pw, ".type: missing or not a string"));
    }
    if (*type != "text") {
      return Status::error(str(pw, ".type: unsupported content part '", type->get<std::string>(),
                               "' (only text parts)"));
    }
    auto text = part.find("text");
    if (text == part.end() || !text->is_string()) {
      return Status::error(str(pw, ".text: missing or not a string"));
    }
    if (p > 0) joined += "\n";
    joined += text->get<std::string>();
  }
  *out = std::move(joined);
  return Status::ok();
}

Result<Json> read_tools(const Json& tools, const std::string& where) {
  if (tools.is_null()) return Json();
  if (!tools.is_array()) {
    return Status::error(str(where, ": expected a list of tools, got ", type_name(tools)));
  }
  Json functions = Json::array();
  for (size_t t = 0; t < tools.size(); ++t) {
    const Json& tool = tools[t];
    const std::string tw = str(where, "[", t, "]");
    if (!tool.is_object()) {
      return Status::error(str(tw, ": expected an object, got ", type_name(tool)));
    }
    auto type = tool.find("type");
    if (type != tool.end() && !(type->is_string() && *type == "function")) {
      return Status::error(str(tw, ".type: expected \"function\""));
    }
    auto fn = tool.find("function");
    if (fn == tool.end() || !fn->is_object()) {
      return Status::error(str(tw, ".function: missing or not an object"));
    }
    auto name = fn->find("name");
    if (name == fn->end() || !name->is_string() || name->get_ref<const std::string&>().empty()) {
      return Status::error(str(tw, ".function.name: missing or not a non-empty string"));
    }
    functions.push_back(*fn);
  }
  return functions;
}

Status read_tool_calls(const Json& msg, const std::string& where, std::vector<ToolCallIn>* out) {
  auto it = msg.find("tool_calls");
  if (it == msg.end() || it->is_null()) return Status::ok();
  if (!it->is_array()) {
    return Status::error(str(where, ".tool_calls: expected a list, got ", type_name(*it)));
  }
  for (size_t c = 0; c < it->size(); ++c) {
    const Json& tc = (*it)[c];
    const std::string cw = str(where, ".tool_calls[", c, "]");
    if (!tc.is_object()) return Status::error(str(cw, ": expected an object, got ", type_name(tc)));
    ToolCallIn call;
    auto id = tc.find("id");
    if (id != tc.end() && !id->is_null()) {
      if (!id->is_string()) return Status::error(str(cw, ".id: expected a string"));
      call.id = id->get<std::string>();
    }
    auto type = tc.find("type");
    if (type != tc.end() && !(type->is_string() && *type == "function")) {
      return Status::error(str(cw, ".type: expected \"function\""));
    }
    auto fn = tc.find("function");
    if (fn == tc.end() || !fn->is_object()) {
      return Status::error(str(cw, ".function: missing or not an object"));
    }
    auto name = fn->find("name");
    if (name == fn->end() || !name->is_string() || name->get_ref<const std::string&>().empty()) {
      return Status::error(str(cw, ".function.name: missing or not a non-empty string"));
    }
    call.name = name->get<std::string>();
    auto args = fn->find("arguments");
    if (args == fn->end() || args->is_null()) {
      return Status::error(str(cw, ".function.arguments: missing"));
    }
    if (args->is_object()) {
      // Already parsed (some clients send an object): taken as the arguments themselves.
      call.arguments = *args;
    } else if (args->is_string()) {
      const std::string& raw = args->get_ref<const std::string&>();
      Json parsed = Json::parse(raw, nullptr, /*allow_exceptions=*/false);
      if (parsed.is_discarded()) {
        // The reference keeps text that is not JSON as one string parameter named "arguments".
        call.arguments = Json::object();
        call.arguments["arguments"] = raw;
      } else if (!parsed.is_object()) {
        return Status::error(
            str(cw, ".function.arguments: expected a JSON object, got ", type_name(parsed)));
      } else {
        call.arguments = std::move(parsed);
      }
    } else {
      return Status::error(
          str(cw, ".function.arguments: expected a JSON string, got ", type_name(*args)));
    }
    out->push_back(std::move(call));
  }
  return Status::ok();
}

Result<Msg> read_message(const Json& m, const std::string& where) {
  if (!m.is_object()) return Status::error(str(where, ": expected an object, got ", type_name(m)));
  Msg msg;
  auto role = m.find("role");
  if (role == m.end() || !role->is_string()) {
    return Status::error(str(where, ".role: missing or not a string"));
  }
  msg.role = role->get<std::string>();
  if (msg.role != "system" && msg.role != "developer" && msg.role != "user" &&
      msg.role != "assistant" && msg.role != "tool" && msg.role != "latest_reminder") {
    return Status::error(str(where, ".role: unknown role '", msg.role,
                             "' (expected system, developer, user, assistant, tool or "
                             "latest_reminder)"));
  }
  SP_RETURN_IF_ERROR(read_text(m, where, "content", &msg.content));
  const bool has_content = msg.content.has_value();
  if ((msg.role == "user" || msg.role == "tool" || msg.role == "latest_reminder") && !has_content) {
    return Status::error(str(where, ".content: missing (a ", msg.role, " message needs content)"));
  }
  if (msg.role == "developer" && (!has_content || msg.content->empty())) {
    return Status::error(str(where, ".content: a developer message needs non-empty content"));
  }
  auto tools = m.find("tools");
  if (tools != m.end() && !tools->is_null()) {
    if (msg.role != "system" && msg.role != "developer") {
      return Status::error(str(where, ".tools: only system and developer messages carry tools"));
    }
    SP_ASSIGN_OR_RETURN(msg.tools, read_tools(*tools, where + ".tools"));
  }
  auto rf = m.find("response_format");
  if (rf != m.end() && !rf->is_null()) {
    if (msg.role != "system" && msg.role != "developer") {
      return Status::error(
          str(where, ".response_format: only system and developer messages carry it"));
    }
    msg.response_format = *rf;
  }
  if (msg.role == "assistant") {
    SP_RETURN_IF_ERROR(read_tool_calls(m, where, &msg.tool_calls));
    // vLLM's name for it is "reasoning"; reasoning_content wins when both are given.
    SP_RETURN_IF_ERROR(read_text(m, where, "reasoning_content", &msg.reasoning));
    if (!msg.reasoning) SP_RETURN_IF_ERROR(read_text(m, where, "reasoning", &msg.reasoning));
  }
  if (msg.role == "tool") {
    auto id = m.find("tool_call_id");
    if (id == m.end() || !id->is_string()) {
      return Status::error(str(where, ".tool_call_id: missing or not a string"));
    }
    msg.tool_call_id = id->get<std::string>();
  }
  auto task = m.find("task");
  if (task != m.end() && !task->is_null()) {
    if (!task->is_string() || !task_token(task->get_ref<const std::string&>())) {
      return Status::error(str(where, ".task: expected one of action, query, authority, domain, ",
                               "title, read_url"));
    }
    msg.task = task->get<std::string>();
  }
  auto wo_eos = m.find("wo_eos");
  if (wo_eos != m.end() && !wo_eos->is_null()) {
    if (!wo_eos->is_boolean()) return Status::error(str(where, ".wo_eos: expected a boolean"));
    msg.wo_eos = wo_eos->get<bool>();
  }
  return msg;
}

// A tool message answers a call of the assistant message just before it (other tool results may
// sit in between), and names one of that message's call ids when they have ids.
Status check_tool_sequence(const std::vector<Msg>& msgs, const std::vector<std::string>& where) {
  const Msg* caller = nullptr;
  for (size_t i = 0; i < msgs.size(); ++i) {
    const Msg& m = msgs[i];
    if (m.role == "assistant") {
      caller = m.tool_calls.empty() ? nullptr : &m;
      continue;
    }
    if (m.role != "tool") {
      caller = nullptr;
      continue;
    }
    if (caller == nullptr) {
      return Status::error(str(where[i],
                               ": a tool message must follow an assistant message with tool_calls "
                               "(or another tool message answering it)"));
    }
    bool any_id = false;
    bool match = false;
    for (const auto& c : caller->tool_calls) {
      any_id = any_id || !c.id.empty();
      match = match || c.id == m.tool_call_id;
    }
    if (any_id && !match) {
      return Status::error(str(where[i], ".tool_call_id: '", m.tool_call_id,
                               "' matches no tool call of the preceding assistant message"));
    }
  }
  return Status::ok();
}

// merge_tool_messages(): tool results and the user messages after them become one user message.
std::vector<Msg> merge_tool_messages(std::vector<Msg> in) {
  std::vector<Msg> out;
  for (auto& m : in) {
    const bool prev_user = !out.empty() && out.back().role == "user";
    if (m.role == "tool") {
      Block b{true, *m.content, m.tool_call_id};
      if (prev_user) {
        out.back().blocks.push_back(std::move(b));
      } else {
        Msg u;
        u.role = "user";
        u.blocks.push_back(std::move(b));
        out.push_back(std::move(u));
      }
    } else if (m.role == "user") {
      Block b{false, *m.content, ""};
      if (prev_user && !out.back().task) {
        out.back().blocks.push_back(std::move(b));
      } else {
        m.blocks = {std::move(b)};
        out.push_back(std::move(m));
      }
    } else {
      out.push_back(std::move(m));
    }
  }
  return out;
}

// sort_tool_results_by_call_order(): tool results follow the order of the calls (stable; a result
// whose id is unknown sorts as call 0); text blocks keep their places.
void sort_tool_results(std::vector<Msg>* msgs) {
  std::map<std::string, size_t> order;
  for (auto& m : *msgs) {
    if (m.role == "assistant" && !m.tool_calls.empty()) {
      order.clear();
      for (size_t i = 0; i < m.tool_calls.size(); ++i) {
        if (!m.tool_calls[i].id.empty()) order[m.tool_calls[i].id] = i;
      }
    } else if (m.role == "user" && !m.blocks.empty()) {
      std::vector<Block> results;
      for (const auto& b : m.blocks) {
        if (b.tool_result) results.push_back(b);
      }
      if (results.size() <= 1 || order.empty()) continue;
      auto key = [&](const Block& b) {
        auto it = order.find(b.tool_use_id);
        return it == order.end() ? size_t{0} : it->second;
      };
      std::stable_sort(results.begin(), results.end(),
                       [&](const Block& a, const Block& b) { return key(a) < key(b); });
      size_t next = 0;
      for (auto& b : m.blocks) {
        if (b.tool_result) b = results[next++];
      }
    }
  }
}

int last_user_index(const std::vector<Msg>& msgs) {
  for (int i = static_cast<int>(msgs.size()) - 1; i >= 0; --i) {
    if (msgs[i].role == "user" || msgs[i].role == "developer") return i;
  }
  return -1;
}

// _drop_thinking_messages(): before the last user message, assistant turns lose their reasoning
// and developer messages go.
std::vector<Msg> drop_thinking_messages(const std::vector<Msg>& msgs) {
  const int last_user = last_user_index(msgs);
  std::vector<Msg> out;
  for (int i = 0; i < static_cast<int>(msgs.size()); ++i) {
    const Msg& m = msgs[i];
    if (m.role == "user" || m.role == "system" || m.role == "latest_reminder" || i >= last_user) {
      out.push_back(m);
    } else if (m.role == "assistant") {
      out.push_back(m);
      out.back().reasoning.reset();
    }
  }
  return out;
}

constexpr std::string_view kReasoningEffortMax =
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to "
    "resolve the root cause, rigorously stress-testing your logic against all potential paths, "
    "edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, "
    "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left "
    "unchecked.\n\n";

constexpr std::string_view kToolsHead =
    "## Tools\n\nYou have access to a set of tools to help answer the user's question. You can "
    "invoke tools by writing a \"<｜DSML｜tool_calls>\" block like the following:\n\n"
    "<｜DSML｜tool_calls>\n"
    "<｜DSML｜invoke name=\"$TOOL_NAME\">\n"
    "<｜DSML｜parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE"
    "</｜DSML｜parameter>\n"
    "...\n"
    "</｜DSML｜invoke>\n"
    "<｜DSML｜invoke name=\"$TOOL_NAME2\">\n"
    "...\n"
    "</｜DSML｜invoke>\n"
    "</｜DSML｜tool_calls>\n\n"
    "String parameters should be specified as is and set `string=\"true\"`. For all other types "
    "(numbers, booleans, arrays, objects), pass the value in JSON format and set "
    "`string=\"false\"`.\n\n"
    "If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning "
    "inside <think>...</think> BEFORE any tool calls or final response.\n\n"
    "Otherwise, output directly after </think> with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n";
constexpr std::string_view kToolsTail =
    "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool "
    "calls.\n";

std::string render_tools(const Json& functions) {
  std::string out(kToolsHead);
  bool first = true;
  for (const auto& f : functions) {
    if (!first) out += "\n";
    first = false;
    dump_value(f, &out);
  }
  out += kToolsTail;
  return out;
}

void render_tools_and_format(const Msg& m, std::string* out) {
  if (python_truthy(m.tools)) *out += "\n\n" + render_tools(m.tools);
  if (python_truthy(m.response_format)) {
    *out +=
        "\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to "
        "reply:\n";
    dump_value(m.response_format, out);
  }
}

std::string render_tool_call(const ToolCallIn& tc) {
  std::string out = str("<", kDsml, "invoke name=\"", tc.name, "\">\n");
  bool first = true;
  for (const auto& [k, v] : tc.arguments.items()) {
    if (!first) out += "\n";
    first = false;
    out += str("<", kDsml, "parameter name=\"", k, "\" string=\"", v.is_string() ? "true" : "false",
               "\">");
    if (v.is_string()) {
      out += v.get_ref<const std::string&>();
    } else {
      dump_value(v, &out);
    }
    out += str("</", kDsml, "parameter>");
  }
  out += str("\n</", kDsml, "invoke>");
  return out;
}

struct RenderContext {
  const std::vector<Msg>& msgs;
  bool thinking;
  bool drop_thinking;
  ReasoningEffort effort;
  int last_user;
};

// render_message()
std::string render_message(int index, const RenderContext& rc) {
  const Msg& m = rc.msgs[static_cast<size_t>(index)];
  std::string out;
  if (index == 0 && rc.thinking && rc.effort == ReasoningEffort::kMax) out += kReasoningEffortMax;

  if (m.role == "system") {
    out += m.content.value_or("");
    render_tools_and_format(m, &out);
  } else if (m.role == "developer") {
    out += kUserToken;
    out += *m.content;
    render_tools_and_format(m, &out);
  } else if (m.role == "user") {
    out += kUserToken;
    for (size_t b = 0; b < m.blocks.size(); ++b) {
      if (b > 0) out += "\n\n";
      if (m.blocks[b].tool_result) {
        out += "<tool_result>" + m.blocks[b].text + "</tool_result>";
      } else {
        out += m.blocks[b].text;
      }
    }
  } else if (m.role == "latest_reminder") {
    out += kLatestReminderToken;
    out += *m.content;
  } else {  // assistant
    const bool prev_has_task = index > 0 && rc.msgs[static_cast<size_t>(index - 1)].task;
    if (rc.thinking && !prev_has_task && (!rc.drop_thinking || index > rc.last_user)) {
      out += m.reasoning.value_or("");
      out += kThinkEnd;
    }
    out += m.content.value_or("");
    if (!m.tool_calls.empty()) {
      out += str("\n\n<", kDsml, "tool_calls>\n");
      for (size_t c = 0; c < m.tool_calls.size(); ++c) {
        if (c > 0) out += "\n";
        out += render_tool_call(m.tool_calls[c]);
      }
      out += str("\n</", kDsml, "tool_calls>");
    }
    if (!m.wo_eos) out += kEos;
  }

  // What follows: the next message's own rendering, or the turn hand-over to the assistant.
  const size_t next = static_cast<size_t>(index) + 1;
  if (next < rc.msgs.size() && rc.msgs[next].role != "assistant" &&
      rc.msgs[next].role != "latest_reminder") {
    return out;
  }
  if (m.task) {
    const std::string_view token = *task_token(*m.task);
    if (*m.task != "action") {
      out += token;
    } else {
      out += kAssistantToken;
      out += rc.thinking ? kThinkStart : kThinkEnd;
      out += token;
    }
  } else if (m.role == "user" || m.role == "developer") {
    out += kAssistantToken;
    const bool think = rc.thinking && (!rc.drop_thinking || index >= rc.last_user);
    out += think ? kThinkStart : kThinkEnd;
  }
  return out;
}

Result<std::vector<Msg>> read_list(const Json& list, const char* name,
                                   std::vector<std::string>* where) {
  if (!list.is_array()) {
    return Status::error(str(name, ": expected a list of messages, got ", type_name(list)));
  }
  std::vector<Msg> msgs;
  for (size_t i = 0; i < list.size(); ++i) {
    where->push_back(str(name, "[", i, "]"));
    SP_ASSIGN_OR_RETURN(Msg m, read_message(list[i], where->back()));
    msgs.push_back(std::move(m));
  }
  return msgs;
}

// encode_messages() on validated messages.
std::string encode(std::vector<Msg> context, std::vector<Msg> messages, const ChatOptions& opt) {
  const size_t n_context_in = context.size();
  context = merge_tool_messages(std::move(context));
  messages = merge_tool_messages(std::move(messages));
  std::vector<Msg> full = context;
  full.insert(full.end(), messages.begin(), messages.end());
  sort_tool_results(&full);

  bool drop = opt.drop_thinking;
  for (const auto& m : full) drop = drop && !python_truthy(m.tools);

  size_t context_len = context.size();
  if (opt.thinking && drop) {
    // The reference sorts `context` separately; sorting the concatenation gives the same blocks
    // (only assistant tool_calls feed the order), so the context is taken from `full`.
    std::vector<Msg> sorted_context(full.begin(), full.begin() + context.size());
    full = drop_thinking_messages(full);
    context_len = drop_thinking_messages(sorted_context).size();
  }

  std::string prompt = opt.add_bos && n_context_in == 0 ? std::string(kBos) : std::string();
  const RenderContext rc{full, opt.thinking, drop, opt.reasoning_effort, last_user_index(full)};
  for (size_t i = context_len; i < full.size(); ++i) {
    prompt += render_message(static_cast<int>(i), rc);
  }
  return prompt;
}

}  // namespace

std::string python_json_dumps(const Json& value) {
  std::string out;
  dump_value(value, &out);
  return out;
}

bool python_truthy(const Json& v) {
  switch (v.type()) {
    case Json::value_t::null:
      return false;
    case Json::value_t::boolean:
      return v.get<bool>();
    case Json::value_t::number_integer:
      return v.get<int64_t>() != 0;
    case Json::value_t::number_unsigned:
      return v.get<uint64_t>() != 0;
    case Json::value_t::number_float:
      return v.get<double>() != 0.0;
    case Json::value_t::string:
      return !v.get_ref<const std::string&>().empty();
    case Json::value_t::array:
    case Json::value_t::object:
      return !v.empty();
    default:
      return false;
  }
}

Result<ReasoningEffort> parse_reasoning_effort(const Json& value) {
  if (value.is_null()) return ReasoningEffort::kNone;
  if (value.is_string()) {
    const std::string& s = value.get_ref<const std::string&>();
    if (s == "max") return ReasoningEffort::kMax;
    if (s == "high" || s == "medium" || s == "low" || s == "minimal") return ReasoningEffort::kHigh;
    if (s == "none") return ReasoningEffort::kNone;
  }
  return Status::error(str("reasoning_effort: expected one of none, minimal, low, medium, high, ",
                           "max, got ", python_json_dumps(value)));
}

Status apply_chat_template_kwargs(const Json& kwargs, ChatOptions* options) {
  if (kwargs.is_null()) return Status::ok();
  if (!kwargs.is_object()) {
    return Status::error(str("chat_template_kwargs: expected an object, got ", type_name(kwargs)));
  }
  auto flag = [&](const char* key, std::optional<bool>* out) -> Status {
    auto it = kwargs.find(key);
    if (it == kwargs.end() || it->is_null()) return Status::ok();
    if (!it->is_boolean()) {
      return Status::error(
          str("chat_template_kwargs.", key, ": expected a boolean, got ", type_name(*it)));
    }
    *out = it->get<bool>();
    return Status::ok();
  };
  std::optional<bool> thinking, enable_thinking, drop_thinking;
  SP_RETURN_IF_ERROR(flag("thinking", &thinking));
  SP_RETURN_IF_ERROR(flag("enable_thinking", &enable_thinking));
  SP_RETURN_IF_ERROR(flag("drop_thinking", &drop_thinking));
  if (thinking || enable_thinking) {
    options->thinking = thinking.value_or(false) || enable_thinking.value_or(false);
  }
  if (drop_thinking) options->drop_thinking = *drop_thinking;
  auto effort = kwargs.find("reasoning_effort");
  if (effort != kwargs.end() && !effort->is_null()) {
    auto parsed = parse_reasoning_effort(*effort);
    if (!parsed) return Status::error("chat_template_kwargs." + parsed.status().message());
    if (effort->is_string() && *effort == "none") options->thinking = false;
    options->reasoning_effort = *parsed;
  }
  return Status::ok();
}

Result<std::string> encode_messages(const Json& messages, const ChatOptions& options,
                                    const Json& context) {
  std::vector<std::string> where;
  std::vector<Msg> ctx;
  if (!context.is_null()) {
    SP_ASSIGN_OR_RETURN(ctx, read_list(context, "context", &where));
  }
  SP_ASSIGN_OR_RETURN(std::vector<Msg> msgs, read_list(messages, "messages", &where));
  if (msgs.empty()) return Status::error("messages: empty list");
  std::vector<Msg> all = ctx;
  all.insert(all.end(), msgs.begin(), msgs.end());
  SP_RETURN_IF_ERROR(check_tool_sequence(all, where));
  return encode(std::move(ctx), std::move(msgs), options);
}

Result<std::string> encode_chat(const Json& messages, const Json& tools,
                                const ChatOptions& options) {
  std::vector<std::string> where;
  SP_ASSIGN_OR_RETURN(Json functions, read_tools(tools, "tools"));
  SP_ASSIGN_OR_RETURN(std::vector<Msg> msgs, read_list(messages, "messages", &where));
  if (msgs.empty()) return Status::error("messages: empty list");
  SP_RETURN_IF_ERROR(check_tool_sequence(msgs, where));
  if (python_truthy(functions)) {
    if (msgs[0].role == "system" || msgs[0].role == "developer") {
      msgs[0].tools = std::move(functions);
    } else {
      Msg system;
      system.role = "system";
      system.tools = std::move(functions);
      msgs.insert(msgs.begin(), std::move(system));
    }
  }
  return encode({}, std::move(msgs), options);
}

}  // namespace sp::chat
