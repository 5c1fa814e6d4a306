// The pre-norm transformer block (timm's Block; spec §1.4):
//   y = x + Attn(LN1(x));  out = y + MLP(LN2(y))
// Parts are policies checked by concepts, so a researcher can swap one:
//   using ReluBlock = Block<float, Cpu, MultiHeadAttention<float>, Mlp<float, Cpu, Relu>>;
#pragma once

#include <cstdint>
#include <utility>

#include "moca/core/profiler.hpp"
#include "moca/nn/attention.hpp"
#include "moca/nn/concepts.hpp"
#include "moca/nn/layer_norm.hpp"
#include "moca/nn/mlp.hpp"

namespace moca {

template <class T, class D = Cpu, class Attention = MultiHeadAttention<T, D>,
          class MlpT = Mlp<T, D, Gelu>, class Norm = LayerNorm<T, D>>
  requires AttentionLayer<Attention, T, D> && MlpLayer<MlpT, T, D> && NormLayer<Norm, T, D>
class Block {
 public:
  Norm norm1;
  Attention attn;
  Norm norm2;
  MlpT mlp;

  Block() = default;
  explicit Block(const BlockConfig& c)
      : norm1(c.dim, c.norm_eps),
        attn(c.dim, c.heads),
        norm2(c.dim, c.norm_eps),
        mlp(c.dim, c.mlp_hidden) {}

  template <class V>
  void visit(V&& v) {
    v("norm1", norm1);
    v("attn", attn);
    v("norm2", norm2);
    v("mlp", mlp);
  }

  /// x [B, T, dim] → out [B, T, dim] (out must not alias x: backward reads x).
  void forward(const TensorView<T, D>& x, const TensorView<T, D>& out) {
    MOCA_PROFILE_SCOPE("residual");
    n1_.resize(x.shape());
    mid_.resize(x.shape());
    n2_.resize(x.shape());
    norm1.forward(x, n1_);
    attn.forward(n1_, mid_);
    if constexpr (ResidualNorm<Norm, T, D>) {  // mid = x + attn and n2 = LN2(mid), one pass
      norm2.forward_add(x, mid_, mid_, n2_);
    } else {
      ops::add(x, TensorView<T, D>(mid_), TensorView<T, D>(mid_));
      norm2.forward(mid_, n2_);
    }
    if constexpr (ResidualMlp<MlpT, T, D>) {  // out = mid + mlp, added as fc2 stores out
      mlp.forward_add(n2_, mid_, out);
    } else {
      mlp.forward(n2_, out);
      ops::add(out, TensorView<T, D>(mid_), out);
    }
  }

  /// x is the input of the last forward; writes dx (may alias dout), accumulates parameter grads.
  void backward(const TensorView<T, D>& x, const TensorView<T, D>& dout,
                const TensorView<T, D>& dx) {
    MOCA_PROFILE_SCOPE("residual");
    dmid_.resize(x.shape());
    scratch_.resize(x.shape());
    // out = mid + mlp(LN2(mid)): dmid = dout + LN2ᵀ(MLPᵀ(dout))
    mlp.backward(n2_, dout, scratch_);
    if constexpr (ResidualNorm<Norm, T, D>) {
      norm2.backward_add(mid_, scratch_, dout, dmid_);
    } else {
      norm2.backward(mid_, scratch_, scratch_);
      ops::add(dout, TensorView<T, D>(scratch_), TensorView<T, D>(dmid_));
    }
    // mid = x + attn(LN1(x)): dx = dmid + LN1ᵀ(Attnᵀ(dmid))
    attn.backward(n1_, dmid_, scratch_);
    if constexpr (ResidualNorm<Norm, T, D>) {
      norm1.backward_add(x, scratch_, dmid_, dx);
    } else {
      norm1.backward(x, scratch_, scratch_);
      ops::add(TensorView<T, D>(dmid_), TensorView<T, D>(scratch_), dx);
    }
  }

  /// Trade buffers with another block, its layers' included where they can (see SwapsBuffers,
  /// SwapsScratch).
  void swap_buffers(Block& other) noexcept {
    std::swap(n1_, other.n1_);
    std::swap(mid_, other.mid_);
    std::swap(n2_, other.n2_);
    swap_buffers_if_possible(norm1, other.norm1);
    swap_buffers_if_possible(attn, other.attn);
    swap_buffers_if_possible(norm2, other.norm2);
    swap_buffers_if_possible(mlp, other.mlp);
  }
  void swap_scratch(Block& other) noexcept {
    std::swap(dmid_, other.dmid_);
    std::swap(scratch_, other.scratch_);
    swap_scratch_if_possible(norm1, other.norm1);
    swap_scratch_if_possible(attn, other.attn);
    swap_scratch_if_possible(norm2, other.norm2);
    swap_scratch_if_possible(mlp, other.mlp);
  }

 private:
  Tensor<T, D> n1_, mid_, n2_;     // saved by forward: LN1(x), x + attn, LN2(mid)
  Tensor<T, D> dmid_, scratch_;    // backward scratch
};

}  // namespace moca
