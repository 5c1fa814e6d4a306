// The attention core on the host: one task per (image, head) pair, so the pair's S×S scores,
// its softmax and both products stay in cache, and the threads split pairs rather than each
// small product. Layout as ops/attention.hpp documents; every GEMM inside runs on the task's
// thread (cpu::gemm does not nest parallel regions).
#pragma once

#include <cstdint>

#include "moca/backend/cpu/gemm.hpp"
#include "moca/backend/cpu/parallel.hpp"
#include "moca/backend/cpu/rows.hpp"

namespace moca::cpu {

template <class T>
void attention_forward(std::int64_t B, std::int64_t H, std::int64_t S, std::int64_t hd, T scale,
                       const T* qkv, T* probs, T* ctx) {
  const std::int64_t dim = H * hd, ld = 3 * dim;
  parallel_for(B * H, B * H * S * S * hd, [&](std::int64_t p0, std::int64_t p1) {
    for (std::int64_t p = p0; p < p1; ++p) {
      const std::int64_t b = p / H, h = p % H;
      const T* q = qkv + b * S * ld + h * hd;
      T* P = probs + p * S * S;
      gemm(false, true, S, S, hd, scale, q, ld, q + dim, ld, T(0), P, S);
      softmax_rows(S, S, P, P);
      gemm(false, false, S, hd, S, T(1), P, S, q + 2 * dim, ld, T(0), ctx + b * S * dim + h * hd,
           dim);
    }
  });
}

template <class T>
void attention_backward(std::int64_t B, std::int64_t H, std::int64_t S, std::int64_t hd, T scale,
                        const T* qkv, const T* probs, const T* dctx, T* dprobs, T* dqkv) {
  const std::int64_t dim = H * hd, ld = 3 * dim;
  parallel_for(B * H, 2 * B * H * S * S * hd, [&](std::int64_t p0, std::int64_t p1) {
    for (std::int64_t p = p0; p < p1; ++p) {
      const std::int64_t b = p / H, h = p % H;
      const T* q = qkv + b * S * ld + h * hd;
      const T* k = q + dim;
      const T* v = q + 2 * dim;
      T* dq = dqkv + b * S * ld + h * hd;
      T* dk = dq + dim;
      T* dv = dq + 2 * dim;
      const T* P = probs + p * S * S;
      T* dP = dprobs + p * S * S;
      const T* dout = dctx + b * S * dim + h * hd;
      // o = P v:  dP = do · vᵀ,  dv = Pᵀ · do
      gemm(false, true, S, S, hd, T(1), dout, dim, v, ld, T(0), dP, S);
      gemm(true, false, S, hd, S, T(1), P, S, dout, dim, T(0), dv, ld);
      softmax_rows_backward(S, S, P, dP, dP);
      // S = q kᵀ · scale:  dq = dS · k · scale,  dk = dSᵀ · q · scale
      gemm(false, false, S, hd, S, scale, dP, S, k, ld, T(0), dq, ld);
      gemm(true, false, S, hd, S, scale, dP, S, q, ld, T(0), dk, ld);
    }
  });
}

}  // namespace moca::cpu
