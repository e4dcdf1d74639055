// libFuzzer target: the command-line flag parser. The input is a NUL-separated argument list; the
// flag table mirrors generate's kinds (ints, floats, strings with choices and validators, bools,
// repeatable id lists).
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "tools/flags.h"

namespace {

std::vector<sp::FlagSpec> specs() {
  std::vector<sp::FlagSpec> s = {
      {"model", sp::FlagKind::kString, "", "m"},
      {"load-format",
       sp::FlagKind::kString,
       "auto",
       "f",
       -1e300,
       1e300,
       {"auto", "safetensors", "dummy"}},
      {"seed", sp::FlagKind::kInt, "0", "s", 0, 9.2e18},
      {"threads", sp::FlagKind::kInt, "4", "t", 1, 1024},
      {"max-model-len", sp::FlagKind::kInt, "4096", "l", 1, 1 << 30},
      {"verbose", sp::FlagKind::kBool, "", "v"},
      {"pp", sp::FlagKind::kInt, "1", "p", 1, 4096},
      {"pp-partition", sp::FlagKind::kString, "vllm", "pp"},
      {"fault-inject", sp::FlagKind::kString, "", "fi"},
      {"prompt-ids", sp::FlagKind::kIntList, "", "ids", -1e300, 1e300, {}, true},
      {"temperature", sp::FlagKind::kFloat, "0", "t", 0, 100},
      {"top-p", sp::FlagKind::kFloat, "1", "p", 1e-9, 1},
  };
  s[7].validate = sp::validate_pp_partition;
  s[8].validate = sp::validate_fault_inject;
  return s;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::vector<std::string> args(1);
  for (size_t i = 0; i < size; ++i) {
    if (data[i] == 0)
      args.emplace_back();
    else
      args.back() += static_cast<char>(data[i]);
  }
  sp::Flags f(specs());
  if (!f.parse(args).is_ok()) return 0;
  // Accepted values read back without tripping the parser's own checks.
  (void)f.i64("seed");
  (void)f.i64("threads");
  (void)f.f64("temperature");
  (void)f.boolean("verbose");
  for (const auto& ids : f.int_lists("prompt-ids"))
    for (int32_t id : ids)
      if (id < 0) __builtin_trap();
  return 0;
}
