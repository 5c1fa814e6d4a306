// The online codebook of MOCA ("BoWExtractor", spec §4): K unit-norm words, soft assignment of
// teacher tokens with an adaptive temperature, bag-of-words targets over the inner region, and
// a FIFO refresh with teacher tokens.
//
//   codebook.snapshot();                        // this iteration's words (targets and prototypes)
//   codebook.assign(teacher_out_v1, q1, y1);    // once per view: codes, BoW, dist_norm EMA
//   codebook.assign(teacher_out_v2, q2, y2);
//   codebook.update(teacher_out_of(choice.view), choice);  // new words; prev ← dist_norm
//   codebook.settle();                          // optional: reads the statistics now
//
// Each assign() folds a statistic of the device's codes into the dist_norm EMA. Reading it would
// make the host wait for the device in the middle of a training step, so the statistics stay on
// the device (PendingValues) until dist_norm or dist_norm_prev is asked for, or settle() is
// called: the trainer does it where it waits anyway. Until then dist_norm_prev is only needed by
// the next assign() after an update(), so two assigns in a row do not wait.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "moca/core/profiler.hpp"
#include "moca/core/rng.hpp"
#include "moca/nn/parameter.hpp"
#include "moca/ops.hpp"

namespace moca {

struct CodebookConfig {
  std::int64_t num_words = 4096;     ///< K
  std::int64_t dim = 768;            ///< C (the encoder width)
  std::int64_t grid = 14;            ///< patches per side
  std::int64_t skip_offset = 2;      ///< border rows/columns left out of BoW and refresh
  double inv_delta = 10.0;           ///< assignment inverse temperature numerator
  double dist_norm_decay = 0.99;     ///< EMA decay of dist_norm (official: 0.99)
  double dist_norm_init = 0.5;
  std::int64_t words_per_iter = 32;  ///< new words per iteration (spec §11.5)

  std::int64_t inner_side() const { return grid - 2 * skip_offset; }
  void validate() const {
    MOCA_CHECK(num_words > 0 && dim > 0 && grid > 0, "codebook: invalid sizes K ", num_words,
               ", C ", dim, ", grid ", grid);
    MOCA_CHECK(skip_offset >= 1 && inner_side() >= 1, "codebook: skip_offset ", skip_offset,
               " must be ≥ 1 and leave an inner region of the ", grid, "×", grid, " grid");
    MOCA_CHECK(words_per_iter >= 1 && num_words % words_per_iter == 0, "codebook: K = ",
               num_words, " is not a multiple of the words per iteration ", words_per_iter);
  }
};

/// Which teacher tokens refresh the codebook in one iteration (spec §4.4).
struct CodebookRefresh {
  int view = 0;                    ///< 0: view 1, 1: view 2
  std::vector<Index> images;       ///< distinct images of the batch
  std::vector<Index> inner_tokens; ///< per image, an index into the inner region (row-major)
};

template <class T, class D = Cpu>
class Codebook {
 public:
  static constexpr double kNormalizeEps = 1e-5;

  Param<T, D> embedding;  ///< E [K, C]: a buffer (no gradient), checkpointed as `_embedding`
  std::int64_t ptr = 0;   ///< ring pointer: the next word to replace
  std::int64_t num_batches = 0;

  Codebook() = default;
  explicit Codebook(const CodebookConfig& cfg) : cfg_((cfg.validate(), cfg)) {
    embedding.declare({cfg.num_words, cfg.dim}, Init::external(), /*trainable=*/false);
    dist_norm_ = dist_norm_prev_ = cfg.dist_norm_init;
    const std::int64_t G = cfg.grid, s = cfg.skip_offset;
    for (std::int64_t r = s; r < G - s; ++r)
      for (std::int64_t c = s; c < G - s; ++c) inner_.push_back(static_cast<Index>(r * G + c));
  }

  template <class V>
  void visit(V&& v) {
    v("_embedding", embedding);
  }

  const CodebookConfig& config() const { return cfg_; }
  /// Patch indices of the inner region, row-major (spec §4.3).
  const std::vector<Index>& inner_patches() const { return inner_; }

  /// Spec §4.1: standard normal entries clamped at 0, each row L2-normalised (eps 1e-5).
  void initialize(const Philox& rng) {
    Tensor<T, Cpu> host(embedding.shape);
    Tensor<compute_t<T>, Cpu> norms({cfg_.num_words});
    fill_normal(TensorView<T, Cpu>(host), rng, name_stream("bow_extractor._embedding"), 0.0, 1.0);
    ops::relu(TensorView<T, Cpu>(host), TensorView<T, Cpu>(host));
    ops::l2_normalize(TensorView<T, Cpu>(host), kNormalizeEps, TensorView<T, Cpu>(host),
                      TensorView<compute_t<T>, Cpu>(norms));
    copy(TensorView<T, Cpu>(host), embedding.value);
    ptr = 0;
    set_dist_norms(cfg_.dist_norm_init, cfg_.dist_norm_init);
    num_batches = 0;
  }

  /// The EMA of the assignment statistic, with every assign() so far folded in (waits for the
  /// device if some are not yet read).
  double dist_norm() {
    settle();
    return dist_norm_;
  }
  /// dist_norm as it was at the last update(): the temperature of this iteration's codes.
  double dist_norm_prev() {
    if (prev_pending_) settle();
    return dist_norm_prev_;
  }
  /// Sets both (a checkpoint's values), dropping statistics not yet read.
  void set_dist_norms(double dist_norm, double dist_norm_prev) {
    pending_.clear();
    stats_.clear();
    prev_pending_ = false;
    dist_norm_ = dist_norm;
    dist_norm_prev_ = dist_norm_prev;
  }

  /// Reads the statistics of the assigns so far (one wait for the device, none if there are
  /// none) and folds them into dist_norm in order, with each update()'s dist_norm_prev ←
  /// dist_norm where it came.
  void settle() {
    if (pending_.empty()) return;
    stats_.read();
    for (const Pending& p : pending_) {
      if (p.update) {
        dist_norm_prev_ = dist_norm_;
        continue;
      }
      const double t = std::abs(stats_[p.statistic]);
      dist_norm_ = cfg_.dist_norm_decay * dist_norm_ + (1.0 - cfg_.dist_norm_decay) * t;
    }
    pending_.clear();
    stats_.clear();
    prev_pending_ = false;
  }

  /// Copies the current words; assign() and the prototype generators read this snapshot, so the
  /// refresh of this iteration affects only the next one (spec §4.5).
  void snapshot() {
    snapshot_.resize(embedding.shape);
    copy(embedding.value, TensorView<T, D>(snapshot_));
  }
  TensorView<T, D> words() const { return snapshot_; }

  /// Soft assignment of one view's teacher output [N, 1 + L, C] (after the final norm):
  /// codes q [N, L, K] = softmax(cos · inv_delta / dist_norm_prev) and bag of words y [N, K]
  /// (inner-token average, L1-normalised). Also folds this view's statistic into dist_norm.
  void assign(const TensorView<T, D>& teacher_out, const TensorView<T, D>& q,
              const TensorView<T, D>& y) {
    MOCA_PROFILE_SCOPE("codebook");
    const std::int64_t N = teacher_out.size(0), S = teacher_out.size(1), C = cfg_.dim;
    const std::int64_t L = S - 1, K = cfg_.num_words, I = static_cast<std::int64_t>(inner_.size());
    MOCA_CHECK(teacher_out.rank() == 3 && teacher_out.size(2) == C && L == cfg_.grid * cfg_.grid,
               "codebook: teacher output ", teacher_out.shape(), " is not [N, 1 + ",
               cfg_.grid * cfg_.grid, ", ", C, "]");
    MOCA_CHECK(q.shape() == Shape({N, L, K}) && y.shape() == Shape({N, K}), "codebook: codes ",
               q.shape(), " and bag of words ", y.shape(), " must be [", N, ", ", L, ", ", K,
               "] and [", N, ", ", K, "]");
    MOCA_CHECK(!snapshot_.empty(), "codebook: assign() before snapshot()");
    // Cosine similarity of the L2-normalised patch tokens to every word.
    tokens_.resize({N, L, C});
    token_norm_.resize({N * L});
    ops::copy_strided(ops::strided_batch(teacher_out, C, L, C, C, S * C, N),
                      ops::strided_batch(TensorView<T, D>(tokens_), 0, L, C, C, L * C, N));
    ops::l2_normalize(TensorView<T, D>(tokens_), kNormalizeEps, TensorView<T, D>(tokens_),
                      TensorView<compute_t<T>, D>(token_norm_));
    TensorView<T, D> cos = q.reshape({N * L, K});
    ops::gemm(TensorView<T, D>(tokens_).reshape({N * L, C}), Trans::N, TensorView<T, D>(snapshot_),
              Trans::T, cos);
    // Codes with the previous iteration's temperature, in place over the similarities, and the
    // statistic: mean over tokens of (max cos − mean cos) = mean of (mean dist − min dist).
    stat_.resize({N * L});
    total_.resize({1});
    ops::softmax_with_spread(cos, cfg_.inv_delta / dist_norm_prev(), TensorView<T, D>(stat_),
                             spread_workspace_);
    ops::sum(TensorView<T, D>(stat_), 0, TensorView<T, D>(total_));
    // |total / (N·L)| enters dist_norm at settle().
    pending_.push_back(
        {stats_.capture(TensorView<T, D>(total_), static_cast<double>(N * L)), false});
    // Bag of words: average of the inner tokens' codes, then L1-normalised.
    set_inner_rows(N, L);
    inner_codes_.resize({N, I, K});
    ops::gather_rows(cos, TensorView<Index, D>(inner_rows_),
                     TensorView<T, D>(inner_codes_).reshape({N * I, K}));
    ops::mean(TensorView<T, D>(inner_codes_), 1, y);
    // y / max(Σ|y|, eps) per row; y ≥ 0 here, so Σ|y| = Σ y (spec §4.3).
    ops::l1_normalize(y, kNormalizeEps);
  }

  /// Draws this iteration's refresh: a view with probability ½, `words_per_iter` distinct images
  /// of the batch, one inner token each (spec §4.4), from counter-based streams of `step`.
  CodebookRefresh draw_refresh(const Philox& rng, std::uint64_t step, std::int64_t N) const {
    const std::int64_t n_new = cfg_.words_per_iter;
    MOCA_CHECK(n_new <= N, "codebook: ", n_new, " new words per iteration need at least as many "
               "images, the batch has ", N);
    const std::uint64_t stream = (step << 8) ^ 0x636f6465626f6f6bull;
    CodebookRefresh r;
    r.view = rng.uniform_double(stream, 0) < 0.5 ? 0 : 1;
    std::vector<std::pair<double, Index>> order(static_cast<std::size_t>(N));
    for (std::int64_t n = 0; n < N; ++n)
      order[static_cast<std::size_t>(n)] = {rng.uniform_double(stream + 1, static_cast<std::uint64_t>(n)),
                                            static_cast<Index>(n)};
    std::sort(order.begin(), order.end());
    for (std::int64_t k = 0; k < n_new; ++k) {
      r.images.push_back(order[static_cast<std::size_t>(k)].second);
      r.inner_tokens.push_back(static_cast<Index>(
          rng.below(inner_.size(), stream + 2, static_cast<std::uint64_t>(k))));
    }
    return r;
  }

  /// Replaces the oldest words with the chosen teacher tokens (L2-normalised), advances the ring
  /// pointer and makes dist_norm_prev ← dist_norm. `teacher_out` is the chosen view's output.
  void update(const TensorView<T, D>& teacher_out, const CodebookRefresh& r) {
    MOCA_PROFILE_SCOPE("codebook");
    const std::int64_t N = teacher_out.size(0), S = teacher_out.size(1), C = cfg_.dim;
    const auto n_new = static_cast<std::int64_t>(r.images.size());
    MOCA_CHECK(n_new == cfg_.words_per_iter && r.inner_tokens.size() == r.images.size(),
               "codebook: a refresh of ", n_new, " images and ", r.inner_tokens.size(),
               " tokens, expected ", cfg_.words_per_iter, " of each");
    host_rows_.resize({n_new});
    for (std::int64_t k = 0; k < n_new; ++k) {
      const Index img = r.images[static_cast<std::size_t>(k)];
      const Index tok = r.inner_tokens[static_cast<std::size_t>(k)];
      MOCA_CHECK(img >= 0 && img < N && tok >= 0 && tok < static_cast<Index>(inner_.size()),
                 "codebook: refresh image ", img, " or inner token ", tok, " out of range");
      host_rows_(k) = static_cast<Index>(img * S + 1 + inner_[static_cast<std::size_t>(tok)]);
    }
    rows_index_.resize({n_new});
    copy(TensorView<Index, Cpu>(host_rows_), TensorView<Index, D>(rows_index_));
    fresh_.resize({n_new, C});
    fresh_norm_.resize({n_new});
    ops::gather_rows(teacher_out.reshape({N * S, C}), TensorView<Index, D>(rows_index_),
                     TensorView<T, D>(fresh_));
    ops::l2_normalize(TensorView<T, D>(fresh_), kNormalizeEps, TensorView<T, D>(fresh_),
                      TensorView<compute_t<T>, D>(fresh_norm_));
    copy(TensorView<T, D>(fresh_), embedding.value.rows(ptr, ptr + n_new));
    ptr = (ptr + n_new) % cfg_.num_words;
    pending_.push_back({{}, true});  // dist_norm_prev ← dist_norm, once the statistics are read
    prev_pending_ = true;
    ++num_batches;
  }

 private:
  void set_inner_rows(std::int64_t N, std::int64_t L) {
    const auto I = static_cast<std::int64_t>(inner_.size());
    if (inner_rows_.numel() == N * I) return;  // depends on N only
    Tensor<Index, Cpu> host({N * I});
    for (std::int64_t n = 0; n < N; ++n)
      for (std::int64_t i = 0; i < I; ++i)
        host(n * I + i) = static_cast<Index>(n * L + inner_[static_cast<std::size_t>(i)]);
    inner_rows_.resize({N * I});
    copy(TensorView<Index, Cpu>(host), TensorView<Index, D>(inner_rows_));
  }

  CodebookConfig cfg_;
  std::vector<Index> inner_;
  Tensor<T, D> snapshot_, tokens_, stat_, total_, inner_codes_, fresh_, spread_workspace_;
  Tensor<compute_t<T>, D> token_norm_, fresh_norm_;  // l2_normalize's saved norms (no backward reads them)
  Tensor<Index, D> inner_rows_, rows_index_;
  Tensor<Index, Cpu> host_rows_;
  // The dist_norm EMA's inputs in order: a statistic, or an update()'s dist_norm_prev ← dist_norm.
  struct Pending {
    typename PendingValues<D>::Ticket statistic;
    bool update;
  };
  PendingValues<D> stats_;
  std::vector<Pending> pending_;
  bool prev_pending_ = false;
  double dist_norm_ = 0.5, dist_norm_prev_ = 0.5;
};

}  // namespace moca
