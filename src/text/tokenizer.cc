#include "text/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <queue>
#include <sstream>
#include <unordered_map>
#include <utility>

namespace sp {

using json = nlohmann::json;

// ---------------------------------------------------------------------------------------------
// UTF-8

namespace {

constexpr const char* kReplacement = "\xEF\xBF\xBD";  // U+FFFD

// Length of the well-formed character at p (Unicode table 3-7), or 0 with *prefix set to the
// length of the maximal subpart that is a valid beginning (1 for a byte that starts nothing).
// `incomplete` tells that the subpart ran into the end of the bytes rather than a bad byte.
size_t utf8_char(const uint8_t* p, size_t n, size_t* prefix, bool* incomplete) {
  *incomplete = false;
  const uint8_t b = p[0];
  if (b < 0x80) return 1;
  size_t len = 0;
  uint8_t lo = 0x80, hi = 0xBF;  // range of the second byte
  if (b >= 0xC2 && b <= 0xDF) {
    len = 2;
  } else if (b >= 0xE0 && b <= 0xEF) {
    len = 3;
    if (b == 0xE0) lo = 0xA0;
    if (b == 0xED) hi = 0x9F;
  } else if (b >= 0xF0 && b <= 0xF4) {
    len = 4;
    if (b == 0xF0) lo = 0x90;
    if (b == 0xF4) hi = 0x8F;
  } else {
    *prefix = 1;
    return 0;
  }
  size_t i = 1;
  for (; i < len; ++i) {
    if (i >= n) {
      *incomplete = true;
      break;
    }
    const uint8_t c = p[i];
    const uint8_t l = i == 1 ? lo : 0x80, h = i == 1 ? hi : 0xBF;
    if (c < l || c > h) break;
  }
  if (i == len) return len;
  *prefix = i;
  return 0;
}

// Code point of a well-formed character of `len` bytes.
uint32_t utf8_code_point(const uint8_t* p, size_t len) {
  if (len == 1) return p[0];
  uint32_t cp = p[0] & (0x7F >> len);
  for (size_t i = 1; i < len; ++i) cp = (cp << 6) | (p[i] & 0x3F);
  return cp;
}

void append_utf8(std::string* out, uint32_t cp) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

}  // namespace

std::string utf8_lossy(std::string_view bytes, size_t* hold_tail) {
  std::string out;
  out.reserve(bytes.size());
  const auto* p = reinterpret_cast<const uint8_t*>(bytes.data());
  const size_t n = bytes.size();
  if (hold_tail) *hold_tail = 0;
  size_t i = 0;
  while (i < n) {
    size_t prefix = 0;
    bool incomplete = false;
    const size_t len = utf8_char(p + i, n - i, &prefix, &incomplete);
    if (len) {
      out.append(bytes.substr(i, len));
      i += len;
    } else if (incomplete && hold_tail) {
      *hold_tail = n - i;
      break;
    } else {
      out += kReplacement;
      i += prefix;
    }
  }
  return out;
}

std::string Detokenizer::push(int32_t id) {
  if (!tok_.is_known(id) || (skip_special_ && tok_.is_special(id))) return {};
  pending_ += tok_.token_bytes(id);
  size_t hold = 0;
  std::string out = utf8_lossy(pending_, &hold);
  pending_.erase(0, pending_.size() - hold);
  return out;
}

std::string Detokenizer::finish() {
  std::string out = utf8_lossy(pending_);
  pending_.clear();
  return out;
}

// ---------------------------------------------------------------------------------------------
// The tokenizer

namespace {

// GPT-2's byte-level alphabet: printable bytes stand for themselves, the others for U+0100 on.
std::array<uint32_t, 256> byte_alphabet() {
  std::array<uint32_t, 256> a{};
  uint32_t next = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
    a[b] = printable ? static_cast<uint32_t>(b) : next++;
  }
  return a;
}

// Oniguruma's \s (Unicode White_Space) as PCRE2 class members.
constexpr const char* kSpaceMembers =
    "\\t\\n\\x0B\\f\\r\\x{20}\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}"
    "\\x{202F}\\x{205F}\\x{3000}";

// Oniguruma pattern -> PCRE2 pattern: \s and \S become explicit classes; everything else means
// the same in both for the patterns tokenizer.json files use.
Result<std::string> translate_pattern(const std::string& p) {
  std::string out;
  bool in_class = false;
  for (size_t i = 0; i < p.size(); ++i) {
    const char c = p[i];
    if (c == '\\' && i + 1 < p.size()) {
      const char e = p[i + 1];
      ++i;
      if (e == 's') {
        out += in_class ? std::string(kSpaceMembers) : str("[", kSpaceMembers, "]");
      } else if (e == 'S') {
        if (in_class) return Status::error("\\S inside a character class is not supported");
        out += str("[^", kSpaceMembers, "]");
      } else {
        out += c;
        out += e;
      }
      continue;
    }
    if (!in_class && c == '[') {
      in_class = true;
      out += c;
      // A ']' right after '[' or '[^' is a literal.
      if (i + 1 < p.size() && p[i + 1] == '^') out += p[++i];
      if (i + 1 < p.size() && p[i + 1] == ']') out += p[++i];
      continue;
    }
    if (in_class && c == '[') return Status::error("nested character classes are not supported");
    if (in_class && c == ']') in_class = false;
    out += c;
  }
  return out;
}

struct Regex {
  pcre2_code* code = nullptr;
  Regex() = default;
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;
  ~Regex() {
    if (code) pcre2_code_free(code);
  }
};

enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

struct SplitStep {
  std::unique_ptr<Regex> regex;  // null: literal string pattern
  std::string literal;
  SplitBehavior behavior = SplitBehavior::kIsolated;
  bool invert = false;
};

struct AddedToken {
  int32_t id = 0;
  std::string content;
  bool special = false;
  bool normalized = false;
};

// A byte trie of added tokens, matched leftmost-longest (as `tokenizers`' Aho-Corasick does).
class TokenTrie {
 public:
  void add(const std::string& s, int32_t id) {
    int node = 0;
    for (unsigned char c : s) {
      auto it = nodes_[node].next.find(c);
      if (it == nodes_[node].next.end()) {
        nodes_.push_back({});
        it = nodes_[node].next.emplace(c, static_cast<int>(nodes_.size()) - 1).first;
      }
      node = it->second;
    }
    nodes_[node].id = id;
  }
  bool empty() const { return nodes_.size() == 1; }
  // Longest token starting at text[pos]: its length and id, or 0.
  size_t match(std::string_view text, size_t pos, int32_t* id) const {
    int node = 0;
    size_t best = 0;
    for (size_t i = pos; i < text.size(); ++i) {
      auto it = nodes_[node].next.find(static_cast<unsigned char>(text[i]));
      if (it == nodes_[node].next.end()) break;
      node = it->second;
      if (nodes_[node].id >= 0) {
        best = i + 1 - pos;
        *id = nodes_[node].id;
      }
    }
    return best;
  }

 private:
  struct Node {
    std::map<unsigned char, int> next;
    int32_t id = -1;
  };
  std::vector<Node> nodes_{Node{}};
};

// Piece of the input: an added token, or text still to be pre-tokenized.
struct Piece {
  std::string_view text;
  int32_t added = -1;
};

}  // namespace

struct Tokenizer::Impl {
  std::string source;
  std::vector<AddedToken> added;
  TokenTrie raw_trie, normalized_trie;  // tokens matched before / after normalization
  std::vector<SplitStep> splits;
  bool byte_level_prefix_space = false;
  std::unique_ptr<Regex> byte_level_regex;  // ByteLevel's own GPT-2 split when use_regex
  std::unordered_map<std::string, int32_t> vocab;
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges;  // (a, b) -> (rank, id)
  std::array<int32_t, 256> byte_ids{};                               // -1: not in vocab
  int32_t unk_id = -1;
  bool fuse_unk = false;
  bool ignore_merges = false;
  std::vector<uint8_t> special;  // [vocab_size]
  std::vector<uint8_t> known;    // [vocab_size]
  mutable std::mutex cache_mu;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache;

  Status split_added(std::string_view text, std::vector<Piece>* out) const;
  Status pre_tokenize(std::string_view text, std::vector<std::string>* words) const;
  void bpe(std::string_view word, std::vector<int32_t>* out) const;
};

namespace {

uint64_t pair_key(int32_t a, int32_t b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}

Status regex_error(int code) {
  PCRE2_UCHAR buf[256];
  pcre2_get_error_message(code, buf, sizeof buf);
  return Status::error(reinterpret_cast<const char*>(buf));
}

// Every match of `re` in `text` as [begin, end) byte offsets (empty matches are skipped).
Status find_matches(const Regex& re, std::string_view text,
                    std::vector<std::pair<size_t, size_t>>* out) {
  out->clear();
  pcre2_match_data* md = pcre2_match_data_create_from_pattern(re.code, nullptr);
  if (!md) return Status::error("out of memory for regex match data");
  size_t start = 0;
  Status st;
  while (start <= text.size()) {
    const int rc = pcre2_match(re.code, reinterpret_cast<PCRE2_SPTR>(text.data()), text.size(),
                               start, PCRE2_NO_UTF_CHECK, md, nullptr);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) {
      st = regex_error(rc);
      break;
    }
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
    const size_t b = ov[0], e = ov[1];
    if (e > b) {
      out->emplace_back(b, e);
      start = e;
    } else {  // empty match: move on by one character
      if (b >= text.size()) break;
      size_t next = b + 1;
      while (next < text.size() && (static_cast<uint8_t>(text[next]) & 0xC0) == 0x80) ++next;
      start = next;
    }
  }
  pcre2_match_data_free(md);
  return st;
}

// Cuts `text` as a Split pre-tokenizer does and appends the parts.
Status apply_split(const SplitStep& s, std::string_view text, std::vector<std::string_view>* out) {
  std::vector<std::pair<size_t, size_t>> m;
  if (s.regex) {
    SP_RETURN_IF_ERROR(find_matches(*s.regex, text, &m));
  } else if (!s.literal.empty()) {
    for (size_t p = text.find(s.literal); p != std::string_view::npos;
         p = text.find(s.literal, p + s.literal.size()))
      m.emplace_back(p, p + s.literal.size());
  }
  // Alternate non-matching and matching spans; `is_match` after inversion says which is the
  // delimiter.
  struct Span {
    size_t b, e;
    bool delim;
  };
  std::vector<Span> spans;
  size_t pos = 0;
  for (auto [b, e] : m) {
    if (b > pos) spans.push_back({pos, b, s.invert});
    spans.push_back({b, e, !s.invert});
    pos = e;
  }
  if (pos < text.size()) spans.push_back({pos, text.size(), s.invert});
  auto emit = [&](size_t b, size_t e) {
    if (e > b) out->push_back(text.substr(b, e - b));
  };
  switch (s.behavior) {
    case SplitBehavior::kRemoved:
      for (auto& sp : spans)
        if (!sp.delim) emit(sp.b, sp.e);
      break;
    case SplitBehavior::kIsolated:
      for (auto& sp : spans) emit(sp.b, sp.e);
      break;
    case SplitBehavior::kContiguous: {
      size_t i = 0;
      while (i < spans.size()) {
        size_t j = i + 1;
        while (j < spans.size() && spans[j].delim && spans[i].delim) ++j;
        emit(spans[i].b, spans[j - 1].e);
        i = j;
      }
      break;
    }
    case SplitBehavior::kMergedWithPrevious: {
      size_t start = 0;
      bool open = false;
      for (auto& sp : spans) {
        if (!open) start = sp.b;
        open = true;
        if (sp.delim) {
          emit(start, sp.e);
          open = false;
        }
      }
      if (open) emit(start, text.size());
      break;
    }
    case SplitBehavior::kMergedWithNext: {
      size_t start = 0;
      bool open = false;
      for (auto& sp : spans) {
        if (sp.delim) {
          if (open) emit(start, sp.b);
          start = sp.b;
          open = true;
        } else {
          if (!open) start = sp.b;
          open = true;
          emit(start, sp.e);
          open = false;
        }
      }
      if (open) emit(start, text.size());
      break;
    }
  }
  return Status::ok();
}

}  // namespace

Status Tokenizer::Impl::split_added(std::string_view text, std::vector<Piece>* out) const {
  // Pass 1: tokens that are not normalized (every special token) on the raw text. Pass 2: the
  // normalized ones on the normalized text (the only normalizers accepted leave text unchanged).
  auto cut = [](const TokenTrie& trie, std::string_view t, std::vector<Piece>* o) {
    size_t start = 0;
    for (size_t i = 0; i < t.size();) {
      int32_t id = -1;
      const size_t len = trie.match(t, i, &id);
      if (len == 0) {
        ++i;
        continue;
      }
      if (i > start) o->push_back({t.substr(start, i - start), -1});
      o->push_back({t.substr(i, len), id});
      i += len;
      start = i;
    }
    if (start < t.size()) o->push_back({t.substr(start), -1});
  };
  std::vector<Piece> first;
  if (raw_trie.empty())
    first.push_back({text, -1});
  else
    cut(raw_trie, text, &first);
  for (const Piece& p : first) {
    if (p.added >= 0 || normalized_trie.empty())
      out->push_back(p);
    else
      cut(normalized_trie, p.text, out);
  }
  return Status::ok();
}

Status Tokenizer::Impl::pre_tokenize(std::string_view text, std::vector<std::string>* words) const {
  std::vector<std::string_view> cur{text}, next;
  for (const SplitStep& s : splits) {
    next.clear();
    for (std::string_view piece : cur) SP_RETURN_IF_ERROR(apply_split(s, piece, &next));
    cur.swap(next);
  }
  // ByteLevel: the prefix space goes on each piece before its own GPT-2 split (when use_regex).
  words->clear();
  std::vector<std::pair<size_t, size_t>> m;
  for (std::string_view piece : cur) {
    std::string p(piece);
    if (byte_level_prefix_space && p[0] != ' ') p.insert(0, 1, ' ');
    if (!byte_level_regex) {
      words->push_back(std::move(p));
      continue;
    }
    SP_RETURN_IF_ERROR(find_matches(*byte_level_regex, p, &m));
    size_t pos = 0;
    for (auto [b, e] : m) {
      if (b > pos) words->push_back(p.substr(pos, b - pos));
      words->push_back(p.substr(b, e - b));
      pos = e;
    }
    if (pos < p.size()) words->push_back(p.substr(pos));
  }
  return Status::ok();
}

void Tokenizer::Impl::bpe(std::string_view word, std::vector<int32_t>* out) const {
  if (ignore_merges) {
    std::string mapped;
    static const std::array<uint32_t, 256> alphabet = byte_alphabet();
    for (unsigned char c : word) append_utf8(&mapped, alphabet[c]);
    if (auto it = vocab.find(mapped); it != vocab.end()) {
      out->push_back(it->second);
      return;
    }
  }
  // Symbols in a linked list over the word's bytes; a heap of candidate merges ordered by rank,
  // then by position, exactly as `tokenizers` merges a word.
  struct Symbol {
    int32_t id;
    int prev, next;
    int len;
  };
  std::vector<Symbol> sym;
  sym.reserve(word.size());
  for (unsigned char c : word) {
    int32_t id = byte_ids[c];
    if (id < 0) {
      if (unk_id < 0) continue;  // no unk token: the byte is dropped, as `tokenizers` does
      if (fuse_unk && !sym.empty() && sym.back().id == unk_id) {
        sym.back().len++;
        continue;
      }
      id = unk_id;
    }
    const int i = static_cast<int>(sym.size());
    sym.push_back({id, i - 1, -1, 1});
    if (i > 0) sym[i - 1].next = i;
  }
  struct Merge {
    int32_t rank;
    int pos;
    int32_t new_id;
    bool operator>(const Merge& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Merge, std::vector<Merge>, std::greater<Merge>> heap;
  auto push_pair = [&](int i) {
    if (i < 0 || sym[i].next < 0) return;
    auto it = merges.find(pair_key(sym[i].id, sym[sym[i].next].id));
    if (it != merges.end()) heap.push({it->second.first, i, it->second.second});
  };
  for (int i = 0; i + 1 < static_cast<int>(sym.size()); ++i) push_pair(i);
  while (!heap.empty()) {
    const Merge m = heap.top();
    heap.pop();
    Symbol& left = sym[m.pos];
    if (left.len == 0 || left.next < 0) continue;
    Symbol& right = sym[left.next];
    auto it = merges.find(pair_key(left.id, right.id));
    if (it == merges.end() || it->second.second != m.new_id) continue;
    left.id = m.new_id;
    left.len += right.len;
    right.len = 0;
    left.next = right.next;
    if (left.next >= 0) sym[left.next].prev = m.pos;
    push_pair(left.prev);
    push_pair(m.pos);
  }
  for (int i = sym.empty() ? -1 : 0; i >= 0; i = sym[i].next) out->push_back(sym[i].id);
}

Result<std::vector<int32_t>> Tokenizer::encode(std::string_view text) const {
  const Impl& m = *impl_;
  const std::string valid = utf8_lossy(text);
  std::vector<Piece> pieces;
  SP_RETURN_IF_ERROR(m.split_added(valid, &pieces));
  std::vector<int32_t> ids;
  std::vector<std::string> words;
  for (const Piece& p : pieces) {
    if (p.added >= 0) {
      ids.push_back(p.added);
      continue;
    }
    Status st = m.pre_tokenize(p.text, &words);
    if (!st) return Status::error(str(m.source, ": pre-tokenizer regex failed: ", st.message()));
    for (const std::string& word : words) {
      // Long words (whitespace runs, long tokens of letters) are not worth caching.
      const bool cacheable = word.size() <= 64;
      if (cacheable) {
        std::lock_guard<std::mutex> lock(m.cache_mu);
        if (auto it = m.cache.find(word); it != m.cache.end()) {
          ids.insert(ids.end(), it->second.begin(), it->second.end());
          continue;
        }
      }
      const size_t before = ids.size();
      m.bpe(word, &ids);
      if (cacheable) {
        std::lock_guard<std::mutex> lock(m.cache_mu);
        if (m.cache.size() > 200000) m.cache.clear();
        m.cache.emplace(
            word, std::vector<int32_t>(ids.begin() + static_cast<ptrdiff_t>(before), ids.end()));
      }
    }
  }
  return ids;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool skip_special) const {
  std::string raw;
  for (int32_t id : ids)
    if (is_known(id) && !(skip_special && is_special(id))) raw += bytes_[id];
  return utf8_lossy(raw);
}

const std::string& Tokenizer::token_bytes(int32_t id) const {
  static const std::string empty;
  return is_known(id) ? bytes_[id] : empty;
}

std::optional<int32_t> Tokenizer::token_id(std::string_view content) const {
  for (const AddedToken& a : impl_->added)
    if (a.content == content) return a.id;
  if (auto it = impl_->vocab.find(std::string(content)); it != impl_->vocab.end())
    return it->second;
  return std::nullopt;
}

bool Tokenizer::is_special(int32_t id) const {
  return id >= 0 && id < vocab_size() && impl_->special[id];
}

bool Tokenizer::is_known(int32_t id) const {
  return id >= 0 && id < vocab_size() && impl_->known[id];
}

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::~Tokenizer() = default;

// ---------------------------------------------------------------------------------------------
// Loading

namespace {

// Typed access to the JSON with errors that name the file and the field.
class Reader {
 public:
  explicit Reader(std::string source) : source_(std::move(source)) {}
  Status error(const std::string& field, const std::string& what) const {
    return Status::error(str(source_, ": field '", field, "': ", what));
  }
  Result<const json*> get(const json& obj, const std::string& path, const std::string& key,
                          json::value_t type, bool required = true) const {
    const std::string field = path.empty() ? key : path + "." + key;
    if (!obj.is_object()) return error(path, "expected an object");
    auto it = obj.find(key);
    if (it == obj.end() || (!required && it->is_null())) {
      if (required) return error(field, "missing");
      return static_cast<const json*>(nullptr);
    }
    const bool ok =
        type == json::value_t::number_integer
            ? it->is_number_integer()
            : (type == json::value_t::number_float ? it->is_number() : it->type() == type);
    if (!ok) return error(field, str("expected ", type_name(type), ", got ", it->type_name()));
    return &*it;
  }
  // A missing (or null) field is an error unless there is a fallback.
  Result<std::string> string(const json& obj, const std::string& path, const std::string& key,
                             std::optional<std::string> fallback = std::nullopt) const {
    auto v = get(obj, path, key, json::value_t::string, !fallback.has_value());
    if (!v) return v.status();
    return *v ? (*v)->get<std::string>() : *fallback;
  }
  Result<bool> boolean(const json& obj, const std::string& path, const std::string& key,
                       std::optional<bool> fallback = std::nullopt) const {
    auto v = get(obj, path, key, json::value_t::boolean, !fallback.has_value());
    if (!v) return v.status();
    return *v ? (*v)->get<bool>() : *fallback;
  }

 private:
  static const char* type_name(json::value_t t) {
    switch (t) {
      case json::value_t::object:
        return "an object";
      case json::value_t::array:
        return "an array";
      case json::value_t::string:
        return "a string";
      case json::value_t::boolean:
        return "true or false";
      case json::value_t::number_integer:
        return "an integer";
      default:
        return "a number";
    }
  }
  std::string source_;
};

Result<std::unique_ptr<Regex>> compile_regex(const Reader& r, const std::string& field,
                                             const std::string& pattern) {
  auto translated = translate_pattern(pattern);
  if (!translated)
    return r.error(field, str("regex '", pattern, "': ", translated.status().message()));
  int code = 0;
  PCRE2_SIZE offset = 0;
  auto re = std::make_unique<Regex>();
  re->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(translated->data()), translated->size(),
                           PCRE2_UTF | PCRE2_UCP, &code, &offset, nullptr);
  if (!re->code)
    return r.error(field, str("regex '", pattern, "' does not compile: ",
                              regex_error(code).message(), " (at offset ", offset, ")"));
  pcre2_jit_compile(re->code, PCRE2_JIT_COMPLETE);  // optional: falls back to the interpreter
  return re;
}

constexpr const char* kGpt2Pattern =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

// The pre-tokenizer: Split steps, then ByteLevel last.
Status load_pre_tokenizer(const Reader& r, const json& pt, const std::string& field,
                          Tokenizer::Impl* m, bool* byte_level) {
  SP_ASSIGN_OR_RETURN(std::string type, r.string(pt, field, "type"));
  if (*byte_level)
    return r.error(field,
                   "a pre-tokenizer after ByteLevel is not supported (ByteLevel must be "
                   "the last step)");
  if (type == "Sequence") {
    SP_ASSIGN_OR_RETURN(const json* list, r.get(pt, field, "pretokenizers", json::value_t::array));
    for (size_t i = 0; i < list->size(); ++i)
      SP_RETURN_IF_ERROR(
          load_pre_tokenizer(r, (*list)[i], str(field, ".pretokenizers[", i, "]"), m, byte_level));
    return Status::ok();
  }
  if (type == "Split") {
    SplitStep s;
    SP_ASSIGN_OR_RETURN(const json* pat, r.get(pt, field, "pattern", json::value_t::object));
    const std::string pfield = field + ".pattern";
    if (pat->contains("Regex")) {
      SP_ASSIGN_OR_RETURN(std::string re, r.string(*pat, pfield, "Regex"));
      SP_ASSIGN_OR_RETURN(s.regex, compile_regex(r, pfield + ".Regex", re));
    } else if (pat->contains("String")) {
      SP_ASSIGN_OR_RETURN(s.literal, r.string(*pat, pfield, "String"));
    } else {
      return r.error(pfield, "expected {\"Regex\": ...} or {\"String\": ...}");
    }
    SP_ASSIGN_OR_RETURN(std::string behavior, r.string(pt, field, "behavior"));
    static const std::map<std::string, SplitBehavior> kBehaviors = {
        {"Removed", SplitBehavior::kRemoved},
        {"Isolated", SplitBehavior::kIsolated},
        {"MergedWithPrevious", SplitBehavior::kMergedWithPrevious},
        {"MergedWithNext", SplitBehavior::kMergedWithNext},
        {"Contiguous", SplitBehavior::kContiguous}};
    auto it = kBehaviors.find(behavior);
    if (it == kBehaviors.end())
      return r.error(field + ".behavior",
                     str("unknown value '", behavior,
                         "'; expected Removed, Isolated, MergedWithPrevious, MergedWithNext or "
                         "Contiguous"));
    s.behavior = it->second;
    SP_ASSIGN_OR_RETURN(s.invert, r.boolean(pt, field, "invert", false));
    m->splits.push_back(std::move(s));
    return Status::ok();
  }
  if (type == "ByteLevel") {
    SP_ASSIGN_OR_RETURN(m->byte_level_prefix_space, r.boolean(pt, field, "add_prefix_space", true));
    SP_ASSIGN_OR_RETURN(bool use_regex, r.boolean(pt, field, "use_regex", true));
    if (use_regex) {
      SP_ASSIGN_OR_RETURN(m->byte_level_regex, compile_regex(r, field, kGpt2Pattern));
    }
    *byte_level = true;
    return Status::ok();
  }
  return r.error(field + ".type", str("pre-tokenizer '", type,
                                      "' is not supported; expected Sequence, Split or ByteLevel"));
}

Status load_model(const Reader& r, const json& root, Tokenizer::Impl* m) {
  SP_ASSIGN_OR_RETURN(const json* model, r.get(root, "", "model", json::value_t::object));
  SP_ASSIGN_OR_RETURN(std::string type, r.string(*model, "model", "type", "BPE"));
  if (type != "BPE")
    return r.error("model.type", str("'", type, "' is not supported; expected BPE"));
  SP_ASSIGN_OR_RETURN(bool byte_fallback, r.boolean(*model, "model", "byte_fallback", false));
  if (byte_fallback) return r.error("model.byte_fallback", "true is not supported");
  for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    SP_ASSIGN_OR_RETURN(std::string v, r.string(*model, "model", k, ""));
    if (!v.empty()) return r.error(str("model.", k), str("'", v, "' is not supported"));
  }
  if (auto it = model->find("dropout");
      it != model->end() && !it->is_null() && !(it->is_number() && it->get<double>() == 0.0))
    return r.error("model.dropout", "BPE dropout is not supported (expected null)");
  SP_ASSIGN_OR_RETURN(m->fuse_unk, r.boolean(*model, "model", "fuse_unk", false));
  SP_ASSIGN_OR_RETURN(m->ignore_merges, r.boolean(*model, "model", "ignore_merges", false));

  SP_ASSIGN_OR_RETURN(const json* vocab, r.get(*model, "model", "vocab", json::value_t::object));
  if (vocab->empty()) return r.error("model.vocab", "empty");
  m->vocab.reserve(vocab->size());
  for (auto it = vocab->begin(); it != vocab->end(); ++it) {
    if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0 ||
        it.value().get<int64_t>() >= (int64_t{1} << 30))
      return r.error(str("model.vocab[\"", it.key(), "\"]"),
                     str("expected a token id in [0, 2^30), got ", it.value().dump()));
    m->vocab.emplace(it.key(), static_cast<int32_t>(it.value().get<int64_t>()));
  }
  SP_ASSIGN_OR_RETURN(std::string unk, r.string(*model, "model", "unk_token", ""));
  if (!unk.empty()) {
    auto it = m->vocab.find(unk);
    if (it == m->vocab.end())
      return r.error("model.unk_token", str("'", unk, "' is not in model.vocab"));
    m->unk_id = it->second;
  }
  const auto alphabet = byte_alphabet();
  for (int b = 0; b < 256; ++b) {
    std::string ch;
    append_utf8(&ch, alphabet[b]);
    auto it = m->vocab.find(ch);
    m->byte_ids[b] = it == m->vocab.end() ? -1 : it->second;
  }

  SP_ASSIGN_OR_RETURN(const json* merges, r.get(*model, "model", "merges", json::value_t::array));
  m->merges.reserve(merges->size());
  for (size_t i = 0; i < merges->size(); ++i) {
    const json& e = (*merges)[i];
    const std::string field = str("model.merges[", i, "]");
    std::string a, b;
    if (e.is_string()) {  // "a b" (older files, DeepSeek's)
      const std::string s = e.get<std::string>();
      const size_t sp = s.find(' ');
      if (sp == std::string::npos || sp == 0 || sp + 1 >= s.size() ||
          s.find(' ', sp + 1) != std::string::npos)
        return r.error(field, str("expected two tokens separated by one space, got '", s, "'"));
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {
      a = e[0].get<std::string>();
      b = e[1].get<std::string>();
    } else {
      return r.error(field, str("expected \"a b\" or [\"a\", \"b\"], got ", e.dump()));
    }
    auto ia = m->vocab.find(a), ib = m->vocab.find(b), iab = m->vocab.find(a + b);
    if (ia == m->vocab.end() || ib == m->vocab.end())
      return r.error(field,
                     str("token '", ia == m->vocab.end() ? a : b, "' is not in model.vocab"));
    if (iab == m->vocab.end())
      return r.error(field, str("the merged token '", a + b, "' is not in model.vocab"));
    // The first occurrence of a pair keeps its rank, as `tokenizers` does.
    m->merges.emplace(pair_key(ia->second, ib->second),
                      std::make_pair(static_cast<int32_t>(i), iab->second));
  }
  return Status::ok();
}

}  // namespace

Result<std::unique_ptr<Tokenizer>> Tokenizer::load(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status::error(str("cannot open ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  if (!in.good() && !in.eof()) return Status::error(str("cannot read ", path));
  return from_json(ss.str(), path);
}

Result<std::unique_ptr<Tokenizer>> Tokenizer::from_json(std::string_view text,
                                                        const std::string& source) {
  json root;
  try {
    root = json::parse(text);
  } catch (const json::exception& e) {
    return Status::error(str(source, ": not valid JSON: ", e.what()));
  }
  const Reader r(source);
  if (!root.is_object()) return Status::error(str(source, ": expected a JSON object"));
  auto impl = std::make_unique<Impl>();
  Impl* m = impl.get();
  m->source = source;

  SP_RETURN_IF_ERROR(load_model(r, root, m));

  // Normalizer: only ones that leave the text unchanged.
  if (auto it = root.find("normalizer"); it != root.end() && !it->is_null()) {
    SP_ASSIGN_OR_RETURN(std::string type, r.string(*it, "normalizer", "type"));
    bool empty_sequence = false;
    if (type == "Sequence") {
      auto list = r.get(*it, "normalizer", "normalizers", json::value_t::array);
      if (!list) return list.status();
      empty_sequence = (*list)->empty();
    }
    if (!empty_sequence)
      return r.error("normalizer", str("'", type,
                                       "' is not supported; expected null or an empty Sequence "
                                       "(DeepSeek's tokenizers do not normalize)"));
  }

  SP_ASSIGN_OR_RETURN(const json* pt, r.get(root, "", "pre_tokenizer", json::value_t::object));
  bool byte_level = false;
  SP_RETURN_IF_ERROR(load_pre_tokenizer(r, *pt, "pre_tokenizer", m, &byte_level));
  if (!byte_level)
    return r.error("pre_tokenizer",
                   "no ByteLevel step; only byte-level BPE tokenizers are supported");

  if (auto it = root.find("post_processor"); it != root.end() && !it->is_null()) {
    SP_ASSIGN_OR_RETURN(std::string type, r.string(*it, "post_processor", "type"));
    if (type != "ByteLevel")
      return r.error("post_processor.type",
                     str("'", type, "' is not supported; expected null or ByteLevel"));
  }
  SP_ASSIGN_OR_RETURN(const json* dec, r.get(root, "", "decoder", json::value_t::object));
  SP_ASSIGN_OR_RETURN(std::string dec_type, r.string(*dec, "decoder", "type"));
  if (dec_type != "ByteLevel")
    return r.error("decoder.type", str("'", dec_type, "' is not supported; expected ByteLevel"));

  // Added tokens.
  auto added_field = r.get(root, "", "added_tokens", json::value_t::array, false);
  if (!added_field) return added_field.status();
  const json* added = *added_field;
  int64_t max_id = 0;
  for (auto& [s, id] : m->vocab) max_id = std::max<int64_t>(max_id, id);
  if (added) {
    for (size_t i = 0; i < added->size(); ++i) {
      const json& e = (*added)[i];
      const std::string field = str("added_tokens[", i, "]");
      if (!e.is_object()) return r.error(field, "expected an object");
      AddedToken a;
      SP_ASSIGN_OR_RETURN(const json* id, r.get(e, field, "id", json::value_t::number_integer));
      if (id->get<int64_t>() < 0 || id->get<int64_t>() >= (int64_t{1} << 30))
        return r.error(field + ".id", str("expected a token id in [0, 2^30), got ", id->dump()));
      a.id = static_cast<int32_t>(id->get<int64_t>());
      SP_ASSIGN_OR_RETURN(a.content, r.string(e, field, "content"));
      if (a.content.empty()) return r.error(field + ".content", "empty");
      SP_ASSIGN_OR_RETURN(a.special, r.boolean(e, field, "special", false));
      SP_ASSIGN_OR_RETURN(a.normalized, r.boolean(e, field, "normalized", !a.special));
      for (const char* k : {"lstrip", "rstrip", "single_word"}) {
        SP_ASSIGN_OR_RETURN(bool v, r.boolean(e, field, k, false));
        if (v) return r.error(str(field, ".", k), "true is not supported");
      }
      auto v = m->vocab.find(a.content);
      if (v != m->vocab.end() && v->second != a.id)
        return r.error(field, str("'", a.content, "' has id ", a.id, " but id ", v->second,
                                  " in model.vocab"));
      max_id = std::max<int64_t>(max_id, a.id);
      (a.normalized ? m->normalized_trie : m->raw_trie).add(a.content, a.id);
      m->added.push_back(std::move(a));
    }
  }

  // Bytes of every id for decoding, and which ids exist.
  const size_t n = static_cast<size_t>(max_id) + 1;
  std::vector<std::string> bytes(n);
  m->known.assign(n, 0);
  m->special.assign(n, 0);
  std::unordered_map<uint32_t, uint8_t> from_alphabet;
  const auto alphabet = byte_alphabet();
  for (int b = 0; b < 256; ++b) from_alphabet[alphabet[b]] = static_cast<uint8_t>(b);
  // ByteLevel decoding of one token: its characters back to bytes, or its own UTF-8 when one of
  // them is outside the alphabet.
  auto token_to_bytes = [&](const std::string& s) {
    std::string out;
    const auto* p = reinterpret_cast<const uint8_t*>(s.data());
    for (size_t i = 0; i < s.size();) {
      size_t prefix = 0;
      bool incomplete = false;
      const size_t len = utf8_char(p + i, s.size() - i, &prefix, &incomplete);
      if (!len) return s;
      auto it = from_alphabet.find(utf8_code_point(p + i, len));
      if (it == from_alphabet.end()) return s;
      out.push_back(static_cast<char>(it->second));
      i += len;
    }
    return out;
  };
  std::vector<std::string> owner(n);
  for (auto& [s, id] : m->vocab) {
    if (m->known[id])
      return r.error("model.vocab",
                     str("id ", id, " is given to both '", owner[id], "' and '", s, "'"));
    m->known[id] = 1;
    owner[id] = s;
    bytes[id] = token_to_bytes(s);
  }
  for (const AddedToken& a : m->added) {
    if (m->known[a.id] && owner[a.id] != a.content)
      return r.error("added_tokens", str("id ", a.id, " is given to both '", owner[a.id], "' and '",
                                         a.content, "'"));
    m->known[a.id] = 1;
    owner[a.id] = a.content;
    m->special[a.id] = a.special;
    bytes[a.id] = token_to_bytes(a.content);
  }
  std::unique_ptr<Tokenizer> t(new Tokenizer(std::move(impl)));
  t->bytes_ = std::move(bytes);
  return t;
}

}  // namespace sp
