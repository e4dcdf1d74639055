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

}  // namespace sp
