#include "tools/golden.h"

#include <cstring>

#include "core/checked.h"

namespace sp {

namespace {

// Token ids of a golden tensor, each in [0, vocab): read as int64, so a wide value is refused, not
// wrapped into range.
Result<std::vector<int32_t>> token_ids(const TensorInfo& t, int64_t vocab) {
  if (t.dtype != DType::kI64 && t.dtype != DType::kI32)
    return Status::error(str("golden file: ", brief(t.name),
                             ": expected I64 or I32 token ids, got ", dtype_name(t.dtype)));
  if (t.shape.size() != 1)
    return Status::error(str("golden file: ", brief(t.name), ": expected a 1-d tensor, got shape ",
                             shape_str(t.shape)));
  std::vector<int32_t> v(static_cast<size_t>(t.numel()));
  for (int64_t i = 0; i < t.numel(); ++i) {
    int64_t x;
    if (t.dtype == DType::kI64) {
      std::memcpy(&x, t.data + 8 * i, 8);
    } else {
      int32_t y;
      std::memcpy(&y, t.data + 4 * i, 4);
      x = y;
    }
    if (x < 0 || x >= vocab)
      return Status::error(str("golden file: ", brief(t.name), "[", i, "] = ", x,
                               ": expected a token id in [0, ", vocab, ")"));
    v[i] = static_cast<int32_t>(x);
  }
  return v;
}

}  // namespace

Result<std::vector<GoldenPrompt>> read_golden(const SafetensorsFile& g, const Config& c) {
  // verify reads F32 tensors (logits, hidden states) in place: they must be 4-byte aligned.
  for (auto& [name, t] : g.tensors())
    if (reinterpret_cast<uintptr_t>(t.data) % dtype_size(t.dtype) != 0)
      return Status::error(str("golden file: ", brief(name), ": data is not aligned to its ",
                               dtype_size(t.dtype),
                               "-byte elements; expected the header padded to a multiple of 8 "
                               "bytes and each tensor at a multiple of its element size"));
  std::vector<GoldenPrompt> out;
  for (int i = 0;; ++i) {
    auto it = g.tensors().find(str("p", i, ".input_ids"));
    if (it == g.tensors().end()) break;
    GoldenPrompt p;
    SP_ASSIGN_OR_RETURN(p.ids, token_ids(it->second, c.vocab_size));
    if (p.ids.empty())
      return Status::error(str("golden file: p", i, ".input_ids: expected at least one token"));
    auto need = [&](const std::string& name,
                    std::vector<int64_t> shape) -> Result<const TensorInfo*> {
      auto jt = g.tensors().find(name);
      if (jt == g.tensors().end()) return Status::error(str("golden file: missing tensor ", name));
      if (jt->second.dtype != DType::kF32 && shape.size() == 2)
        return Status::error(str("golden file: ", name, ": expected F32"));
      if (!shape.empty() && jt->second.shape != shape)
        return Status::error(str("golden file: ", name, ": expected shape ", shape_str(shape),
                                 ", got ", shape_str(jt->second.shape)));
      return &jt->second;
    };
    const int64_t L = static_cast<int64_t>(p.ids.size());
    SP_ASSIGN_OR_RETURN(const TensorInfo* pl,
                        need(str("p", i, ".prefill_logits"), {L, c.vocab_size}));
    SP_ASSIGN_OR_RETURN(const TensorInfo* gt, need(str("p", i, ".greedy_tokens"), {}));
    SP_ASSIGN_OR_RETURN(p.greedy, token_ids(*gt, c.vocab_size));
    SP_ASSIGN_OR_RETURN(
        const TensorInfo* dl,
        need(str("p", i, ".decode_logits"), {static_cast<int64_t>(p.greedy.size()), c.vocab_size}));
    p.prefill = reinterpret_cast<const float*>(pl->data);
    p.decode = reinterpret_cast<const float*>(dl->data);
    out.push_back(std::move(p));
  }
  if (out.empty())
    return Status::error(
        "golden file has no prompts: expected tensors p0.input_ids, p0.prefill_logits, ...");
  return out;
}

Status write_golden(const std::string& path, const std::vector<GoldenRecord>& prompts,
                    int64_t vocab) {
  struct Entry {
    std::string name, dtype;
    std::vector<int64_t> shape;
    std::vector<uint8_t> bytes;
  };
  std::vector<Entry> entries;
  auto ids = [](const std::vector<int32_t>& v) {
    std::vector<uint8_t> b(v.size() * 8);
    for (size_t i = 0; i < v.size(); ++i) {
      const int64_t x = v[i];
      std::memcpy(b.data() + 8 * i, &x, 8);
    }
    return b;
  };
  auto floats = [](const std::vector<float>& v) {
    std::vector<uint8_t> b(v.size() * 4);
    if (!v.empty()) std::memcpy(b.data(), v.data(), b.size());
    return b;
  };
  for (size_t i = 0; i < prompts.size(); ++i) {
    const GoldenRecord& g = prompts[i];
    const int64_t L = static_cast<int64_t>(g.ids.size()), G = static_cast<int64_t>(g.greedy.size());
    entries.push_back({str("p", i, ".input_ids"), "I64", {L}, ids(g.ids)});
    entries.push_back({str("p", i, ".prefill_logits"), "F32", {L, vocab}, floats(g.prefill)});
    entries.push_back({str("p", i, ".greedy_tokens"), "I64", {G}, ids(g.greedy)});
    entries.push_back({str("p", i, ".decode_logits"), "F32", {G, vocab}, floats(g.decode)});
  }
  std::string header = "{";
  int64_t off = 0;
  for (size_t k = 0; k < entries.size(); ++k) {
    const Entry& e = entries[k];
    std::string shape;
    for (size_t d = 0; d < e.shape.size(); ++d)
      shape += (d ? "," : "") + std::to_string(e.shape[d]);
    const int64_t n = static_cast<int64_t>(e.bytes.size());
    header += str(k ? "," : "", "\"", e.name, "\":{\"dtype\":\"", e.dtype, "\",\"shape\":[", shape,
                  "],\"data_offsets\":[", off, ",", off + n, "]}");
    off += n;
  }
  header += "}";
  while (header.size() % 8) header += ' ';
  const std::string tmp = path + ".tmp";
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) return Status::error(str("cannot write golden file ", path));
  const uint64_t hn = header.size();
  bool ok = std::fwrite(&hn, 8, 1, f) == 1 &&
            std::fwrite(header.data(), 1, header.size(), f) == header.size();
  for (const Entry& e : entries)
    ok = ok &&
         (e.bytes.empty() || std::fwrite(e.bytes.data(), 1, e.bytes.size(), f) == e.bytes.size());
  ok = (std::fclose(f) == 0) && ok;
  if (!ok || std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    return Status::error(str("writing golden file ", path, " failed"));
  }
  return Status::ok();
}

}  // namespace sp
