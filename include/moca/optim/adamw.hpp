// AdamW over a ParameterStore's flat arena, with per-group lr and weight decay
// (torch.optim.AdamW semantics, spec §7.1).
//
//   AdamW<float> opt(store);                  // moments m, v: flat buffers aligned with values()
//   ParamGroups groups = moca_param_groups(store);
//   ...backward, clip...
//   set_moca_hyperparameters(groups, lr, wd);
//   opt.step(groups);                         // one ops::adamw per merged segment of each group
//
// Per element of a group with learning rate lr and weight decay wd, at step t (from 1):
//   p ← p·(1 − lr·wd);  m ← β1·m + (1 − β1)·g;  v ← β2·v + (1 − β2)·g²
//   p ← p − lr/(1 − β1ᵗ) · m / (sqrt(v)/sqrt(1 − β2ᵗ) + eps)
// A group with lr 0 still updates its moments, as torch does. Elements in no group are not
// touched. The store must keep its buffers while the optimiser lives (moving the store is fine:
// the buffers move with it). For a store with a float master copy (bf16 parameters), the step
// updates the master from the (float) gradients with float moments, then rounds each updated
// segment into the bf16 values: AdamW<bf16> follows AdamW<float> given the same gradients.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

#include "moca/core/profiler.hpp"
#include "moca/core/check.hpp"
#include "moca/core/tensor.hpp"
#include "moca/nn/parameter.hpp"
#include "moca/ops/elementwise.hpp"
#include "moca/ops/optim.hpp"
#include "moca/optim/param_groups.hpp"

namespace moca {

/// Constants of AdamW shared by every group (torch defaults).
struct AdamWConfig {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
};

/// AdamW on device D over the trainable arena of one ParameterStore.
template <class T, class D = Cpu>
class AdamW {
 public:
  AdamW() = default;
  /// Zero moments for every trainable element of `store`, which must have gradients.
  explicit AdamW(const ParameterStore<T, D>& store, const AdamWConfig& config = {})
      : config_(config),
        values_(store.values()),
        master_(store.master()),
        grads_(store.grads()),
        entries_(trainable_entries(store)),
        m_({store.num_trainable()}),
        v_({store.num_trainable()}) {
    MOCA_CHECK(store.has_grads() || store.num_trainable() == 0,
               "AdamW: the parameter store has no gradient buffer");
    MOCA_CHECK(config.beta1 >= 0.0 && config.beta1 < 1.0 && config.beta2 >= 0.0 &&
                   config.beta2 < 1.0 && config.eps >= 0.0,
               "AdamW: invalid betas (", config.beta1, ", ", config.beta2, ") or eps ",
               config.eps);
  }

  /// One step: advances the step counter, then updates every group with its own lr and weight
  /// decay. `groups` must describe this optimiser's arena.
  void step(const ParamGroups& groups) {
    MOCA_PROFILE_SCOPE("adamw");
    detail::check_groups_fit("AdamW", groups, values_.numel());
    for (const ParamGroup& g : groups)
      MOCA_CHECK(g.lr >= 0.0 && g.weight_decay >= 0.0, "AdamW: group '", g.name,
                 "' has a negative lr ", g.lr, " or weight decay ", g.weight_decay);
    ++step_;
    for (const ParamGroup& g : groups) {
      const ops::AdamWStep s{g.lr, config_.beta1, config_.beta2, config_.eps, g.weight_decay,
                             step_};
      for (const ParamSegment& seg : g.segments) {
        if constexpr (ParameterStore<T, D>::kHasMaster) {
          const TensorView<M, D> p = slice(master_, seg);
          ops::adamw(p, slice(grads_, seg), slice(m_, seg), slice(v_, seg), s);
          ops::convert(p, slice(values_, seg));
        } else {
          ops::adamw(slice(values_, seg), slice(grads_, seg), slice(m_, seg), slice(v_, seg), s);
        }
      }
    }
  }

  /// Number of steps taken (torch's state["step"]); the next step uses steps() + 1.
  std::int64_t steps() const { return step_; }
  /// Sets the step counter (resuming from a checkpoint).
  void set_steps(std::int64_t steps) {
    MOCA_CHECK(steps >= 0, "AdamW: negative step count ", steps);
    step_ = steps;
  }
  /// Zero moments and step counter.
  void reset() {
    ops::zero(TensorView<M, D>(m_));
    ops::zero(TensorView<M, D>(v_));
    step_ = 0;
  }

  /// The moments' type: float for bf16 parameters, else the parameters' own.
  using M = compute_t<T>;

  /// First moments (torch's exp_avg), flat and aligned with the store's values().
  TensorView<M, D> exp_avg() const { return m_; }
  /// Second moments (torch's exp_avg_sq), flat and aligned with the store's values().
  TensorView<M, D> exp_avg_sq() const { return v_; }
  /// First moments of one trainable entry, in its shape.
  TensorView<M, D> exp_avg(std::string_view entry) const { return entry_view(m_, entry); }
  /// Second moments of one trainable entry, in its shape.
  TensorView<M, D> exp_avg_sq(std::string_view entry) const { return entry_view(v_, entry); }
  /// The trainable entries the moments are laid out by (names are checkpoint keys).
  const std::vector<ArenaEntry>& entries() const { return entries_; }

  const AdamWConfig& config() const { return config_; }

 private:
  template <class E>
  static TensorView<E, D> slice(const TensorView<E, D>& flat, const ParamSegment& s) {
    return flat.rows(s.offset, s.end());
  }
  TensorView<M, D> entry_view(const Tensor<M, D>& flat, std::string_view name) const {
    const ArenaEntry& e = detail::find_arena_entry("AdamW", entries_, name);
    return TensorView<M, D>(flat.data() + e.offset, e.shape);
  }

  AdamWConfig config_;
  TensorView<T, D> values_;
  TensorView<M, D> master_;  // empty unless the store keeps one
  TensorView<grad_t<T>, D> grads_;
  std::vector<ArenaEntry> entries_;
  Tensor<M, D> m_, v_;
  std::int64_t step_ = 0;
};

}  // namespace moca
