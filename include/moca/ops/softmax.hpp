// Softmax and log-softmax over the last dimension.
#pragma once

#include <concepts>

#include "moca/core/tensor.hpp"
#include "moca/ops/common.hpp"
#include "moca/ops/elementwise.hpp"
#include "moca/ops/reduce.hpp"
#include "moca/ops/stats.hpp"

namespace moca::ops {

template <class T, class D>
void softmax(const TensorView<T, D>& x, const TensorView<T, D>& y) {
  detail::check_same_shape("softmax", x, y);
  detail::count_traffic(x, y);
  Backend<D>::softmax_rows(x.shape().leading(), x.shape().last(), x.data(), y.data());
}
template <class T, class D>
void log_softmax(const TensorView<T, D>& x, const TensorView<T, D>& y) {
  detail::check_same_shape("log_softmax", x, y);
  detail::count_traffic(x, y);
  Backend<D>::log_softmax_rows(x.shape().leading(), x.shape().last(), x.data(), y.data());
}
/// Given y = softmax(x) and dy, writes dx (may alias dy).
template <class T, class D>
void softmax_backward(const TensorView<T, D>& y, const TensorView<T, D>& dy,
                      const TensorView<T, D>& dx) {
  detail::check_same_shape("softmax_backward", y, dy);
  detail::check_same_shape("softmax_backward", y, dx);
  detail::count_traffic(y, dy, dx);
  Backend<D>::softmax_rows_backward(y.shape().leading(), y.shape().last(), y.data(), dy.data(),
                                    dx.data());
}
/// Given y = log_softmax(x) and dy, writes dx (may alias dy).
template <class T, class D>
void log_softmax_backward(const TensorView<T, D>& y, const TensorView<T, D>& dy,
                          const TensorView<T, D>& dx) {
  detail::check_same_shape("log_softmax_backward", y, dy);
  detail::check_same_shape("log_softmax_backward", y, dx);
  detail::count_traffic(y, dy, dx);
  Backend<D>::log_softmax_rows_backward(y.shape().leading(), y.shape().last(), y.data(),
                                        dy.data(), dx.data());
}

namespace softmax_impl {
template <class T, class D>
concept SpreadBackend = requires(std::int64_t n, T s, T* p) {
  Backend<D>::softmax_spread_rows(n, n, s, p, p);
};

template <class T, class D>
void spread_composed(const TensorView<T, D>& x, T scale, const TensorView<T, D>& spread,
                     Tensor<T, D>& workspace) {
  const std::int64_t M = x.shape().leading(), N = x.shape().last();
  const TensorView<T, D> rows = x.reshape({M, N}), s = spread.reshape({M});
  workspace.resize({M});
  row_max(rows, s);
  mean(rows, 1, TensorView<T, D>(workspace));
  axpy(T(-1), TensorView<T, D>(workspace), s);
  moca::ops::scale(rows, scale);
  softmax(rows, rows);
}
}  // namespace softmax_impl

/// spread[r] = max_k x[r,k] − mean_k x[r,k], then x ← softmax(scale · x) over the last dimension,
/// in place (scale > 0): MOCA's codebook codes with their temperature statistic. Backends with
/// softmax_spread_rows do it in one pass per row; others compose row_max, mean, scale and softmax
/// (`workspace` holds the row means).
template <class T, class D>
void softmax_with_spread(const TensorView<T, D>& x, Scalar<T> scale, const TensorView<T, D>& spread,
                         Tensor<T, D>& workspace) {
  const std::int64_t M = x.shape().leading(), N = x.shape().last();
  MOCA_CHECK(x.rank() >= 1 && N > 0 && spread.numel() == M, "softmax_with_spread: spread ",
             spread.shape(), " needs one value per row of ", x.shape());
  MOCA_CHECK(T(scale) > T(0), "softmax_with_spread: scale ", T(scale), " must be positive");
  if constexpr (softmax_impl::SpreadBackend<T, D>) {
    detail::count_traffic(x, x, spread);
    Backend<D>::softmax_spread_rows(M, N, T(scale), x.data(), spread.data());
  } else {
    softmax_impl::spread_composed(x, T(scale), spread, workspace);
  }
}

}  // namespace moca::ops
