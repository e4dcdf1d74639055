// libFuzzer target: the safetensors header parser on arbitrary file images.
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "model/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // A copy, so reads past `size` are caught and the data is 8-byte aligned like a mapping.
  auto f = sp::SafetensorsFile::from_bytes(std::string(reinterpret_cast<const char*>(data), size),
                                           "fuzz.safetensors");
  if (!f.is_ok()) return 0;
  // Every accepted tensor lies inside the image and its size matches dtype x shape.
  for (const auto& [name, t] : (*f)->tensors()) {
    if (t.nbytes != t.numel() * sp::dtype_size(t.dtype)) __builtin_trap();
    volatile uint8_t sink = 0;
    if (t.nbytes > 0) sink = sink + t.data[0] + t.data[t.nbytes - 1];
  }
  return 0;
}
