// VisionTransformer: the ViT encoder of MOCA (student and teacher) and of the evaluation
// protocols, exact to timm's VisionTransformer as MOCA uses it (spec §1):
//
//   patch embed → + fixed sin-cos positions → (optional masking: keep listed patches, in the
//   given order) → prepend class token → blocks → final LayerNorm on the last block only.
//
//   VisionTransformer<float> vit(VitConfig::tiny());
//   ParameterStore<float> params(vit);   // the flat arena; binds vit's parameters
//   params.initialize(seed);             // spec §1.6
//   vit.forward(images);                 // or vit.forward(images, &keep) with keep [N, K]
//   auto out = vit.output();             // [N, 1 + K, dim], after the final norm
//   vit.backward({{0, d_out}});          // gradients into params.grads()
//   vit.forward_inference(images);       // output(0) only, no backward: memory flat in depth
//
// Outputs are addressed by an offset counted from the end (spec §1.5): offset 0 is the last block
// after the final norm; offset k > 0 is the raw residual stream after block depth − 1 − k.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "moca/core/profiler.hpp"
#include "moca/nn/block.hpp"
#include "moca/nn/layer_norm.hpp"
#include "moca/nn/parameter.hpp"
#include "moca/nn/patch_embed.hpp"
#include "moca/ops.hpp"

namespace moca {

/// Sizes of a ViT. Every field is a runtime value: one program runs every preset.
struct VitConfig {
  std::int64_t img_size = 224;
  std::int64_t patch = 16;
  std::int64_t in_chans = 3;
  std::int64_t dim = 768;
  std::int64_t depth = 12;
  std::int64_t heads = 12;
  double mlp_ratio = 4.0;
  double norm_eps = 1e-6;

  std::int64_t grid() const { return img_size / patch; }
  std::int64_t num_patches() const { return grid() * grid(); }
  std::int64_t mlp_hidden() const { return static_cast<std::int64_t>(static_cast<double>(dim) * mlp_ratio); }
  BlockConfig block() const { return {dim, heads, mlp_hidden(), norm_eps}; }

  /// Checks the sizes fit together; throws moca::Error naming the offending values.
  void validate() const {
    MOCA_CHECK(img_size > 0 && patch > 0 && img_size % patch == 0, "ViT: image size ", img_size,
               " is not a multiple of the patch size ", patch);
    MOCA_CHECK(in_chans > 0 && depth > 0, "ViT: need at least one channel and one block (got ",
               in_chans, " channels, depth ", depth, ")");
    MOCA_CHECK(heads > 0 && dim % heads == 0, "ViT: width ", dim, " is not divisible by ", heads,
               " heads");
    MOCA_CHECK(dim % 4 == 0, "ViT: width ", dim, " must be a multiple of 4 (sin-cos positions)");
    MOCA_CHECK(mlp_hidden() > 0, "ViT: MLP ratio ", mlp_ratio, " gives no hidden units");
  }

  /// The project's Fashion-MNIST preset (spec §16): 32×32 grey, patch 4, 192 wide, 6 deep.
  static VitConfig tiny() { return {32, 4, 1, 192, 6, 3, 4.0, 1e-6}; }
  /// ViT-S/16 (384 wide, 12 deep, 6 heads).
  static VitConfig vit_s16() { return {224, 16, 3, 384, 12, 6, 4.0, 1e-6}; }
  /// ViT-B/16 (768 wide, 12 deep, 12 heads).
  static VitConfig vit_b16() { return {224, 16, 3, 768, 12, 12, 4.0, 1e-6}; }
  /// ViT-L/16 (1024 wide, 24 deep, 16 heads).
  static VitConfig vit_l16() { return {224, 16, 3, 1024, 24, 16, 4.0, 1e-6}; }
};

template <class T, class D = Cpu, class BlockT = Block<T, D>>
  requires TransformerBlock<BlockT, T, D>
class VisionTransformer {
  VitConfig cfg_;  // first member: validated before any part is built

 public:
  /// A gradient flowing into one output (offset counted from the end, as output()).
  struct OutputGrad {
    std::int64_t offset;
    TensorView<T, D> grad;
  };

  Param<T, D> cls_token;  ///< [1, 1, dim], N(0, 0.02)
  Param<T, D> pos_embed;  ///< [1, 1 + L, dim], fixed sin-cos, not trained
  PatchEmbed<T, D> patch_embed;
  std::vector<BlockT> blocks;
  LayerNorm<T, D> norm;

  VisionTransformer() = default;
  explicit VisionTransformer(const VitConfig& cfg)
      : cfg_((cfg.validate(), cfg)),
        patch_embed(cfg.in_chans, cfg.patch, cfg.dim),
        norm(cfg.dim, cfg.norm_eps) {
    cls_token.declare({1, 1, cfg.dim}, Init::normal(0.02));
    pos_embed.declare({1, 1 + cfg.num_patches(), cfg.dim}, Init::sincos_2d(cfg.grid(), true),
                      /*trainable=*/false);
    blocks.reserve(static_cast<std::size_t>(cfg.depth));
    for (std::int64_t i = 0; i < cfg.depth; ++i) blocks.emplace_back(cfg.block());
  }

  /// Parameters in timm's state-dict order.
  template <class V>
  void visit(V&& v) {
    v("cls_token", cls_token);
    v("pos_embed", pos_embed);
    v("patch_embed", patch_embed);
    v("blocks", blocks);
    v("norm", norm);
  }

  const VitConfig& config() const { return cfg_; }
  std::int64_t depth() const { return cfg_.depth; }

  /// Runs the encoder on images [N, C, H, W]. With `keep` [N, K] (patch indices on the host),
  /// only those patches enter, in the given order, after their positions were added.
  void forward(const TensorView<T, D>& images, const TensorView<Index, Cpu>* keep = nullptr) {
    const std::int64_t S = embed(images, keep);
    const std::int64_t N = images.size(0);
    stream_.resize(static_cast<std::size_t>(cfg_.depth) + 1);
    for (auto& x : stream_) x.resize({N, S, cfg_.dim});
    write_sequence(stream_[0]);
    for (std::size_t i = 0; i < blocks.size(); ++i) blocks[i].forward(stream_[i], stream_[i + 1]);
    finish(stream_.back());
    inference_ = false;
  }

  /// The same output(0) as forward, for a pass that no backward follows (the MOCA teacher,
  /// feature extraction), in memory that does not grow with depth: every block borrows block 0's
  /// activation buffers in turn (blocks that can trade them, SwapsBuffers) and the residual
  /// stream alternates between two buffers. Afterwards only output(0) is valid, and block 0's
  /// buffers hold the last block's activations: backward needs a forward first.
  void forward_inference(const TensorView<T, D>& images,
                         const TensorView<Index, Cpu>* keep = nullptr) {
    const std::int64_t S = embed(images, keep);
    const std::int64_t N = images.size(0);
    for (auto& x : pass_) x.resize({N, S, cfg_.dim});
    write_sequence(pass_[0]);
    for (std::size_t i = 0; i < blocks.size(); ++i) {
      if (i > 0) swap_buffers_if_possible(blocks[0], blocks[i]);
      blocks[i].forward(pass_[i % 2], pass_[(i + 1) % 2]);
      if (i > 0) swap_buffers_if_possible(blocks[0], blocks[i]);
    }
    finish(pass_[blocks.size() % 2]);
    inference_ = true;
  }

  /// The output at `offset` from the end: 0 = last block after the final norm, k = raw output of
  /// block depth − 1 − k. Valid until the next forward.
  TensorView<T, D> output(std::int64_t offset = 0) const {
    MOCA_CHECK(offset >= 0 && offset < cfg_.depth, "ViT: output offset ", offset,
               " out of range for depth ", cfg_.depth);
    if (offset == 0) return out_;
    MOCA_CHECK(!inference_, "ViT: output offset ", offset,
               " is not kept by forward_inference (only offset 0 is)");
    return stream_[static_cast<std::size_t>(cfg_.depth - offset)];
  }

  /// Backpropagates gradients given for any outputs of the last forward (offsets as output()).
  /// Accumulates into the parameter gradients; writes d_images unless it is an empty view.
  void backward(std::span<const OutputGrad> grads, const TensorView<T, D>& d_images = {}) {
    MOCA_PROFILE_SCOPE("vit tokens");
    MOCA_CHECK(!inference_, "ViT backward: the last forward was forward_inference, which keeps "
               "nothing for backward");
    const Shape shape = out_.shape();
    const std::int64_t N = shape[0], S = shape[1], dim = cfg_.dim, K = S - 1;
    for (const OutputGrad& g : grads)
      MOCA_CHECK(g.grad.shape() == shape && g.offset >= 0 && g.offset < cfg_.depth,
                 "ViT backward: gradient ", g.grad.shape(), " at offset ", g.offset,
                 " does not match the output ", shape, " of depth ", cfg_.depth);
    dstream_.resize(shape);
    dscratch_.resize(shape);
    TensorView<T, D> dx = dstream_;
    ops::zero(dx);
    for (const OutputGrad& g : grads)
      if (g.offset == 0) {
        norm.backward(stream_.back(), g.grad, dscratch_);
        ops::add(dx, TensorView<T, D>(dscratch_), dx);
      }
    for (std::int64_t i = cfg_.depth - 1; i >= 0; --i) {
      for (const OutputGrad& g : grads)
        if (g.offset > 0 && cfg_.depth - g.offset == i + 1) {
          ops::add(dx, g.grad, dx);
        }
      // Every block runs its backward on block 0's scratch (SwapsScratch), lent and returned.
      const auto b = static_cast<std::size_t>(i);
      if (b > 0) swap_scratch_if_possible(blocks[0], blocks[b]);
      blocks[b].backward(stream_[b], dx, dx);
      if (b > 0) swap_scratch_if_possible(blocks[0], blocks[b]);
    }
    // Class token: Σ over the batch of row 0.
    if (!cls_token.grad.empty()) {
      dcls_.resize({N, dim});
      ops::copy_strided(ops::strided_batch(dx, 0, 1, dim, dim, S * dim, N),
                        ops::strided_batch(TensorView<T, D>(dcls_), 0, 1, dim, dim, dim, N));
      ops::sum(TensorView<T, D>(dcls_), 0, cls_token.grad.flat(), 1, 1);
    }
    // Patch tokens: back through the mask (a scatter), then the patch embedding.
    const std::int64_t L = cfg_.num_patches();
    dtokens_.resize({N, L, dim});
    if (masked_) {
      dkept_.resize({N, K, dim});
      ops::copy_strided(ops::strided_batch(dx, dim, K, dim, dim, S * dim, N),
                        ops::strided_batch(TensorView<T, D>(dkept_), 0, K, dim, dim, K * dim, N));
      ops::zero(TensorView<T, D>(dtokens_));
      ops::scatter_add_rows(TensorView<T, D>(dkept_).reshape({N * K, dim}),
                            TensorView<Index, D>(index_),
                            TensorView<T, D>(dtokens_).reshape({N * L, dim}));
    } else {
      ops::copy_strided(ops::strided_batch(dx, dim, L, dim, dim, S * dim, N),
                        ops::strided_batch(TensorView<T, D>(dtokens_), 0, L, dim, dim, L * dim, N));
    }
    patch_embed.backward(dtokens_, d_images);
  }

  void backward(std::initializer_list<OutputGrad> grads, const TensorView<T, D>& d_images = {}) {
    backward(std::span<const OutputGrad>(grads.begin(), grads.size()), d_images);
  }

 private:
  // Patch embedding, positions and masking into kept_ (or tokens_); returns the sequence length
  // 1 + K.
  std::int64_t embed(const TensorView<T, D>& images, const TensorView<Index, Cpu>* keep) {
    MOCA_PROFILE_SCOPE("vit tokens");
    const std::int64_t N = images.size(0), L = cfg_.num_patches(), dim = cfg_.dim;
    MOCA_CHECK(images.rank() == 4 && images.size(1) == cfg_.in_chans &&
                   images.size(2) == cfg_.img_size && images.size(3) == cfg_.img_size,
               "ViT: expected images [N, ", cfg_.in_chans, ", ", cfg_.img_size, ", ",
               cfg_.img_size, "], got ", images.shape());
    masked_ = keep != nullptr;
    const std::int64_t K = masked_ ? keep->size(1) : L;
    if (masked_) set_keep_indices(*keep, N, L);
    tokens_.resize({N, L, dim});
    patch_embed.forward(images, tokens_);
    // Positions are added before masking, so kept tokens carry their original positions.
    ops::add_bias(TensorView<T, D>(tokens_).reshape({N, L * dim}),
                  pos_embed.value.flat().rows(dim, (1 + L) * dim));
    if (masked_) {
      kept_.resize({N, K, dim});
      ops::gather_rows(TensorView<T, D>(tokens_).reshape({N * L, dim}),
                       TensorView<Index, D>(index_), TensorView<T, D>(kept_).reshape({N * K, dim}));
    }
    return 1 + K;
  }

  // The block input x0 [N, 1 + K, dim]: class token (+ the zero position row 0), then the tokens.
  void write_sequence(const TensorView<T, D>& x0) {
    MOCA_PROFILE_SCOPE("vit tokens");
    const std::int64_t N = x0.size(0), S = x0.size(1), K = S - 1, dim = cfg_.dim;
    const TensorView<T, D> kept = masked_ ? TensorView<T, D>(kept_) : TensorView<T, D>(tokens_);
    ops::copy_strided(ops::strided_batch(cls_token.value, 0, 1, dim, 0, 0, N),
                      ops::strided_batch(x0, 0, 1, dim, dim, S * dim, N));
    ops::copy_strided(ops::strided_batch(kept, 0, K, dim, dim, K * dim, N),
                      ops::strided_batch(x0, dim, K, dim, dim, S * dim, N));
  }

  // The final norm of the last block's output into out_.
  void finish(const TensorView<T, D>& last) {
    out_.resize(last.shape());
    norm.forward(last, out_);
  }

  // Row indices into the [N·L, dim] token matrix for keep [N, K]: n·L + keep[n, k].
  void set_keep_indices(const TensorView<Index, Cpu>& keep, std::int64_t N, std::int64_t L) {
    MOCA_CHECK(keep.rank() == 2 && keep.size(0) == N && keep.size(1) >= 1 && keep.size(1) <= L,
               "ViT: keep indices ", keep.shape(), " do not fit ", N, " images of ", L,
               " patches");
    const std::int64_t K = keep.size(1);
    host_index_.resize({N * K});
    for (std::int64_t n = 0; n < N; ++n)
      for (std::int64_t k = 0; k < K; ++k) {
        const Index p = keep(n, k);
        MOCA_CHECK(p >= 0 && p < L, "ViT: keep index ", p, " (image ", n, ", position ", k,
                   ") out of range for ", L, " patches");
        host_index_(n * K + k) = static_cast<Index>(n * L + p);
      }
    index_.resize({N * K});
    copy(TensorView<Index, Cpu>(host_index_), TensorView<Index, D>(index_));
  }

  bool masked_ = false;
  Tensor<Index, Cpu> host_index_;
  Tensor<Index, D> index_;
  Tensor<T, D> tokens_, kept_, out_;
  std::vector<Tensor<T, D>> stream_;  // residual stream: input of block 0, output of every block
  Tensor<T, D> pass_[2];              // forward_inference's residual stream, alternating
  bool inference_ = false;            // the last forward was forward_inference
  Tensor<T, D> dstream_, dscratch_, dcls_, dkept_, dtokens_;
};

}  // namespace moca
