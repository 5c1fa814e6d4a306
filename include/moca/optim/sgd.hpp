// SGD with momentum over a ParameterStore's flat arena, with per-group lr and weight decay
// (torch.optim.SGD semantics).
//
//   Sgd<float> opt(store, {.momentum = 0.9});
//   opt.step(decay_groups(store, 0.1, 1e-4));
//
// Per element of a group with learning rate lr and weight decay wd:
//   d = g + wd·p
//   buf = d on the first step, else μ·buf + (1 − dampening)·d     (only when μ ≠ 0)
//   d = d + μ·buf if nesterov, else buf                           (only when μ ≠ 0)
//   p ← p − lr·d
// The gradient buffer is left unchanged. The update is written with axpby/axpy only, so it runs
// on any device that has the elementwise ops. For bf16 parameters the update runs on the store's
// float master copy with a float buffer, from the float gradients, and each updated segment is
// then rounded into the values, as in AdamW.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

#include "moca/core/check.hpp"
#include "moca/core/tensor.hpp"
#include "moca/nn/parameter.hpp"
#include "moca/ops/elementwise.hpp"
#include "moca/optim/param_groups.hpp"

namespace moca {

/// Constants of SGD shared by every group (torch defaults: plain SGD).
struct SgdConfig {
  double momentum = 0.0;
  double dampening = 0.0;
  bool nesterov = false;
};

/// One SGD update of p from g with momentum buffer buf (unused when momentum is 0), learning
/// rate lr and weight decay wd; `first` starts the buffer at the (decayed) gradient as torch does
/// on a parameter's first step. Three axpby passes at most, no scratch memory.
template <class T, class D>
void sgd_update(const TensorView<T, D>& p, const TensorView<T, D>& g, const TensorView<T, D>& buf,
                double lr, double weight_decay, const SgdConfig& c, bool first) {
  detail::check_same_size("sgd_update", p, g);
  if (c.momentum == 0.0) {
    // p ← (1 − lr·wd)·p − lr·g
    ops::axpby(T(-lr), g, T(1.0 - lr * weight_decay), p);
    return;
  }
  detail::check_same_size("sgd_update", p, buf);
  // buf ← μ·buf + (1 − dampening)·(g + wd·p), or g + wd·p on the first step; p is still old here.
  const double keep = first ? 0.0 : c.momentum, take = first ? 1.0 : 1.0 - c.dampening;
  ops::axpby(T(take), g, T(keep), buf);
  if (weight_decay != 0.0) ops::axpy(T(take * weight_decay), p, buf);
  if (c.nesterov) {
    // p ← p − lr·(g + wd·p + μ·buf)
    ops::axpby(T(-lr), g, T(1.0 - lr * weight_decay), p);
    ops::axpy(T(-lr * c.momentum), buf, p);
  } else {
    ops::axpy(T(-lr), buf, p);
  }
}

/// SGD on device D over the trainable arena of one ParameterStore.
template <class T, class D = Cpu>
class Sgd {
 public:
  Sgd() = default;
  /// A momentum buffer (when momentum ≠ 0) for every trainable element of `store`, which must
  /// have gradients.
  explicit Sgd(const ParameterStore<T, D>& store, const SgdConfig& config = {})
      : config_(config),
        values_(store.values()),
        master_(store.master()),
        grads_(store.grads()),
        entries_(trainable_entries(store)) {
    MOCA_CHECK(store.has_grads() || store.num_trainable() == 0,
               "SGD: the parameter store has no gradient buffer");
    MOCA_CHECK(config.momentum >= 0.0, "SGD: negative momentum ", config.momentum);
    MOCA_CHECK(!config.nesterov || (config.momentum > 0.0 && config.dampening == 0.0),
               "SGD: Nesterov momentum requires a momentum and zero dampening (momentum ",
               config.momentum, ", dampening ", config.dampening, ")");
    if (config.momentum != 0.0) buf_ = Tensor<M, D>({store.num_trainable()});
  }

  /// One step: updates every group with its own lr and weight decay, then advances the counter.
  void step(const ParamGroups& groups) {
    detail::check_groups_fit("SGD", groups, values_.numel());
    for (const ParamGroup& g : groups)
      MOCA_CHECK(g.lr >= 0.0 && g.weight_decay >= 0.0, "SGD: group '", g.name,
                 "' has a negative lr ", g.lr, " or weight decay ", g.weight_decay);
    const bool first = step_ == 0;
    for (const ParamGroup& g : groups)
      for (const ParamSegment& s : g.segments) {
        const TensorView<M, D> b = buf_.empty() ? TensorView<M, D>() : buf_.rows(s.offset, s.end());
        if constexpr (ParameterStore<T, D>::kHasMaster) {
          const TensorView<M, D> p = master_.rows(s.offset, s.end());
          sgd_update(p, grads_.rows(s.offset, s.end()), b, g.lr, g.weight_decay, config_, first);
          ops::convert(p, values_.rows(s.offset, s.end()));
        } else {
          sgd_update(values_.rows(s.offset, s.end()), grads_.rows(s.offset, s.end()), b, g.lr,
                     g.weight_decay, config_, first);
        }
      }
    ++step_;
  }

  /// Number of steps taken; after a resume with steps() > 0 the buffer is taken as started.
  std::int64_t steps() const { return step_; }
  /// Sets the step counter (resuming from a checkpoint).
  void set_steps(std::int64_t steps) {
    MOCA_CHECK(steps >= 0, "SGD: negative step count ", steps);
    step_ = steps;
  }
  /// Zero buffer and step counter.
  void reset() {
    if (!buf_.empty()) ops::zero(TensorView<M, D>(buf_));
    step_ = 0;
  }

  /// The buffer's type: float for bf16 parameters, else the parameters' own.
  using M = compute_t<T>;

  /// The momentum buffer, flat and aligned with values() (empty when momentum is 0).
  TensorView<M, D> momentum_buffer() const { return buf_; }
  /// The momentum buffer of one trainable entry, in its shape.
  TensorView<M, D> momentum_buffer(std::string_view entry) const {
    MOCA_CHECK(!buf_.empty(), "SGD: no momentum buffer (momentum is 0)");
    const ArenaEntry& e = detail::find_arena_entry("SGD", entries_, entry);
    return TensorView<M, D>(buf_.data() + e.offset, e.shape);
  }
  /// The trainable entries the buffer is laid out by.
  const std::vector<ArenaEntry>& entries() const { return entries_; }

  const SgdConfig& config() const { return config_; }

 private:
  SgdConfig config_;
  TensorView<T, D> values_;
  TensorView<M, D> master_;  // empty unless the store keeps one
  TensorView<grad_t<T>, D> grads_;
  std::vector<ArenaEntry> entries_;
  Tensor<M, D> buf_;
  std::int64_t step_ = 0;
};

}  // namespace moca
