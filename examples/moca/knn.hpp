// `moca knn`: weighted k-NN accuracy (spec §9.1) of a MOCA checkpoint's encoder, and the pieces
// that `moca pretrain` reuses to evaluate its in-memory teacher during training:
//
//   KnnProtocol p;                       // avg pooling, k 10 and 20, T 0.07, all images
//   KnnResult r = run_knn_protocol(moca.encoder_teacher, data, augment_for(cfg.encoder, like), p);
//   print_knn_table(r, stdout);          // r.accuracy[i].top1 for k = p.ks[i]
//
// The memory bank is the train split and the queries the test split of a RunData; both are
// preprocessed by the evaluation transform (resize, centre crop, normalise) and encoded without
// masking. Features are L2-normalised and each query's k nearest bank images vote with weight
// exp(sim / T) (eval/knn.hpp).
#pragma once

#include <CLI/CLI.hpp>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include <moca/data/augment.hpp>
#include <moca/data/dataset.hpp>
#include <moca/eval/features.hpp>
#include <moca/eval/knn.hpp>
#include <moca/io/safetensors.hpp>
#include <moca/io/state_dict.hpp>
#include <moca/models/vit.hpp>
#include <moca/nn/parameter.hpp>
#if MOCA_WITH_CUDA
#include <moca/cuda.hpp>
#endif

#include "data_source.hpp"

namespace moca::cli {

/// The name prefix of the teacher ("encoder_teacher.") or student ("encoder.") encoder in a MOCA
/// weights file.
std::string encoder_prefix(bool teacher);

/// Loads the ViT whose parameters `store` holds from the tensors `prefix + name` of `weights`.
/// Tensors of the file the ViT does not have are ignored; a missing or mis-shaped tensor is an
/// error naming the file (the fixed sin-cos position table may be absent: `store` keeps the one
/// it was initialised with). `what` describes the expected model in that error. Returns what was
/// found (e.g. the ignored tensors).
LoadReport load_vit_weights(ParameterStore<float>& store, const SafetensorsFile& weights,
                            const std::string& prefix, const std::string& what);

/// The settings of one k-NN evaluation.
struct KnnProtocol {
  eval::Pooling pooling = eval::Pooling::Avg;
  std::vector<std::int64_t> ks = {10, 20};
  double temperature = 0.07;
  std::int64_t batch = 256;        ///< images per forward pass
  std::int64_t bank_limit = 0;     ///< use the first N train images (0: all)
  std::int64_t query_limit = 0;    ///< use the first N test images (0: all)
  int workers = 2;                 ///< preprocessing threads
  bool progress = true;            ///< progress lines on stderr while encoding
  std::function<void()> poll;      ///< called after every encoded batch; may throw to abandon
};

/// What one k-NN evaluation found.
struct KnnResult {
  eval::Pooling pooling = eval::Pooling::Avg;
  double temperature = 0;
  std::int64_t bank = 0, queries = 0;  ///< images encoded
  int classes = 0;
  std::vector<eval::KnnAccuracy> accuracy;  ///< one per k of the protocol, in its order
  double encode_seconds = 0, search_seconds = 0;

  /// {"pooling", "temperature", "bank", "queries", "classes", "results": [{"k", "top1", "top5",
  /// "correct1", "correct5", "count", "temperature"}], "encode_seconds", "search_seconds"}.
  nlohmann::json to_json() const;
};

/// Encodes the first `limit` images of `ds` (0: all) with `vit` after the evaluation transform of
/// `augment`. With `progress_label` non-empty a progress line reports the encoding on stderr.
eval::Features encode_dataset(VisionTransformer<float>& vit, const data::Dataset& ds,
                              const data::AugmentConfig& augment, eval::Pooling pooling,
                              std::int64_t batch, std::int64_t limit, int workers,
                              const std::string& progress_label,
                              const std::function<void()>& poll = {});

/// Encodes the bank (data.train) and the queries (data.test) and runs the weighted k-NN vote.
/// A limit larger than its split means the whole split. Throws moca::Error when the data has no
/// test split or no labels.
/// `vit` may be a model in training: only its forward buffers are overwritten. It may hold float
/// or bf16 values, on the CPU or (with the CUDA backend) the GPU; features come back to the host
/// as float for the vote. Defined for those four encoders in knn.cpp.
template <class T, class D>
KnnResult run_knn_protocol(VisionTransformer<T, D>& vit, const RunData& data,
                           const data::AugmentConfig& augment, const KnnProtocol& protocol);

/// The same protocol with features from `features(split, limit, progress_label)`.
KnnResult run_knn_protocol(
    const RunData& data, const KnnProtocol& protocol,
    const std::function<eval::Features(const data::Dataset&, std::int64_t, const std::string&)>&
        features);

/// The raw-pixel baseline's features: the preprocessed image itself, flattened [N, C·S·S].
eval::Features pixel_features(const data::Dataset& ds, const data::AugmentConfig& augment,
                              std::int64_t batch, std::int64_t limit, int workers,
                              const std::string& progress_label);

/// Prints "k  T  top-1 %  top-5 %" rows.
void print_knn_table(const KnnResult& result, std::FILE* out);

/// The command line of `moca knn`.
struct KnnOptions {
  std::string checkpoint, data = "fashion-mnist", pool = "avg", json;
  std::string device = "cpu";  ///< where the encoder runs: cpu or cuda (the vote stays on the host)
  bool student = false, teacher = false, strict = false;
  bool pixels = false;          ///< raw-pixel baseline instead of a checkpoint
  std::string preset = "tiny";  ///< image geometry of the raw-pixel baseline
  std::vector<std::int64_t> ks = {10, 20};
  double temperature = 0.07;
  std::int64_t batch = 256, bank_limit = 0, query_limit = 0;
  int threads = 0, workers = 2;
};

/// Registers the subcommand and its flags on `app`; returns it.
CLI::App* add_knn_command(CLI::App& app, KnnOptions& opt);

/// Runs it; throws moca::Error with a message for the user on bad input.
void run_knn(const KnnOptions& opt);

/// Sets the number of CPU threads (OpenMP) when `threads` > 0.
void set_cpu_threads(int threads);

/// Flag checks with plain messages ("--batch: must be positive, got 0").
CLI::Validator positive_value();
CLI::Validator non_negative_value();

}  // namespace moca::cli
