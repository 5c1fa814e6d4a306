// Shared pieces of the op tests: random inputs, naive reference loops in double, comparisons,
// gradient checks, error-message checks and a thread-count guard.
//
// A reference is written as the textbook loop, in double, from the same inputs the op receives
// (float inputs widen exactly), so a difference is the op's own error.
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <moca/core/random.hpp>
#include <moca/moca.hpp>
#include <moca/testing/gradcheck.hpp>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace moca::test {

using i64 = std::int64_t;
using Vec = std::vector<double>;

/// Relative tolerance of a comparison with a double reference: a few float ulps scaled by the
/// sizes used here, or a few hundred double ulps.
template <class T>
inline constexpr double kRel = std::is_same_v<T, float> ? 1e-5 : 1e-12;

inline Philox rng() { return Philox(0x6d6f6361); }

/// Uniform values in [lo, hi).
template <class T>
Tensor<T> uniform(Shape s, std::uint64_t stream, double lo = -1.0, double hi = 1.0) {
  Tensor<T> t(s);
  fill_uniform(static_cast<const TensorView<T>&>(t), rng(), stream, lo, hi);
  return t;
}

/// Integers in [lo, hi]: with small bounds, products and sums of them stay exact in float.
template <class T>
Tensor<T> integers(Shape s, std::uint64_t stream, int lo, int hi) {
  Tensor<T> t(s);
  const Philox r = rng();
  for (i64 i = 0; i < t.numel(); ++i)
    t.data()[i] = static_cast<T>(
        lo + static_cast<int>(r.below(static_cast<std::uint64_t>(hi - lo + 1), stream,
                                      static_cast<std::uint64_t>(i))));
  return t;
}

/// Integers in [-m, -1] ∪ [1, m]: exact in float like integers(), and a 1×1 product of them
/// cannot be zero.
template <class T>
Tensor<T> nonzero_integers(Shape s, std::uint64_t stream, int m) {
  Tensor<T> t = integers<T>(s, stream, -m, m - 1);
  for (T& v : t) v = v >= 0 ? v + 1 : v;
  return t;
}

/// Indices in [0, rows).
inline Tensor<Index> indices(i64 n, i64 rows, std::uint64_t stream) {
  Tensor<Index> t({n});
  const Philox r = rng();
  for (i64 i = 0; i < n; ++i)
    t.data()[i] = static_cast<Index>(
        r.below(static_cast<std::uint64_t>(rows), stream, static_cast<std::uint64_t>(i)));
  return t;
}

template <class T>
Vec to_vec(const TensorView<T>& x) {
  return Vec(x.data(), x.data() + x.numel());
}

template <class T>
void fill_nan(const TensorView<T>& x) {
  std::fill(x.begin(), x.end(), std::numeric_limits<T>::quiet_NaN());
}

inline double max_abs(const Vec& v) {
  double m = 0;
  for (double e : v) m = std::max(m, std::abs(e));
  return m;
}

/// Per-element scale: the largest |e| of the element's row ([M, N] view of e).
inline Vec row_scale(const Vec& e, i64 N) {
  Vec s(e.size());
  for (std::size_t r0 = 0; r0 < e.size(); r0 += static_cast<std::size_t>(N)) {
    double m = 0;
    for (std::size_t j = r0; j < r0 + static_cast<std::size_t>(N); ++j) m = std::max(m, std::abs(e[j]));
    for (std::size_t j = r0; j < r0 + static_cast<std::size_t>(N); ++j) s[j] = m;
  }
  return s;
}

/// Checks |actual - expected| <= rel · (|expected| + scale) element by element, where scale is
/// one value for all elements or one per element (the magnitude the error is measured against).
/// The reference must not be all zero: a comparison with zeros would pass for a kernel that
/// writes nothing.
template <class T>
void check_close_scaled(const std::string& what, const TensorView<T>& actual, const Vec& expected,
                        double rel, const Vec& scale) {
  REQUIRE_MESSAGE(actual.numel() == static_cast<i64>(expected.size()),
                  (what + ": size differs from the reference"));
  CHECK_MESSAGE(max_abs(expected) > 0, (what + ": the reference is all zero"));
  i64 failures = 0, worst = 0;
  double worst_ratio = -1;
  for (i64 i = 0; i < actual.numel(); ++i) {
    const double a = static_cast<double>(actual.data()[i]), e = expected[i];
    const double s = scale.size() == 1 ? scale[0] : scale[i];
    const double err = std::abs(a - e), tol = rel * (std::abs(e) + s);
    const bool ok = err <= tol;  // false for NaN
    failures += ok ? 0 : 1;
    const double ratio = ok ? (tol > 0 ? err / tol : 0.0) : std::numeric_limits<double>::infinity();
    if (ratio > worst_ratio) worst_ratio = ratio, worst = i;
  }
  std::ostringstream os;
  os.precision(17);
  os << what << " " << actual.shape() << ": " << failures << " of " << actual.numel()
     << " elements out of tolerance; worst [" << worst << "] " << actual.data()[worst]
     << " vs reference " << expected[worst] << " (rel " << rel << ")";
  CHECK_MESSAGE(failures == 0, os.str());
}

/// Normwise: errors measured against the largest |expected| of the whole tensor.
template <class T>
void check_close(const std::string& what, const TensorView<T>& actual, const Vec& expected,
                 double rel = kRel<T>) {
  check_close_scaled(what, actual, expected, rel, Vec{max_abs(expected)});
}

/// Row-wise: errors measured against the largest |expected| of the element's row.
template <class T>
void check_close_rows(const std::string& what, const TensorView<T>& actual, const Vec& expected,
                      double rel = kRel<T>) {
  check_close_scaled(what, actual, expected, rel, row_scale(expected, actual.shape().last()));
}

/// Exact equality with the reference (integer-valued computations).
template <class T>
void check_exact(const std::string& what, const TensorView<T>& actual, const Vec& expected) {
  check_close_scaled(what, actual, expected, 0.0, Vec{0.0});
}

/// Bitwise equality of two tensors.
template <class T>
void check_bitwise(const std::string& what, const TensorView<T>& a, const TensorView<T>& b) {
  REQUIRE(a.numel() == b.numel());
  CHECK_MESSAGE(std::memcmp(a.data(), b.data(), a.bytes()) == 0, (what + ": results differ bitwise"));
}

/// Runs f, which must throw moca::Error whose message contains every piece (the shapes).
template <class F>
void check_error_names(const std::string& what, F&& f, std::initializer_list<std::string> pieces) {
  try {
    f();
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const std::string& p : pieces)
      CHECK_MESSAGE(msg.find(p) != std::string::npos,
                    (what + ": message \"" + msg + "\" does not name " + p));
    return;
  }
  FAIL_CHECK((what + ": no moca::Error thrown"));
}

/// Central differences of loss against the analytic gradient; the gradient must not vanish
/// (a zero gradient agrees with any loss that ignores x).
template <class F>
void check_gradient(const std::string& name, const TensorView<double>& x,
                    const TensorView<double>& analytic, F&& loss,
                    const testing::GradcheckOptions& opt = {}) {
  const auto report = testing::gradcheck(name, x, analytic, loss, opt);
  CHECK_MESSAGE(report.ok, report.message());
  CHECK_MESSAGE(report.grad_norm > 0, (name + ": the analytic gradient is zero"));
}

/// Sets the OpenMP thread count for its lifetime.
class Threads {
 public:
  explicit Threads(int n) {
#ifdef _OPENMP
    saved_ = omp_get_max_threads();
    omp_set_num_threads(n);
#else
    (void)n;
#endif
  }
  ~Threads() {
#ifdef _OPENMP
    omp_set_num_threads(saved_);
#endif
  }
  Threads(const Threads&) = delete;
  Threads& operator=(const Threads&) = delete;

 private:
  int saved_ = 1;
};

// ---- naive references, in double ------------------------------------------------------------
namespace ref {

/// C = alpha · op(A) · op(B) + beta · C (beta = 0: C is not read). Row-major with leading
/// dimensions; A is stored [K, M] when ta, else [M, K]; likewise B.
inline void gemm(bool ta, bool tb, i64 M, i64 N, i64 K, double alpha, const double* A, i64 lda,
                 const double* B, i64 ldb, double beta, double* C, i64 ldc) {
  for (i64 i = 0; i < M; ++i)
    for (i64 j = 0; j < N; ++j) {
      double s = 0;
      for (i64 k = 0; k < K; ++k)
        s += (ta ? A[k * lda + i] : A[i * lda + k]) * (tb ? B[j * ldb + k] : B[k * ldb + j]);
      double& c = C[i * ldc + j];
      c = alpha * s + (beta == 0 ? 0.0 : beta * c);
    }
}

inline double gelu(double x) { return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0))); }
inline double gelu_grad(double x) {
  const double pi = 3.14159265358979323846;
  return 0.5 * (1.0 + std::erf(x / std::sqrt(2.0))) + x * std::exp(-0.5 * x * x) / std::sqrt(2 * pi);
}

inline Vec softmax(const Vec& x, i64 M, i64 N, bool log) {
  Vec y(x.size());
  for (i64 r = 0; r < M; ++r) {
    const double* xr = &x[r * N];
    double mx = -std::numeric_limits<double>::infinity();
    for (i64 j = 0; j < N; ++j) mx = std::max(mx, xr[j]);
    double s = 0;
    for (i64 j = 0; j < N; ++j) s += std::exp(xr[j] - mx);
    for (i64 j = 0; j < N; ++j)
      y[r * N + j] = log ? xr[j] - mx - std::log(s) : std::exp(xr[j] - mx) / s;
  }
  return y;
}

/// dx from y = softmax(x) (or log_softmax when log) and dy.
inline Vec softmax_backward(const Vec& y, const Vec& dy, i64 M, i64 N, bool log) {
  Vec dx(y.size());
  for (i64 r = 0; r < M; ++r) {
    double s = 0;
    for (i64 j = 0; j < N; ++j) s += log ? dy[r * N + j] : dy[r * N + j] * y[r * N + j];
    for (i64 j = 0; j < N; ++j) {
      const i64 k = r * N + j;
      dx[k] = log ? dy[k] - std::exp(y[k]) * s : y[k] * (dy[k] - s);
    }
  }
  return dx;
}

struct LayerNorm {
  Vec y, mean, rstd;
};
/// gamma/beta empty: no affine transform.
inline LayerNorm layer_norm(const Vec& x, const Vec& gamma, const Vec& beta, double eps, i64 M,
                            i64 N) {
  LayerNorm o{Vec(x.size()), Vec(M), Vec(M)};
  for (i64 r = 0; r < M; ++r) {
    double mu = 0, var = 0;
    for (i64 j = 0; j < N; ++j) mu += x[r * N + j];
    mu /= static_cast<double>(N);
    for (i64 j = 0; j < N; ++j) var += (x[r * N + j] - mu) * (x[r * N + j] - mu);
    var /= static_cast<double>(N);
    const double rs = 1.0 / std::sqrt(var + eps);
    for (i64 j = 0; j < N; ++j) {
      double v = (x[r * N + j] - mu) * rs;
      if (!gamma.empty()) v *= gamma[j];
      if (!beta.empty()) v += beta[j];
      o.y[r * N + j] = v;
    }
    o.mean[r] = mu;
    o.rstd[r] = rs;
  }
  return o;
}

struct LayerNormGrad {
  Vec dx, dgamma, dbeta;  // dgamma, dbeta: this call's contribution only
};
/// From the saved mean and rstd, as the op receives them.
inline LayerNormGrad layer_norm_backward(const Vec& x, const Vec& gamma, const Vec& mean,
                                         const Vec& rstd, const Vec& dy, i64 M, i64 N) {
  LayerNormGrad g{Vec(x.size()), Vec(N, 0.0), Vec(N, 0.0)};
  for (i64 r = 0; r < M; ++r) {
    Vec xhat(N), gh(N);
    double mg = 0, mgx = 0;
    for (i64 j = 0; j < N; ++j) {
      xhat[j] = (x[r * N + j] - mean[r]) * rstd[r];
      gh[j] = dy[r * N + j] * (gamma.empty() ? 1.0 : gamma[j]);
      mg += gh[j];
      mgx += gh[j] * xhat[j];
      g.dgamma[j] += dy[r * N + j] * xhat[j];
      g.dbeta[j] += dy[r * N + j];
    }
    mg /= static_cast<double>(N);
    mgx /= static_cast<double>(N);
    for (i64 j = 0; j < N; ++j) g.dx[r * N + j] = rstd[r] * (gh[j] - mg - xhat[j] * mgx);
  }
  return g;
}

struct L2Norm {
  Vec y, norm;
};
inline L2Norm l2_normalize(const Vec& x, double eps, i64 M, i64 N) {
  L2Norm o{Vec(x.size()), Vec(M)};
  for (i64 r = 0; r < M; ++r) {
    double ss = 0;
    for (i64 j = 0; j < N; ++j) ss += x[r * N + j] * x[r * N + j];
    o.norm[r] = std::sqrt(ss);
    const double d = std::max(o.norm[r], eps);
    for (i64 j = 0; j < N; ++j) o.y[r * N + j] = x[r * N + j] / d;
  }
  return o;
}
/// Jacobian of x / ||x|| is (I - y yᵀ) / ||x||; of x / eps (clamped) it is I / eps.
inline Vec l2_normalize_backward(const Vec& y, const Vec& norm, double eps, const Vec& dy, i64 M,
                                 i64 N) {
  Vec dx(y.size());
  for (i64 r = 0; r < M; ++r) {
    if (norm[r] > eps) {
      double d = 0;
      for (i64 j = 0; j < N; ++j) d += y[r * N + j] * dy[r * N + j];
      for (i64 j = 0; j < N; ++j) dx[r * N + j] = (dy[r * N + j] - y[r * N + j] * d) / norm[r];
    } else {
      for (i64 j = 0; j < N; ++j) dx[r * N + j] = dy[r * N + j] / eps;
    }
  }
  return dx;
}

/// y[o, i] = alpha · Σ_j x[o, j, i] + beta · y[o, i] (beta = 0: y is not read).
inline Vec sum_middle(const Vec& x, i64 outer, i64 n, i64 inner, double alpha, double beta,
                      const Vec& y0) {
  Vec y(static_cast<std::size_t>(outer * inner));
  for (i64 o = 0; o < outer; ++o)
    for (i64 i = 0; i < inner; ++i) {
      double s = 0;
      for (i64 j = 0; j < n; ++j) s += x[(o * n + j) * inner + i];
      y[o * inner + i] = alpha * s + (beta == 0 ? 0.0 : beta * y0[o * inner + i]);
    }
  return y;
}

/// One step of torch.optim.AdamW (decoupled weight decay, bias-corrected moments), written as
/// PyTorch's single-tensor implementation does it. `t` counts from 1.
inline void adamw(Vec& p, const Vec& g, Vec& m, Vec& v, double lr, double beta1, double beta2,
                  double eps, double wd, i64 t) {
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(t));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(t));
  for (std::size_t i = 0; i < p.size(); ++i) {
    p[i] *= 1.0 - lr * wd;
    m[i] = beta1 * m[i] + (1.0 - beta1) * g[i];
    v[i] = beta2 * v[i] + (1.0 - beta2) * g[i] * g[i];
    const double denom = std::sqrt(v[i]) / std::sqrt(bc2) + eps;
    p[i] -= lr / bc1 * m[i] / denom;
  }
}

}  // namespace ref
}  // namespace moca::test
