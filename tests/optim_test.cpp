// Optimisation: parameter groups, AdamW and SGD against double-precision references and PyTorch
// numbers, schedules (spec §11.7 test vectors), gradient clipping, the teacher EMA, and the
// ViT-B/16 parameter count (spec §10).
#include <cmath>
#include <moca/models/vit.hpp>
#include <moca/nn/linear.hpp>
#include <moca/optim/adamw.hpp>
#include <moca/optim/clip.hpp>
#include <moca/optim/ema.hpp>
#include <moca/optim/param_groups.hpp>
#include <moca/optim/schedules.hpp>
#include <moca/optim/sgd.hpp>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "reference.hpp"

using namespace moca;
using namespace moca::test;

namespace {

/// A small encoder: 8×8 grey images, patch 4, width 16, depth 2.
VitConfig small_vit() { return {8, 4, 1, 16, 2, 2, 4.0, 1e-6}; }

/// The parameter layout of a MOCA model in miniature (spec §0.1, §11.6 names): a student encoder,
/// both generators with frozen scale and BN running stats, and decoder pieces.
template <class T>
struct MiniMoca {
  VisionTransformer<T> encoder;
  Param<T> pred_scale, pred_fc_w, pred_bn_w, pred_bn_b, pred_bn_mean, pred_last_w, pred_last_b;
  Param<T> decoder_pos_embed, mask_token;
  LayerNorm<T> norm_cls_pt;
  Linear<T> decoder_embed_cls_pt;
  Param<T> dpred_fc_w, dpred_bn_w, dpred_bn_b, dpred_last_w, dpred_last_b, dpred_skip_w,
      dpred_skip_b;

  MiniMoca() : encoder(small_vit()), norm_cls_pt(16), decoder_embed_cls_pt(16, 8) {
    pred_scale.declare({1}, Init::constant(3.0), false);
    pred_fc_w.declare({32, 16}, Init::normal(0.1));
    pred_bn_w.declare({32}, Init::ones());
    pred_bn_b.declare({32}, Init::zeros());
    pred_bn_mean.declare({32}, Init::zeros(), false);
    pred_last_w.declare({16, 32}, Init::normal(0.1));
    pred_last_b.declare({16}, Init::uniform(0.1));
    decoder_pos_embed.declare({1, 5, 8}, Init::sincos_2d(2, true), false);
    mask_token.declare({1, 1, 8}, Init::normal(0.02));
    dpred_fc_w.declare({32, 16}, Init::normal(0.1));
    dpred_bn_w.declare({32}, Init::ones());
    dpred_bn_b.declare({32}, Init::zeros());
    dpred_last_w.declare({8, 32}, Init::normal(0.1));
    dpred_last_b.declare({8}, Init::uniform(0.1));
    dpred_skip_w.declare({8, 16}, Init::normal(0.1));
    dpred_skip_b.declare({8}, Init::uniform(0.1));
  }

  template <class V>
  void visit(V&& v) {
    v("encoder", encoder);
    v("encoder_pred.scale", pred_scale);
    v("encoder_pred.layers_w.0.generator.b0_fc.weight", pred_fc_w);
    v("encoder_pred.layers_w.0.generator.b0_bn.weight", pred_bn_w);
    v("encoder_pred.layers_w.0.generator.b0_bn.bias", pred_bn_b);
    v("encoder_pred.layers_w.0.generator.b0_bn.running_mean", pred_bn_mean);
    v("encoder_pred.layers_w.0.generator.b0_last_layer.weight", pred_last_w);
    v("encoder_pred.layers_w.0.generator.b0_last_layer.bias", pred_last_b);
    v("decoder_pos_embed", decoder_pos_embed);
    v("norm_cls_pt", norm_cls_pt);
    v("decoder_embed_cls_pt", decoder_embed_cls_pt);
    v("mask_token_cls_pt", mask_token);
    v("decoder_pred.layers_w.0.generator.b0_fc.weight", dpred_fc_w);
    v("decoder_pred.layers_w.0.generator.b0_bn.weight", dpred_bn_w);
    v("decoder_pred.layers_w.0.generator.b0_bn.bias", dpred_bn_b);
    v("decoder_pred.layers_w.0.generator.b0_last_layer.weight", dpred_last_w);
    v("decoder_pred.layers_w.0.generator.b0_last_layer.bias", dpred_last_b);
    v("decoder_pred.layers_w.0.skip.weight", dpred_skip_w);
    v("decoder_pred.layers_w.0.skip.bias", dpred_skip_b);
  }
};

/// Two named tensors, a [2, 2] and b [3]: the layout of tests/python/optim_golden.py.
template <class T>
struct TwoTensors {
  Param<T> a, b;
  TwoTensors() {
    a.declare({2, 2}, Init::zeros());
    b.declare({3}, Init::zeros());
  }
  template <class V>
  void visit(V&& v) {
    v("a", a);
    v("b", b);
  }
};

/// Sets the values of TwoTensors to the golden scenario's start.
template <class T>
void set_golden_values(const ParameterStore<T>& store) {
  const double a[] = {0.5, -1.0, 1.5, 2.0}, b[] = {0.1, -0.2, 0.3};
  for (int i = 0; i < 4; ++i) store.view(*store.find("a")).data()[i] = static_cast<T>(a[i]);
  for (int i = 0; i < 3; ++i) store.view(*store.find("b")).data()[i] = static_cast<T>(b[i]);
}

/// The golden scenario's gradients of step k: a: sin(k + i), b: 0.5·cos(2k + i).
template <class T>
void set_golden_grads(const ParameterStore<T>& store, int k) {
  for (int i = 0; i < 4; ++i)
    store.grad_view(*store.find("a")).data()[i] = static_cast<T>(std::sin(k + i));
  for (int i = 0; i < 3; ++i)
    store.grad_view(*store.find("b")).data()[i] = static_cast<T>(0.5 * std::cos(2 * k + i));
}

/// Groups "g0" = {a}, "g1" = {b}.
template <class T>
ParamGroups golden_groups(const ParameterStore<T>& store, double lr0, double wd0, double lr1,
                          double wd1) {
  ParamGroups g = build_param_groups(
      store, [](std::string_view name, const Shape&) { return name == "a" ? "g0" : "g1"; },
      {"g0", "g1"});
  g["g0"].lr = lr0;
  g["g0"].weight_decay = wd0;
  g["g1"].lr = lr1;
  g["g1"].weight_decay = wd1;
  return g;
}

template <class T>
Vec entry_values(const ParameterStore<T>& store, const std::string& name) {
  return to_vec(store.view(*store.find(name)));
}

/// Random gradients for step k on the whole arena.
template <class T>
void random_grads(const ParameterStore<T>& store, int k) {
  fill_uniform(store.grads(), rng(), 1000 + static_cast<std::uint64_t>(k), -1.0, 1.0);
}

/// torch.optim.AdamW, written out in double over the arena, group by group.
struct RefAdamW {
  Vec p, m, v;
  std::int64_t step = 0;
  double b1 = 0.9, b2 = 0.999, eps = 1e-8;

  void run(const ParamGroups& groups, const Vec& g) {
    ++step;
    const double bc1 = 1.0 - std::pow(b1, static_cast<double>(step));
    const double bc2 = 1.0 - std::pow(b2, static_cast<double>(step));
    for (const ParamGroup& grp : groups)
      for (const ParamSegment& s : grp.segments)
        for (i64 i = s.offset; i < s.end(); ++i) {
          const auto k = static_cast<std::size_t>(i);
          p[k] *= 1.0 - grp.lr * grp.weight_decay;
          m[k] = b1 * m[k] + (1.0 - b1) * g[k];
          v[k] = b2 * v[k] + (1.0 - b2) * g[k] * g[k];
          const double denom = std::sqrt(v[k]) / std::sqrt(bc2) + eps;
          p[k] -= grp.lr / bc1 * m[k] / denom;
        }
  }
};

/// torch.optim.SGD, written out in double over the arena, group by group.
struct RefSgd {
  Vec p, buf;
  bool started = false;
  SgdConfig c;

  void run(const ParamGroups& groups, const Vec& g) {
    for (const ParamGroup& grp : groups)
      for (const ParamSegment& s : grp.segments)
        for (i64 i = s.offset; i < s.end(); ++i) {
          const auto k = static_cast<std::size_t>(i);
          double d = g[k] + grp.weight_decay * p[k];
          if (c.momentum != 0.0) {
            buf[k] = started ? c.momentum * buf[k] + (1.0 - c.dampening) * d : d;
            d = c.nesterov ? d + c.momentum * buf[k] : buf[k];
          }
          p[k] -= grp.lr * d;
        }
    started = true;
  }
};

/// encoder.* entries split by another module's entry.
struct Split {
  Param<float> a, b, c;
  Split() {
    a.declare({2}, Init::zeros());
    b.declare({3}, Init::zeros());
    c.declare({4}, Init::zeros());
  }
  template <class V>
  void visit(V&& v) {
    v("encoder.a", a);
    v("other.b", b);
    v("encoder.c", c);
  }
};

/// The layout Split's encoder.* entries would need to be contiguous for.
struct Target {
  Param<float> a, c;
  Target() {
    a.declare({2}, Init::zeros());
    c.declare({4}, Init::zeros());
  }
  template <class V>
  void visit(V&& v) {
    v("a", a);
    v("c", c);
  }
};

}  // namespace

// ---- schedules ------------------------------------------------------------------------------------

TEST_CASE("schedules: spec §11.7 test vectors") {
  // lr: peak 1.2e-3, warmup 30, horizon 250 (values given to 5 significant digits).
  CHECK(warmup_cosine_lr(0, 1.2e-3, 30, 250) == 0.0);
  CHECK(warmup_cosine_lr(15, 1.2e-3, 30, 250) == doctest::Approx(6.0e-4).epsilon(1e-12));
  CHECK(warmup_cosine_lr(30, 1.2e-3, 30, 250) == doctest::Approx(1.2e-3).epsilon(1e-12));
  CHECK(std::abs(warmup_cosine_lr(100, 1.2e-3, 30, 250) - 9.2438e-4) <= 0.5e-8);
  CHECK(std::abs(warmup_cosine_lr(150, 1.2e-3, 30, 250) - 5.1461e-4) <= 0.5e-8);
  CHECK(std::abs(warmup_cosine_lr(200, 1.2e-3, 30, 250) - 1.4655e-4) <= 0.5e-8);
  CHECK(std::abs(warmup_cosine_lr(250, 1.2e-3, 30, 250)) <= 1e-18);
  CHECK(warmup_cosine_lr(251, 1.2e-3, 30, 250) == 0.0);
  // Weight decay 0.05 → 0.20 over 200 epochs.
  CHECK(cosine_increase(0, 0.05, 0.20, 200) == doctest::Approx(0.05).epsilon(1e-12));
  CHECK(std::abs(cosine_increase(50, 0.05, 0.20, 200) - 0.071967) <= 0.5e-6);
  CHECK(cosine_increase(100, 0.05, 0.20, 200) == doctest::Approx(0.125).epsilon(1e-12));
  CHECK(std::abs(cosine_increase(150, 0.05, 0.20, 200) - 0.178033) <= 0.5e-6);
  CHECK(cosine_increase(200, 0.05, 0.20, 200) == doctest::Approx(0.20).epsilon(1e-12));
  // Teacher momentum 0.994 → 1 over 200 epochs.
  CHECK(cosine_increase(0, 0.994, 1.0, 200) == doctest::Approx(0.994).epsilon(1e-12));
  CHECK(std::abs(cosine_increase(50, 0.994, 1.0, 200) - 0.994879) <= 0.5e-6);
  CHECK(cosine_increase(100, 0.994, 1.0, 200) == doctest::Approx(0.997).epsilon(1e-12));
  CHECK(std::abs(cosine_increase(150, 0.994, 1.0, 200) - 0.999121) <= 0.5e-6);
  CHECK(cosine_increase(200, 0.994, 1.0, 200) == 1.0);
  // Past the end the value stays at `end` (clamped), before 0 at `start`.
  CHECK(cosine_increase(250, 0.994, 1.0, 200) == 1.0);
  CHECK(cosine_increase(-1, 0.05, 0.20, 200) == doctest::Approx(0.05).epsilon(1e-12));
  CHECK_THROWS_AS(warmup_cosine_lr(1, 1e-3, 30, 30), Error);
  CHECK_THROWS_AS(warmup_cosine_lr(-1, 1e-3, 30, 250), Error);
  CHECK_THROWS_AS(cosine_increase(1, 0.0, 1.0, 0), Error);
  // No warmup: the cosine starts at the peak.
  CHECK(warmup_cosine_lr(0, 1e-3, 0, 10) == doctest::Approx(1e-3).epsilon(1e-15));
}

TEST_CASE("schedules: MocaSchedule per iteration (README run)") {
  const MocaSchedule s;  // defaults: 625 iterations per epoch, 200 epochs, warmup 30, peak 1.2e-3
  CHECK(s.lr_horizon() == 250.0);
  CHECK(s.total_iters() == 125000);
  CHECK(moca_lr_horizon(100, 1.15) == 114);  // Python: int(100 * 1.15) == 114
  CHECK(scaled_lr(1.5e-4, 2048) == doctest::Approx(1.2e-3).epsilon(1e-15));
  const auto v0 = s.at(0);
  CHECK(v0.epoch == 0.0);
  CHECK(v0.lr == 0.0);  // warmup starts at exactly 0
  CHECK(v0.weight_decay == doctest::Approx(0.05).epsilon(1e-12));
  CHECK(v0.momentum == doctest::Approx(0.994).epsilon(1e-12));
  const auto v = s.at(625 * 100);
  CHECK(v.epoch == 100.0);
  CHECK(std::abs(v.lr - 9.2438e-4) <= 0.5e-8);
  CHECK(v.weight_decay == doctest::Approx(0.125).epsilon(1e-12));
  CHECK(v.momentum == doctest::Approx(0.997).epsilon(1e-12));
  // A fractional epoch inside the warmup.
  const auto w = s.at(625 * 15 + 312);
  CHECK(w.epoch == doctest::Approx(15.0 + 312.0 / 625.0).epsilon(1e-15));
  CHECK(w.lr == doctest::Approx(1.2e-3 * w.epoch / 30).epsilon(1e-12));
  // Untruncated horizon for runs measured in fractions of an epoch.
  MocaSchedule f;
  f.max_epochs = 2.5;
  f.warmup_epochs = 0.375;
  CHECK(f.lr_horizon() == 3.0);
  f.truncate_lr_horizon = false;
  CHECK(f.lr_horizon() == 3.125);
}

// ---- parameter groups ---------------------------------------------------------------------------

TEST_CASE("param groups: the MOCA rule on hand-made names and shapes") {
  struct Case {
    const char* name;
    Shape shape;
    std::string_view group;
  };
  const Case cases[] = {
      {"encoder.cls_token", {1, 1, 768}, kDecayGroup},
      {"mask_token_cls_pt", {1, 1, 512}, kDecayGroup},
      {"encoder.patch_embed.proj.weight", {768, 3, 16, 16}, kDecayGroup},
      {"encoder.patch_embed.proj.bias", {768}, kNoDecayGroup},
      {"encoder.blocks.0.norm1.weight", {768}, kNoDecayGroup},
      {"encoder.blocks.11.attn.qkv.weight", {2304, 768}, kDecayGroup},
      {"encoder.blocks.11.attn.qkv.bias", {2304}, kNoDecayGroup},
      {"decoder_embed_cls_pt.weight", {512, 768}, kDecayGroup},
      {"encoder_pred.layers_w.0.generator.b0_fc.weight", {1536, 768}, kWgenDecayGroup},
      {"encoder_pred.layers_w.0.generator.b0_bn.weight", {1536}, kWgenNoDecayGroup},
      {"encoder_pred.layers_w.0.generator.b0_bn.bias", {1536}, kWgenNoDecayGroup},
      {"encoder_pred.layers_w.0.generator.b0_last_layer.weight", {768, 1536}, kWgenDecayGroup},
      {"encoder_pred.layers_w.0.generator.b0_last_layer.bias", {768}, kWgenNoDecayGroup},
      {"decoder_pred.layers_w.0.skip.weight", {512, 768}, kWgenDecayGroup},
      {"decoder_pred.layers_w.0.skip.bias", {512}, kWgenNoDecayGroup},
      // Not generator MLP/skip parameters: the rule looks at "layers_w." only.
      {"encoder_pred.scale", {1}, kNoDecayGroup},
      {"encoder_pred_extra.layers_w.0.weight", {4, 4}, kDecayGroup},
      // Rank decides for anything not called ".bias", the suffix for anything of rank ≥ 2.
      {"head.weight_bias", {4, 4}, kDecayGroup},
      {"odd.bias", {4, 4}, kNoDecayGroup},
      {"scalar", {}, kNoDecayGroup},
  };
  for (const Case& c : cases) {
    INFO(c.name, " ", c.shape);
    CHECK(moca_group_of(c.name, c.shape) == c.group);
  }
}

TEST_CASE("param groups: tiny ViT (decay / no_decay, frozen positions excluded, merged runs)") {
  VisionTransformer<float> vit(VitConfig::tiny());
  ParameterStore<float> store(vit);
  const ParamGroups groups = decay_groups(store, 1e-3, 0.05);
  REQUIRE(groups.size() == 2);
  CHECK(groups.arena_numel() == store.num_trainable());
  CHECK(groups.numel() == store.num_trainable());
  CHECK(groups.group_of("cls_token") == "decay");
  CHECK(groups.group_of("pos_embed").empty());
  CHECK(groups.group_of("patch_embed.proj.weight") == "decay");
  CHECK(groups.group_of("patch_embed.proj.bias") == "no_decay");
  CHECK(groups.group_of("blocks.0.norm1.weight") == "no_decay");
  CHECK(groups.group_of("blocks.0.attn.qkv.weight") == "decay");
  CHECK(groups.group_of("blocks.0.attn.qkv.bias") == "no_decay");
  CHECK(groups.group_of("blocks.5.mlp.fc2.weight") == "decay");
  CHECK(groups.group_of("blocks.5.mlp.fc2.bias") == "no_decay");
  CHECK(groups.group_of("norm.weight") == "no_decay");
  CHECK(groups.group_of("norm.bias") == "no_decay");
  CHECK(groups["decay"].lr == 1e-3);
  CHECK(groups["decay"].weight_decay == 0.05);
  CHECK(groups["no_decay"].lr == 1e-3);
  CHECK(groups["no_decay"].weight_decay == 0.0);
  // cls token and patch weight are adjacent (positions are not in the arena): one run. Then per
  // block qkv, proj, fc1, fc2 weights; the biases and norms between them form 1 + 4·depth runs.
  const ParamGroup& decay = groups["decay"];
  REQUIRE_FALSE(decay.segments.empty());
  CHECK(decay.segments[0] == ParamSegment{0, 192 + 192 * 16});
  CHECK(decay.segments.size() == 1 + 4 * 6);
  CHECK(groups["no_decay"].segments.size() == 1 + 4 * 6);
  // Disjoint, increasing, merged, and covering every member.
  for (const ParamGroup& g : groups) {
    for (std::size_t i = 1; i < g.segments.size(); ++i)
      CHECK(g.segments[i].offset > g.segments[i - 1].end());
    for (const std::string& m : g.members) {
      const auto* e = store.find(m);
      REQUIRE(e != nullptr);
      bool inside = false;
      for (const ParamSegment& s : g.segments)
        inside = inside || (e->offset >= s.offset && e->offset + e->numel() <= s.end());
      CHECK_MESSAGE(inside, m);
    }
  }
  // The MOCA rule on a plain ViT: the generator groups exist and are empty.
  const ParamGroups mg = moca_param_groups(store);
  REQUIRE(mg.size() == 4);
  CHECK(mg["wgen_decay"].segments.empty());
  CHECK(mg["wgen_no_decay"].numel() == 0);
  CHECK(mg["decay"].segments == decay.segments);
}

TEST_CASE("param groups: MOCA layout in four groups with their hyper-parameters") {
  MiniMoca<float> model;
  ParameterStore<float> store(model);
  ParamGroups groups = moca_param_groups(store, 2e-3, 0.05);
  REQUIRE(groups.size() == 4);
  CHECK(groups.groups()[0].name == "decay");
  CHECK(groups.groups()[3].name == "wgen_no_decay");
  CHECK(groups.numel() == store.num_trainable());
  const std::pair<const char*, const char*> expected[] = {
      {"encoder.cls_token", "decay"},
      {"encoder.patch_embed.proj.weight", "decay"},
      {"encoder.patch_embed.proj.bias", "no_decay"},
      {"encoder.blocks.1.mlp.fc1.weight", "decay"},
      {"encoder.norm.bias", "no_decay"},
      {"encoder.pos_embed", ""},
      {"encoder_pred.scale", ""},
      {"encoder_pred.layers_w.0.generator.b0_bn.running_mean", ""},
      {"decoder_pos_embed", ""},
      {"encoder_pred.layers_w.0.generator.b0_fc.weight", "wgen_decay"},
      {"encoder_pred.layers_w.0.generator.b0_bn.weight", "wgen_no_decay"},
      {"encoder_pred.layers_w.0.generator.b0_bn.bias", "wgen_no_decay"},
      {"encoder_pred.layers_w.0.generator.b0_last_layer.weight", "wgen_decay"},
      {"encoder_pred.layers_w.0.generator.b0_last_layer.bias", "wgen_no_decay"},
      {"norm_cls_pt.weight", "no_decay"},
      {"decoder_embed_cls_pt.weight", "decay"},
      {"decoder_embed_cls_pt.bias", "no_decay"},
      {"mask_token_cls_pt", "decay"},
      {"decoder_pred.layers_w.0.skip.weight", "wgen_decay"},
      {"decoder_pred.layers_w.0.skip.bias", "wgen_no_decay"},
  };
  for (const auto& [name, group] : expected) {
    INFO(name);
    REQUIRE(store.find(name) != nullptr);
    CHECK(groups.group_of(name) == group);
  }
  // Every trainable entry is in exactly one group.
  for (const auto& e : store.entries()) {
    int n = 0;
    for (const ParamGroup& g : groups) n += g.contains(e.name) ? 1 : 0;
    CHECK_MESSAGE(n == (e.trainable ? 1 : 0), e.name);
  }
  // Spec §7.1 / §13 hyper-parameters.
  CHECK(groups["decay"].lr == 2e-3);
  CHECK(groups["decay"].weight_decay == 0.05);
  CHECK(groups["no_decay"].weight_decay == 0.0);
  CHECK(groups["wgen_decay"].lr == 1e-4);
  CHECK(groups["wgen_decay"].weight_decay == 0.05);
  CHECK(groups["wgen_no_decay"].lr == 1e-4);
  CHECK(groups["wgen_no_decay"].weight_decay == 0.0);
  set_moca_hyperparameters(groups, 7e-4, 0.125);
  CHECK(groups["decay"].lr == 7e-4);
  CHECK(groups["decay"].weight_decay == 0.125);
  CHECK(groups["no_decay"].lr == 7e-4);
  CHECK(groups["no_decay"].weight_decay == 0.0);
  CHECK(groups["wgen_decay"].lr == 1e-4);
  CHECK(groups["wgen_decay"].weight_decay == 0.05);
}

TEST_CASE("param groups: general classifier, errors") {
  MiniMoca<float> model;
  ParameterStore<float> store(model);
  // Groups in order of first use; an empty name leaves the entry out.
  const ParamGroups g = build_param_groups(store, [](std::string_view name, const Shape&) {
    if (name.starts_with("encoder.")) return std::string("enc");
    if (name.starts_with("decoder_embed")) return std::string();
    return std::string("rest");
  });
  REQUIRE(g.size() == 2);
  CHECK(g.groups()[0].name == "enc");
  CHECK(g["enc"].segments.size() == 1);  // the encoder's trainable entries are one run
  CHECK(g["enc"].segments[0].offset == 0);
  CHECK(g.group_of("decoder_embed_cls_pt.weight").empty());
  CHECK(g.numel() == store.num_trainable() - 16 * 8 - 8);
  // Unknown names of a declared list, unknown lookups, overlaps.
  CHECK_THROWS_AS((build_param_groups(
                      store, [](std::string_view, const Shape&) { return "other"; }, {"a", "b"})),
                  Error);
  try {
    (void)g["nope"];
    FAIL("lookup of a missing group succeeded");
  } catch (const Error& e) {
    const std::string msg = e.what();
    CHECK(msg.find("'nope'") != std::string::npos);
    CHECK(msg.find("'enc'") != std::string::npos);
  }
  ParamGroups manual(100);
  manual.add_group("x");
  manual.add_group("y");
  CHECK_THROWS_AS(manual.add_group("x"), Error);
  manual.add_member("x", "p", 0, 10);
  manual.add_member("x", "q", 10, 5);
  CHECK(manual["x"].segments.size() == 1);
  CHECK(manual["x"].segments[0] == ParamSegment{0, 15});
  CHECK_THROWS_AS(manual.add_member("y", "r", 12, 4), Error);   // overlaps x
  CHECK_THROWS_AS(manual.add_member("y", "r", 95, 10), Error);  // outside the arena
  manual.add_member("y", "s", 50, 10);
  CHECK_THROWS_AS(manual.add_member("y", "t", 20, 5), Error);  // out of order
}

// ---- AdamW --------------------------------------------------------------------------------------

TEST_CASE("AdamW: PyTorch numbers (torch.optim.AdamW, two groups, lr and wd changed mid-run)") {
  // tests/python/optim_golden.py, torch 1.13, float64.
  const Vec a = {0.45267015366552449, -1.0022232671990785, 1.5122111442724804, 2.025314526858315};
  const Vec b = {0.10993767201966416, -0.19280475205182393, 0.3038085581141538};
  const Vec m_a = {0.072016877559971076, -0.086286148975585911, -0.16525808807195289,
                   -0.092292503121686603};
  const Vec v_a = {0.0021237652738861352, 0.0023359319029410751, 0.0015881495108574059,
                   0.0019983574355850135};
  const Vec m_b = {-0.0057084576282838348, -0.0362278196386107, -0.033439491346349055};
  const Vec v_b = {0.00038530759924138843, 0.00061385245231062333, 0.00051781092057219134};

  TwoTensors<double> model;
  ParameterStore<double> store(model);
  set_golden_values(store);
  ParamGroups groups = golden_groups(store, 1e-2, 0.1, 5e-3, 0.0);
  AdamW<double> opt(store);
  for (int k = 1; k <= 4; ++k) {
    if (k == 3) {
      groups["g0"].lr = 2e-2;
      groups["g0"].weight_decay = 0.2;
      groups["g1"].lr = 0.0;  // moments still move
    }
    set_golden_grads(store, k);
    opt.step(groups);
  }
  CHECK(opt.steps() == 4);
  check_close("a", store.view(*store.find("a")), a, 1e-13);
  check_close("b", store.view(*store.find("b")), b, 1e-13);
  check_close("m_a", opt.exp_avg("a"), m_a, 1e-13);
  check_close("v_a", opt.exp_avg_sq("a"), v_a, 1e-13);
  check_close("m_b", opt.exp_avg("b"), m_b, 1e-13);
  check_close("v_b", opt.exp_avg_sq("b"), v_b, 1e-13);
  CHECK(opt.exp_avg("a").shape() == Shape{2, 2});
  CHECK_THROWS_AS(opt.exp_avg("c"), Error);
}

TEST_CASE_TEMPLATE("AdamW: matches a double reference over several steps and groups", T, float,
                   double) {
  MiniMoca<T> model;
  ParameterStore<T> store(model);
  store.initialize(11);
  // Two scheduled groups plus the generator groups, and one entry left out of every group.
  ParamGroups groups = build_param_groups(
      store,
      [](std::string_view name, const Shape& shape) -> std::string {
        if (name == "mask_token_cls_pt") return "";
        return std::string(moca_group_of(name, shape));
      },
      {"decay", "no_decay", "wgen_decay", "wgen_no_decay"});
  AdamW<T> opt(store);
  RefAdamW ref{to_vec(store.values()), Vec(static_cast<std::size_t>(store.num_trainable())),
               Vec(static_cast<std::size_t>(store.num_trainable()))};
  const Vec left_out = entry_values(store, "mask_token_cls_pt");
  for (int k = 1; k <= 6; ++k) {
    set_moca_hyperparameters(groups, 1e-2 * k / 6.0, 0.05 + 0.02 * k);
    if (k == 4) groups["no_decay"].lr = 0.0;
    random_grads(store, k);
    opt.step(groups);
    ref.run(groups, to_vec(store.grads()));
  }
  const bool is_float = std::is_same_v<T, float>;
  check_close("values", store.values(), ref.p, is_float ? 1e-6 : 1e-13);
  check_close("exp_avg", opt.exp_avg(), ref.m, is_float ? 1e-6 : 1e-13);
  // 1 − β2 must be formed in double and then rounded (1 − 0.999f would be 1.3e-5 off).
  check_close("exp_avg_sq", opt.exp_avg_sq(), ref.v, is_float ? 1e-6 : 1e-13);
  // The left-out entry: values untouched, moments still zero.
  CHECK(entry_values(store, "mask_token_cls_pt") == left_out);
  CHECK(max_abs(to_vec(opt.exp_avg("mask_token_cls_pt"))) == 0.0);
  // The frozen tensors are not the optimiser's.
  CHECK(opt.entries().size() + 4 == store.entries().size());
}

TEST_CASE("AdamW: lr 0 updates moments only; state and errors") {
  TwoTensors<float> model;
  ParameterStore<float> store(model);
  set_golden_values(store);
  const Vec before = to_vec(store.values());
  ParamGroups groups = golden_groups(store, 0.0, 0.1, 0.0, 0.0);
  AdamW<float> opt(store, {0.8, 0.99, 1e-6});
  set_golden_grads(store, 1);
  opt.step(groups);
  CHECK(to_vec(store.values()) == before);
  const Vec g = to_vec(store.grads());
  for (std::size_t i = 0; i < g.size(); ++i) {
    CHECK(opt.exp_avg().data()[i] == doctest::Approx(0.2 * g[i]).epsilon(1e-6));
    CHECK(opt.exp_avg_sq().data()[i] == doctest::Approx(0.01 * g[i] * g[i]).epsilon(1e-5));
  }
  opt.set_steps(10);
  CHECK(opt.steps() == 10);
  opt.reset();
  CHECK(opt.steps() == 0);
  CHECK(max_abs(to_vec(opt.exp_avg())) == 0.0);
  // Groups of another arena, negative hyper-parameters, a store without gradients.
  TwoTensors<float> other_model;
  other_model.b.declare({5}, Init::zeros());
  ParameterStore<float> other(other_model);
  CHECK_THROWS_AS(opt.step(golden_groups(other, 1e-3, 0, 1e-3, 0)), Error);
  groups["g0"].lr = -1.0;
  CHECK_THROWS_AS(opt.step(groups), Error);
  TwoTensors<float> frozen_model;
  ParameterStore<float> no_grads(frozen_model, /*with_grads=*/false);
  CHECK_THROWS_AS((void)AdamW<float>(no_grads), Error);
}

// ---- SGD ----------------------------------------------------------------------------------------

TEST_CASE("SGD: PyTorch numbers (torch.optim.SGD, momentum with dampening, Nesterov)") {
  // tests/python/optim_golden.py, torch 1.13, float64; groups lr 0.1 / wd 0.01 and lr 0.05.
  struct Golden {
    SgdConfig config;
    Vec a, b, buf_a, buf_b;
  };
  const Golden cases[] = {
      {{0.9, 0.1, false},
       {0.10147418500870778, -1.1968007918727481, 1.6694861836280299, 2.3832489423951078},
       {0.13453338151835509, -0.16201736750659709, 0.30651082631990034},
       {1.5548574185211319, 0.14214416818894585, -1.3237270978096589, -1.5881959579149654},
       {-0.0011885062586908749, 0.05319223844391327, 0.058668284429759299}},
      {{0.9, 0.0, true},
       {-0.065437599279779421, -1.1981366191761198, 1.8265772922434369, 2.5560265957279134},
       {0.13445449096975789, -0.16991386525121724, 0.29805672498909586},
       {1.6491536787938124, 0.075415651496582137, -1.4843693760130918, -1.6962194033010594},
       {0.017406045134964909, 0.10365214950692364, 0.094600945638595085}},
  };
  for (const Golden& c : cases) {
    INFO("nesterov ", c.config.nesterov);
    TwoTensors<double> model;
    ParameterStore<double> store(model);
    set_golden_values(store);
    const ParamGroups groups = golden_groups(store, 0.1, 0.01, 0.05, 0.0);
    Sgd<double> opt(store, c.config);
    for (int k = 1; k <= 3; ++k) {
      set_golden_grads(store, k);
      opt.step(groups);
    }
    CHECK(opt.steps() == 3);
    check_close("a", store.view(*store.find("a")), c.a, 1e-13);
    check_close("b", store.view(*store.find("b")), c.b, 1e-13);
    check_close("buf_a", opt.momentum_buffer("a"), c.buf_a, 1e-13);
    check_close("buf_b", opt.momentum_buffer("b"), c.buf_b, 1e-13);
  }
}

TEST_CASE_TEMPLATE("SGD: matches a double reference (plain, momentum, Nesterov)", T, float,
                   double) {
  const SgdConfig configs[] = {{0.0, 0.0, false}, {0.9, 0.25, false}, {0.8, 0.0, true}};
  for (const SgdConfig& c : configs) {
    INFO("momentum ", c.momentum, " dampening ", c.dampening, " nesterov ", c.nesterov);
    MiniMoca<T> model;
    ParameterStore<T> store(model);
    store.initialize(5);
    ParamGroups groups = decay_groups(store, 0.1, 0.01);
    Sgd<T> opt(store, c);
    RefSgd ref{to_vec(store.values()), Vec(static_cast<std::size_t>(store.num_trainable())),
               false, c};
    for (int k = 1; k <= 4; ++k) {
      groups["decay"].lr = 0.1 / k;
      groups["no_decay"].lr = 0.05 / k;
      groups["decay"].weight_decay = 0.01 * k;
      random_grads(store, k);
      const Vec g = to_vec(store.grads());
      opt.step(groups);
      ref.run(groups, g);
      CHECK(to_vec(store.grads()) == g);  // gradients are left alone
    }
    const double tol = std::is_same_v<T, float> ? 1e-6 : 1e-13;
    check_close("values", store.values(), ref.p, tol);
    if (c.momentum != 0.0)
      check_close("buffer", opt.momentum_buffer(), ref.buf, tol);
    else
      CHECK(opt.momentum_buffer().empty());
  }
  MiniMoca<T> model;
  ParameterStore<T> store(model);
  CHECK_THROWS_AS((void)Sgd<T>(store, {0.0, 0.0, true}), Error);
  CHECK_THROWS_AS((void)Sgd<T>(store, {0.9, 0.1, true}), Error);
}

// ---- clipping -----------------------------------------------------------------------------------

TEST_CASE("clip_grad_norm: PyTorch numbers") {
  // tests/python/optim_golden.py: torch.nn.utils.clip_grad_norm_(max_norm=0.5), float64.
  const double norm = 1.5882973371764393;
  const Vec g = {0.26489701749099676,   0.28624893873595697, 0.04442490581169406,
                 -0.2382431806398905,   -0.065501994620062662, -0.1558259669213628,
                 -0.10288426386342692};
  TwoTensors<double> model;
  ParameterStore<double> store(model);
  set_golden_grads(store, 1);
  CHECK(clip_grad_norm(store, 0.5) == doctest::Approx(norm).epsilon(1e-14));
  check_close("grads", store.grads(), g, 1e-14);
}

TEST_CASE("clip_grad_norm: norm in double over the arena, scale factor, thresholds") {
  MiniMoca<float> model;
  ParameterStore<float> store(model);
  fill_uniform(store.grads(), rng(), 77, -0.01, 0.01);
  long double ss = 0;
  for (float v : store.grads()) ss += static_cast<long double>(v) * static_cast<long double>(v);
  const double ref_norm = std::sqrt(static_cast<double>(ss));
  const double norm = global_grad_norm(store);
  CHECK(norm == doctest::Approx(ref_norm).epsilon(1e-13));
  const Vec g0 = to_vec(store.grads());

  // Below the threshold: untouched, bit for bit.
  CHECK(clip_grad_norm(store, 2.0 * norm) == norm);
  CHECK(to_vec(store.grads()) == g0);
  // Disabled explicitly: only the norm.
  CHECK(clip_grad_norm(store, std::optional<double>()) == norm);
  CHECK(to_vec(store.grads()) == g0);

  // Above: every gradient times max_norm / (norm + 1e-6), in the element type.
  const double max_norm = 0.25 * norm;
  const double coef = clip_coefficient(norm, max_norm);
  CHECK(coef == max_norm / (norm + 1e-6));
  CHECK(clip_grad_norm(store, std::optional<double>(max_norm)) == norm);
  for (std::size_t i = 0; i < g0.size(); ++i)
    CHECK(store.grads().data()[i] == static_cast<float>(g0[i]) * static_cast<float>(coef));
  CHECK(global_grad_norm(store) == doctest::Approx(max_norm).epsilon(1e-5));

  // At the threshold torch still scales, by max_norm / (max_norm + 1e-6) < 1.
  CHECK(clip_coefficient(1.0, 1.0) < 1.0);
  CHECK(clip_coefficient(1.0, 2.0) == 1.0);
  // max_norm 0 is not "disabled": it zeroes the gradients (spec §11.8).
  CHECK(clip_grad_norm(store, 0.0) > 0.0);
  CHECK(max_abs(to_vec(store.grads())) == 0.0);
  CHECK(global_grad_norm(store) == 0.0);
  CHECK(clip_grad_norm(store, 0.1) == 0.0);  // zero gradients stay zero
  CHECK_THROWS_AS(clip_grad_norm(store, -1.0), Error);
}

// ---- EMA ----------------------------------------------------------------------------------------

TEST_CASE("ema_update: same layouts, momentum ≥ 1 skips, copy") {
  VisionTransformer<float> student_vit(small_vit()), teacher_vit(small_vit());
  ParameterStore<float> student(student_vit), teacher(teacher_vit, /*with_grads=*/false);
  student.initialize(1);
  teacher.initialize(2);
  const Vec s = to_vec(student.values()), t0 = to_vec(teacher.values());
  const Vec frozen0 = to_vec(teacher.frozen());
  REQUIRE(s != t0);

  ema_update(teacher, student, 0.9);
  Vec expected(s.size());
  for (std::size_t i = 0; i < s.size(); ++i) expected[i] = 0.9 * t0[i] + 0.1 * s[i];
  check_close("teacher", teacher.values(), expected, 1e-6);
  CHECK(to_vec(student.values()) == s);
  CHECK(to_vec(teacher.frozen()) == frozen0);

  const Vec t1 = to_vec(teacher.values());
  ema_update(teacher, student, 1.0);
  CHECK(to_vec(teacher.values()) == t1);
  ema_update(teacher, student, 1.5);
  CHECK(to_vec(teacher.values()) == t1);
  CHECK_THROWS_AS(ema_update(teacher, student, -0.1), Error);

  const EmaLink<float> link(teacher, student);
  link.copy_source();
  CHECK(to_vec(teacher.values()) == s);
  link.update(0.5);  // teacher == student: a fixed point
  CHECK(to_vec(teacher.values()) == s);
}

TEST_CASE("ema_update: layout mismatches name the first differing entry") {
  VitConfig deeper = small_vit();
  deeper.depth = 3;
  VitConfig wider = small_vit();
  wider.dim = 32;
  wider.heads = 2;
  VisionTransformer<float> a(small_vit()), b(deeper), c(wider);
  ParameterStore<float> sa(a, false), sb(b), sc(c);
  try {
    ema_update(sa, sb, 0.9);
    FAIL("a deeper source was accepted");
  } catch (const Error& e) {
    const std::string msg = e.what();
    CHECK(msg.find("'norm.weight'") != std::string::npos);
    CHECK(msg.find("'blocks.2.norm1.weight'") != std::string::npos);
  }
  try {
    ema_update(sa, sc, 0.9);
    FAIL("a wider source was accepted");
  } catch (const Error& e) {
    const std::string msg = e.what();
    CHECK(msg.find("'cls_token'") != std::string::npos);
    CHECK(msg.find("[1, 1, 32]") != std::string::npos);
  }
  // Fewer source entries: the first unmatched target entry is named.
  VisionTransformer<float> shallow_teacher(deeper);
  ParameterStore<float> st(shallow_teacher, false);
  try {
    ema_update(st, ParameterStore<float>(a), 0.9);
    FAIL("a shallower source was accepted");
  } catch (const Error& e) {
    CHECK(std::string(e.what()).find("'blocks.2.norm1.weight'") != std::string::npos);
  }
}

TEST_CASE("ema_update: the student encoder as a prefix range of a bigger model") {
  MiniMoca<float> moca_model;
  VisionTransformer<float> teacher_vit(small_vit());
  ParameterStore<float> moca(moca_model), teacher(teacher_vit, false);
  moca.initialize(3);
  teacher.initialize(4);
  const Vec all0 = to_vec(moca.values()), t0 = to_vec(teacher.values());

  const EmaLink<float> link(teacher, moca, "encoder");
  CHECK(link.source().data() == moca.values().data());  // the encoder comes first
  CHECK(link.source().numel() == teacher.num_trainable());
  link.update(0.75);
  CHECK(to_vec(moca.values()) == all0);
  // Expected values entry by entry, matched by name.
  Vec expected(t0.size());
  for (const auto& e : teacher.entries()) {
    if (!e.trainable) continue;
    const Vec src = entry_values(moca, "encoder." + e.name);
    for (std::size_t i = 0; i < src.size(); ++i) {
      const auto k = static_cast<std::size_t>(e.offset) + i;
      expected[k] = 0.75 * t0[k] + 0.25 * src[i];
    }
  }
  check_close("teacher", teacher.values(), expected, 1e-6);
  // The same through the free function, with a trailing dot.
  ema_update(teacher, moca, 0.0, "encoder.");
  for (const auto& e : teacher.entries())
    if (e.trainable) CHECK(to_vec(teacher.view(e)) == entry_values(moca, "encoder." + e.name));
  // A prefix that matches nothing, or the wrong sub-model.
  CHECK_THROWS_AS(ema_update(teacher, moca, 0.9, "student"), Error);
  CHECK_THROWS_AS(ema_update(teacher, moca, 0.9, "encoder_pred"), Error);
}

TEST_CASE("ema_update: a prefix whose entries are not contiguous is refused") {
  Split split;
  Target target;
  ParameterStore<float> src(split), tgt(target, false);
  try {
    ema_update(tgt, src, 0.5, "encoder");
    FAIL("a split prefix was accepted");
  } catch (const Error& e) {
    const std::string msg = e.what();
    CHECK(msg.find("not contiguous") != std::string::npos);
    CHECK(msg.find("'encoder.c'") != std::string::npos);
  }
}

// ---- sizes --------------------------------------------------------------------------------------

TEST_CASE("ViT-B/16 encoder: 85,647,360 trainable parameters, 151,296 frozen (spec §10)") {
  // Counted from the declarations: nothing is allocated.
  VisionTransformer<float> vit(VitConfig::vit_b16());
  std::int64_t trainable = 0, frozen = 0, decay = 0, no_decay = 0;
  for_each_param(vit, [&](const std::string& name, Param<float>& p) {
    (p.trainable ? trainable : frozen) += p.shape.numel();
    if (p.trainable)
      (moca_group_of(name, p.shape) == kDecayGroup ? decay : no_decay) += p.shape.numel();
  });
  CHECK(trainable == 85'647'360);
  CHECK(frozen == 151'296);
  // no_decay: patch bias 768 + 12 × (LN 2·1536 + biases 2304 + 768 + 3072 + 768) + final LN 1536.
  CHECK(no_decay == 122'112);
  CHECK(decay == 85'647'360 - 122'112);
}
