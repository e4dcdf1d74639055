// libFuzzer target: model.safetensors.index.json.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "model/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto r = sp::parse_safetensors_index(std::string_view(reinterpret_cast<const char*>(data), size),
                                       "fuzz.index.json");
  if (!r.is_ok()) return 0;
  // Accepted shard names never leave the model directory.
  for (const auto& s : r->shards)
    if (s.empty() || s == "." || s == ".." || s.find('/') != std::string::npos) __builtin_trap();
  return 0;
}
