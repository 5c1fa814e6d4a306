// BatchNorm1d in training mode (torch.nn.BatchNorm1d semantics, as MOCA's prototype generators
// use it: statistics of the current batch, gradients through them, running statistics updated
// but not used).
#pragma once

#include <cstdint>
#include <type_traits>

#include "moca/core/profiler.hpp"
#include "moca/nn/parameter.hpp"
#include "moca/ops.hpp"

namespace moca {

template <class T, class D = Cpu>
class BatchNorm1d {
 public:
  Param<T, D> weight, bias;               ///< [features], 1 and 0 at start
  Param<T, D> running_mean, running_var;  ///< [features], frozen buffers, 0 and 1 at start
  std::int64_t num_batches_tracked = 0;   ///< torch's counter (checkpointed as int64)

  BatchNorm1d() = default;
  explicit BatchNorm1d(std::int64_t features, double eps = 1e-5, double momentum = 0.1)
      : features_(features), eps_(eps), momentum_(momentum) {
    weight.declare({features}, Init::ones());
    bias.declare({features}, Init::zeros());
    running_mean.declare({features}, Init::zeros(), false);
    running_var.declare({features}, Init::ones(), false);
  }

  template <class V>
  void visit(V&& v) {
    v("weight", weight);
    v("bias", bias);
    v("running_mean", running_mean);
    v("running_var", running_var);
  }

  /// x [M, features] → y, normalised with the batch's statistics; updates the running ones
  /// (unbiased variance, momentum 0.1) unless `update_running` is false.
  void forward(const TensorView<T, D>& x, const TensorView<T, D>& y, bool update_running = true) {
    MOCA_PROFILE_SCOPE("batch_norm");
    mean_.resize({features_});
    var_.resize({features_});
    ops::batch_norm(x, weight.value, bias.value, eps_, y, mean_, var_);
    if (update_running) {
      const auto M = static_cast<double>(x.shape().leading());
      track(mean_, momentum_, running_mean.value);
      track(var_, momentum_ * M / (M > 1 ? M - 1 : 1), running_var.value);
      ++num_batches_tracked;
    }
  }

  /// x is the input of the last forward; writes dx, accumulates weight and bias gradients.
  void backward(const TensorView<T, D>& x, const TensorView<T, D>& dy, const TensorView<T, D>& dx) {
    MOCA_PROFILE_SCOPE("batch_norm");
    ops::batch_norm_backward(x, weight.value, TensorView<S, D>(mean_), TensorView<S, D>(var_), eps_,
                             dy, dx, weight.grad, bias.grad);
  }

 private:
  using S = compute_t<T>;  // the batch statistics' type: float for bf16 x

  /// running ← (1 − momentum) · running + a · batch, the batch statistic rounded to T first.
  void track(const Tensor<S, D>& batch, double a, const TensorView<T, D>& running) {
    if constexpr (std::is_same_v<S, T>) {
      ops::axpby(T(a), TensorView<T, D>(batch), T(1 - momentum_), running);
    } else {
      rounded_.resize(batch.shape());
      ops::convert(TensorView<S, D>(batch), TensorView<T, D>(rounded_));
      ops::axpby(T(a), TensorView<T, D>(rounded_), T(1 - momentum_), running);
    }
  }

  std::int64_t features_ = 0;
  double eps_ = 1e-5, momentum_ = 0.1;
  Tensor<S, D> mean_, var_;
  Tensor<T, D> rounded_;  // a bf16 model's batch statistic in T, for the running update
};

}  // namespace moca
