// Multi-head self-attention with one fused qkv projection (timm's Attention; spec §1.4).
//
// qkv = x · Wqkvᵀ + b has features [q | k | v], each `dim` wide and head-major inside (head h
// uses features h·hd … h·hd + hd − 1). Per head: P = softmax(q kᵀ · hd^-½), o = P v; heads are
// concatenated head-major and projected by `proj`. No masking, no dropout. The core (scores,
// softmax, products) is ops::attention_forward/backward, which reads the heads in place and keeps
// what its backend needs (the probabilities, or on CUDA only the rows' log-sum-exp).
#pragma once

#include <cmath>
#include <cstdint>
#include <utility>

#include "moca/core/profiler.hpp"
#include "moca/nn/linear.hpp"

namespace moca {

template <class T, class D = Cpu>
class MultiHeadAttention {
 public:
  Linear<T, D> qkv, proj;

  MultiHeadAttention() = default;
  MultiHeadAttention(std::int64_t dim, std::int64_t heads, bool qkv_bias = true)
      : qkv(dim, 3 * dim, qkv_bias), proj(dim, dim), dim_(dim), heads_(heads) {
    MOCA_CHECK(heads > 0 && dim % heads == 0, "attention: width ", dim,
               " is not divisible by the number of heads ", heads);
  }

  template <class V>
  void visit(V&& v) {
    v("qkv", qkv);
    v("proj", proj);
  }

  std::int64_t heads() const { return heads_; }
  std::int64_t head_dim() const { return dim_ / heads_; }

  /// x [B, T, dim] → y [B, T, dim]
  void forward(const TensorView<T, D>& x, const TensorView<T, D>& y) {
    MOCA_PROFILE_SCOPE("attention");
    MOCA_CHECK(x.rank() == 3 && x.size(2) == dim_, "attention: expected input [B, T, ", dim_,
               "], got ", x.shape());
    const std::int64_t B = x.size(0), S = x.size(1), H = heads_, hd = head_dim();
    qkv_.resize({B, S, 3 * dim_});
    saved_.resize(ops::attention_saved_shape<T, D>(B, H, S));
    ctx_.resize({B, S, dim_});
    qkv.forward(x, qkv_);
    const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(hd)));
    ops::attention_forward(TensorView<T, D>(qkv_), H, scale, TensorView<T, D>(saved_),
                           TensorView<T, D>(ctx_));
    proj.forward(ctx_, y);
  }

  /// x is the input of the last forward; writes dx, accumulates parameter gradients.
  void backward(const TensorView<T, D>& x, const TensorView<T, D>& dy, const TensorView<T, D>& dx) {
    MOCA_PROFILE_SCOPE("attention");
    const std::int64_t H = heads_, hd = head_dim();
    dctx_.resize(ctx_.shape());
    work_.resize(saved_.shape());
    dqkv_.resize(qkv_.shape());
    proj.backward(ctx_, dy, dctx_);
    const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(hd)));
    ops::attention_backward(TensorView<T, D>(qkv_), TensorView<T, D>(saved_),
                            TensorView<T, D>(ctx_), TensorView<T, D>(dctx_), H, scale,
                            TensorView<T, D>(work_), TensorView<T, D>(dqkv_));
    qkv.backward(x, dqkv_, dx);
  }

  /// Trade buffers with another attention layer (see SwapsBuffers, SwapsScratch).
  void swap_buffers(MultiHeadAttention& other) noexcept {
    std::swap(qkv_, other.qkv_);
    std::swap(saved_, other.saved_);
    std::swap(ctx_, other.ctx_);
  }
  void swap_scratch(MultiHeadAttention& other) noexcept {
    std::swap(dctx_, other.dctx_);
    std::swap(work_, other.work_);
    std::swap(dqkv_, other.dqkv_);
  }

 private:
  std::int64_t dim_ = 0, heads_ = 1;
  Tensor<T, D> qkv_, saved_, ctx_;  // kept by forward (saved_: see ops::attention_saved_shape)
  Tensor<T, D> dctx_, work_, dqkv_;  // backward scratch
};

}  // namespace moca
