// How pipeline stages talk: one interface, an in-process implementation (one thread per stage) and
// an MPI one (one process per stage, any number of machines). GPU stages add a DeviceLink
// (parallel/device_link.h, NCCL) for the boundary tensor; the step descriptors stay here.
//
// A message is a header (the step descriptor, or the sampled tokens) plus an optional payload of
// bytes (the stage-boundary tensor [tokens, hc_mult, hidden] in the backend's activation dtype)
// whose length the receiver derives from the header. Sends are buffered and never wait for the
// receiver; receives block until the message arrives or the pipeline fails, in which case they
// return an error that names the failed stage.
//
// The watchdog (--stage-timeout): once armed, a receive that hears nothing from its source for the
// timeout brings every stage down (exit code kStalledExitCode) naming the source as stalled or
// unreachable. "Hearing" is a message, or a sign that the source is itself alive and blocked in a
// receive (MPI: a heartbeat it sends every timeout / 4 while it waits; threads: the shared hub sees
// it waiting). So only the stage next to the one that stopped fires: a stage starved because the
// whole pipeline is stuck keeps hearing its living neighbour. Progress is counted per message, so
// the timeout must exceed the longest single step of a stage.
//
// Loading is watched too (start_up): a stage loads on a helper thread while its own thread tells
// every other stage it is alive (MPI: a heartbeat to each every timeout / 4; threads: the hub) and
// watches the load's progress (a tick per tensor read, per layer uploaded). A stage whose load
// makes no progress for the timeout (a stalled file system, a stuck device) stops the run naming
// itself; a stage that hears nothing from a stage still loading for the timeout (stopped, its host
// hung or cut off) stops it naming that stage. Either way every stage exits kStalledExitCode. So
// the timeout must also exceed the longest gap between two ticks: one tensor's read (the largest,
// the embedding or the head, is ~1.9 GB in V4-Pro) or one layer's upload to a GPU.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/status.h"
#include "parallel/start_up_work.h"

namespace sp {

enum class Channel : int { kStep = 1, kSampled = 2, kReport = 3 };

// Exit code of a run stopped by the watchdog (a stage stalled or unreachable).
constexpr int kStalledExitCode = 5;

// Thrown by an in-process stage that fails, so its thread unwinds; carries the exit code.
struct StageFailure {
  std::string message;
  int exit_code;
};

// Payload bytes a header implies (-1: the header is malformed).
using PayloadSize = std::function<int64_t(const std::vector<uint8_t>& header)>;

class Transport {
 public:
  virtual ~Transport() = default;
  virtual std::string name() const = 0;
  virtual int rank() const = 0;
  virtual int world() const = 0;
  virtual Status send(int dst, Channel ch, std::vector<uint8_t> header, const void* data,
                      int64_t bytes) = 0;
  virtual Status recv(int src, Channel ch, std::vector<uint8_t>& header,
                      const PayloadSize& payload_size, std::vector<uint8_t>& data) = 0;
  // Whether a message from `src` on `ch` is waiting.
  virtual bool ready(int src, Channel ch) = 0;
  // Every rank's string, by rank (start-up agreement checks).
  virtual Status allgather(const std::string& mine, std::vector<std::string>* all) = 0;
  virtual Result<double> allreduce_max(double v) = 0;
  // Arms the watchdog with this timeout in seconds (0 disarms); call on every stage, before
  // start_up so that loading is watched.
  virtual void set_stage_timeout(double seconds) = 0;
  // Start-up: runs `work` on a helper thread (it calls tick() as it makes progress) and returns
  // once every stage has finished its work of this `phase` (a barrier; every stage runs the same
  // phases, numbered 0, 1, ... in order). The work's error comes back at once, before the barrier
  // (the caller fails, which brings the waiting stages down); what it throws is rethrown. While
  // waiting, the watchdog (if armed) does as described above: a stalled load or a silent stage
  // ends the run (exit kStalledExitCode) naming the stage. With the watchdog off the work runs on
  // the calling thread and the barrier waits as long as it takes.
  virtual Status start_up(int phase, const StartUpFn& work) = 0;
  // Tells the stages that may wait on this one that it is alive though it sends nothing (stage 0
  // idle, waiting for requests). Cheap: call it in every turn of a loop that does not receive.
  virtual void keep_alive() = 0;
  // Brings every stage down promptly; `message` names this stage and what went wrong.
  [[noreturn]] virtual void fail(const std::string& message, int exit_code) = 0;
  // Whether another stage has already failed (threads: the shared hub knows; MPI: a failing rank
  // ends every process, so there is nothing to ask). Polled by waits outside this transport.
  virtual bool failed() { return false; }
  // Payload bytes this end has sent through host memory (the boundary tensor when it is not
  // moved device to device).
  int64_t host_payload_bytes() const { return host_payload_bytes_; }

 protected:
  int64_t host_payload_bytes_ = 0;
};

// The message of a stage whose own loading made no progress for `idle` seconds (> timeout).
std::string stalled_loading(int rank, double timeout, double idle);

// In-process pipeline: world threads share one hub; make_local_transports gives one end per stage.
std::vector<std::unique_ptr<Transport>> make_local_transports(int world);

// True when this process was started by mpirun / mpiexec (an MPI launcher's environment is set).
bool launched_by_mpi();
// MPI transport (nullptr with a message if seekpipe was built without MPI).
Result<std::unique_ptr<Transport>> make_mpi_transport(int* argc, char*** argv);

}  // namespace sp
