// `moca pretrain`: MOCA pretraining with progress, logs, checkpoints, resumption and k-NN.
#pragma once

#include <CLI/CLI.hpp>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace moca::cli {

struct PretrainOptions {
  // What to train on, and how long.
  std::string data = "fashion-mnist";
  std::string preset = "tiny";
  std::optional<double> epochs, minutes;
  std::int64_t batch = 128;
  std::int64_t accum = 1;  ///< micro-batches per step (spec §6.7)
  std::uint64_t seed = 0;
  bool strict = false;  ///< an unreadable image is an error instead of a skipped sample

  // Architecture overrides (the preset's value when unset).
  std::optional<std::int64_t> embed_dim, depth, heads, dec_dim, dec_depth, dec_heads, early_layer;
  std::optional<std::int64_t> num_words, skip_offset, words_per_iter;
  std::optional<double> inv_delta, dist_norm_decay, kappa, pred_mlp_ratio, img_weight, loc_weight,
      clip_grad;
  std::vector<double> mask_ratio, dec_mask_ratio;
  std::optional<std::string> pooling;

  // Schedules (spec §7 and §16); fractions are of the planned run.
  std::optional<double> blr, lr;
  double warmup = 0.15;
  double lr_epochs_mul = 1.25;
  double wd = 0.05, wd_end = 0.20;
  double momentum = 0.994, momentum_end = 1.0;
  double wgen_lr = 1e-4, wgen_wd = 0.05;

  // Running the job (these may change when a run is resumed).
  std::string device = "cpu";  ///< cpu or cuda
  std::string matmul = "fp32";  ///< cuda: float GEMMs in fp32, tf32 or bf16 (cuda::FloatMatmul)
  std::string precision = "fp32";  ///< fp32, or bf16 storage with fp32 master weights
  std::string out = "runs/moca";
  bool resume = false;
  int threads = 0;  ///< 0: all cores
  int workers = 1;  ///< data loader threads
  int keep = 3;
  double ckpt_minutes = 10;
  std::int64_t log_every = 10;
  double knn_every = 1;  ///< epochs between k-NN evaluations; 0: none during training
  bool knn_init = false;
  bool final_knn = true;
  std::vector<std::int64_t> knn_k = {20};
  double knn_temperature = 0.07;
  std::string knn_pool = "avg";
  bool knn_student = false;
  std::int64_t knn_bank = 0, knn_queries = 0;  ///< 0: all images
  std::int64_t knn_batch = 256;
  std::int64_t until_step = 0;  ///< stop after this step (0: run to the end)
};

/// Registers the subcommand and its flags on `app`; returns it.
CLI::App* add_pretrain_command(CLI::App& app, PretrainOptions& opt);

/// Runs it and returns the process exit status (130 after an interruption). Throws moca::Error
/// with a message for the user on bad input.
int run_pretrain(const PretrainOptions& opt, const CLI::App& cmd);

}  // namespace moca::cli
