// Shared pieces of the op set: the backend dispatch and shape-check helpers.
#pragma once

#include <cstdint>
#include <type_traits>

#include "moca/backend/cpu/backend.hpp"
#include "moca/core/check.hpp"
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
template <class T, class D>
void check_same_shape(const char* op, const TensorView<T, D>& a, const TensorView<T, D>& b) {
  MOCA_CHECK(a.shape() == b.shape(), op, ": shapes differ: ", a.shape(), " vs ", b.shape());
}
}  // namespace detail
}  // namespace moca
