// Text in and out of the command line: prompts given as text (generate --prompt), the score
// command (teacher-forced loss, perplexity and top-1 over a JSONL of texts) and tokenize.
// Built without PCRE2 (SP_HAVE_TOKENIZER 0), these fail with an error that says so.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/status.h"
#include "tools/flags.h"

namespace sp {

class Tokenizer;

// The tokenizer of a model directory (tokenizer.json) and its BOS rule (tokenizer_config.json).
class ModelText {
 public:
  // `add_bos`: "auto" follows tokenizer_config.json's add_bos_token (false when absent), "yes"
  // or "no" override it.
  static Result<std::unique_ptr<ModelText>> open(const std::string& model_dir,
                                                 const std::string& add_bos = "auto");
  virtual ~ModelText() = default;
  // Token ids of a prompt, BOS first when the rule says so. Empty text is an error.
  virtual Result<std::vector<int32_t>> encode(const std::string& text) const = 0;
  // Text of generated ids; special tokens (EOS) are left out.
  virtual std::string decode(const std::vector<int32_t>& ids) const = 0;
  virtual bool adds_bos() const = 0;
  virtual int32_t bos_id() const { return -1; }
  // The tokenizer itself (null when built without it).
  virtual const Tokenizer* tokenizer() const { return nullptr; }
};

// The --add-bos flag shared by generate, score and tokenize.
FlagSpec add_bos_flag();

// Token ids of every --prompt of `f`, with the model directory's tokenizer.
Result<std::vector<std::vector<int32_t>>> encode_prompts(const Flags& f,
                                                         std::unique_ptr<ModelText>* text);

// The content of a chat reply's text (DeepSeek-V4's completion format, non-thinking): the text
// before an end-of-sentence token or a tool-call block.
std::string chat_reply_content(const std::string& generated);

// A string as a one-line JSON string literal (UTF-8 kept, control characters escaped).
std::string json_quoted(const std::string& s);

int cmd_score(const std::vector<std::string>& args);
int cmd_tokenize(const std::vector<std::string>& args);

}  // namespace sp
