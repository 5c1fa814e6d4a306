// Soft-target losses: the fused op (ops::soft_target_loss) and the layers on it
// (SoftTargetCrossEntropy, KlDivergence) against double loops and the composed form, with target
// rows gathered by index, zeros in the targets, gradients by central differences, aliasing,
// thread-count independence, and the vectorised log the entropy uses.
#include <cmath>
#include <cstring>
#include <limits>
#include <string>

#include "reference.hpp"

using namespace moca;
using namespace moca::test;

namespace {

/// Probability rows [R, K]: softmax of uniform(-spread, spread) logits, with every third
/// element of odd rows set to exactly 0 (and the row renormalised), as codes that underflow.
template <class T>
Tensor<T> probabilities(i64 R, i64 K, std::uint64_t stream, double spread = 4.0) {
  Tensor<T> t = uniform<T>({R, K}, stream, -spread, spread);
  for (i64 r = 0; r < R; ++r) {
    T* row = t.data() + r * K;
    double mx = -std::numeric_limits<double>::infinity(), sum = 0;
    for (i64 k = 0; k < K; ++k) mx = std::max(mx, double(row[k]));
    Vec e(static_cast<std::size_t>(K));
    for (i64 k = 0; k < K; ++k) {
      e[k] = (r % 2 == 1 && k % 3 == 0) ? 0.0 : std::exp(double(row[k]) - mx);
      sum += e[k];
    }
    for (i64 k = 0; k < K; ++k) row[k] = static_cast<T>(e[k] / sum);
  }
  return t;
}

struct Expected {
  double loss = 0;
  Vec grad;
};

/// Σ_r Σ_k t·(log t [entropy] − log softmax z), and s·(softmax z − t), in double.
template <class T>
Expected reference(const TensorView<T>& z, const TensorView<T>& table, const Tensor<Index>* rows,
                   bool entropy, double s) {
  const i64 M = z.shape().leading(), K = z.shape().last();
  Expected e;
  e.grad.resize(static_cast<std::size_t>(M * K));
  for (i64 r = 0; r < M; ++r) {
    const T* zr = z.data() + r * K;
    const T* tr = table.data() + (rows ? rows->data()[r] : r) * K;
    double mx = -std::numeric_limits<double>::infinity(), sum = 0;
    for (i64 k = 0; k < K; ++k) mx = std::max(mx, double(zr[k]));
    for (i64 k = 0; k < K; ++k) sum += std::exp(double(zr[k]) - mx);
    const double lse = mx + std::log(sum);
    for (i64 k = 0; k < K; ++k) {
      const double t = tr[k];
      if (t != 0) e.loss += t * ((entropy ? std::log(t) : 0.0) - (double(zr[k]) - lse));
      e.grad[r * K + k] = s * (std::exp(double(zr[k]) - lse) - t);
    }
  }
  return e;
}

}  // namespace

TEST_CASE_TEMPLATE("soft_target_loss matches double loops, with and without gathered rows", T,
                   float, double) {
  std::uint64_t stream = 100;
  // K = 1024 (MOCA's tiny codebook), ragged K for the masked row ends, a single row.
  for (auto [M, K] : {std::pair<i64, i64>{37, 1024}, {5, 13}, {1, 8}, {64, 7}, {300, 129}}) {
    for (bool gathered : {false, true}) {
      for (bool entropy : {false, true}) {
        const i64 R = gathered ? 3 * M + 1 : M;
        const Tensor<T> z = uniform<T>({M, K}, stream++, -6, 6);
        const Tensor<T> table = probabilities<T>(R, K, stream++);
        const Tensor<Index> rows = indices(M, R, stream++);
        const Tensor<Index>* idx = gathered ? &rows : nullptr;
        const double s = 0.37;
        const Expected e = reference(z, table, idx, entropy, s);
        const std::string what = detail::str("M ", M, " K ", K, gathered ? " gathered" : "",
                                             entropy ? " KL" : " CE");
        ops::SoftTargetWorkspace<T, Cpu> ws;
        TensorView<Index> rows_view = rows;
        Tensor<T> dz({M, K});
        const double got = ops::soft_target_loss(
            TensorView<T>(z), TensorView<T>(table), gathered ? &rows_view : nullptr, entropy,
            s, TensorView<T>(dz), ws);
        CHECK_MESSAGE(got == doctest::Approx(e.loss).epsilon(kRel<T> * 10), what);
        check_close_rows(what + " dz", TensorView<T>(dz), e.grad, kRel<T> * 10);
        // Loss only (no gradient) gives the same sum.
        const double loss_only = ops::soft_target_loss(
            TensorView<T>(z), TensorView<T>(table), gathered ? &rows_view : nullptr, entropy, 0,
            TensorView<T>{}, ws);
        CHECK_MESSAGE(std::memcmp(&got, &loss_only, sizeof(double)) == 0, what);
        // The fused kernel leaves the composed form's buffers alone.
        CHECK(ws.work.numel() == 0);
        CHECK(ws.gathered.numel() == 0);
      }
    }
  }
}

TEST_CASE_TEMPLATE("soft_target_loss equals the composed form; dz may alias z", T, float,
                   double) {
  const i64 M = 96, K = 1000, R = 200;
  const Tensor<T> z = uniform<T>({M, K}, 200, -8, 8), table = probabilities<T>(R, K, 201, 6);
  const Tensor<Index> rows = indices(M, R, 202);
  TensorView<Index> rows_view = rows;
  Tensor<T> gathered({M, K});
  ops::gather_rows(TensorView<T>(table), rows_view, TensorView<T>(gathered));
  ops::SoftTargetWorkspace<T, Cpu> ws;
  Tensor<T> dz_composed({M, K});
  const double composed = ops::soft_target_impl::composed<T, Cpu>(
      z, gathered, true, T(0.5), TensorView<T>(dz_composed), ws);
  Tensor<T> inplace({M, K});
  copy(TensorView<T>(z), TensorView<T>(inplace));
  const double fused = ops::soft_target_loss(TensorView<T>(inplace), TensorView<T>(table),
                                             &rows_view, true, 0.5, TensorView<T>(inplace), ws);
  REQUIRE(composed > 0);
  // The composed form sums all M·K products in one float sum (its error grows with M·K); the
  // fused kernel sums each row in float lanes and the rows in double.
  const Expected e = reference(z, gathered, nullptr, true, 0.5);
  const bool is_float = std::is_same_v<T, float>;
  CHECK(fused == doctest::Approx(e.loss).epsilon(is_float ? 1e-5 : 1e-12));
  CHECK(composed == doctest::Approx(e.loss).epsilon(is_float ? 1e-3 : 1e-12));
  check_close_rows("in-place dz vs composed", TensorView<T>(inplace), to_vec<T>(dz_composed),
                   kRel<T> * 10);
}

TEST_CASE("soft_target_loss: -inf logits with zero targets add nothing; NaN propagates") {
  const i64 K = 20;
  Tensor<float> z = uniform<float>({2, K}, 300, -3, 3), t({2, K}), dz({2, K});
  ops::zero(TensorView<float>(t));
  t.data()[3] = 0.25f, t.data()[9] = 0.75f;               // row 0: two classes
  t.data()[K + 0] = 1.0f;                                 // row 1: one-hot
  z.data()[5] = -std::numeric_limits<float>::infinity();  // a masked class with target 0
  ops::SoftTargetWorkspace<float, Cpu> ws;
  const double loss = ops::soft_target_loss(TensorView<float>(z), TensorView<float>(t), nullptr,
                                            true, 1, TensorView<float>(dz), ws);
  const Expected e = reference(z, t, nullptr, true, 1.0);
  CHECK(std::isfinite(loss));
  CHECK(loss == doctest::Approx(e.loss).epsilon(1e-5));
  CHECK(dz.data()[5] == 0.0f);
  z.data()[K + 4] = std::numeric_limits<float>::quiet_NaN();
  const double with_nan = ops::soft_target_loss(TensorView<float>(z), TensorView<float>(t),
                                                nullptr, true, 1, TensorView<float>(dz), ws);
  CHECK(std::isnan(with_nan));
}

TEST_CASE("soft_target_loss gradients pass central differences in double") {
  for (bool entropy : {false, true}) {
    const i64 M = 6, K = 11, R = 9;
    Tensor<double> z = uniform<double>({M, K}, 400, -2, 2);
    const Tensor<double> table = probabilities<double>(R, K, 401);
    const Tensor<Index> rows = indices(M, R, 402);
    TensorView<Index> rows_view = rows;
    ops::SoftTargetWorkspace<double, Cpu> ws;
    Tensor<double> dz({M, K});
    const double s = 1.7;
    auto loss = [&] {
      return s * ops::soft_target_loss(TensorView<double>(z), TensorView<double>(table),
                                       &rows_view, entropy, 0, TensorView<double>{}, ws);
    };
    ops::soft_target_loss(TensorView<double>(z), TensorView<double>(table), &rows_view, entropy,
                          s, TensorView<double>(dz), ws);
    check_gradient(entropy ? "KL dz" : "CE dz", z, dz, loss);
  }
}

TEST_CASE("KlDivergence and SoftTargetCrossEntropy: batch mean, gradient, accumulate") {
  const i64 M = 12, K = 33;
  Tensor<double> z = uniform<double>({3, 4, K}, 500, -3, 3);
  const Tensor<double> table = probabilities<double>(M, K, 501);
  const TensorView<double> t = TensorView<double>(table).reshape({3, 4, K});
  const Expected e = reference(z, t, nullptr, true, 1.0 / M);
  const Expected ce = reference(z, t, nullptr, false, 1.0 / M);
  KlDivergence<double> kl;
  SoftTargetCrossEntropy<double> xent;
  CHECK(kl.forward(z, t) == doctest::Approx(e.loss / M).epsilon(1e-12));
  CHECK(xent.forward(z, t) == doctest::Approx(ce.loss / M).epsilon(1e-12));
  // KL = cross-entropy − H(t) > 0 here (targets differ from softmax z).
  CHECK(kl.forward(z, t) > 0);
  CHECK(kl.forward(z, t) < xent.forward(z, t));
  Tensor<double> dz({3, 4, K});
  kl.backward(z, t, dz);
  check_close_rows("KL backward", TensorView<double>(dz), e.grad);
  // accumulate adds scale × the gradient.
  kl.backward(z, t, dz, 2.0, /*accumulate=*/true);
  Vec thrice = e.grad;
  for (double& v : thrice) v *= 3;
  check_close_rows("KL backward accumulated", TensorView<double>(dz), thrice);
  // forward_backward in place: loss and gradient as forward then backward.
  Tensor<double> zz(z.shape());
  copy(TensorView<double>(z), TensorView<double>(zz));
  const double l = kl.forward_backward(zz, t, zz, 0.5);
  CHECK(l == doctest::Approx(e.loss / M).epsilon(1e-12));
  Vec half = e.grad;
  for (double& v : half) v *= 0.5;
  check_close_rows("KL forward_backward in place", TensorView<double>(zz), half);
  // With gathered rows: targets t[rows[r]] of a table.
  const Tensor<Index> rows = indices(M, M, 502);
  Tensor<double> picked({M, K});
  ops::gather_rows(TensorView<double>(table), TensorView<Index>(rows),
                   TensorView<double>(picked));
  const TensorView<double> z2 = TensorView<double>(z).reshape({M, K});
  Tensor<double> dz_a({M, K}), dz_b({M, K});
  const double a = kl.forward_backward(z2, picked, dz_a);
  const double b = kl.forward_backward(z2, table, rows, dz_b);
  CHECK(a == doctest::Approx(b).epsilon(1e-14));
  check_close_rows("gathered vs copied targets", TensorView<double>(dz_b), to_vec<double>(dz_a));
  // The loss as a value read later (PendingValues): the same value and gradient.
  PendingValues<Cpu> values;
  Tensor<double> dz_c({M, K}), dz_d({M, K});
  const auto ta = kl.forward_backward(z2, picked, dz_c, 1.0, values);
  const auto tb = kl.forward_backward(z2, table, rows, dz_d, 0.5, values);
  values.read();
  CHECK(values[ta] == a);
  CHECK(values[tb] == b);
  CHECK(to_vec<double>(dz_c) == to_vec<double>(dz_a));
  for (i64 i = 0; i < M * K; ++i) CHECK(dz_d.data()[i] == 0.5 * dz_b.data()[i]);
}

TEST_CASE("soft_target_loss does not depend on the thread count") {
  const i64 M = 301, K = 1024, R = 500;
  const Tensor<float> z = uniform<float>({M, K}, 600, -5, 5);
  const Tensor<float> table = probabilities<float>(R, K, 601);
  const Tensor<Index> rows = indices(M, R, 602);
  TensorView<Index> rows_view = rows;
  ops::SoftTargetWorkspace<float, Cpu> ws;
  Tensor<float> dz1({M, K}), dzn({M, K});
  double l1 = 0;
  {
    Threads one(1);
    l1 = ops::soft_target_loss(TensorView<float>(z), TensorView<float>(table), &rows_view, true,
                               0.1f, TensorView<float>(dz1), ws);
  }
  for (int threads : {2, 3}) {
    Threads guard(threads);
    const double ln = ops::soft_target_loss(TensorView<float>(z), TensorView<float>(table),
                                            &rows_view, true, 0.1f, TensorView<float>(dzn), ws);
    CHECK(std::memcmp(&l1, &ln, sizeof(double)) == 0);
    check_bitwise(detail::str("dz with ", threads, " threads"), TensorView<float>(dzn),
                  TensorView<float>(dz1));
  }
}

TEST_CASE("soft-target loss errors name the shapes and the bad row") {
  Tensor<float> z({4, 10}), t({4, 10}), t9({4, 9}), big({6, 10}), dz({4, 11});
  Tensor<Index> rows({4}), three({3});
  for (int i = 0; i < 4; ++i) rows.data()[i] = i;
  ops::SoftTargetWorkspace<float, Cpu> ws;
  KlDivergence<float> kl;
  check_error_names("targets K", [&] { kl.forward(z, t9); },
                    {"KL divergence", "[4, 10]", "[4, 9]"});
  check_error_names("gradient shape", [&] { kl.backward(z, t, dz); }, {"[4, 10]", "[4, 11]"});
  check_error_names("row count", [&] { kl.forward_backward(z, big, three, z); },
                    {"3 target rows", "[4, 10]"});
  rows.data()[2] = 6;
  check_error_names("row range", [&] { kl.forward_backward(z, big, rows, z); },
                    {"target row 6", "(at 2)", "[6, 10]"});
  rows.data()[2] = -1;
  check_error_names("negative row", [&] { kl.forward_backward(z, big, rows, z); },
                    {"target row -1"});
}

#ifdef MOCA_CPU_SIMD_MATH
TEST_CASE("simd::log: relative error below 2e-7 from FLT_MIN to FLT_MAX; log 0 = log FLT_MIN") {
  double worst = 0;
  float worst_x = 0;
  // Every power of two and 64 mantissas inside each binade, plus values around 1.
  for (int e = -126; e <= 127; ++e) {
    for (int m = 0; m < 64; ++m) {
      alignas(32) float x[8], y[8];
      for (int l = 0; l < 8; ++l)
        x[l] = std::ldexp(1.0f + static_cast<float>(m * 8 + l) / 512.0f, e);
      _mm256_store_ps(y, cpu::simd::log(_mm256_load_ps(x)));
      for (int l = 0; l < 8; ++l) {
        if (!std::isfinite(x[l])) continue;
        const double exact = std::log(static_cast<double>(x[l]));
        // Near x = 1 the logarithm itself is tiny: measure against max(|log x|, 1e-3).
        const double err = std::abs(y[l] - exact) / std::max(std::abs(exact), 1e-3);
        if (err > worst) worst = err, worst_x = x[l];
      }
    }
  }
  CHECK_MESSAGE(worst < 2e-7, "worst relative error " << worst << " at x = " << worst_x);
  alignas(32) float x[8] = {0.0f, 1e-40f, 1.0f, 2.0f, 0.5f, 1e-30f, 3.4e38f, 0.999999f}, y[8];
  _mm256_store_ps(y, cpu::simd::log(_mm256_load_ps(x)));
  CHECK(y[0] == doctest::Approx(std::log(1.17549435e-38)).epsilon(1e-6));
  CHECK(y[1] == y[0]);
  CHECK(y[2] == 0.0f);
  CHECK(y[3] == doctest::Approx(std::log(2.0)).epsilon(1e-7));
  CHECK(y[4] == doctest::Approx(std::log(0.5)).epsilon(1e-7));
  CHECK(0.0f * y[0] == 0.0f);  // x · log x = 0 at x = 0
}
#endif

#ifdef MOCA_CPU_SIMD_MATH_512
TEST_CASE("simd: the 16-lane exp and normal CDF give the 8-lane forms' bits") {
  // Every power of two from 2^-30 to 2^7 with 64 mantissas, both signs, plus the edges of exp's
  // range and the special values: each lane of the 16-lane form must equal the 8-lane one.
  std::vector<float> xs = {0.0f,
                           -0.0f,
                           -87.4f,
                           -88.0f,
                           -200.0f,
                           88.3f,
                           100.0f,
                           1e-40f,
                           std::numeric_limits<float>::infinity(),
                           -std::numeric_limits<float>::infinity()};
  for (int e = -30; e <= 7; ++e)
    for (int m = 0; m < 64; ++m) {
      const float v = std::ldexp(1.0f + static_cast<float>(m) / 64.0f, e);
      xs.push_back(v);
      xs.push_back(-v);
    }
  while (xs.size() % 16 != 0) xs.push_back(1.0f);
  std::int64_t differ = 0;
  for (std::size_t i = 0; i < xs.size(); i += 16) {
    alignas(64) float e16[16], c16[16], p16[16], e8[16], c8[16], p8[16];
    const __m512 x16 = _mm512_loadu_ps(xs.data() + i);
    __m512 pdf16;
    _mm512_store_ps(e16, cpu::simd::exp(_mm512_maskz_min_ps(0xFFFF, x16, _mm512_set1_ps(88.0f))));
    _mm512_store_ps(c16, cpu::simd::normal_cdf(x16, &pdf16));
    _mm512_store_ps(p16, pdf16);
    for (int h = 0; h < 2; ++h) {
      const __m256 x8 = _mm256_loadu_ps(xs.data() + i + 8 * h);
      __m256 pdf8;
      _mm256_store_ps(e8 + 8 * h, cpu::simd::exp(_mm256_min_ps(x8, _mm256_set1_ps(88.0f))));
      _mm256_store_ps(c8 + 8 * h, cpu::simd::normal_cdf(x8, &pdf8));
      _mm256_store_ps(p8 + 8 * h, pdf8);
    }
    differ += std::memcmp(e16, e8, sizeof e16) != 0;
    differ += std::memcmp(c16, c8, sizeof c16) != 0;
    differ += std::memcmp(p16, p8, sizeof p16) != 0;
  }
  CHECK(differ == 0);
}
#endif
