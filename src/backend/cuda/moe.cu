// Routed and shared experts (stub: being written).
#include "backend/cuda/kernels.h"

namespace sp::cuda {

void moe(cudaStream_t, Workspace&, Tensor, const MoeArgs&, const DevBatch&, Tensor) {
  SP_CHECK(false, "CUDA moe not implemented yet");
}
void prepare_moe(MoeWeights&, cudaStream_t) {}

}  // namespace sp::cuda
