// libFuzzer target: config.json (both styles).
#include <cstddef>
#include <cstdint>
#include <string>

#include "model/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto r = sp::parse_config(std::string(reinterpret_cast<const char*>(data), size), "fuzz.json");
  if (!r.is_ok()) return 0;
  const sp::Config& c = *r;
  // An accepted config is within the documented ranges that later size arithmetic relies on.
  if (c.hc_mult < 1 || c.hc_mult > 16 || c.num_layers < 1 || c.num_layers > 1024 ||
      static_cast<int>(c.attn_kinds.size()) != c.num_layers ||
      static_cast<int>(c.mlp_kinds.size()) != c.num_layers ||
      static_cast<int>(c.compress_ratio.size()) != c.num_layers || c.vocab_size < 1 ||
      c.experts_per_tok > c.n_routed_experts || c.rope_dim > c.head_dim || c.rope_dim % 2)
    __builtin_trap();
  (void)sp::describe_config(c);
  return 0;
}
