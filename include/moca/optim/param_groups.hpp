// Parameter groups: which parts of a model's trainable arena an optimiser updates, and with which
// learning rate and weight decay (spec §7.1).
//
//   ParamGroups groups = moca_param_groups(store);        // decay / no_decay / wgen_*
//   set_moca_hyperparameters(groups, lr(e), wd(e));        // every step, from the schedules
//   adamw.step(groups);
//
// A group holds (offset, numel) segments of ParameterStore::values(); members that sit next to
// each other in the arena are merged, so a step over a group is a few long passes instead of one
// per tensor. Groups hold only offsets, so one ParamGroups serves every device.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "moca/core/check.hpp"
#include "moca/core/shape.hpp"
#include "moca/nn/parameter.hpp"

namespace moca {

/// A contiguous run [offset, offset + numel) of a trainable arena.
struct ParamSegment {
  std::int64_t offset = 0;  ///< first element, in the arena
  std::int64_t numel = 0;
  std::int64_t end() const { return offset + numel; }
  friend bool operator==(const ParamSegment&, const ParamSegment&) = default;
};

/// One optimiser group: its hyper-parameters (set freely between steps) and where its members
/// live in the arena.
struct ParamGroup {
  std::string name;
  double lr = 0.0;            ///< learning rate of the next step
  double weight_decay = 0.0;  ///< decoupled (AdamW) or L2 (SGD) weight decay of the next step
  std::vector<ParamSegment> segments;  ///< increasing offsets, disjoint, adjacent runs merged
  std::vector<std::string> members;    ///< entry names, in arena order

  /// Number of arena elements in the group.
  std::int64_t numel() const {
    std::int64_t n = 0;
    for (const ParamSegment& s : segments) n += s.numel;
    return n;
  }
  /// Whether the group has a member called `entry`.
  bool contains(std::string_view entry) const {
    for (const std::string& m : members)
      if (m == entry) return true;
    return false;
  }
};

/// Named groups over one trainable arena of `arena_numel` elements. Every element belongs to at
/// most one group; elements of no group are left alone by the optimisers.
class ParamGroups {
 public:
  ParamGroups() = default;
  explicit ParamGroups(std::int64_t arena_numel) : arena_numel_(arena_numel) {
    MOCA_CHECK(arena_numel >= 0, "ParamGroups: negative arena size ", arena_numel);
  }

  /// Adds an empty group; names are unique.
  ParamGroup& add_group(std::string name, double lr = 0.0, double weight_decay = 0.0) {
    MOCA_CHECK(find(name) == nullptr, "ParamGroups: group '", name, "' already exists");
    groups_.push_back({std::move(name), lr, weight_decay, {}, {}});
    return groups_.back();
  }

  /// Appends the arena range [offset, offset + numel) to `group` as member `entry`. Members of a
  /// group are added in increasing offset order; a range already in some group is refused.
  void add_member(std::string_view group, std::string entry, std::int64_t offset,
                  std::int64_t numel) {
    ParamGroup& g = (*this)[group];
    MOCA_CHECK(offset >= 0 && numel >= 0 && offset + numel <= arena_numel_, "ParamGroups: '",
               entry, "' range [", offset, ", ", offset + numel, ") lies outside the arena of ",
               arena_numel_, " elements");
    MOCA_CHECK(g.segments.empty() || offset >= g.segments.back().end(), "ParamGroups: '", entry,
               "' at offset ", offset, " is added to group '", g.name,
               "' after a member ending at ", g.segments.back().end(),
               " (members go in increasing offset order)");
    for (const ParamGroup& other : groups_)
      for (const ParamSegment& s : other.segments)
        MOCA_CHECK(offset + numel <= s.offset || offset >= s.end() || numel == 0,
                   "ParamGroups: '", entry, "' range [", offset, ", ", offset + numel,
                   ") overlaps range [", s.offset, ", ", s.end(), ") of group '", other.name,
                   "'");
    g.members.push_back(std::move(entry));
    if (numel == 0) return;
    if (!g.segments.empty() && g.segments.back().end() == offset)
      g.segments.back().numel += numel;
    else
      g.segments.push_back({offset, numel});
  }

  /// The group called `name`; throws moca::Error listing the groups if there is none.
  ParamGroup& operator[](std::string_view name) {
    return const_cast<ParamGroup&>(std::as_const(*this)[name]);
  }
  const ParamGroup& operator[](std::string_view name) const {
    if (const ParamGroup* g = find(name)) return *g;
    std::string known;
    for (const ParamGroup& g : groups_) known += (known.empty() ? "'" : ", '") + g.name + "'";
    MOCA_CHECK(false, "ParamGroups: no group '", name, "' (groups: ",
               known.empty() ? "none" : known, ")");
    return groups_.front();  // not reached
  }
  /// The group called `name`, or nullptr.
  ParamGroup* find(std::string_view name) {
    return const_cast<ParamGroup*>(std::as_const(*this).find(name));
  }
  const ParamGroup* find(std::string_view name) const {
    for (const ParamGroup& g : groups_)
      if (g.name == name) return &g;
    return nullptr;
  }

  /// The name of the group holding entry `entry`, or "" if none does.
  std::string group_of(std::string_view entry) const {
    for (const ParamGroup& g : groups_)
      if (g.contains(entry)) return g.name;
    return {};
  }

  /// The groups, in creation order (the order an optimiser visits them).
  std::vector<ParamGroup>& groups() { return groups_; }
  const std::vector<ParamGroup>& groups() const { return groups_; }
  auto begin() { return groups_.begin(); }
  auto end() { return groups_.end(); }
  auto begin() const { return groups_.begin(); }
  auto end() const { return groups_.end(); }
  /// Number of groups.
  std::size_t size() const { return groups_.size(); }

  /// Size of the arena the groups describe (ParameterStore::num_trainable()).
  std::int64_t arena_numel() const { return arena_numel_; }
  /// Number of arena elements in some group.
  std::int64_t numel() const {
    std::int64_t n = 0;
    for (const ParamGroup& g : groups_) n += g.numel();
    return n;
  }

 private:
  std::int64_t arena_numel_ = 0;
  std::vector<ParamGroup> groups_;
};

/// Groups the trainable entries of `store` by `classify(name, shape)`, which returns the group
/// name of an entry (anything convertible to std::string), or an empty name to leave the entry
/// out of every group. With `group_names` given, those groups exist (empty or not) in that order
/// and any other name is an error; without, groups appear in order of first use. Frozen entries
/// are never grouped: they are not in the trainable arena.
template <class T, class D, class Classifier>
ParamGroups build_param_groups(const ParameterStore<T, D>& store, Classifier&& classify,
                               const std::vector<std::string>& group_names = {}) {
  static_assert(std::is_invocable_v<Classifier&, std::string_view, const Shape&>,
                "CLASSIFIER_MUST_TAKE_NAME_AND_SHAPE");
  ParamGroups groups(store.num_trainable());
  for (const std::string& n : group_names) groups.add_group(n);
  for (const auto& e : store.entries()) {
    if (!e.trainable) continue;
    const std::string group(classify(std::string_view(e.name), e.shape));
    if (group.empty()) continue;
    if (groups.find(group) == nullptr) {
      MOCA_CHECK(group_names.empty(), "build_param_groups: entry '", e.name, "' ", e.shape,
                 " was classified into unknown group '", group, "'");
      groups.add_group(group);
    }
    groups.add_member(group, e.name, e.offset, e.numel());
  }
  return groups;
}

// ---- the MOCA rule (spec §7.1) ------------------------------------------------------------------

inline constexpr std::string_view kDecayGroup = "decay";
inline constexpr std::string_view kNoDecayGroup = "no_decay";
inline constexpr std::string_view kWgenDecayGroup = "wgen_decay";
inline constexpr std::string_view kWgenNoDecayGroup = "wgen_no_decay";

/// Whether a parameter is exempt from weight decay: rank 0 or 1, or a name ending in ".bias".
/// Class and mask tokens ([1, 1, D]) are rank 3 and so are decayed, as in the reference.
inline bool is_no_decay(std::string_view name, const Shape& shape) {
  return shape.rank() <= 1 || name.ends_with(".bias");
}

/// Whether a parameter belongs to a prototype generator's MLP or skip (spec §5), which trains
/// with its own constant lr and weight decay.
inline bool is_wgen(std::string_view name) {
  return name.starts_with("encoder_pred.layers_w.") || name.starts_with("decoder_pred.layers_w.");
}

/// The MOCA group of a trainable parameter: decay, no_decay, wgen_decay or wgen_no_decay.
inline std::string_view moca_group_of(std::string_view name, const Shape& shape) {
  const bool no_decay = is_no_decay(name, shape);
  if (is_wgen(name)) return no_decay ? kWgenNoDecayGroup : kWgenDecayGroup;
  return no_decay ? kNoDecayGroup : kDecayGroup;
}

/// Sets the hyper-parameters of MOCA groups as the reference does every iteration (spec §13):
/// `lr` on decay and no_decay, `weight_decay` on decay only, the constant generator values on
/// the wgen groups; no_decay groups keep weight decay 0. Groups that are absent are skipped.
inline void set_moca_hyperparameters(ParamGroups& groups, double lr, double weight_decay,
                                     double wgen_lr = 1e-4, double wgen_weight_decay = 0.05) {
  auto set = [&](std::string_view name, double g_lr, double g_wd) {
    if (ParamGroup* g = groups.find(name)) {
      g->lr = g_lr;
      g->weight_decay = g_wd;
    }
  };
  set(kDecayGroup, lr, weight_decay);
  set(kNoDecayGroup, lr, 0.0);
  set(kWgenDecayGroup, wgen_lr, wgen_weight_decay);
  set(kWgenNoDecayGroup, wgen_lr, 0.0);
}

/// The four MOCA groups (decay, no_decay, wgen_decay, wgen_no_decay, always in that order, empty
/// ones included) over the trainable entries of `store`, with initial hyper-parameters as
/// set_moca_hyperparameters.
template <class T, class D>
ParamGroups moca_param_groups(const ParameterStore<T, D>& store, double lr = 0.0,
                              double weight_decay = 0.05, double wgen_lr = 1e-4,
                              double wgen_weight_decay = 0.05) {
  ParamGroups groups = build_param_groups(
      store, [](std::string_view name, const Shape& shape) { return moca_group_of(name, shape); },
      {std::string(kDecayGroup), std::string(kNoDecayGroup), std::string(kWgenDecayGroup),
       std::string(kWgenNoDecayGroup)});
  set_moca_hyperparameters(groups, lr, weight_decay, wgen_lr, wgen_weight_decay);
  return groups;
}

/// Two groups, decay and no_decay (same rule as MOCA, no generator split), for a plain ViT
/// (fine-tuning, linear probing): `lr` on both, `weight_decay` on decay only.
template <class T, class D>
ParamGroups decay_groups(const ParameterStore<T, D>& store, double lr = 0.0,
                         double weight_decay = 0.05) {
  ParamGroups groups = build_param_groups(
      store,
      [](std::string_view name, const Shape& shape) {
        return is_no_decay(name, shape) ? kNoDecayGroup : kDecayGroup;
      },
      {std::string(kDecayGroup), std::string(kNoDecayGroup)});
  groups[kDecayGroup].lr = lr;
  groups[kDecayGroup].weight_decay = weight_decay;
  groups[kNoDecayGroup].lr = lr;
  return groups;
}

/// Name, shape and arena offset of one trainable entry: the key of per-entry optimiser state
/// (moments saved under the parameter's name in a checkpoint).
struct ArenaEntry {
  std::string name;
  Shape shape;
  std::int64_t offset = 0;
  std::int64_t numel() const { return shape.numel(); }
};

/// The trainable entries of `store`, in arena order.
template <class T, class D>
std::vector<ArenaEntry> trainable_entries(const ParameterStore<T, D>& store) {
  std::vector<ArenaEntry> out;
  for (const auto& e : store.entries())
    if (e.trainable) out.push_back({e.name, e.shape, e.offset});
  return out;
}

namespace detail {
/// The entry called `name` in `entries`; throws moca::Error naming `who` if there is none.
inline const ArenaEntry& find_arena_entry(const char* who, const std::vector<ArenaEntry>& entries,
                                          std::string_view name) {
  for (const ArenaEntry& e : entries)
    if (e.name == name) return e;
  MOCA_CHECK(false, who, ": no trainable parameter '", name, "'");
  return entries.front();  // not reached
}

/// Checks that `groups` were built for an arena of `numel` elements.
inline void check_groups_fit(const char* who, const ParamGroups& groups, std::int64_t numel) {
  MOCA_CHECK(groups.arena_numel() == numel, who, ": the parameter groups describe an arena of ",
             groups.arena_numel(), " elements, the optimiser's store has ", numel);
}
}  // namespace detail

}  // namespace moca
