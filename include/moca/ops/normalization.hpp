// LayerNorm and row L2 normalisation over the last dimension.
#pragma once

#include "moca/ops/common.hpp"
#include "moca/ops/elementwise.hpp"

namespace moca::ops {

namespace norm_impl {

/// The shape checks of a LayerNorm forward named `what`: y like x, gamma and beta empty or one
/// value per column, mean and rstd one value per row.
template <class T, class D>
void check_forward(const char* what, const TensorView<T, D>& x, const TensorView<T, D>& gamma,
                   const TensorView<T, D>& beta, const TensorView<T, D>& y,
                   const TensorView<compute_t<T>, D>& mean,
                   const TensorView<compute_t<T>, D>& rstd) {
  const std::int64_t M = x.shape().leading(), N = x.shape().last();
  detail::check_same_shape(what, x, y);
  MOCA_CHECK(gamma.empty() || gamma.numel() == N, what, ": weight ", gamma.shape(),
             " does not match the last dimension of ", x.shape());
  MOCA_CHECK(beta.empty() || beta.numel() == N, what, ": bias ", beta.shape(),
             " does not match the last dimension of ", x.shape());
  MOCA_CHECK(mean.numel() == M && rstd.numel() == M, what, ": mean ", mean.shape(), " and rstd ",
             rstd.shape(), " must hold one value per row of ", x.shape());
}

/// The shape checks of a LayerNorm backward named `what`.
template <class T, class D>
void check_backward(const char* what, const TensorView<T, D>& x, const TensorView<T, D>& gamma,
                    const TensorView<compute_t<T>, D>& mean,
                    const TensorView<compute_t<T>, D>& rstd, const TensorView<T, D>& dy,
                    const TensorView<T, D>& dx, const TensorView<compute_t<T>, D>& dgamma,
                    const TensorView<compute_t<T>, D>& dbeta) {
  const std::int64_t M = x.shape().leading(), N = x.shape().last();
  detail::check_same_shape(what, x, dy);
  detail::check_same_shape(what, x, dx);
  MOCA_CHECK(gamma.empty() || gamma.numel() == N, what, ": weight ", gamma.shape(),
             " does not match ", x.shape());
  MOCA_CHECK(dgamma.empty() || dgamma.numel() == N, what, ": weight grad ", dgamma.shape(),
             " does not match ", x.shape());
  MOCA_CHECK(dbeta.empty() || dbeta.numel() == N, what, ": bias grad ", dbeta.shape(),
             " does not match ", x.shape());
  MOCA_CHECK(mean.numel() == M && rstd.numel() == M, what, ": mean ", mean.shape(), " and rstd ",
             rstd.shape(), " must hold one value per row of ", x.shape());
}

/// A backend with the fused residual + LayerNorm kernels. The statistics and the parameter
/// gradients are compute_t<T>, as in the unfused calls.
template <class T, class D>
concept ResidualNormBackend = requires(std::int64_t n, double e, const T* c, T* p,
                                       const compute_t<T>* cs, compute_t<T>* ps) {
  Backend<D>::add_layer_norm_forward(n, n, c, c, c, c, e, p, p, ps, ps);
  Backend<D>::layer_norm_backward_add(n, n, c, c, cs, cs, c, c, p, ps, ps);
};

}  // namespace norm_impl

/// y = (x - mean) / sqrt(var + eps) · gamma + beta over the last dimension (biased variance).
/// Saves mean and rstd (one value per row) for the backward pass, in compute_t<T>: float for a
/// bf16 x, as PyTorch's autocast keeps them, since a mean rounded to bf16 would shift every x̂ of
/// its row by up to half a bf16 step of the mean. gamma and beta may be empty views (no affine
/// transform).
template <class T, class D>
void layer_norm(const TensorView<T, D>& x, const TensorView<T, D>& gamma,
                const TensorView<T, D>& beta, double eps, const TensorView<T, D>& y,
                const TensorView<compute_t<T>, D>& mean, const TensorView<compute_t<T>, D>& rstd) {
  norm_impl::check_forward("layer_norm", x, gamma, beta, y, mean, rstd);
  const std::int64_t M = x.shape().leading(), N = x.shape().last();
  detail::count_traffic(x, gamma, beta, y, mean, rstd);
  Backend<D>::layer_norm_forward(M, N, x.data(), gamma.empty() ? nullptr : gamma.data(),
                                 beta.empty() ? nullptr : beta.data(), eps, y.data(), mean.data(),
                                 rstd.data());
}

/// LayerNorm backward: writes dx (may alias dy), accumulates into dgamma and dbeta (either may be
/// an empty view to skip it), which are compute_t<T> like the parameters' gradients (grad_t).
template <class T, class D>
void layer_norm_backward(const TensorView<T, D>& x, const TensorView<T, D>& gamma,
                         const TensorView<compute_t<T>, D>& mean,
                         const TensorView<compute_t<T>, D>& rstd, const TensorView<T, D>& dy,
                         const TensorView<T, D>& dx, const TensorView<compute_t<T>, D>& dgamma,
                         const TensorView<compute_t<T>, D>& dbeta) {
  norm_impl::check_backward("layer_norm_backward", x, gamma, mean, rstd, dy, dx, dgamma, dbeta);
  const std::int64_t M = x.shape().leading(), N = x.shape().last();
  detail::count_traffic(x, gamma, mean, rstd, dy, dx, dgamma, dgamma, dbeta, dbeta);
  Backend<D>::layer_norm_backward(M, N, x.data(), gamma.empty() ? nullptr : gamma.data(),
                                  mean.data(), rstd.data(), dy.data(), dx.data(),
                                  dgamma.empty() ? nullptr : dgamma.data(),
                                  dbeta.empty() ? nullptr : dbeta.data());
}

/// sum = x + add, y = layer_norm(sum): a residual stream and the LayerNorm that reads it, in one
/// pass where the backend fuses them (the CPU and CUDA), else as ops::add then ops::layer_norm. sum
/// may alias x or add; y must not alias any of them.
template <class T, class D>
void add_layer_norm(const TensorView<T, D>& x, const TensorView<T, D>& add,
                    const TensorView<T, D>& gamma, const TensorView<T, D>& beta, double eps,
                    const TensorView<T, D>& sum, const TensorView<T, D>& y,
                    const TensorView<compute_t<T>, D>& mean,
                    const TensorView<compute_t<T>, D>& rstd) {
  detail::check_same_shape("add_layer_norm", x, add);
  detail::check_same_shape("add_layer_norm", x, sum);
  if constexpr (norm_impl::ResidualNormBackend<T, D>) {
    norm_impl::check_forward("add_layer_norm", x, gamma, beta, y, mean, rstd);
    const std::int64_t M = x.shape().leading(), N = x.shape().last();
    detail::count_traffic(x, add, gamma, beta, sum, y, mean, rstd);
    Backend<D>::add_layer_norm_forward(M, N, x.data(), add.data(),
                                       gamma.empty() ? nullptr : gamma.data(),
                                       beta.empty() ? nullptr : beta.data(), eps, sum.data(),
                                       y.data(), mean.data(), rstd.data());
  } else {
    ops::add(x, add, sum);
    layer_norm(sum, gamma, beta, eps, y, mean, rstd);
  }
}

/// dx = residual + (the LayerNorm backward of dy): a residual branch's gradient joined to the
/// gradient through its LayerNorm, in one pass where the backend fuses them. dx may alias dy but
/// not residual; dgamma and dbeta accumulate as in layer_norm_backward.
template <class T, class D>
void layer_norm_backward_add(const TensorView<T, D>& x, const TensorView<T, D>& gamma,
                             const TensorView<compute_t<T>, D>& mean,
                             const TensorView<compute_t<T>, D>& rstd, const TensorView<T, D>& dy,
                             const TensorView<T, D>& residual, const TensorView<T, D>& dx,
                             const TensorView<compute_t<T>, D>& dgamma,
                             const TensorView<compute_t<T>, D>& dbeta) {
  detail::check_same_shape("layer_norm_backward_add", x, residual);
  MOCA_CHECK(dx.data() != residual.data(),
             "layer_norm_backward_add: dx must not alias residual (it may alias dy)");
  if constexpr (norm_impl::ResidualNormBackend<T, D>) {
    norm_impl::check_backward("layer_norm_backward_add", x, gamma, mean, rstd, dy, dx, dgamma,
                              dbeta);
    const std::int64_t M = x.shape().leading(), N = x.shape().last();
    detail::count_traffic(x, gamma, mean, rstd, dy, residual, dx, dgamma, dgamma, dbeta, dbeta);
    Backend<D>::layer_norm_backward_add(M, N, x.data(), gamma.empty() ? nullptr : gamma.data(),
                                        mean.data(), rstd.data(), dy.data(), residual.data(),
                                        dx.data(), dgamma.empty() ? nullptr : dgamma.data(),
                                        dbeta.empty() ? nullptr : dbeta.data());
  } else {
    layer_norm_backward(x, gamma, mean, rstd, dy, dx, dgamma, dbeta);
    ops::add(dx, residual, dx);
  }
}

/// y = x / max(||x||₂, eps) over the last dimension; saves norm (one ||x||₂ per row, in
/// compute_t<T> as LayerNorm's statistics).
/// The MOCA codebook and prototype generators use eps = 1e-5.
template <class T, class D>
void l2_normalize(const TensorView<T, D>& x, double eps, const TensorView<T, D>& y,
                  const TensorView<compute_t<T>, D>& norm) {
  detail::check_same_shape("l2_normalize", x, y);
  MOCA_CHECK(norm.numel() == x.shape().leading(), "l2_normalize: norm ", norm.shape(),
             " must hold one value per row of ", x.shape());
  detail::count_traffic(x, y, norm);
  Backend<D>::l2_normalize_rows_forward(x.shape().leading(), x.shape().last(), x.data(), eps,
                                        y.data(), norm.data());
}

/// x = x / max(||x||₁, eps) over the last dimension, in place (torch.nn.functional.normalize
/// with p = 1): the MOCA codebook's bag-of-words targets.
template <class T, class D>
void l1_normalize(const TensorView<T, D>& x, double eps) {
  detail::count_traffic(x, x);
  Backend<D>::l1_normalize_rows(x.shape().leading(), x.shape().last(), eps, x.data());
}

/// Backward of l2_normalize from its output y and saved norm; dx may alias dy.
template <class T, class D>
void l2_normalize_backward(const TensorView<T, D>& y, const TensorView<compute_t<T>, D>& norm,
                           double eps, const TensorView<T, D>& dy, const TensorView<T, D>& dx) {
  detail::check_same_shape("l2_normalize_backward", y, dy);
  detail::check_same_shape("l2_normalize_backward", y, dx);
  MOCA_CHECK(norm.numel() == y.shape().leading(), "l2_normalize_backward: norm ", norm.shape(),
             " must hold one value per row of ", y.shape());
  detail::count_traffic(y, norm, dy, dx);
  Backend<D>::l2_normalize_rows_backward(y.shape().leading(), y.shape().last(), y.data(),
                                         norm.data(), eps, dy.data(), dx.data());
}

}  // namespace moca::ops
