// Statistics ops: row maxima, training-mode batch normalisation, Σ x·log y.
#pragma once

#include "moca/ops/common.hpp"

namespace moca::ops {

/// y[r] = max over the last dimension of row r of x.
template <class T, class D>
void row_max(const TensorView<T, D>& x, const TensorView<T, D>& y) {
  MOCA_CHECK(y.numel() == x.shape().leading(), "row_max: output ", y.shape(),
             " must hold one value per row of ", x.shape());
  detail::count_traffic(x, y);
  Backend<D>::row_max(x.shape().leading(), x.shape().last(), x.data(), y.data());
}

/// BatchNorm1d in training mode over the rows of x [M, N]: batch statistics per column (biased
/// variance), y = x̂ · gamma + beta. Saves mean [N] and var [N] in compute_t<T> (float for bf16).
/// gamma/beta may be empty views.
template <class T, class D>
void batch_norm(const TensorView<T, D>& x, const TensorView<T, D>& gamma,
                const TensorView<T, D>& beta, double eps, const TensorView<T, D>& y,
                const TensorView<compute_t<T>, D>& mean, const TensorView<compute_t<T>, D>& var) {
  const std::int64_t M = x.shape().leading(), N = x.shape().last();
  detail::check_same_shape("batch_norm", x, y);
  MOCA_CHECK(M > 0, "batch_norm: no rows in ", x.shape());
  MOCA_CHECK((gamma.empty() || gamma.numel() == N) && (beta.empty() || beta.numel() == N) &&
                 mean.numel() == N && var.numel() == N,
             "batch_norm: weight ", gamma.shape(), ", bias ", beta.shape(), ", mean ",
             mean.shape(), " and var ", var.shape(), " must have one value per column of ",
             x.shape());
  detail::count_traffic(x, x, y);  // statistics over the columns, then the normalised values
  Backend<D>::batch_norm_forward(M, N, x.data(), gamma.empty() ? nullptr : gamma.data(),
                                 beta.empty() ? nullptr : beta.data(), eps, y.data(), mean.data(),
                                 var.data());
}

/// Backward of batch_norm through the batch statistics: writes dx (may alias dy), accumulates
/// into dgamma and dbeta (empty views skip them).
template <class T, class D>
void batch_norm_backward(const TensorView<T, D>& x, const TensorView<T, D>& gamma,
                         const TensorView<compute_t<T>, D>& mean,
                         const TensorView<compute_t<T>, D>& var, double eps,
                         const TensorView<T, D>& dy, const TensorView<T, D>& dx,
                         const TensorView<compute_t<T>, D>& dgamma,
                         const TensorView<compute_t<T>, D>& dbeta) {
  const std::int64_t M = x.shape().leading(), N = x.shape().last();
  detail::check_same_shape("batch_norm_backward", x, dy);
  detail::check_same_shape("batch_norm_backward", x, dx);
  MOCA_CHECK((gamma.empty() || gamma.numel() == N) && (dgamma.empty() || dgamma.numel() == N) &&
                 (dbeta.empty() || dbeta.numel() == N) && mean.numel() == N && var.numel() == N,
             "batch_norm_backward: parameter or statistics shapes do not match ", x.shape());
  detail::count_traffic(x, dy, x, dy, dx);  // the column sums, then dx
  Backend<D>::batch_norm_backward(M, N, x.data(), gamma.empty() ? nullptr : gamma.data(),
                                  mean.data(), var.data(), eps, dy.data(), dx.data(),
                                  dgamma.empty() ? nullptr : dgamma.data(),
                                  dbeta.empty() ? nullptr : dbeta.data());
}

/// Σ x · log y over all elements, with 0 · log 0 = 0 (torch.xlogy), in double.
template <class T, class D>
double xlogy_sum(const TensorView<T, D>& x, const TensorView<T, D>& y) {
  detail::check_same_size("xlogy_sum", x, y);
  detail::count_traffic(x, y);
  return Backend<D>::xlogy_sum(x.numel(), x.data(), y.data());
}

}  // namespace moca::ops
