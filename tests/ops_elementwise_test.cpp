// Elementwise ops (fill, axpby, scale, add, mul, add_bias, gelu, relu) against double loops,
// their gradients, the aliasing they allow and their shape errors.
#include <array>
#include <string>

#include "reference.hpp"

using namespace moca;
using namespace moca::test;

namespace {
// 65537 elements go through the threaded path of every elementwise kernel.
constexpr std::array<i64, 8> kSizes = {1, 3, 7, 33, 65, 257, 4099, 65537};

std::string label(const char* what, i64 n) { return detail::str(what, " n=", n); }
}  // namespace

TEST_CASE_TEMPLATE("fill and zero set every element", T, float, double) {
  for (i64 n : kSizes) {
    auto x = uniform<T>({n}, 1);
    ops::fill(x, 3.5);
    CHECK(std::count(x.begin(), x.end(), T(3.5)) == n);
    ops::zero(x);
    CHECK(std::count(x.begin(), x.end(), T(0)) == n);
  }
  // Rank does not matter: the whole tensor is filled.
  Tensor<T> t({3, 5, 7});
  ops::fill(t, -2);
  CHECK(std::count(t.begin(), t.end(), T(-2)) == t.numel());
}

TEST_CASE_TEMPLATE("axpby, axpy and scale match the reference", T, float, double) {
  std::uint64_t stream = 10;
  for (i64 n : kSizes) {
    auto x = uniform<T>({n}, stream++), y = uniform<T>({n}, stream++);
    const Vec xv = to_vec<T>(x), yv = to_vec<T>(y);
    Vec e(xv.size());

    auto z = y.clone();
    ops::axpby(1.5, x, -0.25, z);
    for (std::size_t i = 0; i < e.size(); ++i) e[i] = 1.5 * xv[i] - 0.25 * yv[i];
    check_close(label("axpby", n), z, e);

    z = y.clone();
    ops::axpy(-2.0, x, z);
    for (std::size_t i = 0; i < e.size(); ++i) e[i] = -2.0 * xv[i] + yv[i];
    check_close(label("axpy", n), z, e);

    // beta = 0 overwrites y: NaN in y does not propagate.
    fill_nan<T>(z);
    ops::axpby(0.5, x, 0.0, z);
    for (std::size_t i = 0; i < e.size(); ++i) e[i] = 0.5 * xv[i];
    check_close(label("axpby beta=0", n), z, e);

    z = x.clone();
    ops::scale(z, -3.0);
    for (std::size_t i = 0; i < e.size(); ++i) e[i] = -3.0 * xv[i];
    check_close(label("scale", n), z, e);
  }
}

TEST_CASE_TEMPLATE("add and mul match the reference, in place too", T, float, double) {
  std::uint64_t stream = 100;
  for (i64 n : kSizes) {
    auto a = uniform<T>({n}, stream++), b = uniform<T>({n}, stream++);
    const Vec av = to_vec<T>(a), bv = to_vec<T>(b);
    Vec sum(av.size()), prod(av.size()), square(av.size());
    for (std::size_t i = 0; i < av.size(); ++i) {
      sum[i] = av[i] + bv[i];
      prod[i] = av[i] * bv[i];
      square[i] = av[i] * av[i];
    }
    Tensor<T> ys({n}), yp({n});
    ops::add(a, b, ys);
    check_close(label("add", n), ys, sum);
    ops::mul(a, b, yp);
    check_close(label("mul", n), yp, prod);

    // y may alias a or b (or both): the same values as into a separate output.
    auto a1 = a.clone(), b1 = b.clone();
    ops::add(a1, b, a1);
    ops::add(a, b1, b1);
    check_bitwise(label("add y=a", n), a1, ys);
    check_bitwise(label("add y=b", n), b1, ys);
    a1 = a.clone(), b1 = b.clone();
    ops::mul(a1, b, a1);
    ops::mul(a, b1, b1);
    check_bitwise(label("mul y=a", n), a1, yp);
    check_bitwise(label("mul y=b", n), b1, yp);
    a1 = a.clone();
    ops::mul(a1, a1, a1);
    check_close(label("mul y=a=b", n), a1, square);
    a1 = a.clone();
    ops::add(a1, a1, a1);
    Vec twice(av.size());
    for (std::size_t i = 0; i < av.size(); ++i) twice[i] = 2 * av[i];
    check_close(label("add y=a=b", n), a1, twice);
  }
}

TEST_CASE_TEMPLATE("add_bias adds the bias to every row", T, float, double) {
  std::uint64_t stream = 200;
  for (const Shape& s : {Shape{1, 1}, Shape{7, 3}, Shape{33, 65}, Shape{3, 5, 257}, Shape{257, 129},
                         Shape{65}}) {
    auto x = uniform<T>(s, stream++);
    auto bias = uniform<T>({s.last()}, stream++);
    const Vec xv = to_vec<T>(x), bv = to_vec<T>(bias);
    Vec e(xv.size());
    for (std::size_t i = 0; i < e.size(); ++i) e[i] = xv[i] + bv[i % bv.size()];
    ops::add_bias(x, bias);
    check_close(detail::str("add_bias ", s), x, e);
  }
}

TEST_CASE_TEMPLATE("gelu and gelu_backward match the erf form", T, float, double) {
  std::uint64_t stream = 300;
  for (i64 n : kSizes) {
    auto x = uniform<T>({n}, stream++, -5, 5), dy = uniform<T>({n}, stream++);
    const Vec xv = to_vec<T>(x), dyv = to_vec<T>(dy);
    Vec y_ref(xv.size()), dx_ref(xv.size());
    for (std::size_t i = 0; i < xv.size(); ++i) {
      y_ref[i] = ref::gelu(xv[i]);
      dx_ref[i] = dyv[i] * ref::gelu_grad(xv[i]);
    }
    Tensor<T> y({n}), dx({n});
    ops::gelu(x, y);
    ops::gelu_backward(x, dy, dx);
    // Normwise: in float, 1 + erf(x) loses its relative accuracy for x << 0, where gelu is tiny.
    check_close(label("gelu", n), y, y_ref);
    check_close(label("gelu_backward", n), dx, dx_ref);
    // dx may alias dy.
    auto g = dy.clone();
    ops::gelu_backward(x, g, g);
    check_bitwise(label("gelu_backward dx=dy", n), g, dx);
  }
  // Known values: gelu(0) = 0, gelu'(0) = 1/2, gelu(x) -> x for large x.
  Tensor<T> x({3}), y({3}), one({3}), dx({3});
  x(0) = 0, x(1) = 10, x(2) = -10;
  ops::fill(one, 1);
  ops::gelu(x, y);
  ops::gelu_backward(x, one, dx);
  CHECK(y(0) == T(0));
  CHECK(y(1) == T(10));
  CHECK(std::abs(y(2)) < T(1e-20));
  CHECK(dx(0) == T(0.5));
}

TEST_CASE("gelu in float keeps its relative accuracy in both tails") {
  // The vectorised float path computes Φ(x) = ½ erfc(-x/√2) with relative accuracy in both
  // tails, so even gelu(-9) ≈ -1e-18 is right to a few parts in a million, element by element.
  // (std::erf in float cannot: 1 + erf(x) cancels. That path runs only without AVX2.)
  const i64 n = 36001;
  Tensor<float> x({n}), y({n}), one({n}), dx({n});
  for (i64 i = 0; i < n; ++i) x(i) = -9.0f + 18.0f * static_cast<float>(i) / float(n - 1);
  ops::fill(one, 1);
  ops::gelu(x, y);
  ops::gelu_backward(x, one, dx);
  // The reference uses erfc: 1 + erf(x) cancels in double too (to 0 at x = -9).
  Vec y_ref(n), dx_ref(n);
  for (i64 i = 0; i < n; ++i) {
    const double xv = x(i), cdf = 0.5 * std::erfc(-xv / std::sqrt(2.0));
    y_ref[i] = xv * cdf;
    dx_ref[i] = cdf + xv * std::exp(-0.5 * xv * xv) / std::sqrt(2 * 3.14159265358979);
  }
#ifdef MOCA_CPU_SIMD_MATH
  check_close_scaled("gelu, elementwise", y, y_ref, 2e-6, Vec(n, 0.0));
  // gelu' crosses zero near x = -0.75; measure its error against |Φ| + |x φ| there.
  Vec dscale(n);
  for (i64 i = 0; i < n; ++i) {
    const double xv = x(i), pdf = std::exp(-0.5 * xv * xv) / std::sqrt(2 * 3.14159265358979);
    dscale[i] = std::abs(xv) * pdf;
  }
  check_close_scaled("gelu_backward, elementwise", dx, dx_ref, 2e-6, dscale);
#else
  check_close("gelu", y, y_ref);
  check_close("gelu_backward", dx, dx_ref);
#endif
}

TEST_CASE_TEMPLATE("relu and relu_backward", T, float, double) {
  std::uint64_t stream = 400;
  for (i64 n : kSizes) {
    auto x = uniform<T>({n}, stream++), dy = uniform<T>({n}, stream++);
    x.data()[0] = T(0);  // the subgradient at 0 is 0
    const Vec xv = to_vec<T>(x), dyv = to_vec<T>(dy);
    Vec y_ref(xv.size()), dx_ref(xv.size());
    for (std::size_t i = 0; i < xv.size(); ++i) {
      y_ref[i] = xv[i] > 0 ? xv[i] : 0.0;
      dx_ref[i] = xv[i] > 0 ? dyv[i] : 0.0;
    }
    if (n == 1) {  // a lone 0: both references are legitimately zero
      y_ref[0] = dx_ref[0] = 0;
      Tensor<T> y({1}), dx({1});
      fill_nan<T>(y);
      fill_nan<T>(dx);
      ops::relu(x, y);
      ops::relu_backward(x, dy, dx);
      CHECK(y(0) == T(0));
      CHECK(dx(0) == T(0));
      continue;
    }
    Tensor<T> y({n}), dx({n});
    ops::relu(x, y);
    ops::relu_backward(x, dy, dx);
    check_exact(label("relu", n), y, y_ref);
    check_exact(label("relu_backward", n), dx, dx_ref);
    auto g = dy.clone();
    ops::relu_backward(x, g, g);
    check_bitwise(label("relu_backward dx=dy", n), g, dx);
    // y may alias x.
    auto z = x.clone();
    ops::relu(z, z);
    check_exact(label("relu in place", n), z, y_ref);
  }
}

TEST_CASE("elementwise gradients pass gradcheck") {
  for (const Shape& s : {Shape{1}, Shape{3, 7}, Shape{2, 3, 5}}) {
    const std::string sh = s.str();
    auto r = uniform<double>(s, 500);
    Tensor<double> y(s), dx(s);

    auto x = uniform<double>(s, 501, -3, 3);
    auto gelu_loss = [&] {
      ops::gelu(x, y);
      return testing::dot<double>(r, y);
    };
    ops::gelu_backward(x, r, dx);
    check_gradient("gelu " + sh, x, dx, gelu_loss);

    // relu away from its kink: |x| >= 0.1, far beyond the finite-difference step.
    auto xr = uniform<double>(s, 502, 0.1, 1.0);
    for (i64 i = 1; i < xr.numel(); i += 2) xr.data()[i] = -xr.data()[i];
    auto relu_loss = [&] {
      ops::relu(xr, y);
      return testing::dot<double>(r, y);
    };
    ops::relu_backward(xr, r, dx);
    check_gradient("relu " + sh, xr, dx, relu_loss);

    // add_bias: dx = dy, dbias = the column sums of dy.
    auto xb = uniform<double>(s, 503);
    auto bias = uniform<double>({s.last()}, 504);
    Tensor<double> dbias({s.last()});
    auto bias_loss = [&] {
      moca::copy<double, Cpu, Cpu>(xb, y);
      ops::add_bias(y, bias);
      return testing::dot<double>(r, y);
    };
    ops::sum(r.matrix(), 0, dbias);
    check_gradient("add_bias x " + sh, xb, r, bias_loss);
    check_gradient("add_bias bias " + sh, bias, dbias, bias_loss);
  }
}

TEST_CASE("elementwise shape errors name the shapes") {
  Tensor<float> a({3, 4}), b({4, 4}), c({2, 6});
  check_error_names("axpby", [&] { ops::axpby(1, a, 1, b); }, {"axpby", "[3, 4]", "[4, 4]"});
  check_error_names("axpy", [&] { ops::axpy(1, b, a); }, {"axpby", "[4, 4]", "[3, 4]"});
  check_error_names("add", [&] { ops::add(a, b, a); }, {"add", "[3, 4]", "[4, 4]"});
  check_error_names("add out", [&] { ops::add(a, a, b); }, {"add", "[3, 4]", "[4, 4]"});
  check_error_names("mul", [&] { ops::mul(b, a, a); }, {"mul", "[4, 4]", "[3, 4]"});
  check_error_names("mul out", [&] { ops::mul(a, a, b); }, {"mul", "[3, 4]", "[4, 4]"});
  Tensor<float> bias({3});
  check_error_names("add_bias", [&] { ops::add_bias(a, bias); }, {"add_bias", "[3]", "[3, 4]"});
  check_error_names("gelu", [&] { ops::gelu(a, b); }, {"gelu", "[3, 4]", "[4, 4]"});
  check_error_names("gelu_backward dy", [&] { ops::gelu_backward(a, b, a); },
                    {"gelu_backward", "[3, 4]", "[4, 4]"});
  check_error_names("gelu_backward dx", [&] { ops::gelu_backward(a, a, b); },
                    {"gelu_backward", "[3, 4]", "[4, 4]"});
  check_error_names("relu", [&] { ops::relu(b, a); }, {"relu", "[4, 4]", "[3, 4]"});
  check_error_names("relu_backward dy", [&] { ops::relu_backward(a, b, a); },
                    {"relu_backward", "[3, 4]", "[4, 4]"});
  check_error_names("relu_backward dx", [&] { ops::relu_backward(a, a, b); },
                    {"relu_backward", "[3, 4]", "[4, 4]"});
  // Elementwise ops compare sizes: a [2, 6] output serves a [3, 4] input.
  CHECK_NOTHROW(ops::add(a, a, c));
}
