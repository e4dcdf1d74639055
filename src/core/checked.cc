#include "core/checked.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace sp {

bool parse_int64_strict(std::string_view s, int64_t* out, int64_t lo, int64_t hi) {
  size_t i = 0;
  const bool neg = !s.empty() && s[0] == '-';
  if (neg) i = 1;
  if (i == s.size()) return false;
  int64_t v = 0;
  for (; i < s.size(); ++i) {
    if (s[i] < '0' || s[i] > '9') return false;
    const int d = s[i] - '0';
    // Accumulate negatively so INT64_MIN parses too.
    if (!checked_mul(v, 10, &v) || !checked_add(v, -d, &v)) return false;
  }
  if (!neg) {
    if (v == INT64_MIN) return false;
    v = -v;
  }
  if (v < lo || v > hi) return false;
  *out = v;
  return true;
}

std::string brief(std::string_view s, size_t max_chars) {
  if (s.size() <= max_chars) return std::string(s);
  return str(s.substr(0, max_chars), "... (", s.size(), " bytes in all)");
}

Result<FileKind> probe_file(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    if (errno == ENOENT || errno == ENOTDIR) return FileKind::kMissing;
    return Status::error(str("cannot access ", brief(path), ": ", std::strerror(errno)));
  }
  if (S_ISREG(st.st_mode)) return FileKind::kRegular;
  if (S_ISDIR(st.st_mode)) return FileKind::kDirectory;
  return FileKind::kOther;
}

Result<int> open_regular_file(const std::string& path, const std::string& what) {
  // O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused just below.
  int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0)
    return Status::error(str("cannot open ", what, " ", brief(path), ": ", std::strerror(errno)));
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    int e = errno;
    ::close(fd);
    return Status::error(str("cannot stat ", what, " ", brief(path), ": ", std::strerror(e)));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    const char* kind = S_ISDIR(st.st_mode)    ? "a directory"
                       : S_ISFIFO(st.st_mode) ? "a FIFO"
                       : S_ISCHR(st.st_mode)  ? "a character device"
                       : S_ISBLK(st.st_mode)  ? "a block device"
                       : S_ISSOCK(st.st_mode) ? "a socket"
                                              : "not a regular file";
    return Status::error(str(what, " ", brief(path), " is ", kind, "; expected a regular file"));
  }
  int flags = ::fcntl(fd, F_GETFL);
  if (flags >= 0) ::fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
  return fd;
}

Result<std::string> read_regular_file(const std::string& path, int64_t max_bytes,
                                      const std::string& what) {
  SP_ASSIGN_OR_RETURN(int fd, open_regular_file(path, what));
  std::string out;
  char buf[65536];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      int e = errno;
      ::close(fd);
      return Status::error(str("cannot read ", what, " ", brief(path), ": ", std::strerror(e)));
    }
    if (n == 0) break;
    // The size is checked while reading, not from stat: the file may grow meanwhile.
    if (static_cast<int64_t>(out.size()) + n > max_bytes) {
      ::close(fd);
      return Status::error(str(what, " ", brief(path), " is larger than ", max_bytes,
                               " bytes; expected at most that (a real one is far smaller)"));
    }
    out.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  return out;
}

}  // namespace sp
