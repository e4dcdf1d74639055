// The NCCL DeviceLink (see device_link.h). Only this file includes nccl.h.
//
// libnccl is opened at run time (dlopen), not linked: it is a few hundred MB of mappings that every
// run would pay for (and that a small `ulimit -v` could not even load), while only GPU pipelines
// use it. A machine without it runs GPU stages over host memory (--stage-transport auto says so).
#include <cuda_runtime.h>
#include <nccl.h>
#include <sched.h>

#include <chrono>
#include <cstdio>
#include <exception>
#include <memory>
#include <thread>
#include <vector>

#include "core/dynlib.h"
#include "parallel/device_link.h"

namespace sp {

namespace {

using Clock = std::chrono::steady_clock;

std::string hex(const void* p, size_t n) {
  static const char* d = "0123456789abcdef";
  std::string s;
  for (size_t i = 0; i < n; ++i) {
    const uint8_t b = static_cast<const uint8_t*>(p)[i];
    s += d[b >> 4];
    s += d[b & 15];
  }
  return s;
}

bool unhex(const std::string& s, void* p, size_t n) {
  if (s.size() != 2 * n) return false;
  auto v = [](char c) { return c >= 'a' ? c - 'a' + 10 : c - '0'; };
  for (size_t i = 0; i < n; ++i)
    static_cast<uint8_t*>(p)[i] = static_cast<uint8_t>(v(s[2 * i]) * 16 + v(s[2 * i + 1]));
  return true;
}

// The NCCL entry points, from the library opened at run time.
struct NcclApi {
  std::unique_ptr<DynLib> lib;
  decltype(&::ncclGetUniqueId) GetUniqueId = nullptr;
  decltype(&::ncclCommInitRankConfig) CommInitRankConfig = nullptr;
  decltype(&::ncclCommGetAsyncError) CommGetAsyncError = nullptr;
  decltype(&::ncclCommFinalize) CommFinalize = nullptr;
  decltype(&::ncclCommDestroy) CommDestroy = nullptr;
  decltype(&::ncclCommAbort) CommAbort = nullptr;
  decltype(&::ncclSend) Send = nullptr;
  decltype(&::ncclRecv) Recv = nullptr;
  decltype(&::ncclGetErrorString) GetErrorString = nullptr;
  decltype(&::ncclGetLastError) GetLastError = nullptr;

  // Empty on success, else what is missing.
  std::string open() {
#ifdef SP_NCCL_LIBRARY
    const char* built_with = SP_NCCL_LIBRARY;  // where CMake found it, if not on the loader's path
#else
    const char* built_with = "libnccl.so";
#endif
    lib = std::make_unique<DynLib>(std::vector<std::string>{"libnccl.so.2", built_with});
    if (!lib->loaded())
      return str("cannot load libnccl.so.2 (", lib->load_error(),
                 "): install NCCL or put it on LD_LIBRARY_PATH");
    lib->get(GetUniqueId, "ncclGetUniqueId");
    lib->get(CommInitRankConfig, "ncclCommInitRankConfig");
    lib->get(CommGetAsyncError, "ncclCommGetAsyncError");
    lib->get(CommFinalize, "ncclCommFinalize");
    lib->get(CommDestroy, "ncclCommDestroy");
    lib->get(CommAbort, "ncclCommAbort");
    lib->get(Send, "ncclSend");
    lib->get(Recv, "ncclRecv");
    lib->get(GetErrorString, "ncclGetErrorString");
    lib->get(GetLastError, "ncclGetLastError");
    if (!lib->missing().empty())
      return str("libnccl.so.2 lacks ", lib->missing(),
                 " (NCCL 2.14 or newer is needed: non-blocking communicators)");
    return "";
  }
};

// One neighbour: a two-rank communicator and the stream its operations run on.
struct Peer {
  int stage = -1;  // the neighbour's stage (-1: none)
  ncclComm_t comm = nullptr;
  cudaStream_t stream = nullptr;
  bool live() const { return comm != nullptr; }
};

// A failed CUDA call names this stage, its GPU and the call (inside NcclLink's methods).
#define CK(call)                                                                            \
  do {                                                                                      \
    cudaError_t _e = (call);                                                                \
    if (_e != cudaSuccess) {                                                                \
      broken_ = true;                                                                       \
      return Status::error(                                                                 \
          str("CUDA error on GPU ", o_.device, " in " #call ": ", cudaGetErrorString(_e))); \
    }                                                                                       \
  } while (0)

class NcclLink final : public DeviceLink {
 public:
  NcclLink(Transport& host, const DeviceLinkOptions& o)
      : host_(host), o_(o), me_(host.rank()), compute_(static_cast<cudaStream_t>(o.stream)) {}

  ~NcclLink() override {
    cudaSetDevice(o_.device);
    // Healthy end: every send has completed (the next stage received it), so the communicators
    // close normally; otherwise (a failure unwinding this stage) they are aborted, which also
    // ends any NCCL kernel still waiting for a peer.
    // (An exception unwinding this stage is a failure too.)
    bool idle = !broken_ && !host_.failed() && std::uncaught_exceptions() == 0;
    for (cudaEvent_t e : send_done_) idle = idle && cudaEventQuery(e) == cudaSuccess;
    // A GPU whose context is broken (a fault) takes no more NCCL calls: they could hang; the
    // communicators are left to the process's end.
    const cudaError_t ctx = cudaStreamQuery(compute_);
    const bool usable = ctx == cudaSuccess || ctx == cudaErrorNotReady;
    for (Peer* p : {&prev_, &next_}) {
      if (!p->live() || !usable) continue;
      bool closed = false;
      if (idle) {
        const ncclResult_t r = api_.CommFinalize(p->comm);
        ncclResult_t st = r;
        const Clock::time_point until = Clock::now() + std::chrono::seconds(5);
        while (st == ncclInProgress && Clock::now() < until) {
          std::this_thread::sleep_for(std::chrono::microseconds(200));
          if (api_.CommGetAsyncError(p->comm, &st) != ncclSuccess) break;
        }
        if (st == ncclSuccess) {
          const ncclResult_t d = api_.CommDestroy(p->comm);
          closed = d == ncclSuccess || d == ncclInProgress;
        }
      }
      if (!closed) api_.CommAbort(p->comm);
      cudaStreamDestroy(p->stream);
    }
    for (cudaEvent_t e : send_done_) cudaEventDestroy(e);
    for (cudaEvent_t e : compute_done_) cudaEventDestroy(e);
    if (produced_) cudaEventDestroy(produced_);
    if (received_) cudaEventDestroy(received_);
  }

  std::string name() const override { return "nccl"; }

  Status init() {
    if (std::string why = api_.open(); !why.empty()) return Status::error(why);
    CK(cudaSetDevice(o_.device));
    const int world = host_.world();
    // Stage s creates the id of the pair (s, s+1) and shares it with everyone (one collective).
    ncclUniqueId mine{};
    if (me_ + 1 < world)
      if (ncclResult_t r = api_.GetUniqueId(&mine); r != ncclSuccess)
        return nccl_error(r, nullptr, "ncclGetUniqueId");
    std::vector<std::string> ids;
    SP_RETURN_IF_ERROR(host_.allgather(me_ + 1 < world ? hex(&mine, sizeof mine) : "", &ids));
    ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
    cfg.blocking = 0;  // every call returns at once; completion is polled with a deadline
    auto start = [&](Peer& p, int stage, const ncclUniqueId& id, int rank) -> Status {
      p.stage = stage;
      CK(cudaStreamCreateWithFlags(&p.stream, cudaStreamNonBlocking));
      ncclUniqueId copy = id;
      const ncclResult_t r = api_.CommInitRankConfig(&p.comm, 2, copy, rank, &cfg);
      if (r != ncclSuccess && r != ncclInProgress)
        return nccl_error(r, &p, "ncclCommInitRankConfig");
      return Status::ok();
    };
    // Both communicators start before either is waited for: with threads, stage s joins the pair
    // with s-1 and the pair with s+1 at the same time as its neighbours do.
    if (me_ > 0) {
      ncclUniqueId id{};
      if (!unhex(ids[me_ - 1], &id, sizeof id))
        return Status::error(str("malformed NCCL id from stage ", me_ - 1));
      SP_RETURN_IF_ERROR(start(prev_, me_ - 1, id, 1));
    }
    if (me_ + 1 < world) SP_RETURN_IF_ERROR(start(next_, me_ + 1, mine, 0));
    // Joining takes a few seconds at most; a neighbour that never joins is caught by the deadline
    // (at least 30 s, whatever --stage-timeout: NCCL's own set-up of a pair takes seconds).
    const double limit = o_.timeout_s > 0 ? std::max(30.0, o_.timeout_s) : 0;
    for (Peer* p : {&prev_, &next_})
      if (p->live()) SP_RETURN_IF_ERROR(wait_comm(*p, "joining the NCCL communicator", limit));
    send_done_.resize(static_cast<size_t>(std::max(1, o_.slots)));
    compute_done_.resize(send_done_.size());
    for (auto* v : {&send_done_, &compute_done_})
      for (cudaEvent_t& e : *v) CK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    CK(cudaEventCreateWithFlags(&produced_, cudaEventDisableTiming));
    CK(cudaEventCreateWithFlags(&received_, cudaEventDisableTiming));
    return Status::ok();
  }

  Status send(int dst, Tensor X, int slot) override {
    SP_CHECK(dst == next_.stage && next_.live(), "stage ", me_, " sends only to stage ", me_ + 1);
    SP_CHECK(X.contiguous(), "the boundary tensor must be contiguous");
    if (dropped_) return Status::ok();
    CK(cudaSetDevice(o_.device));
    const size_t bytes = static_cast<size_t>(X.numel() * X.elem_size());
    CK(cudaEventRecord(produced_, compute_));
    CK(cudaStreamWaitEvent(next_.stream, produced_, 0));
    SP_RETURN_IF_ERROR(
        issue(next_, api_.Send(X.data, bytes, ncclUint8, 1, next_.comm, next_.stream), "ncclSend"));
    CK(cudaEventRecord(send_done_[idx(slot)], next_.stream));
    bytes_ += static_cast<int64_t>(bytes);
    return Status::ok();
  }

  Status recv(int src, Tensor X, int slot, int64_t step) override {
    SP_CHECK(src == prev_.stage && prev_.live(), "stage ", me_, " receives only from stage ",
             me_ - 1);
    SP_CHECK(X.contiguous(), "the boundary tensor must be contiguous");
    CK(cudaSetDevice(o_.device));
    const size_t bytes = static_cast<size_t>(X.numel() * X.elem_size());
    // The buffer's previous contents: sent on, and no longer read by this stage's kernels.
    CK(cudaStreamWaitEvent(prev_.stream, send_done_[idx(slot)], 0));
    CK(cudaStreamWaitEvent(prev_.stream, compute_done_[idx(slot)], 0));
    SP_RETURN_IF_ERROR(
        issue(prev_, api_.Recv(X.data, bytes, ncclUint8, 0, prev_.comm, prev_.stream), "ncclRecv"));
    CK(cudaEventRecord(received_, prev_.stream));
    SP_RETURN_IF_ERROR(
        wait_event(received_, prev_, str("the NCCL receive of step ", step, " from stage ", src)));
    CK(cudaStreamWaitEvent(compute_, received_, 0));
    return Status::ok();
  }

  void computed(int slot) override {
    if (cudaEventRecord(compute_done_[idx(slot)], compute_) != cudaSuccess) broken_ = true;
  }

  Status reuse(int slot) override {
    if (!next_.live()) return Status::ok();
    CK(cudaSetDevice(o_.device));
    return wait_event(send_done_[idx(slot)], next_,
                      str("the NCCL send of residual buffer ", slot, " to stage ", next_.stage));
  }

  int64_t device_bytes() const override { return bytes_; }
  void drop_sends() override { dropped_ = true; }

 private:
  size_t idx(int slot) const { return static_cast<size_t>(slot) % send_done_.size(); }

  Status nccl_error(ncclResult_t r, const Peer* p, const char* what) {
    broken_ = true;
    const char* last = p && p->comm ? api_.GetLastError(p->comm) : nullptr;
    return Status::error(str("NCCL error on GPU ", o_.device,
                             p ? str(" on the link with stage ", p->stage) : std::string(), " in ",
                             what, ": ", api_.GetErrorString(r),
                             last && *last ? str(" (", last, ")") : std::string()));
  }

  // A non-blocking call may return ncclInProgress (connecting, on first use): the communicator
  // takes no other call until it is done.
  Status issue(Peer& p, ncclResult_t r, const char* what) {
    if (r == ncclSuccess) return Status::ok();
    if (r != ncclInProgress) return nccl_error(r, &p, what);
    return wait_comm(p, what, o_.timeout_s);
  }

  // Polls until the communicator has no call in progress.
  Status wait_comm(Peer& p, const std::string& what, double limit) {
    ncclResult_t st = ncclInProgress;
    return poll(
        [&]() -> Result<bool> {
          const ncclResult_t r = api_.CommGetAsyncError(p.comm, &st);
          if (r != ncclSuccess) return nccl_error(r, &p, "ncclCommGetAsyncError");
          if (st != ncclSuccess && st != ncclInProgress) return nccl_error(st, &p, what.c_str());
          return st == ncclSuccess;
        },
        p, what, limit);
  }

  // Polls until `ev` has completed: `what` is the operation, `p` the neighbour it waits on.
  Status wait_event(cudaEvent_t ev, Peer& p, const std::string& what) {
    return poll(
        [&]() -> Result<bool> {
          const cudaError_t e = cudaEventQuery(ev);
          if (e == cudaSuccess) return true;
          if (e != cudaErrorNotReady) {
            broken_ = true;
            return Status::error(str("CUDA error on GPU ", o_.device, " while ", "waiting for ",
                                     what, ": ", cudaGetErrorString(e)));
          }
          ncclResult_t st = ncclSuccess;
          if (api_.CommGetAsyncError(p.comm, &st) == ncclSuccess && st != ncclSuccess &&
              st != ncclInProgress)
            return nccl_error(st, &p, what.c_str());
          return false;
        },
        p, what, o_.timeout_s);
  }

  // The one waiting loop: `done` (true: finished; an error ends the wait), another stage's failure
  // (its message is this stage's too), the deadline (the neighbour is stalled or gone: exit code
  // kStalledExitCode like the watchdog's). Keeps this stage's heartbeats going meanwhile.
  template <class Done>
  Status poll(Done done, Peer& p, const std::string& what, double limit) {
    const Clock::time_point start = Clock::now();
    for (int64_t i = 0;; ++i) {
      Result<bool> d = done();
      if (!d) return d.status();
      if (*d) return Status::ok();
      if (host_.failed()) {
        broken_ = true;
        host_.fail(
            str("stage ", me_, ": stopped while waiting for ", what, ": another stage failed"), 4);
      }
      host_.keep_alive();
      if (limit > 0 && std::chrono::duration<double>(Clock::now() - start).count() > limit) {
        broken_ = true;
        host_.fail(str("stage ", me_, " (rank ", host_.rank(), "): ", what,
                       " did not complete within ", limit, " s (--stage-timeout ", o_.timeout_s,
                       "): stage ", p.stage, " or its GPU or NCCL link is stalled or gone"),
                   kStalledExitCode);
      }
      if (i < 2000)
        sched_yield();
      else
        std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

  NcclApi api_;  // first member: closed last
  Transport& host_;
  DeviceLinkOptions o_;
  int me_;
  cudaStream_t compute_;
  Peer prev_, next_;
  std::vector<cudaEvent_t> send_done_, compute_done_;  // per residual buffer
  cudaEvent_t produced_ = nullptr, received_ = nullptr;
  int64_t bytes_ = 0;
  bool dropped_ = false, broken_ = false;
};

#undef CK

}  // namespace

bool nccl_link_built() {
  return true;
}

std::string nccl_unavailable() {
  NcclApi api;
  return api.open();
}

Result<std::unique_ptr<DeviceLink>> make_nccl_link(Transport& host, const DeviceLinkOptions& o) {
  auto link = std::make_unique<NcclLink>(host, o);
  SP_RETURN_IF_ERROR(link->init());
  return std::unique_ptr<DeviceLink>(std::move(link));
}

}  // namespace sp
