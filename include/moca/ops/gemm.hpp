// Matrix products.
//
//   ops::gemm(x, Trans::N, w, Trans::T, y);          // y[M,N] = x[M,K] · w[N,K]ᵀ  (a Linear)
//   ops::gemm(dy, Trans::T, x, Trans::N, dw, 1, 1);   // dw += dyᵀ · x          (its weight grad)
//   ops::linear_grads(dy, x, dw, db);                  // the same, and db += Σ_rows dy
//   ops::gemm_bias_residual(h, Trans::N, w, Trans::T, b, r, y);   // y = h · wᵀ + b + r
//
// Tensors of rank > 2 are read as matrices [product of leading dims, last dim].
#pragma once

#include <concepts>

#include "moca/core/profiler.hpp"
#include "moca/ops/common.hpp"
#include "moca/ops/elementwise.hpp"
#include "moca/ops/reduce.hpp"

namespace moca {

enum class Trans { N, T };

namespace ops {

/// C = alpha · op(A) · op(B) + beta · C. beta = 0 overwrites C (NaN in C is not propagated).
/// C may be float where A and B are bf16 (a bf16 parameter's float gradient): the products are
/// summed in float as always, and C is then neither rounded nor read back rounded.
template <class T, class G, class D>
requires std::is_same_v<G, T> || std::is_same_v<G, compute_t<T>>
void gemm(const TensorView<T, D>& A, Trans ta, const TensorView<T, D>& B, Trans tb,
          const TensorView<G, D>& C, Scalar<G> alpha = 1, Scalar<G> beta = 0) {
  const auto a = A.matrix(), b = B.matrix(), c = C.matrix();
  const bool tA = ta == Trans::T, tB = tb == Trans::T;
  const std::int64_t M = tA ? a.size(1) : a.size(0), K = tA ? a.size(0) : a.size(1);
  const std::int64_t Kb = tB ? b.size(1) : b.size(0), N = tB ? b.size(0) : b.size(1);
  MOCA_CHECK(K == Kb && c.size(0) == M && c.size(1) == N, "gemm: incompatible shapes: A ",
             A.shape(), tA ? "ᵀ" : "", " · B ", B.shape(), tB ? "ᵀ" : "", " -> C ", C.shape());
  profiler::count_flops(2.0 * double(M) * double(N) * double(K));
  if (G(beta) == G(0))
    detail::count_traffic(a, b, c);
  else
    detail::count_traffic(a, b, c, c);
  Backend<D>::gemm(tA, tB, M, N, K, G(alpha), a.data(), a.size(1), b.data(), b.size(1), G(beta),
                   c.data(), c.size(1));
}

namespace gemm_impl {
template <class T, class D>
concept BiasGemmBackend = requires(bool t, std::int64_t n, const T* c, T* p) {
  Backend<D>::gemm_bias(t, t, n, n, n, c, n, c, n, c, p, n);
};
}  // namespace gemm_impl

/// C = op(A) · op(B) + bias, the bias ([N]) added to every row: a Linear's forward. Backends
/// that provide gemm_bias add it as they store C; others run gemm and then add_bias.
template <class T, class D>
void gemm_bias(const TensorView<T, D>& A, Trans ta, const TensorView<T, D>& B, Trans tb,
               const TensorView<T, D>& bias, const TensorView<T, D>& C) {
  const auto a = A.matrix(), b = B.matrix(), c = C.matrix();
  const bool tA = ta == Trans::T, tB = tb == Trans::T;
  const std::int64_t M = tA ? a.size(1) : a.size(0), K = tA ? a.size(0) : a.size(1);
  const std::int64_t Kb = tB ? b.size(1) : b.size(0), N = tB ? b.size(0) : b.size(1);
  MOCA_CHECK(K == Kb && c.size(0) == M && c.size(1) == N && bias.numel() == N,
             "gemm_bias: incompatible shapes: A ", A.shape(), tA ? "ᵀ" : "", " · B ", B.shape(),
             tB ? "ᵀ" : "", " + bias ", bias.shape(), " -> C ", C.shape());
  if constexpr (gemm_impl::BiasGemmBackend<T, D>) {
    profiler::count_flops(2.0 * double(M) * double(N) * double(K));
    detail::count_traffic(a, b, bias, c);
    Backend<D>::gemm_bias(tA, tB, M, N, K, a.data(), a.size(1), b.data(), b.size(1), bias.data(),
                          c.data(), c.size(1));
  } else {
    gemm(A, ta, B, tb, C);
    Backend<D>::add_bias(M, N, bias.data(), c.data());
  }
}

namespace gemm_impl {
template <class T, class D>
concept ResidualGemmBackend = requires(bool t, std::int64_t n, const T* c, T* p) {
  {
    Backend<D>::gemm_bias_residual(t, t, n, n, n, c, n, c, n, c, c, p, n)
    } -> std::convertible_to<bool>;
};
}  // namespace gemm_impl

/// C = op(A) · op(B) + bias + residual (residual of C's shape): a Linear that ends a residual
/// branch. Backends that provide gemm_bias_residual may read the residual as the product's C
/// and add it as they store C (CUDA, Context::set_fused_residual); otherwise gemm_bias and add.
/// C must not alias the residual.
template <class T, class D>
void gemm_bias_residual(const TensorView<T, D>& A, Trans ta, const TensorView<T, D>& B, Trans tb,
                        const TensorView<T, D>& bias, const TensorView<T, D>& residual,
                        const TensorView<T, D>& C) {
  MOCA_CHECK(residual.shape() == C.shape(), "gemm_bias_residual: residual ", residual.shape(),
             " and output ", C.shape(), " differ");
  MOCA_CHECK(residual.data() != C.data() || C.numel() == 0,
             "gemm_bias_residual: the output must not be the residual");
  if constexpr (gemm_impl::ResidualGemmBackend<T, D>) {
    const auto a = A.matrix(), b = B.matrix(), c = C.matrix();
    const bool tA = ta == Trans::T, tB = tb == Trans::T;
    const std::int64_t M = tA ? a.size(1) : a.size(0), K = tA ? a.size(0) : a.size(1);
    const std::int64_t Kb = tB ? b.size(1) : b.size(0), N = tB ? b.size(0) : b.size(1);
    MOCA_CHECK(K == Kb && c.size(0) == M && c.size(1) == N && bias.numel() == N,
               "gemm_bias_residual: incompatible shapes: A ", A.shape(), tA ? "ᵀ" : "", " · B ",
               B.shape(), tB ? "ᵀ" : "", " + bias ", bias.shape(), " -> C ", C.shape());
    if (Backend<D>::gemm_bias_residual(tA, tB, M, N, K, a.data(), a.size(1), b.data(), b.size(1),
                                       bias.data(), residual.data(), c.data(), c.size(1))) {
      profiler::count_flops(2.0 * double(M) * double(N) * double(K));
      detail::count_traffic(a, b, bias, residual, c);
      return;
    }
  }
  gemm_bias(A, ta, B, tb, bias, C);
  add(C, residual, C);
}

namespace gemm_impl {
template <class T, class G, class D>
concept LinearGradsBackend = requires(std::int64_t n, const T* c, G* g) {
  { Backend<D>::linear_grads(n, n, n, c, n, c, n, g, n, g) } -> std::convertible_to<bool>;
};
}  // namespace gemm_impl

/// A Linear's parameter gradients: dW += dyᵀ · x and db += Σ_rows dy, for dy [M, N], x [M, K],
/// dW [N, K], db [N] (dW and db may be float where dy and x are bf16). Backends that provide
/// linear_grads may take db from the product's own pass over dy (CUDA: a setting, see
/// Context::set_fused_bias_grads); otherwise a product and a column sum.
template <class T, class G, class D>
requires std::is_same_v<G, T> || std::is_same_v<G, compute_t<T>>
void linear_grads(const TensorView<T, D>& dy, const TensorView<T, D>& x, const TensorView<G, D>& dW,
                  const TensorView<G, D>& db) {
  const auto y = dy.matrix(), a = x.matrix(), w = dW.matrix();
  const std::int64_t M = y.size(0), N = y.size(1), K = a.size(1);
  MOCA_CHECK(a.size(0) == M && w.size(0) == N && w.size(1) == K && db.numel() == N,
             "linear_grads: incompatible shapes: dy ", dy.shape(), ", x ", x.shape(), " -> dW ",
             dW.shape(), ", db ", db.shape());
  if constexpr (gemm_impl::LinearGradsBackend<T, G, D>) {
    if (Backend<D>::linear_grads(M, N, K, y.data(), y.size(1), a.data(), a.size(1), w.data(),
                                 w.size(1), db.data())) {
      profiler::count_flops(2.0 * double(M) * double(N) * double(K));
      detail::count_traffic(y, a, w, w, db, db);
      return;
    }
  }
  gemm(dy, Trans::T, x, Trans::N, dW, 1, 1);
  sum(y, 0, db, 1, 1);
}

/// A batch of equally shaped matrices inside one buffer: matrix i starts at data + i·stride,
/// has `rows` rows of `cols` elements, consecutive rows `ld` elements apart. It lets a GEMM read
/// one head of a [tokens, 3·D] qkv buffer in place (ld = 3·D, stride = head dim).
template <class T, class D>
struct StridedBatch {
  T* data;
  std::int64_t rows, cols, ld, stride, count;
};

/// Describes a strided batch inside `base`, starting `offset` elements in, and checks that every
/// element it addresses lies inside `base`.
template <class T, class D>
StridedBatch<T, D> strided_batch(const TensorView<T, D>& base, std::int64_t offset,
                                 std::int64_t rows, std::int64_t cols, std::int64_t ld,
                                 std::int64_t stride, std::int64_t count) {
  // ld = 0 (and stride = 0) describe a broadcast source: one row (one matrix) read repeatedly.
  MOCA_CHECK(rows >= 0 && cols >= 0 && count >= 0 && (ld >= cols || ld == 0) && offset >= 0 &&
                 stride >= 0,
             "strided_batch: invalid layout rows ", rows, " cols ", cols, " ld ", ld, " stride ",
             stride, " count ", count);
  if (rows > 0 && cols > 0 && count > 0) {
    const std::int64_t last = offset + (count - 1) * stride + (rows - 1) * ld + cols;
    MOCA_CHECK(last <= base.numel(), "strided_batch: the batch reaches element ", last,
               " of a tensor of shape ", base.shape(), " (", base.numel(), " elements)");
  }
  return {base.data() + offset, rows, cols, ld, stride, count};
}

/// C_i = alpha · op(A_i) · op(B_i) + beta · C_i for every matrix i of the batches.
template <class T, class D>
void gemm_batched(const StridedBatch<T, D>& A, Trans ta, const StridedBatch<T, D>& B, Trans tb,
                  const StridedBatch<T, D>& C, Scalar<T> alpha = 1, Scalar<T> beta = 0) {
  const bool tA = ta == Trans::T, tB = tb == Trans::T;
  const std::int64_t M = tA ? A.cols : A.rows, K = tA ? A.rows : A.cols;
  const std::int64_t Kb = tB ? B.cols : B.rows, N = tB ? B.rows : B.cols;
  MOCA_CHECK(K == Kb && C.rows == M && C.cols == N && A.count == B.count && A.count == C.count,
             "gemm_batched: incompatible batches: A ", A.count, "×[", A.rows, ", ", A.cols, "]",
             tA ? "ᵀ" : "", " · B ", B.count, "×[", B.rows, ", ", B.cols, "]", tB ? "ᵀ" : "",
             " -> C ", C.count, "×[", C.rows, ", ", C.cols, "]");
  profiler::count_flops(2.0 * double(M) * double(N) * double(K) * double(A.count));
  profiler::count_bytes(double(A.count) * sizeof(T) *
                        double(M * K + K * N + (T(beta) == T(0) ? 1 : 2) * M * N));
  Backend<D>::gemm_strided_batched(tA, tB, M, N, K, T(alpha), A.data, A.ld, A.stride, B.data,
                                   B.ld, B.stride, T(beta), C.data, C.ld, C.stride, A.count);
}

/// Batched product of rank-3 tensors: C[b] = alpha · op(A[b]) · op(B[b]) + beta · C[b].
template <class T, class D>
void gemm_batched(const TensorView<T, D>& A, Trans ta, const TensorView<T, D>& B, Trans tb,
                  const TensorView<T, D>& C, Scalar<T> alpha = 1, Scalar<T> beta = 0) {
  MOCA_CHECK(A.rank() == 3 && B.rank() == 3 && C.rank() == 3,
             "gemm_batched: expected rank-3 tensors, got A ", A.shape(), " B ", B.shape(), " C ",
             C.shape());
  auto batch = [](const TensorView<T, D>& t) {
    return StridedBatch<T, D>{t.data(), t.size(1), t.size(2), t.size(2), t.size(1) * t.size(2),
                              t.size(0)};
  };
  gemm_batched(batch(A), ta, batch(B), tb, batch(C), alpha, beta);
}

}  // namespace ops
}  // namespace moca
