// A stage's start-up work (weight loading, uploads) on a helper thread, so that the stage's own
// thread stays free to tell the other stages it is alive and to watch the work's progress
// (Transport::start_up). Shared by the transports; not part of their interface.
#pragma once

#include <atomic>
#include <chrono>
#include <exception>
#include <functional>
#include <memory>
#include <thread>

#include "core/status.h"

namespace sp {

// tick(): the work made progress (a tensor read, a layer uploaded).
using StartUpFn = std::function<Status(const std::function<void()>& tick)>;

class StartUpWork {
 public:
  explicit StartUpWork(const StartUpFn& work);
  // Joins a finished helper; one still running (stuck in a read that never returns) is detached
  // and left to the end of the process, which the failure this implies brings soon.
  ~StartUpWork();
  StartUpWork(const StartUpWork&) = delete;
  StartUpWork& operator=(const StartUpWork&) = delete;

  bool finished() const { return sh_->done.load(std::memory_order_acquire); }
  // Seconds since the last tick (or the start).
  double idle_seconds() const;
  // Once finished(): the work's Status; what it threw is rethrown here, on the stage's thread.
  Status result();

 private:
  struct Shared {
    std::atomic<bool> done{false};
    std::atomic<int64_t> last_tick_ns{0};
    Status status = Status::ok();
    std::exception_ptr thrown;
  };
  static int64_t now_ns();
  std::shared_ptr<Shared> sh_;
  std::thread thread_;
};

}  // namespace sp
