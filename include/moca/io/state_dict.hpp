// Saving and loading a ParameterStore by name: the bridge between a model and a PyTorch
// state dict stored as safetensors.
//
//   save_parameters(params, "vit.safetensors");                  // timm names, F32
//   load_parameters(params, "vit.safetensors");                  // strict: names and shapes
//   load_parameters(teacher, "checkpoint.safetensors", "encoder_teacher.");
//
// Names in the file are `prefix + entry.name`. A full MOCA checkpoint holds several models under
// different prefixes (encoder., encoder_teacher., decoder_pred., ...), so loading with a prefix
// looks only at names that start with it and ignores the rest. A strict load either loads every
// parameter or changes nothing and throws one error listing every missing name, unexpected name
// and shape mismatch; a non-strict load loads what matches and returns the same findings.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <string_view>
#include <type_traits>
#include <unordered_set>
#include <vector>

#include "moca/core/check.hpp"
#include "moca/core/tensor.hpp"
#include "moca/io/safetensors.hpp"
#include "moca/nn/parameter.hpp"

namespace moca {

/// How a file matched a ParameterStore in load_parameters. Names are the file's (prefixed) names.
struct LoadReport {
  /// A tensor present in both whose shapes differ (it is not loaded).
  struct Mismatch {
    std::string name;
    Shape expected;                   ///< the store's shape
    std::vector<std::int64_t> found;  ///< the file's shape
  };
  std::vector<std::string> missing;     ///< parameters of the store absent from the file
  std::vector<std::string> unexpected;  ///< file tensors under the prefix the store does not have
  std::vector<Mismatch> mismatched;     ///< shape mismatches
  std::int64_t loaded = 0;              ///< number of parameters loaded

  /// True when every parameter matched and nothing unexpected was found.
  bool ok() const { return missing.empty() && unexpected.empty() && mismatched.empty(); }

  /// The findings on one line: "2 missing: a, b; 1 unexpected: c; 1 shape mismatch: d expected
  /// [2] found [3]" ("all matched" when ok()).
  std::string str() const {
    if (ok()) return "all matched";
    std::string s;
    auto list = [&](const std::vector<std::string>& names, const char* what) {
      if (names.empty()) return;
      if (!s.empty()) s += "; ";
      s += std::to_string(names.size()) + " " + what + ": ";
      for (std::size_t i = 0; i < names.size(); ++i) s += (i ? ", " : "") + names[i];
    };
    list(missing, "missing");
    list(unexpected, "unexpected");
    if (!mismatched.empty()) {
      if (!s.empty()) s += "; ";
      s += std::to_string(mismatched.size()) + " shape mismatch" +
           (mismatched.size() > 1 ? "es" : "") + ": ";
      for (std::size_t i = 0; i < mismatched.size(); ++i)
        s += (i ? ", " : "") + mismatched[i].name + " expected " + mismatched[i].expected.str() +
             " found " + detail::shape_str(mismatched[i].found);
    }
    return s;
  }
};

namespace detail {

// Host views of a store's trainable and frozen buffers: the buffers themselves on the CPU, a
// copy (one transfer per buffer) on another device. A store with a float master copy (bf16
// parameters) is saved and loaded through it: its trainable values are the master, its frozen
// tensors widened to float, so a checkpoint holds the exact training state in F32 and loading
// one sets the master and rounds the values from it.
template <class T, class D>
struct HostParams {
  using Store = ParameterStore<T, D>;
  using H = compute_t<T>;  // the host element type: float for bf16, else T itself
  Tensor<H, Cpu> values_copy, frozen_copy;
  TensorView<H, Cpu> values, frozen;

  explicit HostParams(const Store& store) {
    if constexpr (std::is_same_v<D, Cpu> && !Store::kHasMaster) {
      values = store.values();
      frozen = store.frozen();
    } else {
      values_copy = Tensor<H, Cpu>(store.values().shape());
      frozen_copy = Tensor<H, Cpu>(store.frozen().shape());
      if constexpr (Store::kHasMaster) {
        moca::copy(store.master(), TensorView<H, Cpu>(values_copy));
        Tensor<T, Cpu> narrow(store.frozen().shape());
        moca::copy(store.frozen(), TensorView<T, Cpu>(narrow));
        ops::convert(TensorView<T, Cpu>(narrow), TensorView<H, Cpu>(frozen_copy));
      } else {
        moca::copy(store.values(), TensorView<H, Cpu>(values_copy));
        moca::copy(store.frozen(), TensorView<H, Cpu>(frozen_copy));
      }
      values = values_copy;
      frozen = frozen_copy;
    }
  }
  TensorView<H, Cpu> view(const typename Store::Entry& e) const {
    const TensorView<H, Cpu>& base = e.trainable ? values : frozen;
    return TensorView<H, Cpu>(base.data() + e.offset, e.shape);
  }
  // Copies the host buffers back to the store (nothing to do on the CPU without a master).
  void store_back(Store& store) const {
    if constexpr (Store::kHasMaster) {
      moca::copy(values, store.master());
      store.round_master_to_values();
      Tensor<T, Cpu> narrow(frozen.shape());
      ops::convert(frozen, TensorView<T, Cpu>(narrow));
      moca::copy(TensorView<T, Cpu>(narrow), store.frozen());
    } else if constexpr (!std::is_same_v<D, Cpu>) {
      moca::copy(values, store.values());
      moca::copy(frozen, store.frozen());
    }
  }
};

}  // namespace detail

/// Adds every parameter of `store` (trainable and frozen) to `out` under `prefix + name`, stored
/// as `dtype`: F32 by default, the PyTorch-compatible choice; F64 keeps a double store exact.
template <class T, class D>
void add_parameters(SafetensorsWriter& out, const ParameterStore<T, D>& store,
                    std::string_view prefix = "",
                    SafetensorsDtype dtype = SafetensorsDtype::F32) {
  const detail::HostParams<T, D> host(store);
  for (const auto& e : store.entries()) out.add(std::string(prefix) + e.name, host.view(e), dtype);
}

/// Writes every parameter of `store` to the safetensors file `path` (atomically) under
/// `prefix + name`, stored as `dtype` (F32 by default). The metadata gets "format": "pt", which
/// Hugging Face loaders expect, unless `metadata` sets "format" itself.
template <class T, class D>
void save_parameters(const ParameterStore<T, D>& store, const std::filesystem::path& path,
                     std::string_view prefix = "",
                     const std::map<std::string, std::string>& metadata = {},
                     SafetensorsDtype dtype = SafetensorsDtype::F32) {
  SafetensorsWriter out;
  out.set_metadata("format", "pt");
  out.set_metadata(metadata);
  add_parameters(out, store, prefix, dtype);
  out.write(path);
}

/// Loads the parameters of `store` from `file` by name (`prefix + name`), converting F16, BF16,
/// F32 and F64 to T (to the float master, for a bf16 store, whose values are then its rounding). Only file names starting with `prefix` are considered. Strict: throws
/// moca::Error naming the file and listing every missing name, unexpected name and shape
/// mismatch, and leaves the store unchanged. Not strict: loads every tensor that matches and
/// returns what did not.
template <class T, class D>
LoadReport load_parameters(ParameterStore<T, D>& store, const SafetensorsFile& file,
                           std::string_view prefix = "", bool strict = true) {
  LoadReport report;
  std::unordered_set<std::string> known;
  std::vector<std::pair<const typename ParameterStore<T, D>::Entry*,
                        const SafetensorsFile::TensorInfo*>>
      matched;
  for (const auto& e : store.entries()) {
    std::string name = std::string(prefix) + e.name;
    const SafetensorsFile::TensorInfo* t = file.find(name);
    if (t == nullptr) {
      report.missing.push_back(name);
    } else if (!detail::same_shape(t->shape, e.shape)) {
      report.mismatched.push_back({name, e.shape, t->shape});
    } else {
      matched.emplace_back(&e, t);
    }
    known.insert(std::move(name));
  }
  for (const auto& t : file.tensors())
    if (t.name.starts_with(prefix) && !known.contains(t.name)) report.unexpected.push_back(t.name);

  if (strict && !report.ok()) {
    std::string msg = "load_parameters: safetensors file '" + file.path() +
                      "' does not match the parameters";
    if (!prefix.empty()) msg += " under prefix '" + std::string(prefix) + "'";
    msg += ": " + report.str();
    if (matched.empty() && report.mismatched.empty()) {
      // Nothing matched at all: most likely a wrong prefix, so say which ones the file has.
      std::set<std::string> heads;
      for (const auto& t : file.tensors()) {
        const std::size_t dot = t.name.find('.');
        heads.insert(dot == std::string::npos ? t.name : t.name.substr(0, dot + 1));
      }
      msg += " (the file's names start with:";
      for (const auto& h : heads) msg += " '" + h + "'";
      msg += heads.empty() ? " nothing, it holds no tensor)" : ")";
    }
    throw Error(msg);
  }

  const detail::HostParams<T, D> host(store);
  for (const auto& [e, t] : matched) file.read_into(t->name, host.view(*e));
  host.store_back(store);
  report.loaded = static_cast<std::int64_t>(matched.size());
  return report;
}

/// Opens `path` (validating it) and loads `store` from it; see the overload above.
template <class T, class D>
LoadReport load_parameters(ParameterStore<T, D>& store, const std::filesystem::path& path,
                           std::string_view prefix = "", bool strict = true) {
  return load_parameters(store, SafetensorsFile::open(path), prefix, strict);
}

}  // namespace moca
