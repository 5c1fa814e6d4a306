// bf16: rounding (against PyTorch's and against an independent rounding from double), the exact
// widening, arithmetic that rounds once, its limits; then the CPU op set and a ViT in bf16
// storage against the same computation in float.
#include <doctest/doctest.h>
#include <unistd.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <moca/core/bf16.hpp>
#include <moca/io/safetensors.hpp>
#include <moca/io/state_dict.hpp>
#include <moca/models/moca/moca.hpp>
#include <moca/models/vit.hpp>
#include <moca/optim/adamw.hpp>
#include <moca/optim/ema.hpp>
#include <moca/optim/sgd.hpp>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "moca_small.hpp"
#include "reference.hpp"

using namespace moca;
using namespace moca::test;

#if defined(MOCA_TEST_NO_AVX512) && defined(MOCA_CPU_SGEMM_AVX512)
#error "test_bf16_avx2 was compiled with the AVX-512 GEMM kernel"
#endif

namespace {

std::uint32_t bits_of(float f) { return std::bit_cast<std::uint32_t>(f); }
float float_of(std::uint32_t b) { return std::bit_cast<float>(b); }

}  // namespace

TEST_CASE("bf16 rounds floats as PyTorch does (tests/data/bf16_reference.txt)") {
  std::ifstream in(std::string(MOCA_TEST_DATA_DIR) + "/bf16_reference.txt");
  REQUIRE_MESSAGE(in, "missing tests/data/bf16_reference.txt (tests/python/generate_bf16_reference.py)");
  std::string line;
  int rows = 0, mismatches = 0;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream fields(line);
    std::uint32_t f = 0, h = 0;
    fields >> std::hex >> f >> h;
    REQUIRE_FALSE(fields.fail());
    const bf16 rounded = float_of(f);
    if (rounded.bits() != h) {
      ++mismatches;
      INFO("float bits ", f, ": bf16 ", rounded.bits(), ", PyTorch ", h);
      CHECK(rounded.bits() == h);
    }
    ++rows;
  }
  CHECK(rows > 900);
  CHECK(mismatches == 0);
}

TEST_CASE("bf16 rounding agrees with a rounding from double over a sweep of float bit patterns") {
  // The safetensors encoder rounds the exact double value with integer arithmetic on the
  // mantissa: an independent implementation of the same rule (ties to even, gradual underflow,
  // overflow to infinity). A stride prime to 2^32 reaches every exponent and many mantissas.
  std::uint64_t checked = 0;
  for (std::uint64_t b = 0; b < (std::uint64_t{1} << 32); b += 65521) {
    const float f = float_of(static_cast<std::uint32_t>(b));
    if (std::isnan(f)) continue;
    const std::uint16_t want = detail::encode_narrow_float<8, 7>(static_cast<double>(f));
    if (bf16(f).bits() != want) {
      INFO("float bits ", b);
      CHECK(bf16(f).bits() == want);
    }
    ++checked;
  }
  CHECK(checked > 60000);
  // Every bf16 widens exactly and rounds back to itself (NaNs to the canonical NaN).
  for (std::uint32_t h = 0; h < 65536; ++h) {
    const bf16 x = bf16::from_bits(static_cast<std::uint16_t>(h));
    const float f = x;
    CHECK(bits_of(f) == (h << 16));
    if (std::isnan(f)) {
      CHECK(bf16(f).bits() == 0x7fc0);
    } else if (bf16(f).bits() != h) {
      CHECK(bf16(f).bits() == h);
    }
  }
}

TEST_CASE("array conversions (8 lanes at a time) round and widen as one value at a time does") {
  // ops::convert on the CPU runs cpu::narrow_to_bf16 / widen_bf16: every float pattern of a
  // sweep (NaNs of both signs, infinities, subnormals, ties) and every bf16 pattern, in arrays
  // whose lengths leave a ragged end.
  std::vector<float> f;
  for (std::uint64_t b = 0; b < (std::uint64_t{1} << 32); b += 65521)
    f.push_back(float_of(static_cast<std::uint32_t>(b)));
  for (std::uint32_t tie : {0x3f808000u, 0x3f818000u, 0xbf808000u, 0x7f7fffffu, 0x00008000u})
    f.push_back(float_of(tie));
  f.push_back(-std::numeric_limits<float>::quiet_NaN());
  f.push_back(std::numeric_limits<float>::infinity());
  REQUIRE(f.size() % 8 != 0);
  const auto n = static_cast<std::int64_t>(f.size());
  Tensor<bf16> h({n});
  ops::convert(TensorView<float>(f.data(), {n}), TensorView<bf16>(h));
  std::int64_t wrong = 0;
  for (std::int64_t i = 0; i < n; ++i)
    wrong += h.data()[i].bits() != bf16(f[static_cast<std::size_t>(i)]).bits();
  CHECK(wrong == 0);
  Tensor<bf16> all({65536 + 3});
  for (std::int64_t i = 0; i < all.numel(); ++i)
    all.data()[i] = bf16::from_bits(static_cast<std::uint16_t>(i & 0xffff));
  Tensor<float> wide({all.numel()});
  ops::convert(TensorView<bf16>(all), TensorView<float>(wide));
  wrong = 0;
  for (std::int64_t i = 0; i < all.numel(); ++i)
    wrong += bits_of(wide.data()[i]) != (static_cast<std::uint32_t>(i & 0xffff) << 16);
  CHECK(wrong == 0);
}

TEST_CASE("bf16 arithmetic computes in float and rounds once; limits are bfloat16's") {
  bf16 x = 1.0f;
  x += 1.0f / 512;  // exactly half an ulp above 1: ties to even, stays 1
  CHECK(float(x) == 1.0f);
  x += 3.0f / 512;  // 1 + 3/512 rounds to 1 + 1/128
  CHECK(float(x) == 1.0f + 1.0f / 128);
  bf16 y = 3;
  y *= bf16(0.5f);
  CHECK(float(y) == 1.5f);
  y /= 3;
  CHECK(float(y) == 0.5f);
  y -= 1;
  CHECK(float(y) == -0.5f);
  CHECK(float(-y) == 0.5f);
  CHECK(float(bf16(0.1)) == 0.10009765625f);  // from double, via float
  CHECK(bf16(2.0f) > bf16(1.0f));
  CHECK(bf16(-0.0f) == bf16(0.0f));
  CHECK(std::signbit(float(bf16(-0.0f))));
  const bf16 a = 1.5f, b = 2.25f;
  const float product = a * b;  // a float product of the two widened values
  CHECK(product == 3.375f);

  using L = std::numeric_limits<bf16>;
  CHECK(float(L::max()) == std::ldexp(255.0f / 128.0f, 127));
  CHECK(float(L::lowest()) == -float(L::max()));
  CHECK(float(L::min()) == std::ldexp(1.0f, -126));
  CHECK(float(L::denorm_min()) == std::ldexp(1.0f, -133));
  CHECK(float(L::epsilon()) == std::ldexp(1.0f, -7));
  CHECK(float(L::epsilon()) == float(bf16::from_bits(0x3f81)) - 1.0f);
  CHECK(std::isinf(float(L::infinity())));
  CHECK(std::isnan(float(L::quiet_NaN())));
  CHECK(std::isnan(float(L::signaling_NaN())));
  CHECK(bf16(std::numeric_limits<float>::max()).bits() == L::infinity().bits());  // overflow
  CHECK(L::digits == 8);
  CHECK(is_floating_v<bf16>);
  CHECK(std::is_same_v<compute_t<bf16>, float>);
}

// ---- the CPU op set in bf16 ----------------------------------------------------------------------

namespace {

constexpr double kHalfUlp = 1.0 / 256;  // bf16's unit roundoff, 2^-8: one rounding's relative error
/// Float statistics (mean, rstd, var) of a bf16 op against the float op's: the same float sums,
/// a few float roundings apart.
constexpr double kStatTol = 1e-6;
/// Float parameter gradients of a bf16 op against the float op's: float sums of the same exact
/// products, apart by the statistics' roundoff (kStatTol) carried through x̂. A gradient stored
/// in bf16 would be 2^-9 (2e-3) off.
constexpr double kGradTol = 1e-5;

/// The encoder of the small MOCA test model: 8×8 images of 2×2 patches, 16 wide, 3 blocks.
VitConfig tiny_vit() { return moca::testing::small_moca_config().encoder; }

/// Random values already representable in bf16, as a bf16 tensor and as the same values in float.
struct Pair {
  Tensor<bf16> h;
  Tensor<float> f;
};
Pair random_pair(Shape s, std::uint64_t stream, double lo = -1.0, double hi = 1.0) {
  const Tensor<float> u = uniform<float>(s, stream, lo, hi);
  Pair p{Tensor<bf16>(s), Tensor<float>(s)};
  for (std::int64_t i = 0; i < u.numel(); ++i) {
    p.h.data()[i] = u.data()[i];
    p.f.data()[i] = p.h.data()[i];
  }
  return p;
}

/// Whether every element of h is the corresponding float rounded once to bf16, bit for bit.
bool rounds_to(const Tensor<bf16>& h, const Tensor<float>& f) {
  if (h.numel() != f.numel()) return false;
  for (std::int64_t i = 0; i < h.numel(); ++i)
    if (h.data()[i].bits() != bf16(f.data()[i]).bits()) return false;
  return true;
}

Vec widen(const TensorView<bf16>& x) {
  Vec v(static_cast<std::size_t>(x.numel()));
  for (std::int64_t i = 0; i < x.numel(); ++i) v[static_cast<std::size_t>(i)] = float(x.data()[i]);
  return v;
}

/// ||a − b|| / ||b||.
double normwise(const Vec& a, const Vec& b) {
  double d = 0, n = 0;
  for (std::size_t i = 0; i < a.size(); ++i) d += (a[i] - b[i]) * (a[i] - b[i]), n += b[i] * b[i];
  return std::sqrt(d) / std::sqrt(n);
}

}  // namespace

TEST_CASE("bf16 gemm is the float product of the same values, rounded once") {
  // K = 70 is one inner slice of the packed kernel, whose last slice rounds C as it stores it;
  // K = 600 is two, the first summed into float scratch.
  for (int t = 0; t < 8; ++t) {
    const bool ta = (t & 1) != 0, tb = (t & 2) != 0;
    CAPTURE(ta);
    CAPTURE(tb);
    const std::int64_t M = 37, N = 29, K = t < 4 ? 70 : 600;
    CAPTURE(K);
    const Pair A = random_pair(ta ? Shape{K, M} : Shape{M, K}, 1 + t);
    const Pair B = random_pair(tb ? Shape{N, K} : Shape{K, N}, 11 + t);
    const Pair C0 = random_pair({M, N}, 21 + t), bias = random_pair({N}, 31 + t);
    const Trans tA = ta ? Trans::T : Trans::N, tB = tb ? Trans::T : Trans::N;
    Tensor<float> f = C0.f.clone();
    Tensor<bf16> h = C0.h.clone();
    ops::gemm(A.f, tA, B.f, tB, f, 0.5f, -1.5f);
    ops::gemm(A.h, tA, B.h, tB, h, 0.5f, -1.5f);
    std::int64_t differ = 0;
    for (std::int64_t i = 0; i < f.numel(); ++i) differ += bf16(f.data()[i]).bits() != h.data()[i].bits();
    CHECK(differ == 0);
    ops::gemm_bias(A.f, tA, B.f, tB, bias.f, f);
    ops::gemm_bias(A.h, tA, B.h, tB, bias.h, h);
    differ = 0;
    for (std::int64_t i = 0; i < f.numel(); ++i) differ += bf16(f.data()[i]).bits() != h.data()[i].bits();
    CHECK(differ == 0);
    // Into float C (a weight's gradient, accumulated): the float product of the same values,
    // bit for bit, read and written without rounding.
    Tensor<float> wide = C0.f.clone(), into = C0.f.clone();
    ops::fill(TensorView<float>(wide), 1.0f + 1e-5f);  // not a bf16 value
    ops::fill(TensorView<float>(into), 1.0f + 1e-5f);
    ops::gemm(A.f, tA, B.f, tB, TensorView<float>(wide), 0.5f, 1.0f);
    ops::gemm(A.h, tA, B.h, tB, TensorView<float>(into), 0.5f, 1.0f);
    CHECK(std::equal(wide.begin(), wide.end(), into.begin()));
  }
}

TEST_CASE("bf16 GELU is the float GELU rounded, for every bf16 input") {
  // All 65,536 bit patterns (zeros, subnormals, infinities and NaNs among them) as x, and as dy
  // in reverse order: the bf16 ops look results up by x's bits, and each must be the float op's
  // result on the same values rounded once.
  const std::int64_t n = 65536;
  Tensor<float> xf({n}), dyf({n}), y({n}), dx({n});
  Tensor<bf16> xh({n}), dyh({n}), yh({n}), dxh({n});
  for (std::int64_t i = 0; i < n; ++i) {
    xh.data()[i] = bf16::from_bits(static_cast<std::uint16_t>(i));
    dyh.data()[i] = bf16::from_bits(static_cast<std::uint16_t>(n - 1 - i));
    xf.data()[i] = xh.data()[i];
    dyf.data()[i] = dyh.data()[i];
  }
  ops::gelu(xf, y);
  ops::gelu(xh, yh);
  ops::gelu_backward(xf, dyf, dx);
  ops::gelu_backward(xh, dyh, dxh);
  std::int64_t forward_differ = 0, backward_differ = 0, finite = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    forward_differ += bf16(y.data()[i]).bits() != yh.data()[i].bits();
    backward_differ += bf16(dx.data()[i]).bits() != dxh.data()[i].bits();
    finite += std::isfinite(y.data()[i]) && std::isfinite(dx.data()[i]);
  }
  CHECK(forward_differ == 0);
  CHECK(backward_differ == 0);
  CHECK(finite > n / 2);  // mostly ordinary values: the comparison is not NaN against NaN
  // Known values through the bf16 path: gelu(0) = 0, gelu(1) = Φ(1) = 0.84134 (0.83984375 in
  // bf16), gelu'(0) = 1/2, gelu'(1) = Φ(1) + φ(1) = 1.08332.
  CHECK(float(yh.data()[0]) == 0.0f);
  CHECK(float(yh.data()[bf16(1.0f).bits()]) == 0.83984375f);
  Tensor<bf16> x2({2}), dy2({2}), dx2({2});
  x2.data()[0] = bf16(0.0f);
  x2.data()[1] = bf16(1.0f);
  dy2.data()[0] = bf16(3.0f);
  dy2.data()[1] = bf16(2.0f);
  ops::gelu_backward(x2, dy2, dx2);
  CHECK(float(dx2.data()[0]) == 1.5f);
  CHECK(float(dx2.data()[1]) == 2.171875f);  // 2.16663 rounded to bf16's 2^-6 steps
  // In place (dx aliasing dy) gives the same bits.
  ops::gelu_backward(xh, dyh, dyh);
  CHECK(std::memcmp(dyh.data(), dxh.data(), n * sizeof(bf16)) == 0);
}

TEST_CASE("bf16 rows, GELU and sums compute in float: within one rounding of the float op") {
  // Inputs exactly representable in bf16, so the float op on them is the reference; the bf16 op
  // stores its result in bf16: one rounding, 2^-8 relative, plus the float ops' own
  // summation-order differences. Saved statistics stay float: the float op's, to its roundoff.
  const std::int64_t M = 19, N = 77;
  const Pair x = random_pair({M, N}, 41, -3, 3), dy = random_pair({M, N}, 42);
  const Pair gamma = random_pair({N}, 43, 0.5, 1.5), beta = random_pair({N}, 44);
  const double tol = 1.5 * kHalfUlp;
  {
    Tensor<float> y({M, N}), mean({M}), rstd({M}), meanh({M}), rstdh({M});
    Tensor<bf16> yh({M, N});
    ops::layer_norm(x.f, gamma.f, beta.f, 1e-6, y, mean, rstd);
    ops::layer_norm(x.h, gamma.h, beta.h, 1e-6, yh, meanh, rstdh);
    check_close_scaled("layer_norm", TensorView<bf16>(yh), to_vec<float>(y), tol, Vec{1e-6});
    CHECK(normwise(to_vec<float>(meanh), to_vec<float>(mean)) <= kStatTol);
    CHECK(normwise(to_vec<float>(rstdh), to_vec<float>(rstd)) <= kStatTol);
    // Backward, each side from its own forward's statistics.
    // The parameter gradients are float (grad_t<bf16>) and start from a value a bf16 store
    // could not hold, which must survive the accumulation unrounded.
    Tensor<float> dx({M, N}), dg({N}), db({N}), dgh({N}), dbh({N});
    Tensor<bf16> dxh({M, N});
    for (Tensor<float>* t : {&dg, &db, &dgh, &dbh}) ops::fill(TensorView<float>(*t), 1.0f + 1e-5f);
    ops::layer_norm_backward(x.f, gamma.f, mean, rstd, dy.f, dx, dg, db);
    ops::layer_norm_backward(x.h, gamma.h, meanh, rstdh, dy.h, dxh, dgh, dbh);
    // dx is a difference of terms of the row's size: measured against the row's scale.
    check_close_scaled("layer_norm dx", TensorView<bf16>(dxh), to_vec<float>(dx), tol,
                       row_scale(to_vec<float>(dx), N));
    check_close_scaled("layer_norm dgamma", TensorView<float>(dgh), to_vec<float>(dg), kGradTol,
                       Vec{max_abs(to_vec<float>(dg))});
    check_close_scaled("layer_norm dbeta", TensorView<float>(dbh), to_vec<float>(db), kGradTol,
                       Vec{max_abs(to_vec<float>(db))});
    // The float rows' own arithmetic on the same values (bf16 rows are widened as loaded), so
    // bit for bit: y and dx the float op's rounded once, the float statistics and parameter
    // gradients equal (M·N = 1,463 and N = 77 leave ragged row ends).
    CHECK(rounds_to(yh, y));
    CHECK(rounds_to(dxh, dx));
    CHECK(std::memcmp(meanh.data(), mean.data(), M * sizeof(float)) == 0);
    CHECK(std::memcmp(rstdh.data(), rstd.data(), M * sizeof(float)) == 0);
    CHECK(std::memcmp(dgh.data(), dg.data(), N * sizeof(float)) == 0);
    CHECK(std::memcmp(dbh.data(), db.data(), N * sizeof(float)) == 0);
  }
  {
    // The residual forms, in place as the ViT runs them: sum = x + add over x, rounded to bf16
    // before its statistics are taken (the float reference normalises the same rounded sum);
    // dx = residual + the LayerNorm gradient, over dy.
    const Pair add = random_pair({M, N}, 45), residual = random_pair({M, N}, 46);
    Tensor<bf16> sumh = x.h.clone(), yh({M, N});
    Tensor<float> meanh({M}), rstdh({M});
    ops::add_layer_norm(TensorView<bf16>(sumh), TensorView<bf16>(add.h), TensorView<bf16>(gamma.h),
                        TensorView<bf16>(beta.h), 1e-6, TensorView<bf16>(sumh), TensorView<bf16>(yh),
                        TensorView<float>(meanh), TensorView<float>(rstdh));
    Tensor<float> sum({M, N}), rounded({M, N}), y({M, N}), mean({M}), rstd({M});
    ops::add(x.f, add.f, sum);
    for (std::int64_t i = 0; i < sum.numel(); ++i) rounded.data()[i] = bf16(sum.data()[i]);
    check_close_scaled("residual sum", TensorView<bf16>(sumh), to_vec<float>(rounded), 0.0, Vec{0.0});
    ops::layer_norm(rounded, gamma.f, beta.f, 1e-6, y, mean, rstd);
    check_close_scaled("add_layer_norm", TensorView<bf16>(yh), to_vec<float>(y), tol, Vec{1e-6});
    CHECK(normwise(to_vec<float>(meanh), to_vec<float>(mean)) <= kStatTol);
    CHECK(normwise(to_vec<float>(rstdh), to_vec<float>(rstd)) <= kStatTol);
    Tensor<float> dx = dy.f.clone(), dg({N}), db({N}), dgh({N}), dbh({N});
    Tensor<bf16> dxh = dy.h.clone();
    ops::layer_norm_backward_add(TensorView<float>(rounded), TensorView<float>(gamma.f),
                                 TensorView<float>(mean), TensorView<float>(rstd),
                                 TensorView<float>(dx), TensorView<float>(residual.f),
                                 TensorView<float>(dx), TensorView<float>(dg), TensorView<float>(db));
    ops::layer_norm_backward_add(
        TensorView<bf16>(sumh), TensorView<bf16>(gamma.h), TensorView<float>(meanh),
        TensorView<float>(rstdh), TensorView<bf16>(dxh), TensorView<bf16>(residual.h),
        TensorView<bf16>(dxh), TensorView<float>(dgh), TensorView<float>(dbh));
    check_close_scaled("layer_norm_backward_add dx", TensorView<bf16>(dxh), to_vec<float>(dx), tol,
                       row_scale(to_vec<float>(dx), N));
    check_close_scaled("layer_norm_backward_add dgamma", TensorView<float>(dgh), to_vec<float>(dg),
                       kGradTol, Vec{max_abs(to_vec<float>(dg))});
    check_close_scaled("layer_norm_backward_add dbeta", TensorView<float>(dbh), to_vec<float>(db),
                       kGradTol, Vec{max_abs(to_vec<float>(db))});
    // Bit for bit, as above (in place, both sides).
    CHECK(rounds_to(yh, y));
    CHECK(rounds_to(dxh, dx));
    CHECK(std::memcmp(dgh.data(), dg.data(), N * sizeof(float)) == 0);
  }
  {
    Tensor<float> p({M, N}), dx({M, N});
    Tensor<bf16> ph({M, N}), dxh({M, N});
    ops::softmax(x.f, p);
    ops::softmax(x.h, ph);
    check_close_scaled("softmax", TensorView<bf16>(ph), to_vec<float>(p), 2 * tol, Vec{0.0});
    for (std::int64_t i = 0; i < p.numel(); ++i) p.data()[i] = ph.data()[i];
    ops::softmax_backward(p, dy.f, dx);
    ops::softmax_backward(ph, dy.h, dxh);
    check_close_scaled("softmax backward", TensorView<bf16>(dxh), to_vec<float>(dx), tol,
                       row_scale(to_vec<float>(dx), N));
  }
  {
    Tensor<float> lp({M, N}), dx({M, N});
    Tensor<bf16> lph({M, N}), dxh({M, N});
    ops::log_softmax(x.f, lp);
    ops::log_softmax(x.h, lph);
    check_close_scaled("log_softmax", TensorView<bf16>(lph), to_vec<float>(lp), tol, Vec{1e-6});
    for (std::int64_t i = 0; i < lp.numel(); ++i) lp.data()[i] = lph.data()[i];
    ops::log_softmax_backward(lp, dy.f, dx);
    ops::log_softmax_backward(lph, dy.h, dxh);
    check_close_scaled("log_softmax backward", TensorView<bf16>(dxh), to_vec<float>(dx), tol,
                       row_scale(to_vec<float>(dx), N));
    // The codebook's codes: softmax(scale · x) in place, with each row's max − mean.
    Tensor<float> codes = x.f.clone(), spread({M}), work;
    Tensor<bf16> codesh = x.h.clone(), spreadh({M}), workh;
    ops::softmax_with_spread(TensorView<float>(codes), 2.0f, TensorView<float>(spread), work);
    ops::softmax_with_spread(TensorView<bf16>(codesh), bf16(2.0f), TensorView<bf16>(spreadh), workh);
    check_close_scaled("softmax with spread", TensorView<bf16>(codesh), to_vec<float>(codes), tol,
                       Vec{0.0});
    check_close_scaled("spread", TensorView<bf16>(spreadh), to_vec<float>(spread), tol, Vec{1e-6});
  }
  {
    Tensor<float> g({M, N}), dg({M, N}), s({N});
    Tensor<bf16> gh({M, N}), dgh({M, N}), sh({N});
    ops::gelu(x.f, g);
    ops::gelu(x.h, gh);
    check_close_scaled("gelu", TensorView<bf16>(gh), to_vec<float>(g), tol, Vec{1e-6});
    ops::gelu_backward(x.f, dy.f, dg);
    ops::gelu_backward(x.h, dy.h, dgh);
    check_close_scaled("gelu backward", TensorView<bf16>(dgh), to_vec<float>(dg), tol, Vec{1e-6});
    // Element by element the same float arithmetic, so each bf16 result is the float op's rounded
    // once, bit for bit (M·N = 1,463 leaves ragged ends for the threads' ranges).
    std::int64_t differ = 0;
    for (std::int64_t i = 0; i < g.numel(); ++i) {
      differ += bf16(g.data()[i]).bits() != gh.data()[i].bits();
      differ += bf16(dg.data()[i]).bits() != dgh.data()[i].bits();
    }
    CHECK(differ == 0);
    ops::sum(dy.f, 0, s);
    ops::sum(dy.h, 0, sh);
    check_close_scaled("column sums", TensorView<bf16>(sh), to_vec<float>(s), tol,
                       Vec{max_abs(to_vec<float>(s))});
    // Into float (a bias's gradient), accumulating: the float op's sums exactly, unrounded.
    Tensor<float> acc({N}), acch({N});
    ops::fill(TensorView<float>(acc), 1.0f + 1e-5f);
    ops::fill(TensorView<float>(acch), 1.0f + 1e-5f);
    ops::sum(dy.f, 0, TensorView<float>(acc), 0.5f, 1.0f);
    ops::sum(dy.h, 0, TensorView<float>(acch), 0.5f, 1.0f);
    CHECK(std::equal(acc.begin(), acc.end(), acch.begin()));
    // Rows (inner == 1) into float as well.
    Tensor<float> rows({M}), rowsh({M});
    ops::sum(dy.f, 1, TensorView<float>(rows));
    ops::sum(dy.h, 1, TensorView<float>(rowsh));
    CHECK(std::equal(rows.begin(), rows.end(), rowsh.begin()));
  }
}

TEST_CASE("bf16 LayerNorm keeps its statistics in float: rows far from zero") {
  // Rows of 60..68 (a residual stream far from zero mean): a mean near 64 rounded to bf16 could
  // move by 0.25, a tenth of the rows' spread (about 2.3), and shift every x̂ of its row by that.
  // From float statistics the backward stays within one rounding of the float op's.
  const std::int64_t M = 16, N = 96;
  const Pair x = random_pair({M, N}, 61, 60, 68), dy = random_pair({M, N}, 62);
  const Pair gamma = random_pair({N}, 63, 0.5, 1.5), beta = random_pair({N}, 64);
  const double tol = 1.5 * kHalfUlp;
  Tensor<float> y({M, N}), mean({M}), rstd({M}), meanh({M}), rstdh({M});
  Tensor<bf16> yh({M, N});
  ops::layer_norm(x.f, gamma.f, beta.f, 1e-6, y, mean, rstd);
  ops::layer_norm(x.h, gamma.h, beta.h, 1e-6, yh, meanh, rstdh);
  check_close_scaled("layer_norm", TensorView<bf16>(yh), to_vec<float>(y), tol, Vec{1e-6});
  Tensor<float> dx({M, N}), dg({N}), db({N}), dgh({N}), dbh({N});
  Tensor<bf16> dxh({M, N});
  ops::layer_norm_backward(x.f, gamma.f, mean, rstd, dy.f, dx, dg, db);
  ops::layer_norm_backward(x.h, gamma.h, meanh, rstdh, dy.h, dxh, dgh, dbh);
  const Vec scale = row_scale(to_vec<float>(dx), N);
  check_close_scaled("layer_norm dx", TensorView<bf16>(dxh), to_vec<float>(dx), tol, scale);
  check_close_scaled("layer_norm dgamma", TensorView<float>(dgh), to_vec<float>(dg), kGradTol,
                     Vec{max_abs(to_vec<float>(dg))});
  // The same backward from statistics rounded to bf16 misses dgamma by about ten times the
  // tolerance (0.06 here): what this test guards.
  Tensor<float> mean_rounded({M}), rstd_rounded({M}), dx_rounded({M, N}), dg_rounded({N}),
      db_rounded({N});
  for (std::int64_t r = 0; r < M; ++r) {
    mean_rounded.data()[r] = float(bf16(mean.data()[r]));
    rstd_rounded.data()[r] = float(bf16(rstd.data()[r]));
  }
  ops::layer_norm_backward(x.f, gamma.f, mean_rounded, rstd_rounded, dy.f, dx_rounded, dg_rounded,
                           db_rounded);
  CHECK(normwise(to_vec<float>(dg_rounded), to_vec<float>(dg)) > 4 * tol);
}

TEST_CASE("bf16 elementwise ops compute in float and round once") {
  // 1000 elements: several of the 256-element chunks the CPU widens at a time, and a ragged
  // end; outputs written over an input, as the layers use them. The float op on the same
  // (bf16-exact) values and scalars, rounded once, is within half a bf16 step of every element.
  const std::int64_t n = 1000;
  const Pair a = random_pair({n}, 81, -4, 4), b = random_pair({n}, 82, -4, 4);
  const double tol = kHalfUlp;
  auto check = [&](const char* what, auto&& float_op, auto&& bf16_op) {
    Tensor<float> y = b.f.clone();
    Tensor<bf16> yh = b.h.clone();
    float_op(y);
    bf16_op(yh);
    check_close_scaled(what, TensorView<bf16>(yh), to_vec<float>(y), tol, Vec{1e-30});
  };
  check("add", [&](Tensor<float>& y) { ops::add(a.f, y, y); },
        [&](Tensor<bf16>& y) { ops::add(a.h, y, y); });
  check("mul", [&](Tensor<float>& y) { ops::mul(a.f, y, y); },
        [&](Tensor<bf16>& y) { ops::mul(a.h, y, y); });
  check("axpby", [&](Tensor<float>& y) { ops::axpby(0.75f, a.f, -1.5f, y); },
        [&](Tensor<bf16>& y) { ops::axpby(bf16(0.75f), a.h, bf16(-1.5f), y); });
  check("axpby, beta 0", [&](Tensor<float>& y) { ops::axpby(0.75f, a.f, 0.0f, y); },
        [&](Tensor<bf16>& y) { ops::axpby(bf16(0.75f), a.h, bf16(0.0f), y); });
  check("scale", [&](Tensor<float>& y) { ops::scale(y, 0.375f); },
        [&](Tensor<bf16>& y) { ops::scale(y, bf16(0.375f)); });
}

TEST_CASE("bf16 attention computes in float: within a rounding of the float attention") {
  // Heads the small-head path takes (hd a multiple of 8: on the AVX-512 BF16 dot product where
  // there is one, the probabilities and dS rounded to bf16 for the products that read them;
  // elsewhere widened per head) and one it does not (hd 12: the widened GEMMs and the bf16
  // softmax rows). Odd and even token counts, one to four 16-column vectors per block, and
  // ViT-S/16's 197 tokens (four column blocks of scores). The bf16 op rounds the probabilities,
  // ctx and dqkv as it stores them; the float op on the same (bf16-exact) inputs is the
  // reference, normwise (the pair path's ctx, from rounded probabilities, is 1.4 half-ulps off
  // at worst over these shapes; the widened path's 0.7).
  for (const auto& [S, hd, tol] :
       {std::tuple{17, 16, 2 * kHalfUlp}, std::tuple{40, 32, 2 * kHalfUlp},
        std::tuple{65, 64, 2 * kHalfUlp}, std::tuple{197, 64, 2 * kHalfUlp},
        std::tuple{9, 12, 4 * kHalfUlp}}) {
    CAPTURE(S);
    CAPTURE(hd);
    const std::int64_t B = 2, H = 3, dim = H * hd;
    const Pair qkv = random_pair({B, S, 3 * dim}, 71, -2, 2), dctx = random_pair({B, S, dim}, 72);
    const float scale = 0.25f;
    Tensor<float> p({B, H, S, S}), ctx({B, S, dim}), dp({B, H, S, S}), dqkv({B, S, 3 * dim});
    Tensor<bf16> ph({B, H, S, S}), ctxh({B, S, dim}), dph({B, H, S, S}), dqkvh({B, S, 3 * dim});
    ops::attention_forward(qkv.f, H, scale, p, ctx);
    ops::attention_forward(qkv.h, H, bf16(scale), ph, ctxh);
    check_close("attention probabilities", TensorView<bf16>(ph), to_vec<float>(p), tol);
    check_close("attention ctx", TensorView<bf16>(ctxh), to_vec<float>(ctx), tol);
    ops::attention_backward(qkv.f, p, ctx, dctx.f, H, scale, dp, dqkv);
    ops::attention_backward(qkv.h, ph, ctxh, dctx.h, H, bf16(scale), dph, dqkvh);
    check_close("attention dqkv", TensorView<bf16>(dqkvh), to_vec<float>(dqkv), 2 * tol);
  }
}

#ifdef MOCA_CPU_SGEMM_BF16_PAIRS
TEST_CASE("bf16 pair products of a head: both operand layouts, every edge, both destinations") {
  // C = α·A·B on the BF16 dot product, against double. A read in place from rows that hold the
  // inner index, or from the pair words interleaved_rows writes from Aᵀ; B from X transposed
  // (even K) or X's rows interleaved. Row counts run through every tile height's remainder, column
  // counts through one to four 16-lane vectors and ragged tails, inner lengths odd and even. The
  // destinations sit in buffers wider than N filled with a sentinel: nothing past N is written.
  // Products of bf16 values are exact in float, so only the float sums differ from double.
  namespace pairs = cpu::small_gemm_pairs;
  const float alpha = 0.75f;
  const float sentinel = 777.0f;
  std::uint64_t stream = 300;
  std::int64_t products = 0;
  for (const std::int64_t M : {1, 7, 13, 29})
    for (const std::int64_t N : {3, 16, 17, 40, 64, 65, 197})
      for (const std::int64_t K : {8, 17, 64, 65})
        for (const bool a_words : {false, true})
          for (const pairs::Source source :
               {pairs::Source::TransposedWords, pairs::Source::InterleavedRows}) {
            if (source == pairs::Source::TransposedWords && K % 2 != 0) continue;
            CAPTURE(M);
            CAPTURE(N);
            CAPTURE(K);
            CAPTURE(a_words);
            CAPTURE(static_cast<int>(source));
            const std::int64_t Kw = (K + 1) / 2 * 2;  // A's rows padded to whole pairs
            const Pair a = random_pair({M, K}, stream++), x = random_pair({K, N}, stream++);
            // A in place: rows of Kw values, the pad zero.
            std::vector<bf16> a_rows(M * Kw, bf16(0.0f));
            for (std::int64_t i = 0; i < M; ++i)
              for (std::int64_t k = 0; k < K; ++k) a_rows[i * Kw + k] = a.h.data()[i * K + k];
            // Or Aᵀ [K, M] interleaved into ⌈K/2⌉ rows of Mv words.
            const std::int64_t Mv = (M + 15) / 16 * 16;
            std::vector<bf16> at(K * M), a_pairs(Kw * Mv, bf16(sentinel));
            for (std::int64_t i = 0; i < M; ++i)
              for (std::int64_t k = 0; k < K; ++k) at[k * M + i] = a.h.data()[i * K + k];
            pairs::interleaved_rows(K, M, M, at.data(), M, a_pairs.data(), Mv);
            // X as the source reads it: [N, K] for transposed words, [K, N] for interleaved rows,
            // with a row stride wider than the row.
            const bool transposed = source == pairs::Source::TransposedWords;
            const std::int64_t ldx = (transposed ? K : N) + 6;
            std::vector<bf16> xs((transposed ? N : K) * ldx, bf16(sentinel));
            for (std::int64_t k = 0; k < K; ++k)
              for (std::int64_t j = 0; j < N; ++j)
                xs[transposed ? j * ldx + k : k * ldx + j] = x.h.data()[k * N + j];
            cpu::sgemm_avx2::PackBuffer panel_buffer;  // 64-byte aligned, as gemm requires
            bf16* panel = reinterpret_cast<bf16*>(panel_buffer.reserve(pairs::panel_values(K)));
            const std::int64_t ldc = N + 5;
            std::vector<float> c(M * ldc, sentinel);
            std::vector<bf16> out(M * ldc, bf16(sentinel));
            const bf16* a_ptr = a_words ? a_pairs.data() : a_rows.data();
            const std::int64_t ars = a_words ? 2 : Kw, acs = a_words ? 2 * Mv : 2;
            pairs::gemm(M, N, K, alpha, a_ptr, ars, acs, {source, xs.data(), ldx},
                        {c.data(), nullptr, ldc}, panel);
            pairs::gemm(M, N, K, alpha, a_ptr, ars, acs, {source, xs.data(), ldx},
                        {nullptr, out.data(), ldc}, panel);
            std::int64_t wrong = 0, rounded_wrong = 0, overwritten = 0;
            for (std::int64_t i = 0; i < M; ++i) {
              for (std::int64_t j = 0; j < N; ++j) {
                double ref = 0, magnitude = 0;
                for (std::int64_t k = 0; k < K; ++k) {
                  const double t = double(a.f.data()[i * K + k]) * double(x.f.data()[k * N + j]);
                  ref += t;
                  magnitude += std::abs(t);
                }
                ref *= alpha;
                magnitude *= alpha;
                const double got = c[i * ldc + j];
                wrong += std::abs(got - ref) > 1e-6 * magnitude + 1e-30;
                // The rounded store: the float result rounded once, bit for bit.
                rounded_wrong += out[i * ldc + j].bits() != bf16(c[i * ldc + j]).bits();
              }
              for (std::int64_t j = N; j < ldc; ++j)
                overwritten +=
                    c[i * ldc + j] != sentinel || out[i * ldc + j].bits() != bf16(sentinel).bits();
            }
            CHECK(wrong == 0);
            CHECK(rounded_wrong == 0);
            CHECK(overwritten == 0);
            ++products;
          }
  CHECK(products == 4 * 7 * (2 * 2 + 2 * 1) * 2);
}
#endif

TEST_CASE("bf16 BatchNorm sums in float and keeps float statistics of 256 samples") {
  // 256 samples around 3: their sum (~770) has a bf16 spacing of 4, so a sum kept in bf16 would
  // lose most of each addend; in float the statistics are the float op's, and stay float.
  const std::int64_t M = 256, N = 40;
  const Pair x = random_pair({M, N}, 51, 2, 4), dy = random_pair({M, N}, 52);
  const Pair gamma = random_pair({N}, 53, 0.5, 1.5), beta = random_pair({N}, 54);
  const double tol = 1.5 * kHalfUlp;
  Tensor<float> y({M, N}), mean({N}), var({N}), meanh({N}), varh({N});
  Tensor<bf16> yh({M, N});
  ops::batch_norm(x.f, gamma.f, beta.f, 1e-5, y, mean, var);
  ops::batch_norm(x.h, gamma.h, beta.h, 1e-5, yh, meanh, varh);
  CHECK(normwise(to_vec<float>(meanh), to_vec<float>(mean)) <= kStatTol);
  CHECK(normwise(to_vec<float>(varh), to_vec<float>(var)) <= kStatTol);
  check_close_scaled("batch_norm y", TensorView<bf16>(yh), to_vec<float>(y), tol, Vec{1e-6});
  // Backward, each side from its own forward's statistics.
  Tensor<float> dx({M, N}), dg({N}), db({N}), dgh({N}), dbh({N});
  Tensor<bf16> dxh({M, N});
  ops::batch_norm_backward(x.f, gamma.f, mean, var, 1e-5, dy.f, dx, dg, db);
  ops::batch_norm_backward(x.h, gamma.h, meanh, varh, 1e-5, dy.h, dxh, dgh, dbh);
  check_close_scaled("batch_norm dx", TensorView<bf16>(dxh), to_vec<float>(dx), tol,
                     Vec{max_abs(to_vec<float>(dx))});
  check_close_scaled("batch_norm dgamma", TensorView<float>(dgh), to_vec<float>(dg), kGradTol,
                     Vec{max_abs(to_vec<float>(dg))});
  check_close_scaled("batch_norm dbeta", TensorView<float>(dbh), to_vec<float>(db), kGradTol,
                     Vec{max_abs(to_vec<float>(db))});
}

TEST_CASE("the atomic bf16 addition's word update adds to one half and keeps the other") {
  // Two neighbouring bf16 in memory, read as the 32-bit word the CUDA backend swaps: the first
  // is the low half (shift 0), the second the high half (shift 16).
  const bf16 pair[2] = {bf16(1.5f), bf16(-3.25f)};
  std::uint32_t word = 0;
  static_assert(sizeof(word) == sizeof(pair));
  std::memcpy(&word, pair, sizeof word);
  const bf16 add(0.0078125f);  // 2^-7: exact on 1.5's grid, not on 3.25's (rounds to even)
  const std::uint32_t low = add_to_bf16_half(word, 0, add);
  const std::uint32_t high = add_to_bf16_half(word, 16, add);
  bf16 after[2];
  std::memcpy(static_cast<void*>(after), &low, sizeof low);
  CHECK(after[0].bits() == bf16(1.5f + 0.0078125f).bits());
  CHECK(after[1].bits() == pair[1].bits());
  std::memcpy(static_cast<void*>(after), &high, sizeof high);
  CHECK(after[0].bits() == pair[0].bits());
  CHECK(after[1].bits() == bf16(-3.25f + 0.0078125f).bits());
  // Rounded once, as +=: a sum between two bf16 values lands on the nearer (ties to even).
  bf16 expected = pair[1];
  expected += add;
  CHECK(after[1].bits() == expected.bits());
  // NaN stays the canonical NaN in its half.
  const std::uint32_t nan_word = add_to_bf16_half(word, 16, std::numeric_limits<bf16>::quiet_NaN());
  std::memcpy(static_cast<void*>(after), &nan_word, sizeof nan_word);
  CHECK(after[1].bits() == 0x7fc0);
  CHECK(after[0].bits() == pair[0].bits());
}

TEST_CASE("images reach a bf16 model rounded once, and its features come back widened") {
  const Pair x = random_pair({3, 1, 4, 4}, 61);
  Tensor<float> f({3, 1, 4, 4});
  for (std::int64_t i = 0; i < f.numel(); ++i) f.data()[i] = x.f.data()[i] + 1e-4f;  // not bf16
  Tensor<bf16> h({3, 1, 4, 4}), stage;
  ops::upload_converted(TensorView<float>(f), TensorView<bf16>(h), stage);
  Tensor<float> back({3, 1, 4, 4});
  Tensor<bf16> stage_back;
  ops::download_converted(TensorView<bf16>(h), TensorView<float>(back), stage_back);
  for (std::int64_t i = 0; i < f.numel(); ++i) {
    CHECK(h.data()[i].bits() == bf16(f.data()[i]).bits());
    CHECK(back.data()[i] == float(h.data()[i]));
  }
  CHECK(stage.numel() == 0);  // on the host the conversion needs no staging
  // Same types: a plain copy.
  Tensor<float> same({3, 1, 4, 4});
  Tensor<float> unused;
  ops::upload_converted(TensorView<float>(f), TensorView<float>(same), unused);
  CHECK(std::equal(f.begin(), f.end(), same.begin()));
}

TEST_CASE("a ViT in bf16 storage follows the float ViT of the same weights") {
  // Every op rounds what it stores to bf16 (2^-8 relative); over a 3-block model those roundings
  // add up to the normwise errors measured here (outputs 6.4e-3, gradients 4.7e-3 on this
  // model; 7.1e-3 when the gradients themselves were stored in bf16). The budgets leave room for
  // that, and the lower bounds show the model really ran in bf16 (a float run would match to 1e-6).
  const VitConfig c = tiny_vit();
  VisionTransformer<bf16> vh(c);
  VisionTransformer<float> vf(c);
  ParameterStore<bf16> ph(vh);
  ParameterStore<float> pf(vf);
  ph.initialize(7);
  for (std::int64_t i = 0; i < ph.values().numel(); ++i) pf.values().data()[i] = ph.values().data()[i];
  for (std::int64_t i = 0; i < ph.frozen().numel(); ++i) pf.frozen().data()[i] = ph.frozen().data()[i];
  const Pair images = random_pair({4, c.in_chans, c.img_size, c.img_size}, 51);
  vh.forward(images.h);
  vf.forward(images.f);
  const double out_err = normwise(widen(vh.output(0)), to_vec<float>(vf.output(0)));
  MESSAGE("bf16 ViT output: normwise error ", out_err);
  CHECK(out_err < 2e-2);
  CHECK(out_err > 1e-4);
  const Pair g = random_pair(vf.output(0).shape(), 52);
  vh.backward({{0, g.h}});
  vf.backward({{0, g.f}});
  static_assert(std::is_same_v<decltype(ph.grads()), TensorView<float>>);  // grad_t<bf16>
  const double grad_err = normwise(to_vec<float>(ph.grads()), to_vec<float>(pf.grads()));
  MESSAGE("bf16 ViT parameter gradients: normwise error ", grad_err);
  CHECK(grad_err < 2e-2);
  CHECK(grad_err > 1e-4);
}

TEST_CASE("a bf16 Linear accumulates float gradients: the float Linear's, bit for bit") {
  // grad_t<bf16> is float, as under PyTorch's AMP: dW += dyᵀ·x and db += Σ dy are the float
  // products and sums of the same (bf16-exact) values, and a second backward adds to them
  // without rounding what the first left (a bf16 gradient would round each accumulation).
  static_assert(std::is_same_v<grad_t<bf16>, float> && std::is_same_v<grad_t<double>, double>);
  Linear<bf16> lh(24, 10);
  Linear<float> lf(24, 10);
  ParameterStore<bf16> ph(lh);
  ParameterStore<float> pf(lf);
  ph.initialize(11);
  pf.initialize(11);
  for (std::int64_t i = 0; i < pf.values().numel(); ++i)
    pf.values().data()[i] = ph.values().data()[i];  // lh's bf16 values, exactly
  for (int round = 0; round < 2; ++round) {
    const Pair x = random_pair({3, 7, 24}, 90 + round), dy = random_pair({3, 7, 10}, 95 + round);
    Tensor<bf16> dxh({3, 7, 24});
    Tensor<float> dx({3, 7, 24});
    lh.backward(x.h, dy.h, dxh);
    lf.backward(x.f, dy.f, dx);
  }
  CHECK(std::equal(pf.grads().begin(), pf.grads().end(), ph.grads().begin()));
  std::int64_t not_bf16 = 0;  // the accumulated gradients are not bf16 values
  for (std::int64_t i = 0; i < ph.grads().numel(); ++i)
    not_bf16 += float(bf16(ph.grads().data()[i])) != ph.grads().data()[i];
  CHECK(not_bf16 > ph.grads().numel() / 2);
}

// bf16 storage takes the CPU backend's fused kernels. The op set picks them by concept checks,
// and a backend signature that drifts from a check (a statistic's or a gradient's type) would
// silently select the composed form.
static_assert(ops::norm_impl::ResidualNormBackend<bf16, Cpu>);
static_assert(ops::norm_impl::ResidualNormBackend<float, Cpu>);
static_assert(ops::norm_impl::ResidualNormBackend<double, Cpu>);
static_assert(ops::gemm_impl::BiasGemmBackend<bf16, Cpu>);
static_assert(ops::gemm_impl::BiasGemmBackend<float, Cpu>);
static_assert(ops::softmax_impl::SpreadBackend<bf16, Cpu>);
static_assert(ops::softmax_impl::SpreadBackend<float, Cpu>);
static_assert(ops::soft_target_impl::FusedBackend<bf16, Cpu>);
static_assert(ops::soft_target_impl::FusedBackend<float, Cpu>);
static_assert(ops::attention_impl::FusedAttentionBackend<bf16, Cpu>);
static_assert(ops::attention_impl::FusedAttentionBackend<float, Cpu>);

// ---- mixed precision: float master weights ------------------------------------------------------

namespace {

/// Every element of `values` is `master` rounded to bf16.
bool values_are_rounded_master(const ParameterStore<bf16>& p) {
  for (std::int64_t i = 0; i < p.values().numel(); ++i)
    if (p.values().data()[i].bits() != bf16(p.master().data()[i]).bits()) return false;
  return true;
}

}  // namespace

TEST_CASE("a bf16 store keeps a float master: the float model's initial values, rounded") {
  VisionTransformer<bf16> vh(tiny_vit());
  VisionTransformer<float> vf(tiny_vit());
  ParameterStore<bf16> ph(vh);
  ParameterStore<float> pf(vf);
  CHECK(ParameterStore<bf16>::kHasMaster);
  CHECK_FALSE(ParameterStore<float>::kHasMaster);
  CHECK(pf.master().empty());
  REQUIRE(ph.master().numel() == ph.values().numel());
  ph.initialize(3);
  pf.initialize(3);
  CHECK(std::equal(pf.values().begin(), pf.values().end(), ph.master().begin()));
  CHECK(values_are_rounded_master(ph));
  std::int64_t inexact = 0;  // most float draws are not bf16 values: the master is not the values
  for (std::int64_t i = 0; i < ph.master().numel(); ++i)
    inexact += float(ph.values().data()[i]) != ph.master().data()[i];
  CHECK(inexact > ph.master().numel() / 2);
  // Frozen tensors (the position table) are the float ones rounded.
  for (std::int64_t i = 0; i < ph.frozen().numel(); ++i)
    CHECK(ph.frozen().data()[i].bits() == bf16(pf.frozen().data()[i]).bits());
}

namespace {

/// A bf16 ViT and a float ViT whose stores start from the same seed, for optimisers run side by
/// side on the same gradients.
struct StorePair {
  VisionTransformer<bf16> vh{tiny_vit()};
  VisionTransformer<float> vf{tiny_vit()};
  ParameterStore<bf16> ph{vh};
  ParameterStore<float> pf{vf};

  explicit StorePair(std::uint64_t seed) {
    ph.initialize(seed);
    pf.initialize(seed);
  }

  /// `steps` steps of oh on the bf16 store and of on the float one, each step from the same
  /// random gradients (bf16-exact values, streams from `stream` on).
  template <class OptH, class OptF>
  void step_both(OptH& oh, OptF& of, double lr, double wd, int steps, std::uint64_t stream) {
    const ParamGroups gh = moca_param_groups(ph, lr, wd), gf = moca_param_groups(pf, lr, wd);
    for (int step = 0; step < steps; ++step) {
      const Pair g = random_pair({ph.values().numel()}, stream + static_cast<std::uint64_t>(step));
      copy(TensorView<float>(g.f), ph.grads());
      copy(TensorView<float>(g.f), pf.grads());
      oh.step(gh);
      of.step(gf);
    }
  }
};

}  // namespace

TEST_CASE("AdamW on a bf16 store follows AdamW on floats given the same gradients") {
  StorePair stores(5);
  ParameterStore<bf16>& ph = stores.ph;
  ParameterStore<float>& pf = stores.pf;
  AdamW<bf16> oh(ph);
  AdamW<float> of(pf);
  static_assert(std::is_same_v<AdamW<bf16>::M, float>);
  stores.step_both(oh, of, 1e-3, 0.05, 5, 60);
  // The master is the float run exactly (same float arithmetic on the same values)...
  CHECK(std::equal(pf.values().begin(), pf.values().end(), ph.master().begin()));
  // ...the values its rounding, and the moments float.
  CHECK(values_are_rounded_master(ph));
  CHECK(std::equal(of.exp_avg_sq().begin(), of.exp_avg_sq().end(), oh.exp_avg_sq().begin()));
  // An update of 1e-6 is lost in a bf16 weight of size ~0.1 (its resolution is ~4e-4) but kept
  // in the master.
  const float before = ph.master().data()[0];
  const bf16 value_before = ph.values().data()[0];
  ParamGroups tiny_lr = moca_param_groups(ph, 1e-6, 0.0);
  ops::fill(ph.grads(), 1.0f);
  oh.step(tiny_lr);
  CHECK(ph.master().data()[0] != before);
  CHECK(ph.values().data()[0].bits() == value_before.bits());
}

TEST_CASE("SGD on a bf16 store follows SGD on floats given the same gradients") {
  StorePair stores(6);
  ParameterStore<bf16>& ph = stores.ph;
  ParameterStore<float>& pf = stores.pf;
  const SgdConfig config{0.9, 0.0, true};
  Sgd<bf16> oh(ph, config);
  Sgd<float> of(pf, config);
  static_assert(std::is_same_v<Sgd<bf16>::M, float>);
  stores.step_both(oh, of, 0.1, 0.05, 4, 70);
  // The master and the float buffer are the float run exactly; the values the master rounded.
  CHECK(std::equal(pf.values().begin(), pf.values().end(), ph.master().begin()));
  CHECK(std::equal(of.momentum_buffer().begin(), of.momentum_buffer().end(),
                   oh.momentum_buffer().begin()));
  CHECK(values_are_rounded_master(ph));
  // A step far below a bf16 weight's resolution moves the master, not the value.
  const float before = ph.master().data()[0];
  const bf16 value_before = ph.values().data()[0];
  Sgd<bf16> plain(ph);
  ops::fill(ph.grads(), 1.0f);
  plain.step(moca_param_groups(ph, 1e-6, 0.0));
  CHECK(ph.master().data()[0] == doctest::Approx(before - 1e-6f).epsilon(1e-7));
  CHECK(ph.values().data()[0].bits() == value_before.bits());
}

TEST_CASE("the EMA of bf16 stores averages their masters and rounds into the teacher") {
  VisionTransformer<bf16> sh(tiny_vit()), th(tiny_vit());
  VisionTransformer<float> sf(tiny_vit()), tf(tiny_vit());
  ParameterStore<bf16> psh(sh), pth(th, false);
  ParameterStore<float> psf(sf), ptf(tf, false);
  psh.initialize(8), pth.initialize(9), psf.initialize(8), ptf.initialize(9);
  EmaLink<bf16> lh(pth, psh);
  EmaLink<float> lf(ptf, psf);
  for (int i = 0; i < 3; ++i) {
    lh.update(0.996);
    lf.update(0.996);
  }
  CHECK(std::equal(ptf.values().begin(), ptf.values().end(), pth.master().begin()));
  CHECK(values_are_rounded_master(pth));
  lh.copy_source();
  CHECK(std::equal(psh.master().begin(), psh.master().end(), pth.master().begin()));
  CHECK(values_are_rounded_master(pth));
}

TEST_CASE("MOCA steps in bf16 follow the float steps of the same model and batches") {
  // Same initial master (the float initial values), bf16-representable images, the same masks;
  // every activation and activation gradient stored in bf16, the parameter gradients float. The
  // losses and the updated weights stay within the budgets below of the float run (measured:
  // losses within 0.28%, 0.50%, 0.09% over three steps at lr 1e-3, master weights 6.2e-4 apart
  // normwise; 0.06%, 0.8%, 0.5% and 5.9e-4 with bf16 parameter gradients), and a float step
  // would match to rounding, which the lower bound on the weights excludes.
  const MocaConfig cfg = moca::testing::small_moca_config();
  Moca<bf16> mh(cfg);
  Moca<float> mf(cfg);
  mh.initialize(11);
  mf.initialize(11);
  CHECK(std::equal(mf.params().values().begin(), mf.params().values().end(),
                   mh.params().master().begin()));
  const std::int64_t B = 4;
  MocaHyper hyper;
  hyper.lr = 1e-3;
  double worst_loss = 0;
  for (std::uint64_t step = 0; step < 3; ++step) {
    const Tensor<float> a = moca::testing::random_images<float>(B, cfg.encoder, 70 + 2 * step);
    const Tensor<float> b = moca::testing::random_images<float>(B, cfg.encoder, 71 + 2 * step);
    Tensor<bf16> ah(a.shape()), bh(b.shape());
    Tensor<float> af(a.shape()), bf(b.shape());
    ops::convert(TensorView<float>(a), TensorView<bf16>(ah));
    ops::convert(TensorView<float>(b), TensorView<bf16>(bh));
    ops::convert(TensorView<bf16>(ah), TensorView<float>(af));
    ops::convert(TensorView<bf16>(bh), TensorView<float>(bf));
    const MocaPlan plan = mf.draw_plan(Philox(5), step, B);
    const auto tensors = memory_stats<Cpu>().allocations;
    const MocaStepResult rh = mh.train_step(ah, bh, plan, hyper);
    // After the first step a bf16 step allocates no tensor either (moca_step_test checks float).
    if (step > 0) CHECK(memory_stats<Cpu>().allocations == tensors);
    const MocaStepResult rf = mf.train_step(af, bf, plan, hyper);
    const double rel = std::abs(rh.loss - rf.loss) / std::abs(rf.loss);
    MESSAGE("step ", step, ": loss bf16 ", rh.loss, ", float ", rf.loss, " (relative ", rel, ")");
    worst_loss = std::max(worst_loss, rel);
  }
  CHECK(worst_loss < 2e-2);
  Vec master(mh.params().master().begin(), mh.params().master().end());
  const double weights = normwise(master, to_vec<float>(mf.params().values()));
  MESSAGE("master weights after 3 steps: normwise distance ", weights);
  CHECK(weights < 3e-3);
  CHECK(weights > 1e-7);
  CHECK(values_are_rounded_master(mh.params()));
  CHECK(values_are_rounded_master(mh.teacher_params()));
}

TEST_CASE("a bf16 store saves its float master and loads into it") {
  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / ("moca_bf16_test_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  VisionTransformer<bf16> a(tiny_vit()), b(tiny_vit());
  VisionTransformer<float> f(tiny_vit());
  ParameterStore<bf16> pa(a), pb(b);
  ParameterStore<float> pf(f);
  pa.initialize(21);
  pf.initialize(22);
  save_parameters(pa, dir / "bf16.safetensors");
  // The file holds F32: the master exactly, and the frozen tensors widened.
  const SafetensorsFile file = SafetensorsFile::open(dir / "bf16.safetensors");
  for (const auto& t : file.tensors()) CHECK(t.dtype == SafetensorsDtype::F32);
  const Tensor<float> w = file.read<float>("blocks.0.attn.qkv.weight");
  const auto* e = pa.find("blocks.0.attn.qkv.weight");
  REQUIRE(e != nullptr);
  CHECK(std::equal(w.begin(), w.end(), pa.master().data() + e->offset));
  // Loading restores the master bit for bit and rounds the values from it.
  load_parameters(pb, dir / "bf16.safetensors");
  CHECK(std::equal(pa.master().begin(), pa.master().end(), pb.master().begin()));
  CHECK(values_are_rounded_master(pb));
  for (std::int64_t i = 0; i < pa.frozen().numel(); ++i)
    CHECK(pa.frozen().data()[i].bits() == pb.frozen().data()[i].bits());
  // A float model's checkpoint becomes the master as it is.
  save_parameters(pf, dir / "float.safetensors");
  load_parameters(pb, dir / "float.safetensors");
  CHECK(std::equal(pf.values().begin(), pf.values().end(), pb.master().begin()));
  CHECK(values_are_rounded_master(pb));
  std::filesystem::remove_all(dir);
}
