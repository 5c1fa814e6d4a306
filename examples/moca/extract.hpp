// `moca extract`: features of a ViT for a batch of images or a data set.
#pragma once

#include <CLI/CLI.hpp>
#include <cstdint>
#include <string>

namespace moca::cli {

struct ExtractOptions {
  std::string weights, checkpoint, input, output, prefix;
  bool teacher = false, student = false, strict = false;
  std::int64_t img_size = 224, patch = 16, in_chans = 3, embed_dim = 768, depth = 12, heads = 12;
  double mlp_ratio = 4.0;
  std::int64_t batch = 64;
  int threads = 0, workers = 2;
  std::string device = "cpu";   ///< where the encoder runs: cpu or cuda
  CLI::App* command = nullptr;  ///< set by add_extract_command: which flags were given
};

/// Registers the subcommand and its flags on `app`; returns it.
CLI::App* add_extract_command(CLI::App& app, ExtractOptions& opt);

/// Runs it; throws moca::Error with a message for the user on bad input.
void run_extract(const ExtractOptions& opt);

}  // namespace moca::cli
