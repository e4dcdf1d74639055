// The CUDA backend: device memory, the step's metadata on the device, and the op dispatch.
#include <cstdio>
#include <cstdlib>

#include "backend/cuda/kernels.h"

namespace sp {
namespace cuda {

void check_cuda(cudaError_t e, const char* what, const char* file, int line) {
  if (e == cudaSuccess) return;
  std::fprintf(stderr, "CUDA error at %s:%d: %s: %s (%s)\n", file, line, what,
               cudaGetErrorString(e), cudaGetErrorName(e));
  std::abort();
}

Workspace::~Workspace() {
  for (void* p : ptr_)
    if (p) cudaFree(p);
}

void* Workspace::get(int slot, size_t bytes) {
  if (slot >= static_cast<int>(ptr_.size())) {
    ptr_.resize(slot + 1, nullptr);
    size_.resize(slot + 1, 0);
  }
  if (bytes > size_[slot]) {
    // Growing: nothing queued may still use the old buffer.
    SP_CUDA(cudaStreamSynchronize(stream_));
    if (ptr_[slot]) SP_CUDA(cudaFree(ptr_[slot]));
    size_t n = std::max<size_t>(bytes, 256);
    SP_CUDA(cudaMalloc(&ptr_[slot], n));
    size_[slot] = n;
  }
  return ptr_[slot];
}

}  // namespace cuda

bool cuda_backend_built() {
  return true;
}

bool cuda_device_available() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver / no device" error
    return false;
  }
  return n > 0;
}

Result<std::unique_ptr<Backend>> make_cuda_backend(int) {
  return Status::error("--device cuda: the CUDA backend is not complete yet");
}

}  // namespace sp
