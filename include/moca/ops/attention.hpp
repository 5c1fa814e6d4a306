// The attention core of a multi-head layer, on a fused [B, S, 3·dim] qkv buffer (q | k | v,
// heads side by side inside each part, head h at features h·hd … h·hd + hd − 1):
//
//   ops::attention_forward(qkv, heads, scale, saved, ctx);
//     P[b,h] = softmax(scale · Q_bh · K_bhᵀ),  ctx[b, :, h·hd …] = P[b,h] · V_bh  -> ctx [B, S, dim]
//   ops::attention_backward(qkv, saved, ctx, dctx, heads, scale, work, dqkv);
//     dqkv [B, S, 3·dim] (overwritten); work is scratch of saved's shape
//
// `saved` is what the forward keeps for the backward, of shape attention_saved_shape<T, D>:
// the probabilities [B, H, S, S] on backends that keep them (the CPU, and the composed form), or
// the log-sum-exp of each score row [B, H, S] on backends whose fused kernels recompute the
// probabilities in the backward (Backend<D>::attention_saves_lse: CUDA's flash kernels).
//
// A backend that provides attention_forward/attention_backward runs them fused: the CPU runs each
// (image, head) pair as one task with its S×S block in cache, CUDA runs tiles of queries and keys
// through shared memory. Any other backend runs the composed form below: strided batched GEMMs
// over the batch, one call per head, and whole-tensor softmax.
#pragma once

#include <cstdint>

#include "moca/core/profiler.hpp"
#include "moca/ops/common.hpp"
#include "moca/ops/gemm.hpp"
#include "moca/ops/softmax.hpp"

namespace moca::ops {

namespace attention_impl {

template <class D>
concept SavesLogSumExp = requires {
  requires Backend<D>::attention_saves_lse;
};

template <class T, class D>
concept FusedAttentionBackend = requires(std::int64_t n, T s, const T* c, T* p) {
  Backend<D>::attention_forward(n, n, n, n, s, c, p, p);
  Backend<D>::attention_backward(n, n, n, n, s, c, c, c, c, p, p);
};

}  // namespace attention_impl

/// Shape of what attention_forward keeps for attention_backward on device D (see the top). The
/// log-sum-exp is kept in compute_t<T>: for bf16 storage each float takes two elements, [B, H, 2·S].
template <class T, class D>
Shape attention_saved_shape(std::int64_t B, std::int64_t heads, std::int64_t S) {
  if constexpr (attention_impl::FusedAttentionBackend<T, D> && attention_impl::SavesLogSumExp<D>)
    return Shape({B, heads, S * std::int64_t(sizeof(compute_t<T>) / sizeof(T))});
  else
    return Shape({B, heads, S, S});
}

namespace attention_impl {

template <class T, class D>
void check_attention(const TensorView<T, D>& qkv, std::int64_t heads, const TensorView<T, D>& saved,
                     const TensorView<T, D>& ctx) {
  MOCA_CHECK(qkv.rank() == 3 && qkv.size(2) % 3 == 0 && heads > 0 &&
                 (qkv.size(2) / 3) % heads == 0,
             "attention: expected qkv [B, S, 3·dim] with dim divisible by ", heads,
             " heads, got ", qkv.shape());
  const std::int64_t B = qkv.size(0), S = qkv.size(1), dim = qkv.size(2) / 3;
  const Shape want = attention_saved_shape<T, D>(B, heads, S);
  MOCA_CHECK(saved.shape() == want && ctx.shape() == Shape({B, S, dim}), "attention: for qkv ",
             qkv.shape(), " and ", heads, " heads expected saved ", want, " and ctx [", B, ", ",
             S, ", ", dim, "], got ", saved.shape(), " and ", ctx.shape());
}

// Head h of part (0 = q, 1 = k, 2 = v) of qkv: B matrices [S, hd].
template <class T, class D>
StridedBatch<T, D> qkv_head(const TensorView<T, D>& qkv, std::int64_t heads, std::int64_t h,
                            int part) {
  const std::int64_t B = qkv.size(0), S = qkv.size(1), dim = qkv.size(2) / 3, hd = dim / heads;
  return strided_batch(qkv, part * dim + h * hd, S, hd, 3 * dim, S * 3 * dim, B);
}
// Head h of a [B, S, dim] buffer.
template <class T, class D>
StridedBatch<T, D> ctx_head(const TensorView<T, D>& ctx, std::int64_t heads, std::int64_t h) {
  const std::int64_t B = ctx.size(0), S = ctx.size(1), dim = ctx.size(2), hd = dim / heads;
  return strided_batch(ctx, h * hd, S, hd, dim, S * dim, B);
}
// The [S, S] matrices of head h in a [B, H, S, S] buffer.
template <class T, class D>
StridedBatch<T, D> probs_head(const TensorView<T, D>& probs, std::int64_t h) {
  const std::int64_t B = probs.size(0), H = probs.size(1), S = probs.size(2);
  return strided_batch(probs, h * S * S, S, S, S, H * S * S, B);
}

template <class T, class D>
void attention_forward_composed(const TensorView<T, D>& qkv, std::int64_t heads, T scale,
                                const TensorView<T, D>& probs, const TensorView<T, D>& ctx) {
  for (std::int64_t h = 0; h < heads; ++h)
    gemm_batched(qkv_head(qkv, heads, h, 0), Trans::N, qkv_head(qkv, heads, h, 1), Trans::T,
                 probs_head(probs, h), scale, 0);
  softmax(probs, probs);
  for (std::int64_t h = 0; h < heads; ++h)
    gemm_batched(probs_head(probs, h), Trans::N, qkv_head(qkv, heads, h, 2), Trans::N,
                 ctx_head(ctx, heads, h));
}

template <class T, class D>
void attention_backward_composed(const TensorView<T, D>& qkv, const TensorView<T, D>& probs,
                                 const TensorView<T, D>& dctx, std::int64_t heads, T scale,
                                 const TensorView<T, D>& dprobs, const TensorView<T, D>& dqkv) {
  for (std::int64_t h = 0; h < heads; ++h) {
    // o = P v:  dP = do · vᵀ,  dv = Pᵀ · do
    gemm_batched(ctx_head(dctx, heads, h), Trans::N, qkv_head(qkv, heads, h, 2), Trans::T,
                 probs_head(dprobs, h));
    gemm_batched(probs_head(probs, h), Trans::T, ctx_head(dctx, heads, h), Trans::N,
                 qkv_head(dqkv, heads, h, 2));
  }
  softmax_backward(probs, dprobs, dprobs);
  for (std::int64_t h = 0; h < heads; ++h) {
    // S = q kᵀ · scale:  dq = dS · k · scale,  dk = dSᵀ · q · scale
    gemm_batched(probs_head(dprobs, h), Trans::N, qkv_head(qkv, heads, h, 1), Trans::N,
                 qkv_head(dqkv, heads, h, 0), scale, 0);
    gemm_batched(probs_head(dprobs, h), Trans::T, qkv_head(qkv, heads, h, 0), Trans::N,
                 qkv_head(dqkv, heads, h, 1), scale, 0);
  }
}

}  // namespace attention_impl

template <class T, class D>
void attention_forward(const TensorView<T, D>& qkv, std::int64_t heads, Scalar<T> scale,
                       const TensorView<T, D>& saved, const TensorView<T, D>& ctx) {
  attention_impl::check_attention(qkv, heads, saved, ctx);
  const std::int64_t B = qkv.size(0), S = qkv.size(1), hd = qkv.size(2) / 3 / heads;
  if constexpr (attention_impl::FusedAttentionBackend<T, D>) {
    profiler::count_flops(4.0 * double(B * heads) * double(S) * double(S) * double(hd));
    moca::detail::count_traffic(qkv, saved, ctx);
    Backend<D>::attention_forward(B, heads, S, hd, T(scale), qkv.data(), saved.data(),
                                  ctx.data());
  } else {
    attention_impl::attention_forward_composed(qkv, heads, T(scale), saved, ctx);
  }
}

/// ctx is the forward's output (the CPU does not read it; the flash backward does).
template <class T, class D>
void attention_backward(const TensorView<T, D>& qkv, const TensorView<T, D>& saved,
                        const TensorView<T, D>& ctx, const TensorView<T, D>& dctx,
                        std::int64_t heads, Scalar<T> scale, const TensorView<T, D>& work,
                        const TensorView<T, D>& dqkv) {
  attention_impl::check_attention(qkv, heads, saved, dctx);
  moca::detail::check_same_shape("attention_backward", dctx, ctx);
  moca::detail::check_same_shape("attention_backward", saved, work);
  moca::detail::check_same_shape("attention_backward", qkv, dqkv);
  const std::int64_t B = qkv.size(0), S = qkv.size(1), hd = qkv.size(2) / 3 / heads;
  if constexpr (attention_impl::FusedAttentionBackend<T, D>) {
    // The model's FLOPs (as if P were kept): a recomputing backend does more, not counted.
    profiler::count_flops(8.0 * double(B * heads) * double(S) * double(S) * double(hd));
    moca::detail::count_traffic(qkv, saved, ctx, dctx, work, dqkv);
    Backend<D>::attention_backward(B, heads, S, hd, T(scale), qkv.data(), saved.data(),
                                   ctx.data(), dctx.data(), work.data(), dqkv.data());
  } else {
    attention_impl::attention_backward_composed(qkv, saved, dctx, heads, T(scale), work, dqkv);
  }
}

}  // namespace moca::ops
