// Layout ops (copy_strided, patchify, unpatchify) and statistics ops (row_max, batch_norm,
// xlogy_sum) against double loops; gradients, aliasing, thread-count independence, shape errors.
#include <array>
#include <string>

#include "reference.hpp"

using namespace moca;
using namespace moca::test;

namespace {

template <class T>
TensorView<T> none() {
  return {};
}

constexpr double kEps = 1e-5;

/// The reference of patchify: images [N, C, H, W] -> [N, (H/p)(W/p), C·p·p], features (c, ky, kx).
Vec ref_patchify(const Vec& img, i64 N, i64 C, i64 H, i64 W, i64 p) {
  const i64 gw = W / p, L = (H / p) * gw, F = C * p * p;
  Vec out(img.size());
  for (i64 n = 0; n < N; ++n)
    for (i64 l = 0; l < L; ++l)
      for (i64 c = 0; c < C; ++c)
        for (i64 ky = 0; ky < p; ++ky)
          for (i64 kx = 0; kx < p; ++kx)
            out[(n * L + l) * F + (c * p + ky) * p + kx] =
                img[((n * C + c) * H + (l / gw) * p + ky) * W + (l % gw) * p + kx];
  return out;
}

struct BatchNorm {
  Vec y, mean, var;
};
/// BatchNorm1d (training mode) over the rows of x [M, N]; gamma/beta empty: no affine.
BatchNorm ref_batch_norm(const Vec& x, const Vec& gamma, const Vec& beta, double eps, i64 M, i64 N) {
  BatchNorm o{Vec(x.size()), Vec(N, 0.0), Vec(N, 0.0)};
  for (i64 j = 0; j < N; ++j) {
    for (i64 r = 0; r < M; ++r) o.mean[j] += x[r * N + j];
    o.mean[j] /= static_cast<double>(M);
    for (i64 r = 0; r < M; ++r) o.var[j] += (x[r * N + j] - o.mean[j]) * (x[r * N + j] - o.mean[j]);
    o.var[j] /= static_cast<double>(M);
    for (i64 r = 0; r < M; ++r) {
      double v = (x[r * N + j] - o.mean[j]) / std::sqrt(o.var[j] + eps);
      if (!gamma.empty()) v *= gamma[j];
      if (!beta.empty()) v += beta[j];
      o.y[r * N + j] = v;
    }
  }
  return o;
}

struct BatchNormGrad {
  Vec dx, dgamma, dbeta;  // dgamma, dbeta: this call's contribution only
};
/// From the saved mean and var, as the op receives them.
BatchNormGrad ref_batch_norm_backward(const Vec& x, const Vec& gamma, const Vec& mean,
                                      const Vec& var, double eps, const Vec& dy, i64 M, i64 N) {
  BatchNormGrad g{Vec(x.size()), Vec(N, 0.0), Vec(N, 0.0)};
  for (i64 j = 0; j < N; ++j) {
    const double rs = 1.0 / std::sqrt(var[j] + eps), gm = gamma.empty() ? 1.0 : gamma[j];
    double mg = 0, mgx = 0;
    for (i64 r = 0; r < M; ++r) {
      const double xhat = (x[r * N + j] - mean[j]) * rs;
      mg += dy[r * N + j] * gm;
      mgx += dy[r * N + j] * gm * xhat;
      g.dgamma[j] += dy[r * N + j] * xhat;
      g.dbeta[j] += dy[r * N + j];
    }
    mg /= static_cast<double>(M);
    mgx /= static_cast<double>(M);
    for (i64 r = 0; r < M; ++r) {
      const double xhat = (x[r * N + j] - mean[j]) * rs;
      g.dx[r * N + j] = rs * (dy[r * N + j] * gm - mg - xhat * mgx);
    }
  }
  return g;
}

// Rows (samples) by columns (features), a rank-3 input whose leading dimensions are the rows,
// and [257, 129] for the threaded path.
const std::array<Shape, 6> kBnShapes = {{{3, 1}, {7, 33}, {65, 3}, {33, 257}, {3, 5, 7}, {257, 129}}};

}  // namespace

TEST_CASE_TEMPLATE("copy_strided copies, accumulates and broadcasts", T, float, double) {
  struct Layout {
    i64 count, rows, cols, src_ld, src_stride, dst_ld, dst_stride;
  };
  // Dense, padded rows, a broadcast row (ld 0), a broadcast matrix (stride 0), both, and a
  // case large enough for the threaded path.
  const std::array<Layout, 7> layouts = {{{1, 1, 1, 1, 1, 1, 1},
                                          {3, 7, 5, 5, 35, 5, 35},
                                          {4, 3, 7, 11, 40, 9, 33},
                                          {5, 4, 33, 0, 33, 33, 140},
                                          {3, 5, 7, 7, 0, 8, 45},
                                          {6, 2, 65, 0, 0, 65, 130},
                                          {65, 33, 17, 17, 561, 20, 700}}};
  std::uint64_t stream = 1;
  for (const Layout& l : layouts) {
    const i64 src_n = (l.count - 1) * l.src_stride + (l.rows - 1) * l.src_ld + l.cols;
    const i64 dst_n = (l.count - 1) * l.dst_stride + (l.rows - 1) * l.dst_ld + l.cols;
    auto src = uniform<T>({src_n}, stream++);
    auto dst0 = uniform<T>({dst_n}, stream++);
    const Vec s = to_vec<T>(src);
    for (const bool accumulate : {false, true}) {
      Vec e = to_vec<T>(dst0);
      for (i64 b = 0; b < l.count; ++b)
        for (i64 r = 0; r < l.rows; ++r)
          for (i64 c = 0; c < l.cols; ++c) {
            double& d = e[b * l.dst_stride + r * l.dst_ld + c];
            const double v = s[b * l.src_stride + r * l.src_ld + c];
            d = accumulate ? d + v : v;
          }
      auto dst = dst0.clone();
      ops::copy_strided(ops::strided_batch<T, Cpu>(src, 0, l.rows, l.cols, l.src_ld, l.src_stride, l.count),
                        ops::strided_batch<T, Cpu>(dst, 0, l.rows, l.cols, l.dst_ld, l.dst_stride, l.count),
                        accumulate);
      // Elements outside the destination blocks keep their values (they are in e unchanged).
      const std::string what = detail::str("copy_strided ", l.count, "×[", l.rows, ", ", l.cols,
                                           "] ld ", l.src_ld, "/", l.dst_ld, " stride ",
                                           l.src_stride, "/", l.dst_stride,
                                           accumulate ? " accumulate" : "");
      if (accumulate)
        check_close(what, dst, e);
      else
        check_exact(what, dst, e);
    }
  }
}

TEST_CASE_TEMPLATE("patchify matches the reference and unpatchify inverts it", T, float, double) {
  struct Img {
    i64 N, C, H, W, p;
  };
  // Non-square images and grids; [4, 3, 64, 64] with p = 16 goes through the threaded path.
  const std::array<Img, 5> imgs = {{{1, 1, 1, 1, 1}, {2, 3, 6, 9, 3}, {3, 1, 14, 7, 7}, {1, 2, 8, 8, 2},
                                    {4, 3, 64, 64, 16}}};
  std::uint64_t stream = 100;
  for (const Img& m : imgs) {
    const i64 L = (m.H / m.p) * (m.W / m.p), F = m.C * m.p * m.p;
    auto x = uniform<T>({m.N, m.C, m.H, m.W}, stream++);
    Tensor<T> patches({m.N, L, F}), back({m.N, m.C, m.H, m.W});
    fill_nan<T>(patches);
    fill_nan<T>(back);
    ops::patchify(x, m.p, patches);
    const std::string what = detail::str(x.shape(), " p=", m.p);
    check_exact("patchify " + what, patches, ref_patchify(to_vec<T>(x), m.N, m.C, m.H, m.W, m.p));
    ops::unpatchify(patches, m.p, back);
    check_bitwise("unpatchify(patchify(x)) " + what, back, x);
  }
}

TEST_CASE("patchify gradient (unpatchify) passes gradcheck") {
  auto x = uniform<double>({2, 2, 4, 6}, 150);
  auto r = uniform<double>({2, 6, 8}, 151);
  Tensor<double> patches({2, 6, 8}), dx({2, 2, 4, 6});
  auto loss = [&] {
    ops::patchify(x, 2, patches);
    return testing::dot<double>(r, patches);
  };
  ops::unpatchify(r, 2, dx);
  check_gradient("patchify", x, dx, loss);
}

TEST_CASE_TEMPLATE("row_max matches the reference", T, float, double) {
  std::uint64_t stream = 200;
  for (const Shape& s : {Shape{1, 1}, Shape{3, 7}, Shape{33, 65}, Shape{257, 257}, Shape{2, 3, 5}}) {
    auto x = uniform<T>(s, stream++, -3, 2);
    const Vec xv = to_vec<T>(x);
    const i64 M = s.leading(), N = s.last();
    Vec e(static_cast<std::size_t>(M));
    for (i64 r = 0; r < M; ++r) e[r] = *std::max_element(xv.begin() + r * N, xv.begin() + (r + 1) * N);
    Tensor<T> y({M});
    fill_nan<T>(y);
    ops::row_max(x, y);
    check_exact(detail::str("row_max ", s), y, e);
  }
  // All-negative rows: the maximum is not clamped at 0.
  auto neg = uniform<T>({4, 9}, 210, -5, -1);
  Tensor<T> y({4});
  ops::row_max(neg, y);
  for (T v : y) CHECK(v < T(-1));
}

TEST_CASE_TEMPLATE("batch_norm matches the reference, with and without affine parameters", T,
                   float, double) {
  std::uint64_t stream = 300;
  for (const Shape& s : kBnShapes) {
    const i64 M = s.leading(), N = s.last();
    auto x = uniform<T>(s, stream++, 1, 5);
    auto gamma = uniform<T>({N}, stream++, 0.5, 1.5), beta = uniform<T>({N}, stream++);
    const Vec xv = to_vec<T>(x);
    for (const bool affine : {false, true}) {
      const auto g = affine ? static_cast<TensorView<T>>(gamma) : none<T>();
      const auto b = affine ? static_cast<TensorView<T>>(beta) : none<T>();
      Tensor<T> y(s), mean({N}), var({N});
      fill_nan<T>(y);
      fill_nan<T>(mean);
      fill_nan<T>(var);
      ops::batch_norm(x, g, b, kEps, y, mean, var);
      const auto e = ref_batch_norm(xv, affine ? to_vec<T>(gamma) : Vec{},
                                    affine ? to_vec<T>(beta) : Vec{}, kEps, M, N);
      const std::string what = detail::str("batch_norm ", s, affine ? " affine" : "");
      check_close(what, y, e.y);
      check_close(what + " mean", mean, e.mean);
      check_close(what + " var", var, e.var);
    }
  }
}

TEST_CASE_TEMPLATE("batch_norm_backward: dx overwritten, dgamma and dbeta accumulated", T, float,
                   double) {
  std::uint64_t stream = 400;
  for (const Shape& s : kBnShapes) {
    const i64 M = s.leading(), N = s.last();
    auto x = uniform<T>(s, stream++, 1, 5), dy = uniform<T>(s, stream++);
    auto gamma = uniform<T>({N}, stream++, 0.5, 1.5);
    auto dgamma0 = uniform<T>({N}, stream++), dbeta0 = uniform<T>({N}, stream++);
    for (const bool affine : {false, true}) {
      const auto g = affine ? static_cast<TensorView<T>>(gamma) : none<T>();
      Tensor<T> y(s), mean({N}), var({N});
      ops::batch_norm(x, g, none<T>(), kEps, y, mean, var);
      const auto e = ref_batch_norm_backward(to_vec<T>(x), affine ? to_vec<T>(gamma) : Vec{},
                                             to_vec<T>(mean), to_vec<T>(var), kEps, to_vec<T>(dy),
                                             M, N);
      Vec dgamma_ref = to_vec<T>(dgamma0), dbeta_ref = to_vec<T>(dbeta0);
      for (i64 j = 0; j < N; ++j) dgamma_ref[j] += e.dgamma[j], dbeta_ref[j] += e.dbeta[j];
      const std::string what = detail::str("batch_norm_backward ", s, affine ? " affine" : "");

      Tensor<T> dx(s);
      fill_nan<T>(dx);
      auto dgamma = dgamma0.clone(), dbeta = dbeta0.clone();
      ops::batch_norm_backward(x, g, mean, var, kEps, dy, dx, dgamma, dbeta);
      check_close(what + " dx", dx, e.dx);
      check_close(what + " dgamma", dgamma, dgamma_ref);
      check_close(what + " dbeta", dbeta, dbeta_ref);

      // Empty views skip a gradient; dx may alias dy.
      auto gd = dy.clone();
      auto dbeta2 = dbeta0.clone();
      ops::batch_norm_backward(x, g, mean, var, kEps, gd, gd, none<T>(), dbeta2);
      check_bitwise(what + " dx=dy", gd, dx);
      check_bitwise(what + " dbeta without dgamma", dbeta2, dbeta);
    }
  }
}

TEST_CASE("batch_norm gradients pass gradcheck") {
  for (const Shape& s : {Shape{4, 3}, Shape{2, 3, 5}}) {
    const i64 N = s.last();
    auto x = uniform<double>(s, 500, 1, 4), r = uniform<double>(s, 501);
    auto gamma = uniform<double>({N}, 502, 0.5, 1.5), beta = uniform<double>({N}, 503);
    Tensor<double> y(s), mean({N}), var({N}), dx(s), dgamma({N}), dbeta({N});
    auto loss = [&] {
      ops::batch_norm(x, gamma, beta, kEps, y, mean, var);
      return testing::dot<double>(r, y);
    };
    loss();
    ops::batch_norm_backward(x, gamma, mean, var, kEps, r, dx, dgamma, dbeta);
    const std::string sh = s.str();
    check_gradient("batch_norm dx " + sh, x, dx, loss);
    check_gradient("batch_norm dgamma " + sh, gamma, dgamma, loss);
    check_gradient("batch_norm dbeta " + sh, beta, dbeta, loss);
  }
}

TEST_CASE_TEMPLATE("xlogy_sum matches the reference; 0 · log 0 counts as 0", T, float, double) {
  std::uint64_t stream = 600;
  for (i64 n : {1, 3, 7, 33, 257, 65537}) {
    auto x = uniform<T>({n}, stream++, 0, 1), y = uniform<T>({n}, stream++, 0.01, 1);
    // Zeros in x, some against zeros in y: those terms are 0, not NaN.
    for (i64 i = 1; i < n; i += 3) x.data()[i] = 0, y.data()[i] = i % 2 ? T(0) : y.data()[i];
    double e = 0;
    for (i64 i = 0; i < n; ++i)
      if (x.data()[i] != T(0)) e += static_cast<double>(x.data()[i]) * std::log(static_cast<double>(y.data()[i]));
    REQUIRE(e != 0);
    CHECK(ops::xlogy_sum(x, y) == doctest::Approx(e).epsilon(1e-12));
  }
}

TEST_CASE_TEMPLATE("batch_norm and xlogy_sum do not depend on the thread count", T, float, double) {
  const Shape s{513, 257};
  REQUIRE(s.numel() > cpu::kParallelGrain);
  auto x = uniform<T>(s, 700, -2, 3), dy = uniform<T>(s, 701), gamma = uniform<T>({257}, 702);
  auto run = [&](int threads) {
    Threads guard(threads);
    std::array<Tensor<T>, 6> out{Tensor<T>(s), Tensor<T>({257}), Tensor<T>({257}), Tensor<T>(s),
                                 Tensor<T>({257}), Tensor<T>({257})};
    ops::batch_norm(x, gamma, none<T>(), kEps, out[0], out[1], out[2]);
    ops::batch_norm_backward(x, gamma, out[1], out[2], kEps, dy, out[3], out[4], out[5]);
    return out;
  };
  const auto one = run(1);
  const char* names[] = {"y", "mean", "var", "dx", "dgamma", "dbeta"};
  for (int threads : {2, 3}) {
    const auto many = run(threads);
    for (int k = 0; k < 6; ++k)
      check_bitwise(detail::str("batch_norm ", names[k], " with ", threads, " threads"), many[k],
                    one[k]);
  }
  auto p = uniform<T>({100003}, 703, 0, 1), q = uniform<T>({100003}, 704, 0.01, 1);
  double sums[3];
  for (int threads = 1; threads <= 3; ++threads) {
    Threads guard(threads);
    sums[threads - 1] = ops::xlogy_sum(p, q);
  }
  CHECK(std::memcmp(&sums[0], &sums[1], sizeof(double)) == 0);
  CHECK(std::memcmp(&sums[0], &sums[2], sizeof(double)) == 0);
}

TEST_CASE("layout and statistics shape errors name the shapes") {
  Tensor<float> a({6, 8}), b({6, 8});
  auto s34 = ops::strided_batch<float, Cpu>(a, 0, 3, 4, 4, 12, 2);
  auto s43 = ops::strided_batch<float, Cpu>(b, 0, 4, 3, 3, 12, 2);
  auto s34x3 = ops::strided_batch<float, Cpu>(b, 0, 3, 4, 4, 12, 3);
  check_error_names("copy_strided extent", [&] { ops::copy_strided(s34, s43); },
                    {"copy_strided", "2×[3, 4]", "2×[4, 3]"});
  check_error_names("copy_strided count", [&] { ops::copy_strided(s34, s34x3); },
                    {"copy_strided", "2×[3, 4]", "3×[3, 4]"});
  // Destination matrices that overlap (stride 4 < 3 rows · ld 4) would race.
  auto overlap = ops::strided_batch<float, Cpu>(b, 0, 3, 4, 4, 4, 2);
  check_error_names("copy_strided overlap", [&] { ops::copy_strided(s34, overlap); },
                    {"copy_strided", "ld 4", "stride 4"});

  Tensor<float> img({2, 3, 8, 8}), patches({2, 4, 48}), bad({2, 4, 47}), flat({2, 192});
  ops::patchify(img, 4, patches);  // the consistent call is accepted
  check_error_names("patchify rank", [&] { ops::patchify(flat, 4, patches); },
                    {"patchify", "[2, 192]"});
  check_error_names("patchify multiple", [&] { ops::patchify(img, 3, patches); },
                    {"patchify", "8×8", "patch size 3"});
  check_error_names("patchify output", [&] { ops::patchify(img, 4, bad); },
                    {"patchify", "[2, 4, 47]", "[2, 3, 8, 8]"});
  check_error_names("unpatchify output", [&] { ops::unpatchify(bad, 4, img); },
                    {"unpatchify", "[2, 4, 47]", "[2, 3, 8, 8]"});
  check_error_names("unpatchify rank", [&] { ops::unpatchify(patches, 4, flat); },
                    {"unpatchify", "[2, 192]"});

  Tensor<float> x({5, 4}), y4({4}), y5({5}), v3({3}), xt({4, 5});
  ops::row_max(x, y5);
  check_error_names("row_max", [&] { ops::row_max(x, y4); }, {"row_max", "[4]", "[5, 4]"});
  check_error_names("batch_norm y", [&] { ops::batch_norm(x, y4, y4, kEps, xt, y4, y4); },
                    {"batch_norm", "[5, 4]", "[4, 5]"});
  check_error_names("batch_norm stats", [&] { ops::batch_norm(x, v3, y4, kEps, x, y4, y4); },
                    {"batch_norm", "[3]", "[5, 4]"});
  Tensor<float> empty_rows({0, 4});
  check_error_names("batch_norm no rows",
                    [&] { ops::batch_norm(empty_rows, y4, y4, kEps, empty_rows, y4, y4); },
                    {"batch_norm", "[0, 4]"});
  check_error_names("batch_norm_backward dy",
                    [&] { ops::batch_norm_backward(x, y4, y4, y4, kEps, xt, x, y4, y4); },
                    {"batch_norm_backward", "[5, 4]", "[4, 5]"});
  check_error_names("batch_norm_backward dx",
                    [&] { ops::batch_norm_backward(x, y4, y4, y4, kEps, x, xt, y4, y4); },
                    {"batch_norm_backward", "[5, 4]", "[4, 5]"});
  check_error_names("batch_norm_backward stats",
                    [&] { ops::batch_norm_backward(x, y4, y5, y4, kEps, x, x, y4, y4); },
                    {"batch_norm_backward", "[5, 4]"});
  check_error_names("xlogy_sum", [&] { ops::xlogy_sum(x, y4); }, {"xlogy_sum", "[5, 4]", "[4]"});
}
