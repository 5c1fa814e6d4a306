// Explicit instantiations of every kernel wrapper declared in backend/cuda/backend.hpp, for float
// and double, and for bf16 storage (with the mixed-precision ones: float master weights and
// gradients, bf16 values).
// src/cuda/kernels.cu includes this file once, so the kernels are compiled once into
// moca_cuda_kernels and ordinary C++ files only need the declarations.
#pragma once

#include <cstdint>

#include "moca/backend/cuda/backend.hpp"
#include "moca/backend/cuda/kernels/attention.cuh"
#include "moca/backend/cuda/kernels/convert.cuh"
#include "moca/backend/cuda/kernels/elementwise.cuh"
#include "moca/backend/cuda/kernels/index.cuh"
#include "moca/backend/cuda/kernels/layout.cuh"
#include "moca/backend/cuda/kernels/losses.cuh"
#include "moca/backend/cuda/kernels/optim.cuh"
#include "moca/backend/cuda/kernels/reduce.cuh"
#include "moca/backend/cuda/kernels/rows.cuh"
#include "moca/backend/cuda/kernels/stats.cuh"

#define MOCA_CUDA_INSTANTIATE(T)                                                                  \
  template void fill<T>(std::int64_t, T, T*);                                                     \
  template void axpby<T>(std::int64_t, T, const T*, T, T*);                                       \
  template void scale<T>(std::int64_t, T, T*);                                                    \
  template void add<T>(std::int64_t, const T*, const T*, T*);                                     \
  template void mul<T>(std::int64_t, const T*, const T*, T*);                                     \
  template void add_bias<T>(std::int64_t, std::int64_t, const T*, T*);                            \
  template void gelu_forward<T>(std::int64_t, const T*, T*);                                      \
  template void gelu_backward<T>(std::int64_t, const T*, const T*, T*);                           \
  template void relu_forward<T>(std::int64_t, const T*, T*);                                      \
  template void relu_backward<T>(std::int64_t, const T*, const T*, T*);                           \
  template void scale_matrices<T>(std::int64_t, std::int64_t, std::int64_t, T, T*, std::int64_t,  \
                                  std::int64_t);                                                  \
  template void softmax_rows<T>(std::int64_t, std::int64_t, const T*, T*);                        \
  template void softmax_spread_rows<T>(std::int64_t, std::int64_t, T, T*, T*);                    \
  template void log_softmax_rows<T>(std::int64_t, std::int64_t, const T*, T*);                    \
  template void softmax_rows_backward<T>(std::int64_t, std::int64_t, const T*, const T*, T*);     \
  template void log_softmax_rows_backward<T>(std::int64_t, std::int64_t, const T*, const T*, T*); \
  template void layer_norm_forward<T>(std::int64_t, std::int64_t, const T*, const T*, const T*,   \
                                      double, T*, T*, T*);                                        \
  template void layer_norm_backward<T>(std::int64_t, std::int64_t, const T*, const T*, const T*,  \
                                       const T*, const T*, T*, T*, T*);                           \
  template void add_layer_norm_forward<T>(std::int64_t, std::int64_t, const T*, const T*,         \
                                          const T*, const T*, double, T*, T*, T*, T*);            \
  template void layer_norm_backward_add<T>(std::int64_t, std::int64_t, const T*, const T*,        \
                                           const T*, const T*, const T*, const T*, T*, T*, T*);   \
  template void l2_normalize_rows_forward<T>(std::int64_t, std::int64_t, const T*, double, T*,    \
                                             T*);                                                 \
  template void l2_normalize_rows_backward<T>(std::int64_t, std::int64_t, const T*, const T*,     \
                                              double, const T*, T*);                              \
  template void l1_normalize_rows<T>(std::int64_t, std::int64_t, double, T*);                     \
  template void sum_middle<T, T>(std::int64_t, std::int64_t, std::int64_t, T, const T*, T, T*);   \
  template double sum_squares<T>(std::int64_t, const T*);                                         \
  template void sum_squares_partials<T>(std::int64_t, const T*, double*);                         \
  template void gather_rows<T>(std::int64_t, std::int64_t, const T*, std::int64_t,                \
                               const std::int32_t*, T*);                                          \
  template void scatter_add_rows<T>(std::int64_t, std::int64_t, const T*, const std::int32_t*,    \
                                    std::int64_t, T*);                                            \
  template void copy_strided<T>(std::int64_t, std::int64_t, std::int64_t, const T*, std::int64_t, \
                                std::int64_t, T*, std::int64_t, std::int64_t, bool);              \
  template void patchify<T>(std::int64_t, std::int64_t, std::int64_t, std::int64_t, std::int64_t, \
                            const T*, T*);                                                        \
  template void unpatchify<T>(std::int64_t, std::int64_t, std::int64_t, std::int64_t,             \
                              std::int64_t, const T*, T*);                                        \
  template void row_max<T>(std::int64_t, std::int64_t, const T*, T*);                             \
  template void batch_norm_forward<T>(std::int64_t, std::int64_t, const T*, const T*, const T*,   \
                                      double, T*, T*, T*);                                        \
  template void batch_norm_backward<T>(std::int64_t, std::int64_t, const T*, const T*, const T*,  \
                                       const T*, double, const T*, T*, T*, T*);                   \
  template double xlogy_sum<T>(std::int64_t, const T*, const T*);                                 \
  template double soft_target_rows<T>(std::int64_t, std::int64_t, const T*, const T*,             \
                                      std::int64_t, const std::int32_t*, bool, T, T*);            \
  template void soft_target_rows_partials<T>(std::int64_t, std::int64_t, const T*, const T*,      \
                                             std::int64_t, const std::int32_t*, bool, T, T*,      \
                                             double*);                                            \
  template void adamw<T, T>(std::int64_t, T*, const T*, T*, T*, double, double, double, double,   \
                            double, std::int64_t);                                                \
  template void attention_forward<T>(std::int64_t, std::int64_t, std::int64_t, std::int64_t, T,   \
                                     const T*, T*, T*);                                           \
  template void attention_backward<T>(std::int64_t, std::int64_t, std::int64_t, std::int64_t, T,  \
                                      const T*, const T*, const T*, const T*, T*, T*);

namespace moca::cuda {

std::int64_t sum_blocks(std::int64_t n) { return kernels::sum_blocks(n); }
MOCA_CUDA_INSTANTIATE(float)
MOCA_CUDA_INSTANTIATE(double)
// Mixed precision: bf16 values of float master weights, whose gradients are float. AdamW also
// takes bf16 gradients (ops::adamw allows a narrower gradient).
template void convert<float, bf16>(std::int64_t, const float*, bf16*);
template void convert<bf16, float>(std::int64_t, const bf16*, float*);
template void adamw<float, bf16>(std::int64_t, float*, const bf16*, float*, float*, double,
                                 double, double, double, double, std::int64_t);
// What the bf16 products need besides cuBLAS: C = beta · C without a product, and the bias where
// cuBLASLt's epilogue cannot add it.
template void scale_matrices<bf16>(std::int64_t, std::int64_t, std::int64_t, bf16, bf16*,
                                   std::int64_t, std::int64_t);
template void add_bias<bf16>(std::int64_t, std::int64_t, const bf16*, bf16*);
// The elementwise and row ops in bf16 storage; they compute in float (acc_t) and round what they
// store, as the CPU's bf16 paths do.
template void fill<bf16>(std::int64_t, bf16, bf16*);
template void axpby<bf16>(std::int64_t, bf16, const bf16*, bf16, bf16*);
template void scale<bf16>(std::int64_t, bf16, bf16*);
template void add<bf16>(std::int64_t, const bf16*, const bf16*, bf16*);
template void mul<bf16>(std::int64_t, const bf16*, const bf16*, bf16*);
template void gelu_forward<bf16>(std::int64_t, const bf16*, bf16*);
template void gelu_backward<bf16>(std::int64_t, const bf16*, const bf16*, bf16*);
template void relu_forward<bf16>(std::int64_t, const bf16*, bf16*);
template void relu_backward<bf16>(std::int64_t, const bf16*, const bf16*, bf16*);
template void softmax_rows<bf16>(std::int64_t, std::int64_t, const bf16*, bf16*);
template void softmax_spread_rows<bf16>(std::int64_t, std::int64_t, bf16, bf16*, bf16*);
template void log_softmax_rows<bf16>(std::int64_t, std::int64_t, const bf16*, bf16*);
template void softmax_rows_backward<bf16>(std::int64_t, std::int64_t, const bf16*, const bf16*,
                                          bf16*);
template void log_softmax_rows_backward<bf16>(std::int64_t, std::int64_t, const bf16*,
                                              const bf16*, bf16*);
// Row and column statistics (mean, rstd, var, norm) of bf16 tensors are kept in float, and so
// are the parameter gradients the norms accumulate.
template void layer_norm_forward<bf16>(std::int64_t, std::int64_t, const bf16*, const bf16*,
                                       const bf16*, double, bf16*, float*, float*);
template void layer_norm_backward<bf16>(std::int64_t, std::int64_t, const bf16*, const bf16*,
                                        const float*, const float*, const bf16*, bf16*, float*,
                                        float*);
template void add_layer_norm_forward<bf16>(std::int64_t, std::int64_t, const bf16*, const bf16*,
                                           const bf16*, const bf16*, double, bf16*, bf16*, float*,
                                           float*);
template void layer_norm_backward_add<bf16>(std::int64_t, std::int64_t, const bf16*, const bf16*,
                                            const float*, const float*, const bf16*, const bf16*,
                                            bf16*, float*, float*);
template void l2_normalize_rows_forward<bf16>(std::int64_t, std::int64_t, const bf16*, double,
                                              bf16*, float*);
template void l2_normalize_rows_backward<bf16>(std::int64_t, std::int64_t, const bf16*,
                                               const float*, double, const bf16*, bf16*);
template void l1_normalize_rows<bf16>(std::int64_t, std::int64_t, double, bf16*);
template void sum_middle<bf16, bf16>(std::int64_t, std::int64_t, std::int64_t, bf16, const bf16*,
                                     bf16, bf16*);
// A bias's (or a token's) float gradient summed over bf16 rows.
template void sum_middle<bf16, float>(std::int64_t, std::int64_t, std::int64_t, float, const bf16*,
                                      float, float*);
template double sum_squares<bf16>(std::int64_t, const bf16*);
template void sum_squares_partials<bf16>(std::int64_t, const bf16*, double*);
template void gather_rows<bf16>(std::int64_t, std::int64_t, const bf16*, std::int64_t,
                                const std::int32_t*, bf16*);
template void copy_strided<bf16>(std::int64_t, std::int64_t, std::int64_t, const bf16*,
                                 std::int64_t, std::int64_t, bf16*, std::int64_t, std::int64_t,
                                 bool);
template void patchify<bf16>(std::int64_t, std::int64_t, std::int64_t, std::int64_t,
                             std::int64_t, const bf16*, bf16*);
template void unpatchify<bf16>(std::int64_t, std::int64_t, std::int64_t, std::int64_t,
                               std::int64_t, const bf16*, bf16*);
template void row_max<bf16>(std::int64_t, std::int64_t, const bf16*, bf16*);
template double xlogy_sum<bf16>(std::int64_t, const bf16*, const bf16*);
template void scatter_add_rows<bf16>(std::int64_t, std::int64_t, const bf16*, const std::int32_t*,
                                     std::int64_t, bf16*);
template void batch_norm_forward<bf16>(std::int64_t, std::int64_t, const bf16*, const bf16*,
                                       const bf16*, double, bf16*, float*, float*);
template void batch_norm_backward<bf16>(std::int64_t, std::int64_t, const bf16*, const bf16*,
                                        const float*, const float*, double, const bf16*, bf16*,
                                        float*, float*);
template double soft_target_rows<bf16>(std::int64_t, std::int64_t, const bf16*, const bf16*,
                                       std::int64_t, const std::int32_t*, bool, bf16, bf16*);
template void soft_target_rows_partials<bf16>(std::int64_t, std::int64_t, const bf16*, const bf16*,
                                              std::int64_t, const std::int32_t*, bool, bf16, bf16*,
                                              double*);
// Attention of bf16 heads: bf16 tensor-core products, float scores, lse and δ (kernels/attention.cuh).
template void attention_forward<bf16>(std::int64_t, std::int64_t, std::int64_t, std::int64_t,
                                      bf16, const bf16*, bf16*, bf16*);
template void attention_backward<bf16>(std::int64_t, std::int64_t, std::int64_t, std::int64_t,
                                       bf16, const bf16*, const bf16*, const bf16*, const bf16*,
                                       bf16*, bf16*);
}  // namespace moca::cuda

#undef MOCA_CUDA_INSTANTIATE
