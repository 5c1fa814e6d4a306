// Layers: forward values and backward against central differences in double.
#include <doctest/doctest.h>

#include <cmath>
#include <moca/nn/block.hpp>
#include <moca/nn/patch_embed.hpp>

#include "layer_check.hpp"

using namespace moca;
using moca::test::check_module_gradients;

namespace {
Tensor<double> random_tensor(Shape s, std::uint64_t stream, double scale = 1.0) {
  Tensor<double> t(s);
  fill_uniform(t, Philox(7), stream, -scale, scale);
  return t;
}
}  // namespace

TEST_CASE("Linear: y = x Wᵀ + b and its gradients") {
  for (bool bias : {true, false}) {
    Linear<double> lin(5, 4, bias);
    ParameterStore<double> ps(lin);
    ps.initialize(3);
    if (bias) fill_uniform(lin.bias.value, Philox(1), 2, -0.5, 0.5);  // non-zero bias
    auto x = random_tensor({2, 3, 5}, 1);
    Tensor<double> y({2, 3, 4});
    lin.forward(x, y);
    for (int n = 0; n < 2; ++n)
      for (int t = 0; t < 3; ++t)
        for (int o = 0; o < 4; ++o) {
          double ref = bias ? lin.bias.value(o) : 0.0;
          for (int i = 0; i < 5; ++i) ref += x(n, t, i) * lin.weight.value(o, i);
          CHECK(y(n, t, o) == doctest::Approx(ref).epsilon(1e-12));
        }
    check_module_gradients(
        ps, x, {2, 3, 4}, [&](auto& in, auto out) { lin.forward(in, out); },
        [&](auto& in, auto dy, auto dx) { lin.backward(in, dy, dx); });
  }
}

TEST_CASE("Linear: Xavier-uniform weight within its bound, zero bias") {
  Linear<double> lin(300, 200);
  ParameterStore<double> ps(lin);
  ps.initialize(0);
  const double bound = std::sqrt(6.0 / 500.0);
  double mx = 0, ss = 0;
  for (double w : lin.weight.value) {
    mx = std::max(mx, std::abs(w));
    ss += w * w;
  }
  CHECK(mx <= bound);
  CHECK(mx > 0.99 * bound);
  // Variance of U(-a, a) is a²/3.
  CHECK(ss / 60000.0 == doctest::Approx(bound * bound / 3).epsilon(0.03));
  for (double b : lin.bias.value) CHECK(b == 0.0);
}

TEST_CASE("LayerNorm: normalised rows and gradients") {
  LayerNorm<double> ln(7, 1e-6);
  ParameterStore<double> ps(ln);
  ps.initialize(0);
  fill_uniform(ln.weight.value, Philox(2), 1, 0.5, 1.5);
  fill_uniform(ln.bias.value, Philox(2), 2, -0.5, 0.5);
  auto x = random_tensor({3, 4, 7}, 2, 3.0);
  Tensor<double> y({3, 4, 7});
  ln.forward(x, y);
  for (int r = 0; r < 12; ++r) {
    double mu = 0, var = 0;
    for (int j = 0; j < 7; ++j) mu += x.data()[r * 7 + j] / 7;
    for (int j = 0; j < 7; ++j) var += std::pow(x.data()[r * 7 + j] - mu, 2) / 7;
    for (int j = 0; j < 7; ++j) {
      const double ref = (x.data()[r * 7 + j] - mu) / std::sqrt(var + 1e-6) * ln.weight.value(j) +
                         ln.bias.value(j);
      CHECK(y.data()[r * 7 + j] == doctest::Approx(ref).epsilon(1e-12));
    }
  }
  check_module_gradients(
      ps, x, {3, 4, 7}, [&](auto& in, auto out) { ln.forward(in, out); },
      [&](auto& in, auto dy, auto dx) { ln.backward(in, dy, dx); });
}

TEST_CASE_TEMPLATE("Mlp gradients", Act, Gelu, Relu) {
  Mlp<double, Cpu, Act> mlp(6, 10);
  ParameterStore<double> ps(mlp);
  ps.initialize(4);
  auto x = random_tensor({2, 3, 6}, 3);
  check_module_gradients(
      ps, x, {2, 3, 6}, [&](auto& in, auto out) { mlp.forward(in, out); },
      [&](auto& in, auto dy, auto dx) { mlp.backward(in, dy, dx); });
}

TEST_CASE("MultiHeadAttention: matches a per-head reference and passes gradcheck") {
  const int B = 2, S = 5, Dm = 8, H = 2, hd = 4;
  MultiHeadAttention<double> attn(Dm, H);
  ParameterStore<double> ps(attn);
  ps.initialize(5);
  fill_uniform(attn.qkv.bias.value, Philox(3), 1, -0.3, 0.3);
  fill_uniform(attn.proj.bias.value, Philox(3), 2, -0.3, 0.3);
  auto x = random_tensor({B, S, Dm}, 4);
  Tensor<double> y({B, S, Dm});
  attn.forward(x, y);
  // Reference: the textbook computation on the qkv layout [q | k | v], heads head-major.
  Tensor<double> qkv({B, S, 3 * Dm}), ctx({B, S, Dm}), ref({B, S, Dm});
  attn.qkv.forward(x, qkv);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < S; ++i) {
        double p[S], mx = -1e300, sum = 0;
        for (int j = 0; j < S; ++j) {
          double s = 0;
          for (int c = 0; c < hd; ++c) s += qkv(b, i, h * hd + c) * qkv(b, j, Dm + h * hd + c);
          p[j] = s / std::sqrt(double(hd));
          mx = std::max(mx, p[j]);
        }
        for (int j = 0; j < S; ++j) sum += (p[j] = std::exp(p[j] - mx));
        for (int c = 0; c < hd; ++c) {
          double o = 0;
          for (int j = 0; j < S; ++j) o += p[j] / sum * qkv(b, j, 2 * Dm + h * hd + c);
          ctx(b, i, h * hd + c) = o;
        }
      }
  attn.proj.forward(ctx, ref);
  for (std::int64_t i = 0; i < y.numel(); ++i)
    CHECK(y.data()[i] == doctest::Approx(ref.data()[i]).epsilon(1e-12));
  check_module_gradients(
      ps, x, {B, S, Dm}, [&](auto& in, auto out) { attn.forward(in, out); },
      [&](auto& in, auto dy, auto dx) { attn.backward(in, dy, dx); });
}

TEST_CASE("Block: pre-norm residual structure and gradients") {
  Block<double> block(BlockConfig{8, 2, 16, 1e-6});
  ParameterStore<double> ps(block);
  ps.initialize(6);
  // Non-trivial norms and biases, so that every path carries gradient.
  for (const auto& e : ps.entries())
    if (e.name.find("norm") != std::string::npos || e.name.ends_with(".bias"))
      fill_uniform(ps.view(e), Philox(4), name_stream(e.name), 0.5, 1.5);
  auto x = random_tensor({2, 4, 8}, 5);
  Tensor<double> y({2, 4, 8}), mid({2, 4, 8}), n1({2, 4, 8}), n2({2, 4, 8}), m({2, 4, 8});
  block.forward(x, y);
  // Reference from the parts.
  block.norm1.forward(x, n1);
  block.attn.forward(n1, mid);
  ops::add(TensorView<double>(x), TensorView<double>(mid), TensorView<double>(mid));
  block.norm2.forward(mid, n2);
  block.mlp.forward(n2, m);
  for (std::int64_t i = 0; i < y.numel(); ++i)
    CHECK(y.data()[i] == doctest::Approx(mid.data()[i] + m.data()[i]).epsilon(1e-12));
  check_module_gradients(
      ps, x, {2, 4, 8}, [&](auto& in, auto out) { block.forward(in, out); },
      [&](auto& in, auto dy, auto dx) { block.backward(in, dy, dx); });
}

namespace {
// An MLP with no forward_add: a Block adds its residual in a pass of its own.
class PlainMlp {
 public:
  Mlp<double> mlp;
  PlainMlp(std::int64_t dim, std::int64_t hidden) : mlp(dim, hidden) {}
  template <class V>
  void visit(V&& v) {
    mlp.visit(v);
  }
  void forward(const TensorView<double>& x, const TensorView<double>& y) { mlp.forward(x, y); }
  void backward(const TensorView<double>& x, const TensorView<double>& dy,
                const TensorView<double>& dx) {
    mlp.backward(x, dy, dx);
  }
};
static_assert(ResidualMlp<Mlp<double>, double, Cpu>);
static_assert(MlpLayer<PlainMlp, double, Cpu> && !ResidualMlp<PlainMlp, double, Cpu>);
}  // namespace

TEST_CASE("Mlp::forward_add adds the residual; a Block computes the same with either MLP") {
  Mlp<double> mlp(6, 10);
  ParameterStore<double> ps(mlp);
  ps.initialize(4);
  const auto x = random_tensor({2, 3, 6}, 3), r = random_tensor({2, 3, 6}, 4);
  Tensor<double> y({2, 3, 6}), z({2, 3, 6});
  mlp.forward(x, y);
  mlp.forward_add(x, r, z);
  for (std::int64_t i = 0; i < y.numel(); ++i)
    CHECK(z.data()[i] == doctest::Approx(y.data()[i] + r.data()[i]).epsilon(1e-14));
  CHECK_THROWS_AS(mlp.forward_add(x, z, z), Error);  // the output may not be the residual

  // Blocks with the same weights, one with a plain MLP: the same output and gradients.
  Block<double> fused(BlockConfig{8, 2, 16, 1e-6});
  Block<double, Cpu, MultiHeadAttention<double>, PlainMlp> plain(BlockConfig{8, 2, 16, 1e-6});
  ParameterStore<double> pf(fused), pp(plain);
  pf.initialize(6);
  REQUIRE(pf.num_trainable() == pp.num_trainable());
  copy(pf.values(), pp.values());
  const auto in = random_tensor({2, 4, 8}, 5), dy = random_tensor({2, 4, 8}, 6);
  Tensor<double> yf({2, 4, 8}), yp({2, 4, 8}), dxf({2, 4, 8}), dxp({2, 4, 8});
  fused.forward(in, yf);
  plain.forward(in, yp);
  fused.backward(in, dy, dxf);
  plain.backward(in, dy, dxp);
  for (std::int64_t i = 0; i < yf.numel(); ++i) {
    CHECK(yf.data()[i] == doctest::Approx(yp.data()[i]).epsilon(1e-14));
    CHECK(dxf.data()[i] == doctest::Approx(dxp.data()[i]).epsilon(1e-14));
  }
}

TEST_CASE("PatchEmbed: equals a strided convolution and passes gradcheck") {
  const int N = 2, C = 2, H = 4, W = 6, p = 2, Dm = 3;
  PatchEmbed<double> pe(C, p, Dm);
  ParameterStore<double> ps(pe);
  ps.initialize(7);
  CHECK(pe.proj.weight.value.shape() == Shape{Dm, C, p, p});
  auto x = random_tensor({N, C, H, W}, 6);
  const int L = (H / p) * (W / p);
  Tensor<double> y({N, L, Dm});
  pe.forward(x, y);
  for (int n = 0; n < N; ++n)
    for (int gy = 0; gy < H / p; ++gy)
      for (int gx = 0; gx < W / p; ++gx)
        for (int d = 0; d < Dm; ++d) {
          double ref = pe.proj.bias.value(d);
          for (int c = 0; c < C; ++c)
            for (int ky = 0; ky < p; ++ky)
              for (int kx = 0; kx < p; ++kx)
                ref += pe.proj.weight.value(d, c, ky, kx) * x(n, c, gy * p + ky, gx * p + kx);
          CHECK(y(n, gy * (W / p) + gx, d) == doctest::Approx(ref).epsilon(1e-12));
        }
  // Default conv bias init: U(±1/sqrt(fan_in)), not zero.
  for (double b : pe.proj.bias.value) CHECK(std::abs(b) <= 1.0 / std::sqrt(C * p * p));
  check_module_gradients(
      ps, x, {N, L, Dm}, [&](auto& in, auto out) { pe.forward(in, out); },
      [&](auto&, auto dy, auto dx) { pe.backward(dy, dx); });
}
