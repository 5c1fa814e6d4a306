// Image features of a ViT encoder for evaluation (spec §9): the class token or the average of the
// patch tokens after the final norm, for every image of a data set.
//
//   data::EvalLoader loader(test_set, augment, /*batch=*/256);
//   Features f = encode(vit, loader, Pooling::Avg);   // f.features [N, D], f.labels
//
// The encoder runs unmasked in inference: no gradients are needed, so the same object can keep
// training afterwards (its forward buffers are overwritten).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

#include "moca/core/check.hpp"
#include "moca/core/tensor.hpp"
#include "moca/data/loader.hpp"
#include "moca/models/vit.hpp"
#include "moca/ops/elementwise.hpp"
#include "moca/ops/layout.hpp"
#include "moca/ops/reduce.hpp"

namespace moca::eval {

/// Which token(s) make an image's feature.
enum class Pooling {
  Avg,  ///< mean of the patch tokens after the final norm (MOCA's default, `avg_pooling`)
  Cls,  ///< the class token after the final norm
};

inline const char* to_string(Pooling p) { return p == Pooling::Avg ? "avg" : "cls"; }

inline Pooling parse_pooling(const std::string& s) {
  if (s == "avg") return Pooling::Avg;
  if (s == "cls") return Pooling::Cls;
  MOCA_CHECK(false, "pooling must be 'avg' or 'cls', got '", s, "'");
  return Pooling::Avg;
}

/// Features and labels of a whole data set, in data set order.
struct Features {
  Tensor<float> features;           ///< [N, D]
  std::vector<std::int32_t> labels;  ///< -1 for unlabelled images
};

/// Pools the encoder output tokens [n, 1 + L, D] (class token first) into out [n, D].
/// `scratch` holds the patch tokens for the average.
template <class T, class D>
void pool_tokens(const TensorView<T, D>& tokens, Pooling pooling, const TensorView<T, D>& out,
                 Tensor<T, D>& scratch) {
  MOCA_CHECK(tokens.rank() == 3 && tokens.size(1) >= 2 && out.rank() == 2 &&
                 out.size(0) == tokens.size(0) && out.size(1) == tokens.size(2),
             "pool_tokens: tokens ", tokens.shape(), " and output ", out.shape(),
             " should be [n, 1 + L, D] and [n, D]");
  const std::int64_t n = tokens.size(0), S = tokens.size(1), C = tokens.size(2), L = S - 1;
  if (pooling == Pooling::Cls) {
    ops::copy_strided(ops::strided_batch(tokens, 0, 1, C, C, S * C, n),
                      ops::strided_batch(out, 0, 1, C, C, C, n));
    return;
  }
  scratch.resize({n, L, C});
  ops::copy_strided(ops::strided_batch(tokens, C, L, C, C, S * C, n),
                    ops::strided_batch(TensorView<T, D>(scratch), 0, L, C, C, L * C, n));
  ops::mean(TensorView<T, D>(scratch), 1, out);
}

/// Runs `vit` over every batch of `loader` (from its first batch) and pools the final-norm
/// tokens into float features. `progress(done, total)` is called after each batch when given.
/// A float encoder on the CPU reads the loader's batch in place; otherwise each batch is
/// converted to the encoder's type and copied to its device, and its pooled features come back.
template <class T, class D, class B>
Features encode(VisionTransformer<T, D, B>& vit, data::EvalLoader& loader, Pooling pooling,
                std::int64_t total_images,
                const std::function<void(std::int64_t, std::int64_t)>& progress = {}) {
  const std::int64_t C = vit.config().dim;
  Features f;
  f.features.resize({total_images, C});
  f.labels.assign(static_cast<std::size_t>(total_images), -1);
  Tensor<T, D> scratch, images, pooled;
  Tensor<T> stage_in, stage_out;
  loader.reset();
  std::int64_t done = 0;
  while (const data::EvalBatch* b = loader.next()) {
    const std::int64_t n = b->size();
    MOCA_CHECK(done + n <= total_images, "encode: the loader holds more than ", total_images,
               " images");
    const TensorView<float> rows = TensorView<float>(f.features).rows(done, done + n);
    if constexpr (std::is_same_v<D, Cpu> && std::is_same_v<T, float>) {
      vit.forward_inference(b->images);
      pool_tokens(vit.output(), pooling, rows, scratch);
    } else {
      images.resize(b->images.shape());
      pooled.resize({n, C});
      ops::upload_converted(TensorView<float>(b->images), TensorView<T, D>(images), stage_in);
      vit.forward_inference(images);
      pool_tokens(vit.output(), pooling, TensorView<T, D>(pooled), scratch);
      ops::download_converted(TensorView<T, D>(pooled), rows, stage_out);
    }
    for (std::int64_t k = 0; k < n; ++k)
      f.labels[static_cast<std::size_t>(done + k)] = b->labels[static_cast<std::size_t>(k)];
    done += n;
    if (progress) progress(done, total_images);
  }
  MOCA_CHECK(done == total_images, "encode: the loader held ", done, " images, expected ",
             total_images);
  return f;
}

}  // namespace moca::eval
