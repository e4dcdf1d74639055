#include "engine/trace.h"

#include <cstdio>
#include <fstream>

#include "engine/pipeline.h"

namespace sp {

Status write_chrome_trace(const std::string& path, const std::vector<StageReport>& reports) {
  std::ofstream f(path);
  if (!f) return Status::error(str("--trace: cannot write ", path));
  f << "{\"traceEvents\":[\n";
  bool comma = false;
  for (const StageReport& r : reports) {
    f << (comma ? ",\n" : "")
      << "{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":1,\"tid\":" << r.stage
      << ",\"args\":{\"name\":\"stage " << r.stage << "\"}}";
    comma = true;
    for (const TraceEvent& e : r.events) {
      char line[256];
      std::snprintf(line, sizeof line,
                    ",\n{\"name\":\"%s\",\"cat\":\"%s\",\"ph\":\"X\",\"pid\":1,\"tid\":%d,\"ts\":%."
                    "1f,\"dur\":%.1f,"
                    "\"args\":{\"micro_batch\":%lld}}",
                    (e.name + " mb" + std::to_string(e.step)).c_str(), e.name.c_str(), r.stage,
                    e.start_us, e.dur_us, static_cast<long long>(e.step));
      f << line;
    }
  }
  f << "\n],\"displayTimeUnit\":\"ms\"}\n";
  return f ? Status::ok() : Status::error(str("--trace: write failed: ", path));
}

}  // namespace sp
