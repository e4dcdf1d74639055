#pragma once

#include <string>
#include <vector>

namespace sp {

// seekpipe bench serve [--host H] [--port P] [flags]: drives a running OpenAI-compatible server
// with a random dataset (as `vllm bench serve`) and prints throughput, TTFT, TPOT and ITL.
int cmd_bench_serve(const std::vector<std::string>& args);

}  // namespace sp
