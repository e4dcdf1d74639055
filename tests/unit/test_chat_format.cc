// sp_chat encoder: the checked-in goldens, Python-compatible JSON, options, and malformed input.
// (The byte-for-byte comparison with the reference Python encoder is tests/chat/check_encoder.py.)
#include <gtest/gtest.h>

#include <fstream>
#include <iterator>
#include <random>
#include <sstream>
#include <string>

#include "text/chat_format.h"

namespace sp::chat {
namespace {

Json load_goldens() {
  std::ifstream f(std::string(SP_TEST_DATA) + "/chat/golden.json");
  std::stringstream ss;
  ss << f.rdbuf();
  return Json::parse(ss.str());
}

Result<std::string> encode_case(const Json& c) {
  ChatOptions opt;
  const Json o = c.value("options", Json::object());
  opt.thinking = o.value("thinking", false);
  opt.drop_thinking = o.value("drop_thinking", true);
  opt.add_bos = o.value("add_bos", true);
  if (o.contains("reasoning_effort")) {
    SP_ASSIGN_OR_RETURN(opt.reasoning_effort, parse_reasoning_effort(o["reasoning_effort"]));
  }
  if (o.contains("chat_template_kwargs")) {
    SP_RETURN_IF_ERROR(apply_chat_template_kwargs(o["chat_template_kwargs"], &opt));
  }
  const Json null;
  if (c["op"] == "encode_chat") {
    return encode_chat(c["messages"], c.contains("tools") ? c["tools"] : null, opt);
  }
  return encode_messages(c["messages"], opt, c.contains("context") ? c["context"] : null);
}

TEST(ChatFormat, Goldens) {
  const Json goldens = load_goldens();
  ASSERT_GE(goldens.size(), 5u);
  for (const auto& g : goldens) {
    SCOPED_TRACE(g["name"].get<std::string>());
    auto prompt = encode_case(g);
    ASSERT_TRUE(prompt.is_ok()) << prompt.status().message();
    EXPECT_EQ(*prompt, g["expected"].get<std::string>());
  }
}

TEST(ChatFormat, PromptEndsByMode) {
  const Json msgs = Json::parse(R"([{"role": "user", "content": "hi"}])");
  ChatOptions opt;
  EXPECT_EQ(*encode_chat(msgs, Json(), opt),
            "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜></think>");
  opt.thinking = true;
  EXPECT_EQ(*encode_chat(msgs, Json(), opt),
            "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜><think>");
}

TEST(ChatFormat, PythonJsonDumps) {
  auto d = [](const char* text) { return python_json_dumps(Json::parse(text)); };
  EXPECT_EQ(d(R"({"b": 1, "a": [true, null, "x"]})"), R"({"b": 1, "a": [true, null, "x"]})");
  EXPECT_EQ(d("{}"), "{}");
  EXPECT_EQ(d("[]"), "[]");
  EXPECT_EQ(d("1e16"), "1e+16");
  EXPECT_EQ(d("1e15"), "1000000000000000.0");
  EXPECT_EQ(d("0.0001"), "0.0001");
  EXPECT_EQ(d("0.00001"), "1e-05");
  EXPECT_EQ(d("-0.0"), "-0.0");
  EXPECT_EQ(d("123.0"), "123.0");
  EXPECT_EQ(d("1.5e300"), "1.5e+300");
  EXPECT_EQ(d("5e-324"), "5e-324");
  EXPECT_EQ(d("0.30000000000000004"), "0.30000000000000004");
  EXPECT_EQ(d("123456.789"), "123456.789");
  EXPECT_EQ(d("18446744073709551615"), "18446744073709551615");
  EXPECT_EQ(d("-9223372036854775808"), "-9223372036854775808");
  EXPECT_EQ(d(R"("q\"b\\n\n\t\u0001\u007f é 🚀")"), "\"q\\\"b\\\\n\\n\\t\\u0001\x7f é 🚀\"");
}

TEST(ChatFormat, TruthinessFollowsPython) {
  for (const char* falsy : {"null", "false", "0", "0.0", "\"\"", "[]", "{}"}) {
    EXPECT_FALSE(python_truthy(Json::parse(falsy))) << falsy;
  }
  for (const char* truthy : {"true", "1", "-0.5", "\" \"", "[0]", "{\"a\": null}"}) {
    EXPECT_TRUE(python_truthy(Json::parse(truthy))) << truthy;
  }
}

TEST(ChatFormat, ChatTemplateKwargs) {
  ChatOptions opt;
  EXPECT_FALSE(opt.thinking);  // chat mode by default
  ASSERT_TRUE(apply_chat_template_kwargs(Json::parse(R"({"enable_thinking": true})"), &opt));
  EXPECT_TRUE(opt.thinking);
  ASSERT_TRUE(apply_chat_template_kwargs(Json::parse(R"({"thinking": false})"), &opt));
  EXPECT_FALSE(opt.thinking);
  ASSERT_TRUE(apply_chat_template_kwargs(
      Json::parse(R"({"thinking": true, "reasoning_effort": "max", "drop_thinking": false,
                      "unrelated": 3})"),
      &opt));
  EXPECT_TRUE(opt.thinking);
  EXPECT_FALSE(opt.drop_thinking);
  EXPECT_EQ(opt.reasoning_effort, ReasoningEffort::kMax);
  ASSERT_TRUE(apply_chat_template_kwargs(Json::parse(R"({"reasoning_effort": "none"})"), &opt));
  EXPECT_FALSE(opt.thinking);
  ASSERT_TRUE(apply_chat_template_kwargs(Json(), &opt));
  Status st = apply_chat_template_kwargs(Json::parse(R"({"enable_thinking": "yes"})"), &opt);
  ASSERT_FALSE(st);
  EXPECT_NE(st.message().find("chat_template_kwargs.enable_thinking"), std::string::npos);
}

TEST(ChatFormat, RequestToolsReplaceThoseOfTheLeadingSystemMessage) {
  const Json tools = Json::parse(R"([{"type": "function", "function": {"name": "new_tool"}}])");
  const Json msgs = Json::parse(R"([
    {"role": "system", "content": "S", "tools": [{"type": "function", "function": {"name": "old"}}]},
    {"role": "user", "content": "u"}])");
  auto p = encode_chat(msgs, tools, ChatOptions());
  ASSERT_TRUE(p.is_ok()) << p.status().message();
  EXPECT_NE(p->find("{\"name\": \"new_tool\"}"), std::string::npos);
  EXPECT_EQ(p->find("\"old\""), std::string::npos);
  EXPECT_EQ(p->rfind("<｜begin▁of▁sentence｜>S\n\n## Tools", 0), 0u);
}

TEST(ChatFormat, ErrorsNameTheMessageAndField) {
  struct Case {
    const char* messages;
    const char* error;
  } cases[] = {
      {R"([{"role": "robot", "content": "x"}])", "messages[0].role: unknown role 'robot'"},
      {R"([{"role": "user", "content": "a"}, {"role": "user", "content": {"x": 1}}])",
       "messages[1].content: expected a string, null or a list of text parts, got object"},
      {R"([{"role": "user", "content": "a"}, {"role": "tool", "content": "r", "tool_call_id": "1"}])",
       "messages[1]: a tool message must follow"},
      {R"([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b",
           "tool_calls": [{"id": "1", "function": {"name": "f", "arguments": 3}}]}])",
       "messages[1].tool_calls[0].function.arguments: expected a JSON string, got number"},
      {R"([{"role": "user", "content": "a", "wo_eos": "no"}])", "messages[0].wo_eos"},
  };
  for (const auto& c : cases) {
    auto p = encode_chat(Json::parse(c.messages), Json(), ChatOptions());
    ASSERT_FALSE(p.is_ok()) << c.messages;
    EXPECT_NE(p.status().message().find(c.error), std::string::npos)
        << p.status().message() << " does not contain " << c.error;
  }
}

// Any JSON in any field is an error or a prompt, never a crash (ASan/UBSan run this too).
TEST(ChatFormat, MutatedConversationsNeverCrash) {
  const Json base = Json::parse(R"([
    {"role": "system", "content": "s", "tools": [{"type": "function", "function": {"name": "f",
      "parameters": {"type": "object"}}}], "response_format": {"type": "json_object"}},
    {"role": "user", "content": [{"type": "text", "text": "q"}], "task": "query"},
    {"role": "assistant", "content": null, "reasoning_content": "r", "tool_calls": [
      {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "ok"},
    {"role": "latest_reminder", "content": "x"}])");
  const Json junk[] = {Json(),
                       Json(true),
                       Json(0),
                       Json(-1.5),
                       Json(""),
                       Json("x"),
                       Json::array(),
                       Json::object(),
                       Json::parse(R"([{"type": "text"}])"),
                       Json::parse(R"({"name": 1})")};
  std::mt19937 rng(7);
  int ok = 0, errors = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    Json msgs = base;
    for (int k = 0; k < 1 + static_cast<int>(rng() % 3); ++k) {
      // Replace a random node (message, field or nested value) with junk.
      Json* node = &msgs;
      for (int depth = 0; depth < 4 && (node->is_array() || node->is_object()) && !node->empty();
           ++depth) {
        auto it = node->begin();
        std::advance(it, rng() % node->size());
        node = &*it;
        if (rng() % 3 == 0) break;
      }
      *node = junk[rng() % std::size(junk)];
    }
    ChatOptions opt;
    opt.thinking = rng() % 2;
    opt.drop_thinking = rng() % 2;
    auto p = rng() % 2 ? encode_chat(msgs, junk[rng() % std::size(junk)], opt)
                       : encode_messages(msgs, opt, rng() % 4 ? Json() : junk[rng() % 8]);
    (p.is_ok() ? ok : errors)++;
  }
  EXPECT_GT(ok, 0);
  EXPECT_GT(errors, 0);
}

}  // namespace
}  // namespace sp::chat
