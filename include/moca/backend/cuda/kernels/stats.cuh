// Statistics kernels: row maxima, training-mode batch normalisation over the rows of [M, N], and
// Σ x·log y returned to the host. Contracts as in backend/cpu/stats.hpp.
//
// Batch normalisation reduces over rows, so a block owns kColumns columns and all M rows of
// them: its kColumnRows thread rows each walk rows r ≡ threadIdx.y and combine their parts in a
// fixed order. Every pass has each thread touch the same elements, so dx may alias dy (and y, x).
#pragma once

#include "moca/backend/cuda/kernels/common.cuh"
#include "moca/backend/cuda/kernels/reduce.cuh"

namespace moca::cuda {
namespace kernels {

template <class T>
__global__ void row_max_kernel(std::int64_t M, std::int64_t N, const T* x, T* y) {
  using A = acc_t<T>;
  __shared__ A shared[32];
  for (std::int64_t r = blockIdx.x; r < M; r += gridDim.x) {
    const T* xr = x + r * N;
    A m = neg_infinity<A>();
    for (std::int64_t j = threadIdx.x; j < N; j += blockDim.x) m = MaxOp{}(m, A(xr[j]));
    m = block_reduce(m, MaxOp{}, shared);
    if (threadIdx.x == 0) y[r] = m;
  }
}

// The sums and the normalisation run in acc_t<T> (float for bf16), and mean and var are kept in
// it, as on the CPU.
template <class T, class A = acc_t<T>>
__global__ void batch_norm_forward_kernel(std::int64_t M, std::int64_t N, const T* x,
                                          const T* gamma, const T* beta, A eps, T* y, A* mean,
                                          A* var) {
  __shared__ A part[kColumnRows][kColumns + 1];
  const std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * kColumns + threadIdx.x;
  const bool active = j < N;
  A s = 0;
  if (active)
    for (std::int64_t r = threadIdx.y; r < M; r += kColumnRows) s += A(x[r * N + j]);
  const A mu = column_reduce(s, part) / static_cast<A>(M);
  A ss = 0;
  if (active) {
    for (std::int64_t r = threadIdx.y; r < M; r += kColumnRows) {
      const A d = A(x[r * N + j]) - mu;
      ss += d * d;
    }
  }
  const A v = column_reduce(ss, part) / static_cast<A>(M);
  if (!active) return;  // no barrier follows
  const A is = A(1) / dsqrt(v + eps);
  for (std::int64_t r = threadIdx.y; r < M; r += kColumnRows) {
    A out = (A(x[r * N + j]) - mu) * is;
    if (gamma) out *= A(gamma[j]);
    if (beta) out += A(beta[j]);
    y[r * N + j] = static_cast<T>(out);
  }
  if (threadIdx.y == 0) {
    mean[j] = mu;
    var[j] = v;
  }
}

// dx = rstd · (g − mean_r(g) − xhat · mean_r(g · xhat)), g = dy · gamma; dgamma += Σ dy · xhat,
// dbeta += Σ dy (the parameters' gradients, in A).
template <class T, class A = acc_t<T>>
__global__ void batch_norm_backward_kernel(std::int64_t M, std::int64_t N, const T* x,
                                           const T* gamma, const A* mean, const A* var, A eps,
                                           const T* dy, T* dx, A* dgamma, A* dbeta) {
  __shared__ A part[kColumnRows][kColumns + 1];
  const std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * kColumns + threadIdx.x;
  const bool active = j < N;
  A mu = 0, is = 0, gm = 1;
  A s_dy = 0, s_dyx = 0;
  if (active) {
    mu = A(mean[j]);
    is = A(1) / dsqrt(A(var[j]) + eps);
    gm = gamma ? A(gamma[j]) : A(1);
    for (std::int64_t r = threadIdx.y; r < M; r += kColumnRows) {
      const A xhat = (A(x[r * N + j]) - mu) * is;
      const A g = A(dy[r * N + j]);
      s_dy += g;
      s_dyx += g * xhat;
    }
  }
  const A sum_dy = column_reduce(s_dy, part);
  const A sum_dyx = column_reduce(s_dyx, part);
  if (!active) return;  // no barrier follows
  if (threadIdx.y == 0) {
    if (dgamma) dgamma[j] += sum_dyx;
    if (dbeta) dbeta[j] += sum_dy;
  }
  const A sum_g = sum_dy * gm, sum_gx = sum_dyx * gm;
  for (std::int64_t r = threadIdx.y; r < M; r += kColumnRows) {
    const A xhat = (A(x[r * N + j]) - mu) * is;
    const A g = A(dy[r * N + j]) * gm;
    dx[r * N + j] =
        static_cast<T>(is * (g - sum_g / static_cast<A>(M) - xhat * sum_gx / static_cast<A>(M)));
  }
}

template <class T>
struct XlogyTerm {  // x · log y, and 0 where x == 0 (torch.xlogy)
  const T *x, *y;
  __device__ double operator()(std::int64_t i) const {
    return x[i] != T(0) ? static_cast<double>(x[i]) * ::log(static_cast<double>(y[i])) : 0.0;
  }
};

}  // namespace kernels

template <class T>
void row_max(std::int64_t M, std::int64_t N, const T* x, T* y) {
  if (M <= 0) return;  // N == 0 still writes -inf, as on the CPU
  kernels::row_max_kernel<<<kernels::row_blocks(M), kernels::row_threads(N), 0, stream()>>>(M, N,
                                                                                            x, y);
  kernels::check_launch("row_max_kernel");
}

template <class T>
void batch_norm_forward(std::int64_t M, std::int64_t N, const T* x, const T* gamma, const T* beta,
                        double eps, T* y, compute_t<T>* mean, compute_t<T>* var) {
  if (M <= 0 || N <= 0) return;
  const dim3 block(kernels::kColumns, kernels::kColumnRows);
  const unsigned blocks = static_cast<unsigned>((N + kernels::kColumns - 1) / kernels::kColumns);
  kernels::batch_norm_forward_kernel<<<blocks, block, 0, stream()>>>(
      M, N, x, gamma, beta, static_cast<kernels::acc_t<T>>(eps), y, mean, var);
  kernels::check_launch("batch_norm_forward_kernel");
}

template <class T>
void batch_norm_backward(std::int64_t M, std::int64_t N, const T* x, const T* gamma,
                         const compute_t<T>* mean, const compute_t<T>* var, double eps, const T* dy,
                         T* dx, compute_t<T>* dgamma, compute_t<T>* dbeta) {
  if (M <= 0 || N <= 0) return;
  const dim3 block(kernels::kColumns, kernels::kColumnRows);
  const unsigned blocks = static_cast<unsigned>((N + kernels::kColumns - 1) / kernels::kColumns);
  kernels::batch_norm_backward_kernel<<<blocks, block, 0, stream()>>>(
      M, N, x, gamma, mean, var, static_cast<kernels::acc_t<T>>(eps), dy, dx, dgamma, dbeta);
  kernels::check_launch("batch_norm_backward_kernel");
}

template <class T>
double xlogy_sum(std::int64_t n, const T* x, const T* y) {
  return kernels::sum_terms_to_host(n, kernels::XlogyTerm<T>{x, y}, "sum_terms_kernel (xlogy_sum)");
}

}  // namespace moca::cuda
