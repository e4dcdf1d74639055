#include "core/thread_pool.h"

#include <algorithm>

namespace sp {

namespace {

constexpr int kSpins = 2000;  // up to ~100 microseconds of pause instructions before sleeping

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

}  // namespace

ThreadPool::ThreadPool(int num_threads) : num_threads_(std::max(1, num_threads)) {
  ranges_.assign(num_threads_, {0, 0});
  try {
    for (int i = 1; i < num_threads_; ++i) threads_.emplace_back([this, i] { worker(i); });
  } catch (...) {
    // A thread that cannot start (ulimit): stop the started ones before the members go, or their
    // destructors terminate the process / wait forever on a condition variable in use.
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_work_.notify_all();
    for (auto& t : threads_) t.join();
    throw;
  }
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_work_.notify_all();
  for (auto& t : threads_) t.join();
}

void ThreadPool::worker(int index) {
  uint64_t seen = 0;
  while (true) {
    for (int i = 0; i < kSpins && generation_.load(std::memory_order_acquire) == seen && !stop_;
         ++i)
      cpu_relax();
    if (generation_.load(std::memory_order_acquire) == seen) {
      std::unique_lock<std::mutex> lk(mu_);
      cv_work_.wait(lk,
                    [&] { return stop_ || generation_.load(std::memory_order_acquire) != seen; });
    }
    if (stop_) return;
    seen = generation_.load(std::memory_order_acquire);
    const auto range = ranges_[index];
    if (range.second > range.first) (*job_)(range.first, range.second);
    if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      std::lock_guard<std::mutex> lk(mu_);
      cv_done_.notify_one();
    }
  }
}

void ThreadPool::parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn,
                              int64_t min_chunk) {
  if (n <= 0) return;
  const int64_t parts =
      std::min<int64_t>(num_threads_, std::max<int64_t>(1, n / std::max<int64_t>(1, min_chunk)));
  if (parts <= 1 || threads_.empty()) {
    fn(0, n);
    return;
  }
  for (int64_t p = 0; p < num_threads_; ++p)
    ranges_[p] = p < parts ? std::pair<int64_t, int64_t>{n * p / parts, n * (p + 1) / parts}
                           : std::pair<int64_t, int64_t>{0, 0};
  job_ = &fn;
  pending_.store(num_threads_ - 1, std::memory_order_relaxed);
  {
    // Publishing under the lock pairs with a worker that is about to sleep.
    std::lock_guard<std::mutex> lk(mu_);
    generation_.fetch_add(1, std::memory_order_acq_rel);
  }
  cv_work_.notify_all();
  fn(ranges_[0].first, ranges_[0].second);
  for (int i = 0; i < kSpins && pending_.load(std::memory_order_acquire) != 0; ++i) cpu_relax();
  if (pending_.load(std::memory_order_acquire) != 0) {
    std::unique_lock<std::mutex> lk(mu_);
    cv_done_.wait(lk, [&] { return pending_.load(std::memory_order_acquire) == 0; });
  }
  job_ = nullptr;
}

}  // namespace sp
