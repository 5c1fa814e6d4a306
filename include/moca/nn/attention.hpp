// Multi-head self-attention with one fused qkv projection (timm's Attention; spec §1.4).
//
// qkv = x · Wqkvᵀ + b has features [q | k | v], each `dim` wide and head-major inside (head h
// uses features h·hd … h·hd + hd − 1). Per head: P = softmax(q kᵀ · hd^-½), o = P v; heads are
// concatenated head-major and projected by `proj`. No masking, no dropout. The heads are read
// in place from the qkv buffer through strided batched GEMMs (one call per head over the batch).
#pragma once

#include <cmath>
#include <cstdint>

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
    MOCA_CHECK(x.rank() == 3 && x.size(2) == dim_, "attention: expected input [B, T, ", dim_,
               "], got ", x.shape());
    const std::int64_t B = x.size(0), S = x.size(1), H = heads_, hd = head_dim();
    qkv_.resize({B, S, 3 * dim_});
    probs_.resize({B, H, S, S});
    ctx_.resize({B, S, dim_});
    qkv.forward(x, qkv_);
    const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(hd)));
    for (std::int64_t h = 0; h < H; ++h)
      ops::gemm_batched(head(qkv_, h, 0), Trans::N, head(qkv_, h, 1), Trans::T, scores(probs_, h),
                        scale, 0);
    ops::softmax(TensorView<T, D>(probs_), TensorView<T, D>(probs_));
    for (std::int64_t h = 0; h < H; ++h)
      ops::gemm_batched(scores(probs_, h), Trans::N, head(qkv_, h, 2), Trans::N, head_of(ctx_, h));
    proj.forward(ctx_, y);
  }

  /// x is the input of the last forward; writes dx, accumulates parameter gradients.
  void backward(const TensorView<T, D>& x, const TensorView<T, D>& dy, const TensorView<T, D>& dx) {
    const std::int64_t H = heads_, hd = head_dim();
    dctx_.resize(ctx_.shape());
    dprobs_.resize(probs_.shape());
    dqkv_.resize(qkv_.shape());
    proj.backward(ctx_, dy, dctx_);
    for (std::int64_t h = 0; h < H; ++h) {
      // o = P v:  dP = do · vᵀ,  dv = Pᵀ · do
      ops::gemm_batched(head_of(dctx_, h), Trans::N, head(qkv_, h, 2), Trans::T,
                        scores(dprobs_, h));
      ops::gemm_batched(scores(probs_, h), Trans::T, head_of(dctx_, h), Trans::N,
                        head(dqkv_, h, 2));
    }
    ops::softmax_backward(TensorView<T, D>(probs_), TensorView<T, D>(dprobs_),
                          TensorView<T, D>(dprobs_));
    const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(hd)));
    for (std::int64_t h = 0; h < H; ++h) {
      // S = q kᵀ · scale:  dq = dS · k · scale,  dk = dSᵀ · q · scale
      ops::gemm_batched(scores(dprobs_, h), Trans::N, head(qkv_, h, 1), Trans::N,
                        head(dqkv_, h, 0), scale, 0);
      ops::gemm_batched(scores(dprobs_, h), Trans::T, head(qkv_, h, 0), Trans::N,
                        head(dqkv_, h, 1), scale, 0);
    }
    qkv.backward(x, dqkv_, dx);
  }

  /// Attention probabilities of the last forward, [B, heads, T, T].
  TensorView<T, D> attention_probs() const { return probs_; }

 private:
  // Head h of part (0 = q, 1 = k, 2 = v) in a [B, T, 3·dim] buffer: B matrices [T, hd].
  ops::StridedBatch<T, D> head(const TensorView<T, D>& buf, std::int64_t h, int part) const {
    const std::int64_t B = buf.size(0), S = buf.size(1), hd = head_dim();
    return ops::strided_batch(buf, part * dim_ + h * hd, S, hd, 3 * dim_, S * 3 * dim_, B);
  }
  // Head h in a [B, T, dim] buffer.
  ops::StridedBatch<T, D> head_of(const TensorView<T, D>& buf, std::int64_t h) const {
    const std::int64_t B = buf.size(0), S = buf.size(1), hd = head_dim();
    return ops::strided_batch(buf, h * hd, S, hd, dim_, S * dim_, B);
  }
  // The [T, T] score matrices of head h in a [B, H, T, T] buffer.
  ops::StridedBatch<T, D> scores(const TensorView<T, D>& buf, std::int64_t h) const {
    const std::int64_t B = buf.size(0), S = buf.size(2);
    return ops::strided_batch(buf, h * S * S, S, S, S, heads_ * S * S, B);
  }

  std::int64_t dim_ = 0, heads_ = 1;
  Tensor<T, D> qkv_, probs_, ctx_;      // saved by forward
  Tensor<T, D> dctx_, dprobs_, dqkv_;   // backward scratch
};

}  // namespace moca
