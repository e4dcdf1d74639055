// The stage-boundary tensor device to device. GPU stages keep passing the step descriptor (small)
// over the host Transport, which keeps the watchdog, the heartbeats and the failure propagation;
// the residual X [tokens, hc_mult * hidden] goes from GPU to GPU through a DeviceLink (NCCL), never
// through host memory.
//
// Ordering (all on the device, the host never copies the tensor):
//  * send: an event recorded on the compute stream after the kernels that produced X; the link's
//    send stream waits for it, then ncclSend; a per-buffer event marks the send complete;
//  * recv: the link's receive stream waits until the buffer's previous contents were sent and its
//    last compute finished, then ncclRecv; the compute stream waits on an event after the receive;
//  * a buffer the compute stream writes itself (stage 0's embedding) is first checked free.
// The host waits for a receive to complete (it has nothing else to do for that step), polling:
// the communicators' asynchronous errors, a failure of another stage (Transport::failed), and a
// deadline (--stage-timeout): no NCCL operation can make a stage wait forever. A stage that fails
// aborts its communicators (ncclCommAbort), so nothing queued on its GPU waits for a dead peer.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "core/status.h"
#include "core/tensor.h"
#include "parallel/transport.h"

namespace sp {

class DeviceLink {
 public:
  virtual ~DeviceLink() = default;
  virtual std::string name() const = 0;
  // Queues the send of X (contiguous; this stage's residual buffer `slot`) to stage `dst` after the
  // work queued so far on the compute stream; returns without waiting for it.
  virtual Status send(int dst, Tensor X, int slot) = 0;
  // Receives X from stage `src` into residual buffer `slot`; returns once it has arrived (or fails
  // the pipeline); the compute stream is ordered after it.
  virtual Status recv(int src, Tensor X, int slot, int64_t step) = 0;
  // The compute stream has queued all its work on residual buffer `slot` for this step.
  virtual void computed(int slot) = 0;
  // The compute stream is about to write residual buffer `slot` itself: waits until its previous
  // contents were sent.
  virtual Status reuse(int slot) = 0;
  // Bytes sent device to device.
  virtual int64_t device_bytes() const = 0;
  // --fault-inject S:STEP:nccl: from now on this stage's sends are silently dropped while its host
  // messages go on, as a peer gone from NCCL looks to its neighbour (tests).
  virtual void drop_sends() = 0;
};

struct DeviceLinkOptions {
  int device = 0;          // this stage's GPU (CUDA ordinal)
  void* stream = nullptr;  // the backend's compute stream (cudaStream_t)
  int slots = 1;           // residual buffers (micro-batches in flight)
  double timeout_s = 0;    // --stage-timeout: the longest a transfer may wait; 0: no deadline
};

// Whether this build has the NCCL link (CUDA backend and nccl.h found by CMake).
bool nccl_link_built();
// Why the NCCL link cannot be used on this machine ("" if it can): libnccl is loaded at run time.
std::string nccl_unavailable();
// Collective over `host`: every stage calls it at the same point. Bootstraps one communicator per
// neighbour pair (stage s creates the ncclUniqueId of the pair (s, s+1); the ids travel over the
// host transport: in-process with threads, over MPI under mpirun), non-blocking (polled with the
// deadline).
Result<std::unique_ptr<DeviceLink>> make_nccl_link(Transport& host, const DeviceLinkOptions& o);

}  // namespace sp
