// libFuzzer target: golden files (a safetensors image read by read_golden for a small vocabulary).
#include <cstddef>
#include <cstdint>
#include <string>

#include "model/config.h"
#include "tools/golden.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto f = sp::SafetensorsFile::from_bytes(std::string(reinterpret_cast<const char*>(data), size),
                                           "fuzz.golden");
  if (!f.is_ok()) return 0;
  sp::Config c;
  c.vocab_size = 8;
  auto g = sp::read_golden(**f, c);
  if (!g.is_ok()) return 0;
  for (const auto& p : *g) {
    if (p.ids.empty()) __builtin_trap();
    for (int32_t id : p.ids)
      if (id < 0 || id >= c.vocab_size) __builtin_trap();
    for (int32_t id : p.greedy)
      if (id < 0 || id >= c.vocab_size) __builtin_trap();
    // verify reads every logit of the prompt and decode rows.
    volatile float sink = 0;
    const size_t L = p.ids.size(), G = p.greedy.size();
    sink = sink + p.prefill[L * c.vocab_size - 1];
    if (G) sink = sink + p.decode[G * c.vocab_size - 1];
  }
  return 0;
}
