// MOCA building blocks: complementary masks (spec §2, §11.7), the codebook (spec §4), the
// prototype generators (spec §5) and the condenser decoder (spec §6.4).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <moca/models/moca/codebook.hpp>
#include <moca/models/moca/condenser_decoder.hpp>
#include <moca/models/moca/masking.hpp>
#include <moca/models/moca/weight_generator.hpp>
#include <set>

#include "layer_check.hpp"

using namespace moca;
using moca::test::check_module_gradients;

namespace {
void perturb_norms_and_biases(ParameterStore<double>& ps) {
  for (const auto& e : ps.entries())
    if (e.trainable && (e.name.find("norm") != std::string::npos ||
                        e.name.find("bn") != std::string::npos || e.name.ends_with(".bias")))
      fill_uniform(ps.view(e), Philox(12), name_stream(e.name), 0.5, 1.5);
}
}  // namespace

TEST_CASE("Mask lengths of the default recipe: 88/127 and 49/88 for 196 patches") {
  const auto m = MaskLengths::from_ratios(196, 0.55, 0.75, 0.35, 0.55);
  CHECK(m.lk[0] == 88);
  CHECK(m.ld[0] == 127);
  CHECK(m.lk[1] == 49);
  CHECK(m.ld[1] == 88);
  const auto tiny = MaskLengths::from_ratios(64, 0.55, 0.75, 0.35, 0.55);
  CHECK(tiny.lk[0] == 28);
  CHECK(tiny.ld[0] == 41);
  CHECK(tiny.lk[1] == 16);
  CHECK(tiny.ld[1] == 28);
  // Round 2 must find its visible patches outside round 1's decoder positions.
  CHECK_THROWS_AS(MaskLengths::from_ratios(196, 0.55, 0.2, 0.35, 0.55), Error);
}

TEST_CASE("Complementary masks: disjoint visible sets, shared masked targets, 20 unused") {
  const auto m = MaskLengths::from_ratios(196, 0.55, 0.75, 0.35, 0.55);
  auto plan = complementary_masks(random_permutations(Philox(3), 7, 5, 196), m);
  for (std::int64_t n = 0; n < 5; ++n) {
    std::set<Index> A, Bm, C, Bm2, used;
    for (int i = 0; i < 88; ++i) A.insert(plan.s[0](n, i));
    for (int i = 88; i < 127; ++i) Bm.insert(plan.s[0](n, i));
    for (int i = 0; i < 49; ++i) C.insert(plan.s[1](n, i));
    for (int i = 49; i < 88; ++i) Bm2.insert(plan.s[1](n, i));
    CHECK(Bm.size() == 39);
    CHECK(Bm == Bm2);  // the same 39 positions are predicted in both rounds
    for (Index p : C) {
      CHECK(A.count(p) == 0);
      CHECK(Bm.count(p) == 0);
    }
    used.insert(A.begin(), A.end());
    used.insert(Bm.begin(), Bm.end());
    used.insert(C.begin(), C.end());
    CHECK(used.size() == 196 - 20);
    std::vector<Index> row2(plan.s[1].data() + n * 196, plan.s[1].data() + (n + 1) * 196);
    std::sort(row2.begin(), row2.end());
    for (int i = 0; i < 196; ++i) CHECK(row2[static_cast<std::size_t>(i)] == i);  // a permutation
  }
  // Masks depend on (seed, step, row) only.
  auto again = random_permutations(Philox(3), 7, 5, 196);
  CHECK(std::equal(again.begin(), again.end(), plan.s[0].begin()));
  auto other = random_permutations(Philox(3), 8, 5, 196);
  CHECK_FALSE(std::equal(other.begin(), other.end(), plan.s[0].begin()));
  Tensor<Index> bad({1, 196});  // all zeros: not a permutation
  CHECK_THROWS_AS(complementary_masks(std::move(bad), m), Error);
}

TEST_CASE("Codebook: spec initialisation, inner region, assignment and refresh") {
  CodebookConfig cfg;
  cfg.num_words = 32;
  cfg.dim = 8;
  cfg.grid = 14;
  cfg.skip_offset = 2;
  cfg.words_per_iter = 4;
  Codebook<double> cb(cfg);
  ParameterStore<double> ps(cb, false);
  cb.initialize(Philox(1));
  // Inner region of a 14×14 grid with skip 2: 100 patches, first 30, last 165 (spec §11.7).
  REQUIRE(cb.inner_patches().size() == 100);
  CHECK(cb.inner_patches().front() == 30);
  CHECK(cb.inner_patches().back() == 165);
  // Clamped Gaussian, unit rows: no negative entries, about half zero.
  int zeros = 0;
  for (std::int64_t k = 0; k < 32; ++k) {
    double ss = 0;
    for (std::int64_t c = 0; c < 8; ++c) {
      const double v = cb.embedding.value(k, c);
      CHECK(v >= 0.0);
      zeros += v == 0.0;
      ss += v * v;
    }
    CHECK(std::sqrt(ss) == doctest::Approx(1.0).epsilon(1e-12));
  }
  CHECK(zeros > 60);
  CHECK(zeros < 196);

  const std::int64_t N = 3, L = 196;
  Tensor<double> tout({N, 1 + L, 8});
  fill_uniform(tout, Philox(2), 0, -1, 1);
  Tensor<double> q({N, L, 32}), y({N, 32});
  cb.snapshot();
  cb.set_dist_norms(0.4, 0.3);
  cb.assign(tout, q, y);
  // Codes: softmax of cos · 10 / dist_norm_prev, rows sum to 1; reference for one token.
  for (std::int64_t r = 0; r < N * L; ++r) {
    double s = 0;
    for (int k = 0; k < 32; ++k) s += q.data()[r * 32 + k];
    CHECK(s == doctest::Approx(1.0).epsilon(1e-12));
  }
  {
    const std::int64_t n = 1, l = 17;
    double norm = 0, logits[32], mx = -1e300, z = 0, max_cos = -1e300, mean_cos = 0;
    for (int c = 0; c < 8; ++c) norm += tout(n, 1 + l, c) * tout(n, 1 + l, c);
    norm = std::sqrt(norm);
    for (int k = 0; k < 32; ++k) {
      double cs = 0;
      for (int c = 0; c < 8; ++c) cs += tout(n, 1 + l, c) / norm * cb.embedding.value(k, c);
      logits[k] = cs * 10.0 / 0.3;
      mx = std::max(mx, logits[k]);
      max_cos = std::max(max_cos, cs);
      mean_cos += cs / 32;
    }
    for (int k = 0; k < 32; ++k) z += std::exp(logits[k] - mx);
    for (int k = 0; k < 32; ++k)
      CHECK(q(n, l, k) == doctest::Approx(std::exp(logits[k] - mx) / z).epsilon(1e-10));
  }
  // dist_norm moved towards the mean (max cos − mean cos) with decay 0.99; prev unchanged.
  CHECK(cb.dist_norm() != 0.4);
  CHECK(cb.dist_norm_prev() == 0.3);
  // Bag of words: mean of the inner codes, rows sum to 1.
  for (std::int64_t n = 0; n < N; ++n) {
    double s = 0;
    for (int k = 0; k < 32; ++k) {
      double ref = 0;
      for (Index p : cb.inner_patches()) ref += q(n, p, k) / 100.0;
      CHECK(y(n, k) == doctest::Approx(ref).epsilon(1e-10));
      s += y(n, k);
    }
    CHECK(s == doctest::Approx(1.0).epsilon(1e-12));
  }
  // Refresh: distinct images, ring pointer, normalised teacher tokens, dist_norm_prev lagging.
  const auto r = cb.draw_refresh(Philox(5), 0, N + 1);
  CHECK(std::set<Index>(r.images.begin(), r.images.end()).size() == 4);
  cb.ptr = 28;
  CodebookRefresh fixed{1, {2, 0, 1, 2}, {0, 99, 5, 42}};
  const double dn = cb.dist_norm();
  cb.update(tout, fixed);
  CHECK(cb.ptr == 0);  // 28 + 4 wraps to 0
  CHECK(cb.dist_norm_prev() == dn);
  for (int k = 0; k < 4; ++k) {
    const Index img = fixed.images[static_cast<std::size_t>(k)];
    const Index patch = cb.inner_patches()[static_cast<std::size_t>(fixed.inner_tokens[static_cast<std::size_t>(k)])];
    double norm = 0;
    for (int c = 0; c < 8; ++c) norm += tout(img, 1 + patch, c) * tout(img, 1 + patch, c);
    for (int c = 0; c < 8; ++c)
      CHECK(cb.embedding.value(28 + k, c) ==
            doctest::Approx(tout(img, 1 + patch, c) / std::sqrt(norm)).epsilon(1e-12));
  }
  // The snapshot taken before the refresh is unchanged.
  CHECK(cb.words()(28, 0) != cb.embedding.value(28, 0));
}

TEST_CASE("BatchNorm1d in training mode: statistics, running stats and gradients") {
  BatchNorm1d<double> bn(5);
  ParameterStore<double> ps(bn);
  ps.initialize(0);
  fill_uniform(bn.weight.value, Philox(3), 1, 0.5, 1.5);
  fill_uniform(bn.bias.value, Philox(3), 2, -0.5, 0.5);
  Tensor<double> x({7, 5}), y({7, 5});
  fill_uniform(x, Philox(4), 0, -2, 2);
  bn.forward(x, y);
  for (int j = 0; j < 5; ++j) {
    double mu = 0, var = 0;
    for (int r = 0; r < 7; ++r) mu += x(r, j) / 7;
    for (int r = 0; r < 7; ++r) var += (x(r, j) - mu) * (x(r, j) - mu) / 7;
    for (int r = 0; r < 7; ++r)
      CHECK(y(r, j) == doctest::Approx((x(r, j) - mu) / std::sqrt(var + 1e-5) * bn.weight.value(j) +
                                       bn.bias.value(j)).epsilon(1e-12));
    CHECK(bn.running_mean.value(j) == doctest::Approx(0.1 * mu).epsilon(1e-12));
    CHECK(bn.running_var.value(j) == doctest::Approx(0.9 + 0.1 * var * 7 / 6).epsilon(1e-12));
  }
  CHECK(bn.num_batches_tracked == 1);
  check_module_gradients(
      ps, x, {7, 5}, [&](auto& in, auto out) { bn.forward(in, out, false); },
      [&](auto& in, auto dy, auto dx) { bn.backward(in, dy, dx); });
}

TEST_CASE_TEMPLATE("Weight generator: unit prototypes and gradients", Out, std::integral_constant<int, 6>,
                   std::integral_constant<int, 4>) {
  // Out == in: identity skip (G^b); Out != in: Linear skip (G^d).
  const int K = 9, C = 6, H = 8;
  WeightGenerator<double> gen(C, H, Out::value, 3.0);
  ParameterStore<double> ps(gen);
  ps.initialize(2);
  perturb_norms_and_biases(ps);
  CHECK(gen.scale.value(0) == 3.0);
  CHECK_FALSE(ps.find("scale")->trainable);
  CHECK((ps.find("layers_w.0.skip.weight") != nullptr) == (Out::value != C));
  Tensor<double> E({K, C});
  fill_uniform(E, Philox(6), 0, -1, 1);
  auto W = gen.forward(E);
  for (int k = 0; k < K; ++k) {
    double ss = 0;
    for (int c = 0; c < Out::value; ++c) ss += W(k, c) * W(k, c);
    CHECK(std::sqrt(ss) == doctest::Approx(1.0).epsilon(1e-12));
  }
  // Gradients w.r.t. every generator parameter (E is a constant input).
  check_module_gradients(
      ps, E, {K, Out::value},
      [&](auto& in, auto out) { copy(gen.forward(in), out); },
      [&](auto&, auto dy, auto) {
        Tensor<double> g = Tensor<double>(dy.shape());
        copy(dy, TensorView<double>(g));
        gen.backward(g);
      },
      /*check_input=*/false);
}

TEST_CASE("Condenser decoder: gradients w.r.t. g, the intermediate tokens and its parameters") {
  const std::int64_t N = 2, Dm = 8, grid = 3, lk = 3, ld = 6;
  DecoderConfig dc;
  dc.dim = 8;
  dc.depth = 2;  // two blocks: the second runs its backward on the first one's scratch
  dc.heads = 2;
  CondenserDecoder<double> dec(Dm, grid, dc);
  ParameterStore<double> ps(dec);
  ps.initialize(4);
  perturb_norms_and_biases(ps);
  Tensor<Index> decoded({N, ld});
  const Index order[2][6] = {{4, 0, 8, 2, 7, 5}, {1, 3, 6, 0, 8, 2}};
  for (int n = 0; n < N; ++n)
    for (int j = 0; j < ld; ++j) decoded(n, j) = order[n][j];
  Tensor<double> g({N, Dm}), mid({N, 1 + lk, Dm});
  fill_uniform(g, Philox(7), 0, -1, 1);
  fill_uniform(mid, Philox(7), 1, -1, 1);
  // The intermediate's class token is discarded: changing it changes nothing.
  auto out1 = Tensor<double>({N * ld, dc.dim});
  copy(dec.forward(g, mid, decoded), TensorView<double>(out1));
  mid(0, 0, 0) += 5.0;
  auto out2 = dec.forward(g, mid, decoded);
  for (std::int64_t i = 0; i < out1.numel(); ++i) CHECK(out2.data()[i] == out1.data()[i]);
  // Gradient w.r.t. mid (input of the checker) and every parameter.
  check_module_gradients(
      ps, mid, {N * ld, dc.dim},
      [&](auto& in, auto out) { copy(dec.forward(g, in, decoded), out); },
      [&](auto&, auto dy, auto dx) {
        Tensor<double> dg({N, Dm});
        dec.backward(dy, dg, dx);
      });
  // Gradient w.r.t. g.
  Tensor<double> r({N * ld, dc.dim}), dg({N, Dm}), dmid({N, 1 + lk, Dm});
  fill_uniform(r, Philox(8), 0, -1, 1);
  auto loss = [&] {
    return testing::dot(dec.forward(g, mid, decoded), TensorView<double>(r));
  };
  loss();
  dec.backward(r, dg, dmid);
  const auto rep = testing::gradcheck("g", g, dg, loss);
  CHECK_MESSAGE(rep.ok, rep.message());
  CHECK(rep.grad_norm > 0);
  for (int c = 0; c < Dm; ++c) CHECK(dmid(1, 0, c) == 0.0);
}

TEST_CASE("Condenser decoder: its blocks share one set of backward scratch") {
  // What a backward adds to the memory a forward left: the decoder's gradient buffers and one
  // block's scratch, whatever the depth.
  auto backward_growth = [](std::int64_t depth) {
    const std::int64_t N = 4, Dm = 16, grid = 4, lk = 6, ld = 10;
    DecoderConfig dc;
    dc.dim = 32;
    dc.depth = depth;
    dc.heads = 4;
    CondenserDecoder<float> dec(Dm, grid, dc);
    ParameterStore<float> ps(dec);
    ps.initialize(6);
    Tensor<Index> decoded({N, ld});
    for (int n = 0; n < N; ++n)
      for (int j = 0; j < ld; ++j) decoded(n, j) = static_cast<Index>((n + 3 * j) % (grid * grid));
    Tensor<float> g({N, Dm}), mid({N, 1 + lk, Dm}), dout({N * ld, dc.dim});
    Tensor<float> dg({N, Dm}), dmid({N, 1 + lk, Dm});
    fill_uniform(g, Philox(9), 0, -1, 1);
    fill_uniform(mid, Philox(9), 1, -1, 1);
    fill_uniform(dout, Philox(9), 2, -1, 1);
    dec.forward(g, mid, decoded);
    const std::int64_t before = memory_stats<Cpu>().bytes_in_use;
    dec.backward(dout, dg, dmid);
    return memory_stats<Cpu>().bytes_in_use - before;
  };
  const std::int64_t one = backward_growth(1), three = backward_growth(3);
  MESSAGE("memory a decoder backward adds: depth 1 ", one, " bytes, depth 3 ", three);
  CHECK(one > 0);
  CHECK(three == one);
}
