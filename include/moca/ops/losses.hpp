// Soft-target cross-entropy / KL divergence of logit rows, fused with the gradient and with the
// gather of the target rows:
//
//   double sum = ops::soft_target_loss(z, targets, &rows, /*entropy=*/true, s, dz, workspace);
//     sum = Σ_r Σ_k t_rk·(log t_rk − log softmax(z_r)_k), t_r = targets[rows[r]] (0·log 0 = 0)
//     dz_r = s·(softmax(z_r) − t_r)                       (dz may alias z; empty dz: no gradient)
//   auto ticket = ops::soft_target_loss(z, targets, &rows, true, s, dz, workspace, values, n);
//     the same, sum / n read later with the other values of `values` (PendingValues)
//
// Without `entropy` the sum is the cross-entropy; the gradient is the same (targets sum to 1).
// A backend that provides soft_target_rows does it in one pass per row (the CPU and CUDA
// backends); any other backend runs the composed form below, whose buffers live in `workspace`.
#pragma once

#include <concepts>
#include <cstdint>
#include <type_traits>

#include "moca/core/profiler.hpp"
#include "moca/core/tensor.hpp"
#include "moca/ops/common.hpp"
#include "moca/ops/elementwise.hpp"
#include "moca/ops/index.hpp"
#include "moca/ops/reduce.hpp"
#include "moca/ops/softmax.hpp"
#include "moca/ops/stats.hpp"

namespace moca::ops {

/// Buffers of the composed form (untouched by backends with the fused kernel).
template <class T, class D>
struct SoftTargetWorkspace {
  Tensor<T, D> gathered, work, total;
};

namespace soft_target_impl {

template <class T, class D>
concept FusedBackend = requires(std::int64_t n, const T* c, const std::int32_t* i, T s, T* p) {
  { Backend<D>::soft_target_rows(n, n, c, c, n, i, true, s, p) } -> std::convertible_to<double>;
};

template <class T, class D>
concept DeferredBackend = FusedBackend<T, D> &&
    requires(std::int64_t n, const T* c, const std::int32_t* i, T s, T* p, double* partial) {
  { Backend<D>::sum_partials(n) } -> std::convertible_to<std::int64_t>;
  Backend<D>::soft_target_rows_partials(n, n, c, c, n, i, true, s, p, partial);
};

template <class T, class D>
double composed(const TensorView<T, D>& z, const TensorView<T, D>& targets, bool entropy,
                T s, const TensorView<T, D>& dz, SoftTargetWorkspace<T, D>& ws) {
  ws.work.resize(z.shape());
  ws.total.resize({1});
  const TensorView<T, D> work = ws.work;
  log_softmax(z, work);
  mul(work, targets, work);
  sum(work.flat(), 0, TensorView<T, D>(ws.total));
  T host = 0;
  copy(TensorView<T, D>(ws.total), TensorView<T, Cpu>(&host, Shape{1}));
  double result = -static_cast<double>(host);
  if (entropy) result += xlogy_sum(targets, targets);
  if (dz.data() != nullptr) {
    softmax(z, dz);
    axpby(T(-s), targets, s, dz);
  }
  return result;
}

}  // namespace soft_target_impl

namespace soft_target_impl {
template <class T, class D>
void check(const TensorView<T, D>& z, const TensorView<T, D>& targets,
           const TensorView<Index, D>* rows, const TensorView<T, D>& dz) {
  MOCA_CHECK(z.rank() >= 1 && targets.rank() >= 1 && z.shape().last() == targets.shape().last(),
             "soft_target_loss: logits ", z.shape(), " and targets ", targets.shape(),
             " need the same last dimension");
  const std::int64_t M = z.shape().leading();
  if (rows) {
    MOCA_CHECK(rows->numel() == M, "soft_target_loss: ", rows->numel(), " target rows for ", M,
               " rows of logits ", z.shape());
  } else {
    MOCA_CHECK(targets.shape() == z.shape(), "soft_target_loss: logits ", z.shape(),
               " and targets ", targets.shape(), " differ");
  }
  MOCA_CHECK(dz.data() == nullptr || dz.shape() == z.shape(), "soft_target_loss: gradient ",
             dz.shape(), " differs from logits ", z.shape());
}
}  // namespace soft_target_impl

/// See the file comment. z [M, K]; targets [R, K] read through `rows` ([M] indices into targets,
/// on the device) or, with rows null, [M, K] row by row; dz [M, K] or empty.
template <class T, class D>
double soft_target_loss(const TensorView<T, D>& z, const TensorView<T, D>& targets,
                        const std::type_identity_t<TensorView<Index, D>>* rows, bool entropy,
                        Scalar<T> grad_scale, const std::type_identity_t<TensorView<T, D>>& dz,
                        SoftTargetWorkspace<T, D>& workspace) {
  soft_target_impl::check(z, targets, rows, dz);
  const std::int64_t M = z.shape().leading(), K = z.shape().last();
  if constexpr (soft_target_impl::FusedBackend<T, D>) {
    // The kernel reads target rows unchecked: host indices are checked here.
    if constexpr (std::is_same_v<D, Cpu>) {
      if (rows) {
        const std::int64_t R = targets.shape().leading();
        for (std::int64_t r = 0; r < M; ++r)
          MOCA_CHECK(rows->data()[r] >= 0 && rows->data()[r] < R,
                     "soft_target_loss: target row ", rows->data()[r], " (at ", r,
                     ") outside the ", R, " rows of targets ", targets.shape());
      }
    }
    detail::count_traffic(z, z, dz);  // the logits, as many target values, the gradient
    if (rows) detail::count_traffic(*rows);
    return Backend<D>::soft_target_rows(M, K, z.data(), targets.data(),
                                        targets.shape().leading(),
                                        rows ? rows->data() : nullptr, entropy, T(grad_scale),
                                        dz.data());
  } else {
    if (!rows) return soft_target_impl::composed(z, targets, entropy, T(grad_scale), dz, workspace);
    workspace.gathered.resize(z.shape());
    gather_rows(targets.reshape({targets.shape().leading(), K}), *rows,
                TensorView<T, D>(workspace.gathered).reshape({M, K}));
    return soft_target_impl::composed(z, TensorView<T, D>(workspace.gathered), entropy,
                                      T(grad_scale), dz, workspace);
  }
}

/// The same with the sum, over `divisor`, as a value of `into` (read with the set's other values):
/// the same total, without waiting for the device here.
template <class T, class D>
typename PendingValues<D>::Ticket soft_target_loss(
    const TensorView<T, D>& z, const TensorView<T, D>& targets,
    const std::type_identity_t<TensorView<Index, D>>* rows, bool entropy, Scalar<T> grad_scale,
    const std::type_identity_t<TensorView<T, D>>& dz, SoftTargetWorkspace<T, D>& workspace,
    PendingValues<D>& into, double divisor = 1.0) {
  if constexpr (soft_target_impl::DeferredBackend<T, D>) {
    soft_target_impl::check(z, targets, rows, dz);
    const std::int64_t M = z.shape().leading(), K = z.shape().last();
    detail::count_traffic(z, z, dz);
    if (rows) detail::count_traffic(*rows);
    auto [ticket, partial] = into.partial_sums(Backend<D>::sum_partials(M), divisor);
    Backend<D>::soft_target_rows_partials(M, K, z.data(), targets.data(), targets.shape().leading(),
                                          rows ? rows->data() : nullptr, entropy, T(grad_scale),
                                          dz.data(), partial);
    return ticket;
  } else {
    return into.known(soft_target_loss(z, targets, rows, entropy, grad_scale, dz, workspace),
                      divisor);
  }
}

}  // namespace moca::ops
