// The plug points of a transformer block, as concepts: a wrong plug fails with one line naming
// the concept it does not satisfy.
//
// A sequence layer maps x [B, T, dim] to y of the same shape, keeps what its backward needs,
// and lists its parameters for the visitor:
//   void forward(const TensorView<T, D>& x, const TensorView<T, D>& y);
//   void backward(const TensorView<T, D>& x, const TensorView<T, D>& dy, const TensorView<T, D>& dx);
//   template <class V> void visit(V&&);
#pragma once

#include <concepts>
#include <cstdint>
#include <string_view>

#include "moca/core/tensor.hpp"
#include "moca/nn/parameter.hpp"

namespace moca {

namespace detail {
/// A visitor that accepts anything: used only to check that visit() exists.
struct AnyVisitor {
  template <class X>
  void operator()(std::string_view, X&) const {}
};
}  // namespace detail

template <class L, class T, class D>
concept SequenceLayer = requires(L layer, const TensorView<T, D>& x) {
  layer.forward(x, x);
  layer.backward(x, x, x);
  layer.visit(detail::AnyVisitor{});
};

/// A layer whose buffers can be traded with another layer of its type: a.swap_buffers(b) trades
/// what forward keeps for backward, a.swap_scratch(b) what backward only uses while it runs. A
/// ViT lends block 0's to every block in turn: its kept buffers in an inference forward
/// (VisionTransformer::forward_inference), its scratch in every backward. A layer without them
/// keeps its own, which is correct, only larger.
template <class L>
concept SwapsBuffers = requires(L& a, L& b) { a.swap_buffers(b); };
template <class L>
concept SwapsScratch = requires(L& a, L& b) { a.swap_scratch(b); };

/// a.swap_buffers(b) where the layer has it; nothing otherwise.
template <class L>
void swap_buffers_if_possible(L& a, L& b) {
  if constexpr (SwapsBuffers<L>) a.swap_buffers(b);
}
/// a.swap_scratch(b) where the layer has it; nothing otherwise.
template <class L>
void swap_scratch_if_possible(L& a, L& b) {
  if constexpr (SwapsScratch<L>) a.swap_scratch(b);
}

/// A normalisation layer, constructed as Norm(dim, eps).
template <class N, class T, class D>
concept NormLayer = SequenceLayer<N, T, D> && std::constructible_from<N, std::int64_t, double>;

/// A norm that can also take its residual step in the same pass (LayerNorm does):
///   forward_add(x, add, sum, y): sum = x + add, y = norm(sum);
///   backward_add(sum, dy, residual, dx): dx = residual + norm's input gradient of dy.
/// A Block uses these when its Norm has them, and ops::add around forward/backward otherwise.
template <class N, class T, class D>
concept ResidualNorm = NormLayer<N, T, D> && requires(N n, const TensorView<T, D>& v) {
  n.forward_add(v, v, v, v);
  n.backward_add(v, v, v, v);
};

/// A token-mixing layer, constructed as Attention(dim, heads).
template <class A, class T, class D>
concept AttentionLayer =
    SequenceLayer<A, T, D> && std::constructible_from<A, std::int64_t, std::int64_t>;

/// A channel-mixing layer, constructed as Mlp(dim, hidden).
template <class M, class T, class D>
concept MlpLayer = SequenceLayer<M, T, D> && std::constructible_from<M, std::int64_t, std::int64_t>;

/// An MLP that can add the block's residual as its last product stores its output (Mlp does):
///   forward_add(x, residual, y): y = residual + mlp(x), backward as after forward.
/// A Block uses it when its MLP has it, and ops::add after forward otherwise.
template <class M, class T, class D>
concept ResidualMlp = MlpLayer<M, T, D> && requires(M m, const TensorView<T, D>& v) {
  m.forward_add(v, v, v);
};

/// Parameters a transformer block is built from.
struct BlockConfig {
  std::int64_t dim = 768;
  std::int64_t heads = 12;
  std::int64_t mlp_hidden = 3072;
  double norm_eps = 1e-6;
};

/// A transformer block, constructed from a BlockConfig.
template <class B, class T, class D>
concept TransformerBlock = SequenceLayer<B, T, D> && std::constructible_from<B, BlockConfig>;

}  // namespace moca
