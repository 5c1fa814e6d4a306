// Helpers of the CUDA tests: skipping without a device, host/device copies, the normalised error
// metric and its tolerance, and guarded device outputs that catch out-of-bounds writes.
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <moca/core/random.hpp>
#include <moca/cuda.hpp>
#include <moca/moca.hpp>
#include <type_traits>

namespace moca::testing {

/// Whether the environment asks for a GPU (MOCA_REQUIRE_CUDA set and not 0, as
/// scripts/gpu-check.sh sets it): then a missing device fails the GPU tests instead of skipping
/// them, so a run on a GPU machine whose driver or runtime does not work cannot pass.
inline bool cuda_required() {
  const char* v = std::getenv("MOCA_REQUIRE_CUDA");
  return v != nullptr && *v != '\0' && std::string(v) != "0";
}

// Leaves the current test case, with a message saying why, where no device is available (fails
// it where one is required).
#define SKIP_WITHOUT_CUDA_DEVICE()                                               \
  do {                                                                           \
    if (!::moca::cuda::available()) {                                            \
      if (::moca::testing::cuda_required())                                      \
        FAIL("no usable CUDA device, and MOCA_REQUIRE_CUDA asks for one");       \
      MESSAGE("skipped: no CUDA device");                                        \
      return;                                                                    \
    }                                                                            \
  } while (0)

/// Allowed normalised error for results that sum `terms` values: the summation order differs
/// between the backends, and the rounding error it makes grows like sqrt(terms).
template <class T>
double tolerance(std::int64_t terms = 1) {
  const double base = std::is_same_v<T, float> ? 1e-6 : 1e-12;
  return base * std::max(1.0, std::sqrt(static_cast<double>(terms) / 64.0));
}

/// ||a - b|| / max(||a||, scale) (||a - b|| when both are zero); NaN anywhere makes it NaN, which
/// fails a check. `scale` is for results that cancel: the size of the terms a result is the
/// difference of, which is what its rounding error is proportional to.
template <class T>
double relative_error(const TensorView<T>& a, const TensorView<T>& b, double scale = 0.0) {
  REQUIRE(a.numel() == b.numel());
  double diff = 0.0, ref = 0.0;
  for (std::int64_t i = 0; i < a.numel(); ++i) {
    const double d = static_cast<double>(a.data()[i]) - static_cast<double>(b.data()[i]);
    diff += d * d;
    ref += static_cast<double>(a.data()[i]) * static_cast<double>(a.data()[i]);
  }
  ref = std::max(std::sqrt(ref), scale);
  return ref > 0.0 ? std::sqrt(diff) / ref : std::sqrt(diff);
}

/// ||x||.
template <class T>
double norm_of(const TensorView<T>& x) {
  double s = 0.0;
  for (std::int64_t i = 0; i < x.numel(); ++i)
    s += static_cast<double>(x.data()[i]) * static_cast<double>(x.data()[i]);
  return std::sqrt(s);
}

inline std::uint64_t next_stream() {
  static std::uint64_t stream = 0;
  return ++stream;
}

template <class T>
Tensor<T> random_tensor(Shape shape, double lo = -1.0, double hi = 1.0) {
  Tensor<T> t(shape);
  fill_uniform<T>(t, Philox(2024), next_stream(), lo, hi);
  return t;
}

template <class T>
Tensor<T> full(Shape shape, T value) {
  Tensor<T> t(shape);
  std::fill(t.begin(), t.end(), value);
  return t;
}

template <class T>
Tensor<T> nan_tensor(Shape shape) {
  return full<T>(shape, std::numeric_limits<T>::quiet_NaN());
}

template <class T>
Tensor<T, Cuda> to_device(const TensorView<T>& x) {
  Tensor<T, Cuda> t(x.shape());
  moca::copy(x, TensorView<T, Cuda>(t));
  return t;
}

template <class T>
Tensor<T> to_host(const TensorView<T, Cuda>& x) {
  Tensor<T> t(x.shape());
  moca::copy(x, TensorView<T>(t));
  return t;
}

/// A device output with kGuard sentinel elements on each side, to catch out-of-bounds writes.
template <class T>
class Guarded {
 public:
  static constexpr std::int64_t kGuard = 64;
  static constexpr T kSentinel = T(-12345.5);

  explicit Guarded(const TensorView<T>& init)
      : shape_(init.shape()), storage_(Shape{init.numel() + 2 * kGuard}) {
    Tensor<T> host(storage_.shape());
    std::fill(host.begin(), host.end(), kSentinel);
    std::copy(init.data(), init.data() + init.numel(), host.data() + kGuard);
    moca::copy(TensorView<T>(host), TensorView<T, Cuda>(storage_));
  }

  /// The output itself, between the guards.
  TensorView<T, Cuda> view() const { return TensorView<T, Cuda>(storage_.data() + kGuard, shape_); }
  /// Its content, on the host.
  Tensor<T> result() const { return to_host(view()); }

  bool guards_intact() const {
    const Tensor<T> all = to_host(TensorView<T, Cuda>(storage_));
    const std::int64_t n = all.numel();
    for (std::int64_t i = 0; i < kGuard; ++i)
      if (all.data()[i] != kSentinel || all.data()[n - 1 - i] != kSentinel) return false;
    return true;
  }

 private:
  Shape shape_;
  Tensor<T, Cuda> storage_;
};

/// Checks a device result against the CPU one, and the guards around it; `scale` as in
/// relative_error.
template <class T>
void check_parity(const std::string& what, const TensorView<T>& expected,
                  const Guarded<T>& actual, double tol, double scale = 0.0) {
  const Tensor<T> got = actual.result();
  const double err = relative_error(expected, TensorView<T>(got), scale);
  INFO(what, ": relative error ", err, " (tolerance ", tol, ")");
  CHECK(err <= tol);
  CHECK(actual.guards_intact());
}

/// Sets one of the context's switches (set_column_chunks, set_fused_bias_grads, ...) for a
/// test's scope and puts the default back at its end, failures included.
class ContextSwitch {
 public:
  using Setter = void (cuda::Context::*)(bool) noexcept;
  ContextSwitch(Setter set, bool on, bool default_value) : set_(set), default_(default_value) {
    (cuda::Context::get().*set_)(on);
  }
  ~ContextSwitch() { (cuda::Context::get().*set_)(default_); }
  ContextSwitch(const ContextSwitch&) = delete;
  ContextSwitch& operator=(const ContextSwitch&) = delete;

 private:
  Setter set_;
  bool default_;
};

}  // namespace moca::testing
