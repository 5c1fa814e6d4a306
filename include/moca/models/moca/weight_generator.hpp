// The dynamic prototype generators G^b (`encoder_pred`) and G^d (`decoder_pred`) of MOCA
// (spec §5): they map the codebook E [K, C] to unit-norm prototypes W [K, C_out]:
//   Z = l2norm(E);  H = ReLU(BN(Z W1ᵀ));  R = H W2ᵀ + b2;  S = Z (C = C_out) or Z Wsᵀ + bs
//   W = l2norm(R + S)
// BN runs in training mode over the K codebook rows. The logits of features f are κ · f Wᵀ
// with κ fixed (stored as the frozen parameter `scale`). Names follow the official state dict:
// encoder_pred.layers_w.0.generator.b0_fc.weight, ....b0_bn.*, ....b0_last_layer.*,
// decoder_pred.layers_w.0.skip.*, encoder_pred.scale.
#pragma once

#include <cstdint>
#include <vector>

#include "moca/core/profiler.hpp"
#include "moca/nn/batch_norm.hpp"
#include "moca/nn/linear.hpp"
#include "moca/ops.hpp"

namespace moca {

template <class T, class D = Cpu>
class WeightGenerator {
 public:
  static constexpr double kNormalizeEps = 1e-5;  // spec §11.4

  struct Generator {
    Linear<T, D> b0_fc;  ///< C → hidden, no bias
    BatchNorm1d<T, D> b0_bn;
    Linear<T, D> b0_last_layer;  ///< hidden → C_out
    template <class V>
    void visit(V&& v) {
      v("b0_fc", b0_fc);
      v("b0_bn", b0_bn);
      v("b0_last_layer", b0_last_layer);
    }
  };
  struct Layer {
    Generator generator;
    Linear<T, D> skip;  ///< C → C_out, only when the widths differ
    bool has_skip = false;
    template <class V>
    void visit(V&& v) {
      v("generator", generator);
      if (has_skip) v("skip", skip);
    }
  };

  Param<T, D> scale;            ///< κ, [1], frozen
  std::vector<Layer> layers_w;  ///< one layer (the reference's list has one element)

  WeightGenerator() = default;
  WeightGenerator(std::int64_t in_dim, std::int64_t hidden, std::int64_t out_dim, double kappa)
      : in_(in_dim), hidden_(hidden), out_(out_dim) {
    scale.declare({1}, Init::constant(kappa), /*trainable=*/false);
    Layer l;
    l.generator.b0_fc = Linear<T, D>(in_dim, hidden, /*with_bias=*/false);
    l.generator.b0_bn = BatchNorm1d<T, D>(hidden);
    l.generator.b0_last_layer = Linear<T, D>(hidden, out_dim);
    l.has_skip = in_dim != out_dim;
    if (l.has_skip) l.skip = Linear<T, D>(in_dim, out_dim);
    layers_w.push_back(std::move(l));
  }

  template <class V>
  void visit(V&& v) {
    v("scale", scale);
    v("layers_w", layers_w);
  }

  std::int64_t out_dim() const { return out_; }

  /// Prototypes for codebook E [K, C] (E is a constant: no gradient flows back into it).
  /// Returns W [K, C_out], valid until the next forward.
  TensorView<T, D> forward(const TensorView<T, D>& E) {
    MOCA_PROFILE_SCOPE("weight_generator");
    const std::int64_t K = E.size(0);
    Generator& g = layers_w[0].generator;
    z_.resize({K, in_});
    znorm_.resize({K});
    pre_.resize({K, hidden_});
    bn_.resize({K, hidden_});
    h_.resize({K, hidden_});
    sum_.resize({K, out_});
    w_.resize({K, out_});
    wnorm_.resize({K});
    ops::l2_normalize(E, kNormalizeEps, TensorView<T, D>(z_), TensorView<S, D>(znorm_));
    g.b0_fc.forward(z_, pre_);
    g.b0_bn.forward(pre_, bn_);
    ops::relu(TensorView<T, D>(bn_), TensorView<T, D>(h_));
    g.b0_last_layer.forward(h_, sum_);
    if (layers_w[0].has_skip) {
      layers_w[0].skip.forward(z_, w_);  // w_ as scratch for the skip branch
      ops::add(TensorView<T, D>(sum_), TensorView<T, D>(w_), TensorView<T, D>(sum_));
    } else {
      ops::add(TensorView<T, D>(sum_), TensorView<T, D>(z_), TensorView<T, D>(sum_));
    }
    ops::l2_normalize(TensorView<T, D>(sum_), kNormalizeEps, TensorView<T, D>(w_),
                      TensorView<S, D>(wnorm_));
    return w_;
  }

  /// Backpropagates dW (the gradient of the prototypes of the last forward) into the
  /// generator's parameters. dW is used as scratch.
  void backward(const TensorView<T, D>& dW) {
    MOCA_PROFILE_SCOPE("weight_generator");
    Generator& g = layers_w[0].generator;
    ops::l2_normalize_backward(TensorView<T, D>(w_), TensorView<S, D>(wnorm_), kNormalizeEps, dW,
                               dW);  // dW now holds d(R + S)
    if (layers_w[0].has_skip) layers_w[0].skip.backward(z_, dW, TensorView<T, D>());
    dh_.resize(h_.shape());
    g.b0_last_layer.backward(h_, dW, dh_);
    ops::relu_backward(TensorView<T, D>(bn_), TensorView<T, D>(dh_), TensorView<T, D>(dh_));
    g.b0_bn.backward(pre_, dh_, dh_);
    g.b0_fc.backward(z_, dh_, TensorView<T, D>());
  }

 private:
  using S = compute_t<T>;  // the rows' saved norms
  std::int64_t in_ = 0, hidden_ = 0, out_ = 0;
  Tensor<T, D> z_, pre_, bn_, h_, sum_, w_, dh_;
  Tensor<S, D> znorm_, wnorm_;
};

}  // namespace moca
