// Central-difference gradient checking, in double, for layers, blocks and whole models.
//
// Typical use: pick a random projection r of the output, so that loss = <r, f(x)> and the
// analytic gradient is backward(dy = r); then compare it with central differences:
//
//   auto loss = [&] { layer.forward(x, y); return moca::testing::dot(r, y); };
//   layer.backward(r, dx);                       // analytic gradients: dx and parameter grads
//   auto report = moca::testing::gradcheck("dx", x, dx, loss);
//   CHECK_MESSAGE(report.ok, report.message());
//
// The checker perturbs x in place (x[i] ± eps), evaluates loss() twice per element and restores
// x exactly. Tolerance: |numeric − analytic| ≤ atol + rtol · max(|numeric|, |analytic|).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "moca/core/rng.hpp"
#include "moca/core/tensor.hpp"

namespace moca::testing {

struct GradcheckOptions {
  double eps = 1e-6;   ///< finite-difference step
  double rtol = 1e-5;  ///< relative tolerance
  double atol = 1e-8;  ///< absolute tolerance
  /// Check at most this many elements (0 = all), chosen at random but reproducibly.
  std::int64_t max_checks = 0;
  std::uint64_t seed = 0;
};

struct GradcheckReport {
  std::string name;
  bool ok = true;
  std::int64_t checked = 0;
  std::int64_t failures = 0;
  double max_abs_error = 0;
  double max_rel_error = 0;
  std::int64_t worst_index = -1;  ///< element with the largest tolerance violation (or error)
  double worst_numeric = 0, worst_analytic = 0;
  double grad_norm = 0;  ///< L2 norm of the analytic gradient over the checked elements

  std::string message() const {
    std::ostringstream os;
    os << "gradcheck '" << name << "': " << (ok ? "ok" : "FAILED") << ", " << failures << " of "
       << checked << " elements out of tolerance; max abs error " << max_abs_error
       << ", max rel error " << max_rel_error << "; worst element " << worst_index
       << ": numeric " << worst_numeric << " vs analytic " << worst_analytic
       << " (analytic gradient norm " << grad_norm << ")";
    return os.str();
  }
};

/// <a, b> over all elements, in double.
template <class T>
double dot(const TensorView<T, Cpu>& a, const TensorView<T, Cpu>& b) {
  MOCA_CHECK(a.numel() == b.numel(), "dot: sizes differ: ", a.shape(), " vs ", b.shape());
  double s = 0;
  for (std::int64_t i = 0; i < a.numel(); ++i)
    s += static_cast<double>(a.data()[i]) * static_cast<double>(b.data()[i]);
  return s;
}

/// Compares `analytic` (d loss / d x) with central differences of `loss` (a callable returning
/// double) with respect to the elements of x.
template <class F>
GradcheckReport gradcheck(std::string name, const TensorView<double, Cpu>& x,
                          const TensorView<double, Cpu>& analytic, F&& loss,
                          const GradcheckOptions& opt = {}) {
  MOCA_CHECK(x.numel() == analytic.numel(), "gradcheck '", name, "': input ", x.shape(),
             " and gradient ", analytic.shape(), " differ in size");
  GradcheckReport r;
  r.name = std::move(name);
  const std::int64_t n = x.numel();
  std::vector<std::int64_t> indices;
  if (opt.max_checks <= 0 || opt.max_checks >= n) {
    indices.resize(static_cast<std::size_t>(n));
    for (std::int64_t i = 0; i < n; ++i) indices[static_cast<std::size_t>(i)] = i;
  } else {
    const Philox rng(opt.seed);
    for (std::int64_t k = 0; k < opt.max_checks; ++k)
      indices.push_back(static_cast<std::int64_t>(rng.below(static_cast<std::uint64_t>(n), 0x9c,
                                                            static_cast<std::uint64_t>(k))));
  }
  double worst_violation = -1;
  double norm2 = 0;
  for (std::int64_t i : indices) {
    double& xi = x.data()[i];
    const double saved = xi;
    xi = saved + opt.eps;
    const double up = static_cast<double>(loss());
    xi = saved - opt.eps;
    const double down = static_cast<double>(loss());
    xi = saved;
    const double numeric = (up - down) / (2 * opt.eps);
    const double a = analytic.data()[i];
    norm2 += a * a;
    const double err = std::abs(numeric - a);
    const double scale = std::max(std::abs(numeric), std::abs(a));
    const double tol = opt.atol + opt.rtol * scale;
    const bool bad = !(err <= tol);  // also catches NaN
    r.checked += 1;
    r.failures += bad ? 1 : 0;
    r.max_abs_error = std::max(r.max_abs_error, err);
    if (scale > 0) r.max_rel_error = std::max(r.max_rel_error, err / scale);
    const double violation = std::isnan(err) ? 1e300 : err / tol;
    if (violation > worst_violation) {
      worst_violation = violation;
      r.worst_index = i;
      r.worst_numeric = numeric;
      r.worst_analytic = a;
    }
  }
  r.grad_norm = std::sqrt(norm2);
  r.ok = r.failures == 0;
  return r;
}

}  // namespace moca::testing
