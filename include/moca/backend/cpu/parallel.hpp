// Threading helpers for the CPU backend (OpenMP when compiled with it, serial otherwise).
#pragma once

#include <algorithm>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace moca::cpu {

/// Below this many elements an elementwise loop runs on one thread: waking threads costs more.
inline constexpr std::int64_t kParallelGrain = 1 << 15;

inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

inline bool in_parallel() {
#ifdef _OPENMP
  return omp_in_parallel() != 0;
#else
  return false;
#endif
}

/// Runs body(begin, end) over [0, n) in contiguous chunks, in parallel when `work` (an estimate
/// of the elements touched) is large enough. Chunks are disjoint, so a body that writes only
/// inside its range is race-free and its result independent of the thread count.
template <class F>
void parallel_for(std::int64_t n, std::int64_t work, F&& body) {
  if (n <= 0) return;
#ifdef _OPENMP
  const int threads = max_threads();
  if (threads > 1 && work >= kParallelGrain && n > 1 && !in_parallel()) {
    const std::int64_t chunks = std::min<std::int64_t>(n, threads);
#pragma omp parallel for schedule(static) num_threads(static_cast<int>(chunks))
    for (std::int64_t c = 0; c < chunks; ++c) {
      const std::int64_t b = n * c / chunks, e = n * (c + 1) / chunks;
      body(b, e);
    }
    return;
  }
#endif
  body(std::int64_t{0}, n);
}

}  // namespace moca::cpu
