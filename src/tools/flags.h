// Command-line flags: every flag is declared with its kind, default and help; values are
// validated and every mistake is an error that names the flag and says what was expected.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "core/status.h"

namespace sp {

enum class FlagKind { kString, kInt, kFloat, kBool, kIntList };

struct FlagSpec {
  std::string name;  // without the leading --
  FlagKind kind;
  std::string default_value;  // empty: no default
  std::string help;
  double min_value = -1e300, max_value = 1e300;  // numeric kinds
  std::vector<std::string> choices;              // kString, when restricted
  bool repeatable = false;
  // Extra check of the value's syntax and range (kString); the error names the flag.
  Status (*validate)(const std::string& flag, const std::string& value) = nullptr;
};

class Flags {
 public:
  explicit Flags(std::vector<FlagSpec> specs) : specs_(std::move(specs)) {}
  Status parse(const std::vector<std::string>& args);
  std::string help() const;

  bool given(const std::string& name) const { return values_.count(name) > 0; }
  std::string str(const std::string& name) const;
  int64_t i64(const std::string& name) const;
  double f64(const std::string& name) const;
  bool boolean(const std::string& name) const;
  // Every value of a (possibly repeated) int-list flag.
  std::vector<std::vector<int32_t>> int_lists(const std::string& name) const;
  // Every value of a (possibly repeated) flag, in order.
  std::vector<std::string> strings(const std::string& name) const;

 private:
  const FlagSpec* find(const std::string& name) const;
  std::vector<FlagSpec> specs_;
  std::map<std::string, std::vector<std::string>> values_;
};

Result<std::vector<int32_t>> parse_int_list(const std::string& flag, const std::string& text);

// Validators for FlagSpec::validate.
// --pp-partition: vllm, auto, or at most kMaxStages layer counts, each in [1, kMaxLayersPerStage]
// (so neither an entry nor the sum can overflow an int; topology checks the sum and the count).
constexpr int kMaxStages = 4096;
constexpr int kMaxLayersPerStage = 1 << 20;
Status validate_pp_partition(const std::string& flag, const std::string& value);
// Splits on ',' keeping empty items (so "1,,2" and "1," are errors, not skipped).
std::vector<std::string> split_commas(const std::string& text);
// --fault-inject: STAGE:STEP[:kill|error|stall|cuda|nccl], STAGE in [0, kMaxStages), STEP in [0,
// 2^62].
Status validate_fault_inject(const std::string& flag, const std::string& value);
// --devices: distinct GPU ordinals, comma-separated, each in [0, kMaxStages).
Status validate_devices(const std::string& flag, const std::string& value);

}  // namespace sp
