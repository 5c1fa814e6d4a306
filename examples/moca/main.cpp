// The `moca` command-line program.
//
//   moca pretrain [--data fashion-mnist|DIR] [--preset tiny|vit-s16|vit-b16]
//                 [--epochs N | --minutes M] [--out DIR] [--resume] ...    MOCA pretraining
//   moca knn --checkpoint C [--data ...] [--teacher|--student] ...       k-NN evaluation
//   moca extract (--checkpoint C | --weights W <architecture>) --input X --output F
//
// `moca <command> --help` lists every flag. Every error ends with a message on stderr and a
// non-zero exit status; an interrupted pretraining exits with 130 after saving a checkpoint.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <exception>
#include <moca/core/check.hpp>
#include <moca/core/version.hpp>

#include "extract.hpp"
#include "knn.hpp"
#include "pretrain.hpp"

int main(int argc, char** argv) {
  CLI::App app{"moca: Vision Transformers and MOCA self-supervised pretraining"};
  app.set_version_flag("--version", moca::kVersion);
  app.require_subcommand(1);
  moca::cli::PretrainOptions pretrain;
  CLI::App* pretrain_cmd = moca::cli::add_pretrain_command(app, pretrain);
  moca::cli::KnnOptions knn;
  CLI::App* knn_cmd = moca::cli::add_knn_command(app, knn);
  moca::cli::ExtractOptions extract;
  CLI::App* extract_cmd = moca::cli::add_extract_command(app, extract);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    if (pretrain_cmd->parsed()) return moca::cli::run_pretrain(pretrain, *pretrain_cmd);
    if (knn_cmd->parsed()) moca::cli::run_knn(knn);
    if (extract_cmd->parsed()) moca::cli::run_extract(extract);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moca: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
