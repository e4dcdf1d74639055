#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <set>
#include <stdexcept>
#include <thread>

#include "parallel/transport.h"

namespace sp {

namespace {

struct Message {
  std::vector<uint8_t> header;
  std::vector<uint8_t> data;
};

using Clock = std::chrono::steady_clock;

// Shared by the stage threads of one process.
class Hub {
 public:
  explicit Hub(int world)
      : world_(world), slots_(world), done_(0), waiting_(world, false), alive_at_(world) {}

  void set_timeout(double seconds) {
    std::lock_guard<std::mutex> lk(mu_);
    timeout_ = seconds;
    for (auto& t : alive_at_) t = Clock::now();
    cv_.notify_all();
  }
  void keep_alive(int rank) {
    std::lock_guard<std::mutex> lk(mu_);
    alive_at_[rank] = Clock::now();
  }
  double timeout() {
    std::lock_guard<std::mutex> lk(mu_);
    return timeout_;
  }
  // The first failure's message, if the pipeline has failed.
  bool failed(std::string* message) {
    std::lock_guard<std::mutex> lk(mu_);
    if (failed_) *message = failure_;
    return failed_;
  }
  void push(int src, int dst, Channel ch, Message m) {
    std::lock_guard<std::mutex> lk(mu_);
    queues_[{src, dst, static_cast<int>(ch)}].push_back(std::move(m));
    alive_at_[src] = Clock::now();
    cv_.notify_all();
  }
  // Waits for a message; with the watchdog armed, fails with *stalled set when `src` has
  // been neither sending nor waiting for longer than the timeout.
  Status pop(int src, int dst, Channel ch, Message* out, std::string* stalled) {
    std::unique_lock<std::mutex> lk(mu_);
    auto& q = queues_[{src, dst, static_cast<int>(ch)}];
    const Clock::time_point start = Clock::now();
    waiting_[dst] = true;
    while (q.empty() && !failed_) {
      if (timeout_ <= 0) {
        cv_.wait(lk);
        continue;
      }
      cv_.wait_for(lk, std::chrono::duration<double>(timeout_ / 4));
      if (!q.empty() || failed_) break;
      const Clock::time_point now = Clock::now();
      if (waiting_[src]) alive_at_[src] = now;  // blocked on its own neighbour: alive
      const Clock::time_point heard = std::max(start, alive_at_[src]);
      if (std::chrono::duration<double>(now - heard).count() > timeout_) {
        waiting_[dst] = false;
        *stalled =
            str("stage ", dst, " (rank ", dst, "): no message from stage ", src, " for ", timeout_,
                " s (--stage-timeout ", timeout_, "): stage ", src, " is stalled or unreachable");
        return Status::error(*stalled);
      }
    }
    waiting_[dst] = false;
    alive_at_[dst] = Clock::now();
    if (failed_) return Status::error(failure_);
    *out = std::move(q.front());
    q.pop_front();
    return Status::ok();
  }
  bool ready(int src, int dst, Channel ch) {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = queues_.find({src, dst, static_cast<int>(ch)});
    return failed_ || (it != queues_.end() && !it->second.empty());
  }
  // All ranks deposit a string; returns everyone's once all have. With the watchdog armed, fails
  // with *stalled set when a rank that has not deposited yet was silent (neither sending, nor
  // waiting, nor loading: keep_alive) for the timeout; `what` names the point the ranks meet at.
  Status exchange(int rank, const std::string& mine, std::vector<std::string>* all,
                  std::string* stalled, const char* what) {
    std::unique_lock<std::mutex> lk(mu_);
    const uint64_t gen = generation_;
    slots_[rank] = mine;
    deposited_.insert(rank);
    if (++done_ == world_) {
      done_ = 0;
      deposited_.clear();
      result_ = slots_;
      ++generation_;
      cv_.notify_all();
    } else {
      const Clock::time_point start = Clock::now();
      while (generation_ == gen && !failed_) {
        if (timeout_ <= 0) {
          cv_.wait(lk);
          continue;
        }
        cv_.wait_for(lk, std::chrono::duration<double>(timeout_ / 4));
        if (generation_ != gen || failed_) break;
        const Clock::time_point now = Clock::now();
        for (int r = 0; r < world_; ++r) {
          if (deposited_.count(r)) continue;
          if (waiting_[r]) alive_at_[r] = now;  // blocked on its own neighbour: alive
          if (std::chrono::duration<double>(now - std::max(start, alive_at_[r])).count() <=
              timeout_)
            continue;
          *stalled = str("stage ", rank, " (rank ", rank, "): stage ", r, " did not reach ", what,
                         " and gave no sign of life for ", timeout_, " s (--stage-timeout ",
                         timeout_, "): stage ", r, " is stalled or unreachable");
          return Status::error(*stalled);
        }
      }
      if (failed_) return Status::error(failure_);
    }
    *all = result_;
    return Status::ok();
  }
  bool failed() {
    std::lock_guard<std::mutex> lk(mu_);
    return failed_;
  }
  // Records the first failure; returns it (later failures are consequences of the first).
  std::pair<std::string, int> fail(const std::string& msg, int code) {
    std::lock_guard<std::mutex> lk(mu_);
    if (!failed_) {
      failed_ = true;
      failure_ = msg;
      code_ = code;
    }
    cv_.notify_all();
    return {failure_, code_};
  }

 private:
  int world_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::tuple<int, int, int>, std::deque<Message>> queues_;
  std::vector<std::string> slots_, result_;
  int done_;
  std::set<int> deposited_;  // ranks in the current exchange
  double timeout_ = 0;       // the watchdog's, seconds; 0: off
  std::vector<bool> waiting_;
  std::vector<Clock::time_point> alive_at_;  // last send, or end of a wait, per rank
  uint64_t generation_ = 0;
  bool failed_ = false;
  std::string failure_;
  int code_ = 0;
};

class LocalTransport final : public Transport {
 public:
  LocalTransport(std::shared_ptr<Hub> hub, int rank, int world)
      : hub_(std::move(hub)), rank_(rank), world_(world) {}
  std::string name() const override { return "threads"; }
  int rank() const override { return rank_; }
  int world() const override { return world_; }

  Status send(int dst, Channel ch, std::vector<uint8_t> header, const void* data,
              int64_t n) override {
    Message m;
    m.header = std::move(header);
    if (n > 0) host_payload_bytes_ += n;
    if (n > 0)
      m.data.assign(static_cast<const uint8_t*>(data), static_cast<const uint8_t*>(data) + n);
    hub_->push(rank_, dst, ch, std::move(m));
    return Status::ok();
  }
  Status recv(int src, Channel ch, std::vector<uint8_t>& header, const PayloadSize& payload_size,
              std::vector<uint8_t>& data) override {
    Message m;
    std::string stalled;
    if (Status st = hub_->pop(src, rank_, ch, &m, &stalled); !st) {
      if (!stalled.empty()) fail(stalled, kStalledExitCode);
      return st;
    }
    const int64_t n = payload_size ? payload_size(m.header) : 0;
    if (static_cast<int64_t>(m.data.size()) != n)
      return Status::error(str("stage ", rank_, ": payload from stage ", src, " has ",
                               m.data.size(), " bytes, the descriptor implies ", n));
    header = std::move(m.header);
    data = std::move(m.data);
    return Status::ok();
  }
  bool ready(int src, Channel ch) override { return hub_->ready(src, rank_, ch); }
  bool failed() override { return hub_->failed(); }
  Status allgather(const std::string& mine, std::vector<std::string>* all) override {
    return exchange(mine, all);
  }
  // The stage's thread waits for its helper, telling the hub it is alive (the other stages,
  // waiting at the barrier, check that) and watching the helper's ticks. It waits for the helper
  // even after a failure (the helper writes into the caller's frame): a helper that never returns
  // leaves this thread to the driver's grace period, as a stage stalled mid-run does.
  Status start_up(int phase, const StartUpFn& work) override {
    (void)phase;  // the hub's exchanges are barriers in order already
    const double T = hub_->timeout();
    if (T <= 0) {
      SP_RETURN_IF_ERROR(work([] {}));
    } else {
      StartUpWork w(work);
      bool reported = false;
      while (!w.finished()) {
        hub_->keep_alive(rank_);
        if (const double idle = w.idle_seconds(); idle > T && !reported) {
          hub_->fail(stalled_loading(rank_, T, idle), kStalledExitCode);
          reported = true;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
      if (std::string m; hub_->failed(&m)) return Status::error(m);
      SP_RETURN_IF_ERROR(w.result());
    }
    std::vector<std::string> all;
    return exchange("", &all, "the end of loading");
  }
  Result<double> allreduce_max(double v) override {
    // The exact bits travel, not a decimal rendering.
    std::vector<std::string> all;
    SP_RETURN_IF_ERROR(exchange(std::string(reinterpret_cast<const char*>(&v), sizeof v), &all));
    double m = v;
    for (auto& s : all) {
      double x;
      std::memcpy(&x, s.data(), sizeof x);
      m = std::max(m, x);
    }
    return m;
  }
  void set_stage_timeout(double seconds) override { hub_->set_timeout(seconds); }
  void keep_alive() override { hub_->keep_alive(rank_); }
  // Threads cannot exit alone: mark the pipeline failed (every blocked stage wakes with the
  // message) and unwind this stage's thread.
  [[noreturn]] void fail(const std::string& message, int exit_code) override {
    auto [first, code] = hub_->fail(message, exit_code);
    throw StageFailure{first, code};
  }

 private:
  Status exchange(const std::string& mine, std::vector<std::string>* all,
                  const char* what = "the end of the run") {
    std::string stalled;
    Status st = hub_->exchange(rank_, mine, all, &stalled, what);
    if (!st && !stalled.empty()) fail(stalled, kStalledExitCode);
    return st;
  }
  std::shared_ptr<Hub> hub_;
  int rank_, world_;
};

}  // namespace

std::vector<std::unique_ptr<Transport>> make_local_transports(int world) {
  auto hub = std::make_shared<Hub>(world);
  std::vector<std::unique_ptr<Transport>> out;
  for (int r = 0; r < world; ++r) out.push_back(std::make_unique<LocalTransport>(hub, r, world));
  return out;
}

bool launched_by_mpi() {
  return std::getenv("OMPI_COMM_WORLD_SIZE") || std::getenv("PMI_SIZE") ||
         std::getenv("PMIX_RANK") || std::getenv("MPI_LOCALNRANKS");
}

}  // namespace sp
