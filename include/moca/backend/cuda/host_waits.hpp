// The host's waits for the device, counted and timed: each one empties the device's queue until
// the host launches work again, and the time spent in them is time the host did not spend
// launching. A step's wall time minus its waits is the host's own work, which says whether the
// step is bound by the device or by the host's launches.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>

namespace moca::cuda {

class HostWaitCounter {
 public:
  /// Runs `blocking` (a synchronisation that blocks the host), counting it and its duration,
  /// also when it throws.
  template <class F>
  void wait(F&& blocking) {
    count_.fetch_add(1, std::memory_order_relaxed);
    const Timer timer{this, std::chrono::steady_clock::now()};
    blocking();
  }

  std::uint64_t count() const noexcept { return count_.load(std::memory_order_relaxed); }
  double seconds() const noexcept {
    return 1e-9 * static_cast<double>(nanoseconds_.load(std::memory_order_relaxed));
  }

 private:
  struct Timer {
    HostWaitCounter* counter;
    std::chrono::steady_clock::time_point start;
    ~Timer() {
      const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                          std::chrono::steady_clock::now() - start)
                          .count();
      counter->nanoseconds_.fetch_add(static_cast<std::int64_t>(ns), std::memory_order_relaxed);
    }
  };

  std::atomic<std::uint64_t> count_{0};
  std::atomic<std::int64_t> nanoseconds_{0};
};

}  // namespace moca::cuda
