// Reductions of the CPU backend.
#pragma once

#include <cstdint>

#include "moca/backend/cpu/parallel.hpp"
#include "moca/backend/cpu/rows.hpp"

namespace moca::cpu {

/// Views x as [outer, n, inner] and reduces the middle axis:
///   y[o, i] = alpha * sum_j x[o, j, i] + beta * y[o, i]   (beta == 0: y is not read).
/// y is of x's type or, for bf16 x, float (a parameter's float gradient).
/// Summation order is fixed (j ascending), whatever the thread count. Contiguous reductions
/// (inner == 1) accumulate in double: a float running sum of millions of small terms loses the
/// terms below half its ulp (a flat float sum of MOCA's L_LOC terms came out 5% low).
template <class T, class Y>
void sum_middle(std::int64_t outer, std::int64_t n, std::int64_t inner, Y alpha, const T* x, Y beta,
                Y* y) {
  const std::int64_t work = outer * n * inner;
  if (inner == 1) {
    parallel_for(outer, work, [&](std::int64_t o0, std::int64_t o1) {
      for (std::int64_t o = o0; o < o1; ++o) {
        double s = 0;
        const T* xo = x + o * n;
        for (std::int64_t j = 0; j < n; ++j) s += static_cast<double>(xo[j]);
        const acc_t<T> prev = beta == Y(0) ? acc_t<T>(0) : acc_t<T>(beta * y[o]);
        y[o] = static_cast<Y>(acc_t<T>(alpha) * static_cast<acc_t<T>>(s) + prev);
      }
    });
    return;
  }
  // Split over (outer, column block) so both a single long reduction ([M, N] -> [N]) and many
  // short ones keep every thread busy.
  constexpr std::int64_t kBlock = 64;
  const std::int64_t blocks = (inner + kBlock - 1) / kBlock;
  parallel_for(outer * blocks, work, [&](std::int64_t t0, std::int64_t t1) {
    acc_t<T> acc[kBlock];
    for (std::int64_t t = t0; t < t1; ++t) {
      const std::int64_t o = t / blocks, c0 = (t % blocks) * kBlock;
      const std::int64_t c1 = c0 + kBlock < inner ? c0 + kBlock : inner;
      for (std::int64_t c = c0; c < c1; ++c) acc[c - c0] = 0;
      const T* xo = x + o * n * inner;
      for (std::int64_t j = 0; j < n; ++j) {
        const T* xr = xo + j * inner;
#pragma omp simd
        for (std::int64_t c = c0; c < c1; ++c) acc[c - c0] += xr[c];
      }
      Y* yo = y + o * inner;
      for (std::int64_t c = c0; c < c1; ++c) {
        const acc_t<T> prev = beta == Y(0) ? acc_t<T>(0) : acc_t<T>(beta * yo[c]);
        yo[c] = static_cast<Y>(acc_t<T>(alpha) * acc[c - c0] + prev);
      }
    }
  });
}

}  // namespace moca::cpu
