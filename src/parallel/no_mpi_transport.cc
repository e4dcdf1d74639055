// Built when MPI is not available: the threads transport still works.
#include "parallel/transport.h"

namespace sp {

Result<std::unique_ptr<Transport>> make_mpi_transport(int*, char***) {
  return Status::error(
      "this seekpipe was built without MPI (install libopenmpi-dev and rebuild) but was started by "
      "mpirun");
}

}  // namespace sp
