// Helpers of the tests that drive the `moca` program (MOCA_CLI): running it, a small labelled
// data set in MNIST's IDX format, and a MOCA checkpoint of a tiny 32×32 grey model in the layout
// `moca pretrain` writes (RUN/checkpoints/latest → step-NNNNNNN/weights.safetensors with the
// configuration as JSON in the metadata key "moca_config").
#pragma once

#include <doctest/doctest.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <moca/models/moca/checkpoint.hpp>
#include <moca/models/moca/config_json.hpp>
#include <moca/train/checkpoint_dir.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "cli_program.hpp"
#include "temp_files.hpp"

namespace moca::testing {

namespace fs = std::filesystem;

inline void put_be32(std::vector<std::uint8_t>& v, std::uint32_t x) {
  for (int s = 24; s >= 0; s -= 8) v.push_back(static_cast<std::uint8_t>(x >> s));
}

inline void write_bytes(const fs::path& p, const std::vector<std::uint8_t>& bytes) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(f.good());
}

/// A labelled set of 28×28 grey images: image i has class i mod `classes` and a bright 8×8
/// square whose place depends on the class, over pseudo-random background noise.
struct TinyImages {
  std::vector<std::uint8_t> pixels;  ///< count · 28 · 28
  std::vector<std::uint8_t> labels;
};

inline TinyImages tiny_images(int count, int classes, std::uint32_t seed) {
  TinyImages t;
  std::uint32_t state = seed * 2654435761u + 12345u;
  for (int i = 0; i < count; ++i) {
    const int c = i % classes;
    t.labels.push_back(static_cast<std::uint8_t>(c));
    const int top = 3 + 5 * (c % 4), left = 3 + 4 * ((c / 4) % 4) + (c % 2) * 2;
    for (int y = 0; y < 28; ++y)
      for (int x = 0; x < 28; ++x) {
        state = state * 1664525u + 1013904223u;
        const bool in = y >= top && y < top + 8 && x >= left && x < left + 8;
        t.pixels.push_back(static_cast<std::uint8_t>(in ? 200 + (state >> 28) : (state >> 27)));
      }
  }
  return t;
}

/// Writes `images` as `<stem>-images-idx3-ubyte` and `<stem>-labels-idx1-ubyte` in `dir`.
inline void write_idx_pair(const fs::path& dir, const std::string& stem, const TinyImages& images) {
  const auto n = static_cast<std::uint32_t>(images.labels.size());
  std::vector<std::uint8_t> img, lab;
  put_be32(img, 0x00000803);
  put_be32(img, n);
  put_be32(img, 28);
  put_be32(img, 28);
  img.insert(img.end(), images.pixels.begin(), images.pixels.end());
  put_be32(lab, 0x00000801);
  put_be32(lab, n);
  lab.insert(lab.end(), images.labels.begin(), images.labels.end());
  write_bytes(dir / (stem + "-images-idx3-ubyte"), img);
  write_bytes(dir / (stem + "-labels-idx1-ubyte"), lab);
}

/// A folder of IDX files like Fashion-MNIST's: `train` train and `test` t10k images.
inline void write_idx_folder(const fs::path& dir, const TinyImages& train, const TinyImages& test) {
  fs::create_directories(dir);
  write_idx_pair(dir, "train", train);
  write_idx_pair(dir, "t10k", test);
}

/// A MOCA configuration with a 32×32 grey encoder of 16 patches, 16 wide and 2 deep.
inline MocaConfig tiny_cli_config() {
  MocaConfig c;
  c.encoder = {32, 8, 1, 16, 2, 2, 4.0, 1e-6};
  c.decoder = {16, 1, 2, 4.0, 1e-6};
  c.early_layer = 1;
  c.num_words = 32;
  c.skip_offset = 1;
  c.words_per_iter = 4;
  return c;
}

/// A model whose teacher differs from its student (initialised from another seed).
inline void init_distinct(Moca<float>& m, std::uint64_t seed) {
  m.initialize(seed);
  m.teacher_params().initialize(seed + 1000);
}

/// Saves `m` as checkpoint `step` of the run folder `run`, recording `recorded` as its
/// configuration (pass another one to make the file lie about its tensors).
inline fs::path write_checkpoint(Moca<float>& m, const fs::path& run, const MocaConfig& recorded,
                                 std::int64_t step = 0) {
  train::CheckpointDir ckpts(run / "checkpoints", 3);
  return ckpts.save(step, [&](const fs::path& dir) {
    save_moca_weights(m, dir / "weights.safetensors",
                      {{"moca_config", config_to_json(recorded).dump()}});
  });
}

}  // namespace moca::testing
