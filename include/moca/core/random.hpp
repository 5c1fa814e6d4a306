// Filling host tensors with counter-based random numbers (initialisation, test inputs).
// Element i of a fill on stream s is a function of (seed, s, i) only.
#pragma once

#include <cstdint>

#include "moca/core/rng.hpp"
#include "moca/core/tensor.hpp"

namespace moca {

/// x[i] = lo + (hi - lo) · U[0, 1), drawn in double.
template <class T>
void fill_uniform(const TensorView<T, Cpu>& x, const Philox& rng, std::uint64_t stream, double lo,
                  double hi) {
  T* p = x.data();
  for (std::int64_t i = 0; i < x.numel(); ++i)
    p[i] = static_cast<T>(lo + (hi - lo) * rng.uniform_double(stream, static_cast<std::uint64_t>(i)));
}

/// x[i] = mean + std · N(0, 1).
template <class T>
void fill_normal(const TensorView<T, Cpu>& x, const Philox& rng, std::uint64_t stream, double mean,
                 double std) {
  T* p = x.data();
  for (std::int64_t i = 0; i < x.numel(); ++i)
    p[i] = static_cast<T>(mean + std * rng.normal(stream, static_cast<std::uint64_t>(i)));
}

}  // namespace moca
