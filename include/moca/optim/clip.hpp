// Global gradient-norm clipping over the one flat gradient buffer (spec §7.4), with
// torch.nn.utils.clip_grad_norm_ semantics:
//
//   double norm = clip_grad_norm(store, 0.1);            // norm before clipping
//   double norm = clip_grad_norm(store, std::nullopt);   // clipping disabled: only the norm
//   clip_to_norm(store.grads(), norm, 0.1);              // the norm measured already
//
// The norm is sqrt(Σ g²) over every gradient of the store, accumulated in double. Gradients are
// multiplied by coef = max_norm / (norm + 1e-6) when coef < 1 (torch multiplies by
// min(coef, 1), which is the same). A max_norm of 0 is not "off": it zeroes every gradient, as
// the reference does with --clip_grad 0 (spec §11.8). Disabling is explicit: std::nullopt.
#pragma once

#include <cmath>
#include <optional>

#include "moca/core/profiler.hpp"
#include "moca/core/check.hpp"
#include "moca/core/tensor.hpp"
#include "moca/nn/parameter.hpp"
#include "moca/ops/elementwise.hpp"
#include "moca/ops/reduce.hpp"

namespace moca {

/// sqrt(Σ g²) over a flat gradient buffer, accumulated in double.
template <class T, class D>
double global_grad_norm(const TensorView<T, D>& grads) {
  return std::sqrt(ops::sum_squares(grads));
}

/// sqrt(Σ g²) over every gradient of `store` (one pass over grads()).
template <class T, class D>
double global_grad_norm(const ParameterStore<T, D>& store) {
  return global_grad_norm(store.grads());
}

/// The factor clipping applies for a given norm: min(1, max_norm / (norm + 1e-6)). A non-finite
/// norm gives 1 (gradients are left for the caller to reject the step).
inline double clip_coefficient(double norm, double max_norm) {
  if (!std::isfinite(norm)) return 1.0;
  const double coef = max_norm / (norm + 1e-6);
  return coef < 1.0 ? coef : 1.0;
}

/// Clips a flat gradient buffer whose norm is known (measured as global_grad_norm does, e.g.
/// read with other values from a PendingValues set) to `max_norm` (≥ 0).
template <class T, class D>
void clip_to_norm(const TensorView<T, D>& grads, double norm, double max_norm) {
  MOCA_PROFILE_SCOPE("clip_grad_norm");
  MOCA_CHECK(max_norm >= 0.0, "clip_grad_norm: negative max_norm ", max_norm,
             " (pass std::nullopt to disable clipping)");
  const double coef = clip_coefficient(norm, max_norm);
  if (coef < 1.0) ops::scale(grads, T(coef));
}

/// Clips a flat gradient buffer to `max_norm` (≥ 0) and returns its norm before clipping.
template <class T, class D>
double clip_grad_norm(const TensorView<T, D>& grads, double max_norm) {
  MOCA_CHECK(max_norm >= 0.0, "clip_grad_norm: negative max_norm ", max_norm,
             " (pass std::nullopt to disable clipping)");
  double norm = 0;
  {
    MOCA_PROFILE_SCOPE("clip_grad_norm");
    norm = global_grad_norm(grads);
  }
  clip_to_norm(grads, norm, max_norm);
  return norm;
}

/// Clips every gradient of `store` to a global norm of `max_norm` (≥ 0); returns the norm
/// before clipping.
template <class T, class D>
double clip_grad_norm(const ParameterStore<T, D>& store, double max_norm) {
  return clip_grad_norm(store.grads(), max_norm);
}

/// As above; std::nullopt disables clipping and only measures the norm.
template <class T, class D>
double clip_grad_norm(const ParameterStore<T, D>& store, std::optional<double> max_norm) {
  return max_norm ? clip_grad_norm(store.grads(), *max_norm) : global_grad_norm(store);
}

}  // namespace moca
