// Compressors, lightning indexer, attention with sink (stub: being written).
#include "backend/cuda/kernels.h"

namespace sp::cuda {

void compress(cudaStream_t, Workspace&, Tensor, Tensor, const CompressorArgs&, const DevBatch&,
              Tensor, Tensor, Tensor) {
  SP_CHECK(false, "CUDA compress not implemented yet");
}
void indexer_topk(cudaStream_t, Workspace&, Tensor, Tensor, int, int, int, int, const DevBatch&,
                  Tensor, Tensor) {
  SP_CHECK(false, "CUDA indexer_topk not implemented yet");
}
void attention(cudaStream_t, Workspace&, Tensor, Tensor, const AttentionArgs&, const DevBatch&,
               const LayerState&, const Tensor*, Tensor) {
  SP_CHECK(false, "CUDA attention not implemented yet");
}
void window_update(cudaStream_t, Tensor, int, const DevBatch&, Tensor) {
  SP_CHECK(false, "CUDA window_update not implemented yet");
}

}  // namespace sp::cuda
