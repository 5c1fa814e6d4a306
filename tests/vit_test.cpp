// VisionTransformer: names, initialisation, masking semantics, outputs by offset, gradients,
// allocation-free steady state.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <moca/models/vit.hpp>
#include <vector>

#include "layer_check.hpp"

using namespace moca;

namespace {
VitConfig small_config() {
  VitConfig c;
  c.img_size = 8;
  c.patch = 2;
  c.in_chans = 2;
  c.dim = 8;
  c.depth = 3;
  c.heads = 2;
  c.mlp_ratio = 2.0;
  return c;
}

// A random permutation prefix per row (argsort of uniform noise, as the MOCA masking does).
Tensor<Index> random_keep(std::int64_t N, std::int64_t L, std::int64_t K, std::uint64_t seed) {
  Tensor<Index> keep({N, K});
  const Philox rng(seed);
  for (std::int64_t n = 0; n < N; ++n) {
    std::vector<std::pair<double, Index>> v;
    for (std::int64_t l = 0; l < L; ++l)
      v.push_back({rng.uniform_double(n, l), static_cast<Index>(l)});
    std::sort(v.begin(), v.end());
    for (std::int64_t k = 0; k < K; ++k) keep(n, k) = v[k].second;
  }
  return keep;
}
}  // namespace

TEST_CASE("ViT parameters carry timm's state-dict names, in order") {
  VitConfig c = small_config();
  c.depth = 1;
  VisionTransformer<float> vit(c);
  std::vector<std::string> names;
  for_each_param(vit, [&](const std::string& n, Param<float>&) { names.push_back(n); });
  const std::vector<std::string> expected = {
      "cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
      "blocks.0.norm1.weight", "blocks.0.norm1.bias", "blocks.0.attn.qkv.weight",
      "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight", "blocks.0.attn.proj.bias",
      "blocks.0.norm2.weight", "blocks.0.norm2.bias", "blocks.0.mlp.fc1.weight",
      "blocks.0.mlp.fc1.bias", "blocks.0.mlp.fc2.weight", "blocks.0.mlp.fc2.bias", "norm.weight",
      "norm.bias"};
  CHECK(names == expected);
}

TEST_CASE("ViT-B/16 has 85,647,360 trainable parameters and a 151,296-entry frozen table") {
  VisionTransformer<float> vit(VitConfig::vit_b16());
  std::int64_t trainable = 0, frozen = 0;
  for_each_param(vit, [&](const std::string&, Param<float>& p) {
    (p.trainable ? trainable : frozen) += p.shape.numel();
  });
  CHECK(trainable == 85'647'360);
  CHECK(frozen == 151'296);
}

TEST_CASE("Sin-cos position table matches the spec's test vectors") {
  Tensor<double> pos({197, 768});
  fill_sincos_2d(TensorView<double>(pos), 14, true);
  for (int j = 0; j < 768; ++j) CHECK(pos(0, j) == 0.0);
  // Patch 1 (row 0, column 1): the first half encodes the column.
  CHECK(pos(2, 0) == doctest::Approx(0.841471).epsilon(1e-6));
  CHECK(pos(2, 192) == doctest::Approx(0.540302).epsilon(1e-6));
  CHECK(pos(2, 384) == 0.0);
  CHECK(pos(2, 576) == 1.0);
  CHECK(pos(2, 1) == doctest::Approx(0.815251).epsilon(1e-6));
  // Patch 14 (row 1, column 0): the second half encodes the row.
  CHECK(pos(15, 0) == 0.0);
  CHECK(pos(15, 192) == 1.0);
  CHECK(pos(15, 384) == doctest::Approx(0.841471).epsilon(1e-6));
  CHECK(pos(15, 576) == doctest::Approx(0.540302).epsilon(1e-6));
}

TEST_CASE("ViT initialisation follows the spec") {
  VisionTransformer<double> vit(VitConfig::tiny());
  ParameterStore<double> ps(vit);
  ps.initialize(0);
  double ss = 0;
  for (double v : vit.cls_token.value) ss += v * v;
  CHECK(std::sqrt(ss / 192) == doctest::Approx(0.02).epsilon(0.15));
  for (double v : vit.norm.weight.value) CHECK(v == 1.0);
  CHECK_FALSE(ps.find("pos_embed")->trainable);
  CHECK(vit.pos_embed.value(0, 2, 0) == doctest::Approx(std::sin(1.0)).epsilon(1e-7));
  // Same seed, same values; another seed, other values.
  VisionTransformer<double> again(VitConfig::tiny());
  ParameterStore<double> ps2(again);
  ps2.initialize(0);
  CHECK(ops::sum_squares(TensorView<double>(ps.values())) ==
        ops::sum_squares(TensorView<double>(ps2.values())));
  ps2.initialize(1);
  CHECK(again.cls_token.value(0, 0, 0) != vit.cls_token.value(0, 0, 0));
}

TEST_CASE("Masking with every patch kept in order equals the unmasked forward exactly") {
  const VitConfig c = small_config();
  VisionTransformer<double> vit(c);
  ParameterStore<double> ps(vit, false);
  ps.initialize(1);
  Tensor<double> img({3, 2, 8, 8});
  fill_uniform(img, Philox(2), 0, -1, 1);
  vit.forward(img);
  Tensor<double> full = Tensor<double>(vit.output().shape());
  copy(vit.output(), TensorView<double>(full));
  Tensor<Index> keep({3, 16});
  for (int n = 0; n < 3; ++n)
    for (int l = 0; l < 16; ++l) keep(n, l) = l;
  TensorView<Index> kv = keep;
  vit.forward(img, &kv);
  for (std::int64_t i = 0; i < full.numel(); ++i) CHECK(vit.output().data()[i] == full.data()[i]);
}

TEST_CASE("Masked tokens keep their positions: a permuting mask permutes the output") {
  // Positions are added before masking and every layer is token-wise or (attention)
  // permutation-equivariant, so keeping all patches in a shuffled order must shuffle the patch
  // outputs the same way and leave the class token unchanged.
  const VitConfig c = small_config();
  VisionTransformer<double> vit(c);
  ParameterStore<double> ps(vit, false);
  ps.initialize(3);
  Tensor<double> img({2, 2, 8, 8});
  fill_uniform(img, Philox(4), 0, -1, 1);
  vit.forward(img);
  Tensor<double> full(vit.output().shape());
  copy(vit.output(), TensorView<double>(full));
  auto keep = random_keep(2, 16, 16, 9);  // a full permutation
  TensorView<Index> kv = keep;
  vit.forward(img, &kv);
  auto out = vit.output();
  for (int n = 0; n < 2; ++n) {
    for (int d = 0; d < 8; ++d) CHECK(out(n, 0, d) == doctest::Approx(full(n, 0, d)).epsilon(1e-12));
    for (int k = 0; k < 16; ++k)
      for (int d = 0; d < 8; ++d)
        CHECK(out(n, 1 + k, d) == doctest::Approx(full(n, 1 + keep(n, k), d)).epsilon(1e-12));
  }
}

TEST_CASE("ViT outputs by offset: 0 is normalised, k is the raw stream after block depth-1-k") {
  const VitConfig c = small_config();
  VisionTransformer<double> vit(c);
  ParameterStore<double> ps(vit, false);
  ps.initialize(5);
  Tensor<double> img({2, 2, 8, 8});
  fill_uniform(img, Philox(5), 0, -1, 1);
  vit.forward(img);
  LayerNorm<double> ln(c.dim, c.norm_eps);
  ParameterStore<double> lps(ln, false);
  lps.initialize(0);  // weight 1, bias 0: the ViT's final norm as initialised
  Tensor<double> renorm(vit.output().shape());
  auto out = vit.output(0);
  for (std::int64_t r = 0; r < out.shape().leading(); ++r) {
    double mu = 0, var = 0;
    for (int j = 0; j < c.dim; ++j) mu += out.data()[r * c.dim + j] / c.dim;
    for (int j = 0; j < c.dim; ++j) var += std::pow(out.data()[r * c.dim + j] - mu, 2) / c.dim;
    CHECK(std::abs(mu) < 1e-12);
    CHECK(var == doctest::Approx(1.0).epsilon(1e-4));
  }
  // Offset 1 is block depth-2's raw output: the last block and the norm applied to it give
  // offset 0.
  Tensor<double> last(out.shape());
  vit.blocks.back().forward(vit.output(1), last);
  ln.forward(last, renorm);
  for (std::int64_t i = 0; i < out.numel(); ++i)
    CHECK(renorm.data()[i] == doctest::Approx(out.data()[i]).epsilon(1e-12));
  CHECK_THROWS_AS(vit.output(c.depth), Error);
}

TEST_CASE("ViT gradients: unmasked, and masked with an intermediate output (spec §1.5)") {
  const VitConfig c = small_config();
  VisionTransformer<double> vit(c);
  ParameterStore<double> ps(vit);
  ps.initialize(11);
  for (const auto& e : ps.entries())
    if (e.trainable && (e.name.find("norm") != std::string::npos || e.name.ends_with(".bias")))
      fill_uniform(ps.view(e), Philox(6), name_stream(e.name), 0.5, 1.5);
  Tensor<double> img({2, 2, 8, 8});
  fill_uniform(img, Philox(7), 0, -1, 1);
  testing::GradcheckOptions opt;
  opt.max_checks = 40;  // per tensor: enough to catch a wrong path, quick to run
  // The key part of the qkv bias has an exactly zero gradient (softmax cancels it); there the
  // central difference is pure roundoff, about 1e-8 in unoptimised builds.
  opt.atol = 1e-7;

  SUBCASE("unmasked, final output, with the image gradient") {
    moca::test::check_module_gradients(
        ps, img, {2, 17, 8}, [&](auto& in, auto out) {
          vit.forward(in);
          copy(vit.output(), out);
        },
        [&](auto&, auto dy, auto dx) { vit.backward({{0, dy}}, dx); }, true, opt);
  }
  SUBCASE("masked, final output and the raw output of block depth-1-2") {
    auto keep = random_keep(2, 16, 6, 3);
    TensorView<Index> kv = keep;
    Tensor<double> r2({2, 7, 8});
    fill_uniform(r2, Philox(8), 0, -1, 1);
    // loss = <r, out0> + <r2, out2>: the second term through the intermediate gradient.
    moca::test::check_module_gradients(
        ps, img, {2, 7, 8},
        [&](auto& in, auto out) {
          vit.forward(in, &kv);
          copy(vit.output(), out);
          // Fold the intermediate term into the output so the checked loss includes it.
          const double extra = testing::dot(vit.output(2), TensorView<double>(r2));
          out.data()[0] += extra;
        },
        [&](auto&, auto dy, auto dx) {
          // d(extra)/d(out.data()[0]) = 1 scaled by dy[0]; the first element's gradient
          // multiplies r2.
          Tensor<double> g2 = r2.clone();
          ops::scale(TensorView<double>(g2), dy.data()[0]);
          vit.backward({{0, dy}, {2, g2}}, dx);
        },
        true, opt);
  }
}

TEST_CASE("A repeated forward/backward of the same sizes allocates nothing") {
  VisionTransformer<float> vit(VitConfig::tiny());
  ParameterStore<float> ps(vit);
  ps.initialize(0);
  Tensor<float> img({4, 1, 32, 32}), g({4, 65, 192}), gm({4, 29, 192});
  fill_uniform(img, Philox(1), 0, -1, 1);
  fill_uniform(g, Philox(1), 1, -1, 1);
  fill_uniform(gm, Philox(1), 2, -1, 1);
  auto keep = random_keep(4, 64, 28, 1);
  TensorView<Index> kv = keep;
  auto step = [&] {
    vit.forward(img);
    vit.backward({{0, g}});
    vit.forward(img, &kv);  // a shorter sequence reuses the same buffers
    vit.backward({{0, gm}, {2, gm}});
  };
  step();
  const auto before = memory_stats<Cpu>().allocations;
  step();
  step();
  CHECK(memory_stats<Cpu>().allocations == before);
}

TEST_CASE("forward_inference: forward's output bit for bit, a fraction of the memory, then training as before") {
  // The MOCA teacher and feature extraction run forward_inference: the blocks borrow block 0's
  // activation buffers in turn and the stream alternates between two buffers. Its output must
  // be forward's exactly (masked or not); it must hold far less memory at depth 6; and a
  // training forward/backward after it must give the same gradients as one without it.
  const VitConfig c = VitConfig::tiny();
  Tensor<float> img({4, 1, 32, 32}), g({4, 65, 192});
  fill_uniform(img, Philox(7), 0, -1, 1);
  fill_uniform(g, Philox(7), 1, -1, 1);
  auto keep = random_keep(4, 64, 20, 9);
  TensorView<Index> kv = keep;

  VisionTransformer<float> a(c), b(c);
  ParameterStore<float> pa(a), pb(b);
  pa.initialize(3);
  pb.initialize(3);
  for (const TensorView<Index, Cpu>* k : {static_cast<const TensorView<Index, Cpu>*>(nullptr),
                                          static_cast<const TensorView<Index, Cpu>*>(&kv)}) {
    a.forward(img, k);
    b.forward_inference(img, k);
    REQUIRE(a.output().shape() == b.output().shape());
    CHECK(std::memcmp(a.output().data(), b.output().data(), a.output().bytes()) == 0);
  }
  // Intermediate outputs and backward are not available after it, with errors that say so.
  CHECK_THROWS_WITH_AS(b.output(1), doctest::Contains("forward_inference"), Error);
  CHECK_THROWS_WITH_AS(b.backward({{0, g}}), doctest::Contains("forward_inference"), Error);

  // Memory: a fresh model's buffers after one forward_inference against after one forward.
  auto held_after = [&](bool inference) {
    VisionTransformer<float> vit(c);
    ParameterStore<float> ps(vit);
    ps.initialize(3);
    const std::int64_t before = memory_stats<Cpu>().bytes_in_use;
    if (inference) vit.forward_inference(img);
    else vit.forward(img);
    return memory_stats<Cpu>().bytes_in_use - before;
  };
  const std::int64_t full = held_after(false), shared = held_after(true);
  MESSAGE("activation memory at depth 6: forward ", full, " bytes, forward_inference ", shared);
  CHECK(shared * 3 < full);

  // Training after an inference pass: the same gradients as a model that never ran one.
  b.forward(img);
  b.backward({{0, g}});
  a.forward(img);
  a.backward({{0, g}});
  CHECK(std::memcmp(pa.grads().data(), pb.grads().data(), pa.grads().bytes()) == 0);
  // And the inference pass allocates nothing once its buffers exist.
  b.forward_inference(img);
  const auto allocations = memory_stats<Cpu>().allocations;
  b.forward_inference(img);
  b.forward_inference(img, &kv);
  CHECK(memory_stats<Cpu>().allocations == allocations);
}

TEST_CASE("backward: the blocks share one set of scratch, so its memory does not grow with depth") {
  // What a backward adds to the memory a forward left: the ViT's own gradient buffers and one
  // block's scratch, whatever the depth (gradients themselves are checked by the tests above).
  auto backward_growth = [](std::int64_t depth) {
    VitConfig c = VitConfig::tiny();
    c.depth = depth;
    VisionTransformer<float> vit(c);
    ParameterStore<float> ps(vit);
    ps.initialize(5);
    Tensor<float> img({4, 1, 32, 32}), g({4, 65, 192});
    fill_uniform(img, Philox(8), 0, -1, 1);
    fill_uniform(g, Philox(8), 1, -1, 1);
    vit.forward(img);
    const std::int64_t before = memory_stats<Cpu>().bytes_in_use;
    vit.backward({{0, g}});
    return memory_stats<Cpu>().bytes_in_use - before;
  };
  const std::int64_t one = backward_growth(1), six = backward_growth(6);
  MESSAGE("memory a backward adds: depth 1 ", one, " bytes, depth 6 ", six);
  CHECK(one > 0);
  CHECK(six == one);
}
