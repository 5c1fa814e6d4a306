// The part of a training run's state that is not the model: the AdamW moments and step counter
// and the number of iterations done, as one safetensors file beside the weights
// (checkpoint.hpp). Together they resume a run exactly: the masks, the codebook refresh and the
// data order are pure functions of (seed, iteration), so nothing else needs saving.
//
//   save_moca_train_state(moca, step, "ckpt/state.safetensors", {{"run", run_json}});
//   const std::int64_t step = load_moca_train_state(moca, SafetensorsFile::open(path));
//
// Tensors: optimizer.exp_avg.<name> and optimizer.exp_avg_sq.<name> for every trainable
// parameter (the names of the weights file), optimizer.step and train.step (int64), and the
// codebook's running dist_norm and dist_norm_prev as float64. Everything is stored in its own
// precision so a resumed run continues bit for bit. Load it after the weights.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "moca/io/safetensors.hpp"
#include "moca/models/moca/moca.hpp"

namespace moca {

namespace detail {
inline const std::string kExpAvg = "optimizer.exp_avg.";
inline const std::string kExpAvgSq = "optimizer.exp_avg_sq.";
inline const std::string kOptimizerStep = "optimizer.step";
inline const std::string kTrainStep = "train.step";
inline const std::string kDistNorm = "codebook.dist_norm";
inline const std::string kDistNormPrev = "codebook.dist_norm_prev";

inline std::int64_t read_int_scalar(const SafetensorsFile& f, const std::string& name) {
  MOCA_CHECK(f.contains(name), f.path(), ": missing tensor '", name,
             "' (not a training-state file?)");
  const Tensor<std::int64_t> t = f.read<std::int64_t>(name);
  MOCA_CHECK(t.numel() == 1, f.path(), ": tensor '", name, "' should hold one value, it has shape ",
             t.shape());
  return t.data()[0];
}
}  // namespace detail

/// Adds the optimiser state and the iteration count `step` to `out`.
template <class T, class D, class B>
void add_moca_train_state(SafetensorsWriter& out, Moca<T, D, B>& m, std::int64_t step) {
  const AdamW<T, D>& opt = m.optimizer();
  using M = typename AdamW<T, D>::M;  // the moments' type (float for bf16 parameters)
  for (const ArenaEntry& e : opt.entries()) {
    for (const bool second : {false, true}) {
      const TensorView<M, D> v = second ? opt.exp_avg_sq(e.name) : opt.exp_avg(e.name);
      const std::string name = (second ? detail::kExpAvgSq : detail::kExpAvg) + e.name;
      if constexpr (std::is_same_v<D, Cpu>) {
        out.add(name, v);
      } else {
        Tensor<M, Cpu> host(v.shape());
        copy(v, TensorView<M, Cpu>(host));
        out.add(name, TensorView<M, Cpu>(host));
      }
    }
  }
  std::int64_t opt_steps = opt.steps();
  out.add(detail::kOptimizerStep, TensorView<std::int64_t, Cpu>(&opt_steps, Shape{}));
  out.add(detail::kTrainStep, TensorView<std::int64_t, Cpu>(&step, Shape{}));
  // The weights file holds these as float32 like the reference's buffers; the running value is a
  // double, kept exactly here.
  double dn = m.codebook().dist_norm(), dnp = m.codebook().dist_norm_prev();
  out.add(detail::kDistNorm, TensorView<double, Cpu>(&dn, Shape{}));
  out.add(detail::kDistNormPrev, TensorView<double, Cpu>(&dnp, Shape{}));
}

/// Writes the training state to `path` atomically.
template <class T, class D, class B>
void save_moca_train_state(Moca<T, D, B>& m, std::int64_t step, const std::filesystem::path& path,
                           const std::map<std::string, std::string>& metadata = {}) {
  SafetensorsWriter out;
  add_moca_train_state(out, m, step);
  out.set_metadata(metadata);
  out.write(path);
}

/// Restores the optimiser state from `file` and returns the iteration count stored there. Every
/// moment must be present with its parameter's shape; one message lists all that is wrong.
template <class T, class D, class B>
std::int64_t load_moca_train_state(Moca<T, D, B>& m, const SafetensorsFile& file) {
  AdamW<T, D>& opt = m.optimizer();
  using M = typename AdamW<T, D>::M;
  std::vector<std::string> problems;
  for (const ArenaEntry& e : opt.entries()) {
    for (const bool second : {false, true}) {
      const std::string name = (second ? detail::kExpAvgSq : detail::kExpAvg) + e.name;
      const auto* info = file.find(name);
      if (info == nullptr) {
        problems.push_back("missing " + name);
        continue;
      }
      bool same = static_cast<int>(info->shape.size()) == e.shape.rank();
      for (int d = 0; same && d < e.shape.rank(); ++d)
        same = info->shape[static_cast<std::size_t>(d)] == e.shape[d];
      if (!same) {
        problems.push_back(name + " has shape " + detail::shape_str(info->shape) + ", expected " +
                           e.shape.str());
        continue;
      }
      const TensorView<M, D> dst = second ? opt.exp_avg_sq(e.name) : opt.exp_avg(e.name);
      if constexpr (std::is_same_v<D, Cpu>) {
        file.read_into(name, dst);
      } else {
        const Tensor<M, Cpu> host = file.read<M>(name);
        copy(TensorView<M, Cpu>(host), dst);
      }
    }
  }
  MOCA_CHECK(problems.empty(), file.path(),
             ": the optimiser state does not fit this model (", problems.size(), " problems, first: ",
             problems.empty() ? std::string() : problems.front(), ")");
  opt.set_steps(detail::read_int_scalar(file, detail::kOptimizerStep));
  const std::int64_t step = detail::read_int_scalar(file, detail::kTrainStep);
  double dist_norms[2] = {0, 0};
  for (int i = 0; i < 2; ++i) {
    const std::string& name = i == 0 ? detail::kDistNorm : detail::kDistNormPrev;
    MOCA_CHECK(file.contains(name), file.path(), ": missing tensor '", name, "'");
    const Tensor<double> t = file.read<double>(name);
    MOCA_CHECK(t.numel() == 1, file.path(), ": tensor '", name, "' should hold one value");
    dist_norms[i] = t.data()[0];
  }
  m.codebook().set_dist_norms(dist_norms[0], dist_norms[1]);
  MOCA_CHECK(step >= 0, file.path(), ": negative iteration count ", step);
  return step;
}

}  // namespace moca
