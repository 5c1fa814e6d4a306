// Reductions over one axis, and the squared L2 norm.
#pragma once

#include <concepts>

#include "moca/core/pending_values.hpp"
#include "moca/ops/common.hpp"

namespace moca::ops {

/// y = alpha · Σ_axis x + beta · y. y holds x's shape without `axis` (any shape of that size:
/// [N] and [1, N] both serve for a [M, N] → axis 0 reduction). Order of summation is fixed.
/// y may be float where x is bf16 (a bf16 parameter's float gradient): the sum is then stored
/// unrounded.
template <class T, class Y, class D>
requires std::is_same_v<Y, T> || std::is_same_v<Y, compute_t<T>>
void sum(const TensorView<T, D>& x, int axis, const TensorView<Y, D>& y, Scalar<Y> alpha = 1,
         Scalar<Y> beta = 0) {
  MOCA_CHECK(axis >= 0 && axis < x.rank(), "sum: axis ", axis, " out of range for ", x.shape());
  std::int64_t outer = 1, inner = 1;
  for (int d = 0; d < axis; ++d) outer *= x.size(d);
  for (int d = axis + 1; d < x.rank(); ++d) inner *= x.size(d);
  MOCA_CHECK(y.numel() == outer * inner, "sum: output ", y.shape(), " does not match ", x.shape(),
             " reduced over axis ", axis);
  if (Y(beta) == Y(0))
    detail::count_traffic(x, y);
  else
    detail::count_traffic(x, y, y);
  Backend<D>::sum_middle(outer, x.size(axis), inner, Y(alpha), x.data(), Y(beta), y.data());
}

/// y = mean over `axis` of x (+ beta · y).
template <class T, class D>
void mean(const TensorView<T, D>& x, int axis, const TensorView<T, D>& y, Scalar<T> beta = 0) {
  MOCA_CHECK(axis >= 0 && axis < x.rank(), "mean: axis ", axis, " out of range for ", x.shape());
  MOCA_CHECK(x.size(axis) > 0, "mean: empty axis ", axis, " in ", x.shape());
  sum(x, axis, y, T(1) / static_cast<T>(x.size(axis)), beta);
}

/// Σ x², accumulated in double; the result does not depend on the thread count.
template <class T, class D>
double sum_squares(const TensorView<T, D>& x) {
  detail::count_traffic(x);
  return Backend<D>::sum_squares(x.numel(), x.data());
}

/// A backend whose reductions can leave their partial sums on the device (PendingValues).
template <class T, class D>
concept DeferredSums = requires(std::int64_t n, const T* x, double* partial) {
  { Backend<D>::sum_partials(n) } -> std::convertible_to<std::int64_t>;
  Backend<D>::sum_squares_partials(n, x, partial);
};

/// Σ x² as a value of `into`, read with the set's other values: the same total as above, without
/// waiting for the device here.
template <class T, class D>
typename PendingValues<D>::Ticket sum_squares(const TensorView<T, D>& x, PendingValues<D>& into) {
  if constexpr (DeferredSums<T, D>) {
    detail::count_traffic(x);
    auto [ticket, partial] = into.partial_sums(Backend<D>::sum_partials(x.numel()));
    Backend<D>::sum_squares_partials(x.numel(), x.data(), partial);
    return ticket;
  } else {
    return into.known(sum_squares(x));
  }
}

}  // namespace moca::ops
