// The Chrome trace of a pipeline run (chrome://tracing, Perfetto): one track per stage.
#pragma once

#include <string>
#include <vector>

#include "core/status.h"

namespace sp {

struct StageReport;  // engine/pipeline.h

// Chrome trace (chrome://tracing, Perfetto): one track per stage.
Status write_chrome_trace(const std::string& path, const std::vector<StageReport>& reports);

}  // namespace sp
