// Exponential moving average of parameters: the MOCA teacher (spec §3),
//   θ_T ← m·θ_T + (1 − m)·θ_S   over every trainable parameter, skipped when m ≥ 1.
//
//   ema_update(teacher_store, student_store, m);                 // same layouts
//   ema_update(teacher_store, moca_store, m, "encoder");         // the student encoder inside a
//                                                                // bigger model
//   EmaLink<float> link(teacher_store, moca_store, "encoder");   // check once, update per step
//   link.update(m);
//
// Both sides are single ranges of the trainable arenas, so an update is one axpby pass. Frozen
// tensors (position tables) are not touched: they are identical by construction. The layouts
// are checked name for name and shape for shape; an error names the first mismatch. Stores with
// a float master copy (bf16 parameters) average their masters, and the target's values are the
// result rounded: a teacher momentum of 0.996 moves a bf16 weight by far less than its
// resolution each step, which only a float master accumulates.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "moca/core/profiler.hpp"
#include "moca/core/check.hpp"
#include "moca/core/tensor.hpp"
#include "moca/nn/parameter.hpp"
#include "moca/ops/elementwise.hpp"

namespace moca {

/// A checked pairing of a target store's trainable arena with a range of a source store's.
/// Holds views into both arenas: the stores' buffers must outlive it.
template <class T, class D = Cpu>
class EmaLink {
 public:
  EmaLink() = default;

  /// Pairs every trainable entry of `target` with the source entry of the same name under
  /// `source_prefix` ("encoder" or "encoder." pairs "blocks.0.norm1.weight" with
  /// "encoder.blocks.0.norm1.weight"); an empty prefix pairs whole stores. The source entries
  /// under the prefix must be contiguous in the source arena and match the target's entries in
  /// order, name and shape.
  EmaLink(const ParameterStore<T, D>& target, const ParameterStore<T, D>& source,
          std::string_view source_prefix = "") {
    std::string prefix(source_prefix);
    if (!prefix.empty() && prefix.back() != '.') prefix += '.';
    const auto under = [&](const std::string& name) {
      return prefix.empty() || std::string_view(name).starts_with(prefix);
    };

    // The source entries under the prefix, checked to form one run of the trainable order.
    std::vector<const typename ParameterStore<T, D>::Entry*> src;
    const typename ParameterStore<T, D>::Entry* before = nullptr;  // last trainable entry seen
    bool ended = false;
    for (const auto& e : source.entries()) {
      if (!e.trainable) continue;
      if (under(e.name)) {
        MOCA_CHECK(!ended, "ema_update: the source entries under '", prefix,
                   "' are not contiguous in the source arena: '", e.name, "' comes after '",
                   before->name, "'");
        src.push_back(&e);
      } else if (!src.empty()) {
        ended = true;
      }
      before = &e;
    }
    std::vector<const typename ParameterStore<T, D>::Entry*> tgt;
    for (const auto& e : target.entries())
      if (e.trainable) tgt.push_back(&e);

    const std::size_t n = std::min(src.size(), tgt.size());
    for (std::size_t i = 0; i < n; ++i) {
      const std::string_view stripped = std::string_view(src[i]->name).substr(prefix.size());
      MOCA_CHECK(stripped == tgt[i]->name && src[i]->shape == tgt[i]->shape,
                 "ema_update: layouts differ at trainable entry ", i, ": target '", tgt[i]->name,
                 "' ", tgt[i]->shape, ", source '", src[i]->name, "' ", src[i]->shape);
    }
    MOCA_CHECK(src.size() == tgt.size(), "ema_update: the target has ", tgt.size(),
               " trainable entries, the source has ", src.size(),
               prefix.empty() ? std::string() : " under '" + prefix + "'",
               "; first unmatched: ",
               src.size() > tgt.size() ? "source '" + src[n]->name + "'"
                                       : "target '" + tgt[n]->name + "'");

    const std::int64_t numel = target.num_trainable();
    const std::int64_t begin = src.empty() ? 0 : src.front()->offset;
    target_ = target.values();
    source_ = source.values().rows(begin, begin + numel);
    if constexpr (ParameterStore<T, D>::kHasMaster) {
      target_master_ = target.master();
      source_master_ = source.master().rows(begin, begin + numel);
    }
  }

  /// θ_T ← m·θ_T + (1 − m)·θ_S; does nothing when m ≥ 1. Requires m ≥ 0.
  void update(double momentum) const {
    MOCA_PROFILE_SCOPE("ema");
    MOCA_CHECK(momentum >= 0.0, "ema_update: negative momentum ", momentum);
    if (momentum >= 1.0) return;
    if constexpr (ParameterStore<T, D>::kHasMaster) {
      ops::axpby(M(1.0 - momentum), source_master_, M(momentum), target_master_);
      ops::convert(target_master_, target_);
    } else {
      ops::axpby(T(1.0 - momentum), source_, T(momentum), target_);
    }
  }

  /// θ_T ← θ_S (a teacher starts as an exact copy of the student).
  void copy_source() const {
    if constexpr (ParameterStore<T, D>::kHasMaster) {
      ops::axpby(M(1), source_master_, M(0), target_master_);
      ops::convert(target_master_, target_);
    } else {
      ops::axpby(T(1), source_, T(0), target_);
    }
  }

  /// The target's trainable arena.
  TensorView<T, D> target() const { return target_; }
  /// The paired range of the source's trainable arena.
  TensorView<T, D> source() const { return source_; }

 private:
  using M = compute_t<T>;
  TensorView<T, D> target_, source_;
  TensorView<M, D> target_master_, source_master_;  // empty unless the stores keep masters
};

/// θ_T ← m·θ_T + (1 − m)·θ_S over the trainable arena of `target` and the matching range of
/// `source` (see EmaLink for the pairing and the checks); skipped when m ≥ 1.
template <class T, class D>
void ema_update(ParameterStore<T, D>& target, const ParameterStore<T, D>& source,
                double momentum, std::string_view source_prefix = "") {
  EmaLink<T, D>(target, source, source_prefix).update(momentum);
}

}  // namespace moca
