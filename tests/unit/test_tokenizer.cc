// Tokenizer: malformed tokenizer.json files are errors naming the file and field; UTF-8 repair
// and the streaming detokenizer on hand-made cases. (Token-for-token agreement with `tokenizers`
// on real files is tests/tokenizer/tokenizer_oracle.py.)
#include <gtest/gtest.h>

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "text/tokenizer.h"

namespace sp {
namespace {

using json = nlohmann::json;

// A small valid byte-level BPE tokenizer.json: the 256 byte symbols, merges "a b" -> "ab",
// "ab c" -> "abc", "Ġ a" -> "Ġa", and one special token.
json tiny_tokenizer() {
  json vocab = json::object();
  uint32_t next = 256;
  int id = 0;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174;
    const uint32_t cp = printable ? static_cast<uint32_t>(b) : next++;
    std::string s;
    if (cp < 0x80) {
      s.push_back(static_cast<char>(cp));
    } else {
      s.push_back(static_cast<char>(0xC0 | (cp >> 6)));
      s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
    vocab[s] = id++;
  }
  vocab["ab"] = id++;
  vocab["abc"] = id++;
  vocab
      ["\xC4\xA0"
       "a"] = id++;  // "Ġa"
  json j = {{"version", "1.0"},
            {"added_tokens", json::array({{{"id", id},
                                           {"content", "<s>"},
                                           {"special", true},
                                           {"normalized", false},
                                           {"lstrip", false},
                                           {"rstrip", false},
                                           {"single_word", false}}})},
            {"normalizer", nullptr},
            {"pre_tokenizer",
             {{"type", "Sequence"},
              {"pretokenizers",
               json::array(
                   {{{"type", "Split"},
                     {"pattern", {{"Regex", "\\p{N}{1,3}"}}},
                     {"behavior", "Isolated"},
                     {"invert", false}},
                    {{"type", "Split"},
                     {"pattern", {{"Regex", "\\s+(?!\\S)|\\s+|[^\\s]+"}}},
                     {"behavior", "Isolated"},
                     {"invert", false}},
                    {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}})}}},
            {"post_processor", nullptr},
            {"decoder", {{"type", "ByteLevel"}}},
            {"model",
             {{"type", "BPE"},
              {"vocab", vocab},
              {"merges", json::array({"a b", json::array({"ab", "c"}), "\xC4\xA0 a"})}}}};
  return j;
}

std::string load_error(const json& j) {
  auto t = Tokenizer::from_json(j.dump(), "dir/tokenizer.json");
  return t ? std::string() : t.status().message();
}

TEST(Tokenizer, EncodesAndDecodesTheTinyFile) {
  auto t = Tokenizer::from_json(tiny_tokenizer().dump(), "tiny");
  ASSERT_TRUE(t) << t.status().message();
  auto ids = (*t)->encode("abc ab<s>a 1234");
  ASSERT_TRUE(ids);
  // Byte b has id b; the special token cuts the text first; digits split in runs of up to 3.
  const int32_t abc = 257, ab = 256, special = 259;
  EXPECT_EQ(*ids, (std::vector<int32_t>{abc, ' ', ab, special, 'a', ' ', '1', '2', '3', '4'}));
  EXPECT_EQ((*t)->decode(*ids), "abc ab<s>a 1234");
  EXPECT_EQ((*t)->decode(*ids, /*skip_special=*/true), "abc aba 1234");
  EXPECT_EQ((*t)->vocab_size(), 260);
  EXPECT_EQ((*t)->token_id("<s>"), std::optional<int32_t>(special));
  EXPECT_TRUE((*t)->is_special(special));
  EXPECT_FALSE((*t)->is_special(abc));
}

TEST(Tokenizer, MalformedFilesNameTheFileAndField) {
  EXPECT_NE(load_error(json::parse("[1]")).find("dir/tokenizer.json: expected a JSON object"),
            std::string::npos);
  auto t = Tokenizer::from_json("{\"model\": ", "dir/tokenizer.json");
  ASSERT_FALSE(t);
  EXPECT_NE(t.status().message().find("dir/tokenizer.json: not valid JSON"), std::string::npos);

  struct Case {
    std::string path;  // JSON pointer of the field to change
    json value;
    std::string expect;
  };
  const std::vector<Case> cases = {
      {"/model", nullptr, "field 'model': missing"},
      {"/model/vocab", json::array(), "field 'model.vocab': expected an object, got array"},
      {"/model/vocab/ab", "x", "field 'model.vocab[\"ab\"]': expected a token id"},
      {"/model/vocab/ab", -3, "field 'model.vocab[\"ab\"]': expected a token id"},
      {"/model/vocab/ab", 0, "field 'model.vocab': id 0 is given to both"},
      {"/model/merges", "a b", "field 'model.merges': expected an array, got string"},
      {"/model/merges/0", "ab", "field 'model.merges[0]': expected two tokens separated by one"},
      {"/model/merges/0", 7, "field 'model.merges[0]': expected \"a b\" or [\"a\", \"b\"]"},
      {"/model/merges/1", json::array({"zz", "c"}), "'model.merges[1]': token 'zz' is not in"},
      {"/model/merges/1", "c a", "'model.merges[1]': the merged token 'ca' is not in model.vocab"},
      {"/model/type", "WordPiece", "field 'model.type': 'WordPiece' is not supported"},
      {"/model/byte_fallback", true, "field 'model.byte_fallback': true is not supported"},
      {"/model/unk_token", "<unk>", "field 'model.unk_token': '<unk>' is not in model.vocab"},
      {"/pre_tokenizer", nullptr, "field 'pre_tokenizer': missing"},
      {"/pre_tokenizer/pretokenizers/0/pattern", json::object({{"Regex", "(\\p{N}"}}),
       "field 'pre_tokenizer.pretokenizers[0].pattern.Regex': regex '(\\p{N}' does not compile"},
      {"/pre_tokenizer/pretokenizers/0/pattern", json::object({{"Glob", "*"}}),
       "field 'pre_tokenizer.pretokenizers[0].pattern': expected {\"Regex\""},
      {"/pre_tokenizer/pretokenizers/0/behavior", "Sideways",
       "field 'pre_tokenizer.pretokenizers[0].behavior': unknown value 'Sideways'"},
      {"/pre_tokenizer/pretokenizers/2/type", "Whitespace",
       "field 'pre_tokenizer.pretokenizers[2].type': pre-tokenizer 'Whitespace' is not supported"},
      {"/pre_tokenizer/pretokenizers/2", json::object({{"type", "Digits"}}), "is not supported"},
      {"/pre_tokenizer/pretokenizers", json::array(), "no ByteLevel step"},
      {"/pre_tokenizer/pretokenizers/1/invert", "no",
       "field 'pre_tokenizer.pretokenizers[1].invert': expected true or false, got string"},
      {"/decoder/type", "WordPiece", "field 'decoder.type': 'WordPiece' is not supported"},
      {"/decoder", nullptr, "field 'decoder': missing"},
      {"/normalizer", json::object({{"type", "NFC"}}), "field 'normalizer': 'NFC' is not"},
      {"/post_processor", json::object({{"type", "TemplateProcessing"}}),
       "field 'post_processor.type': 'TemplateProcessing' is not supported"},
      {"/added_tokens", json::object(), "field 'added_tokens': expected an array"},
      {"/added_tokens/0/id", "x", "field 'added_tokens[0].id': expected an integer, got string"},
      {"/added_tokens/0/content", "", "field 'added_tokens[0].content': empty"},
      {"/added_tokens/0/content", "ab", "'added_tokens[0]': 'ab' has id 259 but id 256"},
      {"/added_tokens/0/lstrip", true, "field 'added_tokens[0].lstrip': true is not supported"},
      {"/added_tokens/0/id", 5, "field 'added_tokens': id 5 is given to both"},
  };
  for (const Case& c : cases) {
    json j = tiny_tokenizer();
    if (c.value.is_null())
      j.at(json::json_pointer(c.path).parent_pointer()).erase(json::json_pointer(c.path).back());
    else
      j[json::json_pointer(c.path)] = c.value;
    const std::string err = load_error(j);
    EXPECT_NE(err.find("dir/tokenizer.json"), std::string::npos) << c.path << ": " << err;
    EXPECT_NE(err.find(c.expect), std::string::npos)
        << c.path << ": expected '" << c.expect << "' in '" << err << "'";
  }
  auto missing = Tokenizer::load("/nonexistent/tokenizer.json");
  ASSERT_FALSE(missing);
  EXPECT_EQ(missing.status().message(), "cannot open /nonexistent/tokenizer.json");
}

TEST(Utf8, LossyReplacesMaximalSubparts) {
  const std::string r = "\xEF\xBF\xBD";
  EXPECT_EQ(utf8_lossy("plain"), "plain");
  EXPECT_EQ(utf8_lossy("\xE2\x82\xAC"), "\xE2\x82\xAC");
  EXPECT_EQ(utf8_lossy("\xE2\x82"
                       "A"),
            r + "A");                                        // truncated 3-byte: one U+FFFD
  EXPECT_EQ(utf8_lossy("\xF0\x80\x80"), r + r + r);          // F0 80: 80 cannot follow F0
  EXPECT_EQ(utf8_lossy("\xED\xA0\x80"), r + r + r);          // surrogate
  EXPECT_EQ(utf8_lossy("\xC0\xAF"), r + r);                  // overlong
  EXPECT_EQ(utf8_lossy("\xF4\x90\x80\x80"), r + r + r + r);  // above U+10FFFF
  EXPECT_EQ(utf8_lossy("\xFF"
                       "a\x80"),
            r + "a" + r);
  EXPECT_EQ(utf8_lossy("\xF0\x9F\x98"), r);  // truncated at the end: one
  size_t hold = 0;
  EXPECT_EQ(utf8_lossy("ab\xF0\x9F\x98", &hold), "ab");
  EXPECT_EQ(hold, 3u);
  EXPECT_EQ(utf8_lossy("ab\xF0\x9F"
                       "c",
                       &hold),
            "ab" + r + "c");
  EXPECT_EQ(hold, 0u);
}

TEST(Detokenizer, HoldsBackIncompleteCharacters) {
  auto t = Tokenizer::from_json(tiny_tokenizer().dump(), "tiny");
  ASSERT_TRUE(t);
  // Byte tokens are ids 0..255 in alphabet order; find the ids of the bytes of "€" (E2 82 AC).
  auto id_of = [&](uint8_t b) {
    for (int32_t id = 0; id < 256; ++id)
      if ((*t)->token_bytes(id) == std::string(1, static_cast<char>(b))) return id;
    return -1;
  };
  const int32_t e2 = id_of(0xE2), x82 = id_of(0x82), xac = id_of(0xAC), a = id_of('a');
  Detokenizer d(**t);
  EXPECT_EQ(d.push(a), "a");
  EXPECT_EQ(d.push(e2), "");
  EXPECT_EQ(d.push(x82), "");
  EXPECT_EQ(d.push(xac), "\xE2\x82\xAC");
  EXPECT_EQ(d.push(e2), "");
  EXPECT_EQ(d.push(a),
            "\xEF\xBF\xBD"
            "a");  // the held E2 can no longer complete
  EXPECT_EQ(d.push(e2), "");
  EXPECT_EQ(d.push(x82), "");
  EXPECT_EQ(d.finish(), "\xEF\xBF\xBD");  // the stream ended inside a character
  EXPECT_EQ((*t)->decode({a, e2, x82, xac, e2, a, e2, x82}),
            "a\xE2\x82\xAC\xEF\xBF\xBD"
            "a\xEF\xBF\xBD");
  EXPECT_EQ(d.push(-1), "");  // unknown ids are skipped, like decode does
  EXPECT_EQ(d.push(100000), "");
}

}  // namespace
}  // namespace sp
