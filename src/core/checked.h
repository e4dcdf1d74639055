// Checked arithmetic and bounded input: what every parser of untrusted files and flags uses.
//  * sizes are computed in 64-bit arithmetic that reports overflow instead of wrapping;
//  * integers are parsed with range checks (no silent truncation to a narrower type);
//  * files are read only when they are regular files (after following links) and no larger than a
//    cap, so a FIFO, a device or a directory is an error rather than a hang or an endless read;
//  * text echoed into an error message is truncated.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "core/status.h"

namespace sp {

// a + b and a * b, false on int64 overflow (and *out unspecified).
inline bool checked_add(int64_t a, int64_t b, int64_t* out) {
  return !__builtin_add_overflow(a, b, out);
}
inline bool checked_mul(int64_t a, int64_t b, int64_t* out) {
  return !__builtin_mul_overflow(a, b, out);
}

// An int64 accumulator that remembers whether any step overflowed.
class CheckedI64 {
 public:
  CheckedI64(int64_t v = 0) : v_(v) {}  // NOLINT(implicit)
  CheckedI64& operator+=(CheckedI64 o) {
    ok_ = ok_ && o.ok_ && checked_add(v_, o.v_, &v_);
    return *this;
  }
  CheckedI64& operator*=(CheckedI64 o) {
    ok_ = ok_ && o.ok_ && checked_mul(v_, o.v_, &v_);
    return *this;
  }
  friend CheckedI64 operator+(CheckedI64 a, CheckedI64 b) { return a += b; }
  friend CheckedI64 operator*(CheckedI64 a, CheckedI64 b) { return a *= b; }
  bool ok() const { return ok_; }
  int64_t value() const { return v_; }

 private:
  int64_t v_ = 0;
  bool ok_ = true;
};

// Decimal integer: an optional '-', then digits only (no spaces, '+', hex or trailing text), in
// [lo, hi]. False on anything else, overflow included.
bool parse_int64_strict(std::string_view s, int64_t* out, int64_t lo = INT64_MIN,
                        int64_t hi = INT64_MAX);

// At most `max_chars` of `s` for an error message, with the full length when cut.
std::string brief(std::string_view s, size_t max_chars = 120);

enum class FileKind { kMissing, kRegular, kDirectory, kOther };
// What `path` is after following symbolic links. A link loop, a permission problem or any other
// stat failure is an error naming the path; a path that does not exist is kMissing.
Result<FileKind> probe_file(const std::string& path);

// Opens `path` for reading if it is a regular file (after following links); `what` names the file
// in errors ("config.json", "safetensors file"). Never blocks on a FIFO. Returns the descriptor.
Result<int> open_regular_file(const std::string& path, const std::string& what);

// The whole of a regular file of at most `max_bytes` bytes.
Result<std::string> read_regular_file(const std::string& path, int64_t max_bytes,
                                      const std::string& what);

}  // namespace sp
