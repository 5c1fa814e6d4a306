// Statistics kernels of the CPU backend: row maxima, training-mode batch normalisation over the
// rows of a matrix, and Σ x·log y (the entropy part of a KL divergence).
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>

#include "moca/backend/cpu/parallel.hpp"
#include "moca/backend/cpu/rows.hpp"

namespace moca::cpu {

/// y[r] = max_j x[r, j]
template <class T>
void row_max(std::int64_t M, std::int64_t N, const T* x, T* y) {
  parallel_for(M, M * N, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * N;
      T m = -std::numeric_limits<T>::infinity();
      for (std::int64_t j = 0; j < N; ++j) m = std::max(m, xr[j]);
      y[r] = m;
    }
  });
}

/// BatchNorm1d in training mode on x [M, N] (M samples, N features): per column j,
/// y = (x − mean_j) / sqrt(var_j + eps) · gamma_j + beta_j with the biased batch variance.
/// Saves mean[N] and var[N] (biased) for backward and for the running statistics. The sums and
/// the normalisation run in acc_t<T> (float for bf16), and mean and var are kept in it.
template <class T>
void batch_norm_forward(std::int64_t M, std::int64_t N, const T* x, const T* gamma, const T* beta,
                        double eps, T* y, acc_t<T>* mean, acc_t<T>* var) {
  using A = acc_t<T>;
  parallel_for(N, 3 * M * N, [&](std::int64_t c0, std::int64_t c1) {
    // Column blocks, rows in order: fixed summation order whatever the thread count.
    constexpr std::int64_t kBlock = 64;
    for (std::int64_t b0 = c0; b0 < c1; b0 += kBlock) {
      const std::int64_t b1 = std::min(c1, b0 + kBlock);
      std::array<A, kBlock> mu{}, v{};
      for (std::int64_t r = 0; r < M; ++r)
        for (std::int64_t j = b0; j < b1; ++j) mu[j - b0] += static_cast<A>(x[r * N + j]);
      for (std::int64_t j = b0; j < b1; ++j) mu[j - b0] /= static_cast<A>(M);
      for (std::int64_t r = 0; r < M; ++r)
        for (std::int64_t j = b0; j < b1; ++j) {
          const A d = static_cast<A>(x[r * N + j]) - mu[j - b0];
          v[j - b0] += d * d;
        }
      for (std::int64_t j = b0; j < b1; ++j) {
        v[j - b0] /= static_cast<A>(M);
        mean[j] = mu[j - b0];
        var[j] = v[j - b0];
      }
      for (std::int64_t r = 0; r < M; ++r)
        for (std::int64_t j = b0; j < b1; ++j) {
          const A is = A(1) / std::sqrt(v[j - b0] + static_cast<A>(eps));
          A out = (static_cast<A>(x[r * N + j]) - mu[j - b0]) * is;
          if (gamma) out *= static_cast<A>(gamma[j]);
          if (beta) out += static_cast<A>(beta[j]);
          y[r * N + j] = static_cast<T>(out);
        }
    }
  });
}

/// Backward of batch_norm_forward through the batch statistics: writes dx (may alias dy),
/// accumulates dgamma and dbeta (either may be null; acc_t, float for bf16 x).
///   dx = rstd · (dxhat − mean_r(dxhat) − xhat · mean_r(dxhat · xhat)),  dxhat = dy · gamma
template <class T>
void batch_norm_backward(std::int64_t M, std::int64_t N, const T* x, const T* gamma,
                         const acc_t<T>* mean, const acc_t<T>* var, double eps, const T* dy, T* dx,
                         acc_t<T>* dgamma, acc_t<T>* dbeta) {
  using A = acc_t<T>;
  parallel_for(N, 4 * M * N, [&](std::int64_t c0, std::int64_t c1) {
    constexpr std::int64_t kBlock = 64;
    for (std::int64_t b0 = c0; b0 < c1; b0 += kBlock) {
      const std::int64_t b1 = std::min(c1, b0 + kBlock);
      std::array<A, kBlock> sum_g{}, sum_gx{}, sum_dy{}, sum_dyx{};
      for (std::int64_t r = 0; r < M; ++r)
        for (std::int64_t j = b0; j < b1; ++j) {
          const A is = A(1) / std::sqrt(static_cast<A>(var[j]) + static_cast<A>(eps));
          const A xhat = (static_cast<A>(x[r * N + j]) - static_cast<A>(mean[j])) * is;
          const A g = static_cast<A>(dy[r * N + j]);
          sum_dy[j - b0] += g;
          sum_dyx[j - b0] += g * xhat;
        }
      for (std::int64_t j = b0; j < b1; ++j) {
        const A gm = gamma ? static_cast<A>(gamma[j]) : A(1);
        sum_g[j - b0] = sum_dy[j - b0] * gm;
        sum_gx[j - b0] = sum_dyx[j - b0] * gm;
        if (dgamma) dgamma[j] += sum_dyx[j - b0];
        if (dbeta) dbeta[j] += sum_dy[j - b0];
      }
      for (std::int64_t r = 0; r < M; ++r)
        for (std::int64_t j = b0; j < b1; ++j) {
          const A is = A(1) / std::sqrt(static_cast<A>(var[j]) + static_cast<A>(eps));
          const A xhat = (static_cast<A>(x[r * N + j]) - static_cast<A>(mean[j])) * is;
          const A g = static_cast<A>(dy[r * N + j]) * (gamma ? static_cast<A>(gamma[j]) : A(1));
          dx[r * N + j] = static_cast<T>(is * (g - sum_g[j - b0] / static_cast<A>(M) -
                                               xhat * sum_gx[j - b0] / static_cast<A>(M)));
        }
    }
  });
}

/// Σ x[i] · log y[i], with terms where x[i] == 0 counted as 0 (torch.xlogy), in double over a
/// fixed partition.
template <class T>
double xlogy_sum(std::int64_t n, const T* x, const T* y) {
  constexpr std::int64_t kParts = 64;
  std::array<double, kParts> partial{};
  parallel_for(kParts, 4 * n, [&](std::int64_t p0, std::int64_t p1) {
    for (std::int64_t p = p0; p < p1; ++p) {
      const std::int64_t b = n * p / kParts, e = n * (p + 1) / kParts;
      double s = 0.0;
      for (std::int64_t i = b; i < e; ++i)
        if (x[i] != T(0)) s += static_cast<double>(x[i]) * std::log(static_cast<double>(y[i]));
      partial[p] = s;
    }
  });
  double total = 0.0;
  for (double s : partial) total += s;
  return total;
}

}  // namespace moca::cpu
