// The Chrome trace of a pipeline run (chrome://tracing, Perfetto): one track per stage.
#pragma once

#include <string>
#include <vector>

#include "core/status.h"

namespace sp {

struct StageReport;  // engine/pipeline.h

// Checks, before a run, that a trace can be written to `path` later, without creating or
// truncating it: `path` is a regular file or does not exist yet, and its directory is writable.
Status check_trace_path(const std::string& path);

// Chrome trace (chrome://tracing, Perfetto): one track per stage. Written to a temporary file in
// the same directory, every write checked, then renamed over `path`: a failed write (disk full)
// is an error and leaves an existing file as it was.
Status write_chrome_trace(const std::string& path, const std::vector<StageReport>& reports);

}  // namespace sp
