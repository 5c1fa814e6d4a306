// Row ops (softmax, log_softmax, layer_norm, l2_normalize, l1_normalize) and their backwards against double
// loops; gradients, aliasing, thread-count independence and shape errors.
#include <array>
#include <cmath>
#include <limits>
#include <string>

#include "reference.hpp"

using namespace moca;
using namespace moca::test;

namespace {
// Rows of odd lengths, a single row, a rank-3 tensor (rows over two leading dimensions) and a
// [257, 257] case large enough for the threaded path.
const std::array<Shape, 9> kShapes = {{{1, 3},
                                       {3, 7},
                                       {7, 33},
                                       {33, 65},
                                       {65, 257},
                                       {257, 7},
                                       {1, 257},
                                       {257, 257},
                                       {3, 5, 33}}};

std::string label(const char* what, const Shape& s) { return detail::str(what, " ", s); }

constexpr double kEps = 1e-5;

/// An empty view: "no gamma", "no dgamma".
template <class T>
TensorView<T> none() {
  return {};
}
}  // namespace

TEST_CASE_TEMPLATE("softmax and log_softmax match the reference", T, float, double) {
  std::uint64_t stream = 1;
  for (const Shape& s : kShapes) {
    const i64 M = s.leading(), N = s.last();
    auto x = uniform<T>(s, stream++, -4, 4), dy = uniform<T>(s, stream++);
    Tensor<T> y(s), ly(s), dx(s), ldx(s);
    ops::softmax(x, y);
    ops::log_softmax(x, ly);
    const Vec xv = to_vec<T>(x);
    check_close_rows(label("softmax", s), y, ref::softmax(xv, M, N, false));
    check_close_rows(label("log_softmax", s), ly, ref::softmax(xv, M, N, true));

    // Backwards from the op's own outputs, as a layer calls them.
    fill_nan<T>(dx);
    fill_nan<T>(ldx);
    ops::softmax_backward(y, dy, dx);
    ops::log_softmax_backward(ly, dy, ldx);
    check_close_rows(label("softmax_backward", s), dx,
                     ref::softmax_backward(to_vec<T>(y), to_vec<T>(dy), M, N, false));
    check_close_rows(label("log_softmax_backward", s), ldx,
                     ref::softmax_backward(to_vec<T>(ly), to_vec<T>(dy), M, N, true));

    // dx may alias dy.
    auto g = dy.clone();
    ops::softmax_backward(y, g, g);
    check_bitwise(label("softmax_backward dx=dy", s), g, dx);
    g = dy.clone();
    ops::log_softmax_backward(ly, g, g);
    check_bitwise(label("log_softmax_backward dx=dy", s), g, ldx);
  }
}

TEST_CASE_TEMPLATE("softmax of a single column is one, and large logits do not overflow", T, float,
                   double) {
  auto x = uniform<T>({5, 1}, 50, -100, 100);
  Tensor<T> y({5, 1});
  ops::softmax(x, y);
  for (T v : y) CHECK(v == T(1));
  ops::log_softmax(x, y);
  for (T v : y) CHECK(v == T(0));
  // exp(1000) overflows; the max-shifted form does not.
  Tensor<T> big({1, 3}), p({1, 3});
  big(0, 0) = 1000, big(0, 1) = 999, big(0, 2) = -1000;
  ops::softmax(big, p);
  check_close("softmax of large logits", p, ref::softmax({1000, 999, -1000}, 1, 3, false));
}

TEST_CASE_TEMPLATE("softmax: a -inf logit has probability 0, a NaN logit poisons its row", T,
                   float, double) {
  // Rows of 11 cross the 8-lane boundary of the vectorised float path.
  const T inf = std::numeric_limits<T>::infinity();
  auto x = uniform<T>({3, 11}, 60, -3, 3);
  x(0, 9) = -inf;
  x(1, 2) = std::numeric_limits<T>::quiet_NaN();
  Tensor<T> p({3, 11}), lp({3, 11});
  ops::softmax(x, p);
  ops::log_softmax(x, lp);
  CHECK(p(0, 9) == T(0));
  CHECK(lp(0, 9) == -inf);
  T row0 = 0;
  for (i64 j = 0; j < 11; ++j) row0 += p(0, j);
  CHECK(std::abs(row0 - T(1)) < T(1e-6));
  for (i64 j = 0; j < 11; ++j) {
    CHECK_MESSAGE(std::isnan(p(1, j)), "softmax column ", j);
    CHECK_MESSAGE(std::isnan(lp(1, j)), "log_softmax column ", j);
    CHECK(std::isfinite(p(2, j)));
  }
}

TEST_CASE_TEMPLATE("softmax_with_spread: codes and max − mean of every row, fused and composed",
                   T, float, double) {
  std::uint64_t stream = 900;
  for (const Shape& s : kShapes) {
    const i64 M = s.leading(), N = s.last();
    // Cosine-like values; scale = inv_delta / dist_norm of MOCA's first steps.
    const Tensor<T> x = uniform<T>(s, stream++, -1, 1);
    const double scale = 20.0;
    Vec scaled = to_vec<T>(x), spread(static_cast<std::size_t>(M));
    for (i64 r = 0; r < M; ++r) {
      double mx = -1e300, sum = 0;
      for (i64 j = 0; j < N; ++j) mx = std::max(mx, scaled[r * N + j]), sum += scaled[r * N + j];
      spread[r] = mx - sum / static_cast<double>(N);
    }
    for (double& v : scaled) v *= scale;
    const Vec codes = ref::softmax(scaled, M, N, false);
    Tensor<T> fused(s), composed(s), sp_fused({M}), sp_composed({M}), ws;
    copy(TensorView<T>(x), TensorView<T>(fused));
    copy(TensorView<T>(x), TensorView<T>(composed));
    ops::softmax_with_spread(TensorView<T>(fused), scale, TensorView<T>(sp_fused), ws);
    CHECK(ws.numel() == 0);  // the fused kernel needs no workspace
    ops::softmax_impl::spread_composed(TensorView<T>(composed), T(scale),
                                       TensorView<T>(sp_composed), ws);
    check_close_rows(label("fused codes", s), TensorView<T>(fused), codes);
    check_close_rows(label("composed codes", s), TensorView<T>(composed), codes);
    check_close(label("fused spread", s), TensorView<T>(sp_fused), spread, kRel<T> * 10);
    check_close(label("composed spread", s), TensorView<T>(sp_composed), spread, kRel<T> * 10);
  }
  Tensor<T> x({2, 3}), sp({2}), ws;
  const TensorView<T> xv = x;
  check_error_names("spread size", [&] { ops::softmax_with_spread(xv, 1.0, xv, ws); },
                    {"softmax_with_spread", "[2, 3]"});
  check_error_names("scale", [&] { ops::softmax_with_spread(xv, 0.0, TensorView<T>(sp), ws); },
                    {"softmax_with_spread", "positive"});
}

TEST_CASE_TEMPLATE("layer_norm matches the reference, with and without affine parameters", T,
                   float, double) {
  std::uint64_t stream = 100;
  for (const Shape& s : kShapes) {
    const i64 M = s.leading(), N = s.last();
    // Offset inputs: the mean must really be subtracted.
    auto x = uniform<T>(s, stream++, 1, 5);
    auto gamma = uniform<T>({N}, stream++, 0.5, 1.5), beta = uniform<T>({N}, stream++);
    const Vec xv = to_vec<T>(x), gv = to_vec<T>(gamma), bv = to_vec<T>(beta);
    for (int affine = 0; affine < 4; ++affine) {
      const bool with_gamma = affine & 1, with_beta = affine & 2;
      const std::string what = label("layer_norm", s) + (with_gamma ? " gamma" : "") +
                               (with_beta ? " beta" : "");
      Tensor<T> y(s), mean({M}), rstd({M});
      fill_nan<T>(y);
      ops::layer_norm(x, with_gamma ? gamma : none<T>(), with_beta ? beta : none<T>(), kEps, y,
                      mean, rstd);
      const auto e = ref::layer_norm(xv, with_gamma ? gv : Vec{}, with_beta ? bv : Vec{}, kEps, M, N);
      check_close_rows(what, y, e.y);
      check_close(what + " mean", mean, e.mean);
      check_close(what + " rstd", rstd, e.rstd);
    }
  }
}

TEST_CASE_TEMPLATE("layer_norm_backward: dx overwritten, dgamma and dbeta accumulated", T, float,
                   double) {
  std::uint64_t stream = 200;
  for (const Shape& s : kShapes) {
    const i64 M = s.leading(), N = s.last();
    auto x = uniform<T>(s, stream++, 1, 5), dy = uniform<T>(s, stream++);
    auto gamma = uniform<T>({N}, stream++, 0.5, 1.5);
    auto dgamma0 = uniform<T>({N}, stream++), dbeta0 = uniform<T>({N}, stream++);
    for (const bool affine : {false, true}) {
      const auto g = affine ? static_cast<TensorView<T>>(gamma) : none<T>();
      Tensor<T> y(s), mean({M}), rstd({M});
      ops::layer_norm(x, g, none<T>(), kEps, y, mean, rstd);
      const auto e = ref::layer_norm_backward(to_vec<T>(x), affine ? to_vec<T>(gamma) : Vec{},
                                              to_vec<T>(mean), to_vec<T>(rstd), to_vec<T>(dy), M, N);
      Vec dgamma_ref = to_vec<T>(dgamma0), dbeta_ref = to_vec<T>(dbeta0);
      for (i64 j = 0; j < N; ++j) dgamma_ref[j] += e.dgamma[j], dbeta_ref[j] += e.dbeta[j];
      const std::string what = label("layer_norm_backward", s) + (affine ? " affine" : "");

      Tensor<T> dx(s);
      fill_nan<T>(dx);
      auto dgamma = dgamma0.clone(), dbeta = dbeta0.clone();
      ops::layer_norm_backward(x, g, mean, rstd, dy, dx, dgamma, dbeta);
      check_close_rows(what + " dx", dx, e.dx);
      check_close(what + " dgamma", dgamma, dgamma_ref);
      check_close(what + " dbeta", dbeta, dbeta_ref);

      // An empty view skips that gradient; the rest is unchanged.
      Tensor<T> dx2(s);
      auto dgamma2 = dgamma0.clone(), dbeta2 = dbeta0.clone();
      ops::layer_norm_backward(x, g, mean, rstd, dy, dx2, none<T>(), dbeta2);
      check_bitwise(what + " dx without dgamma", dx2, dx);
      check_bitwise(what + " dbeta without dgamma", dbeta2, dbeta);
      ops::layer_norm_backward(x, g, mean, rstd, dy, dx2, dgamma2, none<T>());
      check_bitwise(what + " dgamma without dbeta", dgamma2, dgamma);
      fill_nan<T>(dx2);
      ops::layer_norm_backward(x, g, mean, rstd, dy, dx2, none<T>(), none<T>());
      check_bitwise(what + " dx alone", dx2, dx);

      // dx may alias dy: the parameter gradients still see the incoming dy.
      auto gd = dy.clone();
      auto dgamma3 = dgamma0.clone(), dbeta3 = dbeta0.clone();
      ops::layer_norm_backward(x, g, mean, rstd, gd, gd, dgamma3, dbeta3);
      check_bitwise(what + " dx=dy", gd, dx);
      check_bitwise(what + " dgamma with dx=dy", dgamma3, dgamma);
      check_bitwise(what + " dbeta with dx=dy", dbeta3, dbeta);
    }
  }
}

TEST_CASE_TEMPLATE("add_layer_norm and layer_norm_backward_add are the residual add and the norm "
                   "in one pass", T, float, double) {
  // Forward: sum = x + a and y = LN(sum) must equal ops::add then ops::layer_norm, bit for bit
  // (the same float operations), with sum aliasing a or x as a Block calls it. Backward:
  // dx = residual + LNᵀ(dy) against layer_norm_backward + add, dx aliasing dy, and the
  // parameter gradients accumulated as before.
  std::uint64_t stream = 260;
  for (const Shape& s : kShapes) {
    const i64 M = s.leading(), N = s.last();
    auto x = uniform<T>(s, stream++, -1, 3), a = uniform<T>(s, stream++, -2, 2);
    auto gamma = uniform<T>({N}, stream++, 0.5, 1.5), beta = uniform<T>({N}, stream++);
    const std::string what = label("add_layer_norm", s);
    Tensor<T> sum_ref(s), y_ref(s), mean_ref({M}), rstd_ref({M});
    ops::add(x, a, sum_ref);
    ops::layer_norm(sum_ref, gamma, beta, kEps, y_ref, mean_ref, rstd_ref);
    for (int alias = 0; alias < 3; ++alias) {  // sum separate, sum = a, sum = x
      auto xa = x.clone(), aa = a.clone();
      Tensor<T> own(s), y(s), mean({M}), rstd({M});
      fill_nan<T>(own);
      fill_nan<T>(y);
      const TensorView<T> sum = alias == 0 ? TensorView<T>(own) : alias == 1 ? aa : xa;
      ops::add_layer_norm(xa, aa, gamma, beta, kEps, sum, y, mean, rstd);
      const std::string w = what + (alias == 0 ? "" : alias == 1 ? " sum=add" : " sum=x");
      check_bitwise(w + " sum", sum, sum_ref);
      check_bitwise(w + " y", y, y_ref);
      check_bitwise(w + " mean", mean, mean_ref);
      check_bitwise(w + " rstd", rstd, rstd_ref);
    }

    auto dy = uniform<T>(s, stream++), residual = uniform<T>(s, stream++);
    auto dgamma0 = uniform<T>({N}, stream++), dbeta0 = uniform<T>({N}, stream++);
    Tensor<T> dx_ref(s);
    auto dgamma_ref = dgamma0.clone(), dbeta_ref = dbeta0.clone();
    ops::layer_norm_backward(sum_ref, gamma, mean_ref, rstd_ref, dy, dx_ref, dgamma_ref, dbeta_ref);
    ops::add(dx_ref, residual, dx_ref);
    for (const bool dx_is_dy : {false, true}) {
      auto dyc = dy.clone(), dgamma = dgamma0.clone(), dbeta = dbeta0.clone();
      Tensor<T> own(s);
      fill_nan<T>(own);
      const TensorView<T> dx = dx_is_dy ? TensorView<T>(dyc) : TensorView<T>(own);
      ops::layer_norm_backward_add(sum_ref, gamma, mean_ref, rstd_ref, dyc, residual, dx, dgamma,
                                   dbeta);
      const std::string w = label("layer_norm_backward_add", s) + (dx_is_dy ? " dx=dy" : "");
      check_close(w + " dx", dx, to_vec<T>(dx_ref));
      check_bitwise(w + " dgamma", dgamma, dgamma_ref);
      check_bitwise(w + " dbeta", dbeta, dbeta_ref);
    }
  }
  Tensor<float> m({3, 4}), m2({3, 4}), v({4}), r({3});
  check_error_names("layer_norm_backward_add alias",
                    [&] { ops::layer_norm_backward_add<float, Cpu>(m, v, r, r, m2, m, m, v, v); },
                    {"layer_norm_backward_add", "alias residual"});
  Tensor<float> wrong({3, 5});
  check_error_names("add_layer_norm shapes",
                    [&] { ops::add_layer_norm<float, Cpu>(m, wrong, v, v, kEps, m, m2, r, r); },
                    {"add_layer_norm", "[3, 4]", "[3, 5]"});
}

TEST_CASE_TEMPLATE("l2_normalize and its backward, including rows clamped at eps", T, float,
                   double) {
  std::uint64_t stream = 300;
  for (const Shape& s : kShapes) {
    const i64 M = s.leading(), N = s.last();
    auto x = uniform<T>(s, stream++), dy = uniform<T>(s, stream++);
    // Row 0 has a norm below eps (at most 1e-8 · sqrt(257)): the clamped branch.
    for (i64 j = 0; j < N; ++j) x.data()[j] *= T(1e-8);
    Tensor<T> y(s), norm({M}), dx(s);
    ops::l2_normalize(x, kEps, y, norm);
    const auto e = ref::l2_normalize(to_vec<T>(x), kEps, M, N);
    REQUIRE(e.norm[0] < kEps);
    check_close_rows(label("l2_normalize", s), y, e.y);
    // Norms are compared elementwise: the clamped row's norm is tiny.
    check_close_scaled(label("l2_normalize norm", s), norm, e.norm, kRel<T>, Vec{0.0});

    fill_nan<T>(dx);
    ops::l2_normalize_backward(y, norm, kEps, dy, dx);
    check_close_rows(label("l2_normalize_backward", s), dx,
                     ref::l2_normalize_backward(to_vec<T>(y), to_vec<T>(norm), kEps,
                                                to_vec<T>(dy), M, N));
    auto g = dy.clone();
    ops::l2_normalize_backward(y, norm, kEps, g, g);
    check_bitwise(label("l2_normalize_backward dx=dy", s), g, dx);
  }
}

TEST_CASE_TEMPLATE("l1_normalize divides each row by its absolute sum, clamped at eps", T, float,
                   double) {
  std::uint64_t stream = 350;
  for (const Shape& s : kShapes) {
    const i64 M = s.leading(), N = s.last();
    auto x = uniform<T>(s, stream++);  // signed: the sum is of |x|
    // Row 0's absolute sum is below eps (at most 1e-8 · 257): the clamped branch.
    for (i64 j = 0; j < N; ++j) x.data()[j] *= T(1e-8);
    const Vec xv = to_vec<T>(x);
    Vec want(xv.size());
    for (i64 r = 0; r < M; ++r) {
      double total = 0;
      for (i64 j = 0; j < N; ++j) total += std::abs(xv[static_cast<std::size_t>(r * N + j)]);
      if (r == 0) REQUIRE(total < kEps);
      for (i64 j = 0; j < N; ++j)
        want[static_cast<std::size_t>(r * N + j)] =
            xv[static_cast<std::size_t>(r * N + j)] / std::max(total, kEps);
    }
    ops::l1_normalize(TensorView<T>(x), kEps);
    check_close_rows(label("l1_normalize", s), x, want);
  }
}

TEST_CASE("row op gradients pass gradcheck") {
  std::uint64_t stream = 400;
  for (const Shape& s : {Shape{1, 4}, Shape{3, 7}, Shape{2, 3, 5}}) {
    const std::string sh = s.str();
    const i64 M = s.leading(), N = s.last();
    auto r = uniform<double>(s, stream++);
    Tensor<double> y(s), dx(s);

    auto x = uniform<double>(s, stream++, -2, 2);
    auto softmax_loss = [&] {
      ops::softmax(x, y);
      return testing::dot<double>(r, y);
    };
    softmax_loss();
    ops::softmax_backward(y, r, dx);
    check_gradient("softmax " + sh, x, dx, softmax_loss);

    auto log_softmax_loss = [&] {
      ops::log_softmax(x, y);
      return testing::dot<double>(r, y);
    };
    log_softmax_loss();
    ops::log_softmax_backward(y, r, dx);
    check_gradient("log_softmax " + sh, x, dx, log_softmax_loss);

    auto xl = uniform<double>(s, stream++, 1, 4);
    auto gamma = uniform<double>({N}, stream++, 0.5, 1.5), beta = uniform<double>({N}, stream++);
    Tensor<double> mean({M}), rstd({M}), dgamma({N}), dbeta({N});
    for (const bool affine : {false, true}) {
      const TensorView<double> g = affine ? static_cast<TensorView<double>>(gamma) : none<double>();
      const TensorView<double> b = affine ? static_cast<TensorView<double>>(beta) : none<double>();
      auto ln_loss = [&] {
        ops::layer_norm(xl, g, b, kEps, y, mean, rstd);
        return testing::dot<double>(r, y);
      };
      ln_loss();
      ops::zero(dgamma);
      ops::zero(dbeta);
      ops::layer_norm_backward(xl, g, mean, rstd, r, dx, dgamma, dbeta);
      const std::string what = "layer_norm " + sh + (affine ? " affine" : "");
      check_gradient(what + " dx", xl, dx, ln_loss);
      if (affine) {
        check_gradient(what + " dgamma", gamma, dgamma, ln_loss);
        check_gradient(what + " dbeta", beta, dbeta, ln_loss);
      }
    }

    // eps = 0.5 puts the scaled row well inside the clamped branch (norm <= 0.05 · sqrt(7)),
    // far from the kink compared with the finite-difference step.
    const double eps = 0.5;
    auto xn = uniform<double>(s, stream++);
    for (i64 j = 0; j < N; ++j) xn.data()[j] *= 0.05;
    Tensor<double> norm({M});
    auto l2_loss = [&] {
      ops::l2_normalize(xn, eps, y, norm);
      return testing::dot<double>(r, y);
    };
    l2_loss();
    REQUIRE(norm(0) < eps);
    for (i64 i = 1; i < M; ++i) REQUIRE(norm(i) > eps);
    ops::l2_normalize_backward(y, norm, eps, r, dx);
    check_gradient("l2_normalize " + sh, xn, dx, l2_loss);
  }
}

TEST_CASE_TEMPLATE("layer_norm_backward does not depend on the thread count", T, float, double) {
  // 513 · 257 elements: the row blocks (each with its own partial parameter sums, added in
  // block order) and the final column-parallel sums both run threaded.
  const Shape s{513, 257};
  REQUIRE(s.numel() > cpu::kParallelGrain);
  auto x = uniform<T>(s, 500, -2, 3), dy = uniform<T>(s, 501), gamma = uniform<T>({257}, 502);
  Tensor<T> y(s), mean({513}), rstd({513});
  ops::layer_norm(x, gamma, none<T>(), kEps, y, mean, rstd);
  auto run = [&](int threads) {
    Threads guard(threads);
    std::array<Tensor<T>, 3> out{Tensor<T>(s), uniform<T>({257}, 503), uniform<T>({257}, 504)};
    ops::layer_norm_backward(x, gamma, mean, rstd, dy, out[0], out[1], out[2]);
    return out;
  };
  const auto one = run(1);
  for (int threads : {2, 3}) {
    const auto many = run(threads);
    const std::string t = detail::str(" with ", threads, " threads");
    check_bitwise("dx" + t, many[0], one[0]);
    check_bitwise("dgamma" + t, many[1], one[1]);
    check_bitwise("dbeta" + t, many[2], one[2]);
  }
}

TEST_CASE("row op shape errors name the shapes") {
  Tensor<float> a({3, 4}), b({4, 3}), v3({3}), v4({4}), v5({5});
  check_error_names("softmax", [&] { ops::softmax(a, b); }, {"softmax", "[3, 4]", "[4, 3]"});
  check_error_names("log_softmax", [&] { ops::log_softmax(a, b); },
                    {"log_softmax", "[3, 4]", "[4, 3]"});
  check_error_names("softmax_backward dy", [&] { ops::softmax_backward(a, b, a); },
                    {"softmax_backward", "[3, 4]", "[4, 3]"});
  check_error_names("softmax_backward dx", [&] { ops::softmax_backward(a, a, b); },
                    {"softmax_backward", "[3, 4]", "[4, 3]"});
  check_error_names("log_softmax_backward", [&] { ops::log_softmax_backward(a, b, a); },
                    {"log_softmax_backward", "[3, 4]", "[4, 3]"});
  check_error_names("log_softmax_backward dx", [&] { ops::log_softmax_backward(a, a, b); },
                    {"log_softmax_backward", "[3, 4]", "[4, 3]"});

  check_error_names("layer_norm y", [&] { ops::layer_norm(a, v4, v4, kEps, b, v3, v3); },
                    {"layer_norm", "[3, 4]", "[4, 3]"});
  check_error_names("layer_norm gamma", [&] { ops::layer_norm(a, v3, v4, kEps, a, v3, v3); },
                    {"layer_norm", "weight", "[3]", "[3, 4]"});
  check_error_names("layer_norm beta", [&] { ops::layer_norm(a, v4, v5, kEps, a, v3, v3); },
                    {"layer_norm", "bias", "[5]", "[3, 4]"});
  check_error_names("layer_norm stats", [&] { ops::layer_norm(a, v4, v4, kEps, a, v4, v3); },
                    {"layer_norm", "[4]", "[3]", "[3, 4]"});
  ops::layer_norm(a, v4, v4, kEps, a, v3, v3);  // the consistent call is accepted

  check_error_names("layer_norm_backward dy",
                    [&] { ops::layer_norm_backward(a, v4, v3, v3, b, a, v4, v4); },
                    {"layer_norm_backward", "[3, 4]", "[4, 3]"});
  check_error_names("layer_norm_backward dx",
                    [&] { ops::layer_norm_backward(a, v4, v3, v3, a, b, v4, v4); },
                    {"layer_norm_backward", "[3, 4]", "[4, 3]"});
  check_error_names("layer_norm_backward gamma",
                    [&] { ops::layer_norm_backward(a, v5, v3, v3, a, a, v4, v4); },
                    {"layer_norm_backward", "[5]", "[3, 4]"});
  check_error_names("layer_norm_backward dgamma",
                    [&] { ops::layer_norm_backward(a, v4, v3, v3, a, a, v3, v4); },
                    {"layer_norm_backward", "weight grad", "[3]", "[3, 4]"});
  check_error_names("layer_norm_backward dbeta",
                    [&] { ops::layer_norm_backward(a, v4, v3, v3, a, a, v4, v5); },
                    {"layer_norm_backward", "bias grad", "[5]", "[3, 4]"});
  check_error_names("layer_norm_backward stats",
                    [&] { ops::layer_norm_backward(a, v4, v3, v5, a, a, v4, v4); },
                    {"layer_norm_backward", "[3]", "[5]", "[3, 4]"});

  check_error_names("l2_normalize y", [&] { ops::l2_normalize(a, kEps, b, v3); },
                    {"l2_normalize", "[3, 4]", "[4, 3]"});
  check_error_names("l2_normalize norm", [&] { ops::l2_normalize(a, kEps, a, v4); },
                    {"l2_normalize", "[4]", "[3, 4]"});
  check_error_names("l2_normalize_backward dy",
                    [&] { ops::l2_normalize_backward(a, v3, kEps, b, a); },
                    {"l2_normalize_backward", "[3, 4]", "[4, 3]"});
  check_error_names("l2_normalize_backward dx",
                    [&] { ops::l2_normalize_backward(a, v3, kEps, a, b); },
                    {"l2_normalize_backward", "[3, 4]", "[4, 3]"});
  check_error_names("l2_normalize_backward norm",
                    [&] { ops::l2_normalize_backward(a, v5, kEps, a, a); },
                    {"l2_normalize_backward", "[5]", "[3, 4]"});
}
