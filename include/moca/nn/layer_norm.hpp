// LayerNorm over the last dimension (torch.nn.LayerNorm: biased variance, affine weight/bias).
#pragma once

#include <cstdint>
#include <utility>

#include "moca/core/profiler.hpp"
#include "moca/nn/parameter.hpp"
#include "moca/ops.hpp"

namespace moca {

/// Normalises each row of x [..., dim]. The ViT presets use eps = 1e-6 (spec §1.4).
/// Saves the per-row mean and 1/std of the last forward for backward, in compute_t<T> (float for
/// bf16 x, as under PyTorch's autocast).
template <class T, class D = Cpu>
class LayerNorm {
 public:
  Param<T, D> weight;  ///< [dim], starts at 1
  Param<T, D> bias;    ///< [dim], starts at 0

  LayerNorm() = default;
  explicit LayerNorm(std::int64_t dim, double eps = 1e-6) : dim_(dim), eps_(eps) {
    weight.declare({dim}, Init::ones());
    bias.declare({dim}, Init::zeros());
  }

  template <class V>
  void visit(V&& v) {
    v("weight", weight);
    v("bias", bias);
  }

  std::int64_t dim() const { return dim_; }
  double eps() const { return eps_; }

  void forward(const TensorView<T, D>& x, const TensorView<T, D>& y) {
    MOCA_PROFILE_SCOPE("layer_norm");
    const std::int64_t rows = x.shape().leading();
    mean_.resize({rows});
    rstd_.resize({rows});
    ops::layer_norm(x, weight.value, bias.value, eps_, y, mean_, rstd_);
  }

  /// x is the input of the last forward. Writes dx (may alias dy); accumulates parameter grads.
  void backward(const TensorView<T, D>& x, const TensorView<T, D>& dy, const TensorView<T, D>& dx) {
    MOCA_PROFILE_SCOPE("layer_norm");
    ops::layer_norm_backward(x, weight.value, mean_, rstd_, dy, dx, weight.grad, bias.grad);
  }

  /// The pre-norm residual step: sum = x + add (may alias either), y = LayerNorm(sum).
  void forward_add(const TensorView<T, D>& x, const TensorView<T, D>& add,
                   const TensorView<T, D>& sum, const TensorView<T, D>& y) {
    MOCA_PROFILE_SCOPE("layer_norm");
    const std::int64_t rows = x.shape().leading();
    mean_.resize({rows});
    rstd_.resize({rows});
    ops::add_layer_norm(x, add, weight.value, bias.value, eps_, sum, y, mean_, rstd_);
  }

  /// Its backward: dx = residual + the gradient through this norm of dy (x is the sum of the
  /// last forward_add); dx may alias dy, not residual.
  void backward_add(const TensorView<T, D>& x, const TensorView<T, D>& dy,
                    const TensorView<T, D>& residual, const TensorView<T, D>& dx) {
    MOCA_PROFILE_SCOPE("layer_norm");
    ops::layer_norm_backward_add(x, weight.value, mean_, rstd_, dy, residual, dx, weight.grad,
                                 bias.grad);
  }

  /// Trades mean and rstd with another LayerNorm (see SwapsBuffers).
  void swap_buffers(LayerNorm& other) noexcept {
    std::swap(mean_, other.mean_);
    std::swap(rstd_, other.rstd_);
  }

 private:
  std::int64_t dim_ = 0;
  double eps_ = 1e-6;
  Tensor<compute_t<T>, D> mean_, rstd_;
};

}  // namespace moca
