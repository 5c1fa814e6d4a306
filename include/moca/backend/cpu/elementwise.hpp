// Elementwise kernels of the CPU backend: vector updates, bias, activations, optimiser updates.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "moca/backend/cpu/bf16_lanes.hpp"
#include "moca/backend/cpu/parallel.hpp"
#include "moca/backend/cpu/simd_math.hpp"
#include "moca/core/bf16.hpp"

namespace moca::cpu {

/// y[i] = f(a[i]) or f(a[i], b[i]) over [s, e) of bf16 arrays, in float: 256 elements at a time
/// widened on the stack, the float loop (which the compiler vectorises), the results rounded
/// once as they are stored (y may alias a or b: a chunk is read before it is written).
template <class F>
inline void bf16_map(std::int64_t s, std::int64_t e, F f, bf16* y, const bf16* a,
                     const bf16* b = nullptr) {
  constexpr std::int64_t kChunk = 256;
  alignas(32) float af[kChunk], bf[kChunk], yf[kChunk];
  for (std::int64_t c = s; c < e; c += kChunk) {
    const std::int64_t n = std::min(kChunk, e - c);
    widen_bf16(n, a + c, af);
    if (b != nullptr) {
      widen_bf16(n, b + c, bf);
      for (std::int64_t i = 0; i < n; ++i) yf[i] = f(af[i], bf[i]);
    } else {
      for (std::int64_t i = 0; i < n; ++i) yf[i] = f(af[i], 0.0f);
    }
    narrow_to_bf16(n, yf, y + c);
  }
}

template <class T>
void fill(std::int64_t n, T value, T* x) {
  parallel_for(n, n, [&](std::int64_t b, std::int64_t e) {
    for (std::int64_t i = b; i < e; ++i) x[i] = value;
  });
}

/// y = alpha * x + beta * y  (beta == 0 overwrites y without reading it).
template <class T>
void axpby(std::int64_t n, T alpha, const T* x, T beta, T* y) {
  parallel_for(n, n, [&](std::int64_t b, std::int64_t e) {
    if constexpr (std::is_same_v<T, bf16>) {
      const float a = alpha, c = beta;
      if (beta == T(0))
        bf16_map(b, e, [a](float u, float) { return a * u; }, y, x);
      else
        bf16_map(b, e, [a, c](float u, float v) { return a * u + c * v; }, y, x, y);
      return;
    }
    if (beta == T(0)) {
#pragma omp simd
      for (std::int64_t i = b; i < e; ++i) y[i] = alpha * x[i];
    } else {
#pragma omp simd
      for (std::int64_t i = b; i < e; ++i) y[i] = alpha * x[i] + beta * y[i];
    }
  });
}

/// x *= alpha
template <class T>
void scale(std::int64_t n, T alpha, T* x) {
  parallel_for(n, n, [&](std::int64_t b, std::int64_t e) {
    if constexpr (std::is_same_v<T, bf16>) {
      const float a = alpha;
      bf16_map(b, e, [a](float u, float) { return u * a; }, x, x);
      return;
    }
#pragma omp simd
    for (std::int64_t i = b; i < e; ++i) x[i] *= alpha;
  });
}

/// y = a + b (y may alias a or b).
template <class T>
void add(std::int64_t n, const T* a, const T* b, T* y) {
  parallel_for(n, n, [&](std::int64_t s, std::int64_t e) {
    if constexpr (std::is_same_v<T, bf16>) {
      bf16_map(s, e, [](float u, float v) { return u + v; }, y, a, b);
      return;
    }
#pragma omp simd
    for (std::int64_t i = s; i < e; ++i) y[i] = a[i] + b[i];
  });
}

/// y = a * b elementwise (y may alias a or b).
template <class T>
void mul(std::int64_t n, const T* a, const T* b, T* y) {
  parallel_for(n, n, [&](std::int64_t s, std::int64_t e) {
    if constexpr (std::is_same_v<T, bf16>) {
      bf16_map(s, e, [](float u, float v) { return u * v; }, y, a, b);
      return;
    }
#pragma omp simd
    for (std::int64_t i = s; i < e; ++i) y[i] = a[i] * b[i];
  });
}

/// x[r, :] += bias for every row r of x [M, N].
template <class T>
void add_bias(std::int64_t M, std::int64_t N, const T* bias, T* x) {
  parallel_for(M, M * N, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      T* row = x + r * N;
#pragma omp simd
      for (std::int64_t j = 0; j < N; ++j) row[j] += bias[j];
    }
  });
}

// Exact GELU, the erf form: gelu(x) = x * Phi(x), Phi the standard normal CDF.
template <class T>
inline T gelu_value(T x) {
  return T(0.5) * x * (T(1) + std::erf(x * T(0.70710678118654752440)));
}
template <class T>
inline T gelu_derivative(T x) {
  const T cdf = T(0.5) * (T(1) + std::erf(x * T(0.70710678118654752440)));
  const T pdf = T(0.39894228040143267794) * std::exp(T(-0.5) * x * x);
  return cdf + x * pdf;
}

#ifdef MOCA_CPU_SIMD_MATH
/// GELU over [b, e) of float arrays, 16 or 8 lanes at a time (Φ from simd_math.hpp, whose two
/// widths round every lane alike); with `dy`, the backward dx = dy·(Φ(x) + x·φ(x)) instead.
inline void gelu_lanes(std::int64_t b, std::int64_t e, const float* x, const float* dy,
                       float* out) {
  std::int64_t i = b;
#ifdef MOCA_CPU_SIMD_MATH_512
  for (; i + 16 <= e; i += 16) {
    const __m512 xv = _mm512_loadu_ps(x + i);
    __m512 result;
    if (dy == nullptr) {
      result = _mm512_mul_ps(xv, simd::normal_cdf(xv));
    } else {
      __m512 pdf;
      const __m512 cdf = simd::normal_cdf(xv, &pdf);
      result = _mm512_mul_ps(_mm512_loadu_ps(dy + i), _mm512_fmadd_ps(xv, pdf, cdf));
    }
    _mm512_storeu_ps(out + i, result);
  }
#endif
  for (; i < e; i += 8) {
    const bool full = i + 8 <= e;
    const __m256i mask = simd::first_lanes(e - i);
    const __m256 xv = full ? _mm256_loadu_ps(x + i) : _mm256_maskload_ps(x + i, mask);
    __m256 result;
    if (dy == nullptr) {
      result = _mm256_mul_ps(xv, simd::normal_cdf(xv));
    } else {
      __m256 pdf;
      const __m256 cdf = simd::normal_cdf(xv, &pdf);
      const __m256 g = full ? _mm256_loadu_ps(dy + i) : _mm256_maskload_ps(dy + i, mask);
      result = _mm256_mul_ps(g, _mm256_fmadd_ps(xv, pdf, cdf));
    }
    if (full) {
      _mm256_storeu_ps(out + i, result);
    } else {
      _mm256_maskstore_ps(out + i, mask, result);
    }
  }
}

#endif

/// GELU of a float array by this build's evaluation: the lanes where there are, else the
/// scalar form.
inline void gelu_float(std::int64_t n, const float* x, const float* dy, float* out) {
#ifdef MOCA_CPU_SIMD_MATH
  gelu_lanes(0, n, x, dy, out);
#else
  for (std::int64_t i = 0; i < n; ++i)
    out[i] = dy == nullptr ? gelu_value(x[i]) : dy[i] * gelu_derivative(x[i]);
#endif
}

/// bf16 GELU by lookup. A bf16 input is one of 65,536 bit patterns, so gelu(x) rounded to bf16
/// and gelu'(x) in float are read from tables instead of evaluated: the erf is compute-bound
/// (0.7 Gelem/s per core), a lookup is a load. The tables are filled by gelu_float, the
/// evaluation the float path runs, so a lookup gives the bits that evaluating x widened to
/// float and rounding the result gives, NaN and infinities included.
struct GeluTables {
  std::array<std::uint16_t, 65536> value;  // bf16 bits of gelu(x), indexed by x's bits
  std::array<float, 65536> slope;          // gelu'(x)
};

inline const GeluTables& gelu_tables() {
  static const std::unique_ptr<const GeluTables> tables = [] {
    auto t = std::make_unique<GeluTables>();  // 384 KiB: on the heap
    std::vector<float> x(65536), ones(65536, 1.0f), y(65536);
    for (std::uint32_t bits = 0; bits < 65536; ++bits)
      x[bits] = bf16::from_bits(static_cast<std::uint16_t>(bits));
    gelu_float(65536, x.data(), nullptr, y.data());
    for (std::uint32_t bits = 0; bits < 65536; ++bits) t->value[bits] = bf16(y[bits]).bits();
    gelu_float(65536, x.data(), ones.data(), t->slope.data());  // 1·gelu'(x) is gelu'(x)
    return t;
  }();
  return *tables;
}

/// y = gelu(x) on bf16 by table.
inline void gelu_lookup(std::int64_t b, std::int64_t e, const GeluTables& t, const bf16* x,
                        bf16* y) {
  for (std::int64_t i = b; i < e; ++i) y[i] = bf16::from_bits(t.value[x[i].bits()]);
}

/// dx = dy · gelu'(x) on bf16 by table, the product in float and rounded once (dx may alias
/// dy: a chunk is read before it is written).
inline void gelu_slope_lookup(std::int64_t b, std::int64_t e, const GeluTables& t, const bf16* x,
                              const bf16* dy, bf16* dx) {
  constexpr std::int64_t kChunk = 256;
  alignas(64) float g[kChunk];
  for (std::int64_t c = b; c < e; c += kChunk) {
    const std::int64_t n = std::min(kChunk, e - c);
    widen_bf16(n, dy + c, g);
    for (std::int64_t i = 0; i < n; ++i) g[i] *= t.slope[x[c + i].bits()];
    narrow_to_bf16(n, g, dx + c);
  }
}

template <class T>
void gelu_forward(std::int64_t n, const T* x, T* y) {
  if constexpr (std::is_same_v<T, bf16>) {
    const GeluTables& t = gelu_tables();
    parallel_for(n, n, [&](std::int64_t b, std::int64_t e) { gelu_lookup(b, e, t, x, y); });
    return;
  }
  parallel_for(n, 8 * n, [&](std::int64_t b, std::int64_t e) {
#ifdef MOCA_CPU_SIMD_MATH
    if constexpr (std::is_same_v<T, float>) {
      gelu_lanes(b, e, x, nullptr, y);
      return;
    }
#endif
    for (std::int64_t i = b; i < e; ++i) y[i] = gelu_value<compute_t<T>>(x[i]);
  });
}

/// dx = dy * gelu'(x)  (dx may alias dy).
template <class T>
void gelu_backward(std::int64_t n, const T* x, const T* dy, T* dx) {
  if constexpr (std::is_same_v<T, bf16>) {
    const GeluTables& t = gelu_tables();
    parallel_for(n, 2 * n,
                 [&](std::int64_t b, std::int64_t e) { gelu_slope_lookup(b, e, t, x, dy, dx); });
    return;
  }
  parallel_for(n, 8 * n, [&](std::int64_t b, std::int64_t e) {
#ifdef MOCA_CPU_SIMD_MATH
    if constexpr (std::is_same_v<T, float>) {
      gelu_lanes(b, e, x, dy, dx);
      return;
    }
#endif
    for (std::int64_t i = b; i < e; ++i) dx[i] = dy[i] * gelu_derivative<compute_t<T>>(x[i]);
  });
}

template <class T>
void relu_forward(std::int64_t n, const T* x, T* y) {
  parallel_for(n, n, [&](std::int64_t b, std::int64_t e) {
#pragma omp simd
    for (std::int64_t i = b; i < e; ++i) y[i] = x[i] > T(0) ? x[i] : T(0);
  });
}

/// dx = dy where x > 0, else 0 (dx may alias dy). The subgradient at 0 is 0, as in PyTorch.
template <class T>
void relu_backward(std::int64_t n, const T* x, const T* dy, T* dx) {
  parallel_for(n, n, [&](std::int64_t b, std::int64_t e) {
#pragma omp simd
    for (std::int64_t i = b; i < e; ++i) dx[i] = x[i] > T(0) ? dy[i] : T(0);
  });
}

/// One AdamW step (PyTorch's torch.optim.AdamW, decoupled decay applied first):
///   p *= 1 - lr * wd;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
///   p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
/// `step` counts from 1.
template <class T, class G>
void adamw(std::int64_t n, T* p, const G* g, T* m, T* v, double lr, double beta1, double beta2,
           double eps, double weight_decay, std::int64_t step) {
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  const T decay = static_cast<T>(1.0 - lr * weight_decay);
  const T step_size = static_cast<T>(lr / bc1);
  const T inv_sqrt_bc2 = static_cast<T>(1.0 / std::sqrt(bc2));
  // 1 − β is formed in double before rounding, as torch does: rounding β2 = 0.999 to float first
  // would make 1 − β2 off by 1.3e-5 relative.
  const T b1 = static_cast<T>(beta1), b2 = static_cast<T>(beta2), e = static_cast<T>(eps);
  const T one_minus_b1 = static_cast<T>(1.0 - beta1), one_minus_b2 = static_cast<T>(1.0 - beta2);
  parallel_for(n, 4 * n, [&](std::int64_t s, std::int64_t end) {
#pragma omp simd
    for (std::int64_t i = s; i < end; ++i) {
      const T gi = g[i];
      const T mi = b1 * m[i] + one_minus_b1 * gi;
      const T vi = b2 * v[i] + one_minus_b2 * gi * gi;
      m[i] = mi;
      v[i] = vi;
      p[i] = p[i] * decay - step_size * mi / (std::sqrt(vi) * inv_sqrt_bc2 + e);
    }
  });
}

/// y[i] = x[i] in y's type (rounding to nearest even where it is narrower).
template <class S, class T>
void convert(std::int64_t n, const S* x, T* y) {
  parallel_for(n, n, [&](std::int64_t b, std::int64_t e) {
    if constexpr (std::is_same_v<S, bf16> && std::is_same_v<T, float>) {
      widen_bf16(e - b, x + b, y + b);
    } else if constexpr (std::is_same_v<S, float> && std::is_same_v<T, bf16>) {
      narrow_to_bf16(e - b, x + b, y + b);
    } else {
      for (std::int64_t i = b; i < e; ++i) y[i] = static_cast<T>(x[i]);
    }
  });
}

/// Sum of squares, accumulated in double over a fixed partition (so the result does not depend
/// on the number of threads).
template <class T>
double sum_squares(std::int64_t n, const T* x) {
  constexpr std::int64_t kParts = 64;
  std::array<double, kParts> partial{};
  parallel_for(kParts, n, [&](std::int64_t p0, std::int64_t p1) {
    for (std::int64_t p = p0; p < p1; ++p) {
      const std::int64_t b = n * p / kParts, e = n * (p + 1) / kParts;
      double s = 0.0;
      for (std::int64_t i = b; i < e; ++i) s += static_cast<double>(x[i]) * static_cast<double>(x[i]);
      partial[p] = s;
    }
  });
  double total = 0.0;
  for (double s : partial) total += s;
  return total;
}

}  // namespace moca::cpu
