#include "model/strict_json.h"

#include <new>
#include <set>
#include <vector>

#include "core/checked.h"

namespace sp {

namespace {

// Thrown from the parser callback to stop parsing at the first violation.
struct JsonRefused {
  std::string message;
};

}  // namespace

Result<nlohmann::json> parse_json_strict(std::string_view text, const std::string& source,
                                         int max_depth) {
  using nlohmann::json;
  // One set of keys per open object, innermost last.
  std::vector<std::set<std::string>> keys;
  auto cb = [&](int depth, json::parse_event_t ev, json& parsed) -> bool {
    if (depth > max_depth) throw JsonRefused{str("nested more than ", max_depth, " levels deep")};
    switch (ev) {
      case json::parse_event_t::object_start:
        keys.emplace_back();
        break;
      case json::parse_event_t::object_end:
        if (!keys.empty()) keys.pop_back();
        break;
      case json::parse_event_t::key: {
        const std::string& k = parsed.get_ref<const std::string&>();
        if (!keys.empty() && !keys.back().insert(k).second)
          throw JsonRefused{str("duplicate key \"", brief(k), "\" (at nesting depth ", depth,
                                "); expected every key of an object once")};
        break;
      }
      default:
        break;
    }
    return true;
  };
  try {
    return json::parse(text.begin(), text.end(), cb, /*allow_exceptions=*/true,
                       /*ignore_comments=*/false);
  } catch (const JsonRefused& e) {
    return Status::error(str(source, ": ", e.message));
  } catch (const std::bad_alloc&) {
    return Status::error(str(source, ": out of memory while parsing"));
  } catch (const std::exception& e) {
    return Status::error(str(source, ": not valid JSON: ", brief(e.what(), 200)));
  }
}

std::string json_brief(const nlohmann::json& v, size_t max_chars) {
  // Values reaching a message come from a depth-limited parse, so dump() cannot recurse deeply;
  // replacing invalid UTF-8 keeps dump() from throwing.
  return brief(v.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace), max_chars);
}

}  // namespace sp
