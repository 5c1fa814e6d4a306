// Elementwise activations as policies: a type with static forward(x, y) and backward(x, dy, dx).
// Mlp<T, D, Activation> takes one; a custom activation is a struct with the same two functions.
#pragma once

#include "moca/core/profiler.hpp"
#include "moca/ops.hpp"

namespace moca {

/// The exact (erf) GELU used by ViT and timm's Mlp.
struct Gelu {
  static constexpr const char* name = "gelu";
  template <class T, class D>
  static void forward(const TensorView<T, D>& x, const TensorView<T, D>& y) {
    MOCA_PROFILE_SCOPE(name);
    ops::gelu(x, y);
  }
  template <class T, class D>
  static void backward(const TensorView<T, D>& x, const TensorView<T, D>& dy,
                       const TensorView<T, D>& dx) {
    MOCA_PROFILE_SCOPE(name);
    ops::gelu_backward(x, dy, dx);
  }
};

/// max(x, 0).
struct Relu {
  static constexpr const char* name = "relu";
  template <class T, class D>
  static void forward(const TensorView<T, D>& x, const TensorView<T, D>& y) {
    MOCA_PROFILE_SCOPE(name);
    ops::relu(x, y);
  }
  template <class T, class D>
  static void backward(const TensorView<T, D>& x, const TensorView<T, D>& dy,
                       const TensorView<T, D>& dx) {
    MOCA_PROFILE_SCOPE(name);
    ops::relu_backward(x, dy, dx);
  }
};

}  // namespace moca
