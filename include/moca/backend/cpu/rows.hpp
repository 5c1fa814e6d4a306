// Row-wise kernels of the CPU backend: softmax, log-softmax, LayerNorm, L2 normalisation.
// Each works on a matrix [M, N], one row at a time (a row stays in cache), rows in parallel.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "moca/backend/cpu/bf16_lanes.hpp"
#include "moca/backend/cpu/parallel.hpp"
#include "moca/backend/cpu/simd_math.hpp"
#include "moca/core/bf16.hpp"

namespace moca::cpu {

/// Accumulator type: float and bf16 rows accumulate in float (as PyTorch does), double in
/// double; bf16 rows also compute every intermediate in float and round only what they store.
template <class T>
using acc_t = compute_t<T>;

#ifdef MOCA_CPU_SIMD_MATH
// Float rows on AVX2: 8 lanes at a time, the ragged end through masked loads. Sums run in 8
// partial lanes added in a fixed order, so results do not depend on the thread count.
namespace lanes {

inline __m256 load(const float* p, std::int64_t left, __m256 fill) {
  if (left >= 8) return _mm256_loadu_ps(p);
  const __m256i mask = simd::first_lanes(left);
  return _mm256_blendv_ps(fill, _mm256_maskload_ps(p, mask), _mm256_castsi256_ps(mask));
}

inline void store(float* p, std::int64_t left, __m256 v) {
  if (left >= 8) {
    _mm256_storeu_ps(p, v);
  } else {
    _mm256_maskstore_ps(p, simd::first_lanes(left), v);
  }
}

/// The same on bf16 rows: widened as loaded, rounded once as stored (bf16_lanes.hpp), so a
/// bf16 row runs the float arithmetic on exactly the values a widened copy would hold.
inline __m256 load(const bf16* p, std::int64_t left, __m256 fill) { return widen8(p, left, fill); }
inline void store(bf16* p, std::int64_t left, __m256 v) { narrow8(v, p, left); }

inline float row_max(std::int64_t N, const float* x) {
  const __m256 lowest = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 m = lowest;
  for (std::int64_t j = 0; j < N; j += 8) m = _mm256_max_ps(m, load(x + j, N - j, lowest));
  return simd::max(m);
}

/// Σ_j e^(x_j - shift); writes the terms to y when y is not null.
inline float sum_exp(std::int64_t N, const float* x, float shift, float* y) {
  const __m256 s = _mm256_set1_ps(shift), zero = _mm256_setzero_ps();
  __m256 acc = zero;
  for (std::int64_t j = 0; j < N; j += 8) {
    const __m256 lowest = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    const __m256 e = simd::exp(_mm256_sub_ps(load(x + j, N - j, lowest), s));  // pad: e^-inf = 0
    acc = _mm256_add_ps(acc, e);
    if (y) store(y + j, N - j, e);
  }
  return simd::sum(acc);
}

template <class X>
float sum(std::int64_t N, const X* x) {
  const __m256 zero = _mm256_setzero_ps();
  __m256 acc = zero;
  for (std::int64_t j = 0; j < N; j += 8) acc = _mm256_add_ps(acc, load(x + j, N - j, zero));
  return simd::sum(acc);
}

inline float dot(std::int64_t N, const float* a, const float* b) {
  const __m256 zero = _mm256_setzero_ps();
  __m256 acc = zero;
  for (std::int64_t j = 0; j < N; j += 8)
    acc = _mm256_fmadd_ps(load(a + j, N - j, zero), load(b + j, N - j, zero), acc);
  return simd::sum(acc);
}

/// One LayerNorm row of N values (float, or bf16 widened as read and rounded as stored): y =
/// (x − mean) · rstd (· gamma + beta, float, either may be null); returns mean and rstd. The
/// mean, then the squared deviations from it, in two passes.
template <class X, class Y>
void layer_norm_row(std::int64_t N, const X* x, const float* gamma, const float* beta, float eps,
                    Y* y, float& mean, float& rstd) {
  const __m256 zero = _mm256_setzero_ps();
  const float mu = sum(N, x) / static_cast<float>(N);
  const __m256 m = _mm256_set1_ps(mu);
  __m256 acc = zero;
  for (std::int64_t j = 0; j < N; j += 8) {
    // Padding lanes load mu: their deviation is 0.
    const __m256 d = _mm256_sub_ps(load(x + j, N - j, m), m);
    acc = _mm256_fmadd_ps(d, d, acc);
  }
  const float is = 1.0f / std::sqrt(simd::sum(acc) / static_cast<float>(N) + eps);
  const __m256 vis = _mm256_set1_ps(is), one = _mm256_set1_ps(1.0f);
  for (std::int64_t j = 0; j < N; j += 8) {
    __m256 v = _mm256_mul_ps(_mm256_sub_ps(load(x + j, N - j, m), m), vis);
    if (gamma) v = _mm256_mul_ps(v, load(gamma + j, N - j, one));
    if (beta) v = _mm256_add_ps(v, load(beta + j, N - j, zero));
    store(y + j, N - j, v);
  }
  mean = mu;
  rstd = is;
}

/// The LayerNorm backward of one row of N values (as layer_norm_row reads and writes them)
/// with its saved mean m and rstd is: dx = is · (g − mean(g) − x̂ · mean(g · x̂)) (+ residual),
/// g = dy · gamma, and the row's dy · x̂ and dy added to the float pg and pb when pg is not null.
/// dx may alias dy or residual.
template <class T>
void layer_norm_backward_row(std::int64_t N, const T* x, const float* gamma, float m, float is,
                             const T* dy, const T* residual, T* dx, float* pg, float* pb) {
  const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
  const __m256 vm = _mm256_set1_ps(m), vis = _mm256_set1_ps(is);
  __m256 acc_g = zero, acc_gx = zero;
  for (std::int64_t j = 0; j < N; j += 8) {
    __m256 g = load(dy + j, N - j, zero);  // padding lanes: g = 0
    if (gamma) g = _mm256_mul_ps(g, load(gamma + j, N - j, one));
    const __m256 xhat = _mm256_mul_ps(_mm256_sub_ps(load(x + j, N - j, vm), vm), vis);
    acc_g = _mm256_add_ps(acc_g, g);
    acc_gx = _mm256_fmadd_ps(g, xhat, acc_gx);
  }
  const __m256 mg = _mm256_set1_ps(simd::sum(acc_g) / static_cast<float>(N));
  const __m256 mgx = _mm256_set1_ps(simd::sum(acc_gx) / static_cast<float>(N));
  for (std::int64_t j = 0; j < N; j += 8) {
    const __m256 g0 = load(dy + j, N - j, zero);
    const __m256 g = gamma ? _mm256_mul_ps(g0, load(gamma + j, N - j, one)) : g0;
    const __m256 xhat = _mm256_mul_ps(_mm256_sub_ps(load(x + j, N - j, vm), vm), vis);
    if (pg) {  // before dx is stored: dx may alias dy
      store(pg + j, N - j, _mm256_fmadd_ps(g0, xhat, load(pg + j, N - j, zero)));
      store(pb + j, N - j, _mm256_add_ps(g0, load(pb + j, N - j, zero)));
    }
    __m256 d = _mm256_mul_ps(vis, _mm256_fnmadd_ps(xhat, mgx, _mm256_sub_ps(g, mg)));
    if (residual) d = _mm256_add_ps(d, load(residual + j, N - j, zero));
    store(dx + j, N - j, d);
  }
}

/// A thread's float buffer, grown once: the bf16 row kernels widen rows into slot 0 (each worker
/// its own) and a call's parameters into slot 1 (the calling thread's, read by every worker),
/// run the float lanes, and round once what they store.
template <int Slot>
float* scratch(std::size_t floats) {
  thread_local std::vector<float> buffer;
  if (buffer.size() < floats) buffer.resize(floats);
  return buffer.data();
}

/// Rows the float lanes run: float rows as they are, bf16 rows through float_row.
template <class T>
inline constexpr bool kFloatRows = std::is_same_v<T, float> || std::is_same_v<T, bf16>;

/// Runs f(out, in...) on one row of N elements in float: float rows in place; bf16 rows widened
/// into the thread's buffer, with the output rounded once as it is stored. out may alias an
/// input (the inputs are widened before f runs).
template <class T, class F, class... In>
void float_row(std::int64_t N, F&& f, T* out, const In*... in) {
  if constexpr (std::is_same_v<T, float>) {
    f(out, in...);
  } else {
    float* buffer = scratch<0>(static_cast<std::size_t>((1 + sizeof...(In)) * N));
    std::int64_t slot = 1;
    auto widen = [&](const bf16* x) {
      float* w = buffer + slot++ * N;
      widen_bf16(N, x, w);
      return static_cast<const float*>(w);
    };
    // Braced initialisation evaluates the widening in order, before f runs.
    const std::array<const float*, sizeof...(In)> widened_in{widen(in)...};
    std::apply([&](auto... w) { f(buffer, w...); }, widened_in);
    narrow_to_bf16(N, buffer, out);
  }
}

/// x widened, or null for null x.
inline const float* widened(const bf16* x, std::int64_t n, float* buffer) {
  if (x == nullptr) return nullptr;
  widen_bf16(n, x, buffer);
  return buffer;
}

}  // namespace lanes
#endif

template <class T>
void softmax_rows(std::int64_t M, std::int64_t N, const T* x, T* y) {
  parallel_for(M, 4 * M * N, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * N;
      T* yr = y + r * N;
#ifdef MOCA_CPU_SIMD_MATH
      if constexpr (lanes::kFloatRows<T>) {
        lanes::float_row(N, [N](float* yf, const float* xf) {
          const float mx = lanes::row_max(N, xf);
          const __m256 inv = _mm256_set1_ps(1.0f / lanes::sum_exp(N, xf, mx, yf));
          for (std::int64_t j = 0; j < N; j += 8)
            lanes::store(yf + j, N - j, _mm256_mul_ps(lanes::load(yf + j, N - j, inv), inv));
        }, yr, xr);
        continue;
      }
#endif
      acc_t<T> mx = -std::numeric_limits<acc_t<T>>::infinity();
      for (std::int64_t j = 0; j < N; ++j) mx = std::max(mx, static_cast<acc_t<T>>(xr[j]));
      acc_t<T> sum = 0;
      for (std::int64_t j = 0; j < N; ++j) {
        yr[j] = std::exp(xr[j] - mx);
        sum += yr[j];
      }
      const acc_t<T> inv = acc_t<T>(1) / sum;
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
#ifdef MOCA_CPU_SIMD_MATH
      if constexpr (lanes::kFloatRows<T>) {
        lanes::float_row(N, [N](float* yf, const float* xf) {
          const float mx = lanes::row_max(N, xf);
          const __m256 lse = _mm256_set1_ps(mx + std::log(lanes::sum_exp(N, xf, mx, nullptr)));
          for (std::int64_t j = 0; j < N; j += 8)
            lanes::store(yf + j, N - j, _mm256_sub_ps(lanes::load(xf + j, N - j, lse), lse));
        }, yr, xr);
        continue;
      }
#endif
      acc_t<T> mx = -std::numeric_limits<acc_t<T>>::infinity();
      for (std::int64_t j = 0; j < N; ++j) mx = std::max(mx, static_cast<acc_t<T>>(xr[j]));
      acc_t<T> sum = 0;
      for (std::int64_t j = 0; j < N; ++j) sum += std::exp(xr[j] - mx);
      const acc_t<T> lse = mx + std::log(sum);
      for (std::int64_t j = 0; j < N; ++j) yr[j] = xr[j] - lse;
    }
  });
}

/// x ← softmax(scale · x) row by row, in place (scale > 0), after writing each row's spread
/// max_k x − mean_k x of the unscaled row: MOCA's codebook codes and their temperature
/// statistic in one pass over rows that stay in cache.
template <class T>
void softmax_spread_rows(std::int64_t M, std::int64_t N, T scale, T* x, T* spread) {
  parallel_for(M, 4 * M * N, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      T* xr = x + r * N;
#ifdef MOCA_CPU_SIMD_MATH
      if constexpr (lanes::kFloatRows<T>) {
        lanes::float_row(N, [&](float* yf, const float* xf) {
          const float mx = lanes::row_max(N, xf);
          spread[r] = mx - lanes::sum(N, xf) / static_cast<float>(N);
          const __m256 a = _mm256_set1_ps(static_cast<float>(scale)), shift = _mm256_set1_ps(mx);
          const __m256 zero = _mm256_setzero_ps();
          __m256 acc = zero;
          for (std::int64_t j = 0; j < N; j += 8) {
            // Padding lanes: x = max, e^0 = 1 would count, so they are masked out of the sum.
            const std::int64_t left = N - j;
            const __m256 x_shifted = _mm256_sub_ps(lanes::load(xf + j, left, shift), shift);
            __m256 e = simd::exp(_mm256_mul_ps(a, x_shifted));
            if (left < 8) e = _mm256_and_ps(e, _mm256_castsi256_ps(simd::first_lanes(left)));
            acc = _mm256_add_ps(acc, e);
            lanes::store(yf + j, left, e);
          }
          const __m256 inv = _mm256_set1_ps(1.0f / simd::sum(acc));
          for (std::int64_t j = 0; j < N; j += 8)
            lanes::store(yf + j, N - j, _mm256_mul_ps(lanes::load(yf + j, N - j, zero), inv));
        }, xr, static_cast<const T*>(xr));
        continue;
      }
#endif
      acc_t<T> mx = -std::numeric_limits<acc_t<T>>::infinity();
      acc_t<T> total = 0;
      for (std::int64_t j = 0; j < N; ++j)
        mx = std::max(mx, static_cast<acc_t<T>>(xr[j])), total += xr[j];
      spread[r] = mx - total / static_cast<acc_t<T>>(N);
      acc_t<T> sum = 0;
      for (std::int64_t j = 0; j < N; ++j) {
        xr[j] = std::exp(scale * (xr[j] - mx));
        sum += xr[j];
      }
      const acc_t<T> inv = acc_t<T>(1) / sum;
      for (std::int64_t j = 0; j < N; ++j) xr[j] *= inv;
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
#ifdef MOCA_CPU_SIMD_MATH
      if constexpr (lanes::kFloatRows<T>) {
        lanes::float_row(N, [N](float* df, const float* yf, const float* gf) {
          const __m256 d = _mm256_set1_ps(lanes::dot(N, gf, yf)), zero = _mm256_setzero_ps();
          for (std::int64_t j = 0; j < N; j += 8) {
            const __m256 g = lanes::load(gf + j, N - j, zero);
            lanes::store(df + j, N - j, _mm256_mul_ps(lanes::load(yf + j, N - j, zero),
                                                      _mm256_sub_ps(g, d)));
          }
        }, dr, yr, gr);
        continue;
      }
#endif
      acc_t<T> dot = 0;
      for (std::int64_t j = 0; j < N; ++j) dot += gr[j] * yr[j];
      for (std::int64_t j = 0; j < N; ++j) dr[j] = yr[j] * (gr[j] - dot);
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
#ifdef MOCA_CPU_SIMD_MATH
      if constexpr (lanes::kFloatRows<T>) {
        lanes::float_row(N, [N](float* df, const float* yf, const float* gf) {
          const __m256 s = _mm256_set1_ps(lanes::sum(N, gf)), zero = _mm256_setzero_ps();
          for (std::int64_t j = 0; j < N; j += 8) {
            const __m256 p = simd::exp(lanes::load(yf + j, N - j, zero));
            lanes::store(df + j, N - j, _mm256_fnmadd_ps(p, s, lanes::load(gf + j, N - j, zero)));
          }
        }, dr, yr, gr);
        continue;
      }
#endif
      acc_t<T> sum = 0;
      for (std::int64_t j = 0; j < N; ++j) sum += gr[j];
      for (std::int64_t j = 0; j < N; ++j) dr[j] = gr[j] - std::exp(yr[j]) * sum;
    }
  });
}

/// y = (x - mean) * rstd * gamma + beta per row; saves mean[M] and rstd[M] = 1/sqrt(var + eps)
/// (biased variance, as torch.nn.LayerNorm). gamma/beta may be null (no affine transform).
/// LayerNorm forward over the rows of x [M, N]. With `add` (and `sum`), the rows normalised are
/// x + add, written to `sum` on the way (a residual stream and its pre-norm in one pass; `sum`
/// may alias x or add).
template <class T>
void layer_norm_forward(std::int64_t M, std::int64_t N, const T* x, const T* gamma, const T* beta,
                        double eps, T* y, acc_t<T>* mean, acc_t<T>* rstd, const T* add = nullptr,
                        T* sum = nullptr) {
  [[maybe_unused]] const float *gamma_f = nullptr, *beta_f = nullptr;
#ifdef MOCA_CPU_SIMD_MATH
  if constexpr (std::is_same_v<T, bf16>) {
    float* params = lanes::scratch<1>(static_cast<std::size_t>(2 * N));
    gamma_f = lanes::widened(gamma, N, params);
    beta_f = lanes::widened(beta, N, params + N);
  }
#endif
  parallel_for(M, 4 * M * N, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * N;
      T* yr = y + r * N;
#ifdef MOCA_CPU_SIMD_MATH
      if constexpr (lanes::kFloatRows<T>) {
        if (add) {  // the row of x + add (rounded as stored, for bf16), read back from cache below
          const T* ar = add + r * N;
          T* sr = sum + r * N;
          for (std::int64_t j = 0; j < N; j += 8) {
            const __m256 zero = _mm256_setzero_ps();
            lanes::store(sr + j, N - j, _mm256_add_ps(lanes::load(xr + j, N - j, zero),
                                                      lanes::load(ar + j, N - j, zero)));
          }
          xr = sr;
        }
        // bf16 rows widen as they load and round as they store; their gamma and beta were
        // widened once for all rows.
        if constexpr (std::is_same_v<T, float>) {
          lanes::layer_norm_row(N, xr, gamma, beta, static_cast<float>(eps), yr, mean[r], rstd[r]);
        } else {
          lanes::layer_norm_row(N, xr, gamma_f, beta_f, static_cast<float>(eps), yr, mean[r],
                                rstd[r]);
        }
        continue;
      }
#endif
      if (add) {
        const T* ar = add + r * N;
        T* sr = sum + r * N;
        for (std::int64_t j = 0; j < N; ++j) sr[j] = xr[j] + ar[j];
        xr = sr;
      }
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
      const acc_t<T> m = mu, is = rs;
      for (std::int64_t j = 0; j < N; ++j) {
        acc_t<T> v = (xr[j] - m) * is;
        if (gamma) v *= gamma[j];
        if (beta) v += beta[j];
        yr[j] = v;
      }
      mean[r] = m;
      rstd[r] = is;
    }
  });
}

/// Rows per block of LayerNorm backward whose parameter-gradient partial sums are kept apart:
/// the blocks are fixed by M alone, and their partials are added in block order, so dgamma and
/// dbeta do not depend on the thread count.
inline constexpr std::int64_t kNormGradRows = 64;

/// LayerNorm backward. dx is overwritten, or with `residual` set to residual + the LayerNorm
/// gradient (a residual branch's gradient joined in the same pass); dgamma and dbeta (either may
/// be null) are accumulated (+=) in acc_t, as parameter gradients are (float for bf16 x). dx may
/// alias dy or residual.
///
/// One pass over the rows: each row's two sums, then dx, while the row's dy·x̂ and dy are added
/// to its block's partial parameter gradients.
template <class T>
void layer_norm_backward(std::int64_t M, std::int64_t N, const T* x, const T* gamma,
                         const acc_t<T>* mean, const acc_t<T>* rstd, const T* dy, T* dx,
                         acc_t<T>* dgamma, acc_t<T>* dbeta, const T* residual = nullptr) {
  const bool params = dgamma != nullptr || dbeta != nullptr;
  const std::int64_t blocks = (M + kNormGradRows - 1) / kNormGradRows;
  // [blocks][2][N]: Σ dy·x̂ and Σ dy of each block; the calling thread's, grown once.
  thread_local std::vector<acc_t<T>> partials;
  if (params && static_cast<std::int64_t>(partials.size()) < blocks * 2 * N)
    partials.resize(static_cast<std::size_t>(blocks * 2 * N));
  acc_t<T>* part = partials.data();
  [[maybe_unused]] const float* gamma_f = nullptr;
#ifdef MOCA_CPU_SIMD_MATH
  if constexpr (std::is_same_v<T, bf16>)
    gamma_f = lanes::widened(gamma, N, lanes::scratch<1>(static_cast<std::size_t>(N)));
#endif
  parallel_for(blocks, 8 * M * N, [&](std::int64_t b0, std::int64_t b1) {
    for (std::int64_t blk = b0; blk < b1; ++blk) {
      acc_t<T>* pg = params ? part + blk * 2 * N : nullptr;
      acc_t<T>* pb = params ? pg + N : nullptr;
      if (params)
        for (std::int64_t j = 0; j < 2 * N; ++j) pg[j] = 0;
      const std::int64_t r_end = std::min(M, (blk + 1) * kNormGradRows);
      for (std::int64_t r = blk * kNormGradRows; r < r_end; ++r) {
        const T *xr = x + r * N, *gr = dy + r * N;
        const T* rr = residual ? residual + r * N : nullptr;
        T* dr = dx + r * N;
        const acc_t<T> m = mean[r], is = rstd[r];
#ifdef MOCA_CPU_SIMD_MATH
        if constexpr (std::is_same_v<T, float>) {
          lanes::layer_norm_backward_row(N, xr, gamma, m, is, gr, rr, dr, pg, pb);
          continue;
        } else if constexpr (std::is_same_v<T, bf16>) {  // widened as read, rounded as stored
          lanes::layer_norm_backward_row(N, xr, gamma_f, m, is, gr, rr, dr, pg, pb);
          continue;
        }
#endif
        acc_t<T> sum_g = 0, sum_gx = 0;  // sums of dxhat and dxhat * xhat
        for (std::int64_t j = 0; j < N; ++j) {
          const acc_t<T> g0 = gr[j];
          const acc_t<T> g = gamma ? g0 * gamma[j] : g0;
          sum_g += g;
          sum_gx += g * (xr[j] - m) * is;
        }
        const acc_t<T> mg = sum_g / static_cast<acc_t<T>>(N);
        const acc_t<T> mgx = sum_gx / static_cast<acc_t<T>>(N);
        for (std::int64_t j = 0; j < N; ++j) {
          const acc_t<T> g0 = gr[j];
          const acc_t<T> g = gamma ? g0 * gamma[j] : g0;
          const acc_t<T> xhat = (xr[j] - m) * is;
          if (pg) {
            pg[j] += g0 * xhat;
            pb[j] += g0;
          }
          const acc_t<T> d = is * (g - mg - xhat * mgx);
          dr[j] = rr ? rr[j] + d : d;
        }
      }
    }
  });
  if (!params) return;
  // The blocks' partials, added in block order; columns in parallel.
  parallel_for(N, 2 * blocks * N, [&](std::int64_t c0, std::int64_t c1) {
    for (std::int64_t blk = 0; blk < blocks; ++blk) {
      const acc_t<T>* pg = part + blk * 2 * N;
      const acc_t<T>* pb = pg + N;
      if (dgamma)
        for (std::int64_t j = c0; j < c1; ++j) dgamma[j] += pg[j];
      if (dbeta)
        for (std::int64_t j = c0; j < c1; ++j) dbeta[j] += pb[j];
    }
  });
}

/// y = x / max(||x||_2, eps) per row; saves norm[M] = ||x||_2 (before the clamp).
template <class T>
void l2_normalize_rows_forward(std::int64_t M, std::int64_t N, const T* x, double eps, T* y,
                               acc_t<T>* norm) {
  parallel_for(M, 2 * M * N, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * N;
      T* yr = y + r * N;
      acc_t<T> ss = 0;
      for (std::int64_t j = 0; j < N; ++j) ss += xr[j] * xr[j];
      const acc_t<T> nrm = std::sqrt(ss);
      const acc_t<T> inv = acc_t<T>(1) / std::max(nrm, static_cast<acc_t<T>>(eps));
      for (std::int64_t j = 0; j < N; ++j) yr[j] = xr[j] * inv;
      norm[r] = nrm;
    }
  });
}

/// x[r] /= max(Σ_j |x[r, j]|, eps), in place (torch.nn.functional.normalize with p = 1).
template <class T>
void l1_normalize_rows(std::int64_t M, std::int64_t N, double eps, T* x) {
  parallel_for(M, 2 * M * N, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      T* xr = x + r * N;
      acc_t<T> s = 0;
      for (std::int64_t j = 0; j < N; ++j) s += std::abs(static_cast<acc_t<T>>(xr[j]));
      const acc_t<T> inv = acc_t<T>(1) / std::max(s, static_cast<acc_t<T>>(eps));
      for (std::int64_t j = 0; j < N; ++j) xr[j] = xr[j] * inv;
    }
  });
}

/// Backward of l2_normalize_rows. Where ||x|| > eps: dx = (dy - y <y, dy>) / ||x||;
/// where clamped: dx = dy / eps. dx may alias dy.
template <class T>
void l2_normalize_rows_backward(std::int64_t M, std::int64_t N, const T* y, const acc_t<T>* norm,
                                double eps, const T* dy, T* dx) {
  parallel_for(M, 3 * M * N, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      const T *yr = y + r * N, *gr = dy + r * N;
      T* dr = dx + r * N;
      const acc_t<T> e = static_cast<acc_t<T>>(eps);
      if (norm[r] > e) {
        acc_t<T> dot = 0;
        for (std::int64_t j = 0; j < N; ++j) dot += yr[j] * gr[j];
        const acc_t<T> inv = acc_t<T>(1) / norm[r], d = dot;
        for (std::int64_t j = 0; j < N; ++j) dr[j] = (gr[j] - yr[j] * d) * inv;
      } else {
        for (std::int64_t j = 0; j < N; ++j) dr[j] = gr[j] / e;
      }
    }
  });
}

}  // namespace moca::cpu
