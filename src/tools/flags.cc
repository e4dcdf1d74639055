#include "tools/flags.h"

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <sstream>

namespace sp {

namespace {

bool parse_i64(const std::string& s, int64_t* out) {
  if (s.empty()) return false;
  char* end = nullptr;
  errno = 0;
  long long v = std::strtoll(s.c_str(), &end, 10);
  if (errno || *end) return false;
  *out = v;
  return true;
}

bool parse_f64(const std::string& s, double* out) {
  if (s.empty()) return false;
  char* end = nullptr;
  errno = 0;
  double v = std::strtod(s.c_str(), &end);
  if (errno || *end || !std::isfinite(v)) return false;
  *out = v;
  return true;
}

}  // namespace

Result<std::vector<int32_t>> parse_int_list(const std::string& flag, const std::string& text) {
  std::vector<int32_t> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    int64_t v;
    if (!parse_i64(item, &v) || v < 0 || v > INT32_MAX)
      return Status::error(sp::str(
          "--", flag, ": '", item,
          "' is not a token id; expected comma-separated non-negative integers like 1,2,3"));
    out.push_back(static_cast<int32_t>(v));
  }
  if (out.empty() || (!text.empty() && text.back() == ','))
    return Status::error(
        sp::str("--", flag, ": expected comma-separated non-negative integers like 1,2,3, got '",
                text, "'"));
  return out;
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
      return Status::error(
          sp::str("unexpected argument '", a, "'; expected --flag value pairs (see --help)"));
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
          sp::str("unknown flag --", name, " (see --help for the flags of this command)"));
    if (spec->kind == FlagKind::kBool) {
      if (!has_value) value = "true";
      if (value != "true" && value != "false")
        return Status::error(sp::str("--", name, ": expected true or false, got '", value, "'"));
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
          return Status::error(sp::str("--", name, ": expected an integer, got '", value, "'"));
        if (v < spec->min_value || v > spec->max_value)
          return Status::error(sp::str("--", name, ": expected an integer in [",
                                       static_cast<int64_t>(spec->min_value), ", ",
                                       static_cast<int64_t>(spec->max_value), "], got ", v));
        break;
      }
      case FlagKind::kFloat: {
        double v;
        if (!parse_f64(value, &v))
          return Status::error(sp::str("--", name, ": expected a number, got '", value, "'"));
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
                sp::str("--", name, ": expected one of ", list, ", got '", value, "'"));
          }
        } else if (value.empty()) {
          return Status::error(sp::str("--", name, ": expected a non-empty value"));
        }
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
