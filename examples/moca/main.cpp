// The `moca` command-line program.
//
//   moca extract --weights W.safetensors --input X.safetensors --output F.safetensors \
//                --img-size 224 --patch 16 --in-chans 3 --embed-dim 768 --depth 12 --heads 12 \
//                [--mlp-ratio 4] [--prefix encoder_teacher.]
//
// Every error ends with a message on stderr and a non-zero exit status.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <exception>
#include <moca/core/check.hpp>
#include <moca/core/version.hpp>

#include "extract.hpp"

int main(int argc, char** argv) {
  CLI::App app{"moca: Vision Transformers and MOCA self-supervised pretraining"};
  app.set_version_flag("--version", moca::kVersion);
  app.require_subcommand(1);
  moca::cli::ExtractOptions extract;
  CLI::App* extract_cmd = moca::cli::add_extract_command(app, extract);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    if (extract_cmd->parsed()) moca::cli::run_extract(extract);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moca: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
