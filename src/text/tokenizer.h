// Byte-level BPE tokenizer read from a Hugging Face tokenizer.json of DeepSeek's shape, and an
// incremental detokenizer for streaming.
//
// Encoding follows the `tokenizers` library step by step, because the model was trained on its
// output: added tokens (special ones first, then the normalized ones) are cut out of the text
// before anything else; each remaining piece goes through the pre-tokenizer (a Sequence of Split
// regexes, each applied to every piece the previous one produced, then ByteLevel), and each
// pre-token word through BPE (lowest merge rank first, leftmost first among equal ranks).
// Decoding maps the byte-level alphabet back to bytes (tokens with characters outside it, like
// the special tokens, contribute their own UTF-8) and replaces invalid UTF-8 by U+FFFD, one per
// maximal invalid subpart, as Rust's String::from_utf8_lossy does.
//
// The Split regexes are Oniguruma patterns (\p{..} classes, a (?!\S) look-ahead); they run on
// PCRE2 in UTF + UCP mode, with \s and \S rewritten to Oniguruma's Unicode White_Space set
// (PCRE2's \s also takes U+180E, which Unicode dropped from White_Space).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/status.h"

namespace sp {

class Tokenizer {
 public:
  // Reads and validates a tokenizer.json; every problem is an error naming the file and field.
  static Result<std::unique_ptr<Tokenizer>> load(const std::string& path);
  // The same from the file's text; `source` names it in errors.
  static Result<std::unique_ptr<Tokenizer>> from_json(std::string_view text,
                                                      const std::string& source);
  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // Token ids of `text` (bytes; invalid UTF-8 is first replaced by U+FFFD as Python's
  // bytes.decode(errors="replace") does). Added and special tokens written in the text are
  // recognised. Safe to call from several threads.
  Result<std::vector<int32_t>> encode(std::string_view text) const;
  // UTF-8 text of `ids`; ids that name no token are skipped (as `tokenizers` does).
  std::string decode(const std::vector<int32_t>& ids, bool skip_special = false) const;
  // The bytes one token contributes to a decode (may be a partial UTF-8 sequence).
  const std::string& token_bytes(int32_t id) const;

  // One more than the largest id of any token (model vocabulary or added token).
  int64_t vocab_size() const { return static_cast<int64_t>(bytes_.size()); }
  // Id of a token given by its content in the file (e.g. "<｜begin▁of▁sentence｜>").
  std::optional<int32_t> token_id(std::string_view content) const;
  bool is_special(int32_t id) const;
  bool is_known(int32_t id) const;

  struct Impl;

 private:
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
  std::vector<std::string> bytes_;  // [vocab_size] decoded bytes of each id
};

// Streams text out of token ids: push() returns only complete UTF-8, holding back the bytes of a
// character that may still be completed by the next token; bytes that can no longer form a valid
// character come out as U+FFFD exactly where a full decode() puts them. The concatenation of every
// push() and finish() equals decode() of all ids.
class Detokenizer {
 public:
  explicit Detokenizer(const Tokenizer& tok, bool skip_special = false)
      : tok_(tok), skip_special_(skip_special) {}
  std::string push(int32_t id);
  // Whatever is held back, as U+FFFD (the stream ended inside a character).
  std::string finish();

 private:
  const Tokenizer& tok_;
  bool skip_special_;
  std::string pending_;  // bytes of an incomplete character
};

// Valid UTF-8 from any bytes: each maximal invalid subpart becomes U+FFFD (Unicode's recommended
// practice, as Rust's from_utf8_lossy and Python's errors="replace" do). With `hold_tail`, a
// trailing incomplete but so far valid character is not converted: its length is stored there.
std::string utf8_lossy(std::string_view bytes, size_t* hold_tail = nullptr);

}  // namespace sp
