// Per-iteration schedules of MOCA pretraining as pure functions of the fractional epoch
// e = epoch + it / iters_per_epoch (spec §7.2, §7.3, §3):
//
//   lr(e) = warmup_cosine_lr(e, 1.2e-3, 30, 250)        // linear warmup, cosine to 0 at 250
//   wd(e) = cosine_increase(e, 0.05, 0.20, 200)         // weight decay of the "decay" group
//   m(e)  = cosine_increase(e, 0.994, 1.0, 200)         // teacher EMA momentum
//
// MocaSchedule bundles the three with the run's length and gives them per iteration.
#pragma once

#include <cmath>
#include <cstdint>
#include <numbers>

#include "moca/core/check.hpp"

namespace moca {

/// Linear warmup from 0 to `peak` over [0, warmup_epochs), then a half cosine from `peak` to 0
/// over [warmup_epochs, horizon_epochs], then 0. Requires 0 ≤ warmup < horizon and e ≥ 0.
inline double warmup_cosine_lr(double e, double peak, double warmup_epochs,
                               double horizon_epochs) {
  MOCA_CHECK(warmup_epochs >= 0.0 && horizon_epochs > warmup_epochs,
             "warmup_cosine_lr: need 0 <= warmup (", warmup_epochs, ") < horizon (",
             horizon_epochs, ")");
  MOCA_CHECK(e >= 0.0, "warmup_cosine_lr: negative epoch ", e);
  if (e < warmup_epochs) return peak * e / warmup_epochs;
  if (e > horizon_epochs) return 0.0;
  const double t = (e - warmup_epochs) / (horizon_epochs - warmup_epochs);
  return peak * 0.5 * (1.0 + std::cos(std::numbers::pi * t));
}

/// A half cosine from `start` at e = 0 to `end` at e = max_epochs:
///   end − (end − start)·0.5·(1 + cos(π e / max_epochs)).
/// e is clamped to [0, max_epochs] (the reference never evaluates it outside; clamping keeps the
/// value monotone past the end of a run).
inline double cosine_increase(double e, double start, double end, double max_epochs) {
  MOCA_CHECK(max_epochs > 0.0, "cosine_increase: max_epochs must be positive, got ", max_epochs);
  const double t = std::fmin(std::fmax(e, 0.0), max_epochs) / max_epochs;
  return end - (end - start) * 0.5 * (1.0 + std::cos(std::numbers::pi * t));
}

/// The lr cosine horizon of the reference: int(max_epochs · lr_epochs_mul), truncated as
/// Python's int() does (200 · 1.25 → 250).
inline std::int64_t moca_lr_horizon(double max_epochs, double lr_epochs_mul) {
  return static_cast<std::int64_t>(max_epochs * lr_epochs_mul);
}

/// The absolute peak lr from a base lr: blr · effective_batch / 256 (spec §7.2), with
/// effective_batch = global batch × accumulation steps.
inline double scaled_lr(double base_lr, std::int64_t effective_batch) {
  return base_lr * static_cast<double>(effective_batch) / 256.0;
}

/// A run's schedules (defaults: the README MOCA-v1.0 run, spec §0).
struct MocaSchedule {
  std::int64_t iters_per_epoch = 625;
  double max_epochs = 200;     ///< wd and momentum horizon; training stops here
  double warmup_epochs = 30;
  double lr_epochs_mul = 1.25;
  /// With true the lr horizon is truncated to whole epochs as in the reference; false keeps
  /// max_epochs · lr_epochs_mul exactly (runs measured in fractions of an epoch).
  bool truncate_lr_horizon = true;
  double peak_lr = 1.2e-3;
  double wd_start = 0.05;
  double wd_end = 0.20;        ///< equal to wd_start for a constant decay (v0.9)
  double momentum_start = 0.994;
  double momentum_end = 1.0;   ///< equal to momentum_start for --alpha_constant
  double wgen_lr = 1e-4;       ///< generator groups: constant
  double wgen_weight_decay = 0.05;

  /// The values of one iteration.
  struct Values {
    double epoch;
    double lr;
    double weight_decay;
    double momentum;
  };

  /// Fractional epoch of iteration `it` (counted from 0 over the whole run).
  double epoch(std::int64_t it) const {
    MOCA_CHECK(iters_per_epoch > 0, "MocaSchedule: iters_per_epoch must be positive, got ",
               iters_per_epoch);
    return static_cast<double>(it) / static_cast<double>(iters_per_epoch);
  }
  /// Number of iterations of the whole run (ceil of max_epochs · iters_per_epoch).
  std::int64_t total_iters() const {
    return static_cast<std::int64_t>(std::ceil(max_epochs * static_cast<double>(iters_per_epoch)));
  }
  /// The epoch where the lr cosine reaches 0 (250 for the README run).
  double lr_horizon() const {
    return truncate_lr_horizon ? static_cast<double>(moca_lr_horizon(max_epochs, lr_epochs_mul))
                               : max_epochs * lr_epochs_mul;
  }
  /// Learning rate of the scheduled groups at fractional epoch e.
  double lr(double e) const { return warmup_cosine_lr(e, peak_lr, warmup_epochs, lr_horizon()); }
  /// Weight decay of the "decay" group at fractional epoch e.
  double weight_decay(double e) const { return cosine_increase(e, wd_start, wd_end, max_epochs); }
  /// Teacher EMA momentum at fractional epoch e.
  double momentum(double e) const {
    return cosine_increase(e, momentum_start, momentum_end, max_epochs);
  }
  /// Every value at iteration `it`.
  Values at(std::int64_t it) const {
    const double e = epoch(it);
    return {e, lr(e), weight_decay(e), momentum(e)};
  }
};

}  // namespace moca
