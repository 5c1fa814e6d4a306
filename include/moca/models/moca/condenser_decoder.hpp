// The condenser decoder of MOCA (spec §6.4): from the student's global embedding g [N, D] and its
// intermediate tokens Z_mid [N, 1 + lk, D] (raw output of block depth − 1 − early_layer) it
// predicts features at ld positions of the patch grid:
//   U   = (g, LN_c(Z_mid[:, 1:]))            the intermediate's class token is discarded
//   V   = Emb(U)                              [N, 1 + lk, Dd]
//   seq = (V0 + Pd[0], V[1:] + Pd[1 + s[:lk]], mask_token + Pd[1 + s[lk:ld]])
//   out = LN_d(blocks(seq))[:, 1:]            [N·ld, Dd], positions in s order (partial decoding)
// Parameter names are the official top-level ones (norm_cls_pt, decoder_embed_cls_pt,
// mask_token_cls_pt, decoder_pos_embed, decoder_blocks_cls_pt.i, decoder_norm_cls_pt), so the
// model lists them through its own visit (see visit_flat).
#pragma once

#include <cstdint>
#include <vector>

#include "moca/core/profiler.hpp"
#include "moca/nn/block.hpp"
#include "moca/nn/layer_norm.hpp"
#include "moca/nn/linear.hpp"
#include "moca/nn/parameter.hpp"
#include "moca/ops.hpp"

namespace moca {

struct DecoderConfig {
  std::int64_t dim = 512;    ///< Dd
  std::int64_t depth = 2;
  std::int64_t heads = 16;
  double mlp_ratio = 4.0;
  double norm_eps = 1e-6;
  BlockConfig block() const {
    return {dim, heads, static_cast<std::int64_t>(static_cast<double>(dim) * mlp_ratio), norm_eps};
  }
};

template <class T, class D = Cpu, class BlockT = Block<T, D>>
  requires TransformerBlock<BlockT, T, D>
class CondenserDecoder {
 public:
  LayerNorm<T, D> norm_cls_pt;            ///< LN_c over the encoder width
  Linear<T, D> decoder_embed_cls_pt;      ///< Emb: D → Dd
  Param<T, D> mask_token_cls_pt;          ///< [1, 1, Dd], N(0, 0.02)
  Param<T, D> decoder_pos_embed;          ///< [1, 1 + L, Dd], fixed sin-cos
  std::vector<BlockT> decoder_blocks_cls_pt;
  LayerNorm<T, D> decoder_norm_cls_pt;    ///< LN_d

  CondenserDecoder() = default;
  CondenserDecoder(std::int64_t encoder_dim, std::int64_t grid, const DecoderConfig& cfg)
      : norm_cls_pt(encoder_dim, cfg.norm_eps),
        decoder_embed_cls_pt(encoder_dim, cfg.dim),
        decoder_norm_cls_pt(cfg.dim, cfg.norm_eps),
        enc_dim_(encoder_dim),
        dim_(cfg.dim),
        L_(grid * grid) {
    mask_token_cls_pt.declare({1, 1, cfg.dim}, Init::normal(0.02));
    decoder_pos_embed.declare({1, 1 + L_, cfg.dim}, Init::sincos_2d(grid, true), false);
    for (std::int64_t i = 0; i < cfg.depth; ++i) decoder_blocks_cls_pt.emplace_back(cfg.block());
  }

  /// Lists the parameters under their official top-level names (no prefix of its own).
  template <class V>
  void visit_flat(V&& v) {
    v("decoder_pos_embed", decoder_pos_embed);
    v("norm_cls_pt", norm_cls_pt);
    v("decoder_embed_cls_pt", decoder_embed_cls_pt);
    v("mask_token_cls_pt", mask_token_cls_pt);
    v("decoder_blocks_cls_pt", decoder_blocks_cls_pt);
    v("decoder_norm_cls_pt", decoder_norm_cls_pt);
  }
  template <class V>
  void visit(V&& v) {
    visit_flat(v);
  }

  std::int64_t dim() const { return dim_; }

  /// g [N, D], mid [N, 1 + lk, D], decoded [N, ld] (patch ids, host; the first lk are the
  /// visible ones in the encoder's order). Returns out [N·ld, Dd], valid until the next forward.
  TensorView<T, D> forward(const TensorView<T, D>& g, const TensorView<T, D>& mid,
                           const TensorView<Index, Cpu>& decoded) {
    MOCA_PROFILE_SCOPE("decoder");
    const std::int64_t N = mid.size(0), lk = mid.size(1) - 1, ld = decoded.size(1);
    const std::int64_t Dm = enc_dim_, Dd = dim_, S = 1 + ld;
    MOCA_CHECK(g.shape() == Shape({N, Dm}) && mid.rank() == 3 && mid.size(2) == Dm &&
                   decoded.size(0) == N && ld > lk && ld <= L_,
               "decoder: global ", g.shape(), ", intermediate ", mid.shape(), " and positions ",
               decoded.shape(), " do not fit (need [N, ", Dm, "], [N, 1 + lk, ", Dm,
               "], [N, ld] with lk < ld ≤ ", L_, ")");
    lk_ = lk;
    // U = (g, LN_c(mid[:, 1:]))
    mid_tokens_.resize({N, lk, Dm});
    ops::copy_strided(ops::strided_batch(mid, Dm, lk, Dm, Dm, (1 + lk) * Dm, N),
                      ops::strided_batch(TensorView<T, D>(mid_tokens_), 0, lk, Dm, Dm, lk * Dm, N));
    u_.resize({N, 1 + lk, Dm});
    normed_.resize({N, lk, Dm});
    norm_cls_pt.forward(mid_tokens_, normed_);
    ops::copy_strided(ops::strided_batch(g, 0, 1, Dm, Dm, Dm, N),
                      ops::strided_batch(TensorView<T, D>(u_), 0, 1, Dm, Dm, (1 + lk) * Dm, N));
    ops::copy_strided(
        ops::strided_batch(TensorView<T, D>(normed_), 0, lk, Dm, Dm, lk * Dm, N),
        ops::strided_batch(TensorView<T, D>(u_), Dm, lk, Dm, Dm, (1 + lk) * Dm, N));
    v_.resize({N, 1 + lk, Dd});
    decoder_embed_cls_pt.forward(u_, v_);
    // The sequence: global token, embedded visible tokens, mask tokens; then positions.
    stream_.resize(decoder_blocks_cls_pt.size() + 1);
    for (auto& x : stream_) x.resize({N, S, Dd});
    TensorView<T, D> seq = stream_[0];
    ops::copy_strided(ops::strided_batch(TensorView<T, D>(v_), 0, 1 + lk, Dd, Dd, (1 + lk) * Dd, N),
                      ops::strided_batch(seq, 0, 1 + lk, Dd, Dd, S * Dd, N));
    ops::copy_strided(ops::strided_batch(mask_token_cls_pt.value, 0, ld - lk, Dd, 0, 0, N),
                      ops::strided_batch(seq, (1 + lk) * Dd, ld - lk, Dd, Dd, S * Dd, N));
    set_position_rows(decoded);
    pos_.resize({N, S, Dd});
    ops::gather_rows(decoder_pos_embed.value.reshape({1 + L_, Dd}), TensorView<Index, D>(pos_rows_),
                     TensorView<T, D>(pos_).reshape({N * S, Dd}));
    ops::add(seq, TensorView<T, D>(pos_), seq);
    for (std::size_t i = 0; i < decoder_blocks_cls_pt.size(); ++i)
      decoder_blocks_cls_pt[i].forward(stream_[i], stream_[i + 1]);
    final_.resize({N, S, Dd});
    decoder_norm_cls_pt.forward(stream_.back(), final_);
    out_.resize({N, ld, Dd});
    ops::copy_strided(ops::strided_batch(TensorView<T, D>(final_), Dd, ld, Dd, Dd, S * Dd, N),
                      ops::strided_batch(TensorView<T, D>(out_), 0, ld, Dd, Dd, ld * Dd, N));
    return TensorView<T, D>(out_).reshape({N * ld, Dd});
  }

  /// dout [N·ld, Dd] → adds to dg [N, D] and writes dmid [N, 1 + lk, D] (class row zero).
  /// Accumulates parameter gradients.
  void backward(const TensorView<T, D>& dout, const TensorView<T, D>& dg,
                const TensorView<T, D>& dmid) {
    MOCA_PROFILE_SCOPE("decoder");
    const Shape s = final_.shape();
    const std::int64_t N = s[0], S = s[1], ld = S - 1, lk = lk_, Dm = enc_dim_, Dd = dim_;
    MOCA_CHECK(dout.numel() == N * ld * Dd && dg.shape() == Shape({N, Dm}) &&
                   dmid.shape() == Shape({N, 1 + lk, Dm}),
               "decoder backward: gradient shapes ", dout.shape(), ", ", dg.shape(), ", ",
               dmid.shape(), " do not match the last forward");
    dseq_.resize(s);
    dscratch_.resize(s);
    ops::zero(TensorView<T, D>(dscratch_));
    ops::copy_strided(ops::strided_batch(dout, 0, ld, Dd, Dd, ld * Dd, N),
                      ops::strided_batch(TensorView<T, D>(dscratch_), Dd, ld, Dd, Dd, S * Dd, N));
    decoder_norm_cls_pt.backward(stream_.back(), dscratch_, dseq_);
    // Every block runs its backward on block 0's scratch (SwapsScratch), lent and returned, as
    // in the encoder.
    auto& blocks = decoder_blocks_cls_pt;
    for (std::size_t i = blocks.size(); i-- > 0;) {
      if (i > 0) swap_scratch_if_possible(blocks[0], blocks[i]);
      blocks[i].backward(stream_[i], dseq_, dseq_);
      if (i > 0) swap_scratch_if_possible(blocks[0], blocks[i]);
    }
    // Mask tokens: Σ over images and masked positions. Positions are frozen.
    if (!mask_token_cls_pt.grad.empty()) {
      dmask_.resize({N, ld - lk, Dd});
      ops::copy_strided(ops::strided_batch(TensorView<T, D>(dseq_), (1 + lk) * Dd, ld - lk, Dd, Dd, S * Dd, N),
                        ops::strided_batch(TensorView<T, D>(dmask_), 0, ld - lk, Dd, Dd, (ld - lk) * Dd, N));
      ops::sum(TensorView<T, D>(dmask_).reshape({N * (ld - lk), Dd}), 0,
               mask_token_cls_pt.grad.flat(), 1, 1);
    }
    dv_.resize({N, 1 + lk, Dd});
    ops::copy_strided(ops::strided_batch(TensorView<T, D>(dseq_), 0, 1 + lk, Dd, Dd, S * Dd, N),
                      ops::strided_batch(TensorView<T, D>(dv_), 0, 1 + lk, Dd, Dd, (1 + lk) * Dd, N));
    du_.resize({N, 1 + lk, Dm});
    decoder_embed_cls_pt.backward(u_, dv_, du_);
    // U[:, 0] is g (no LN_c); U[:, 1:] = LN_c(mid[:, 1:]).
    dg_part_.resize({N, Dm});
    ops::copy_strided(ops::strided_batch(TensorView<T, D>(du_), 0, 1, Dm, Dm, (1 + lk) * Dm, N),
                      ops::strided_batch(TensorView<T, D>(dg_part_), 0, 1, Dm, Dm, Dm, N));
    ops::add(dg, TensorView<T, D>(dg_part_), dg);
    dnormed_.resize({N, lk, Dm});
    ops::copy_strided(ops::strided_batch(TensorView<T, D>(du_), Dm, lk, Dm, Dm, (1 + lk) * Dm, N),
                      ops::strided_batch(TensorView<T, D>(dnormed_), 0, lk, Dm, Dm, lk * Dm, N));
    norm_cls_pt.backward(mid_tokens_, dnormed_, dnormed_);
    ops::zero(dmid);
    ops::copy_strided(ops::strided_batch(TensorView<T, D>(dnormed_), 0, lk, Dm, Dm, lk * Dm, N),
                      ops::strided_batch(dmid, Dm, lk, Dm, Dm, (1 + lk) * Dm, N));
  }

 private:
  // Rows of the position table for each sequence slot: 0 for the global token, 1 + patch id.
  void set_position_rows(const TensorView<Index, Cpu>& decoded) {
    const std::int64_t N = decoded.size(0), ld = decoded.size(1), S = 1 + ld;
    host_pos_.resize({N * S});
    for (std::int64_t n = 0; n < N; ++n) {
      host_pos_(n * S) = 0;
      for (std::int64_t j = 0; j < ld; ++j) {
        const Index p = decoded(n, j);
        MOCA_CHECK(p >= 0 && p < L_, "decoder: position ", p, " out of range for ", L_,
                   " patches");
        host_pos_(n * S + 1 + j) = static_cast<Index>(1 + p);
      }
    }
    pos_rows_.resize({N * S});
    copy(TensorView<Index, Cpu>(host_pos_), TensorView<Index, D>(pos_rows_));
  }

  std::int64_t enc_dim_ = 0, dim_ = 0, L_ = 0, lk_ = 0;
  Tensor<Index, Cpu> host_pos_;
  Tensor<Index, D> pos_rows_;
  Tensor<T, D> mid_tokens_, normed_, u_, v_, pos_, final_, out_;
  std::vector<Tensor<T, D>> stream_;
  Tensor<T, D> dseq_, dscratch_, dmask_, dv_, du_, dg_part_, dnormed_;
};

}  // namespace moca
