// Reductions (sum, mean, sum_squares) and row gather/scatter-add against double loops;
// gradients, thread-count independence, index checks and shape errors.
#include <array>
#include <string>

#include "reference.hpp"

using namespace moca;
using namespace moca::test;

namespace {
const std::array<Shape, 6> kShapes = {{{3, 5, 7}, {1, 33, 65}, {7, 1, 257}, {65, 3, 1}, {2, 257, 33},
                                       {33, 7, 3}}};

/// x's shape without `axis` (rank 3 -> rank 2).
Shape reduced(const Shape& s, int axis) {
  std::array<i64, 2> d{};
  for (int i = 0, k = 0; i < 3; ++i)
    if (i != axis) d[k++] = s[i];
  return {d[0], d[1]};
}

/// [outer, n, inner] of a reduction of s over axis.
std::array<i64, 3> split(const Shape& s, int axis) {
  i64 outer = 1, inner = 1;
  for (int d = 0; d < axis; ++d) outer *= s[d];
  for (int d = axis + 1; d < s.rank(); ++d) inner *= s[d];
  return {outer, s[axis], inner};
}
}  // namespace

TEST_CASE_TEMPLATE("sum and mean over every axis of a rank-3 tensor", T, float, double) {
  std::uint64_t stream = 1;
  for (const Shape& s : kShapes) {
    auto x = uniform<T>(s, stream++);
    const Vec xv = to_vec<T>(x);
    for (int axis = 0; axis < 3; ++axis) {
      const auto [outer, n, inner] = split(s, axis);
      const Shape ys = reduced(s, axis);
      const std::string what = detail::str(" ", s, " axis ", axis);
      auto y0 = uniform<T>(ys, stream++);
      const Vec y0v = to_vec<T>(y0);

      for (const auto& [alpha, beta] : std::array<std::array<double, 2>, 3>{{{1, 0}, {0.5, -2}, {-3, 1}}}) {
        auto y = y0.clone();
        ops::sum(x, axis, y, alpha, beta);
        check_close(detail::str("sum alpha=", alpha, " beta=", beta) + what, y,
                    ref::sum_middle(xv, outer, n, inner, alpha, beta, y0v));
      }
      // beta = 0 does not read y.
      Tensor<T> y(ys);
      fill_nan<T>(y);
      ops::sum(x, axis, y);
      check_close("sum into NaN" + what, y, ref::sum_middle(xv, outer, n, inner, 1, 0, y0v));

      fill_nan<T>(y);
      ops::mean(x, axis, y);
      check_close("mean" + what, y,
                  ref::sum_middle(xv, outer, n, inner, 1.0 / static_cast<double>(n), 0, y0v));
      auto ym = y0.clone();
      ops::mean(x, axis, ym, 0.5);
      check_close("mean beta=0.5" + what, ym,
                  ref::sum_middle(xv, outer, n, inner, 1.0 / static_cast<double>(n), 0.5, y0v));

      // Any output shape of the right size serves: [outer · inner] flat.
      Tensor<T> flat({outer * inner}), shaped(ys);
      ops::sum(x, axis, flat);
      ops::sum(x, axis, shaped);
      check_bitwise("sum into a flat output" + what, flat, shaped);
    }
  }
}

TEST_CASE_TEMPLATE("sum over rank 1 and 2, and sum_squares", T, float, double) {
  std::uint64_t stream = 100;
  for (i64 n : {1, 3, 7, 33, 65, 257, 4099, 65537}) {
    auto x = uniform<T>({n}, stream++);
    const Vec xv = to_vec<T>(x);
    Tensor<T> y({1});
    ops::sum(x, 0, y);
    check_close(detail::str("sum n=", n), y, ref::sum_middle(xv, 1, n, 1, 1, 0, {}));
    double ss = 0;
    for (double v : xv) ss += v * v;
    // Accumulated in double for both element types: squares of floats are exact in double.
    CHECK(ops::sum_squares(x) == doctest::Approx(ss).epsilon(1e-12));
    CHECK(ss > 0);
  }
  auto m = uniform<T>({33, 65}, 200);
  Tensor<T> cols({1, 65}), rows({33});
  ops::sum(m, 0, cols);  // [1, 65] serves for [65]
  ops::sum(m, 1, rows);
  const Vec mv = to_vec<T>(m);
  check_close("sum [33, 65] axis 0", cols, ref::sum_middle(mv, 1, 33, 65, 1, 0, {}));
  check_close("sum [33, 65] axis 1", rows, ref::sum_middle(mv, 33, 65, 1, 1, 0, {}));
}

TEST_CASE("a long float sum keeps its small terms") {
  // 4·2^20 terms of 1e-3: a float running sum reaches 4,194 (ulp 4.9e-4) and would round every
  // later term by up to a quarter of itself; the reduction must stay at float rounding of the
  // result.
  const i64 n = i64{4} << 20;
  Tensor<float> x({n}), y({1});
  ops::fill(TensorView<float>(x), 1e-3);
  ops::sum(x, 0, y);
  const double exact = static_cast<double>(n) * static_cast<double>(1e-3f);
  CHECK(static_cast<double>(y.data()[0]) == doctest::Approx(exact).epsilon(1e-6));
  Tensor<float> means({1});
  ops::mean(x, 0, means);
  CHECK(static_cast<double>(means.data()[0]) == doctest::Approx(1e-3).epsilon(1e-6));
}

TEST_CASE("sum and mean gradients pass gradcheck") {
  // The gradient of a sum over an axis is dy broadcast along that axis (times alpha).
  const Shape s{3, 4, 5};
  auto x = uniform<double>(s, 300);
  for (int axis = 0; axis < 3; ++axis) {
    const auto [outer, n, inner] = split(s, axis);
    auto r = uniform<double>(reduced(s, axis), 301 + static_cast<std::uint64_t>(axis));
    Tensor<double> y(reduced(s, axis)), dx(s);
    for (const bool is_mean : {false, true}) {
      const double alpha = is_mean ? 1.0 / static_cast<double>(n) : 1.5;
      auto loss = [&] {
        if (is_mean)
          ops::mean(x, axis, y);
        else
          ops::sum(x, axis, y, alpha);
        return testing::dot<double>(r, y);
      };
      for (i64 o = 0; o < outer; ++o)
        for (i64 j = 0; j < n; ++j)
          for (i64 i = 0; i < inner; ++i) dx.data()[(o * n + j) * inner + i] = alpha * r.data()[o * inner + i];
      check_gradient(detail::str(is_mean ? "mean" : "sum", " axis ", axis), x, dx, loss);
    }
  }
}

TEST_CASE_TEMPLATE("gather_rows copies rows; scatter_add_rows accumulates repeated indices", T,
                   float, double) {
  std::uint64_t stream = 400;
  for (const i64 R : {1, 7, 65})
    for (const i64 C : {1, 3, 33, 257})
      for (const i64 M : {1, 5, 100}) {  // M > R repeats indices
        const std::string what = detail::str(" R=", R, " C=", C, " M=", M);
        auto src = uniform<T>({R, C}, stream++);
        auto idx = indices(M, R, stream++);
        Tensor<T> dst({M, C});
        fill_nan<T>(dst);
        ops::gather_rows(src, idx, dst);
        const Vec sv = to_vec<T>(src);
        Vec g(static_cast<std::size_t>(M * C));
        for (i64 i = 0; i < M; ++i)
          for (i64 c = 0; c < C; ++c) g[i * C + c] = sv[idx.data()[i] * C + c];
        check_exact("gather_rows" + what, dst, g);

        auto upd = uniform<T>({M, C}, stream++);
        auto acc = uniform<T>({R, C}, stream++);
        Vec e = to_vec<T>(acc);
        const Vec uv = to_vec<T>(upd);
        for (i64 i = 0; i < M; ++i)
          for (i64 c = 0; c < C; ++c) e[idx.data()[i] * C + c] += uv[i * C + c];
        ops::scatter_add_rows(upd, idx, acc);
        check_close("scatter_add_rows" + what, acc, e);
      }
  // Rows of rank > 1: [R, 3, 5] rows are 15 elements.
  auto src = uniform<T>({4, 3, 5}, 450);
  Tensor<Index> idx({3});
  idx(0) = 3, idx(1) = 0, idx(2) = 3;
  Tensor<T> dst({3, 3, 5});
  ops::gather_rows(src, idx, dst);
  check_bitwise("gather_rows rank 3, row 0", dst.row(0), src.row(3));
  check_bitwise("gather_rows rank 3, row 1", dst.row(1), src.row(0));
  check_bitwise("gather_rows rank 3, row 2", dst.row(2), src.row(3));
  Tensor<T> back({4, 3, 5});
  ops::scatter_add_rows(dst, idx, back);
  Vec e(60, 0.0);
  const Vec sv = to_vec<T>(src);
  for (i64 k = 0; k < 15; ++k) e[k] = sv[k], e[45 + k] = 2 * sv[45 + k];
  check_exact("scatter_add_rows rank 3", back, e);
}

TEST_CASE_TEMPLATE("gather_rows and scatter_add_rows reject out-of-range indices", T, float,
                   double) {
  auto src = uniform<T>({7, 3}, 500);
  Tensor<T> dst({4, 3});
  for (const Index bad : {7, -1, 1000}) {
    Tensor<Index> idx({4});
    idx(0) = 1, idx(1) = 6, idx(2) = bad, idx(3) = 0;
    const std::string b = std::to_string(bad);
    check_error_names("gather_rows index " + b, [&] { ops::gather_rows(src, idx, dst); },
                      {"gather_rows", "index " + b, "position 2", "7 rows"});
    // Indices are checked before anything is written: a rejected scatter leaves dst as it was.
    auto acc = src.clone();
    check_error_names("scatter_add_rows index " + b, [&] { ops::scatter_add_rows(dst, idx, acc); },
                      {"scatter_add_rows", "index " + b, "position 2", "7 rows"});
    check_bitwise("scatter_add_rows after a rejected index", acc, src);
  }
}

TEST_CASE("gather_rows gradient (scatter_add_rows) passes gradcheck") {
  auto src = uniform<double>({7, 5}, 600);
  auto idx = indices(12, 7, 601);  // 12 draws from 7 rows repeat some
  idx(0) = idx(1) = 4;
  auto r = uniform<double>({12, 5}, 602);
  Tensor<double> dst({12, 5}), dsrc({7, 5});
  auto loss = [&] {
    ops::gather_rows(src, idx, dst);
    return testing::dot<double>(r, dst);
  };
  ops::scatter_add_rows(r, idx, dsrc);
  check_gradient("gather_rows", src, dsrc, loss);
}

TEST_CASE_TEMPLATE("sum, sum_squares and scatter_add_rows do not depend on the thread count", T,
                   float, double) {
  // Each case touches more than kParallelGrain elements, so 2 and 3 threads split the work.
  struct Case {
    Shape s;
    int axis;
  };
  const std::array<Case, 6> cases = {{{{3, 4099, 7}, 0},
                                      {{3, 4099, 7}, 1},
                                      {{3, 4099, 7}, 2},
                                      {{4099, 17}, 1},
                                      {{257, 300}, 0},
                                      {{2, 20011}, 1}}};
  for (const Case& c : cases) {
    REQUIRE(c.s.numel() > cpu::kParallelGrain);
    auto x = uniform<T>(c.s, 700);
    const auto [outer, n, inner] = split(c.s, c.axis);
    auto run = [&](int threads) {
      Threads guard(threads);
      Tensor<T> y({outer * inner});
      ops::sum(x, c.axis, y);
      return y;
    };
    const auto one = run(1);
    for (int threads : {2, 3})
      check_bitwise(detail::str("sum ", c.s, " axis ", c.axis, " with ", threads, " threads"),
                    run(threads), one);
    // The documented order: j ascending, in the accumulator type (double for contiguous sums).
    Vec serial(static_cast<std::size_t>(outer * inner));
    for (i64 o = 0; o < outer; ++o)
      for (i64 i = 0; i < inner; ++i) {
        cpu::acc_t<T> acc = 0;
        double wide = 0;
        for (i64 j = 0; j < n; ++j) {
          acc += x.data()[(o * n + j) * inner + i];
          wide += static_cast<double>(x.data()[(o * n + j) * inner + i]);
        }
        serial[o * inner + i] = inner == 1 ? static_cast<T>(wide) : static_cast<T>(acc);
      }
    check_exact(detail::str("sum ", c.s, " axis ", c.axis, " in ascending order"), one, serial);
  }

  auto big = uniform<T>({100003}, 701);
  double ss[3];
  for (int threads = 1; threads <= 3; ++threads) {
    Threads guard(threads);
    ss[threads - 1] = ops::sum_squares(big);
  }
  CHECK(std::memcmp(&ss[0], &ss[1], sizeof(double)) == 0);
  CHECK(std::memcmp(&ss[0], &ss[2], sizeof(double)) == 0);

  // 1000 source rows of 65 into 37 destination rows: many repeats per destination row.
  auto src = uniform<T>({1000, 65}, 702);
  auto idx = indices(1000, 37, 703);
  auto run = [&](int threads) {
    Threads guard(threads);
    auto dst = uniform<T>({37, 65}, 704);
    ops::scatter_add_rows(src, idx, dst);
    return dst;
  };
  const auto one = run(1);
  for (int threads : {2, 3})
    check_bitwise(detail::str("scatter_add_rows with ", threads, " threads"), run(threads), one);
  // The documented order: repeated indices accumulate in ascending source row.
  auto serial = uniform<T>({37, 65}, 704);
  for (i64 i = 0; i < 1000; ++i)
    for (i64 c = 0; c < 65; ++c) serial(idx(i), c) += src(i, c);
  check_bitwise("scatter_add_rows in ascending order", one, serial);
}

TEST_CASE("reduction and index shape errors name the shapes") {
  Tensor<float> x({3, 4, 5}), y({3, 4}), y5({5});
  check_error_names("sum output", [&] { ops::sum(x, 1, y); },
                    {"sum", "[3, 4]", "[3, 4, 5]", "axis 1"});
  check_error_names("sum axis", [&] { ops::sum(x, 3, y); }, {"sum", "axis 3", "[3, 4, 5]"});
  check_error_names("sum negative axis", [&] { ops::sum(x, -1, y); }, {"sum", "axis -1"});
  check_error_names("mean output", [&] { ops::mean(x, 0, y5); },
                    {"sum", "[5]", "[3, 4, 5]", "axis 0"});
  check_error_names("mean axis", [&] { ops::mean(x, 5, y); }, {"mean", "axis 5", "[3, 4, 5]"});
  Tensor<float> e({3, 0}), e3({3});
  check_error_names("mean empty axis", [&] { ops::mean(e, 1, e3); }, {"mean", "[3, 0]"});
  ops::sum(x, 2, y);  // the consistent call is accepted

  Tensor<float> src({7, 3}), dst({4, 3}), dst2({4, 2}), dst3({5, 3});
  Tensor<Index> idx({4});
  check_error_names("gather_rows row size", [&] { ops::gather_rows(src, idx, dst2); },
                    {"gather_rows", "[7, 3]", "[4, 2]", "4 indices"});
  check_error_names("gather_rows row count", [&] { ops::gather_rows(src, idx, dst3); },
                    {"gather_rows", "[7, 3]", "[5, 3]", "4 indices"});
  check_error_names("scatter_add_rows row size", [&] { ops::scatter_add_rows(dst2, idx, src); },
                    {"scatter_add_rows", "[4, 2]", "[7, 3]", "4 indices"});
  check_error_names("scatter_add_rows row count", [&] { ops::scatter_add_rows(dst3, idx, src); },
                    {"scatter_add_rows", "[5, 3]", "[7, 3]", "4 indices"});
}
