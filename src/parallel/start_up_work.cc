#include "parallel/start_up_work.h"

#include <cmath>

#include "parallel/transport.h"

namespace sp {

int64_t StartUpWork::now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

StartUpWork::StartUpWork(const StartUpFn& work) : sh_(std::make_shared<Shared>()) {
  sh_->last_tick_ns.store(now_ns());
  // The helper holds the shared state, not this object: a detached helper never touches freed
  // memory of ours (the work's own captures are the caller's business: see the destructor).
  thread_ = std::thread([sh = sh_, work] {
    auto tick = [&sh] { sh->last_tick_ns.store(now_ns(), std::memory_order_relaxed); };
    try {
      sh->status = work(tick);
    } catch (...) {
      sh->thrown = std::current_exception();
    }
    sh->done.store(true, std::memory_order_release);
  });
}

StartUpWork::~StartUpWork() {
  if (!thread_.joinable()) return;
  if (finished())
    thread_.join();
  else
    thread_.detach();
}

double StartUpWork::idle_seconds() const {
  return static_cast<double>(now_ns() - sh_->last_tick_ns.load(std::memory_order_relaxed)) * 1e-9;
}

Status StartUpWork::result() {
  if (thread_.joinable()) thread_.join();
  if (sh_->thrown) std::rethrow_exception(sh_->thrown);
  return sh_->status;
}

std::string stalled_loading(int rank, double timeout, double idle) {
  return str("stage ", rank, " (rank ", rank, "): its loading made no progress for ",
             std::round(idle * 10) / 10, " s (--stage-timeout ", timeout, "): stage ", rank,
             " is stalled while loading (a stuck file system or device?)");
}

}  // namespace sp
