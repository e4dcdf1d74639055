// MPI transport: one process per stage. Only this file includes mpi.h.
#include <mpi.h>
#include <sched.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstring>
#include <list>
#include <thread>
#include <vector>

#include "parallel/transport.h"

namespace sp {

namespace {

#define SP_MPI_CHECK(call)                                                               \
  do {                                                                                   \
    int _rc = (call);                                                                    \
    if (_rc != MPI_SUCCESS) {                                                            \
      char _msg[MPI_MAX_ERROR_STRING];                                                   \
      int _len = 0;                                                                      \
      MPI_Error_string(_rc, _msg, &_len);                                                \
      return Status::error(str("stage ", rank_, ": MPI call " #call " failed: ", _msg)); \
    }                                                                                    \
  } while (0)

using Clock = std::chrono::steady_clock;
constexpr int kHeartbeatTag = 100;
constexpr int kStartUpDoneTag = 101;  // payload: the start-up phase the sender finished

class MpiTransport final : public Transport {
 public:
  MpiTransport() {
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &world_);
    // Errors come back as codes so they can be reported with the stage's name.
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  }
  ~MpiTransport() override {
    for (auto& p : pending_) MPI_Wait(&p.request, MPI_STATUS_IGNORE);
    pending_.clear();
    MPI_Finalize();
  }
  std::string name() const override { return "mpi"; }
  int rank() const override { return rank_; }
  int world() const override { return world_; }

  Status send(int dst, Channel ch, std::vector<uint8_t> header, const void* data,
              int64_t n) override {
    progress();
    if (header.size() > INT_MAX || n > INT_MAX)
      return Status::error(str("stage ", rank_, ": message too large for one MPI send"));
    pending_.push_back({});
    Pending& h = pending_.back();
    h.bytes = std::move(header);
    SP_MPI_CHECK(MPI_Isend(h.bytes.data(), static_cast<int>(h.bytes.size()), MPI_BYTE, dst,
                           tag(ch, false), MPI_COMM_WORLD, &h.request));
    if (n > 0) {
      host_payload_bytes_ += n;
      pending_.push_back({});
      Pending& d = pending_.back();
      d.bytes.assign(static_cast<const uint8_t*>(data), static_cast<const uint8_t*>(data) + n);
      SP_MPI_CHECK(MPI_Isend(d.bytes.data(), static_cast<int>(n), MPI_BYTE, dst, tag(ch, true),
                             MPI_COMM_WORLD, &d.request));
    }
    return Status::ok();
  }

  // Polls (MPI_Iprobe / MPI_Test) rather than blocking, so a silent neighbour can be detected.
  Status recv(int src, Channel ch, std::vector<uint8_t>& header, const PayloadSize& payload_size,
              std::vector<uint8_t>& data) override {
    MPI_Status st;
    int found = 0;
    wait_for(src, [&] {
      MPI_Iprobe(src, tag(ch, false), MPI_COMM_WORLD, &found, &st);
      return found != 0;
    });
    int count = 0;
    MPI_Get_count(&st, MPI_BYTE, &count);
    header.resize(static_cast<size_t>(count));
    MPI_Request req;
    SP_MPI_CHECK(
        MPI_Irecv(header.data(), count, MPI_BYTE, src, tag(ch, false), MPI_COMM_WORLD, &req));
    SP_RETURN_IF_ERROR(wait_request(src, req));
    const int64_t n = payload_size ? payload_size(header) : 0;
    if (n < 0 || n > INT_MAX)
      return Status::error(str("stage ", rank_, ": malformed message from stage ", src));
    data.resize(static_cast<size_t>(n));
    if (n > 0) {
      SP_MPI_CHECK(MPI_Irecv(data.data(), static_cast<int>(n), MPI_BYTE, src, tag(ch, true),
                             MPI_COMM_WORLD, &req));
      SP_RETURN_IF_ERROR(wait_request(src, req));
    }
    progress();
    return Status::ok();
  }

  bool ready(int src, Channel ch) override {
    int flag = 0;
    MPI_Iprobe(src, tag(ch, false), MPI_COMM_WORLD, &flag, MPI_STATUS_IGNORE);
    progress();
    return flag != 0;
  }

  Status allgather(const std::string& mine, std::vector<std::string>* all) override {
    constexpr int kLen = 2048;
    std::vector<char> send(kLen, 0), recv(static_cast<size_t>(kLen) * world_, 0);
    std::memcpy(send.data(), mine.data(), std::min<size_t>(mine.size(), kLen - 1));
    SP_MPI_CHECK(
        MPI_Allgather(send.data(), kLen, MPI_CHAR, recv.data(), kLen, MPI_CHAR, MPI_COMM_WORLD));
    all->clear();
    for (int r = 0; r < world_; ++r) all->emplace_back(recv.data() + static_cast<size_t>(r) * kLen);
    return Status::ok();
  }

  Result<double> allreduce_max(double v) override {
    double out = v;
    if (timeout_ <= 0) {
      SP_MPI_CHECK(MPI_Allreduce(&v, &out, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD));
      return out;
    }
    MPI_Request req;
    SP_MPI_CHECK(MPI_Iallreduce(&v, &out, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD, &req));
    SP_RETURN_IF_ERROR(wait_request(-1, req));
    drain_heartbeats(-1);  // every stage is past its last receive: none will follow
    return out;
  }

  void set_stage_timeout(double seconds) override { timeout_ = seconds; }

  // This thread (the only one that calls MPI) waits for the helper: it sends a heartbeat to every
  // other stage every timeout / 4, a "finished phase" message to each once its work is done, and
  // watches both its helper's ticks and every stage that has not finished yet.
  Status start_up(int phase, const StartUpFn& work) override {
    if (timeout_ <= 0) {
      SP_RETURN_IF_ERROR(work([] {}));
      SP_MPI_CHECK(MPI_Barrier(MPI_COMM_WORLD));
      return Status::ok();
    }
    if (finished_phase_.empty()) finished_phase_.assign(static_cast<size_t>(world_), -1);
    StartUpWork w(work);
    const Clock::time_point start = Clock::now();
    std::vector<Clock::time_point> heard(static_cast<size_t>(world_), start);
    Clock::time_point last_turn = start;
    bool sent = false;
    beat_all(start);
    for (int64_t i = 0;; ++i) {
      progress();
      const Clock::time_point now = Clock::now();
      // A long gap between two turns: this process was not running; the silence was ours.
      if (std::chrono::duration<double>(now - last_turn).count() > timeout_ / 2)
        std::fill(heard.begin(), heard.end(), now);
      last_turn = now;
      if (!sent && w.finished()) {
        SP_RETURN_IF_ERROR(w.result());
        for (int r = 0; r < world_; ++r)
          if (r != rank_) send_small(r, kStartUpDoneTag, phase);
        sent = true;
      } else if (!sent) {
        if (const double idle = w.idle_seconds(); idle > timeout_)
          fail(stalled_loading(rank_, timeout_, idle), kStalledExitCode);
      }
      drain_start_up(now, heard);
      int silent = -1, left = 0;
      for (int r = 0; r < world_; ++r) {
        if (r == rank_ || finished_phase_[static_cast<size_t>(r)] >= phase) continue;
        ++left;
        if (silent < 0 &&
            std::chrono::duration<double>(now - heard[static_cast<size_t>(r)]).count() > timeout_)
          silent = r;
      }
      if (sent && left == 0) return Status::ok();
      if (silent >= 0)
        fail(str("stage ", rank_, " (rank ", rank_, "): nothing from stage ", silent, " for ",
                 timeout_, " s while it loads (--stage-timeout ", timeout_, "): stage ", silent,
                 " is stalled or unreachable"),
             kStalledExitCode);
      if (now >= next_beat_) beat_all(now);
      if (i < 2000)
        sched_yield();
      else
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }
  void keep_alive() override {
    if (timeout_ <= 0) return;
    const Clock::time_point now = Clock::now();
    if (now >= next_beat_) beat(now);
    progress();
  }

  // MPI_Abort brings every rank down; the launcher reports which rank called it.
  // On a host cut off from the launcher MPI_Abort may never return: the process ends anyway.
  [[noreturn]] void fail(const std::string& message, int exit_code) override {
    std::fprintf(stderr, "error: %s\n", message.c_str());
    std::fflush(stderr);
    std::thread([exit_code] {
      std::this_thread::sleep_for(std::chrono::seconds(10));
      std::_Exit(exit_code);
    }).detach();
    MPI_Abort(MPI_COMM_WORLD, exit_code);
    std::_Exit(exit_code);
  }

 private:
  struct Pending {
    MPI_Request request = MPI_REQUEST_NULL;
    std::vector<uint8_t> bytes;
  };
  static int tag(Channel ch, bool payload) { return static_cast<int>(ch) * 2 + (payload ? 1 : 0); }

  // Polls `done` until it holds. With the watchdog armed: sends a heartbeat every timeout / 4 to
  // the stages that may be waiting on this one (the next stage, and the last, which collects the
  // reports), and fails naming `src` (-1: some stage) when nothing (no message, no heartbeat) came
  // from it for the timeout. Yields the core while waiting; sleeps after the first millisecond.
  template <class Done>
  void wait_for(int src, Done done) {
    const Clock::time_point start = Clock::now();
    Clock::time_point heard = start, last_turn = start;
    for (int64_t i = 0; !done(); ++i) {
      progress();
      if (timeout_ > 0) {
        const Clock::time_point now = Clock::now();
        // A long gap between two turns of this loop means this process was not running
        // (stopped, or starved of CPU): the silence was ours, not the peer's.
        if (std::chrono::duration<double>(now - last_turn).count() > timeout_ / 2) heard = now;
        last_turn = now;
        if (drain_heartbeats(src)) heard = now;
        if (std::chrono::duration<double>(now - heard).count() > timeout_) {
          if (src >= 0)
            fail(str("stage ", rank_, " (rank ", rank_, "): no message from stage ", src, " for ",
                     timeout_, " s (--stage-timeout ", timeout_, "): stage ", src,
                     " is stalled or unreachable"),
                 kStalledExitCode);
          fail(str("stage ", rank_, " (rank ", rank_,
                   "): the stages did not all reach the end of "
                   "the run within ",
                   timeout_, " s (--stage-timeout ", timeout_,
                   "): a stage is stalled or unreachable"),
               kStalledExitCode);
        }
        if (now >= next_beat_) beat(now);
      }
      if (i < 2000)
        sched_yield();
      else
        std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
  }
  Status wait_request(int src, MPI_Request& req) {
    int done = 0, rc = MPI_SUCCESS;
    MPI_Status st;
    wait_for(src, [&] {
      rc = MPI_Test(&req, &done, &st);
      return done != 0 || rc != MPI_SUCCESS;
    });
    if (rc != MPI_SUCCESS) {
      char msg[MPI_MAX_ERROR_STRING];
      int len = 0;
      MPI_Error_string(rc, msg, &len);
      return Status::error(
          str("stage ", rank_, ": MPI receive from stage ", src, " failed: ", msg));
    }
    return Status::ok();
  }
  void beat(Clock::time_point now) {
    send_heartbeats();
    next_beat_ = now + std::chrono::duration_cast<Clock::duration>(
                           std::chrono::duration<double>(timeout_ / 4));
  }
  // Start-up: a heartbeat to every other stage (any of them may be waiting on this one).
  void beat_all(Clock::time_point now) {
    for (int r = 0; r < world_; ++r)
      if (r != rank_) send_small(r, kHeartbeatTag, 0);
    next_beat_ = now + std::chrono::duration_cast<Clock::duration>(
                           std::chrono::duration<double>(timeout_ / 4));
  }
  void send_small(int dst, int tag, int32_t value) {
    pending_.push_back({});
    Pending& h = pending_.back();
    h.bytes.resize(sizeof value);
    std::memcpy(h.bytes.data(), &value, sizeof value);
    MPI_Isend(h.bytes.data(), static_cast<int>(h.bytes.size()), MPI_BYTE, dst, tag, MPI_COMM_WORLD,
              &h.request);
  }
  // Start-up: receives what arrived (heartbeats, "finished phase" messages) from any stage.
  void drain_start_up(Clock::time_point now, std::vector<Clock::time_point>& heard) {
    for (int tag : {kHeartbeatTag, kStartUpDoneTag}) {
      while (true) {
        int flag = 0;
        MPI_Status st;
        MPI_Iprobe(MPI_ANY_SOURCE, tag, MPI_COMM_WORLD, &flag, &st);
        if (!flag) break;
        int count = 0;
        MPI_Get_count(&st, MPI_BYTE, &count);
        std::vector<uint8_t> b(static_cast<size_t>(std::max(count, 1)));
        MPI_Recv(b.data(), count, MPI_BYTE, st.MPI_SOURCE, tag, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        const size_t src = static_cast<size_t>(st.MPI_SOURCE);
        heard[src] = now;
        if (tag == kStartUpDoneTag && count == sizeof(int32_t)) {
          int32_t p;
          std::memcpy(&p, b.data(), sizeof p);
          finished_phase_[src] = std::max(finished_phase_[src], p);
        }
      }
    }
  }
  void send_heartbeats() {
    const int next = (rank_ + 1) % world_, last = world_ - 1;
    const int dsts[2] = {next, last};
    for (int i = 0; i < (next == last ? 1 : 2); ++i) {
      const int dst = dsts[i];
      if (dst == rank_) continue;
      pending_.push_back({});
      Pending& h = pending_.back();
      h.bytes.assign(1, 0);
      MPI_Isend(h.bytes.data(), 1, MPI_BYTE, dst, kHeartbeatTag, MPI_COMM_WORLD, &h.request);
    }
  }
  // Receives the heartbeats that arrived; true if one came from `from`.
  bool drain_heartbeats(int from) {
    bool heard = false;
    while (true) {
      int flag = 0;
      MPI_Status st;
      MPI_Iprobe(MPI_ANY_SOURCE, kHeartbeatTag, MPI_COMM_WORLD, &flag, &st);
      if (!flag) return heard;
      // One byte at run time, four from start-up (beat_all).
      int count = 0;
      MPI_Get_count(&st, MPI_BYTE, &count);
      uint8_t b[8];
      MPI_Recv(b, std::min(count, 8), MPI_BYTE, st.MPI_SOURCE, kHeartbeatTag, MPI_COMM_WORLD,
               MPI_STATUS_IGNORE);
      heard = heard || st.MPI_SOURCE == from;
    }
  }
  void progress() {
    for (auto it = pending_.begin(); it != pending_.end();) {
      int done = 0;
      MPI_Test(&it->request, &done, MPI_STATUS_IGNORE);
      it = done ? pending_.erase(it) : std::next(it);
    }
  }

  int rank_ = 0, world_ = 1;
  double timeout_ = 0;  // the watchdog's, seconds; 0: off
  Clock::time_point next_beat_{};
  std::list<Pending> pending_;
  std::vector<int32_t> finished_phase_;  // start-up: the last phase each stage said it finished
};

}  // namespace

Result<std::unique_ptr<Transport>> make_mpi_transport(int* argc, char*** argv) {
  int provided = 0;
  if (MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS)
    return Status::error(
        "MPI_Init failed: is seekpipe started by mpirun with a working MPI installation?");
  return std::unique_ptr<Transport>(new MpiTransport());
}

}  // namespace sp
