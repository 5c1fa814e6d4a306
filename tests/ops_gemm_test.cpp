// ops::gemm and ops::gemm_batched against a naive double loop, their gradients, shape errors.
#include <algorithm>
#include <cmath>
#include <array>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "reference.hpp"

using namespace moca;
using namespace moca::test;

// The build this file is compiled in takes the kernel it means to test (test_ops_gemm_avx2
// switches AVX-512 off; see tests/CMakeLists.txt).
#if defined(MOCA_TEST_NO_AVX512) && defined(MOCA_CPU_SGEMM_AVX512)
#error "test_ops_gemm_avx2 was compiled with the AVX-512 kernel"
#endif

namespace {

struct Dims {
  i64 M, N, K;
};
// Odd sizes cross Eigen's packing and register-block boundaries; 257 exceeds a cache block.
constexpr std::array<Dims, 11> kDims = {{{1, 1, 1},
                                         {1, 7, 3},
                                         {3, 1, 7},
                                         {7, 3, 1},
                                         {3, 7, 33},
                                         {33, 65, 7},
                                         {65, 33, 65},
                                         {7, 257, 33},
                                         {257, 3, 65},
                                         {33, 7, 257},
                                         {64, 65, 257}}};

constexpr std::array<std::array<bool, 2>, 4> kTrans = {{{false, false}, {false, true}, {true, false}, {true, true}}};

Trans tr(bool t) { return t ? Trans::T : Trans::N; }

/// How op(X) = [rows, cols] is stored.
Shape stored(bool t, i64 rows, i64 cols) { return t ? Shape{cols, rows} : Shape{rows, cols}; }

std::string label(const char* what, const Dims& d, bool ta, bool tb, double alpha, double beta) {
  return detail::str(what, " M=", d.M, " N=", d.N, " K=", d.K, " ", ta ? "T" : "N",
                     tb ? "T" : "N", " alpha=", alpha, " beta=", beta);
}

/// The reference of ops::gemm on whole tensors.
template <class T>
Vec ref_gemm(const Tensor<T>& A, bool ta, const Tensor<T>& B, bool tb, const Tensor<T>& C,
             const Dims& d, double alpha, double beta) {
  Vec a = to_vec<T>(A), b = to_vec<T>(B), c = to_vec<T>(C);
  ref::gemm(ta, tb, d.M, d.N, d.K, alpha, a.data(), ta ? d.M : d.K, b.data(), tb ? d.K : d.N,
            beta, c.data(), d.N);
  return c;
}

}  // namespace

TEST_CASE_TEMPLATE("gemm: integer inputs give the exact product for every transpose pair", T,
                   float, double) {
  // |values| <= 4 and K <= 257 keep every partial sum below 2^24: float arithmetic is exact,
  // whatever order Eigen sums in, so the result must equal the reference bit for bit.
  const std::array<std::array<double, 2>, 4> scalars = {{{1, 0}, {2, 1}, {0.5, -3}, {-1, 0.5}}};
  std::uint64_t stream = 1;
  for (const Dims& d : kDims)
    for (const auto& [ta, tb] : kTrans)
      for (const auto& [alpha, beta] : scalars) {
        auto A = nonzero_integers<T>(stored(ta, d.M, d.K), stream++, 4);
        auto B = nonzero_integers<T>(stored(tb, d.K, d.N), stream++, 4);
        auto C = integers<T>({d.M, d.N}, stream++, -4, 4);
        const Vec expected = ref_gemm(A, ta, B, tb, C, d, alpha, beta);
        ops::gemm(A, tr(ta), B, tr(tb), C, alpha, beta);
        check_exact(label("gemm", d, ta, tb, alpha, beta), C, expected);
      }
}

TEST_CASE_TEMPLATE("gemm: shapes that cross every cache block are exact", T, float, double) {
  // The packed float kernel cuts C into 168-row and 4080-column (4096 with AVX-512) blocks and
  // the inner dimension into 256-long slices (balanced), accumulating into C slice by slice; these
  // shapes make 2-3 blocks of each kind with ragged tiles. |values| <= 3 and K <= 800 keep sums
  // exact in float.
  const std::array<Dims, 4> dims = {{{400, 37, 700}, {13, 6200, 20}, {253, 70, 385}, {7, 9, 800}}};
  const std::array<std::array<double, 2>, 3> scalars = {{{1, 0}, {1, 1}, {2, -1}}};
  std::uint64_t stream = 500;
  for (const Dims& d : dims)
    for (const auto& [ta, tb] : kTrans)
      for (const auto& [alpha, beta] : scalars) {
        auto A = nonzero_integers<T>(stored(ta, d.M, d.K), stream++, 3);
        auto B = nonzero_integers<T>(stored(tb, d.K, d.N), stream++, 3);
        auto C = integers<T>({d.M, d.N}, stream++, -3, 3);
        const Vec expected = ref_gemm(A, ta, B, tb, C, d, alpha, beta);
        ops::gemm(A, tr(ta), B, tr(tb), C, alpha, beta);
        check_exact(label("gemm", d, ta, tb, alpha, beta), C, expected);
      }
}

TEST_CASE_TEMPLATE("gemm_bias adds the bias to every row of the product, exactly", T, float,
                   double) {
  // The packed float kernel adds the bias as it stores the first inner slice of each tile; the
  // column blocks, thread cuts and ragged tiles must each pick the right part of the bias.
  std::vector<Dims> dims(kDims.begin(), kDims.end());
  dims.insert(dims.end(), {{400, 37, 700}, {13, 6200, 20}, {253, 70, 385}});
  std::uint64_t stream = 800;
  for (const Dims& d : dims)
    for (const auto& [ta, tb] : kTrans) {
      auto A = nonzero_integers<T>(stored(ta, d.M, d.K), stream++, 3);
      auto B = nonzero_integers<T>(stored(tb, d.K, d.N), stream++, 3);
      auto bias = integers<T>({d.N}, stream++, -50, 50);
      Tensor<T> C({d.M, d.N});
      fill_nan<T>(C);  // overwritten, never read
      Vec expected = ref_gemm(A, ta, B, tb, C, d, 1.0, 0.0);
      const Vec bv = to_vec<T>(bias);
      for (std::size_t i = 0; i < expected.size(); ++i) expected[i] += bv[i % bv.size()];
      ops::gemm_bias(A, tr(ta), B, tr(tb), bias, C);
      check_exact(label("gemm_bias", d, ta, tb, 1, 0), C, expected);
    }
  Tensor<float> a({3, 4}), b({5, 4}), c({3, 5}), wrong({4});
  check_error_names("gemm_bias", [&] { ops::gemm_bias(a, Trans::N, b, Trans::T, wrong, c); },
                    {"gemm_bias", "[4]", "[3, 5]"});
}

TEST_CASE_TEMPLATE("linear_grads accumulates dW += dyᵀ·x and db += Σ dy, exactly on integers", T,
                   float, double) {
  const i64 M = 37, N = 11, K = 20;
  const auto dy = integers<T>({M, N}, 900, -4, 4);
  const auto x = integers<T>({M, K}, 901, -4, 4);
  const auto dw0 = integers<T>({N, K}, 902, -50, 50);
  const auto db0 = integers<T>({N}, 903, -50, 50);
  Tensor<T> dw = dw0.clone(), db = db0.clone();
  ops::linear_grads(TensorView<T>(dy), TensorView<T>(x), TensorView<T>(dw), TensorView<T>(db));
  for (i64 n = 0; n < N; ++n) {
    double s = db0(n);
    for (i64 m = 0; m < M; ++m) s += dy(m, n);
    CHECK(db(n) == s);
    for (i64 k = 0; k < K; ++k) {
      double w = dw0(n, k);
      for (i64 m = 0; m < M; ++m) w += dy(m, n) * x(m, k);
      CHECK(dw(n, k) == w);
    }
  }
  Tensor<T> wrong({N + 1});
  check_error_names("linear_grads",
                    [&] {
                      ops::linear_grads(TensorView<T>(dy), TensorView<T>(x), TensorView<T>(dw),
                                        TensorView<T>(wrong));
                    },
                    {"linear_grads", "[37, 11]", "[12]"});
}

#ifdef _OPENMP
TEST_CASE("gemm: float results are identical for every thread count") {
  // Threads own disjoint rectangles of C and every element sums in the same order, so the bits
  // cannot depend on how C was cut (rows for a tall C, columns for a wide one).
  const int threads_before = omp_get_max_threads();
  const std::array<Dims, 3> dims = {{{1000, 96, 300}, {40, 1200, 500}, {65, 65, 64}}};
  std::uint64_t stream = 700;
  for (const Dims& d : dims)
    for (const auto& [ta, tb] : kTrans) {
      auto A = uniform<float>(stored(ta, d.M, d.K), stream++);
      auto B = uniform<float>(stored(tb, d.K, d.N), stream++);
      std::vector<Tensor<float>> results;
      for (int threads : {1, 2, 3, 4}) {
        omp_set_num_threads(threads);
        Tensor<float> C({d.M, d.N});
        ops::gemm(A, tr(ta), B, tr(tb), C);
        results.push_back(std::move(C));
      }
      omp_set_num_threads(threads_before);
      check_close(label("gemm 1 thread", d, ta, tb, 1, 0), results[0],
                  ref_gemm(A, ta, B, tb, results[0], d, 1.0, 0.0));
      for (std::size_t i = 1; i < results.size(); ++i)
        CHECK_MESSAGE(std::equal(results[0].data(), results[0].data() + results[0].numel(),
                                 results[i].data()),
                      label("gemm", d, ta, tb, 1, 0), " differs with ", i + 1, " threads");
    }
}
#endif

TEST_CASE_TEMPLATE("gemm: real inputs match the double reference", T, float, double) {
  std::uint64_t stream = 1000;
  for (const Dims& d : kDims)
    for (const auto& [ta, tb] : kTrans) {
      auto A = uniform<T>(stored(ta, d.M, d.K), stream++);
      auto B = uniform<T>(stored(tb, d.K, d.N), stream++);
      auto C = uniform<T>({d.M, d.N}, stream++);
      const Vec expected = ref_gemm(A, ta, B, tb, C, d, 0.75, -1.25);
      ops::gemm(A, tr(ta), B, tr(tb), C, 0.75, -1.25);
      check_close(label("gemm", d, ta, tb, 0.75, -1.25), C, expected);
    }
}

TEST_CASE_TEMPLATE("gemm: beta = 0 overwrites C without reading it", T, float, double) {
  std::uint64_t stream = 2000;
  for (const Dims& d : kDims)
    for (const auto& [ta, tb] : kTrans) {
      auto A = nonzero_integers<T>(stored(ta, d.M, d.K), stream++, 4);
      auto B = nonzero_integers<T>(stored(tb, d.K, d.N), stream++, 4);
      Tensor<T> C({d.M, d.N});
      // The reference ignores C when beta is 0, so the NaN cannot reach it.
      fill_nan<T>(C);
      const Vec expected = ref_gemm(A, ta, B, tb, C, d, 3.0, 0.0);
      ops::gemm(A, tr(ta), B, tr(tb), C, 3, 0);
      check_exact(label("gemm into NaN", d, ta, tb, 3, 0), C, expected);
    }
}

TEST_CASE_TEMPLATE("gemm: K = 0 scales C by beta", T, float, double) {
  Tensor<T> A({3, 0}), B({0, 5});
  auto C = integers<T>({3, 5}, 7, 1, 4);
  const Vec c0 = to_vec<T>(C);
  ops::gemm(A, Trans::N, B, Trans::N, C, 1, 2);
  for (i64 i = 0; i < C.numel(); ++i) CHECK(C.data()[i] == static_cast<T>(2 * c0[i]));
  fill_nan<T>(C);
  ops::gemm(A, Trans::N, B, Trans::N, C, 1, 0);
  for (i64 i = 0; i < C.numel(); ++i) CHECK(C.data()[i] == T(0));
}

TEST_CASE_TEMPLATE("gemm_batched (rank-3 tensors) computes every matrix of the batch", T, float,
                   double) {
  const std::array<i64, 3> batches = {1, 3, 5};
  std::uint64_t stream = 3000;
  for (i64 nb : batches)
    for (const Dims& d : {Dims{1, 1, 1}, Dims{3, 7, 33}, Dims{33, 65, 7}, Dims{65, 3, 257}})
      for (const auto& [ta, tb] : kTrans) {
        const Shape as = stored(ta, d.M, d.K), bs = stored(tb, d.K, d.N);
        auto A = nonzero_integers<T>({nb, as[0], as[1]}, stream++, 4);
        auto B = nonzero_integers<T>({nb, bs[0], bs[1]}, stream++, 4);
        auto C = integers<T>({nb, d.M, d.N}, stream++, -4, 4);
        Vec a = to_vec<T>(A), b = to_vec<T>(B), c = to_vec<T>(C);
        for (i64 i = 0; i < nb; ++i)
          ref::gemm(ta, tb, d.M, d.N, d.K, 2.0, a.data() + i * d.M * d.K, ta ? d.M : d.K,
                    b.data() + i * d.K * d.N, tb ? d.K : d.N, -1.0, c.data() + i * d.M * d.N,
                    d.N);
        ops::gemm_batched(A, tr(ta), B, tr(tb), C, 2, -1);
        check_exact(label("gemm_batched", d, ta, tb, 2, -1) + detail::str(" batch=", nb), C, c);
      }
}

TEST_CASE_TEMPLATE("gemm_batched (strided) reads and writes attention heads in place", T, float,
                   double) {
  // qkv [tokens, 3·D] holds q, k, v side by side; head h of q is columns [h·dh, (h+1)·dh) with
  // rows 3·D apart. Integer inputs keep float exact (|partial sums| < 2^24).
  for (const auto& [tokens, heads, dh] :
       std::array<std::array<i64, 3>, 4>{{{1, 1, 1}, {7, 3, 5}, {33, 2, 7}, {65, 4, 3}}}) {
    const i64 D = heads * dh, ld = 3 * D;
    auto qkv = nonzero_integers<T>({tokens, ld}, 4000 + static_cast<std::uint64_t>(tokens), 3);
    const Vec x = to_vec<T>(qkv);
    auto q = ops::strided_batch<T, Cpu>(qkv, 0, tokens, dh, ld, dh, heads);
    auto k = ops::strided_batch<T, Cpu>(qkv, D, tokens, dh, ld, dh, heads);
    auto v = ops::strided_batch<T, Cpu>(qkv, 2 * D, tokens, dh, ld, dh, heads);

    // scores[h] = q_h · k_hᵀ into a dense [heads, tokens, tokens] tensor
    Tensor<T> scores({heads, tokens, tokens});
    auto s = ops::strided_batch<T, Cpu>(scores, 0, tokens, tokens, tokens, tokens * tokens, heads);
    ops::gemm_batched(q, Trans::N, k, Trans::T, s);
    Vec s_ref(static_cast<std::size_t>(heads * tokens * tokens));
    for (i64 h = 0; h < heads; ++h)
      ref::gemm(false, true, tokens, tokens, dh, 1.0, x.data() + h * dh, ld, x.data() + D + h * dh,
                ld, 0.0, s_ref.data() + h * tokens * tokens, tokens);
    check_exact(detail::str("q·kᵀ tokens=", tokens, " heads=", heads), scores, s_ref);

    // out[:, head h] = scores[h] · v_h, written with row stride D into [tokens, D]
    Tensor<T> out({tokens, D});
    fill_nan<T>(out);
    auto o = ops::strided_batch<T, Cpu>(out, 0, tokens, dh, D, dh, heads);
    ops::gemm_batched(s, Trans::N, v, Trans::N, o);
    Vec o_ref(static_cast<std::size_t>(tokens * D));
    for (i64 h = 0; h < heads; ++h)
      ref::gemm(false, false, tokens, dh, tokens, 1.0, s_ref.data() + h * tokens * tokens, tokens,
                x.data() + 2 * D + h * dh, ld, 0.0, o_ref.data() + h * dh, D);
    check_exact(detail::str("scores·v tokens=", tokens, " heads=", heads), out, o_ref);

    // dk_h += scores_hᵀ · q_h accumulated into the k columns of a [tokens, 3·D] gradient buffer:
    // the q and v columns must keep their values.
    auto grad = integers<T>({tokens, ld}, 4100 + static_cast<std::uint64_t>(tokens), -2, 2);
    Vec g_ref = to_vec<T>(grad);
    auto dk = ops::strided_batch<T, Cpu>(grad, D, tokens, dh, ld, dh, heads);
    ops::gemm_batched(s, Trans::T, q, Trans::N, dk, 1, 1);
    for (i64 h = 0; h < heads; ++h)
      ref::gemm(true, false, tokens, dh, tokens, 1.0, s_ref.data() + h * tokens * tokens, tokens,
                x.data() + h * dh, ld, 1.0, g_ref.data() + D + h * dh, ld);
    check_exact(detail::str("dk tokens=", tokens, " heads=", heads), grad, g_ref);
  }
}

TEST_CASE("gemm: gradients of <r, op(A)·op(B)> pass gradcheck") {
  std::uint64_t stream = 5000;
  for (const Dims& d : {Dims{1, 1, 1}, Dims{3, 5, 4}, Dims{7, 3, 5}, Dims{2, 7, 1}})
    for (const auto& [ta, tb] : kTrans) {
      auto A = uniform<double>(stored(ta, d.M, d.K), stream++);
      auto B = uniform<double>(stored(tb, d.K, d.N), stream++);
      auto r = uniform<double>({d.M, d.N}, stream++);
      Tensor<double> C({d.M, d.N}), dA(A.shape()), dB(B.shape());
      auto loss = [&] {
        ops::gemm(A, tr(ta), B, tr(tb), C);
        return testing::dot<double>(r, C);
      };
      // d/dA: r·op(B)ᵀ (stored as [M, K]) or op(B)·rᵀ (stored as [K, M]); likewise for B.
      if (!ta)
        ops::gemm(r, Trans::N, B, tr(!tb), dA);
      else
        ops::gemm(B, tr(tb), r, Trans::T, dA);
      if (!tb)
        ops::gemm(A, tr(!ta), r, Trans::N, dB);
      else
        ops::gemm(r, Trans::T, A, tr(ta), dB);
      const std::string name = label("gemm", d, ta, tb, 1, 0);
      check_gradient(name + " dA", A, dA, loss);
      check_gradient(name + " dB", B, dB, loss);
    }
}

TEST_CASE("gemm: shape errors name the shapes") {
  Tensor<float> a({3, 4}), b({5, 6}), c({3, 6}), b2({4, 6}), c2({6, 3});
  check_error_names("gemm inner", [&] { ops::gemm(a, Trans::N, b, Trans::N, c); },
                    {"gemm", "[3, 4]", "[5, 6]", "[3, 6]"});
  check_error_names("gemm output", [&] { ops::gemm(a, Trans::N, b2, Trans::N, c2); },
                    {"gemm", "[3, 4]", "[4, 6]", "[6, 3]"});
  check_error_names("gemm transposed", [&] { ops::gemm(a, Trans::T, b2, Trans::N, c); },
                    {"gemm", "[3, 4]ᵀ", "[4, 6]", "[3, 6]"});

  Tensor<float> A({2, 3, 4}), B({2, 4, 5}), C({2, 3, 5}), B3({3, 4, 5}), M2({3, 4});
  ops::gemm_batched(A, Trans::N, B, Trans::N, C);  // the consistent case is accepted
  check_error_names("gemm_batched rank", [&] { ops::gemm_batched(M2, Trans::N, B, Trans::N, C); },
                    {"gemm_batched", "[3, 4]", "[2, 4, 5]", "[2, 3, 5]"});
  check_error_names("gemm_batched count", [&] { ops::gemm_batched(A, Trans::N, B3, Trans::N, C); },
                    {"gemm_batched", "2×[3, 4]", "3×[4, 5]", "2×[3, 5]"});
  check_error_names("gemm_batched inner", [&] { ops::gemm_batched(A, Trans::T, B, Trans::N, C); },
                    {"gemm_batched", "2×[3, 4]ᵀ", "2×[4, 5]"});

  Tensor<float> qkv({7, 12});
  check_error_names("strided_batch range",
                    [&] { ops::strided_batch<float, Cpu>(qkv, 8, 7, 2, 12, 2, 3); },
                    {"strided_batch", "[7, 12]"});
  check_error_names("strided_batch ld",
                    [&] { ops::strided_batch<float, Cpu>(qkv, 0, 7, 4, 3, 4, 1); },
                    {"strided_batch", "ld 3"});
  // The last head ends exactly at the buffer's end: accepted.
  CHECK_NOTHROW(ops::strided_batch<float, Cpu>(qkv, 8, 7, 2, 12, 2, 2));
}

TEST_CASE_TEMPLATE("attention: the fused op matches the composed batched form", T, float, double) {
  // The CPU backend runs one task per (image, head); the composed form (the path of backends
  // without a fused op) runs strided batched GEMMs and whole-tensor softmax. Both must agree,
  // forward and backward, including ragged token counts.
  std::uint64_t stream = 900;
  // hd a multiple of 8 with up to 256 tokens runs the CPU's unpacked small-head kernel (17, 30,
  // 65, 197 tokens and the 256 limit); hd = 4 and 257 tokens run the packed GEMM.
  for (const auto& [B, S, H, hd] : std::array<std::array<i64, 4>, 8>{{{2, 17, 3, 8},
                                                                      {3, 65, 2, 16},
                                                                      {2, 30, 3, 64},
                                                                      {1, 197, 2, 64},
                                                                      {1, 256, 1, 24},
                                                                      {1, 33, 4, 32},
                                                                      {1, 257, 1, 8},
                                                                      {1, 5, 1, 4}}}) {
    const i64 dim = H * hd;
    auto qkv = uniform<T>({B, S, 3 * dim}, stream++, -2, 2);
    auto dctx = uniform<T>({B, S, dim}, stream++);
    const T scale = T(1) / std::sqrt(T(hd));
    Tensor<T> probs({B, H, S, S}), ctx({B, S, dim}), probs_ref({B, H, S, S}), ctx_ref({B, S, dim});
    ops::attention_forward(qkv, H, scale, probs, ctx);
    ops::attention_impl::attention_forward_composed<T, Cpu>(qkv, H, scale, probs_ref, ctx_ref);
    const std::string what = detail::str("attention B=", B, " S=", S, " H=", H, " hd=", hd);
    check_close(what + " probs", probs, to_vec<T>(probs_ref));
    check_close(what + " ctx", ctx, to_vec<T>(ctx_ref));
    Tensor<T> dprobs({B, H, S, S}), dqkv({B, S, 3 * dim}), dprobs_ref({B, H, S, S}),
        dqkv_ref({B, S, 3 * dim});
    fill_nan<T>(dqkv);  // every element must be written
    ops::attention_backward(qkv, probs, ctx, dctx, H, scale, dprobs, dqkv);
    ops::attention_impl::attention_backward_composed<T, Cpu>(qkv, probs_ref, dctx, H, scale, dprobs_ref,
                                                     dqkv_ref);
    check_close(what + " dqkv", dqkv, to_vec<T>(dqkv_ref));
  }
  Tensor<float> qkv({2, 5, 12}), probs({2, 3, 5, 5}), ctx({2, 5, 4});
  check_error_names("attention heads", [&] { ops::attention_forward(qkv, 5, 1.0f, probs, ctx); },
                    {"attention", "[2, 5, 12]", "5 heads"});
}

#ifdef MOCA_CPU_SGEMM_AVX2
TEST_CASE("small_gemm: every tile height and width, A stored either way, matches double") {
  // C = α·A·B with A read through (row, column) strides: row-major A (the scores, dQ) and A
  // stored transposed (dV = Pᵀ·dO, dK = dSᵀ·Q). M up to 13 crosses every tile height (ymm 4, 6,
  // 8; zmm 6, 8, 12) and their ragged ends; N from 8 to 200 every split of the vectors into
  // blocks (ymm 3, 2, 1; zmm 4, 3, 2, 1 with a half vector last where N mod 16 = 8). Padding
  // columns of B and C past N (guards) must stay as they were.
  std::uint64_t stream = 1300;
  for (const i64 M : {1, 2, 3, 4, 5, 6, 7, 9, 13, 65})
    for (const i64 N : {8, 16, 24, 32, 40, 64, 72, 136, 200})
      for (const i64 K : {1, 17, 64})
        for (const bool a_transposed : {false, true}) {
          const i64 lda = (a_transposed ? M : K) + 3, ldb = N + 5, ldc = N + 7;
          auto A = uniform<float>({a_transposed ? K : M, lda}, stream++);
          auto B = uniform<float>({K, ldb}, stream++);
          Tensor<float> C({M, ldc});
          std::fill(C.data(), C.data() + C.numel(), 7.0f);
          const float alpha = 0.75f;
          const i64 ars = a_transposed ? 1 : lda, acs = a_transposed ? lda : 1;
          cpu::sgemm_avx2::PackBuffer panel;
          cpu::small_gemm::gemm(M, N, K, alpha, A.data(), ars, acs, B.data(), ldb, C.data(), ldc,
                                panel.reserve(cpu::small_gemm::panel_floats(K)));
          double worst = 0;
          bool guards_intact = true;
          for (i64 i = 0; i < M; ++i) {
            for (i64 j = 0; j < N; ++j) {
              double ref = 0;
              for (i64 k = 0; k < K; ++k)
                ref += double(A.data()[i * ars + k * acs]) * double(B.data()[k * ldb + j]);
              ref *= alpha;
              worst = std::max(worst, std::abs(ref - double(C.data()[i * ldc + j])) /
                                          (1.0 + std::abs(ref)));
            }
            for (i64 j = N; j < ldc; ++j) guards_intact = guards_intact && C.data()[i * ldc + j] == 7.0f;
          }
          const std::string what = detail::str("small_gemm M=", M, " N=", N, " K=", K,
                                               a_transposed ? " Aᵀ" : " A");
          CHECK_MESSAGE(worst < 1e-5, what, ": worst error ", worst);
          CHECK_MESSAGE(guards_intact, what, " wrote past column N");
        }
}
#endif

#ifdef _OPENMP
TEST_CASE("attention: float results are identical for every thread count") {
  // One task per (image, head), each computed whole on one thread: the bits cannot depend on
  // how the tasks were shared out.
  const int threads_before = omp_get_max_threads();
  const i64 B = 3, S = 30, H = 3, hd = 64, dim = H * hd;
  auto qkv = uniform<float>({B, S, 3 * dim}, 1400, -2, 2);
  auto dctx = uniform<float>({B, S, dim}, 1401);
  std::vector<std::vector<float>> results;
  for (int threads : {1, 2, 3}) {
    omp_set_num_threads(threads);
    Tensor<float> probs({B, H, S, S}), ctx({B, S, dim}), dprobs({B, H, S, S}), dqkv({B, S, 3 * dim});
    ops::attention_forward(qkv, H, 0.125f, probs, ctx);
    ops::attention_backward(qkv, probs, ctx, dctx, H, 0.125f, dprobs, dqkv);
    std::vector<float> all(ctx.data(), ctx.data() + ctx.numel());
    all.insert(all.end(), dqkv.data(), dqkv.data() + dqkv.numel());
    results.push_back(std::move(all));
  }
  omp_set_num_threads(threads_before);
  CHECK(results[0] == results[1]);
  CHECK(results[0] == results[2]);
}
#endif
