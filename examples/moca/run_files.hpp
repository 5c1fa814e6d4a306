// Where a pretraining run keeps its files, and how other commands find them.
//
//   OUT/config.json                          resolved options and the planned length (JSON)
//   OUT/log.jsonl                            one record per logged step and per evaluation
//   OUT/curves.svg                           loss and k-NN curves
//   OUT/checkpoints/latest                   names the latest complete checkpoint
//   OUT/checkpoints/step-NNNNNNN/weights.safetensors   the model under the official names, with
//                                            the MocaConfig as JSON in the metadata (kConfigKey)
//   OUT/checkpoints/step-NNNNNNN/state.safetensors     optimiser moments and the step count
#pragma once

#include <filesystem>
#include <string>

#include <moca/io/safetensors.hpp>
#include <moca/models/moca/config_json.hpp>
#include <moca/train/checkpoint_dir.hpp>

namespace moca::cli {

/// Metadata key of a weights file that holds the MocaConfig as JSON.
inline constexpr const char* kConfigKey = "moca_config";
/// Metadata key of a state file that holds the run's options as JSON.
inline constexpr const char* kRunKey = "moca_run";
inline constexpr const char* kWeightsFile = "weights.safetensors";
inline constexpr const char* kStateFile = "state.safetensors";

/// The weights file that `path` designates: a .safetensors file itself, a checkpoint folder, a
/// checkpoints folder (its latest), or a run folder (its latest checkpoint).
inline std::filesystem::path resolve_weights(const std::filesystem::path& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  MOCA_CHECK(fs::exists(path, ec), "checkpoint '", path.string(), "' does not exist");
  if (fs::is_regular_file(path, ec)) return path;
  if (fs::is_regular_file(path / kWeightsFile, ec)) return path / kWeightsFile;
  for (const fs::path& root : {path, path / "checkpoints"}) {
    if (fs::is_regular_file(root / "latest", ec)) {
      const auto dir = train::CheckpointDir(root).latest();
      MOCA_CHECK(dir && fs::is_regular_file(*dir / kWeightsFile, ec), "checkpoint folder ",
                 root.string(), ": the latest checkpoint has no ", kWeightsFile);
      return *dir / kWeightsFile;
    }
  }
  MOCA_CHECK(false, "'", path.string(), "' is neither a weights file, a checkpoint folder nor a "
             "run folder with checkpoints/latest");
  return {};
}

/// The MocaConfig recorded in a weights file written by `moca pretrain`.
inline MocaConfig read_moca_config(const SafetensorsFile& weights) {
  const auto text = weights.metadata(kConfigKey);
  MOCA_CHECK(text.has_value(), weights.path(), ": no '", kConfigKey,
             "' metadata: not a checkpoint written by moca pretrain (use moca extract with the "
             "architecture flags for other weights)");
  const nlohmann::json j = nlohmann::json::parse(*text, nullptr, false);
  MOCA_CHECK(!j.is_discarded(), weights.path(), ": the '", kConfigKey,
             "' metadata is not valid JSON");
  return moca_config_from_json(j, weights.path());
}

}  // namespace moca::cli
