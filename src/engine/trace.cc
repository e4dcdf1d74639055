#include "engine/trace.h"

#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "core/checked.h"
#include "engine/pipeline.h"

namespace sp {

namespace {

std::string dir_of(const std::string& path) {
  auto slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

// The file a trace path names: a symbolic link is followed, so the rename replaces its target.
std::string resolve(const std::string& path) {
  char* real = ::realpath(path.c_str(), nullptr);
  if (!real) return path;
  std::string out = real;
  ::free(real);
  return out;
}

}  // namespace

Status check_trace_path(const std::string& path) {
  SP_ASSIGN_OR_RETURN(FileKind kind, probe_file(path));
  if (kind != FileKind::kMissing && kind != FileKind::kRegular)
    return Status::error(str("--trace ", brief(path),
                             ": expected a regular file (it is replaced when the run ends)"));
  const std::string dir = dir_of(resolve(path));
  if (::access(dir.c_str(), W_OK | X_OK) != 0)
    return Status::error(str("--trace: cannot write ", brief(path), ": directory ", brief(dir),
                             ": ", std::strerror(errno)));
  return Status::ok();
}

Status write_chrome_trace(const std::string& path, const std::vector<StageReport>& reports) {
  SP_RETURN_IF_ERROR(check_trace_path(path));
  const std::string target = resolve(path);
  std::string tmp = target + ".tmp.XXXXXX";
  int fd = ::mkstemp(tmp.data());
  if (fd < 0)
    return Status::error(str("--trace: cannot write ", brief(path), ": ", std::strerror(errno)));
  ::fchmod(fd, 0644);
  FILE* f = ::fdopen(fd, "w");
  if (!f) {
    ::close(fd);
    ::unlink(tmp.c_str());
    return Status::error(str("--trace: cannot write ", brief(path)));
  }
  bool ok = std::fputs("{\"traceEvents\":[\n", f) >= 0;
  bool comma = false;
  for (const StageReport& r : reports) {
    ok = ok &&
         std::fprintf(f,
                      "%s{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":1,\"tid\":%d,"
                      "\"args\":{\"name\":\"stage %d\",\"boundary_bytes_device\":%lld,"
                      "\"boundary_bytes_host\":%lld}}",
                      comma ? ",\n" : "", r.stage, r.stage, static_cast<long long>(r.device_bytes),
                      static_cast<long long>(r.host_bytes)) >= 0;
    comma = true;
    for (const TraceEvent& e : r.events) {
      ok = ok && std::fprintf(f,
                              ",\n{\"name\":\"%s mb%lld\",\"cat\":\"%s\",\"ph\":\"X\",\"pid\":1,"
                              "\"tid\":%d,\"ts\":%.1f,\"dur\":%.1f,"
                              "\"args\":{\"micro_batch\":%lld}}",
                              e.name.c_str(), static_cast<long long>(e.step), e.name.c_str(),
                              r.stage, e.start_us, e.dur_us, static_cast<long long>(e.step)) >= 0;
    }
  }
  ok = ok && std::fputs("\n],\"displayTimeUnit\":\"ms\"}\n", f) >= 0;
  // Buffered output reaches the file only here: a full disk shows up in fflush/fsync/fclose.
  ok = ok && std::fflush(f) == 0 && ::fsync(fileno(f)) == 0;
  const int err = errno;
  ok = (std::fclose(f) == 0) && ok;
  if (!ok) {
    ::unlink(tmp.c_str());
    return Status::error(
        str("--trace: write failed: ", brief(path), ": ", std::strerror(err ? err : EIO)));
  }
  if (::rename(tmp.c_str(), target.c_str()) != 0) {
    const int e = errno;
    ::unlink(tmp.c_str());
    return Status::error(str("--trace: cannot replace ", brief(path), ": ", std::strerror(e)));
  }
  return Status::ok();
}

}  // namespace sp
