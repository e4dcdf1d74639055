// Projections: y = x W^T for every weight format (stub: being written).
#include "backend/cuda/kernels.h"

namespace sp::cuda {

void linear(cudaStream_t, Workspace&, Tensor, const Matrix& w, Tensor) {
  SP_CHECK(false, "CUDA linear not implemented yet (", w.name, ")");
}
void grouped_linear(cudaStream_t, Workspace&, Tensor, const Matrix& w, int, Tensor) {
  SP_CHECK(false, "CUDA grouped_linear not implemented yet (", w.name, ")");
}
void embed(cudaStream_t, const Matrix& table, const DevBatch&, Tensor) {
  SP_CHECK(false, "CUDA embed not implemented yet (", table.name, ")");
}

}  // namespace sp::cuda
