#pragma once

#include <string>
#include <vector>

namespace sp {

// seekpipe serve --model DIR [--pp N] [--host 127.0.0.1] [--port 8000] [flags]
int cmd_serve(const std::vector<std::string>& args);

}  // namespace sp
