// Linear: y = x · Wᵀ + b, with W stored [out, in] as in PyTorch (state-dict compatible as is).
#pragma once

#include <cstdint>

#include "moca/core/profiler.hpp"
#include "moca/nn/parameter.hpp"
#include "moca/ops.hpp"

namespace moca {

/// A fully connected layer over the last dimension: x [..., in] → y [..., out].
/// Initialisation (spec §1.6): Xavier-uniform weight, zero bias.
template <class T, class D = Cpu>
class Linear {
 public:
  Param<T, D> weight;  ///< [out, in]
  Param<T, D> bias;    ///< [out], absent when constructed without bias

  Linear() = default;
  Linear(std::int64_t in_features, std::int64_t out_features, bool with_bias = true)
      : in_(in_features), out_(out_features), has_bias_(with_bias) {
    weight.declare({out_features, in_features},
                   Init::xavier_uniform(static_cast<double>(in_features),
                                        static_cast<double>(out_features)));
    if (with_bias) bias.declare({out_features}, Init::zeros());
  }

  template <class V>
  void visit(V&& v) {
    v("weight", weight);
    if (has_bias_) v("bias", bias);
  }

  std::int64_t in_features() const { return in_; }
  std::int64_t out_features() const { return out_; }
  bool has_bias() const { return has_bias_; }

  /// y = x · Wᵀ + b
  void forward(const TensorView<T, D>& x, const TensorView<T, D>& y) const {
    MOCA_PROFILE_SCOPE("linear");
    if (has_bias_) {
      ops::gemm_bias(x, Trans::N, weight.value, Trans::T, bias.value, y);
    } else {
      ops::gemm(x, Trans::N, weight.value, Trans::T, y);
    }
  }

  /// y = x · Wᵀ + b + residual (a product that ends a residual branch; y must not be the
  /// residual). The backward is the plain Linear's: the residual's gradient is the caller's.
  void forward_add(const TensorView<T, D>& x, const TensorView<T, D>& residual,
                   const TensorView<T, D>& y) const {
    MOCA_PROFILE_SCOPE("linear");
    if (has_bias_) {
      ops::gemm_bias_residual(x, Trans::N, weight.value, Trans::T, bias.value, residual, y);
    } else {
      ops::gemm(x, Trans::N, weight.value, Trans::T, y);
      ops::add(y, residual, y);
    }
  }

  /// Accumulates dW += dyᵀ · x and db += Σ dy; writes dx = dy · W (or adds it, with
  /// `accumulate_dx`). dx may be an empty view when the input needs no gradient.
  void backward(const TensorView<T, D>& x, const TensorView<T, D>& dy, const TensorView<T, D>& dx,
                bool accumulate_dx = false) const {
    MOCA_PROFILE_SCOPE("linear");
    if (!weight.grad.empty() && has_bias_ && !bias.grad.empty()) {
      ops::linear_grads(dy, x, weight.grad, bias.grad);
    } else {
      if (!weight.grad.empty()) ops::gemm(dy, Trans::T, x, Trans::N, weight.grad, 1, 1);
      if (has_bias_ && !bias.grad.empty()) ops::sum(dy.matrix(), 0, bias.grad, 1, 1);
    }
    if (!dx.empty()) ops::gemm(dy, Trans::N, weight.value, Trans::N, dx, 1, accumulate_dx ? 1 : 0);
  }

 private:
  std::int64_t in_ = 0, out_ = 0;
  bool has_bias_ = true;
};

}  // namespace moca
