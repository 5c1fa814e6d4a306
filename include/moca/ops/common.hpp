// Shared pieces of the op set: the backend dispatch and shape-check helpers.
#pragma once

#include <cstdint>
#include <type_traits>

#include "moca/backend/cpu/backend.hpp"
#include "moca/core/check.hpp"
#include "moca/core/profiler.hpp"
#include "moca/core/tensor.hpp"

namespace moca {

/// Index type of gather/scatter and of masks.
using Index = std::int32_t;

/// A scalar argument that takes the tensor's element type without taking part in template
/// deduction, so ops::scale(x, 0.5) works for float and double tensors alike.
template <class T>
using Scalar = std::type_identity_t<T>;

namespace detail {
template <class T, class U, class D>
void check_same_size(const char* op, const TensorView<T, D>& a, const TensorView<U, D>& b) {
  MOCA_CHECK(a.numel() == b.numel(), op, ": sizes differ: ", a.shape(), " vs ", b.shape());
}
/// Bytes of the views' elements, summed: an op passes each operand it reads and each output it
/// writes (an operand both read and written, twice) to profiler::count_bytes.
template <class... V>
double bytes_of(const V&... v) {
  return (0.0 + ... + (static_cast<double>(v.numel()) * sizeof(typename V::value_type)));
}
/// Reports the least traffic of an op over these operands (see bytes_of) to the profiler.
template <class... V>
void count_traffic(const V&... v) {
  profiler::count_bytes(bytes_of(v...));
}
template <class T, class D>
void check_same_shape(const char* op, const TensorView<T, D>& a, const TensorView<T, D>& b) {
  MOCA_CHECK(a.shape() == b.shape(), op, ": shapes differ: ", a.shape(), " vs ", b.shape());
}
}  // namespace detail
}  // namespace moca
