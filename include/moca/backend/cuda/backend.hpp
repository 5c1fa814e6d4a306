// Backend<Cuda>: the op set on an NVIDIA GPU (cuBLAS GEMMs, CUDA kernels for the rest).
//
// The same static functions as Backend<Cpu>, on device pointers, with the contracts documented
// at the CPU kernels (backend/cpu/*.hpp). GEMMs call cuBLAS here; every other function forwards to
// a kernel wrapper in moca::cuda, declared below and defined in kernels/*.cuh, which nvcc compiles
// once for float and double into the moca_cuda_kernels library (instantiate.cuh). So this header
// needs no nvcc: ordinary C++ files include it (through <moca/cuda.hpp>) and link moca::cuda.
//
// All work is queued on Context::get().stream() and runs asynchronously, except sum_squares,
// xlogy_sum and soft_target_rows, which return a value to the host and so wait for it (their
// _partials forms leave it on the device for PendingValues).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "moca/backend/cuda/check.hpp"
#include "moca/backend/cuda/context.hpp"
#include "moca/backend/cuda/lt_matmul.hpp"
#include "moca/core/bf16.hpp"
#include "moca/core/check.hpp"
#include "moca/core/device.hpp"

namespace moca::cuda {

// Kernel wrappers, one per Backend function (same arguments, device pointers), plus
// scale_matrices for the GEMM cases that need no product. Defined for T = float and double.

template <class T>
void fill(std::int64_t n, T value, T* x);
template <class T>
void axpby(std::int64_t n, T alpha, const T* x, T beta, T* y);
template <class T>
void scale(std::int64_t n, T alpha, T* x);
template <class T>
void add(std::int64_t n, const T* a, const T* b, T* y);
template <class T>
void mul(std::int64_t n, const T* a, const T* b, T* y);
template <class T>
void add_bias(std::int64_t M, std::int64_t N, const T* bias, T* x);
template <class T>
void gelu_forward(std::int64_t n, const T* x, T* y);
template <class T>
void gelu_backward(std::int64_t n, const T* x, const T* dy, T* dx);
template <class T>
void relu_forward(std::int64_t n, const T* x, T* y);
template <class T>
void relu_backward(std::int64_t n, const T* x, const T* dy, T* dx);
/// C_b = beta · C_b for `batch` matrices [M, N] (leading dimension ldc, `stride` elements apart);
/// beta == 0 writes zeros without reading C.
template <class T>
void scale_matrices(std::int64_t batch, std::int64_t M, std::int64_t N, T beta, T* C,
                    std::int64_t ldc, std::int64_t stride);

template <class T>
void softmax_rows(std::int64_t M, std::int64_t N, const T* x, T* y);
template <class T>
void softmax_spread_rows(std::int64_t M, std::int64_t N, T scale, T* x, T* spread);
template <class T>
void log_softmax_rows(std::int64_t M, std::int64_t N, const T* x, T* y);
template <class T>
void softmax_rows_backward(std::int64_t M, std::int64_t N, const T* y, const T* dy, T* dx);
template <class T>
void log_softmax_rows_backward(std::int64_t M, std::int64_t N, const T* y, const T* dy, T* dx);
template <class T>
void layer_norm_forward(std::int64_t M, std::int64_t N, const T* x, const T* gamma, const T* beta,
                        double eps, T* y, compute_t<T>* mean, compute_t<T>* rstd);
template <class T>
void layer_norm_backward(std::int64_t M, std::int64_t N, const T* x, const T* gamma,
                         const compute_t<T>* mean, const compute_t<T>* rstd, const T* dy, T* dx,
                         compute_t<T>* dgamma, compute_t<T>* dbeta);
template <class T>
void add_layer_norm_forward(std::int64_t M, std::int64_t N, const T* x, const T* add,
                            const T* gamma, const T* beta, double eps, T* sum, T* y,
                            compute_t<T>* mean, compute_t<T>* rstd);
template <class T>
void layer_norm_backward_add(std::int64_t M, std::int64_t N, const T* x, const T* gamma,
                             const compute_t<T>* mean, const compute_t<T>* rstd, const T* dy,
                             const T* residual, T* dx, compute_t<T>* dgamma, compute_t<T>* dbeta);
template <class T>
void l2_normalize_rows_forward(std::int64_t M, std::int64_t N, const T* x, double eps, T* y,
                               compute_t<T>* norm);
template <class T>
void l2_normalize_rows_backward(std::int64_t M, std::int64_t N, const T* y,
                                const compute_t<T>* norm, double eps, const T* dy, T* dx);
template <class T>
void l1_normalize_rows(std::int64_t M, std::int64_t N, double eps, T* x);

/// y of x's type, or float for bf16 x (a parameter's float gradient).
template <class T, class Y>
void sum_middle(std::int64_t outer, std::int64_t n, std::int64_t inner, Y alpha, const T* x, Y beta,
                Y* y);
template <class T>
double sum_squares(std::int64_t n, const T* x);
/// The partial sums of Σ x² (sum_blocks(n) of them, in device memory), queued without waiting.
template <class T>
void sum_squares_partials(std::int64_t n, const T* x, double* partial);
/// Number of partial sums a deferred reduction of n terms writes.
std::int64_t sum_blocks(std::int64_t n);

template <class T>
void gather_rows(std::int64_t M, std::int64_t C, const T* src, std::int64_t rows,
                 const std::int32_t* idx, T* dst);
template <class T>
void scatter_add_rows(std::int64_t M, std::int64_t C, const T* src, const std::int32_t* idx,
                      std::int64_t rows, T* dst);

template <class T>
void copy_strided(std::int64_t count, std::int64_t rows, std::int64_t cols, const T* src,
                  std::int64_t src_ld, std::int64_t src_stride, T* dst, std::int64_t dst_ld,
                  std::int64_t dst_stride, bool accumulate);
template <class T>
void patchify(std::int64_t N, std::int64_t C, std::int64_t H, std::int64_t W, std::int64_t p,
              const T* images, T* patches);
template <class T>
void unpatchify(std::int64_t N, std::int64_t C, std::int64_t H, std::int64_t W, std::int64_t p,
                const T* patches, T* images);

template <class T>
void row_max(std::int64_t M, std::int64_t N, const T* x, T* y);
template <class T>
void batch_norm_forward(std::int64_t M, std::int64_t N, const T* x, const T* gamma, const T* beta,
                        double eps, T* y, compute_t<T>* mean, compute_t<T>* var);
template <class T>
void batch_norm_backward(std::int64_t M, std::int64_t N, const T* x, const T* gamma,
                         const compute_t<T>* mean, const compute_t<T>* var, double eps, const T* dy,
                         T* dx, compute_t<T>* dgamma, compute_t<T>* dbeta);
template <class T>
double xlogy_sum(std::int64_t n, const T* x, const T* y);
template <class T>
double soft_target_rows(std::int64_t M, std::int64_t K, const T* z, const T* t, std::int64_t R,
                        const std::int32_t* idx, bool entropy, T s, T* dz);
/// The same with the loss left on the device as sum_blocks(M) partial sums at `partial`.
template <class T>
void soft_target_rows_partials(std::int64_t M, std::int64_t K, const T* z, const T* t,
                               std::int64_t R, const std::int32_t* idx, bool entropy, T s, T* dz,
                               double* partial);

/// AdamW with the gradient's type G: T, or bf16 for float weights (models keep float gradients;
/// ops::adamw allows a narrower one).
template <class T, class G>
void adamw(std::int64_t n, T* p, const G* g, T* m, T* v, double lr, double beta1, double beta2,
           double eps, double weight_decay, std::int64_t step);
/// y = x in y's type: defined for float → bf16 (rounding to nearest even) and bf16 → float.
template <class S, class T>
void convert(std::int64_t n, const S* x, T* y);

/// Fused attention (kernels/attention.cuh): ctx and the log-sum-exp of each score row, lse
/// [B, H, S]; the probabilities are recomputed by the backward, which needs ctx and writes the
/// row terms δ = rowsum(dctx ∘ ctx) [B, H, S] on the way. lse and δ hold compute_t<T> values
/// (float for bf16, in a buffer of 2·S bf16 elements per row).
template <class T>
void attention_forward(std::int64_t B, std::int64_t H, std::int64_t S, std::int64_t hd, T scale,
                       const T* qkv, T* lse, T* ctx);
template <class T>
void attention_backward(std::int64_t B, std::int64_t H, std::int64_t S, std::int64_t hd, T scale,
                        const T* qkv, const T* lse, const T* ctx, const T* dctx, T* delta,
                        T* dqkv);

/// y = x rounded to bf16 (to nearest, ties to even), as raw 16-bit patterns.
void float_to_bf16(std::int64_t n, const float* x, std::uint16_t* y);

namespace detail {

/// cuBLAS takes 32-bit sizes; larger ones are refused rather than truncated.
inline int blas_int(std::int64_t v, const char* what) {
  MOCA_CHECK(v >= 0 && v <= std::numeric_limits<int>::max(), "gemm on CUDA: ", what, " = ", v,
             " is outside the 32-bit range cuBLAS accepts");
  return static_cast<int>(v);
}

inline cublasOperation_t blas_op(bool trans) { return trans ? CUBLAS_OP_T : CUBLAS_OP_N; }

/// The leading dimension cuBLAS gets for a row-major operand [rows, cols]. cuBLAS wants at least
/// max(1, cols) even where it never steps by it (a single row), and cannot read a broadcast row
/// (ld 0, which ops::strided_batch allows for copies).
inline int blas_ld(std::int64_t rows, std::int64_t cols, std::int64_t ld, const char* what) {
  const std::int64_t need = std::max<std::int64_t>(cols, 1);
  if (rows <= 1) return blas_int(std::max(ld, need), what);
  MOCA_CHECK(ld >= need, "gemm on CUDA: ", what, " = ", ld, " is below the row length ", cols,
             " (a broadcast row); cuBLAS cannot read that layout");
  return blas_int(ld, what);
}

/// Elements a cuBLAS operand spans: `rows` stored rows of `cols`, `ld` apart.
inline std::int64_t blas_extent(std::int64_t rows, std::int64_t cols, std::int64_t ld) {
  return rows <= 0 || cols <= 0 ? 0 : (rows - 1) * ld + cols;
}

/// A row-major product as cuBLAS sees it (column-major).
///
/// A row-major matrix X [r, c] with leading dimension ld is, read column-major, Xᵀ [c, r] with
/// the same ld. So the row-major product C = op(A) · op(B) is computed as the column-major
/// Cᵀ = op(B)ᵀ · op(A)ᵀ: B comes first, A second, each with its own transpose flag, and the
/// column-major sizes are (m, n, k) = (N, M, K). Leading dimensions pass through unchanged.
struct ColumnMajorProduct {
  int m, n, k, lda, ldb, ldc;  // lda is B's, ldb is A's: cuBLAS's first and second operands
  cublasOperation_t op_a, op_b;
  std::int64_t extent_a, extent_b;  // elements the two operands span

  ColumnMajorProduct(bool trans_a, bool trans_b, std::int64_t M, std::int64_t N, std::int64_t K,
                     std::int64_t lda_rm, std::int64_t ldb_rm, std::int64_t ldc_rm)
      : m(blas_int(N, "N")), n(blas_int(M, "M")), k(blas_int(K, "K")) {
    // Stored (row-major) shapes: A is [M, K] or [K, M], B is [K, N] or [N, K], C is [M, N].
    ldb = blas_ld(trans_a ? K : M, trans_a ? M : K, lda_rm, "lda");
    lda = blas_ld(trans_b ? N : K, trans_b ? K : N, ldb_rm, "ldb");
    ldc = blas_ld(M, N, ldc_rm, "ldc");
    op_a = blas_op(trans_b);
    op_b = blas_op(trans_a);
    extent_a = blas_extent(trans_b ? N : K, trans_b ? K : N, lda);
    extent_b = blas_extent(trans_a ? K : M, trans_a ? M : K, ldb);
  }
};

/// cuBLAS's two operands rounded to bf16 in the context's workspace (same layouts): the bf16
/// mode's inputs. Stream order keeps the workspace's users apart; the second starts 16-byte
/// aligned.
struct Bf16Operands {
  const std::uint16_t* first;
  const std::uint16_t* second;
};
inline Bf16Operands round_operands_to_bf16(const ColumnMajorProduct& p, const float* first,
                                           const float* second) {
  const std::int64_t offset = (p.extent_a + 7) / 8 * 8;
  auto* a16 = static_cast<std::uint16_t*>(Context::get().workspace(
      sizeof(std::uint16_t) * static_cast<std::size_t>(offset + p.extent_b)));
  std::uint16_t* b16 = a16 + offset;
  float_to_bf16(p.extent_a, first, a16);
  float_to_bf16(p.extent_b, second, b16);
  return {a16, b16};
}

/// The cuBLASLt problem of a column-major product p of operands `first` and `second` (cuBLAS's
/// order: B, then A) into C, their alignments read off the pointers; scales in fp32.
inline LtProblem lt_problem(const ColumnMajorProduct& p, cudaDataType_t in, cudaDataType_t out,
                            cublasComputeType_t compute, const void* first, const void* second,
                            const void* C, cublasLtEpilogue_t epilogue) {
  return LtProblem{in,
                   out,
                   compute,
                   CUDA_R_32F,
                   p.op_a,
                   p.op_b,
                   p.m,
                   p.n,
                   p.k,
                   p.lda,
                   p.ldb,
                   p.ldc,
                   pointer_alignment(first),
                   pointer_alignment(second),
                   pointer_alignment(C),
                   epilogue};
}

/// Row-major, batched C = alpha · op(A) · op(B) + beta · C on cuBLAS (see ColumnMajorProduct).
/// C is of the operands' type G = T, or float for bf16 operands (a parameter's float gradient).
template <class T, class G>
void gemm(bool trans_a, bool trans_b, std::int64_t M, std::int64_t N, std::int64_t K, G alpha,
          const T* A, std::int64_t lda, std::int64_t stride_a, const T* B, std::int64_t ldb,
          std::int64_t stride_b, G beta, G* C, std::int64_t ldc, std::int64_t stride_c,
          std::int64_t batch) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, bf16>,
                "THE_CUDA_GEMM_SUPPORTS_FLOAT_DOUBLE_AND_BF16");
  static_assert(std::is_same_v<G, T> || (std::is_same_v<T, bf16> && std::is_same_v<G, float>),
                "THE_CUDA_GEMM_WRITES_THE_OPERANDS_TYPE_OR_FLOAT_FOR_BF16");
  if (M == 0 || N == 0 || batch == 0) return;
  if (K == 0 || alpha == T(0)) {
    // No product to add: C = beta · C, and beta == 0 overwrites C (NaN included), as in BLAS.
    scale_matrices(batch, M, N, beta, C, ldc, stride_c);
    return;
  }
  const ColumnMajorProduct p(trans_a, trans_b, M, N, K, lda, ldb, ldc);
  Context& ctx = Context::get();
  cublasHandle_t handle = ctx.cublas();
  if constexpr (std::is_same_v<T, bf16>) {
    // bf16 storage: bf16 × bf16 on the tensor cores, accumulated in fp32, and C either rounded
    // once to bf16 or (a float gradient) kept in fp32.
    const float a = alpha, b = beta;
    const cudaDataType_t c_type = std::is_same_v<G, float> ? CUDA_R_32F : CUDA_R_16BF;
    if (batch == 1 && ctx.gemm_tuning() > 1) {
      // Tuned plans live in cuBLASLt (lt_matmul.hpp); cuBLAS's own choice is not tunable.
      const LtProblem problem = lt_problem(p, CUDA_R_16BF, c_type, CUBLAS_COMPUTE_32F, B, A, C,
                                           CUBLASLT_EPILOGUE_DEFAULT);
      if (LtMatmul::get().run(problem, &a, B, A, &b, C)) return;
    }
    if (batch == 1) {
      MOCA_CUBLAS_CHECK(cublasGemmEx(handle, p.op_a, p.op_b, p.m, p.n, p.k, &a, B, CUDA_R_16BF,
                                     p.lda, A, CUDA_R_16BF, p.ldb, &b, C, c_type, p.ldc,
                                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    } else {
      MOCA_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
          handle, p.op_a, p.op_b, p.m, p.n, p.k, &a, B, CUDA_R_16BF, p.lda, stride_b, A,
          CUDA_R_16BF, p.ldb, stride_a, &b, C, c_type, p.ldc, stride_c, blas_int(batch, "batch"),
          CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }
    return;
  }
  if (batch == 1) {
    if constexpr (std::is_same_v<T, float>) {
      if (ctx.float_matmul() == FloatMatmul::Bf16) {
        // A bf16 × bf16 product accumulated and written in fp32.
        const Bf16Operands in = round_operands_to_bf16(p, B, A);
        MOCA_CUBLAS_CHECK(cublasGemmEx(handle, p.op_a, p.op_b, p.m, p.n, p.k, &alpha, in.first,
                                       CUDA_R_16BF, p.lda, in.second, CUDA_R_16BF, p.ldb, &beta,
                                       C, CUDA_R_32F, p.ldc, CUBLAS_COMPUTE_32F,
                                       CUBLAS_GEMM_DEFAULT));
        return;
      }
      MOCA_CUBLAS_CHECK(cublasSgemm(handle, p.op_a, p.op_b, p.m, p.n, p.k, &alpha, B, p.lda, A,
                                    p.ldb, &beta, C, p.ldc));
    } else if constexpr (std::is_same_v<T, double>) {
      MOCA_CUBLAS_CHECK(cublasDgemm(handle, p.op_a, p.op_b, p.m, p.n, p.k, &alpha, B, p.lda, A,
                                    p.ldb, &beta, C, p.ldc));
    }
    return;
  }
  const int count = blas_int(batch, "batch");
  if constexpr (std::is_same_v<T, float>) {
    MOCA_CUBLAS_CHECK(cublasSgemmStridedBatched(handle, p.op_a, p.op_b, p.m, p.n, p.k, &alpha, B,
                                                p.lda, stride_b, A, p.ldb, stride_a, &beta, C,
                                                p.ldc, stride_c, count));
  } else if constexpr (std::is_same_v<T, double>) {
    MOCA_CUBLAS_CHECK(cublasDgemmStridedBatched(handle, p.op_a, p.op_b, p.m, p.n, p.k, &alpha, B,
                                                p.lda, stride_b, A, p.ldb, stride_a, &beta, C,
                                                p.ldc, stride_c, count));
  }
}

/// Row-major C = op(A) · op(B) + bias (+ residual) as one cuBLASLt product whose epilogue adds
/// the bias as C is stored, computing as the float matmul mode says (bf16: fp32 accumulation, the
/// bias and residual added before the one rounding); the residual ([M, N], rows ldc apart like
/// C) is the product's C operand (beta = 1) and C its D. False, having queued nothing, for
/// double, a bias that is not 16-byte aligned (the epilogue needs it), or where cuBLASLt offers
/// no algorithm.
template <class T>
bool lt_gemm_bias(bool trans_a, bool trans_b, std::int64_t M, std::int64_t N, std::int64_t K,
                  const T* A, std::int64_t lda, const T* B, std::int64_t ldb, const T* bias,
                  const T* residual, T* C, std::int64_t ldc) {
  if constexpr (std::is_same_v<T, double>) {
    return false;
  } else {
    if (M <= 0 || N <= 0 || K <= 0 || pointer_alignment(bias) < 16) return false;
    const ColumnMajorProduct p(trans_a, trans_b, M, N, K, lda, ldb, ldc);
    LtProblem problem;
    const void* first = B;
    const void* second = A;
    if constexpr (std::is_same_v<T, bf16>) {
      problem = lt_problem(p, CUDA_R_16BF, CUDA_R_16BF, CUBLAS_COMPUTE_32F, B, A, C,
                           CUBLASLT_EPILOGUE_BIAS);
    } else {
      const FloatMatmul mode = Context::get().float_matmul();
      problem =
          lt_problem(p, CUDA_R_32F, CUDA_R_32F,
                     mode == FloatMatmul::Tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F,
                     B, A, C, CUBLASLT_EPILOGUE_BIAS);
      if (mode == FloatMatmul::Bf16) {
        const Bf16Operands in = round_operands_to_bf16(p, B, A);
        problem.in_type = CUDA_R_16BF;
        problem.align_a = pointer_alignment(in.first);
        problem.align_b = pointer_alignment(in.second);
        first = in.first;
        second = in.second;
      }
    }
    const float one = 1.0f, zero = 0.0f;
    if (residual == nullptr)
      return LtMatmul::get().run(problem, &one, first, second, &zero, C, bias);
    problem.align_c = std::min(problem.align_c, pointer_alignment(residual));
    return LtMatmul::get().run(problem, &one, first, second, &one, const_cast<T*>(residual), bias,
                               C);
  }
}

/// Row-major C = op(A) · op(B) + bias (bias [N] added to every row): lt_gemm_bias where it
/// applies; for double, or where cuBLASLt offers no algorithm (or the bias is not 16-byte
/// aligned), a product and then add_bias.
template <class T>
void gemm_bias(bool trans_a, bool trans_b, std::int64_t M, std::int64_t N, std::int64_t K,
               const T* A, std::int64_t lda, const T* B, std::int64_t ldb, const T* bias, T* C,
               std::int64_t ldc) {
  if (lt_gemm_bias<T>(trans_a, trans_b, M, N, K, A, lda, B, ldb, bias, nullptr, C, ldc)) return;
  gemm(trans_a, trans_b, M, N, K, T(1), A, lda, 0, B, ldb, 0, T(0), C, ldc, 0, 1);
  if (ldc == N)
    add_bias(M, N, bias, C);
  else  // rows of C wider than N: the bias row broadcast (ld 0) and added row by row
    copy_strided<T>(1, M, N, bias, 0, 0, C, ldc, 0, /*accumulate=*/true);
}

/// A bf16 Linear's float parameter gradients from one pass over its output gradient, where
/// Context::fused_bias_grads() asks for it: dW (row-major [N, K]) = dyᵀ · x + dW, dy [M, N] and
/// x [M, K], on cuBLASLt with the BGRADB epilogue, which also sums dy's rows as the product reads
/// them; those sums go to the workspace and are then added to db. Returns false, having queued
/// nothing, where it does not apply or cuBLASLt offers no algorithm (the caller composes the
/// product and the column sums).
inline bool linear_grads(std::int64_t M, std::int64_t N, std::int64_t K, const bf16* dy,
                         std::int64_t ldy, const bf16* x, std::int64_t ldx, float* dW,
                         std::int64_t lddw, float* db) {
  Context& ctx = Context::get();
  if (!ctx.fused_bias_grads() || M <= 0 || N <= 0 || K <= 0) return false;
  const ColumnMajorProduct p(/*trans_a=*/true, /*trans_b=*/false, N, K, M, ldy, ldx, lddw);
  // cuBLAS's operands are x then dy: dy is cuBLASLt's B, reduced over k (the rows) into [N].
  const LtProblem problem = lt_problem(p, CUDA_R_16BF, CUDA_R_32F, CUBLAS_COMPUTE_32F, x, dy, dW,
                                       CUBLASLT_EPILOGUE_BGRADB);
  auto* sums = static_cast<float*>(ctx.workspace(sizeof(float) * static_cast<std::size_t>(N)));
  const float one = 1.0f;
  if (!LtMatmul::get().run(problem, &one, x, dy, &one, dW, sums)) return false;
  axpby(N, 1.0f, sums, 1.0f, db);
  ctx.count_fused_bias_grad();
  return true;
}

}  // namespace detail
}  // namespace moca::cuda

namespace moca {

template <>
struct Backend<Cuda> {
  /// C of type G: T, or float for bf16 operands (see ops::gemm).
  template <class T, class G>
  static void gemm(bool ta, bool tb, std::int64_t M, std::int64_t N, std::int64_t K, G alpha,
                   const T* A, std::int64_t lda, const T* B, std::int64_t ldb, G beta, G* C,
                   std::int64_t ldc) {
    cuda::detail::gemm(ta, tb, M, N, K, alpha, A, lda, 0, B, ldb, 0, beta, C, ldc, 0, 1);
  }
  /// C = op(A) · op(B) + bias + residual in one cuBLASLt product (the residual read as its C)
  /// where Context::fused_residual() asks for it and cuBLASLt offers one; false: the op composes.
  template <class T>
  static bool gemm_bias_residual(bool ta, bool tb, std::int64_t M, std::int64_t N, std::int64_t K,
                                 const T* A, std::int64_t lda, const T* B, std::int64_t ldb,
                                 const T* bias, const T* residual, T* C, std::int64_t ldc) {
    if (!cuda::Context::get().fused_residual()) return false;
    return cuda::detail::lt_gemm_bias(ta, tb, M, N, K, A, lda, B, ldb, bias, residual, C, ldc);
  }
  /// A Linear's weight and bias gradients from one pass over dy, where it applies (bf16 values,
  /// float gradients, Context::fused_bias_grads()); false: the op composes them. See
  /// cuda::detail::linear_grads.
  template <class T, class G>
  static bool linear_grads(std::int64_t M, std::int64_t N, std::int64_t K, const T* dy,
                           std::int64_t ldy, const T* x, std::int64_t ldx, G* dW, std::int64_t lddw,
                           G* db) {
    if constexpr (std::is_same_v<T, bf16> && std::is_same_v<G, float>)
      return cuda::detail::linear_grads(M, N, K, dy, ldy, x, ldx, dW, lddw, db);
    return false;
  }
  /// C = op(A) · op(B) + bias in one cuBLASLt call (bias epilogue) where it can; see
  /// cuda::detail::gemm_bias.
  template <class T>
  static void gemm_bias(bool ta, bool tb, std::int64_t M, std::int64_t N, std::int64_t K,
                        const T* A, std::int64_t lda, const T* B, std::int64_t ldb, const T* bias,
                        T* C, std::int64_t ldc) {
    cuda::detail::gemm_bias(ta, tb, M, N, K, A, lda, B, ldb, bias, C, ldc);
  }
  template <class T>
  static void gemm_strided_batched(bool ta, bool tb, std::int64_t M, std::int64_t N,
                                   std::int64_t K, T alpha, const T* A, std::int64_t lda,
                                   std::int64_t sa, const T* B, std::int64_t ldb, std::int64_t sb,
                                   T beta, T* C, std::int64_t ldc, std::int64_t sc,
                                   std::int64_t batch) {
    cuda::detail::gemm(ta, tb, M, N, K, alpha, A, lda, sa, B, ldb, sb, beta, C, ldc, sc, batch);
  }
  template <class T>
  static void fill(std::int64_t n, T value, T* x) { cuda::fill(n, value, x); }
  template <class T>
  static void axpby(std::int64_t n, T alpha, const T* x, T beta, T* y) {
    cuda::axpby(n, alpha, x, beta, y);
  }
  template <class T>
  static void scale(std::int64_t n, T alpha, T* x) { cuda::scale(n, alpha, x); }
  template <class T>
  static void add(std::int64_t n, const T* a, const T* b, T* y) { cuda::add(n, a, b, y); }
  template <class T>
  static void mul(std::int64_t n, const T* a, const T* b, T* y) { cuda::mul(n, a, b, y); }
  template <class T>
  static void add_bias(std::int64_t M, std::int64_t N, const T* bias, T* x) {
    cuda::add_bias(M, N, bias, x);
  }
  template <class T>
  static void gelu_forward(std::int64_t n, const T* x, T* y) { cuda::gelu_forward(n, x, y); }
  template <class T>
  static void gelu_backward(std::int64_t n, const T* x, const T* dy, T* dx) {
    cuda::gelu_backward(n, x, dy, dx);
  }
  template <class T>
  static void relu_forward(std::int64_t n, const T* x, T* y) { cuda::relu_forward(n, x, y); }
  template <class T>
  static void relu_backward(std::int64_t n, const T* x, const T* dy, T* dx) {
    cuda::relu_backward(n, x, dy, dx);
  }
  template <class T>
  static void softmax_rows(std::int64_t M, std::int64_t N, const T* x, T* y) {
    cuda::softmax_rows(M, N, x, y);
  }
  /// ops::softmax_with_spread in one kernel (three reads and two writes of each row).
  template <class T>
  static void softmax_spread_rows(std::int64_t M, std::int64_t N, T scale, T* x, T* spread) {
    cuda::softmax_spread_rows(M, N, scale, x, spread);
  }
  template <class T>
  static void log_softmax_rows(std::int64_t M, std::int64_t N, const T* x, T* y) {
    cuda::log_softmax_rows(M, N, x, y);
  }
  template <class T>
  static void softmax_rows_backward(std::int64_t M, std::int64_t N, const T* y, const T* dy,
                                    T* dx) {
    cuda::softmax_rows_backward(M, N, y, dy, dx);
  }
  template <class T>
  static void log_softmax_rows_backward(std::int64_t M, std::int64_t N, const T* y, const T* dy,
                                        T* dx) {
    cuda::log_softmax_rows_backward(M, N, y, dy, dx);
  }
  template <class T>
  static void layer_norm_forward(std::int64_t M, std::int64_t N, const T* x, const T* gamma,
                                 const T* beta, double eps, T* y, compute_t<T>* mean,
                                 compute_t<T>* rstd) {
    cuda::layer_norm_forward(M, N, x, gamma, beta, eps, y, mean, rstd);
  }
  template <class T>
  static void layer_norm_backward(std::int64_t M, std::int64_t N, const T* x, const T* gamma,
                                  const compute_t<T>* mean, const compute_t<T>* rstd, const T* dy,
                                  T* dx, compute_t<T>* dgamma, compute_t<T>* dbeta) {
    cuda::layer_norm_backward(M, N, x, gamma, mean, rstd, dy, dx, dgamma, dbeta);
  }
  /// Fused forms of ops::add_layer_norm and ops::layer_norm_backward_add.
  template <class T>
  static void add_layer_norm_forward(std::int64_t M, std::int64_t N, const T* x, const T* add,
                                     const T* gamma, const T* beta, double eps, T* sum, T* y,
                                     compute_t<T>* mean, compute_t<T>* rstd) {
    cuda::add_layer_norm_forward(M, N, x, add, gamma, beta, eps, sum, y, mean, rstd);
  }
  template <class T>
  static void layer_norm_backward_add(std::int64_t M, std::int64_t N, const T* x, const T* gamma,
                                      const compute_t<T>* mean, const compute_t<T>* rstd,
                                      const T* dy, const T* residual, T* dx, compute_t<T>* dgamma,
                                      compute_t<T>* dbeta) {
    cuda::layer_norm_backward_add(M, N, x, gamma, mean, rstd, dy, residual, dx, dgamma, dbeta);
  }
  template <class T>
  static void l2_normalize_rows_forward(std::int64_t M, std::int64_t N, const T* x, double eps,
                                        T* y, compute_t<T>* norm) {
    cuda::l2_normalize_rows_forward(M, N, x, eps, y, norm);
  }
  template <class T>
  static void l2_normalize_rows_backward(std::int64_t M, std::int64_t N, const T* y,
                                         const compute_t<T>* norm, double eps, const T* dy, T* dx) {
    cuda::l2_normalize_rows_backward(M, N, y, norm, eps, dy, dx);
  }
  template <class T>
  static void l1_normalize_rows(std::int64_t M, std::int64_t N, double eps, T* x) {
    cuda::l1_normalize_rows(M, N, eps, x);
  }
  template <class T, class Y>
  static void sum_middle(std::int64_t outer, std::int64_t n, std::int64_t inner, Y alpha,
                         const T* x, Y beta, Y* y) {
    cuda::sum_middle(outer, n, inner, alpha, x, beta, y);
  }
  /// Waits for the stream: the sum is returned to the host.
  template <class T>
  static double sum_squares(std::int64_t n, const T* x) { return cuda::sum_squares(n, x); }
  /// Deferred reductions (PendingValues): partial sums left on the device, added on the host in
  /// the order the waiting forms add them, so both give the same total.
  static std::int64_t sum_partials(std::int64_t n) { return cuda::sum_blocks(n); }
  template <class T>
  static void sum_squares_partials(std::int64_t n, const T* x, double* partial) {
    cuda::sum_squares_partials(n, x, partial);
  }
  /// Indices live on the device and are not checked there (the CPU backend checks them); see
  /// kernels/index.cuh for what an out-of-range index does.
  template <class T>
  static void gather_rows(std::int64_t M, std::int64_t C, const T* src, std::int64_t rows,
                          const std::int32_t* idx, T* dst) {
    cuda::gather_rows(M, C, src, rows, idx, dst);
  }
  /// Repeated indices accumulate with atomicAdd: the order of the additions, and so the last
  /// bits of the result, may differ from run to run.
  template <class T>
  static void scatter_add_rows(std::int64_t M, std::int64_t C, const T* src,
                               const std::int32_t* idx, std::int64_t rows, T* dst) {
    cuda::scatter_add_rows(M, C, src, idx, rows, dst);
  }
  template <class T>
  static void copy_strided(std::int64_t count, std::int64_t rows, std::int64_t cols, const T* src,
                           std::int64_t src_ld, std::int64_t src_stride, T* dst,
                           std::int64_t dst_ld, std::int64_t dst_stride, bool accumulate) {
    cuda::copy_strided(count, rows, cols, src, src_ld, src_stride, dst, dst_ld, dst_stride,
                       accumulate);
  }
  template <class T>
  static void patchify(std::int64_t N, std::int64_t C, std::int64_t H, std::int64_t W,
                       std::int64_t p, const T* images, T* patches) {
    cuda::patchify(N, C, H, W, p, images, patches);
  }
  template <class T>
  static void unpatchify(std::int64_t N, std::int64_t C, std::int64_t H, std::int64_t W,
                         std::int64_t p, const T* patches, T* images) {
    cuda::unpatchify(N, C, H, W, p, patches, images);
  }
  template <class T>
  static void row_max(std::int64_t M, std::int64_t N, const T* x, T* y) {
    cuda::row_max(M, N, x, y);
  }
  template <class T>
  static void batch_norm_forward(std::int64_t M, std::int64_t N, const T* x, const T* gamma,
                                 const T* beta, double eps, T* y, compute_t<T>* mean,
                                 compute_t<T>* var) {
    cuda::batch_norm_forward(M, N, x, gamma, beta, eps, y, mean, var);
  }
  template <class T>
  static void batch_norm_backward(std::int64_t M, std::int64_t N, const T* x, const T* gamma,
                                  const compute_t<T>* mean, const compute_t<T>* var, double eps,
                                  const T* dy, T* dx, compute_t<T>* dgamma, compute_t<T>* dbeta) {
    cuda::batch_norm_backward(M, N, x, gamma, mean, var, eps, dy, dx, dgamma, dbeta);
  }
  /// Waits for the stream: the sum is returned to the host.
  template <class T>
  static double xlogy_sum(std::int64_t n, const T* x, const T* y) {
    return cuda::xlogy_sum(n, x, y);
  }
  /// Waits for the stream: the loss is returned to the host. A target row index outside
  /// [0, R) makes that row's loss and gradient NaN (kernels/losses.cuh).
  template <class T>
  static double soft_target_rows(std::int64_t M, std::int64_t K, const T* z, const T* t,
                                 std::int64_t R, const std::int32_t* idx, bool entropy, T s,
                                 T* dz) {
    return cuda::soft_target_rows(M, K, z, t, R, idx, entropy, s, dz);
  }
  template <class T>
  static void soft_target_rows_partials(std::int64_t M, std::int64_t K, const T* z, const T* t,
                                        std::int64_t R, const std::int32_t* idx, bool entropy, T s,
                                        T* dz, double* partial) {
    cuda::soft_target_rows_partials(M, K, z, t, R, idx, entropy, s, dz, partial);
  }
  template <class T, class G>
  static void adamw(std::int64_t n, T* p, const G* g, T* m, T* v, double lr, double beta1,
                    double beta2, double eps, double weight_decay, std::int64_t step) {
    cuda::adamw(n, p, g, m, v, lr, beta1, beta2, eps, weight_decay, step);
  }
  template <class S, class T>
  static void convert(std::int64_t n, const S* x, T* y) { cuda::convert(n, x, y); }

  // Fused attention: the forward keeps the rows' log-sum-exp [B, H, S] (in compute_t<T>), not
  // the probabilities.
  static constexpr bool attention_saves_lse = true;
  template <class T>
  static void attention_forward(std::int64_t B, std::int64_t H, std::int64_t S, std::int64_t hd,
                                T scale, const T* qkv, T* lse, T* ctx) {
    cuda::attention_forward(B, H, S, hd, scale, qkv, lse, ctx);
  }
  template <class T>
  static void attention_backward(std::int64_t B, std::int64_t H, std::int64_t S, std::int64_t hd,
                                 T scale, const T* qkv, const T* lse, const T* ctx,
                                 const T* dctx, T* delta, T* dqkv) {
    cuda::attention_backward(B, H, S, hd, scale, qkv, lse, ctx, dctx, delta, dqkv);
  }
};

}  // namespace moca
