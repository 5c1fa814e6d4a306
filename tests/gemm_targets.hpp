// One packed GEMM call and one attention head, compiled once per instruction-set target (see
// gemm_targets_test.cpp): each translation unit that includes this defines its own entry points
// over its own build of cpu::sgemm_avx2, cpu::small_gemm and cpu::small_head.
#pragma once

#include <cstdint>
#include <moca/core/bf16.hpp>

namespace moca::test {

struct GemmCall {
  bool trans_a, trans_b;
  std::int64_t M, N, K;
  float alpha, beta;
  const float* A;
  const float* B;
  const bf16* A16;  // when not null, the bf16 operands are multiplied instead
  const bf16* B16;
  const float* bias;
  float* C;
  bf16* out = nullptr;  // when not null (bf16 operands only), the result rounded into here
};

/// The call through the ymm (AVX2) kernel, from a file compiled without AVX-512; returns false
/// where the compiler does not target AVX2 + FMA.
bool gemm_ymm(const GemmCall& call);
/// The same call through whichever kernel this project's default flags select.
bool gemm_native(const GemmCall& call);

/// One float attention head, forward then backward: qkv [S, 3·dim] holds the head's q, k and v
/// (hd wide) at columns 0, dim and 2·dim; probs [S, S]; ctx and dout [S, dim]; dqkv [S, 3·dim].
struct HeadCall {
  std::int64_t S, hd, dim;
  float scale;
  const float* qkv;
  const float* dout;
  float* probs;
  float* ctx;
  float* dqkv;
};

/// The head through the ymm register tiles; false where the compiler does not target AVX2 + FMA.
bool head_ymm(const HeadCall& call);
/// The head through the tiles of the default flags.
bool head_native(const HeadCall& call);

}  // namespace moca::test

#ifdef MOCA_GEMM_TARGETS_DEFINE
#include <moca/backend/cpu/attention.hpp>
#include <moca/backend/cpu/sgemm_avx2.hpp>

namespace moca::test {
inline bool run_packed_gemm(const GemmCall& c) {
#ifdef MOCA_CPU_SGEMM_AVX2
  const std::int64_t lda = c.trans_a ? c.M : c.K, ldb = c.trans_b ? c.K : c.N;
  if (c.A16 != nullptr) {
    cpu::sgemm_avx2::gemm(c.trans_a, c.trans_b, c.M, c.N, c.K, c.alpha, c.A16, lda, c.B16, ldb,
                          c.beta, c.C, c.N, c.bias, c.out, c.N);
  } else {
    cpu::sgemm_avx2::gemm(c.trans_a, c.trans_b, c.M, c.N, c.K, c.alpha, c.A, lda, c.B, ldb, c.beta,
                          c.C, c.N, c.bias);
  }
  return true;
#else
  (void)c;
  return false;
#endif
}

inline bool run_head(const HeadCall& h) {
#ifdef MOCA_CPU_SGEMM_AVX2
  if (!cpu::small_head::applies(h.S, h.hd)) return false;
  cpu::small_head::forward(h.S, h.hd, h.dim, h.scale, h.qkv, h.probs, h.ctx);
  cpu::small_head::backward(h.S, h.hd, h.dim, h.scale, h.qkv, h.probs, h.dout, h.dqkv);
  return true;
#else
  (void)h;
  return false;
#endif
}
}  // namespace moca::test
#endif
