// Soft-target cross-entropy (or KL divergence) of logit rows, fused with its gradient: one block
// per row reads the logits and the (gathered) target row, with the same maths as the CPU kernel
// (backend/cpu/losses.hpp) instead of the composed form's whole-tensor passes. Per-row losses go
// to the context's workspace; their partial sums are added on the host in block order
// (sum_terms_to_host, or later by PendingValues from soft_target_rows_partials), so the total does
// not change from run to run.
#pragma once


#include "moca/backend/cuda/kernels/common.cuh"
#include "moca/backend/cuda/kernels/reduce.cuh"

namespace moca::cuda {
namespace kernels {

// Row r: loss[r] = Σ_k t_k·(lse − z_k) [+ Σ_k t_k log t_k], t = targets[idx ? idx[r] : r];
// dz_r = s·(softmax(z_r) − t) when dz is not null (dz may alias z: each thread reads z[k] before
// it writes dz[k], and the same thread rescales dz[k] later). A target row index outside
// [0, R) makes the row's loss and gradient NaN, so the error surfaces instead of a wrong value.
template <class T>
__global__ void soft_target_rows_kernel(std::int64_t M, std::int64_t K, const T* z, const T* t,
                                        std::int64_t R, const std::int32_t* idx, bool entropy,
                                        T s, T* dz, double* loss) {
  using A = acc_t<T>;
  __shared__ A shared[32];
  for (std::int64_t r = blockIdx.x; r < M; r += gridDim.x) {
    const T* zr = z + r * K;
    T* dr = dz ? dz + r * K : nullptr;
    const std::int64_t tr = idx ? static_cast<std::int64_t>(idx[r]) : r;
    if (tr < 0 || tr >= R) {  // the same for the whole block
      if (dr)
        for (std::int64_t k = threadIdx.x; k < K; k += blockDim.x)
          dr[k] = static_cast<T>(NAN);
      if (threadIdx.x == 0) loss[r] = static_cast<double>(NAN);
      continue;
    }
    const T* trow = t + tr * K;
    A mx = neg_infinity<A>();
    for (std::int64_t k = threadIdx.x; k < K; k += blockDim.x) mx = MaxOp{}(mx, A(zr[k]));
    const A m = block_reduce(mx, MaxOp{}, shared);
    A sum_e = 0, sum_tz = 0, sum_t = 0, sum_tlogt = 0;
    for (std::int64_t k = threadIdx.x; k < K; k += blockDim.x) {
      const A zk = A(zr[k]), tk = A(trow[k]);
      const A e = dexp(zk - m);
      sum_e += e;
      if (tk != A(0)) {
        sum_tz += tk * (zk - m);
        if (entropy) sum_tlogt += tk * dlog(tk);
      }
      sum_t += tk;
      if (dr) dr[k] = static_cast<T>(e);  // rounded once here, as the CPU kernel does
    }
    const A total_e = block_reduce(sum_e, SumOp{}, shared);
    const A total_tz = block_reduce(sum_tz, SumOp{}, shared);
    const A total_t = block_reduce(sum_t, SumOp{}, shared);
    const A total_tlogt = entropy ? block_reduce(sum_tlogt, SumOp{}, shared) : A(0);
    if (dr) {
      const A sa = A(s), a = sa / total_e;
      for (std::int64_t k = threadIdx.x; k < K; k += blockDim.x)
        dr[k] = static_cast<T>(A(dr[k]) * a - sa * A(trow[k]));
    }
    if (threadIdx.x == 0) {
      double l = static_cast<double>(total_t) * ::log(static_cast<double>(total_e)) -
                 static_cast<double>(total_tz);
      if (entropy) l += static_cast<double>(total_tlogt);
      loss[r] = l;
    }
  }
}

struct RowLossTerm {
  const double* loss;
  __device__ double operator()(std::int64_t i) const { return loss[i]; }
};

}  // namespace kernels

namespace kernels {
// Queues the rows' losses into the context's workspace; returns them.
template <class T>
const double* row_losses(std::int64_t M, std::int64_t K, const T* z, const T* t, std::int64_t R,
                         const std::int32_t* idx, bool entropy, T s, T* dz) {
  auto* loss = static_cast<double*>(Context::get().workspace(sizeof(double) * M));
  soft_target_rows_kernel<<<row_blocks(M), row_threads(K), 0, stream()>>>(M, K, z, t, R, idx,
                                                                          entropy, s, dz, loss);
  check_launch("soft_target_rows_kernel");
  return loss;
}
}  // namespace kernels

template <class T>
double soft_target_rows(std::int64_t M, std::int64_t K, const T* z, const T* t, std::int64_t R,
                        const std::int32_t* idx, bool entropy, T s, T* dz) {
  if (M <= 0) return 0.0;
  const double* loss = kernels::row_losses(M, K, z, t, R, idx, entropy, s, dz);
  return kernels::sum_terms_to_host(M, kernels::RowLossTerm{loss},
                                    "sum_terms_kernel (soft_target_rows)");
}

template <class T>
void soft_target_rows_partials(std::int64_t M, std::int64_t K, const T* z, const T* t,
                               std::int64_t R, const std::int32_t* idx, bool entropy, T s, T* dz,
                               double* partial) {
  if (M <= 0) {  // the one partial sum of no rows
    MOCA_CUDA_CHECK(cudaMemsetAsync(partial, 0, sizeof(double), stream()));
    return;
  }
  const double* loss = kernels::row_losses(M, K, z, t, R, idx, entropy, s, dz);
  kernels::sum_terms_partials(M, kernels::RowLossTerm{loss}, partial,
                              "sum_terms_kernel (soft_target_rows)");
}

}  // namespace moca::cuda
