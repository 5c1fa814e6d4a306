// Backend<Cpu>: the op set on the host (Eigen GEMM, OpenMP loops).
//
// Every backend implements the same static functions on raw pointers and sizes; ops/ checks
// shapes once and dispatches here, so a backend only computes. The contract of each function is
// documented where the CPU kernel is defined (backend/cpu/*.hpp); backend/cuda/ follows it.
#pragma once

#include <cstdint>

#include "moca/backend/cpu/attention.hpp"
#include "moca/backend/cpu/elementwise.hpp"
#include "moca/backend/cpu/gemm.hpp"
#include "moca/backend/cpu/index.hpp"
#include "moca/backend/cpu/layout.hpp"
#include "moca/backend/cpu/losses.hpp"
#include "moca/backend/cpu/reduce.hpp"
#include "moca/backend/cpu/rows.hpp"
#include "moca/backend/cpu/stats.hpp"
#include "moca/core/device.hpp"

namespace moca {

template <>
struct Backend<Cpu> {
  /// C of type G: T, or float for bf16 operands (see ops::gemm).
  template <class T, class G>
  static void gemm(bool ta, bool tb, std::int64_t M, std::int64_t N, std::int64_t K, G alpha,
                   const T* A, std::int64_t lda, const T* B, std::int64_t ldb, G beta, G* C,
                   std::int64_t ldc) {
    if constexpr (std::is_same_v<T, G>)
      cpu::gemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    else
      cpu::widened::gemm_into_float(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
  /// C = op(A)·op(B) + bias on every row (one pass over C).
  template <class T>
  static void gemm_bias(bool ta, bool tb, std::int64_t M, std::int64_t N, std::int64_t K,
                        const T* A, std::int64_t lda, const T* B, std::int64_t ldb, const T* bias,
                        T* C, std::int64_t ldc) {
    cpu::gemm(ta, tb, M, N, K, T(1), A, lda, B, ldb, T(0), C, ldc, bias);
  }
  template <class T>
  static void gemm_strided_batched(bool ta, bool tb, std::int64_t M, std::int64_t N,
                                   std::int64_t K, T alpha, const T* A, std::int64_t lda,
                                   std::int64_t sa, const T* B, std::int64_t ldb, std::int64_t sb,
                                   T beta, T* C, std::int64_t ldc, std::int64_t sc,
                                   std::int64_t batch) {
    cpu::gemm_strided_batched(ta, tb, M, N, K, alpha, A, lda, sa, B, ldb, sb, beta, C, ldc, sc,
                              batch);
  }
  template <class T>
  static void attention_forward(std::int64_t B, std::int64_t H, std::int64_t S, std::int64_t hd,
                                T scale, const T* qkv, T* probs, T* ctx) {
    cpu::attention_forward(B, H, S, hd, scale, qkv, probs, ctx);
  }
  template <class T>
  static void attention_backward(std::int64_t B, std::int64_t H, std::int64_t S, std::int64_t hd,
                                 T scale, const T* qkv, const T* probs, const T* /*ctx*/,
                                 const T* dctx, T* dprobs, T* dqkv) {
    cpu::attention_backward(B, H, S, hd, scale, qkv, probs, dctx, dprobs, dqkv);
  }
  template <class T>
  static void fill(std::int64_t n, T value, T* x) { cpu::fill(n, value, x); }
  template <class T>
  static void axpby(std::int64_t n, T alpha, const T* x, T beta, T* y) {
    cpu::axpby(n, alpha, x, beta, y);
  }
  template <class T>
  static void scale(std::int64_t n, T alpha, T* x) { cpu::scale(n, alpha, x); }
  template <class T>
  static void add(std::int64_t n, const T* a, const T* b, T* y) { cpu::add(n, a, b, y); }
  template <class T>
  static void mul(std::int64_t n, const T* a, const T* b, T* y) { cpu::mul(n, a, b, y); }
  template <class T>
  static void add_bias(std::int64_t M, std::int64_t N, const T* bias, T* x) {
    cpu::add_bias(M, N, bias, x);
  }
  template <class T>
  static void gelu_forward(std::int64_t n, const T* x, T* y) { cpu::gelu_forward(n, x, y); }
  template <class T>
  static void gelu_backward(std::int64_t n, const T* x, const T* dy, T* dx) {
    cpu::gelu_backward(n, x, dy, dx);
  }
  template <class T>
  static void relu_forward(std::int64_t n, const T* x, T* y) { cpu::relu_forward(n, x, y); }
  template <class T>
  static void relu_backward(std::int64_t n, const T* x, const T* dy, T* dx) {
    cpu::relu_backward(n, x, dy, dx);
  }
  template <class T>
  static void softmax_rows(std::int64_t M, std::int64_t N, const T* x, T* y) {
    cpu::softmax_rows(M, N, x, y);
  }
  template <class T>
  static void log_softmax_rows(std::int64_t M, std::int64_t N, const T* x, T* y) {
    cpu::log_softmax_rows(M, N, x, y);
  }
  template <class T>
  static void softmax_spread_rows(std::int64_t M, std::int64_t N, T scale, T* x, T* spread) {
    cpu::softmax_spread_rows(M, N, scale, x, spread);
  }
  template <class T>
  static void softmax_rows_backward(std::int64_t M, std::int64_t N, const T* y, const T* dy,
                                    T* dx) {
    cpu::softmax_rows_backward(M, N, y, dy, dx);
  }
  template <class T>
  static void log_softmax_rows_backward(std::int64_t M, std::int64_t N, const T* y, const T* dy,
                                        T* dx) {
    cpu::log_softmax_rows_backward(M, N, y, dy, dx);
  }
  template <class T>
  static void layer_norm_forward(std::int64_t M, std::int64_t N, const T* x, const T* gamma,
                                 const T* beta, double eps, T* y, compute_t<T>* mean,
                                 compute_t<T>* rstd) {
    cpu::layer_norm_forward(M, N, x, gamma, beta, eps, y, mean, rstd);
  }
  template <class T>
  static void layer_norm_backward(std::int64_t M, std::int64_t N, const T* x, const T* gamma,
                                  const compute_t<T>* mean, const compute_t<T>* rstd, const T* dy,
                                  T* dx, compute_t<T>* dgamma, compute_t<T>* dbeta) {
    cpu::layer_norm_backward(M, N, x, gamma, mean, rstd, dy, dx, dgamma, dbeta);
  }
  /// LayerNorm of x + add (written to sum) and its backward joined to a residual gradient: the
  /// fused forms of ops::add_layer_norm and ops::layer_norm_backward_add.
  template <class T>
  static void add_layer_norm_forward(std::int64_t M, std::int64_t N, const T* x, const T* add,
                                     const T* gamma, const T* beta, double eps, T* sum, T* y,
                                     compute_t<T>* mean, compute_t<T>* rstd) {
    cpu::layer_norm_forward(M, N, x, gamma, beta, eps, y, mean, rstd, add, sum);
  }
  template <class T>
  static void layer_norm_backward_add(std::int64_t M, std::int64_t N, const T* x, const T* gamma,
                                      const compute_t<T>* mean, const compute_t<T>* rstd,
                                      const T* dy, const T* residual, T* dx, compute_t<T>* dgamma,
                                      compute_t<T>* dbeta) {
    cpu::layer_norm_backward(M, N, x, gamma, mean, rstd, dy, dx, dgamma, dbeta, residual);
  }
  template <class T>
  static void l2_normalize_rows_forward(std::int64_t M, std::int64_t N, const T* x, double eps,
                                        T* y, compute_t<T>* norm) {
    cpu::l2_normalize_rows_forward(M, N, x, eps, y, norm);
  }
  template <class T>
  static void l1_normalize_rows(std::int64_t M, std::int64_t N, double eps, T* x) {
    cpu::l1_normalize_rows(M, N, eps, x);
  }
  template <class T>
  static void l2_normalize_rows_backward(std::int64_t M, std::int64_t N, const T* y,
                                         const compute_t<T>* norm, double eps, const T* dy, T* dx) {
    cpu::l2_normalize_rows_backward(M, N, y, norm, eps, dy, dx);
  }
  template <class T, class Y>
  static void sum_middle(std::int64_t outer, std::int64_t n, std::int64_t inner, Y alpha,
                         const T* x, Y beta, Y* y) {
    cpu::sum_middle(outer, n, inner, alpha, x, beta, y);
  }
  template <class T>
  static double sum_squares(std::int64_t n, const T* x) { return cpu::sum_squares(n, x); }
  template <class T>
  static void gather_rows(std::int64_t M, std::int64_t C, const T* src, std::int64_t rows,
                          const std::int32_t* idx, T* dst) {
    cpu::gather_rows(M, C, src, rows, idx, dst);
  }
  template <class T>
  static void scatter_add_rows(std::int64_t M, std::int64_t C, const T* src,
                               const std::int32_t* idx, std::int64_t rows, T* dst) {
    cpu::scatter_add_rows(M, C, src, idx, rows, dst);
  }
  template <class T>
  static void copy_strided(std::int64_t count, std::int64_t rows, std::int64_t cols, const T* src,
                           std::int64_t src_ld, std::int64_t src_stride, T* dst,
                           std::int64_t dst_ld, std::int64_t dst_stride, bool accumulate) {
    cpu::copy_strided(count, rows, cols, src, src_ld, src_stride, dst, dst_ld, dst_stride,
                      accumulate);
  }
  template <class T>
  static void patchify(std::int64_t N, std::int64_t C, std::int64_t H, std::int64_t W,
                       std::int64_t p, const T* images, T* patches) {
    cpu::patchify(N, C, H, W, p, images, patches);
  }
  template <class T>
  static void unpatchify(std::int64_t N, std::int64_t C, std::int64_t H, std::int64_t W,
                         std::int64_t p, const T* patches, T* images) {
    cpu::unpatchify(N, C, H, W, p, patches, images);
  }
  template <class T>
  static void row_max(std::int64_t M, std::int64_t N, const T* x, T* y) {
    cpu::row_max(M, N, x, y);
  }
  template <class T>
  static void batch_norm_forward(std::int64_t M, std::int64_t N, const T* x, const T* gamma,
                                 const T* beta, double eps, T* y, compute_t<T>* mean,
                                 compute_t<T>* var) {
    cpu::batch_norm_forward(M, N, x, gamma, beta, eps, y, mean, var);
  }
  template <class T>
  static void batch_norm_backward(std::int64_t M, std::int64_t N, const T* x, const T* gamma,
                                  const compute_t<T>* mean, const compute_t<T>* var, double eps,
                                  const T* dy, T* dx, compute_t<T>* dgamma, compute_t<T>* dbeta) {
    cpu::batch_norm_backward(M, N, x, gamma, mean, var, eps, dy, dx, dgamma, dbeta);
  }
  template <class T>
  static double xlogy_sum(std::int64_t n, const T* x, const T* y) {
    return cpu::xlogy_sum(n, x, y);
  }
  /// `R`, the rows of t, is for backends that check device indices; ops checks host ones.
  template <class T>
  static double soft_target_rows(std::int64_t M, std::int64_t K, const T* z, const T* t,
                                 std::int64_t /*R*/, const std::int32_t* idx, bool entropy, T s,
                                 T* dz) {
    return cpu::soft_target_rows(M, K, z, t, idx, entropy, s, dz);
  }
  template <class T, class G>
  static void adamw(std::int64_t n, T* p, const G* g, T* m, T* v, double lr, double beta1,
                    double beta2, double eps, double weight_decay, std::int64_t step) {
    cpu::adamw(n, p, g, m, v, lr, beta1, beta2, eps, weight_decay, step);
  }
  template <class S, class T>
  static void convert(std::int64_t n, const S* x, T* y) {
    cpu::convert(n, x, y);
  }
};

}  // namespace moca
