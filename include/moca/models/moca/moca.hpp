// MOCA: masked online codebook assignments prediction (Gidaris et al., TMLR 2024), one training
// iteration at a time, exactly as spec §13 orders it:
//
//   teacher EMA → codebook snapshot → teacher codes/BoW of both views (dist_norm EMA per view)
//   → codebook refresh → prototypes W^b, W^d from the snapshot → per masking round: student
//   encoder, L_IMG (cross-view BoW from the global embedding), condenser decoder, L_LOC
//   (same-view token codes at every decoded position) → backward → clip → AdamW.
//
//   Moca<float> moca(MocaConfig::tiny());
//   moca.initialize(seed);
//   auto plan = moca.draw_plan(step);                       // masks + codebook refresh
//   auto result = moca.train_step(x1, x2, plan, schedule.at(step));
//
// Each masking round runs forward and backward before the next one (the losses add up, so the
// gradients do too); only one round's activations are held at a time. A step allocates nothing
// once its buffers are sized.
#pragma once

#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "moca/core/profiler.hpp"
#include "moca/models/moca/codebook.hpp"
#include "moca/models/moca/condenser_decoder.hpp"
#include "moca/models/moca/masking.hpp"
#include "moca/models/moca/weight_generator.hpp"
#include "moca/models/vit.hpp"
#include "moca/nn/losses.hpp"
#include "moca/optim/adamw.hpp"
#include "moca/optim/clip.hpp"
#include "moca/optim/ema.hpp"
#include "moca/optim/param_groups.hpp"

namespace moca {

/// Every size and hyper-parameter of MOCA. Defaults are the official recipe's (spec §0).
struct MocaConfig {
  VitConfig encoder = VitConfig::vit_b16();
  DecoderConfig decoder;            ///< 512 wide, 2 blocks, 16 heads
  std::int64_t early_layer = 4;     ///< decoder input: raw output of block depth − 1 − early_layer
  std::int64_t num_words = 4096;
  std::int64_t skip_offset = 2;
  std::int64_t words_per_iter = 32;  ///< per iteration (spec §11.5: 4 in the published 8-GPU run)
  double inv_delta = 10.0;
  double dist_norm_decay = 0.99;
  double kappa = 3.0;
  double pred_mlp_ratio = 2.0;      ///< generator hidden width = encoder width · ratio
  double mask_ratio[2] = {0.55, 0.75};
  double dec_mask_ratio[2] = {0.35, 0.55};
  double img_weight = 0.5, loc_weight = 0.5;
  bool avg_pooling = true;          ///< global embedding: mean of visible patch tokens (else cls)
  double clip_grad = 0.1;           ///< global-norm clipping; negative disables it
  AdamWConfig adamw;

  std::int64_t generator_hidden() const {
    return static_cast<std::int64_t>(static_cast<double>(encoder.dim) * pred_mlp_ratio);
  }
  MaskLengths mask_lengths() const {
    return MaskLengths::from_ratios(encoder.num_patches(), mask_ratio[0], mask_ratio[1],
                                    dec_mask_ratio[0], dec_mask_ratio[1]);
  }
  CodebookConfig codebook() const {
    CodebookConfig c;
    c.num_words = num_words;
    c.dim = encoder.dim;
    c.grid = encoder.grid();
    c.skip_offset = skip_offset;
    c.inv_delta = inv_delta;
    c.dist_norm_decay = dist_norm_decay;
    c.words_per_iter = words_per_iter;
    return c;
  }
  void validate() const {
    encoder.validate();
    MOCA_CHECK(early_layer >= 0 && early_layer < encoder.depth, "MOCA: early_layer ", early_layer,
               " must lie in [0, depth ", encoder.depth, ")");
    MOCA_CHECK(decoder.dim % 4 == 0 && decoder.heads > 0 && decoder.dim % decoder.heads == 0 &&
                   decoder.depth >= 1,
               "MOCA: decoder width ", decoder.dim, " must be a multiple of 4 and of its ",
               decoder.heads, " heads, with at least one block");
    MOCA_CHECK(kappa > 0 && inv_delta > 0 && pred_mlp_ratio > 0, "MOCA: kappa ", kappa,
               ", inv_delta ", inv_delta, " and pred_mlp_ratio ", pred_mlp_ratio,
               " must be positive");
    MOCA_CHECK(img_weight >= 0 && loc_weight > 0, "MOCA: loss weights must be non-negative (and "
               "loc_weight positive: the decoder is always built), got ", img_weight, ", ",
               loc_weight);
    codebook().validate();
    (void)mask_lengths();
  }

  /// The project's Fashion-MNIST preset (spec §16).
  static MocaConfig tiny() {
    MocaConfig c;
    c.encoder = VitConfig::tiny();
    c.decoder = {128, 2, 4, 4.0, 1e-6};
    c.early_layer = 2;
    c.num_words = 1024;
    c.skip_offset = 1;
    return c;
  }
  /// ViT-S/16 encoder with the default decoder (512 × 2, 16 heads).
  static MocaConfig vit_s16() {
    MocaConfig c;
    c.encoder = VitConfig::vit_s16();
    return c;
  }
  /// The official default, `moca_vit_base_patch16_dec2` (spec §0).
  static MocaConfig vit_b16() { return MocaConfig{}; }
};

/// The random choices of one iteration: masks for the 2B student rows and the codebook refresh.
struct MocaPlan {
  MaskPlan masks;
  CodebookRefresh refresh;
};

/// Schedule values for one iteration (see MocaSchedule in optim/schedules.hpp).
struct MocaHyper {
  double lr = 0, weight_decay = 0.05, momentum = 0.994;
  double wgen_lr = 1e-4, wgen_weight_decay = 0.05;
};

/// What one iteration reports.
struct MocaStepResult {
  double loss = 0, l_img = 0, l_loc = 0;
  double l_img_round[2] = {0, 0}, l_loc_round[2] = {0, 0};
  double grad_norm = 0;  ///< before clipping
  double lr = 0, weight_decay = 0, momentum = 0;
  double dist_norm = 0;
};

template <class T, class D = Cpu, class BlockT = Block<T, D>>
class Moca {
  MocaConfig cfg_;  // first: validated before any part is built

 public:
  /// The codebook under its official name bow_extractor.bow_extractor.0.*.
  struct BowExtractor {
    std::vector<Codebook<T, D>> bow_extractor;
    template <class V>
    void visit(V&& v) {
      v("bow_extractor", bow_extractor);
    }
  };

  VisionTransformer<T, D, BlockT> encoder;          ///< student
  VisionTransformer<T, D, BlockT> encoder_teacher;  ///< EMA of the student, no gradients
  BowExtractor bow_extractor;
  WeightGenerator<T, D> encoder_pred, decoder_pred;  ///< G^b, G^d
  CondenserDecoder<T, D, BlockT> decoder;

  explicit Moca(const MocaConfig& cfg)
      : cfg_((cfg.validate(), cfg)),
        encoder(cfg.encoder),
        encoder_teacher(cfg.encoder),
        encoder_pred(cfg.encoder.dim, cfg.generator_hidden(), cfg.encoder.dim, cfg.kappa),
        decoder_pred(cfg.encoder.dim, cfg.generator_hidden(), cfg.decoder.dim, cfg.kappa),
        decoder(cfg.encoder.dim, cfg.encoder.grid(), cfg.decoder),
        lengths_(cfg.mask_lengths()) {
    bow_extractor.bow_extractor.emplace_back(cfg.codebook());
    params_ = ParameterStore<T, D>(*this);
    teacher_params_ = ParameterStore<T, D>(encoder_teacher, /*with_grads=*/false);
    ema_ = EmaLink<T, D>(teacher_params_, params_, "encoder");
    optimizer_ = AdamW<T, D>(params_, cfg.adamw);
    groups_ = moca_param_groups(params_);
  }
  Moca(const Moca&) = delete;
  Moca& operator=(const Moca&) = delete;

  /// Student side in the official state-dict order (the teacher has its own store, saved under
  /// the prefix "encoder_teacher.").
  template <class V>
  void visit(V&& v) {
    v("encoder", encoder);
    v("bow_extractor", bow_extractor);
    v("encoder_pred", encoder_pred);
    v("decoder_pred", decoder_pred);
    decoder.visit_flat(v);
  }

  const MocaConfig& config() const { return cfg_; }
  Codebook<T, D>& codebook() { return bow_extractor.bow_extractor[0]; }
  ParameterStore<T, D>& params() { return params_; }
  ParameterStore<T, D>& teacher_params() { return teacher_params_; }
  AdamW<T, D>& optimizer() { return optimizer_; }
  const MaskLengths& mask_lengths() const { return lengths_; }

  /// Spec §1.6 initialisation, the codebook of §4.1, and the teacher as an exact copy.
  void initialize(std::uint64_t seed) {
    params_.initialize(seed);
    teacher_params_.initialize(seed);  // frozen tables (positions)
    codebook().initialize(Philox(seed));
    ema_.copy_source();
    optimizer_.reset();
  }

  /// Draws the masks of the 2B student rows and the codebook refresh of iteration `step`.
  MocaPlan draw_plan(const Philox& rng, std::uint64_t step, std::int64_t batch) const {
    MocaPlan p;
    p.masks = complementary_masks(random_permutations(rng, step, 2 * batch,
                                                      cfg_.encoder.num_patches()),
                                  lengths_);
    p.refresh = bow_extractor.bow_extractor[0].draw_refresh(rng, step, batch);
    return p;
  }

  /// One micro-batch of an accumulated step: its two views and its masks.
  struct MicroBatch {
    TensorView<T, D> x1, x2;
    const MaskPlan* masks;
  };

  /// One iteration on B image pairs: views x1, x2 [B, C, H, W].
  MocaStepResult train_step(const TensorView<T, D>& x1, const TensorView<T, D>& x2,
                            const MocaPlan& plan, const MocaHyper& h) {
    const MicroBatch micro{x1, x2, &plan.masks};
    return train_step(std::span<const MicroBatch>(&micro, 1), plan.refresh, h);
  }

  /// One optimiser step over several micro-batches (spec §6.7, the reference's accum_iter):
  /// gradients of the mean loss accumulate; the dist_norm EMA runs on every micro-batch; the
  /// teacher EMA (before the last micro-batch's teacher pass) and the codebook refresh (from the
  /// last micro-batch) run once per step.
  MocaStepResult train_step(std::span<const MicroBatch> micro, const CodebookRefresh& refresh,
                            const MocaHyper& h) {
    MOCA_PROFILE_SCOPE("moca step");
    MOCA_CHECK(!micro.empty(), "MOCA: a step needs at least one micro-batch");
    MocaStepResult res;
    res.lr = h.lr;
    res.weight_decay = h.weight_decay;
    res.momentum = h.momentum;
    set_moca_hyperparameters(groups_, h.lr, h.weight_decay, h.wgen_lr, h.wgen_weight_decay);
    params_.zero_grad();
    // The losses, the gradient norm and the codebook's statistics stay on the device until the
    // one wait before the update (PendingValues): a wait for each would empty the device's
    // queue in the middle of the step.
    values_.clear();
    const double scale = 1.0 / static_cast<double>(micro.size());
    std::vector<RoundLosses>& losses = micro_losses_;
    losses.resize(micro.size());
    for (std::size_t i = 0; i < micro.size(); ++i) {
      const bool last = i + 1 == micro.size();
      if (last) ema_.update(h.momentum);
      prepare_targets(micro[i].x1, micro[i].x2, last ? &refresh : nullptr);
      losses[i] = queue_student_forward_backward(*micro[i].masks, scale);
    }
    typename PendingValues<D>::Ticket sum_squares;
    {
      MOCA_PROFILE_SCOPE("clip_grad_norm");
      sum_squares = ops::sum_squares(params_.grads(), values_);
    }
    values_.read();
    codebook().settle();
    for (const RoundLosses& part : losses)
      for (int r = 0; r < 2; ++r) {
        res.l_img_round[r] += scale * values_[part.img[r]];
        res.l_loc_round[r] += scale * values_[part.loc[r]];
      }
    res.l_img = res.l_img_round[0] + res.l_img_round[1];
    res.l_loc = res.l_loc_round[0] + res.l_loc_round[1];
    res.loss = cfg_.img_weight * res.l_img + cfg_.loc_weight * res.l_loc;
    res.dist_norm = codebook().dist_norm();
    MOCA_CHECK(std::isfinite(res.loss), "MOCA: the loss is not finite (L_IMG ", res.l_img,
               ", L_LOC ", res.l_loc, ")");
    res.grad_norm = std::sqrt(values_[sum_squares]);
    if (cfg_.clip_grad >= 0) clip_to_norm(params_.grads(), res.grad_norm, cfg_.clip_grad);
    optimizer_.step(groups_);
    return res;
  }

  /// Teacher side of one batch (no gradients): snapshots the codebook, computes the same-view
  /// codes Q = (q1; q2) and cross-view bags of words Y = (y2; y1) with the dist_norm EMA of each
  /// view, then, when `refresh` is given, refreshes the codebook (spec §4.4). The teacher EMA is
  /// the caller's (train_step does it first).
  void prepare_targets(const TensorView<T, D>& x1, const TensorView<T, D>& x2,
                       const CodebookRefresh* refresh) {
    const std::int64_t B = x1.size(0), L = cfg_.encoder.num_patches(), S = 1 + L;
    const std::int64_t C = cfg_.encoder.dim, K = cfg_.num_words;
    MOCA_CHECK(x1.shape() == x2.shape() && x1.rank() == 4, "MOCA: views ", x1.shape(), " and ",
               x2.shape(), " must be two [B, C, H, W] batches of the same shape");
    Codebook<T, D>& cb = codebook();
    cb.snapshot();
    codes_.resize({2 * B, L, K});
    bows_.resize({2 * B, K});
    const TensorView<T, D> Q = codes_, Y = bows_;
    const bool keep_view1 = refresh != nullptr && refresh->view == 0;
    // Sized whichever view the refresh draws, so that no later step allocates it.
    if (refresh != nullptr) chosen_.resize({B, S, C});
    encoder_teacher.forward_inference(x1);
    cb.assign(encoder_teacher.output(), Q.rows(0, B), Y.rows(B, 2 * B));
    if (keep_view1) copy(encoder_teacher.output(), TensorView<T, D>(chosen_));
    encoder_teacher.forward_inference(x2);
    cb.assign(encoder_teacher.output(), Q.rows(B, 2 * B), Y.rows(0, B));
    if (refresh != nullptr)
      cb.update(keep_view1 ? TensorView<T, D>(chosen_) : encoder_teacher.output(), *refresh);
    images_.resize({2 * B, x1.size(1), x1.size(2), x1.size(3)});
    copy(x1, TensorView<T, D>(images_).rows(0, B));
    copy(x2, TensorView<T, D>(images_).rows(B, 2 * B));
  }

  /// Student side against the targets of the last prepare_targets(): prototypes from the
  /// codebook snapshot, both masking rounds forward and backward, generator backward. Adds
  /// `scale` × the gradients of the loss to the parameter gradients (not zeroed here) and
  /// returns the unscaled losses.
  MocaStepResult student_forward_backward(const MaskPlan& masks, double scale = 1.0) {
    values_.clear();
    const RoundLosses losses = queue_student_forward_backward(masks, scale);
    values_.read();
    MocaStepResult res;
    for (int r = 0; r < 2; ++r) {
      res.l_img_round[r] = values_[losses.img[r]];
      res.l_loc_round[r] = values_[losses.loc[r]];
    }
    res.l_img = res.l_img_round[0] + res.l_img_round[1];
    res.l_loc = res.l_loc_round[0] + res.l_loc_round[1];
    res.loss = cfg_.img_weight * res.l_img + cfg_.loc_weight * res.l_loc;
    return res;
  }

 private:
  // One micro-batch's losses, per masking round, as values of values_.
  struct RoundLosses {
    typename PendingValues<D>::Ticket img[2], loc[2];
  };

  // student_forward_backward with the losses left in values_.
  RoundLosses queue_student_forward_backward(const MaskPlan& masks, double scale) {
    const std::int64_t N = images_.size(0), L = cfg_.encoder.num_patches();
    MOCA_CHECK(masks.s[0].size(0) == N && masks.s[0].size(1) == L && masks.s[1].size(0) == N,
               "MOCA: masks for ", masks.s[0].size(0), " rows of ", masks.s[0].size(1),
               " patches, the step has ", N, " rows of ", L);
    RoundLosses res;
    const Codebook<T, D>& cb = codebook();
    const TensorView<T, D> Wb = encoder_pred.forward(cb.words());
    const TensorView<T, D> Wd = decoder_pred.forward(cb.words());
    dWb_.resize(Wb.shape());
    dWd_.resize(Wd.shape());
    ops::zero(TensorView<T, D>(dWb_));
    ops::zero(TensorView<T, D>(dWd_));
    for (int r = 0; r < 2; ++r) student_round(r, N / 2, masks, Wb, Wd, scale, res);
    encoder_pred.backward(dWb_);
    decoder_pred.backward(dWd_);
    return res;
  }

  // Forward and backward of one masking round; accumulates parameter gradients, dW^b and dW^d.
  void student_round(int r, std::int64_t B, const MaskPlan& masks, const TensorView<T, D>& Wb,
                     const TensorView<T, D>& Wd, double scale, RoundLosses& res) {
    const std::int64_t N = 2 * B, L = cfg_.encoder.num_patches(), C = cfg_.encoder.dim;
    const std::int64_t K = cfg_.num_words, Dd = cfg_.decoder.dim;
    const std::int64_t lk = lengths_.lk[r], ld = lengths_.ld[r], S = 1 + lk;
    const T kappa = static_cast<T>(cfg_.kappa);
    masks.visible(r, visible_);
    masks.decoded(r, decoded_);
    TensorView<Index, Cpu> visible = visible_;
    encoder.forward(images_, &visible);
    const TensorView<T, D> last = encoder.output(0), mid = encoder.output(cfg_.early_layer);

    // Global embedding g [N, C]: mean of the visible patch tokens (or the class token).
    g_.resize({N, C});
    if (cfg_.avg_pooling) {
      patches_.resize({N, lk, C});
      ops::copy_strided(ops::strided_batch(last, C, lk, C, C, S * C, N),
                        ops::strided_batch(TensorView<T, D>(patches_), 0, lk, C, C, lk * C, N));
      ops::mean(TensorView<T, D>(patches_), 1, TensorView<T, D>(g_));
    } else {
      ops::copy_strided(ops::strided_batch(last, 0, 1, C, C, S * C, N),
                        ops::strided_batch(TensorView<T, D>(g_), 0, 1, C, C, C, N));
    }

    // L_IMG: KL(Y ‖ softmax(κ g W^bᵀ)), batch-mean over the N rows.
    logits_.resize({N, K});
    ops::gemm(TensorView<T, D>(g_), Trans::N, Wb, Trans::T, TensorView<T, D>(logits_), kappa, 0);
    res.img[r] = kl_.forward_backward(logits_, bows_, logits_,  // now dlogits
                                      scale * cfg_.img_weight, values_);
    dg_.resize({N, C});
    ops::gemm(TensorView<T, D>(logits_), Trans::N, Wb, Trans::N, TensorView<T, D>(dg_), kappa, 0);
    ops::gemm(TensorView<T, D>(logits_), Trans::T, TensorView<T, D>(g_), Trans::N,
              TensorView<T, D>(dWb_), kappa, 1);

    // L_LOC: the decoder's predictions at the ld positions vs the same-view codes there.
    TensorView<Index, Cpu> decoded = decoded_;
    const TensorView<T, D> out = decoder.forward(g_, mid, decoded);  // [N·ld, Dd]
    set_target_rows(N, L, ld);
    loc_logits_.resize({N * ld, K});
    ops::gemm(out, Trans::N, Wd, Trans::T, TensorView<T, D>(loc_logits_), kappa, 0);
    res.loc[r] = kl_.forward_backward(  // the targets read in place from Q
        loc_logits_, TensorView<T, D>(codes_).reshape({N * L, K}), target_rows_, loc_logits_,
        scale * cfg_.loc_weight, values_);
    dout_.resize({N * ld, Dd});
    ops::gemm(TensorView<T, D>(loc_logits_), Trans::N, Wd, Trans::N, TensorView<T, D>(dout_),
              kappa, 0);
    ops::gemm(TensorView<T, D>(loc_logits_), Trans::T, out, Trans::N, TensorView<T, D>(dWd_), kappa,
              1);
    dmid_.resize({N, S, C});
    decoder.backward(dout_, dg_, dmid_);  // adds the decoder's share to dg

    // Back into the encoder: g's gradient spread over the visible tokens (or the class token).
    dlast_.resize({N, S, C});
    ops::zero(TensorView<T, D>(dlast_));
    if (cfg_.avg_pooling) {
      ops::scale(TensorView<T, D>(dg_), 1.0 / static_cast<double>(lk));
      ops::copy_strided(ops::strided_batch(TensorView<T, D>(dg_), 0, lk, C, 0, C, N),
                        ops::strided_batch(TensorView<T, D>(dlast_), C, lk, C, C, S * C, N));
    } else {
      ops::copy_strided(ops::strided_batch(TensorView<T, D>(dg_), 0, 1, C, C, C, N),
                        ops::strided_batch(TensorView<T, D>(dlast_), 0, 1, C, C, S * C, N));
    }
    encoder.backward({{0, dlast_}, {cfg_.early_layer, dmid_}});
  }

  // Rows of Q [N·L, K] holding the codes of each decoded position: n·L + s_r[n, j].
  void set_target_rows(std::int64_t N, std::int64_t L, std::int64_t ld) {
    host_rows_.resize({N * ld});
    for (std::int64_t n = 0; n < N; ++n)
      for (std::int64_t j = 0; j < ld; ++j)
        host_rows_(n * ld + j) = static_cast<Index>(n * L + decoded_(n, j));
    target_rows_.resize({N * ld});
    copy(TensorView<Index, Cpu>(host_rows_), TensorView<Index, D>(target_rows_));
  }

  MaskLengths lengths_;
  ParameterStore<T, D> params_, teacher_params_;
  EmaLink<T, D> ema_;
  AdamW<T, D> optimizer_;
  ParamGroups groups_;
  KlDivergence<T, D> kl_;
  PendingValues<D> values_;
  std::vector<RoundLosses> micro_losses_;
  Tensor<Index, Cpu> visible_, decoded_, host_rows_;
  Tensor<Index, D> target_rows_;
  Tensor<T, D> codes_, bows_, chosen_, images_, dWb_, dWd_, g_, patches_, logits_, dg_,
      loc_logits_, dout_, dmid_, dlast_;
};

}  // namespace moca
