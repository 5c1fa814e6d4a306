// GEMM on the host: float runs the packed AVX2/FMA kernel of sgemm_avx2.hpp where the compiler
// targets it; double (the gradient checks) and other targets run Eigen, with row-major maps over
// the caller's buffers (no copies, no transposes). bf16 multiplies its operands' exact values in
// float and rounds the result once, as tensor cores do: the packed kernel widens the operands as
// it packs them (elsewhere they are widened into float buffers first).
#pragma once

#include <Eigen/Core>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "moca/backend/cpu/bf16_lanes.hpp"
#include "moca/backend/cpu/parallel.hpp"
#include "moca/backend/cpu/sgemm_avx2.hpp"
#include "moca/core/bf16.hpp"

namespace moca::cpu {

template <class T>
using RowMajorMap =
    Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>, Eigen::Unaligned,
               Eigen::OuterStride<>>;
template <class T>
using ConstRowMajorMap =
    Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>,
               Eigen::Unaligned, Eigen::OuterStride<>>;

/// C[M,N] = alpha * op(A) * op(B) + beta * C, all row-major with leading dimensions lda/ldb/ldc.
/// op(A) is [M,K]: A is stored [M,K] (lda >= K) or, transposed, [K,M] (lda >= M). Likewise B.
/// beta == 0 overwrites C without reading it (NaN in C does not propagate), as in BLAS.
/// With `bias` (N values), bias is added to every row of C as well: a Linear's y = x·Wᵀ + b in
/// one pass over y.
template <class T>
void gemm(bool trans_a, bool trans_b, std::int64_t M, std::int64_t N, std::int64_t K, T alpha,
          const T* A, std::int64_t lda, const T* B, std::int64_t ldb, T beta, T* C,
          std::int64_t ldc, const T* bias = nullptr);

namespace widened {

/// The calling thread's float buffer number `slot`, at least `n` long (grown, never shrunk, so a
/// repeated product allocates nothing).
inline float* buffer(int slot, std::int64_t n) {
  thread_local std::vector<float> buffers[4];
  std::vector<float>& b = buffers[slot];
  if (static_cast<std::int64_t>(b.size()) < n) b.resize(static_cast<std::size_t>(n));
  return b.data();
}

/// x [rows, cols] (leading dimension ld) as dense floats [rows, cols] in buffer `slot`.
inline float* widen(int slot, std::int64_t rows, std::int64_t cols, const bf16* x,
                    std::int64_t ld) {
  float* out = buffer(slot, rows * cols);
  parallel_for(rows, rows * cols, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) widen_bf16(cols, x + r * ld, out + r * cols);
  });
  return out;
}

/// A bf16 product as the tensor cores compute it: the operands' exact values, products summed in
/// float, the result (with beta · C and the bias) rounded once to bf16.
template <class T>
void gemm(bool trans_a, bool trans_b, std::int64_t M, std::int64_t N, std::int64_t K, T alpha,
          const T* A, std::int64_t lda, const T* B, std::int64_t ldb, T beta, T* C,
          std::int64_t ldc, const T* bias) {
  const float* f_bias = bias ? widen(3, 1, N, bias, N) : nullptr;
#ifdef MOCA_CPU_SGEMM_AVX2
  if (K > 0 && alpha != T(0)) {  // the packed kernel widens the operands as it packs them,
    // and rounds the result into C as it stores the last inner slice: a float C only holds β·C
    // and the partial sums of earlier slices
    float* c = beta != T(0)                     ? widen(2, M, N, C, ldc)
               : sgemm_avx2::one_inner_slice(K) ? nullptr
                                                : buffer(2, M * N);
    sgemm_avx2::gemm(trans_a, trans_b, M, N, K, float(alpha), A, lda, B, ldb, float(beta), c, N,
                     f_bias, C, ldc);
    return;
  }
#endif
  float* c = beta == T(0) ? buffer(2, M * N) : widen(2, M, N, C, ldc);
  const float* a = widen(0, trans_a ? K : M, trans_a ? M : K, A, lda);
  const float* b = widen(1, trans_b ? N : K, trans_b ? K : N, B, ldb);
  cpu::gemm<float>(trans_a, trans_b, M, N, K, alpha, a, trans_a ? M : K, b, trans_b ? K : N, beta,
                   c, N, f_bias);
  parallel_for(M, M * N, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) narrow_to_bf16(N, c + r * N, C + r * ldc);
  });
}

/// A bf16 product written in float (a bf16 parameter's float gradient): the operands' exact
/// values, products summed in float, C read and written in float.
inline void gemm_into_float(bool trans_a, bool trans_b, std::int64_t M, std::int64_t N,
                            std::int64_t K, float alpha, const bf16* A, std::int64_t lda,
                            const bf16* B, std::int64_t ldb, float beta, float* C,
                            std::int64_t ldc) {
  if (M == 0 || N == 0) return;
#ifdef MOCA_CPU_SGEMM_AVX2
  if (K > 0 && alpha != 0.0f) {
    sgemm_avx2::gemm(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, nullptr);
    return;
  }
#endif
  const float* a = widen(0, trans_a ? K : M, trans_a ? M : K, A, lda);
  const float* b = widen(1, trans_b ? N : K, trans_b ? K : N, B, ldb);
  cpu::gemm<float>(trans_a, trans_b, M, N, K, alpha, a, trans_a ? M : K, b, trans_b ? K : N, beta,
                   C, ldc);
}

}  // namespace widened

template <class T>
void gemm(bool trans_a, bool trans_b, std::int64_t M, std::int64_t N, std::int64_t K, T alpha,
          const T* A, std::int64_t lda, const T* B, std::int64_t ldb, T beta, T* C,
          std::int64_t ldc, const T* bias) {
  if (M == 0 || N == 0) return;
  if constexpr (std::is_same_v<T, bf16>) {
    widened::gemm(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, bias);
    return;
  } else {
  RowMajorMap<T> c(C, M, N, Eigen::OuterStride<>(ldc));
  auto add_bias_rows = [&] {
    if (bias) c.rowwise() += Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>>(bias, N);
  };
  if (K == 0 || alpha == T(0)) {
    if (beta == T(0)) {
      c.setZero();
    } else if (beta != T(1)) {
      c *= beta;
    }
    add_bias_rows();
    return;
  }
#ifdef MOCA_CPU_SGEMM_AVX2
  if constexpr (std::is_same_v<T, float>) {
    sgemm_avx2::gemm(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, bias);
    return;
  }
#endif
  if (beta == T(0)) {
    c.setZero();
  } else if (beta != T(1)) {
    c *= beta;
  }
  ConstRowMajorMap<T> a(A, trans_a ? K : M, trans_a ? M : K, Eigen::OuterStride<>(lda));
  ConstRowMajorMap<T> b(B, trans_b ? N : K, trans_b ? K : N, Eigen::OuterStride<>(ldb));
  if (!trans_a && !trans_b) {
    c.noalias() += alpha * a * b;
  } else if (!trans_a && trans_b) {
    c.noalias() += alpha * a * b.transpose();
  } else if (trans_a && !trans_b) {
    c.noalias() += alpha * a.transpose() * b;
  } else {
    c.noalias() += alpha * a.transpose() * b.transpose();
  }
  add_bias_rows();
  }
}

/// `batch` independent GEMMs; matrix i of A starts at A + i * stride_a (likewise B, C).
/// Batches run in parallel, each on one thread, when there are several.
template <class T>
void gemm_strided_batched(bool trans_a, bool trans_b, std::int64_t M, std::int64_t N,
                          std::int64_t K, T alpha, const T* A, std::int64_t lda,
                          std::int64_t stride_a, const T* B, std::int64_t ldb,
                          std::int64_t stride_b, T beta, T* C, std::int64_t ldc,
                          std::int64_t stride_c, std::int64_t batch) {
  const std::int64_t work = batch * M * N * (K + 1);
  if (batch == 1) {
    gemm(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  parallel_for(batch, work, [&](std::int64_t b0, std::int64_t b1) {
    for (std::int64_t i = b0; i < b1; ++i)
      gemm(trans_a, trans_b, M, N, K, alpha, A + i * stride_a, lda, B + i * stride_b, ldb, beta,
           C + i * stride_c, ldc);
  });
}

}  // namespace moca::cpu
