#include "tools/golden.h"

#include <cstring>

namespace sp {

Result<std::vector<GoldenPrompt>> read_golden(const SafetensorsFile& g, const Config& c) {
  std::vector<GoldenPrompt> out;
  auto ints = [&](const TensorInfo& t) -> Result<std::vector<int32_t>> {
    if (t.dtype != DType::kI64 && t.dtype != DType::kI32)
      return Status::error(str("golden file: ", t.name, ": expected I64 or I32 token ids, got ",
                               dtype_name(t.dtype)));
    std::vector<int32_t> v(static_cast<size_t>(t.numel()));
    for (int64_t i = 0; i < t.numel(); ++i) {
      int64_t x;
      if (t.dtype == DType::kI64)
        std::memcpy(&x, t.data + 8 * i, 8);
      else {
        int32_t y;
        std::memcpy(&y, t.data + 4 * i, 4);
        x = y;
      }
      v[i] = static_cast<int32_t>(x);
    }
    return v;
  };
  for (int i = 0;; ++i) {
    auto it = g.tensors().find(str("p", i, ".input_ids"));
    if (it == g.tensors().end()) break;
    GoldenPrompt p;
    SP_ASSIGN_OR_RETURN(p.ids, ints(it->second));
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
    SP_ASSIGN_OR_RETURN(p.greedy, ints(*gt));
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

}  // namespace sp
