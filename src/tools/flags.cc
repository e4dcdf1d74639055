#include "tools/flags.h"

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <set>
#include <sstream>

#include "core/checked.h"

namespace sp {

namespace {

// Strict: digits with an optional '-', no spaces, '+' or trailing text, no overflow.
bool parse_i64(const std::string& s, int64_t* out) {
  return parse_int64_strict(s, out);
}

bool parse_f64(const std::string& s, double* out) {
  if (s.empty() || std::isspace(static_cast<unsigned char>(s[0]))) return false;
  char* end = nullptr;
  errno = 0;
  double v = std::strtod(s.c_str(), &end);
  if (errno || *end || !std::isfinite(v)) return false;
  *out = v;
  return true;
}

// A bound of an integer flag for a message (the defaults, +-1e300, are outside int64).
int64_t clamp_i64(double v) {
  if (v <= -9.2e18) return INT64_MIN;
  if (v >= 9.2e18) return INT64_MAX;
  return static_cast<int64_t>(v);
}

}  // namespace

std::vector<std::string> split_commas(const std::string& text) {
  std::vector<std::string> items;
  size_t start = 0;
  for (;;) {
    size_t comma = text.find(',', start);
    items.push_back(text.substr(start, comma - start));
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return items;
}

Result<std::vector<int32_t>> parse_int_list(const std::string& flag, const std::string& text) {
  std::vector<int32_t> out;
  for (const std::string& item : split_commas(text)) {
    int64_t v;
    if (!parse_int64_strict(item, &v, 0, INT32_MAX))
      return Status::error(sp::str("--", flag, ": '", brief(item),
                                   "' is not a token id; expected comma-separated integers in [0, ",
                                   INT32_MAX, "] like 1,2,3"));
    out.push_back(static_cast<int32_t>(v));
  }
  return out;
}

Status validate_pp_partition(const std::string& flag, const std::string& value) {
  if (value == "vllm" || value == "auto") return Status::ok();
  const auto items = split_commas(value);
  if (items.size() > static_cast<size_t>(kMaxStages))
    return Status::error(
        sp::str("--", flag, ": ", items.size(), " stages; expected at most ", kMaxStages));
  for (const std::string& item : items) {
    int64_t v;
    if (!parse_int64_strict(item, &v, 1, kMaxLayersPerStage))
      return Status::error(
          sp::str("--", flag, ": '", brief(item),
                  "' is not a layer count; expected vllm, auto, or positive integers (each at "
                  "most ",
                  kMaxLayersPerStage, ") like 11,11,11,10"));
  }
  return Status::ok();
}

Status validate_fault_inject(const std::string& flag, const std::string& value) {
  std::vector<std::string> parts;
  std::stringstream ss(value);
  std::string part;
  while (std::getline(ss, part, ':')) parts.push_back(part);
  if (!value.empty() && value.back() == ':') parts.push_back("");
  int64_t v;
  const bool at_load = parts.size() == 3 && parts[1] == "load" && parts[2] == "stall";
  const bool ok = (parts.size() == 2 || parts.size() == 3) &&
                  parse_int64_strict(parts[0], &v, 0, kMaxStages - 1) &&
                  (at_load || (parse_int64_strict(parts[1], &v, 0, int64_t{1} << 62) &&
                               (parts.size() == 2 || parts[2] == "kill" || parts[2] == "error" ||
                                parts[2] == "stall" || parts[2] == "cuda" || parts[2] == "nccl")));
  if (!ok)
    return Status::error(
        sp::str("--", flag, " '", brief(value),
                "': expected STAGE:STEP or STAGE:STEP:kill|error|stall|cuda|nccl with STAGE in "
                "[0, ",
                kMaxStages, ") and STEP >= 0, e.g. 1:3:kill, or STAGE:load:stall"));
  return Status::ok();
}

Status validate_devices(const std::string& flag, const std::string& value) {
  std::vector<std::string> parts;
  std::stringstream ss(value);
  std::string part;
  while (std::getline(ss, part, ',')) parts.push_back(part);
  if (!value.empty() && value.back() == ',') parts.push_back("");
  std::set<int64_t> seen;
  for (const std::string& p : parts) {
    int64_t v;
    if (!parse_int64_strict(p, &v, 0, kMaxStages - 1))
      return Status::error(sp::str("--", flag, " '", brief(value),
                                   "': expected GPU ordinals like 0,2,3 (each an integer in [0, ",
                                   kMaxStages, "))"));
    if (!seen.insert(v).second)
      return Status::error(sp::str("--", flag, " '", brief(value), "': GPU ", v,
                                   " is listed twice; each stage needs its own GPU"));
  }
  if (parts.empty())
    return Status::error(sp::str("--", flag, ": expected GPU ordinals like 0,2,3, got nothing"));
  return Status::ok();
}

const FlagSpec* Flags::find(const std::string& name) const {
  for (auto& s : specs_)
    if (s.name == name) return &s;
  return nullptr;
}

Status Flags::parse(const std::vector<std::string>& args) {
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a.rfind("--", 0) != 0)
      return Status::error(sp::str("unexpected argument '", brief(a),
                                   "'; expected --flag value pairs (see --help)"));
    std::string name = a.substr(2), value;
    bool has_value = false;
    if (auto eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      has_value = true;
    }
    const FlagSpec* spec = find(name);
    if (!spec)
      return Status::error(
          sp::str("unknown flag --", brief(name), " (see --help for the flags of this command)"));
    if (spec->kind == FlagKind::kBool) {
      if (!has_value) value = "true";
      if (value != "true" && value != "false")
        return Status::error(
            sp::str("--", name, ": expected true or false, got '", brief(value), "'"));
    } else if (!has_value) {
      if (i + 1 >= args.size())
        return Status::error(sp::str("--", name, ": missing value (", spec->help, ")"));
      value = args[++i];
    }
    if (values_.count(name) && !spec->repeatable)
      return Status::error(sp::str("--", name, " given more than once"));
    switch (spec->kind) {
      case FlagKind::kInt: {
        int64_t v;
        if (!parse_i64(value, &v))
          return Status::error(
              sp::str("--", name, ": expected an integer, got '", brief(value), "'"));
        if (v < spec->min_value || v > spec->max_value)
          return Status::error(sp::str("--", name, ": expected an integer in [",
                                       clamp_i64(spec->min_value), ", ", clamp_i64(spec->max_value),
                                       "], got ", v));
        break;
      }
      case FlagKind::kFloat: {
        double v;
        if (!parse_f64(value, &v))
          return Status::error(
              sp::str("--", name, ": expected a number, got '", brief(value), "'"));
        if (v < spec->min_value || v > spec->max_value)
          return Status::error(sp::str("--", name, ": expected a number in [", spec->min_value,
                                       ", ", spec->max_value, "], got ", v));
        break;
      }
      case FlagKind::kIntList: {
        auto r = parse_int_list(name, value);
        if (!r) return r.status();
        break;
      }
      case FlagKind::kString:
        if (!spec->choices.empty()) {
          bool ok = false;
          for (auto& c : spec->choices) ok |= c == value;
          if (!ok) {
            std::string list;
            for (auto& c : spec->choices) list += (list.empty() ? "" : ", ") + c;
            return Status::error(
                sp::str("--", name, ": expected one of ", list, ", got '", brief(value), "'"));
          }
        } else if (value.empty()) {
          return Status::error(sp::str("--", name, ": expected a non-empty value"));
        }
        if (spec->validate) SP_RETURN_IF_ERROR(spec->validate(name, value));
        break;
      case FlagKind::kBool:
        break;
    }
    values_[name].push_back(value);
  }
  return Status::ok();
}

std::string Flags::str(const std::string& name) const {
  auto it = values_.find(name);
  if (it != values_.end()) return it->second.back();
  const FlagSpec* s = find(name);
  SP_CHECK(s, "undeclared flag ", name);
  return s->default_value;
}
int64_t Flags::i64(const std::string& name) const {
  int64_t v = 0;
  SP_CHECK(parse_i64(str(name), &v), "flag ", name, " has no integer value");
  return v;
}
double Flags::f64(const std::string& name) const {
  double v = 0;
  SP_CHECK(parse_f64(str(name), &v), "flag ", name, " has no numeric value");
  return v;
}
bool Flags::boolean(const std::string& name) const {
  return str(name) == "true";
}

std::vector<std::vector<int32_t>> Flags::int_lists(const std::string& name) const {
  std::vector<std::vector<int32_t>> out;
  auto it = values_.find(name);
  if (it == values_.end()) return out;
  for (auto& v : it->second) out.push_back(parse_int_list(name, v).value());
  return out;
}

std::vector<std::string> Flags::strings(const std::string& name) const {
  auto it = values_.find(name);
  return it == values_.end() ? std::vector<std::string>{} : it->second;
}

std::string Flags::help() const {
  std::ostringstream os;
  for (auto& s : specs_) {
    os << "  --" << s.name;
    switch (s.kind) {
      case FlagKind::kInt:
        os << " N";
        break;
      case FlagKind::kFloat:
        os << " X";
        break;
      case FlagKind::kIntList:
        os << " ID,ID,...";
        break;
      case FlagKind::kString:
        os << (s.choices.empty() ? " VALUE" : " {" + [&] {
          std::string l;
          for (auto& c : s.choices) l += (l.empty() ? "" : ",") + c;
          return l;
        }() + "}");
        break;
      case FlagKind::kBool:
        break;
    }
    os << "\n      " << s.help;
    if (!s.default_value.empty()) os << " (default: " << s.default_value << ")";
    if (s.repeatable) os << " (repeatable)";
    os << "\n";
  }
  return os.str();
}

}  // namespace sp
