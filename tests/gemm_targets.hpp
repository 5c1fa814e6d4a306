// One packed GEMM call, compiled once per instruction-set target (see gemm_targets_test.cpp):
// each translation unit that includes this defines its own entry point over its own build of
// cpu::sgemm_avx2.
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
};

/// The call through the ymm (AVX2) kernel, from a file compiled without AVX-512; returns false
/// where the compiler does not target AVX2 + FMA.
bool gemm_ymm(const GemmCall& call);
/// The same call through whichever kernel this project's default flags select.
bool gemm_native(const GemmCall& call);

}  // namespace moca::test

#ifdef MOCA_GEMM_TARGETS_DEFINE
#include <moca/backend/cpu/sgemm_avx2.hpp>

namespace moca::test {
inline bool run_packed_gemm(const GemmCall& c) {
#ifdef MOCA_CPU_SGEMM_AVX2
  const std::int64_t lda = c.trans_a ? c.M : c.K, ldb = c.trans_b ? c.K : c.N;
  if (c.A16 != nullptr) {
    cpu::sgemm_avx2::gemm(c.trans_a, c.trans_b, c.M, c.N, c.K, c.alpha, c.A16, lda, c.B16, ldb,
                          c.beta, c.C, c.N, c.bias);
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
}  // namespace moca::test
#endif
