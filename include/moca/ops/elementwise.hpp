// Elementwise ops: fill, scaled sums, products, bias, activations.
// Outputs may alias inputs of the same size unless noted.
#pragma once

#include "moca/ops/common.hpp"

namespace moca::ops {

template <class T, class D>
void fill(const TensorView<T, D>& x, Scalar<T> value) {
  detail::count_traffic(x);
  Backend<D>::fill(x.numel(), T(value), x.data());
}
template <class T, class D>
void zero(const TensorView<T, D>& x) {
  fill(x, T(0));
}

/// y = alpha · x + beta · y  (beta = 0: y is overwritten without being read).
template <class T, class D>
void axpby(Scalar<T> alpha, const TensorView<T, D>& x, Scalar<T> beta, const TensorView<T, D>& y) {
  detail::check_same_size("axpby", x, y);
  if (beta == T(0))
    detail::count_traffic(x, y);
  else
    detail::count_traffic(x, y, y);
  Backend<D>::axpby(x.numel(), T(alpha), x.data(), T(beta), y.data());
}
/// y += alpha · x
template <class T, class D>
void axpy(Scalar<T> alpha, const TensorView<T, D>& x, const TensorView<T, D>& y) {
  axpby(alpha, x, T(1), y);
}
/// x *= alpha
template <class T, class D>
void scale(const TensorView<T, D>& x, Scalar<T> alpha) {
  detail::count_traffic(x, x);
  Backend<D>::scale(x.numel(), T(alpha), x.data());
}
/// y = a + b
template <class T, class D>
void add(const TensorView<T, D>& a, const TensorView<T, D>& b, const TensorView<T, D>& y) {
  detail::check_same_size("add", a, b);
  detail::check_same_size("add", a, y);
  detail::count_traffic(a, b, y);
  Backend<D>::add(a.numel(), a.data(), b.data(), y.data());
}
/// y = a ⊙ b
template <class T, class D>
void mul(const TensorView<T, D>& a, const TensorView<T, D>& b, const TensorView<T, D>& y) {
  detail::check_same_size("mul", a, b);
  detail::check_same_size("mul", a, y);
  detail::count_traffic(a, b, y);
  Backend<D>::mul(a.numel(), a.data(), b.data(), y.data());
}

/// y = x converted to y's element type (float → bf16 rounds to nearest even; bf16 → float is
/// exact): a mixed-precision model's master weights rounded into its values, or widened back.
template <class S, class T, class D>
void convert(const TensorView<S, D>& x, const TensorView<T, D>& y) {
  detail::check_same_size("convert", x, y);
  detail::count_traffic(x, y);
  Backend<D>::convert(x.numel(), x.data(), y.data());
}

/// dst on device D = host src in dst's element type: images of a float loader into a bf16 model.
/// The conversion runs on the host before the copy, so what crosses to the device is already
/// T; `stage` is that host buffer of T (resized to fit, so a steady loop does not allocate).
template <class S, class T, class D>
void upload_converted(const TensorView<S, Cpu>& src, const TensorView<T, D>& dst,
                      Tensor<T, Cpu>& stage) {
  if constexpr (std::is_same_v<S, T>) {
    copy(src, dst);
  } else if constexpr (std::is_same_v<D, Cpu>) {
    convert(src, dst);
  } else {
    stage.resize(src.shape());
    convert(src, TensorView<T, Cpu>(stage));
    copy(TensorView<T, Cpu>(stage), dst);
  }
}

/// Host dst = src on device D in dst's element type: a bf16 model's features into float rows.
/// The copy crosses in S and the host converts it; `stage` is that host buffer of S.
template <class S, class T, class D>
void download_converted(const TensorView<S, D>& src, const TensorView<T, Cpu>& dst,
                        Tensor<S, Cpu>& stage) {
  if constexpr (std::is_same_v<S, T>) {
    copy(src, dst);
  } else if constexpr (std::is_same_v<D, Cpu>) {
    convert(src, dst);
  } else {
    stage.resize(src.shape());
    copy(src, TensorView<S, Cpu>(stage));
    convert(TensorView<S, Cpu>(stage), dst);
  }
}

/// x[..., :] += bias, for x [..., N] and bias [N].
template <class T, class D>
void add_bias(const TensorView<T, D>& x, const TensorView<T, D>& bias) {
  const auto m = x.matrix();
  MOCA_CHECK(bias.numel() == m.size(1), "add_bias: bias ", bias.shape(),
             " does not match the last dimension of ", x.shape());
  detail::count_traffic(x, x, bias);
  Backend<D>::add_bias(m.size(0), m.size(1), bias.data(), m.data());
}

/// y = gelu(x), the exact (erf) form.
template <class T, class D>
void gelu(const TensorView<T, D>& x, const TensorView<T, D>& y) {
  detail::check_same_size("gelu", x, y);
  detail::count_traffic(x, y);
  Backend<D>::gelu_forward(x.numel(), x.data(), y.data());
}
/// dx = dy · gelu'(x)
template <class T, class D>
void gelu_backward(const TensorView<T, D>& x, const TensorView<T, D>& dy,
                   const TensorView<T, D>& dx) {
  detail::check_same_size("gelu_backward", x, dy);
  detail::check_same_size("gelu_backward", x, dx);
  detail::count_traffic(x, dy, dx);
  Backend<D>::gelu_backward(x.numel(), x.data(), dy.data(), dx.data());
}

/// y = max(x, 0)
template <class T, class D>
void relu(const TensorView<T, D>& x, const TensorView<T, D>& y) {
  detail::check_same_size("relu", x, y);
  detail::count_traffic(x, y);
  Backend<D>::relu_forward(x.numel(), x.data(), y.data());
}
/// dx = dy where x > 0, else 0
template <class T, class D>
void relu_backward(const TensorView<T, D>& x, const TensorView<T, D>& dy,
                   const TensorView<T, D>& dx) {
  detail::check_same_size("relu_backward", x, dy);
  detail::check_same_size("relu_backward", x, dx);
  detail::count_traffic(x, dy, dx);
  Backend<D>::relu_backward(x.numel(), x.data(), dy.data(), dx.data());
}

}  // namespace moca::ops
