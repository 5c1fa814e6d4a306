// The transformer MLP: fc1 → activation → fc2 (timm's Mlp, names fc1/fc2).
#pragma once

#include <cstdint>
#include <utility>

#include "moca/nn/activation.hpp"
#include "moca/nn/linear.hpp"

namespace moca {

template <class T, class D = Cpu, class Activation = Gelu>
class Mlp {
 public:
  Linear<T, D> fc1, fc2;

  Mlp() = default;
  Mlp(std::int64_t dim, std::int64_t hidden) : fc1(dim, hidden), fc2(hidden, dim) {}

  template <class V>
  void visit(V&& v) {
    v("fc1", fc1);
    v("fc2", fc2);
  }

  /// x [..., dim] → y [..., dim]
  void forward(const TensorView<T, D>& x, const TensorView<T, D>& y) { fc2.forward(hidden(x), y); }

  /// y = residual + MLP(x), the residual added as fc2 stores y (y must not be the residual);
  /// backward as after forward.
  void forward_add(const TensorView<T, D>& x, const TensorView<T, D>& residual,
                   const TensorView<T, D>& y) {
    fc2.forward_add(hidden(x), residual, y);
  }

  /// x is the input of the last forward; writes dx, accumulates parameter gradients.
  void backward(const TensorView<T, D>& x, const TensorView<T, D>& dy, const TensorView<T, D>& dx) {
    grad_.resize(pre_.shape());
    fc2.backward(act_, dy, grad_);
    Activation::backward(TensorView<T, D>(pre_), TensorView<T, D>(grad_), TensorView<T, D>(grad_));
    fc1.backward(x, grad_, dx);
  }

  /// Trade buffers with another Mlp (see SwapsBuffers, SwapsScratch).
  void swap_buffers(Mlp& other) noexcept {
    std::swap(pre_, other.pre_);
    std::swap(act_, other.act_);
  }
  void swap_scratch(Mlp& other) noexcept { std::swap(grad_, other.grad_); }

 private:
  // The hidden layer, activation(fc1(x)), kept (with fc1's output) for backward.
  TensorView<T, D> hidden(const TensorView<T, D>& x) {
    const Shape h{x.shape().leading(), fc1.out_features()};
    pre_.resize(h);
    act_.resize(h);
    fc1.forward(x, pre_);
    Activation::forward(TensorView<T, D>(pre_), TensorView<T, D>(act_));
    return act_;
  }

  Tensor<T, D> pre_, act_, grad_;  // fc1 output, activation output, gradient scratch
};

}  // namespace moca
