// Builds without NCCL (no CUDA toolkit, or SP_CUDA=OFF): GPU stages pass the boundary tensor
// through host memory.
#include "parallel/device_link.h"

namespace sp {

bool nccl_link_built() {
  return false;
}

std::string nccl_unavailable() {
  return "this seekpipe was built without NCCL (CMake found no nccl.h next to the CUDA toolkit)";
}

Result<std::unique_ptr<DeviceLink>> make_nccl_link(Transport&, const DeviceLinkOptions&) {
  return Status::error(
      "this seekpipe was built without NCCL (CMake found no nccl.h next to the CUDA toolkit)");
}

}  // namespace sp
