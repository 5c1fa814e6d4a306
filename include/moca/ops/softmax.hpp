// Softmax and log-softmax over the last dimension.
#pragma once

#include "moca/ops/common.hpp"

namespace moca::ops {

template <class T, class D>
void softmax(const TensorView<T, D>& x, const TensorView<T, D>& y) {
  detail::check_same_shape("softmax", x, y);
  Backend<D>::softmax_rows(x.shape().leading(), x.shape().last(), x.data(), y.data());
}
template <class T, class D>
void log_softmax(const TensorView<T, D>& x, const TensorView<T, D>& y) {
  detail::check_same_shape("log_softmax", x, y);
  Backend<D>::log_softmax_rows(x.shape().leading(), x.shape().last(), x.data(), y.data());
}
/// Given y = softmax(x) and dy, writes dx (may alias dy).
template <class T, class D>
void softmax_backward(const TensorView<T, D>& y, const TensorView<T, D>& dy,
                      const TensorView<T, D>& dx) {
  detail::check_same_shape("softmax_backward", y, dy);
  detail::check_same_shape("softmax_backward", y, dx);
  Backend<D>::softmax_rows_backward(y.shape().leading(), y.shape().last(), y.data(), dy.data(),
                                    dx.data());
}
/// Given y = log_softmax(x) and dy, writes dx (may alias dy).
template <class T, class D>
void log_softmax_backward(const TensorView<T, D>& y, const TensorView<T, D>& dy,
                          const TensorView<T, D>& dx) {
  detail::check_same_shape("log_softmax_backward", y, dy);
  detail::check_same_shape("log_softmax_backward", y, dx);
  Backend<D>::log_softmax_rows_backward(y.shape().leading(), y.shape().last(), y.data(),
                                        dy.data(), dx.data());
}

}  // namespace moca::ops
