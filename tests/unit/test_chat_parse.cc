// sp_chat completion parsing: one-shot rules, malformed DSML, and the streaming parser against the
// one-shot parser at every split; parse(render(assistant message)) == the message.
#include <gtest/gtest.h>

#include <cmath>
#include <iterator>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "text/chat_format.h"
#include "text/chat_parse.h"

namespace sp::chat {

// gtest prints a failed comparison of parsed completions as the OpenAI message.
void PrintTo(const ParsedCompletion& p, std::ostream* os) {
  *os << to_openai_message(p, true).dump(-1, ' ', false, Json::error_handler_t::replace);
}

namespace {

ParseOptions opts(bool thinking) {
  ParseOptions o;
  o.thinking = thinking;
  o.id_seed = 42;
  return o;
}

ParsedCompletion collect(std::vector<StreamDelta> deltas) {
  ParsedCompletion p;
  for (auto& d : deltas) {
    p.reasoning_content += d.reasoning_content;
    p.content += d.content;
    for (auto& t : d.tool_calls) {
      EXPECT_EQ(t.index, static_cast<int>(p.tool_calls.size()));
      p.tool_calls.push_back({t.id, t.name, t.arguments});
    }
  }
  return p;
}

bool valid_utf8(const std::string& s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    size_t len = c < 0x80 ? 1 : (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : 4;
    if (i + len > s.size()) return false;
    for (size_t k = 1; k < len; ++k) {
      if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return false;
    }
    i += len;
  }
  return true;
}

// Feeds `text` cut at `cuts` (sorted offsets); checks each delta is whole UTF-8.
ParsedCompletion stream(const std::string& text, const std::vector<size_t>& cuts, bool thinking) {
  StreamingParser parser(opts(thinking));
  std::vector<StreamDelta> deltas;
  size_t prev = 0;
  for (size_t cut : cuts) {
    deltas.push_back(parser.feed(std::string_view(text).substr(prev, cut - prev)));
    prev = cut;
  }
  deltas.push_back(parser.feed(std::string_view(text).substr(prev)));
  deltas.push_back(parser.finish());
  for (const auto& d : deltas) {
    EXPECT_TRUE(valid_utf8(d.content) && valid_utf8(d.reasoning_content)) << text;
  }
  return collect(std::move(deltas));
}

void expect_stream_matches(const std::string& text, bool thinking, std::mt19937* rng) {
  const ParsedCompletion want = parse_completion(text, opts(thinking));
  for (size_t i = 0; i <= text.size(); ++i) {
    ASSERT_EQ(stream(text, {i}, thinking), want) << "split at " << i << " of " << text;
  }
  for (int r = 0; r < 20; ++r) {
    std::vector<size_t> cuts;
    for (size_t i = 1; i < text.size(); ++i) {
      if ((*rng)() % 4 == 0) cuts.push_back(i);
    }
    ASSERT_EQ(stream(text, cuts, thinking), want) << text;
  }
  std::vector<size_t> bytes;  // one byte at a time
  for (size_t i = 1; i < text.size(); ++i) bytes.push_back(i);
  ASSERT_EQ(stream(text, bytes, thinking), want) << text;
}

TEST(ChatParse, ReasoningContentAndToolCalls) {
  const std::string text =
      "plan it</think>Sure.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n"
      "<｜DSML｜parameter name=\"city\" string=\"true\">Köln \"x\"</｜DSML｜parameter>\n"
      "<｜DSML｜parameter name=\"days\" string=\"false\">[1, 2]</｜DSML｜parameter>\n"
      "</｜DSML｜invoke>\n<｜DSML｜invoke name=\"noop\">\n\n</｜DSML｜invoke>\n"
      "</｜DSML｜tool_calls><｜end▁of▁sentence｜>";
  ParsedCompletion p = parse_completion(text, opts(true));
  EXPECT_EQ(p.reasoning_content, "plan it");
  EXPECT_EQ(p.content, "Sure.");
  ASSERT_EQ(p.tool_calls.size(), 2u);
  EXPECT_EQ(p.tool_calls[0].name, "get_weather");
  EXPECT_EQ(p.tool_calls[0].arguments, "{\"city\": \"Köln \\\"x\\\"\", \"days\": [1, 2]}");
  EXPECT_EQ(p.tool_calls[1].arguments, "{}");
  EXPECT_EQ(p.tool_calls[0].id.size(), 29u);
  EXPECT_EQ(p.tool_calls[0].id.rfind("call_", 0), 0u);
  EXPECT_NE(p.tool_calls[0].id, p.tool_calls[1].id);
  const Json m = to_openai_message(p, true);
  EXPECT_EQ(m["tool_calls"][0]["type"], "function");
  EXPECT_EQ(m["tool_calls"][1]["function"]["name"], "noop");
  EXPECT_EQ(m["reasoning_content"], "plan it");
}

TEST(ChatParse, SimpleCases) {
  EXPECT_EQ(parse_completion("hello<｜end▁of▁sentence｜>ignored", opts(false)).content, "hello");
  EXPECT_EQ(parse_completion("still thinking", opts(true)).reasoning_content, "still thinking");
  EXPECT_EQ(parse_completion("still thinking", opts(true)).content, "");
  EXPECT_EQ(parse_completion("a</think>b</think>", opts(true)).content, "b</think>");
  EXPECT_EQ(parse_completion("a</think>b", opts(false)).content, "a</think>b");
  const Json m = to_openai_message(parse_completion("x", opts(false)), false);
  EXPECT_EQ(m.dump(), R"({"role":"assistant","content":"x"})");
}

TEST(ChatParse, MalformedBlocksAreContent) {
  const std::string call =
      "<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n"
      "<｜DSML｜parameter name=\"a\" string=\"false\">1</｜DSML｜parameter>\n</｜DSML｜invoke>\n"
      "</｜DSML｜tool_calls>";
  ASSERT_EQ(parse_completion("x\n\n" + call, opts(false)).tool_calls.size(), 1u);
  const std::string bad[] = {
      "x\n\n" + call.substr(0, call.size() - 5),                // unterminated
      "x\n\n<｜DSML｜tool_calls>\n</｜DSML｜tool_calls>",       // no invoke
      "x\n\n<｜DSML｜tool_calls>\nhello</｜DSML｜tool_calls>",  // stray text
      "x\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke "
      "name=\"\">\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>",
      "x\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"a\" "
      "string=\"false\">{not json</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>",
      "x\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"a\" "
      "string=\"true\">1</｜DSML｜parameter><｜DSML｜parameter name=\"a\" "
      "string=\"true\">2</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>",
      "x\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"a\" "
      "string=\"maybe\">1</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>",
  };
  std::mt19937 rng(3);
  for (const auto& text : bad) {
    ParsedCompletion p = parse_completion(text + "<｜end▁of▁sentence｜>", opts(false));
    EXPECT_TRUE(p.tool_calls.empty()) << text;
    EXPECT_EQ(p.content, text);
    expect_stream_matches(text, false, &rng);
  }
  // Text after the block is dropped; whitespace between tags is free (vLLM's grammar).
  ParsedCompletion p = parse_completion(
      "<｜DSML｜tool_calls> <｜DSML｜invoke  name=\"f\" >"
      "<｜DSML｜parameter name=\"a\"  string=\"true\" >v</｜DSML｜parameter>"
      "</｜DSML｜invoke></｜DSML｜tool_calls>trailing",
      opts(false));
  ASSERT_EQ(p.tool_calls.size(), 1u);
  EXPECT_EQ(p.tool_calls[0].arguments, "{\"a\": \"v\"}");
  EXPECT_EQ(p.content, "");
}

TEST(ChatParse, StreamingHoldsBackPartialTags) {
  StreamingParser s(opts(true));
  StreamDelta d = s.feed("thinking </thi");
  EXPECT_EQ(d.reasoning_content, "thinking ");
  d = s.feed("nk>answer\n");
  EXPECT_EQ(d.reasoning_content, "");
  EXPECT_EQ(d.content, "answer");
  d = s.feed("\n<｜DSML｜too");
  EXPECT_TRUE(d.empty());
  d = s.feed("l_calls>\n<｜DSML｜invoke name=\"f\">\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>");
  ASSERT_EQ(d.tool_calls.size(), 1u);
  EXPECT_EQ(d.tool_calls[0].name, "f");
  EXPECT_EQ(d.content, "");
  EXPECT_TRUE(s.finish().empty());

  StreamingParser t(opts(false));
  EXPECT_EQ(t.feed("x<｜end▁of▁sen").content, "x");
  EXPECT_EQ(t.feed("tence｜>more").content, "");
  EXPECT_TRUE(t.feed("more").empty());
  EXPECT_TRUE(t.finish().empty());

  StreamingParser u(opts(false));
  EXPECT_EQ(u.feed("\xe6\x97").content, "");  // half of 日
  EXPECT_EQ(u.feed("\xa5 <").content, "日 ");
  EXPECT_EQ(u.finish().content, "<");
}

// Random assistant turns rendered by the encoder parse back to themselves, and the streaming
// parser agrees with the one-shot parser at every split.
const char* const kWords[] = {"hello", "Grüße", "日本語", "🚀",   "a < b",  "\"q\"",           "\\",
                              "\n",    "\n\n",  " ",      "{x}", "</thin", "<｜DSML｜invoke", "｜",
                              "tab\t", ""};

std::string random_text(std::mt19937* rng) {
  std::string s;
  for (int n = (*rng)() % 5; n > 0; --n) s += kWords[(*rng)() % std::size(kWords)];
  return s;
}

Json random_value(std::mt19937* rng, int depth) {
  switch ((*rng)() % (depth < 2 ? 7 : 5)) {
    case 0:
      return random_text(rng);
    case 1:
      return static_cast<int64_t>((*rng)() % 2000) - 1000;
    case 2:
      return std::ldexp(static_cast<double>((*rng)() % 100000) - 50000, (*rng)() % 80 - 40);
    case 3:
      return (*rng)() % 2 == 0;
    case 4:
      return nullptr;
    case 5: {
      Json a = Json::array();
      for (int n = (*rng)() % 3; n > 0; --n) a.push_back(random_value(rng, depth + 1));
      return a;
    }
    default: {
      Json o = Json::object();
      for (int n = (*rng)() % 3; n > 0; --n) {
        o["k" + std::to_string(n) + random_text(rng)] = random_value(rng, depth + 1);  // any key
      }
      return o;
    }
  }
}

TEST(ChatParse, RoundTripAndStreamingProperty) {
  std::mt19937 rng(1234);
  for (int trial = 0; trial < 150; ++trial) {
    const bool thinking = trial % 2 == 1;
    ParsedCompletion want;
    want.content = random_text(&rng);
    if (thinking) want.reasoning_content = random_text(&rng);
    Json msg = Json::object();
    msg["role"] = "assistant";
    msg["content"] = want.content;
    if (thinking) msg["reasoning_content"] = want.reasoning_content;
    const int n_calls = rng() % 4;
    if (n_calls > 0) msg["tool_calls"] = Json::array();
    for (int c = 0; c < n_calls; ++c) {
      Json args = Json::object();
      for (int a = rng() % 4; a > 0; --a) {
        // Parameter names are written unescaped inside name="...": no quotes in them.
        std::string key = "p" + std::to_string(a) + "_" + random_text(&rng);
        std::erase(key, '"');
        args[key] = random_value(&rng, 0);
      }
      ToolCall tc{"", c % 2 ? "search" : "get_weather", python_json_dumps(args)};
      msg["tool_calls"].push_back({{"id", "c" + std::to_string(c)},
                                   {"type", "function"},
                                   {"function", {{"name", tc.name}, {"arguments", tc.arguments}}}});
      want.tool_calls.push_back(tc);
    }
    const Json user = Json::parse(R"({"role": "user", "content": "q"})");
    ChatOptions copt;
    copt.thinking = thinking;
    auto prefix = encode_chat(Json::array({user}), Json(), copt);
    auto full = encode_chat(Json::array({user, msg}), Json(), copt);
    ASSERT_TRUE(prefix.is_ok() && full.is_ok()) << full.status().message();
    ASSERT_EQ(full->rfind(*prefix, 0), 0u);
    const std::string completion = full->substr(prefix->size());

    ParsedCompletion got = parse_completion(completion, opts(thinking));
    for (size_t i = 0; i < got.tool_calls.size(); ++i) {
      want.tool_calls[i].id = got.tool_calls[i].id;
    }
    ASSERT_EQ(got, want) << completion;
    // Without the end-of-sentence token too (a server usually stops before emitting it).
    const std::string bare = completion.substr(0, completion.size() - kEos.size());
    ASSERT_EQ(parse_completion(bare, opts(thinking)), want);
    if (trial % 5 == 0) expect_stream_matches(completion, thinking, &rng);
    // Truncations and corruptions: whatever the verdict, streaming agrees with one-shot.
    // (Cut and insert at character boundaries: the input stays UTF-8.)
    auto boundary = [&](size_t i) {
      while (i > 0 && i < bare.size() && (static_cast<unsigned char>(bare[i]) & 0xC0) == 0x80) --i;
      return i;
    };
    const std::string cut = bare.substr(0, boundary(rng() % (bare.size() + 1)));
    expect_stream_matches(cut, thinking, &rng);
    std::string corrupt = bare;
    if (!corrupt.empty())
      corrupt.insert(boundary(rng() % corrupt.size()), kWords[rng() % std::size(kWords)]);
    expect_stream_matches(corrupt, thinking, &rng);
  }
}

}  // namespace
}  // namespace sp::chat
