// The small MOCA model of the step tests — every part of the step at a size where a CPU step in
// double takes milliseconds — and random image batches for it. The PyTorch fixture
// (tests/python/generate_moca_reference.py) uses the same configuration.
#pragma once

#include <cstdint>
#include <moca/core/random.hpp>
#include <moca/models/moca/moca.hpp>

namespace moca::testing {

inline MocaConfig small_moca_config() {
  MocaConfig c;
  c.encoder.img_size = 8;
  c.encoder.patch = 2;
  c.encoder.in_chans = 1;
  c.encoder.dim = 16;
  c.encoder.depth = 3;
  c.encoder.heads = 2;
  c.decoder = {12, 1, 2, 4.0, 1e-6};
  c.early_layer = 1;
  c.num_words = 32;
  c.skip_offset = 1;
  c.words_per_iter = 4;
  return c;
}

/// B images [B, C, H, W] of encoder `v`, uniform in [-1, 1], from Philox stream `stream`.
template <class T>
Tensor<T> random_images(std::int64_t B, const VitConfig& v, std::uint64_t stream) {
  Tensor<T> x({B, v.in_chans, v.img_size, v.img_size});
  fill_uniform(x, Philox(9), stream, -1.0, 1.0);
  return x;
}

}  // namespace moca::testing
