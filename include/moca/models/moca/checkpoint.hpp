// MOCA weights as one safetensors file under the official state-dict names (spec §11.6): the
// student side (encoder.*, encoder_pred.*, decoder_pred.*, decoder parts, the codebook words),
// the teacher under encoder_teacher.*, and the codebook's scalar buffers and the generators'
// BatchNorm counters. A file written here loads in PyTorch with load_state_dict into the
// reference model; a state dict saved there loads here.
#pragma once

#include <algorithm>
#include <filesystem>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "moca/io/safetensors.hpp"
#include "moca/io/state_dict.hpp"
#include "moca/models/moca/moca.hpp"

namespace moca {

namespace detail {
inline const std::string kBow = "bow_extractor.bow_extractor.0.";
inline const char* const kGeneratorBn[2] = {"encoder_pred.layers_w.0.generator.b0_bn.",
                                            "decoder_pred.layers_w.0.generator.b0_bn."};

// Reads a one-element tensor (shape [] or [1]) as double.
inline double read_scalar(const SafetensorsFile& f, const std::string& name) {
  MOCA_CHECK(f.contains(name), f.path(), ": missing tensor '", name, "'");
  const Tensor<double> t = f.read<double>(name);
  MOCA_CHECK(t.numel() == 1, f.path(), ": tensor '", name, "' should hold one value, it has shape ",
             t.shape());
  return t.data()[0];
}
}  // namespace detail

/// Adds the whole model state to `out` (float tensors as `dtype`).
template <class T, class D, class B>
void add_moca_weights(SafetensorsWriter& out, Moca<T, D, B>& m,
                      SafetensorsDtype dtype = SafetensorsDtype::F32) {
  add_parameters(out, m.params(), "", dtype);
  add_parameters(out, m.teacher_params(), "encoder_teacher.", dtype);
  Codebook<T, D>& cb = m.codebook();
  std::int64_t ptr = cb.ptr, batches = cb.num_batches;
  out.add(detail::kBow + "_embedding_ptr", TensorView<std::int64_t, Cpu>(&ptr, Shape{1}));
  out.add(detail::kBow + "_track_num_batches",
          TensorView<std::int64_t, Cpu>(&batches, Shape{1}));
  double dn = cb.dist_norm(), dnp = cb.dist_norm_prev();
  out.add(detail::kBow + "_dist_norm", TensorView<double, Cpu>(&dn, Shape{1}), dtype);
  out.add(detail::kBow + "_dist_norm_prev", TensorView<double, Cpu>(&dnp, Shape{1}), dtype);
  std::int64_t counts[2] = {m.encoder_pred.layers_w[0].generator.b0_bn.num_batches_tracked,
                                  m.decoder_pred.layers_w[0].generator.b0_bn.num_batches_tracked};
  for (int i = 0; i < 2; ++i)
    out.add(std::string(detail::kGeneratorBn[i]) + "num_batches_tracked",
            TensorView<std::int64_t, Cpu>(&counts[i], Shape{}));
}

/// Writes the model state to `path` atomically.
template <class T, class D, class B>
void save_moca_weights(Moca<T, D, B>& m, const std::filesystem::path& path,
                       const std::map<std::string, std::string>& metadata = {},
                       SafetensorsDtype dtype = SafetensorsDtype::F32) {
  SafetensorsWriter out;
  add_moca_weights(out, m, dtype);
  out.set_metadata(metadata);
  if (!metadata.count("format")) out.set_metadata("format", "pt");
  out.write(path);
}

/// Loads the model state from `file`. Every tensor of the model must be present with its shape;
/// with `strict`, a tensor the model does not know is an error too (one message lists all
/// problems and names the file).
template <class T, class D, class B>
void load_moca_weights(Moca<T, D, B>& m, const SafetensorsFile& file, bool strict = true) {
  const LoadReport student = load_parameters(m.params(), file, "", false);
  const LoadReport teacher = load_parameters(m.teacher_params(), file, "encoder_teacher.", false);
  std::vector<std::string> scalar_names = {detail::kBow + "_embedding_ptr",
                                           detail::kBow + "_track_num_batches",
                                           detail::kBow + "_dist_norm",
                                           detail::kBow + "_dist_norm_prev"};
  for (const char* bn : detail::kGeneratorBn)
    scalar_names.push_back(std::string(bn) + "num_batches_tracked");
  std::string problems;
  auto add = [&](const std::string& what) { problems += (problems.empty() ? "" : "; ") + what; };
  if (!student.missing.empty() || !student.mismatched.empty()) {
    LoadReport r = student;
    r.unexpected.clear();
    add(r.str());
  }
  if (!teacher.missing.empty() || !teacher.mismatched.empty()) {
    LoadReport r = teacher;
    r.unexpected.clear();
    add("teacher: " + r.str());
  }
  for (const std::string& name : scalar_names)
    if (!file.contains(name)) add("missing: " + name);
  if (strict) {
    std::vector<std::string> unknown;
    for (const std::string& name : file.names()) {
      const bool known = m.params().find(name) != nullptr ||
                         (name.starts_with("encoder_teacher.") &&
                          m.teacher_params().find(name.substr(16)) != nullptr) ||
                         std::find(scalar_names.begin(), scalar_names.end(), name) !=
                             scalar_names.end();
      if (!known) unknown.push_back(name);
    }
    if (!unknown.empty()) {
      std::string list;
      for (std::size_t i = 0; i < unknown.size() && i < 10; ++i) list += (i ? ", " : "") + unknown[i];
      add(std::to_string(unknown.size()) + " unexpected: " + list +
          (unknown.size() > 10 ? ", ..." : ""));
    }
  }
  MOCA_CHECK(problems.empty(), file.path(), ": not a checkpoint of this MOCA model: ", problems);
  Codebook<T, D>& cb = m.codebook();
  cb.ptr = static_cast<std::int64_t>(detail::read_scalar(file, scalar_names[0]));
  cb.num_batches = static_cast<std::int64_t>(detail::read_scalar(file, scalar_names[1]));
  const double dist_norm = detail::read_scalar(file, scalar_names[2]);
  const double dist_norm_prev = detail::read_scalar(file, scalar_names[3]);
  MOCA_CHECK(cb.ptr >= 0 && cb.ptr < cb.config().num_words &&
                 cb.ptr % cb.config().words_per_iter == 0,
             file.path(), ": codebook pointer ", cb.ptr, " does not fit ", cb.config().num_words,
             " words refreshed ", cb.config().words_per_iter, " at a time");
  MOCA_CHECK(dist_norm > 0 && dist_norm_prev > 0, file.path(),
             ": dist_norm and dist_norm_prev must be positive, found ", dist_norm, " and ",
             dist_norm_prev);
  cb.set_dist_norms(dist_norm, dist_norm_prev);
  m.encoder_pred.layers_w[0].generator.b0_bn.num_batches_tracked =
      static_cast<std::int64_t>(detail::read_scalar(file, scalar_names[4]));
  m.decoder_pred.layers_w[0].generator.b0_bn.num_batches_tracked =
      static_cast<std::int64_t>(detail::read_scalar(file, scalar_names[5]));
}

template <class T, class D, class B>
void load_moca_weights(Moca<T, D, B>& m, const std::filesystem::path& path, bool strict = true) {
  load_moca_weights(m, SafetensorsFile::open(path), strict);
}

}  // namespace moca
