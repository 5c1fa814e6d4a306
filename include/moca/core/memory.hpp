// Host memory: 64-byte aligned allocations, with counters that tests and benchmarks read to prove
// that a training step allocates nothing in steady state and to report peak memory.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <new>

#include "moca/core/check.hpp"
#include "moca/core/device.hpp"

namespace moca {

/// Counters of the allocations made through Memory<Device> (tensors, arenas).
struct MemoryStats {
  std::int64_t allocations = 0;  ///< number of allocations since start
  std::int64_t bytes_in_use = 0;
  std::int64_t peak_bytes = 0;
};

namespace detail {
struct MemoryCounters {
  std::atomic<std::int64_t> allocations{0};
  std::atomic<std::int64_t> bytes_in_use{0};
  std::atomic<std::int64_t> peak_bytes{0};

  void on_allocate(std::int64_t bytes) {
    allocations.fetch_add(1, std::memory_order_relaxed);
    const std::int64_t now = bytes_in_use.fetch_add(bytes, std::memory_order_relaxed) + bytes;
    std::int64_t peak = peak_bytes.load(std::memory_order_relaxed);
    while (now > peak && !peak_bytes.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
    }
  }
  void on_free(std::int64_t bytes) { bytes_in_use.fetch_sub(bytes, std::memory_order_relaxed); }
  MemoryStats read() const {
    return {allocations.load(), bytes_in_use.load(), peak_bytes.load()};
  }
};

template <class D>
MemoryCounters& memory_counters() {
  static MemoryCounters counters;  // one per device type, shared by all translation units
  return counters;
}
}  // namespace detail

/// Allocation counters of device D.
template <class D>
MemoryStats memory_stats() {
  return detail::memory_counters<D>().read();
}

/// Resets the peak to the current use (e.g. before measuring one step).
template <class D>
void reset_peak_memory() {
  auto& c = detail::memory_counters<D>();
  c.peak_bytes.store(c.bytes_in_use.load());
}

template <>
struct Memory<Cpu> {
  static constexpr std::size_t kAlignment = 64;  // one cache line; a full AVX-512 register

  static void* allocate(std::size_t bytes) {
    if (bytes == 0) return nullptr;
    void* p = ::operator new(bytes, std::align_val_t{kAlignment}, std::nothrow);
    MOCA_CHECK(p != nullptr, "out of host memory allocating ", bytes, " bytes");
    detail::memory_counters<Cpu>().on_allocate(static_cast<std::int64_t>(bytes));
    return p;
  }
  static void deallocate(void* p, std::size_t bytes) noexcept {
    if (p == nullptr) return;
    ::operator delete(p, std::align_val_t{kAlignment});
    detail::memory_counters<Cpu>().on_free(static_cast<std::int64_t>(bytes));
  }
  static void zero(void* p, std::size_t bytes) {
    if (bytes) std::memset(p, 0, bytes);
  }
  /// Host-to-host copy.
  static void copy(void* dst, const void* src, std::size_t bytes) {
    if (bytes) std::memmove(dst, src, bytes);
  }
};

}  // namespace moca
