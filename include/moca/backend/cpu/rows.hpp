// Row-wise kernels of the CPU backend: softmax, log-softmax, LayerNorm, L2 normalisation.
// Each works on a matrix [M, N], one row at a time (a row stays in cache), rows in parallel.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "moca/backend/cpu/parallel.hpp"

namespace moca::cpu {

/// Accumulator type: float rows accumulate in float (as PyTorch does), double in double.
template <class T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <class T>
void softmax_rows(std::int64_t M, std::int64_t N, const T* x, T* y) {
  parallel_for(M, 4 * M * N, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * N;
      T* yr = y + r * N;
      T mx = -std::numeric_limits<T>::infinity();
      for (std::int64_t j = 0; j < N; ++j) mx = std::max(mx, xr[j]);
      acc_t<T> sum = 0;
      for (std::int64_t j = 0; j < N; ++j) {
        yr[j] = std::exp(xr[j] - mx);
        sum += yr[j];
      }
      const T inv = T(1) / static_cast<T>(sum);
      for (std::int64_t j = 0; j < N; ++j) yr[j] *= inv;
    }
  });
}

template <class T>
void log_softmax_rows(std::int64_t M, std::int64_t N, const T* x, T* y) {
  parallel_for(M, 4 * M * N, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * N;
      T* yr = y + r * N;
      T mx = -std::numeric_limits<T>::infinity();
      for (std::int64_t j = 0; j < N; ++j) mx = std::max(mx, xr[j]);
      acc_t<T> sum = 0;
      for (std::int64_t j = 0; j < N; ++j) sum += std::exp(xr[j] - mx);
      const T lse = mx + static_cast<T>(std::log(sum));
      for (std::int64_t j = 0; j < N; ++j) yr[j] = xr[j] - lse;
    }
  });
}

/// Given y = softmax(x): dx = y * (dy - <dy, y>)  (dx may alias dy).
template <class T>
void softmax_rows_backward(std::int64_t M, std::int64_t N, const T* y, const T* dy, T* dx) {
  parallel_for(M, 3 * M * N, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      const T *yr = y + r * N, *gr = dy + r * N;
      T* dr = dx + r * N;
      acc_t<T> dot = 0;
      for (std::int64_t j = 0; j < N; ++j) dot += gr[j] * yr[j];
      for (std::int64_t j = 0; j < N; ++j) dr[j] = yr[j] * (gr[j] - static_cast<T>(dot));
    }
  });
}

/// Given y = log_softmax(x): dx = dy - exp(y) * sum(dy)  (dx may alias dy).
template <class T>
void log_softmax_rows_backward(std::int64_t M, std::int64_t N, const T* y, const T* dy, T* dx) {
  parallel_for(M, 3 * M * N, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      const T *yr = y + r * N, *gr = dy + r * N;
      T* dr = dx + r * N;
      acc_t<T> sum = 0;
      for (std::int64_t j = 0; j < N; ++j) sum += gr[j];
      for (std::int64_t j = 0; j < N; ++j) dr[j] = gr[j] - std::exp(yr[j]) * static_cast<T>(sum);
    }
  });
}

/// y = (x - mean) * rstd * gamma + beta per row; saves mean[M] and rstd[M] = 1/sqrt(var + eps)
/// (biased variance, as torch.nn.LayerNorm). gamma/beta may be null (no affine transform).
template <class T>
void layer_norm_forward(std::int64_t M, std::int64_t N, const T* x, const T* gamma, const T* beta,
                        double eps, T* y, T* mean, T* rstd) {
  parallel_for(M, 4 * M * N, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * N;
      T* yr = y + r * N;
      acc_t<T> s = 0;
      for (std::int64_t j = 0; j < N; ++j) s += xr[j];
      const acc_t<T> mu = s / static_cast<acc_t<T>>(N);
      acc_t<T> ss = 0;
      for (std::int64_t j = 0; j < N; ++j) {
        const acc_t<T> d = xr[j] - mu;
        ss += d * d;
      }
      const acc_t<T> rs = acc_t<T>(1) / std::sqrt(ss / static_cast<acc_t<T>>(N) +
                                                  static_cast<acc_t<T>>(eps));
      const T m = static_cast<T>(mu), is = static_cast<T>(rs);
      for (std::int64_t j = 0; j < N; ++j) {
        T v = (xr[j] - m) * is;
        if (gamma) v *= gamma[j];
        if (beta) v += beta[j];
        yr[j] = v;
      }
      mean[r] = m;
      rstd[r] = is;
    }
  });
}

/// LayerNorm backward. dx is overwritten; dgamma and dbeta (either may be null) are accumulated
/// (+=), as parameter gradients are. dx may alias dy.
template <class T>
void layer_norm_backward(std::int64_t M, std::int64_t N, const T* x, const T* gamma,
                         const T* mean, const T* rstd, const T* dy, T* dx, T* dgamma, T* dbeta) {
  // Parameter gradients first (dx may overwrite dy): column blocks in parallel, each thread
  // walking all rows, so sums have a fixed order whatever the thread count.
  if (dgamma || dbeta) {
    parallel_for(N, 3 * M * N, [&](std::int64_t c0, std::int64_t c1) {
      for (std::int64_t r = 0; r < M; ++r) {
        const T *xr = x + r * N, *gr = dy + r * N;
        const T m = mean[r], is = rstd[r];
        for (std::int64_t j = c0; j < c1; ++j) {
          if (dgamma) dgamma[j] += gr[j] * (xr[j] - m) * is;
          if (dbeta) dbeta[j] += gr[j];
        }
      }
    });
  }
  parallel_for(M, 6 * M * N, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      const T *xr = x + r * N, *gr = dy + r * N;
      T* dr = dx + r * N;
      const T m = mean[r], is = rstd[r];
      acc_t<T> sum_g = 0, sum_gx = 0;  // sums of dxhat and dxhat * xhat
      for (std::int64_t j = 0; j < N; ++j) {
        const T g = gamma ? gr[j] * gamma[j] : gr[j];
        sum_g += g;
        sum_gx += g * (xr[j] - m) * is;
      }
      const T mg = static_cast<T>(sum_g / static_cast<acc_t<T>>(N));
      const T mgx = static_cast<T>(sum_gx / static_cast<acc_t<T>>(N));
      for (std::int64_t j = 0; j < N; ++j) {
        const T g = gamma ? gr[j] * gamma[j] : gr[j];
        const T xhat = (xr[j] - m) * is;
        dr[j] = is * (g - mg - xhat * mgx);
      }
    }
  });
}

/// y = x / max(||x||_2, eps) per row; saves norm[M] = ||x||_2 (before the clamp).
template <class T>
void l2_normalize_rows_forward(std::int64_t M, std::int64_t N, const T* x, double eps, T* y,
                               T* norm) {
  parallel_for(M, 2 * M * N, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * N;
      T* yr = y + r * N;
      acc_t<T> ss = 0;
      for (std::int64_t j = 0; j < N; ++j) ss += xr[j] * xr[j];
      const T nrm = static_cast<T>(std::sqrt(ss));
      const T inv = T(1) / std::max(nrm, static_cast<T>(eps));
      for (std::int64_t j = 0; j < N; ++j) yr[j] = xr[j] * inv;
      norm[r] = nrm;
    }
  });
}

/// Backward of l2_normalize_rows. Where ||x|| > eps: dx = (dy - y <y, dy>) / ||x||;
/// where clamped: dx = dy / eps. dx may alias dy.
template <class T>
void l2_normalize_rows_backward(std::int64_t M, std::int64_t N, const T* y, const T* norm,
                                double eps, const T* dy, T* dx) {
  parallel_for(M, 3 * M * N, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      const T *yr = y + r * N, *gr = dy + r * N;
      T* dr = dx + r * N;
      const T e = static_cast<T>(eps);
      if (norm[r] > e) {
        acc_t<T> dot = 0;
        for (std::int64_t j = 0; j < N; ++j) dot += yr[j] * gr[j];
        const T inv = T(1) / norm[r], d = static_cast<T>(dot);
        for (std::int64_t j = 0; j < N; ++j) dr[j] = (gr[j] - yr[j] * d) * inv;
      } else {
        for (std::int64_t j = 0; j < N; ++j) dr[j] = gr[j] / e;
      }
    }
  });
}

}  // namespace moca::cpu
