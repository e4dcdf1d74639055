// bench_nccl: the boundary transfer's hardware reference. Two GPUs of this machine (0 and 1, or
// the two given), one thread each, a two-rank NCCL communicator as the pipeline's links use;
// ping-pong of the boundary tensor's sizes: one-way time = round trip / 2 (host-timed), and
// bandwidth = bytes / one-way time. Two ways: a blocking communicator with each hop's stream
// synchronised, and as the pipeline's NCCL link does it (a non-blocking communicator, each call
// polled with ncclCommGetAsyncError until it is no longer in progress, completion polled with
// cudaEventQuery and sched_yield). Not a test.
// Usage: bench_nccl [GPU_A GPU_B]   (NCCL_NVLS_ENABLE=0, as the engine runs it)
#include <cuda_runtime.h>
#include <nccl.h>
#include <sched.h>

#include <algorithm>
#include <barrier>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

namespace {

#define CK(call)                                                       \
  do {                                                                 \
    cudaError_t e_ = (call);                                           \
    if (e_ != cudaSuccess) {                                           \
      std::fprintf(stderr, "%s: %s\n", #call, cudaGetErrorString(e_)); \
      std::exit(1);                                                    \
    }                                                                  \
  } while (0)
#define NK(call)                                                       \
  do {                                                                 \
    ncclResult_t r_ = (call);                                          \
    if (r_ != ncclSuccess) {                                           \
      std::fprintf(stderr, "%s: %s\n", #call, ncclGetErrorString(r_)); \
      std::exit(1);                                                    \
    }                                                                  \
  } while (0)

using Clock = std::chrono::steady_clock;

}  // namespace

int main(int argc, char** argv) {
  int n = 0;
  CK(cudaGetDeviceCount(&n));
  const int dev[2] = {argc > 2 ? std::atoi(argv[1]) : 0, argc > 2 ? std::atoi(argv[2]) : 1};
  if (n < 2 || dev[0] == dev[1] || std::max(dev[0], dev[1]) >= n || std::min(dev[0], dev[1]) < 0) {
    std::fprintf(stderr, "bench_nccl: needs two distinct GPUs of this machine (%d found)\n", n);
    return 1;
  }
  int v = 0;
  NK(ncclGetVersion(&v));
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, dev[0]));
  std::printf("GPUs %d and %d (%s), NCCL %d\n", dev[0], dev[1], prop.name, v);
  // [tokens, hc_mult = 4, hidden = 4096] fp32: 1 token (a decode step of one sequence), 32, 256,
  // 2048 and 8192 tokens (prefill chunks).
  const std::vector<int> tokens = {1, 32, 256, 2048, 8192};
  const size_t row = size_t{4} * 4096 * sizeof(float);
  const size_t max_bytes = row * tokens.back();
  ncclUniqueId id;
  NK(ncclGetUniqueId(&id));
  std::barrier sync(2);
  std::vector<double> one_way_us(tokens.size()), polled_us(tokens.size());
  // Until the communicator has no call in progress (non-blocking communicators).
  auto settle = [](ncclComm_t comm) {
    ncclResult_t st = ncclInProgress;
    while (st == ncclInProgress) NK(ncclCommGetAsyncError(comm, &st));
    NK(st);
  };
  auto worker = [&](int rank, bool polled) {
    CK(cudaSetDevice(dev[rank]));
    ncclComm_t comm;
    if (polled) {
      ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
      cfg.blocking = 0;
      const ncclResult_t r = ncclCommInitRankConfig(&comm, 2, id, rank, &cfg);
      if (r != ncclInProgress) NK(r);
      settle(comm);
    } else {
      NK(ncclCommInitRank(&comm, 2, id, rank));
    }
    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    cudaEvent_t done;
    CK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
    void* buf = nullptr;
    CK(cudaMalloc(&buf, max_bytes));
    CK(cudaMemset(buf, 0, max_bytes));
    for (size_t k = 0; k < tokens.size(); ++k) {
      const size_t bytes = row * static_cast<size_t>(tokens[k]);
      const int iters = tokens[k] <= 256 ? 200 : 20;
      auto hop = [&](bool send) {
        const ncclResult_t r = send ? ncclSend(buf, bytes, ncclUint8, 1 - rank, comm, s)
                                    : ncclRecv(buf, bytes, ncclUint8, 1 - rank, comm, s);
        if (!polled) {
          NK(r);
          CK(cudaStreamSynchronize(s));
          return;
        }
        if (r != ncclInProgress) NK(r);
        settle(comm);
        CK(cudaEventRecord(done, s));
        cudaError_t e;
        while ((e = cudaEventQuery(done)) == cudaErrorNotReady) sched_yield();
        CK(e);
      };
      for (int w = 0; w < 5; ++w) {  // warm-up round trips (connections made on first use)
        hop(rank == 0);
        hop(rank != 0);
      }
      sync.arrive_and_wait();
      const auto t0 = Clock::now();
      for (int i = 0; i < iters; ++i) {
        hop(rank == 0);
        hop(rank != 0);
      }
      const double rt = std::chrono::duration<double>(Clock::now() - t0).count() / iters;
      if (rank == 0) (polled ? polled_us : one_way_us)[k] = rt / 2 * 1e6;
      sync.arrive_and_wait();
    }
    CK(cudaFree(buf));
    CK(cudaEventDestroy(done));
    CK(cudaStreamDestroy(s));
    if (polled) settle(comm);
    NK(ncclCommDestroy(comm));
  };
  for (bool polled : {false, true}) {
    if (polled) NK(ncclGetUniqueId(&id));
    std::thread a(worker, 0, polled), b(worker, 1, polled);
    a.join();
    b.join();
  }
  std::printf("%10s %12s %14s %12s %18s %12s\n", "tokens", "bytes", "one-way us", "GB/s",
              "link-style us", "GB/s");
  for (size_t k = 0; k < tokens.size(); ++k) {
    const double bytes = static_cast<double>(row) * tokens[k];
    std::printf("%10d %12.0f %14.1f %12.1f %18.1f %12.1f\n", tokens[k], bytes, one_way_us[k],
                bytes / (one_way_us[k] * 1e-6) / 1e9, polled_us[k],
                bytes / (polled_us[k] * 1e-6) / 1e9);
  }
  return 0;
}
