#pragma once

#include <string>
#include <vector>

namespace sp {

// seekpipe bench offline --model DIR [engine flags] [bench flags]: bench serve's random workload
// and report without HTTP. The requests go into the engine loop on stage 0 exactly as the server's
// do (same scheduler, chunked prefill and continuous batching), over threads or mpirun.
int cmd_bench_offline(const std::vector<std::string>& args);

}  // namespace sp
