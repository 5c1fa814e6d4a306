// The CUDA backend: every op of ops/ against the CPU backend (parity), device memory, and error
// reporting. A plain C++ file: it sees only the declarations of the kernels, which it links from
// moca::cuda, as any user program does.
//
// Parity: the same random inputs go through both backends; results must agree to a normalised
// error ||cpu - gpu|| / ||cpu|| of 1e-6 (float) or 1e-12 (double), widened like the square root of
// the number of terms a result sums (the backends sum in different orders). Every device output
// sits between guard elements holding a sentinel, and outputs that an op must overwrite without
// reading start as NaN.
//
// Without a device each test that needs one reports "skipped: no CUDA device" and passes.
#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <moca/backend/cuda/kernels/flash_attention.hpp>
#include <moca/core/random.hpp>
#include <moca/cuda.hpp>
#include <moca/moca.hpp>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../attention_reference.hpp"
#include "cuda_testing.hpp"

using namespace moca;

namespace {

using namespace moca::testing;

Trans trans(bool t) { return t ? Trans::T : Trans::N; }

// sqrt(Σ_j (|acc_j| + Σ_r |term(r, j)|)²): the size the rounding error of adding Σ_r term(r, j)
// to acc_j is proportional to, whether or not the result cancels. Empty acc: nothing to scale.
template <class T, class Term>
double accumulation_scale(const Tensor<T>& acc, std::int64_t M, std::int64_t N, Term term) {
  if (acc.numel() == 0) return 0.0;
  double total = 0.0;
  for (std::int64_t j = 0; j < N; ++j) {
    double col = std::abs(static_cast<double>(acc.data()[j]));
    for (std::int64_t r = 0; r < M; ++r) col += std::abs(static_cast<double>(term(r, j)));
    total += col * col;
  }
  return std::sqrt(total);
}

}  // namespace

// ---- device, memory, errors ----------------------------------------------------------------------

TEST_CASE("cuda: device queries never throw, and failures name the call") {
  const int count = cuda::device_count();
  CHECK(count >= 0);
  CHECK(cuda::available() == (count > 0));
  MESSAGE("CUDA devices: ", count);

  try {
    MOCA_CUDA_CHECK(cudaErrorInvalidValue);
    FAIL("MOCA_CUDA_CHECK did not throw");
  } catch (const Error& e) {
    const std::string msg = e.what();
    CHECK(msg.find("cudaErrorInvalidValue") != std::string::npos);
    CHECK(msg.find("ops_cuda_test.cpp") != std::string::npos);
  }
  try {
    MOCA_CUBLAS_CHECK(CUBLAS_STATUS_INVALID_VALUE);
    FAIL("MOCA_CUBLAS_CHECK did not throw");
  } catch (const Error& e) {
    const std::string msg = e.what();
    CHECK(msg.find("CUBLAS_STATUS_INVALID_VALUE") != std::string::npos);
    CHECK(msg.find("ops_cuda_test.cpp") != std::string::npos);
  }
  CHECK_NOTHROW([] { MOCA_CUDA_CHECK(cudaSuccess); }());
  CHECK_NOTHROW([] { MOCA_CUBLAS_CHECK(CUBLAS_STATUS_SUCCESS); }());

  // A broadcast row (leading dimension 0) is a valid copy source but no layout cuBLAS reads: the
  // GEMM refuses it before touching the device.
  auto broadcast_gemm = [] {
    Backend<Cuda>::gemm<float, float>(false, false, 4, 3, 2, 1.0f, nullptr, 0, nullptr, 3, 0.0f,
                                      nullptr, 3);
  };
  CHECK_THROWS_AS(broadcast_gemm(), Error);
}

TEST_CASE("cuda: without a device, using one throws moca::Error instead of crashing") {
  if (cuda::available()) {
    MESSAGE("skipped: a CUDA device is present");
    return;
  }
  const auto before = memory_stats<Cuda>();
  CHECK_THROWS_AS(cuda::Context::get(), Error);
  CHECK_THROWS_AS((Tensor<float, Cuda>({4, 4})), Error);
  CHECK(memory_stats<Cuda>().allocations == before.allocations);
  CHECK(memory_stats<Cuda>().bytes_in_use == before.bytes_in_use);
  // An empty tensor allocates nothing, so it needs no device.
  CHECK_NOTHROW((Tensor<float, Cuda>()));
}

TEST_CASE("cuda: tensors round-trip between host and device, zero-filled and counted") {
  SKIP_WITHOUT_CUDA_DEVICE();
  const auto& ctx = cuda::Context::get();
  cudaDeviceProp prop{};
  MOCA_CUDA_CHECK(cudaGetDeviceProperties(&prop, ctx.device()));
  MESSAGE("running on ", prop.name);

  const auto before = memory_stats<Cuda>();
  {
    Tensor<float, Cuda> z({3, 5});
    CHECK(memory_stats<Cuda>().bytes_in_use == before.bytes_in_use + 60);
    CHECK(memory_stats<Cuda>().allocations == before.allocations + 1);
    const Tensor<float> back = z.to<Cpu>();
    for (float v : back) CHECK(v == 0.0f);
  }
  CHECK(memory_stats<Cuda>().bytes_in_use == before.bytes_in_use);

  const Tensor<double> x = random_tensor<double>({7, 33});
  const Tensor<double, Cuda> g = x.to<Cuda>();
  const Tensor<double, Cuda> g2 = g.clone();  // device to device
  Tensor<double, Cuda> g3({7, 33});
  moca::copy(TensorView<double, Cuda>(g2), TensorView<double, Cuda>(g3));
  const Tensor<double> back = g3.to<Cpu>();
  CHECK(std::equal(x.begin(), x.end(), back.begin()));
  // Views of device tensors address the same storage as on the host.
  const Tensor<double> row = to_host(g.row(3));
  CHECK(std::equal(row.begin(), row.end(), x.data() + 3 * 33));
  // Copies within the device are queued, not waited for: each reads what the kernels before it
  // wrote, and the kernels after it read what it wrote, with no wait in between.
  Tensor<float, Cuda> a({1 << 20}), b({1 << 20});
  ops::fill(TensorView<float, Cuda>(a), 2.0f);
  moca::copy(TensorView<float, Cuda>(a), TensorView<float, Cuda>(b));
  ops::fill(TensorView<float, Cuda>(a), 5.0f);
  ops::add(TensorView<float, Cuda>(a), TensorView<float, Cuda>(b), TensorView<float, Cuda>(b));
  moca::copy(TensorView<float, Cuda>(b), TensorView<float, Cuda>(a));
  ops::scale(TensorView<float, Cuda>(b), 0.5f);
  const Tensor<float> ha = a.to<Cpu>(), hb = b.to<Cpu>();
  CHECK(std::all_of(ha.begin(), ha.end(), [](float v) { return v == 7.0f; }));
  CHECK(std::all_of(hb.begin(), hb.end(), [](float v) { return v == 3.5f; }));
  cuda::synchronize();
}

TEST_CASE("cuda: the memory pool reuses freed blocks, frees after pending work, and trims") {
  SKIP_WITHOUT_CUDA_DEVICE();
  if (cuda::Context::get().memory_pool() == nullptr) {
    MESSAGE("skipped: the device has no memory pools (tensors use cudaMalloc)");
    return;
  }
  constexpr std::int64_t n = std::int64_t{1} << 22;  // 16 MiB of floats
  constexpr std::uint64_t bytes = 4 * static_cast<std::uint64_t>(n);
  cuda::release_cached_memory();
  const cuda::PoolStats start = cuda::pool_stats();
  { Tensor<float, Cuda> first({n}); }
  const cuda::PoolStats cached = cuda::pool_stats();
  CHECK(cached.reserved >= start.reserved + bytes);  // freed, but kept by the pool
  CHECK(cached.used == start.used);

  // Allocating and freeing again reuses the cached block: the pool does not grow.
  const auto before = memory_stats<Cuda>();
  for (int i = 0; i < 20; ++i) {
    Tensor<float, Cuda> t({n});
    CHECK(memory_stats<Cuda>().bytes_in_use == before.bytes_in_use + static_cast<std::int64_t>(bytes));
  }
  CHECK(cuda::pool_stats().reserved == cached.reserved);
  CHECK(memory_stats<Cuda>().allocations == before.allocations + 20);
  CHECK(memory_stats<Cuda>().bytes_in_use == before.bytes_in_use);

  // Addresses are 256-byte aligned whatever the size.
  for (std::int64_t size : {1, 3, 63, 1001, 65537}) {
    Tensor<float, Cuda> t({size});
    CHECK(reinterpret_cast<std::uintptr_t>(t.data()) % Memory<Cuda>::kAlignment == 0);
  }

  // A tensor destroyed while a kernel that reads it is still queued: the free waits for the
  // kernel, and a new tensor that may take the block does not disturb the result.
  Tensor<float, Cuda> src({n}), dst({n});
  ops::fill(TensorView<float, Cuda>(src), 3.0f);
  {
    Tensor<float, Cuda> tmp({n});
    ops::fill(TensorView<float, Cuda>(tmp), 2.0f);
    ops::add(TensorView<float, Cuda>(tmp), TensorView<float, Cuda>(src), TensorView<float, Cuda>(dst));
  }
  {
    Tensor<float, Cuda> next({n});
    ops::fill(TensorView<float, Cuda>(next), -1.0f);
    const Tensor<float> sum = dst.to<Cpu>();
    CHECK(std::all_of(sum.begin(), sum.end(), [](float v) { return v == 5.0f; }));
  }

  // Trimming hands the cached memory (at least next's 16 MiB) back; live tensors keep theirs.
  const cuda::PoolStats held = cuda::pool_stats();
  CHECK(held.used >= start.used + 2 * bytes);
  CHECK(held.reserved >= held.used + bytes);
  cuda::release_cached_memory();
  const cuda::PoolStats trimmed = cuda::pool_stats();
  CHECK(trimmed.used == held.used);
  CHECK(trimmed.reserved >= trimmed.used);
  CHECK(trimmed.reserved + bytes <= held.reserved);
  const Tensor<float> still = src.to<Cpu>();
  CHECK(std::all_of(still.begin(), still.end(), [](float v) { return v == 3.0f; }));
  cuda::reset_pool_peaks();
  CHECK(cuda::pool_stats().reserved_peak == cuda::pool_stats().reserved);
}

// Fills the device through the pool on purpose, so a first cudaMalloc fails: gpu-check.sh leaves
// it out of the memcheck pass, which reports every failed API call.
TEST_CASE("cuda: the backend's own buffers take back memory the pool has cached") {
  SKIP_WITHOUT_CUDA_DEVICE();
  cuda::Context& ctx = cuda::Context::get();
  if (ctx.memory_pool() == nullptr) {
    MESSAGE("skipped: the device has no memory pools (tensors use cudaMalloc)");
    return;
  }
  constexpr std::size_t kGiB = std::size_t{1} << 30;
  cuda::release_cached_memory();
  std::size_t free_bytes = 0, total_bytes = 0;
  MOCA_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  REQUIRE(free_bytes > 4 * kGiB);
  // A tensor over all but 1 GiB of the free memory, freed: the pool keeps its blocks.
  { Tensor<float, Cuda> hog({static_cast<std::int64_t>((free_bytes - kGiB) / sizeof(float))}); }
  MOCA_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  REQUIRE(free_bytes < 2 * kGiB);
  // The workspace grows past what the driver has left: the pool gives its cache back and the
  // allocation succeeds instead of failing with cudaErrorMemoryAllocation.
  const std::size_t want = free_bytes + kGiB;
  void* w = ctx.workspace(want);
  REQUIRE(w != nullptr);
  MOCA_CUDA_CHECK(cudaMemsetAsync(w, 0, want, ctx.stream()));
  ctx.synchronize();
  MOCA_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  CHECK(free_bytes > 2 * kGiB);  // the rest of the cache went back to the driver
  CHECK(cuda::pool_stats().reserved < kGiB);
}

// ---- gemm --------------------------------------------------------------------------------------

TEST_CASE_TEMPLATE("cuda parity: gemm, all transposes, alpha and beta", T, float, double) {
  SKIP_WITHOUT_CUDA_DEVICE();
  struct Case {
    std::int64_t M, N, K;
  };
  const Case cases[] = {{1, 1, 1}, {7, 33, 5}, {33, 7, 257}, {64, 257, 33}, {5, 3, 0}, {0, 4, 3}};
  const std::pair<T, T> scalars[] = {{T(1), T(0)}, {T(0.75), T(-0.5)}, {T(0), T(0)},
                                     {T(0), T(2)}};
  for (const Case& c : cases) {
    for (int t = 0; t < 4; ++t) {
      const bool ta = (t & 1) != 0, tb = (t & 2) != 0;
      const Tensor<T> A = random_tensor<T>(ta ? Shape{c.K, c.M} : Shape{c.M, c.K});
      const Tensor<T> B = random_tensor<T>(tb ? Shape{c.N, c.K} : Shape{c.K, c.N});
      const Tensor<T, Cuda> gA = to_device<T>(A), gB = to_device<T>(B);
      for (const auto& [alpha, beta] : scalars) {
        CAPTURE(c.M);
        CAPTURE(c.N);
        CAPTURE(c.K);
        CAPTURE(ta);
        CAPTURE(tb);
        CAPTURE(alpha);
        CAPTURE(beta);
        // beta == 0 must overwrite C without reading it: start from NaN.
        Tensor<T> C = beta == T(0) ? nan_tensor<T>({c.M, c.N}) : random_tensor<T>({c.M, c.N});
        Guarded<T> gC(C);
        ops::gemm(A, trans(ta), B, trans(tb), C, alpha, beta);
        ops::gemm(gA, trans(ta), gB, trans(tb), gC.view(), alpha, beta);
        check_parity<T>("gemm", C, gC, tolerance<T>(c.K));
      }
    }
  }
}

namespace {

// Sets how float GEMMs compute for the lifetime of the object, then restores fp32.
struct FloatMatmulScope {
  explicit FloatMatmulScope(cuda::FloatMatmul mode) {
    cuda::Context::get().set_float_matmul(mode);
  }
  ~FloatMatmulScope() { cuda::Context::get().set_float_matmul(cuda::FloatMatmul::Fp32); }
  FloatMatmulScope(const FloatMatmulScope&) = delete;
  FloatMatmulScope& operator=(const FloatMatmulScope&) = delete;
};

// Fixes the fused attention's tile and block size for the lifetime of the object, then restores
// the defaults.
struct FlashLaunchScope {
  FlashLaunchScope(int tile, int threads) {
    cuda::Context::get().set_flash_tile(tile);
    cuda::Context::get().set_flash_threads(threads);
  }
  ~FlashLaunchScope() {
    cuda::Context::get().set_flash_tile(0);
    cuda::Context::get().set_flash_threads(0);
  }
  FlashLaunchScope(const FlashLaunchScope&) = delete;
  FlashLaunchScope& operator=(const FlashLaunchScope&) = delete;
};

}  // namespace

TEST_CASE("cuda: TF32 and bf16 matrix products agree with fp32 to their precision") {
  SKIP_WITHOUT_CUDA_DEVICE();
  // Inputs rounded to a 10-bit (TF32) or 8-bit (bf16) mantissa: the normalised error of a product
  // of random matrices is a fraction of 2^-11 or 2^-9, below the bounds here. bf16 rounds the
  // inputs itself, so its lower bound proves the mode took effect; TF32 only allows cuBLAS the
  // tensor cores, and it may still pick an exact kernel for a shape.
  struct Mode {
    cuda::FloatMatmul mode;
    double low, high;
  };
  const Mode modes[] = {{cuda::FloatMatmul::Tf32, 0.0, 2e-3}, {cuda::FloatMatmul::Bf16, 2e-4, 1e-2}};
  struct Case {
    std::int64_t M, N, K;
  };
  const Case cases[] = {{64, 257, 33}, {130, 70, 300}, {1, 96, 768}};
  for (const Mode& m : modes) {
    for (const Case& c : cases) {
      for (int t = 0; t < 4; ++t) {
        const bool ta = (t & 1) != 0, tb = (t & 2) != 0;
        CAPTURE(cuda::to_string(m.mode));
        CAPTURE(c.M);
        CAPTURE(c.N);
        CAPTURE(c.K);
        CAPTURE(ta);
        CAPTURE(tb);
        const Tensor<float> A = random_tensor<float>(ta ? Shape{c.K, c.M} : Shape{c.M, c.K});
        const Tensor<float> B = random_tensor<float>(tb ? Shape{c.N, c.K} : Shape{c.K, c.N});
        const Tensor<float> C0 = random_tensor<float>({c.M, c.N});
        const Tensor<float, Cuda> gA = to_device<float>(A), gB = to_device<float>(B);
        Tensor<float> C = C0.clone();
        Guarded<float> gC(C0);
        ops::gemm(A, trans(ta), B, trans(tb), C, 0.5f, 0.25f);
        {
          const FloatMatmulScope scope(m.mode);
          ops::gemm(gA, trans(ta), gB, trans(tb), gC.view(), 0.5f, 0.25f);
        }
        const Tensor<float> got = gC.result();
        const double err = relative_error(TensorView<float>(C), TensorView<float>(got));
        INFO("relative error ", err);
        CHECK(err >= m.low);
        CHECK(err < m.high);
        CHECK(gC.guards_intact());
      }
    }
  }
  // Back in fp32, products match the CPU to fp32 rounding again.
  const Tensor<float> A = random_tensor<float>({33, 65}), B = random_tensor<float>({65, 17});
  Tensor<float> C({33, 17});
  Guarded<float> gC(C);
  ops::gemm(A, Trans::N, B, Trans::N, C);
  ops::gemm(to_device<float>(A), Trans::N, to_device<float>(B), Trans::N, gC.view());
  check_parity<float>("gemm back in fp32", C, gC, tolerance<float>(65));
}

TEST_CASE_TEMPLATE("cuda parity: gemm with leading dimensions wider than the matrices", T, float,
                   double) {
  SKIP_WITHOUT_CUDA_DEVICE();
  const std::int64_t M = 9, N = 13, K = 33, pad = 3;
  for (int t = 0; t < 4; ++t) {
    const bool ta = (t & 1) != 0, tb = (t & 2) != 0;
    CAPTURE(ta);
    CAPTURE(tb);
    const std::int64_t a_rows = ta ? K : M, a_cols = ta ? M : K;
    const std::int64_t b_rows = tb ? N : K, b_cols = tb ? K : N;
    const std::int64_t lda = a_cols + pad, ldb = b_cols + pad + 1, ldc = N + pad + 2;
    const Tensor<T> A = random_tensor<T>({a_rows, lda});
    const Tensor<T> B = random_tensor<T>({b_rows, ldb});
    const Tensor<T, Cuda> gA = to_device<T>(A), gB = to_device<T>(B);
    for (T beta : {T(0), T(1.5)}) {
      CAPTURE(beta);
      // The padding columns of C must come back untouched: compare the whole buffer.
      Tensor<T> C = random_tensor<T>({M, ldc});
      Guarded<T> gC(C);
      Backend<Cpu>::gemm(ta, tb, M, N, K, T(0.5), A.data(), lda, B.data(), ldb, beta, C.data(),
                         ldc);
      Backend<Cuda>::gemm(ta, tb, M, N, K, T(0.5), gA.data(), lda, gB.data(), ldb, beta,
                          gC.view().data(), ldc);
      check_parity<T>("gemm with padded leading dimensions", C, gC, tolerance<T>(K));
    }
  }
}

TEST_CASE_TEMPLATE("cuda parity: batched gemm, rank-3 and strided layouts", T, float, double) {
  SKIP_WITHOUT_CUDA_DEVICE();
  const std::int64_t batch = 3, M = 7, N = 33, K = 17;
  for (int t = 0; t < 4; ++t) {
    const bool ta = (t & 1) != 0, tb = (t & 2) != 0;
    CAPTURE(ta);
    CAPTURE(tb);
    const Tensor<T> A = random_tensor<T>(ta ? Shape{batch, K, M} : Shape{batch, M, K});
    const Tensor<T> B = random_tensor<T>(tb ? Shape{batch, N, K} : Shape{batch, K, N});
    const Tensor<T, Cuda> gA = to_device<T>(A), gB = to_device<T>(B);
    for (T beta : {T(0), T(-1)}) {
      Tensor<T> C = beta == T(0) ? nan_tensor<T>({batch, M, N}) : random_tensor<T>({batch, M, N});
      Guarded<T> gC(C);
      ops::gemm_batched(A, trans(ta), B, trans(tb), C, T(1.25), beta);
      ops::gemm_batched(gA, trans(ta), gB, trans(tb), gC.view(), T(1.25), beta);
      check_parity<T>("gemm_batched", C, gC, tolerance<T>(K));
    }
  }

  // Attention scores read in place from a [tokens, 3·D] qkv buffer: one head per batch entry,
  // rows 3·D apart, heads `head_dim` apart (ld != cols, stride < rows · ld).
  const std::int64_t tokens = 17, heads = 3, head_dim = 8, D = heads * head_dim;
  const Tensor<T> qkv = random_tensor<T>({tokens, 3 * D});
  const Tensor<T, Cuda> g_qkv = to_device<T>(qkv);
  Tensor<T> scores = nan_tensor<T>({heads, tokens, tokens});
  Guarded<T> g_scores(scores);
  auto run = [&](const auto& src, const auto& dst) {
    const auto q = ops::strided_batch(src, 0, tokens, head_dim, 3 * D, head_dim, heads);
    const auto k = ops::strided_batch(src, D, tokens, head_dim, 3 * D, head_dim, heads);
    const auto s = ops::strided_batch(dst, 0, tokens, tokens, tokens, tokens * tokens, heads);
    ops::gemm_batched(q, Trans::N, k, Trans::T, s, T(0.35));
  };
  run(TensorView<T>(qkv), TensorView<T>(scores));
  run(TensorView<T, Cuda>(g_qkv), g_scores.view());
  check_parity<T>("gemm_batched on a strided qkv layout", scores, g_scores,
                  tolerance<T>(head_dim));
}

// ---- elementwise ---------------------------------------------------------------------------------

TEST_CASE_TEMPLATE("cuda parity: fill, axpby, scale, add, mul", T, float, double) {
  SKIP_WITHOUT_CUDA_DEVICE();
  // 3'000'017 elements exceed one pass of the grid-stride loop.
  for (std::int64_t n : {1, 7, 33, 257, 100003, 3000017}) {
    CAPTURE(n);
    const Tensor<T> x = random_tensor<T>({n}), y0 = random_tensor<T>({n});
    const Tensor<T, Cuda> gx = to_device<T>(x);

    Tensor<T> f = nan_tensor<T>({n});
    Guarded<T> gf(f);
    ops::fill(f, T(0.25));
    ops::fill(gf.view(), T(0.25));
    check_parity<T>("fill", f, gf, tolerance<T>());

    Tensor<T> y = nan_tensor<T>({n});  // beta == 0 does not read y
    Guarded<T> gy(y);
    ops::axpby(T(-1.5), x, T(0), y);
    ops::axpby(T(-1.5), gx, T(0), gy.view());
    check_parity<T>("axpby, beta = 0", y, gy, tolerance<T>());

    Tensor<T> y2 = y0.clone();
    Guarded<T> gy2(y0);
    ops::axpby(T(0.5), x, T(-2), y2);
    ops::axpby(T(0.5), gx, T(-2), gy2.view());
    check_parity<T>("axpby", y2, gy2, tolerance<T>());

    ops::axpy(T(3), x, y2);
    ops::axpy(T(3), gx, gy2.view());
    check_parity<T>("axpy", y2, gy2, tolerance<T>());

    ops::scale(y2, T(-0.75));
    ops::scale(gy2.view(), T(-0.75));
    check_parity<T>("scale", y2, gy2, tolerance<T>());

    Tensor<T> s = nan_tensor<T>({n});
    Guarded<T> gs(s);
    ops::add(x, y0, s);
    const Tensor<T, Cuda> gy0 = to_device<T>(y0);
    ops::add(gx, gy0, gs.view());
    check_parity<T>("add", s, gs, tolerance<T>());

    Tensor<T> p = y0.clone();  // in place: y aliases b
    Guarded<T> gp(y0);
    ops::mul(x, p, p);
    ops::mul(gx, gp.view(), gp.view());
    check_parity<T>("mul in place", p, gp, tolerance<T>());
  }
  // Views that start one element past an aligned address take the element-by-element kernel
  // (aligned ones move 16-byte chunks). Element 0 stays zero on both sides.
  const std::int64_t n = 1001;
  const Tensor<T> x = random_tensor<T>({n + 1}), y0 = random_tensor<T>({n + 1});
  const Tensor<T, Cuda> gx = to_device<T>(x), gy0 = to_device<T>(y0);
  Tensor<T> s = full<T>({n + 1}, T(0));
  Guarded<T> gs(s);
  auto past_first = [n](auto* p) {
    using E = std::remove_const_t<std::remove_pointer_t<decltype(p)>>;
    return const_cast<E*>(p) + 1;
  };
  ops::add(TensorView<T>(past_first(x.data()), Shape{n}), TensorView<T>(past_first(y0.data()), Shape{n}),
           TensorView<T>(past_first(s.data()), Shape{n}));
  ops::add(TensorView<T, Cuda>(past_first(gx.data()), Shape{n}),
           TensorView<T, Cuda>(past_first(gy0.data()), Shape{n}),
           TensorView<T, Cuda>(past_first(gs.view().data()), Shape{n}));
  check_parity<T>("add, unaligned views", s, gs, tolerance<T>());
}

TEST_CASE_TEMPLATE("cuda parity: add_bias", T, float, double) {
  SKIP_WITHOUT_CUDA_DEVICE();
  for (std::int64_t M : {1, 5, 64}) {
    for (std::int64_t N : {1, 7, 33, 257}) {
      CAPTURE(M);
      CAPTURE(N);
      Tensor<T> x = random_tensor<T>({M, N});
      const Tensor<T> bias = random_tensor<T>({N});
      Guarded<T> gx(x);
      const Tensor<T, Cuda> gbias = to_device<T>(bias);
      ops::add_bias(x, bias);
      ops::add_bias(gx.view(), gbias);
      check_parity<T>("add_bias", x, gx, tolerance<T>());
    }
  }
}

TEST_CASE_TEMPLATE("cuda parity: gemm_bias, all transposes, aligned and misaligned bias", T, float,
                   double) {
  SKIP_WITHOUT_CUDA_DEVICE();
  struct Case {
    std::int64_t M, N, K;
  };
  const Case cases[] = {{1, 1, 1}, {7, 33, 5}, {64, 257, 33}, {197, 768, 192}, {5, 3, 0}};
  for (const Case& c : cases) {
    for (int t = 0; t < 4; ++t) {
      const bool ta = (t & 1) != 0, tb = (t & 2) != 0;
      CAPTURE(c.M);
      CAPTURE(c.N);
      CAPTURE(c.K);
      CAPTURE(ta);
      CAPTURE(tb);
      const Tensor<T> A = random_tensor<T>(ta ? Shape{c.K, c.M} : Shape{c.M, c.K});
      const Tensor<T> B = random_tensor<T>(tb ? Shape{c.N, c.K} : Shape{c.K, c.N});
      const Tensor<T> bias = random_tensor<T>({c.N});
      const Tensor<T, Cuda> gA = to_device<T>(A), gB = to_device<T>(B);
      // The bias at the start of an allocation (cuBLASLt's epilogue) and one element in (too
      // little alignment for it: the product, then add_bias).
      Tensor<T, Cuda> gbias_storage({c.N + 1});
      const TensorView<T, Cuda> aligned(gbias_storage.data(), Shape{c.N});
      const TensorView<T, Cuda> shifted(gbias_storage.data() + 1, Shape{c.N});
      Tensor<T> C = nan_tensor<T>({c.M, c.N});
      ops::gemm_bias(A, trans(ta), B, trans(tb), bias, C);
      for (const TensorView<T, Cuda>& gbias : {aligned, shifted}) {
        moca::copy(TensorView<T>(bias), gbias);
        Guarded<T> gC(nan_tensor<T>({c.M, c.N}));  // overwritten without being read
        ops::gemm_bias(gA, trans(ta), gB, trans(tb), gbias, gC.view());
        check_parity<T>(gbias.data() == aligned.data() ? "gemm_bias" : "gemm_bias, shifted bias",
                        C, gC, tolerance<T>(c.K + 1));
      }
    }
  }
  // A leading dimension wider than the row, through the backend call itself.
  const std::int64_t M = 9, N = 20, K = 33, pad = 5;
  const Tensor<T> A = random_tensor<T>({M, K + pad}), B = random_tensor<T>({N, K + pad});
  const Tensor<T> bias = random_tensor<T>({N});
  Tensor<T> C = nan_tensor<T>({M, N + pad});
  Backend<Cpu>::gemm_bias<T>(false, true, M, N, K, A.data(), K + pad, B.data(), K + pad,
                             bias.data(), C.data(), N + pad);
  Guarded<T> gC(nan_tensor<T>({M, N + pad}));
  const Tensor<T, Cuda> gA = to_device<T>(A), gB = to_device<T>(B), gbias = to_device<T>(bias);
  Backend<Cuda>::gemm_bias<T>(false, true, M, N, K, gA.data(), K + pad, gB.data(), K + pad,
                              gbias.data(), gC.view().data(), N + pad);
  const Tensor<T> got = gC.result();
  for (std::int64_t i = 0; i < M; ++i) {
    const TensorView<T> want(C.data() + i * (N + pad), Shape{N});
    const TensorView<T> have(got.data() + i * (N + pad), Shape{N});
    CHECK(relative_error(want, have) <= tolerance<T>(K + 1));
    for (std::int64_t j = N; j < N + pad; ++j) CHECK(std::isnan(got.data()[i * (N + pad) + j]));
  }
  CHECK(gC.guards_intact());
}

TEST_CASE_TEMPLATE("cuda parity: gemm_bias_residual, the residual read as the product's C", T,
                   float, double) {
  SKIP_WITHOUT_CUDA_DEVICE();
  // y = x · wᵀ + b + r: a block's second MLP product. Fused (float: cuBLASLt reads r as C with
  // beta = 1 and writes y as D) or composed (double always; float with the switch off).
  bool fused = true;
  SUBCASE("fused where it applies") { fused = true; }
  SUBCASE("composed") { fused = false; }
  const ContextSwitch scope(&cuda::Context::set_fused_residual, fused, true);
  for (auto [M, N, K] : {std::array<std::int64_t, 3>{7, 33, 5}, {197, 768, 3072}, {64, 257, 33}}) {
    CAPTURE(M);
    CAPTURE(N);
    CAPTURE(K);
    const Tensor<T> x = random_tensor<T>({M, K}), w = random_tensor<T>({N, K});
    const Tensor<T> bias = random_tensor<T>({N}), r = random_tensor<T>({M, N});
    const Tensor<T, Cuda> gx = to_device<T>(x), gw = to_device<T>(w), gbias = to_device<T>(bias);
    Guarded<T> gr(r);  // read only: it must come back unchanged
    Tensor<T> y = nan_tensor<T>({M, N});
    ops::gemm_bias_residual(x, Trans::N, w, Trans::T, bias, r, y);
    Guarded<T> gy(nan_tensor<T>({M, N}));  // overwritten without being read
    ops::gemm_bias_residual(gx, Trans::N, gw, Trans::T, gbias, gr.view(), gy.view());
    check_parity<T>("gemm_bias_residual", y, gy, tolerance<T>(K + 2));
    check_parity<T>("its residual, unchanged", r, gr, 0.0);
  }
}

TEST_CASE("cuda: gemm_bias in TF32 and bf16 agrees with fp32 to their precision, planned once") {
  SKIP_WITHOUT_CUDA_DEVICE();
  // The budgets of the plain products (see the TF32/bf16 gemm test); the bias is exact in fp32.
  struct Mode {
    cuda::FloatMatmul mode;
    double low, high;
  };
  const Mode modes[] = {{cuda::FloatMatmul::Tf32, 0.0, 2e-3}, {cuda::FloatMatmul::Bf16, 2e-4, 1e-2}};
  const std::int64_t M = 130, N = 96, K = 300;
  const Tensor<float> A = random_tensor<float>({M, K}), W = random_tensor<float>({N, K});
  const Tensor<float> bias = random_tensor<float>({N});
  const Tensor<float, Cuda> gA = to_device<float>(A), gW = to_device<float>(W),
                            gbias = to_device<float>(bias);
  Tensor<float> C({M, N});
  ops::gemm_bias(A, Trans::N, W, Trans::T, bias, C);
  for (const Mode& m : modes) {
    CAPTURE(cuda::to_string(m.mode));
    const FloatMatmulScope scope(m.mode);
    Guarded<float> gC(nan_tensor<float>({M, N}));
    ops::gemm_bias(gA, Trans::N, gW, Trans::T, gbias, gC.view());
    const std::size_t plans = cuda::LtMatmul::get().plans();
    ops::gemm_bias(gA, Trans::N, gW, Trans::T, gbias, gC.view());  // the same problem again
    CHECK(cuda::LtMatmul::get().plans() == plans);
    const Tensor<float> got = gC.result();
    const double err = relative_error(TensorView<float>(C), TensorView<float>(got));
    INFO("relative error ", err);
    CHECK(err >= m.low);
    CHECK(err < m.high);
    CHECK(gC.guards_intact());
  }
}

TEST_CASE_TEMPLATE("cuda parity: gelu and relu, forward and backward", T, float, double) {
  SKIP_WITHOUT_CUDA_DEVICE();
  for (std::int64_t n : {1, 7, 33, 257, 100003}) {
    CAPTURE(n);
    Tensor<T> x = random_tensor<T>({n}, -5.0, 5.0);
    for (std::int64_t i = 0; i < n; i += 5) x.data()[i] = T(0);  // relu's subgradient at 0
    const Tensor<T> dy = random_tensor<T>({n});
    const Tensor<T, Cuda> gx = to_device<T>(x), gdy = to_device<T>(dy);

    Tensor<T> y = nan_tensor<T>({n});
    Guarded<T> gy(y);
    ops::gelu(x, y);
    ops::gelu(gx, gy.view());
    check_parity<T>("gelu", y, gy, tolerance<T>());

    Tensor<T> dx = dy.clone();  // dx aliases dy
    Guarded<T> gdx(dy);
    ops::gelu_backward(x, dx, dx);
    ops::gelu_backward(gx, gdx.view(), gdx.view());
    check_parity<T>("gelu_backward in place", dx, gdx, tolerance<T>());

    Tensor<T> r = nan_tensor<T>({n});
    Guarded<T> gr(r);
    ops::relu(x, r);
    ops::relu(gx, gr.view());
    check_parity<T>("relu", r, gr, tolerance<T>());

    Tensor<T> dr = nan_tensor<T>({n});
    Guarded<T> gdr(dr);
    ops::relu_backward(x, dy, dr);
    ops::relu_backward(gx, gdy, gdr.view());
    check_parity<T>("relu_backward", dr, gdr, tolerance<T>());
  }
}

// ---- row ops -------------------------------------------------------------------------------------

TEST_CASE_TEMPLATE("cuda parity: softmax and log_softmax, forward and backward", T, float,
                   double) {
  SKIP_WITHOUT_CUDA_DEVICE();
  for (std::int64_t M : {1, 5, 64}) {
    for (std::int64_t N : {1, 7, 33, 257, 1500}) {
      CAPTURE(M);
      CAPTURE(N);
      const Tensor<T> x = random_tensor<T>({M, N}, -6.0, 6.0);
      const Tensor<T> dy = random_tensor<T>({M, N});
      const Tensor<T, Cuda> gx = to_device<T>(x), gdy = to_device<T>(dy);

      Tensor<T> y = nan_tensor<T>({M, N});
      Guarded<T> gy(y);
      ops::softmax(x, y);
      ops::softmax(gx, gy.view());
      check_parity<T>("softmax", y, gy, tolerance<T>(N));

      Guarded<T> g_inplace(x);  // y aliases x
      ops::softmax(g_inplace.view(), g_inplace.view());
      check_parity<T>("softmax in place", y, g_inplace, tolerance<T>(N));

      Tensor<T> ly = nan_tensor<T>({M, N});
      Guarded<T> gly(ly);
      ops::log_softmax(x, ly);
      ops::log_softmax(gx, gly.view());
      check_parity<T>("log_softmax", ly, gly, tolerance<T>(N));

      // Backward from the same (CPU) forward output on both sides; dx aliases dy.
      const Tensor<T, Cuda> g_y = to_device<T>(y), g_ly = to_device<T>(ly);
      Tensor<T> dx = dy.clone();
      Guarded<T> gdx(dy);
      ops::softmax_backward(y, dx, dx);
      ops::softmax_backward(g_y, gdx.view(), gdx.view());
      check_parity<T>("softmax_backward in place", dx, gdx, tolerance<T>(N));

      Tensor<T> ldx = nan_tensor<T>({M, N});
      Guarded<T> gldx(ldx);
      ops::log_softmax_backward(ly, dy, ldx);
      ops::log_softmax_backward(g_ly, gdy, gldx.view());
      check_parity<T>("log_softmax_backward", ldx, gldx, tolerance<T>(N));
    }
  }
}

TEST_CASE_TEMPLATE("cuda parity: softmax_with_spread, one kernel, no workspace", T, float, double) {
  SKIP_WITHOUT_CUDA_DEVICE();
  // Cosine-like rows and MOCA's temperature range (scale = inv_delta / dist_norm ≈ 20…100); the
  // 4096-wide rows are the default codebook's.
  for (std::int64_t M : {1, 5, 64}) {
    for (std::int64_t N : {1, 7, 257, 4096}) {
      for (double scale : {1.0, 20.0, 100.0}) {
        CAPTURE(M);
        CAPTURE(N);
        CAPTURE(scale);
        const Tensor<T> x = random_tensor<T>({M, N});
        Tensor<T> codes = x.clone(), spread = nan_tensor<T>({M}), workspace;
        ops::softmax_with_spread(TensorView<T>(codes), scale, TensorView<T>(spread), workspace);
        Guarded<T> gcodes(x), gspread(nan_tensor<T>({M}));
        Tensor<T, Cuda> gworkspace;
        ops::softmax_with_spread(gcodes.view(), scale, gspread.view(), gworkspace);
        CHECK(gworkspace.numel() == 0);  // fused: the composed form would size it
        check_parity<T>("softmax_with_spread codes", codes, gcodes, tolerance<T>(N));
        // spread = max − mean: its rounding error scales with the row's values, not the result.
        check_parity<T>("softmax_with_spread spread", spread, gspread, tolerance<T>(N),
                        std::sqrt(static_cast<double>(M)));
      }
    }
  }
}

TEST_CASE_TEMPLATE("cuda parity: layer_norm forward and backward", T, float, double) {
  SKIP_WITHOUT_CUDA_DEVICE();
  const double eps = 1e-5;
  // Rows a block takes (1, 7, 33, 257, 1500) and rows a warp takes, at each register budget
  // (64, 384, 1024 elements).
  for (std::int64_t M : {1, 7, 64}) {
    for (std::int64_t N : {1, 7, 33, 64, 257, 384, 1024, 1500}) {
      for (bool affine : {true, false}) {
        CAPTURE(M);
        CAPTURE(N);
        CAPTURE(affine);
        const Tensor<T> x = random_tensor<T>({M, N}, -3.0, 5.0);
        const Tensor<T> gamma = affine ? random_tensor<T>({N}, 0.5, 1.5) : Tensor<T>();
        const Tensor<T> beta = affine ? random_tensor<T>({N}) : Tensor<T>();
        const Tensor<T, Cuda> gx = to_device<T>(x);
        const Tensor<T, Cuda> g_gamma = affine ? to_device<T>(gamma) : Tensor<T, Cuda>();
        const Tensor<T, Cuda> g_beta = affine ? to_device<T>(beta) : Tensor<T, Cuda>();

        Tensor<T> y = nan_tensor<T>({M, N}), mean = nan_tensor<T>({M}), rstd = nan_tensor<T>({M});
        Guarded<T> gy(y), gmean(mean), grstd(rstd);
        ops::layer_norm(x, gamma, beta, eps, y, mean, rstd);
        ops::layer_norm(gx, g_gamma, g_beta, eps, gy.view(), gmean.view(), grstd.view());
        check_parity<T>("layer_norm y", y, gy, tolerance<T>(N));
        check_parity<T>("layer_norm mean", mean, gmean, tolerance<T>(N));
        check_parity<T>("layer_norm rstd", rstd, grstd, tolerance<T>(N));

        // Backward from the CPU's saved statistics; dgamma and dbeta accumulate into what they
        // hold, and either may be absent. dx aliases dy.
        const Tensor<T> dy = random_tensor<T>({M, N});
        const Tensor<T, Cuda> g_mean = to_device<T>(mean), g_rstd = to_device<T>(rstd);
        for (int grads = 0; grads < 3; ++grads) {
          CAPTURE(grads);
          const bool with_dgamma = grads != 2, with_dbeta = grads == 0;
          Tensor<T> dgamma = with_dgamma ? random_tensor<T>({N}) : Tensor<T>();
          Tensor<T> dbeta = with_dbeta ? random_tensor<T>({N}) : Tensor<T>();
          Guarded<T> g_dgamma(dgamma), g_dbeta(dbeta);
          const TensorView<T, Cuda> none;
          auto xhat = [&](std::int64_t r, std::int64_t j) {
            return (x.data()[r * N + j] - mean.data()[r]) * rstd.data()[r];
          };
          const double dgamma_scale = accumulation_scale(
              dgamma, M, N, [&](std::int64_t r, std::int64_t j) { return dy.data()[r * N + j] * xhat(r, j); });
          const double dbeta_scale = accumulation_scale(
              dbeta, M, N, [&](std::int64_t r, std::int64_t j) { return dy.data()[r * N + j]; });
          Tensor<T> dx = dy.clone();
          Guarded<T> gdx(dy);
          ops::layer_norm_backward(x, gamma, mean, rstd, dx, dx, dgamma, dbeta);
          ops::layer_norm_backward(gx, g_gamma, g_mean, g_rstd, gdx.view(), gdx.view(),
                                   with_dgamma ? g_dgamma.view() : none,
                                   with_dbeta ? g_dbeta.view() : none);
          // dx = rstd · (g − mean(g) − xhat · mean(g · xhat)), g = dy · gamma, cancels to zero
          // when N = 1: its rounding error scales with rstd · g, not with dx.
          Tensor<T> terms = dy.clone();
          for (std::int64_t r = 0; r < M; ++r)
            for (std::int64_t j = 0; j < N; ++j)
              terms.data()[r * N + j] *= rstd.data()[r] * (affine ? gamma.data()[j] : T(1));
          check_parity<T>("layer_norm_backward dx in place", dx, gdx, tolerance<T>(N),
                          norm_of<T>(terms));
          check_parity<T>("layer_norm_backward dgamma (accumulated)", dgamma, g_dgamma,
                          tolerance<T>(M), dgamma_scale);
          check_parity<T>("layer_norm_backward dbeta (accumulated)", dbeta, g_dbeta,
                          tolerance<T>(M), dbeta_scale);
        }
      }
    }
  }
}

TEST_CASE_TEMPLATE("cuda parity: residual + layer_norm fused, forward and backward, in place", T,
                   float, double) {
  SKIP_WITHOUT_CUDA_DEVICE();
  // The fused kernels against the CPU's fused ops: sum = x + add written over x (the residual
  // stream updated in place), y = layer_norm(sum); dx = residual + the LayerNorm backward of dy,
  // written over dy, with the parameter gradients accumulated.
  const double eps = 1e-6;
  for (std::int64_t M : {1, 7, 130}) {
    for (std::int64_t N : {7, 257, 768}) {
      CAPTURE(M);
      CAPTURE(N);
      const Tensor<T> x = random_tensor<T>({M, N}, -3.0, 5.0), add = random_tensor<T>({M, N});
      const Tensor<T> gamma = random_tensor<T>({N}, 0.5, 1.5), beta = random_tensor<T>({N});
      const Tensor<T, Cuda> g_add = to_device<T>(add), g_gamma = to_device<T>(gamma),
                            g_beta = to_device<T>(beta);
      Tensor<T> sum = x.clone(), y = nan_tensor<T>({M, N}), mean = nan_tensor<T>({M}),
                rstd = nan_tensor<T>({M});
      Guarded<T> gsum(x), gy(y), gmean(mean), grstd(rstd);
      ops::add_layer_norm(TensorView<T>(sum), TensorView<T>(add), TensorView<T>(gamma),
                          TensorView<T>(beta), eps, TensorView<T>(sum), TensorView<T>(y),
                          TensorView<T>(mean), TensorView<T>(rstd));
      ops::add_layer_norm(gsum.view(), TensorView<T, Cuda>(g_add), TensorView<T, Cuda>(g_gamma),
                          TensorView<T, Cuda>(g_beta), eps, gsum.view(), gy.view(), gmean.view(),
                          grstd.view());
      check_parity<T>("add_layer_norm sum (over x)", sum, gsum, tolerance<T>(1));
      check_parity<T>("add_layer_norm y", y, gy, tolerance<T>(N));
      check_parity<T>("add_layer_norm mean", mean, gmean, tolerance<T>(N));
      check_parity<T>("add_layer_norm rstd", rstd, grstd, tolerance<T>(N));

      const Tensor<T> dy = random_tensor<T>({M, N}), residual = random_tensor<T>({M, N});
      Tensor<T> dgamma = random_tensor<T>({N}), dbeta = random_tensor<T>({N});
      Guarded<T> g_dgamma(dgamma), g_dbeta(dbeta), gdx(dy);
      const Tensor<T, Cuda> g_sum = to_device<T>(sum), g_mean = to_device<T>(mean),
                            g_rstd = to_device<T>(rstd), g_res = to_device<T>(residual);
      Tensor<T> dx = dy.clone();
      ops::layer_norm_backward_add(TensorView<T>(sum), TensorView<T>(gamma), TensorView<T>(mean),
                                   TensorView<T>(rstd), TensorView<T>(dx),
                                   TensorView<T>(residual), TensorView<T>(dx),
                                   TensorView<T>(dgamma), TensorView<T>(dbeta));
      ops::layer_norm_backward_add(TensorView<T, Cuda>(g_sum), TensorView<T, Cuda>(g_gamma),
                                   TensorView<T, Cuda>(g_mean), TensorView<T, Cuda>(g_rstd),
                                   gdx.view(), TensorView<T, Cuda>(g_res), gdx.view(),
                                   g_dgamma.view(), g_dbeta.view());
      check_parity<T>("layer_norm_backward_add dx (over dy)", dx, gdx, tolerance<T>(N));
      check_parity<T>("layer_norm_backward_add dgamma", dgamma, g_dgamma, tolerance<T>(M));
      check_parity<T>("layer_norm_backward_add dbeta", dbeta, g_dbeta, tolerance<T>(M));
    }
  }
}

TEST_CASE_TEMPLATE("cuda parity: l2_normalize forward and backward, clamped rows included", T,
                   float, double) {
  SKIP_WITHOUT_CUDA_DEVICE();
  const double eps = 1e-5;
  for (std::int64_t M : {3, 64}) {
    for (std::int64_t N : {1, 7, 33, 257, 1500}) {
      CAPTURE(M);
      CAPTURE(N);
      Tensor<T> x = random_tensor<T>({M, N});
      for (std::int64_t j = 0; j < N; ++j) {
        x(0, j) = T(0);      // norm 0: clamped to eps
        x(1, j) *= T(1e-7);  // below eps: clamped
      }
      const Tensor<T, Cuda> gx = to_device<T>(x);
      Tensor<T> y = nan_tensor<T>({M, N}), norm = nan_tensor<T>({M});
      Guarded<T> gy(y), gnorm(norm);
      ops::l2_normalize(x, eps, y, norm);
      ops::l2_normalize(gx, eps, gy.view(), gnorm.view());
      check_parity<T>("l2_normalize y", y, gy, tolerance<T>(N));
      check_parity<T>("l2_normalize norm", norm, gnorm, tolerance<T>(N));

      Guarded<T> g_inplace(x);  // y aliases x
      Tensor<T> norm2 = nan_tensor<T>({M});
      Guarded<T> gnorm2(norm2);
      ops::l2_normalize(g_inplace.view(), eps, g_inplace.view(), gnorm2.view());
      check_parity<T>("l2_normalize in place", y, g_inplace, tolerance<T>(N));

      const Tensor<T> dy = random_tensor<T>({M, N});
      const Tensor<T, Cuda> g_y = to_device<T>(y), g_norm = to_device<T>(norm);
      Tensor<T> dx = dy.clone();
      Guarded<T> gdx(dy);  // dx aliases dy
      ops::l2_normalize_backward(y, norm, eps, dx, dx);
      ops::l2_normalize_backward(g_y, g_norm, eps, gdx.view(), gdx.view());
      check_parity<T>("l2_normalize_backward in place", dx, gdx, tolerance<T>(N));

      // L1 (the codebook's bag-of-words targets), in place, rows 0 and 1 clamped at eps.
      Tensor<T> l1 = x.clone();
      Guarded<T> g_l1(x);
      ops::l1_normalize(TensorView<T>(l1), eps);
      ops::l1_normalize(g_l1.view(), eps);
      check_parity<T>("l1_normalize in place", l1, g_l1, tolerance<T>(N));
    }
  }
}

// ---- reductions ----------------------------------------------------------------------------------

TEST_CASE_TEMPLATE("cuda parity: sum and mean over every axis", T, float, double) {
  SKIP_WITHOUT_CUDA_DEVICE();
  // {70000, 2, 1} and {2, 70000, 1} over their long axis take the chunked column and row paths.
  const Shape shapes[] = {{1, 1, 1},    {2, 7, 33},    {3, 257, 1},    {5, 33, 257},
                          {1, 1000, 7}, {70000, 2, 1}, {2, 70000, 1}, {3, 1, 70001}};
  for (const Shape& s : shapes) {
    const Tensor<T> x = random_tensor<T>(s);
    const Tensor<T, Cuda> gx = to_device<T>(x);
    for (int axis = 0; axis < 3; ++axis) {
      CAPTURE(s);
      CAPTURE(axis);
      Shape out;
      switch (axis) {
        case 0: out = Shape{s[1], s[2]}; break;
        case 1: out = Shape{s[0], s[2]}; break;
        default: out = Shape{s[0], s[1]}; break;
      }
      const double tol = tolerance<T>(s[axis]);
      Tensor<T> y = nan_tensor<T>(out);  // beta == 0 does not read y
      Guarded<T> gy(y);
      ops::sum(x, axis, y);
      ops::sum(gx, axis, gy.view());
      check_parity<T>("sum, beta = 0", y, gy, tol);

      const Tensor<T> y0 = random_tensor<T>(out);
      Tensor<T> y2 = y0.clone();
      Guarded<T> gy2(y0);
      ops::sum(x, axis, y2, T(0.5), T(-1.25));
      ops::sum(gx, axis, gy2.view(), T(0.5), T(-1.25));
      check_parity<T>("sum with alpha and beta", y2, gy2, tol);

      Tensor<T> m = nan_tensor<T>(out);
      Guarded<T> gm(m);
      ops::mean(x, axis, m);
      ops::mean(gx, axis, gm.view());
      check_parity<T>("mean", m, gm, tol);
    }
  }
}

TEST_CASE_TEMPLATE("cuda parity: soft_target_loss, gathered or not, KL or cross-entropy", T,
                   float, double) {
  SKIP_WITHOUT_CUDA_DEVICE();
  // K = 4096 (MOCA's codebook), ragged K, a single row, rows longer than a block.
  for (auto [M, K] : {std::pair<std::int64_t, std::int64_t>{37, 4096}, {5, 13}, {1, 8}, {300, 129},
                      {3, 1000}}) {
    for (bool gathered : {false, true}) {
      for (bool entropy : {false, true}) {
        CAPTURE(M);
        CAPTURE(K);
        CAPTURE(gathered);
        CAPTURE(entropy);
        const std::int64_t R = gathered ? 2 * M + 3 : M;
        const Tensor<T> z = random_tensor<T>({M, K}, -6.0, 6.0);
        // Targets: non-negative rows that sum to 1, with exact zeros (0 · log 0 = 0).
        Tensor<T> table = random_tensor<T>({R, K}, -0.5, 1.0);
        for (std::int64_t r = 0; r < R; ++r) {
          T* row = table.data() + r * K;
          T total = 0;
          for (std::int64_t k = 0; k < K; ++k) total += (row[k] = std::max(row[k], T(0)));
          for (std::int64_t k = 0; k < K; ++k) row[k] = total > 0 ? row[k] / total : T(1) / K;
        }
        Tensor<Index> rows({M});
        for (std::int64_t r = 0; r < M; ++r) rows.data()[r] = static_cast<Index>((7 * r + 2) % R);
        Tensor<Index, Cuda> g_rows({M});
        copy(TensorView<Index>(rows), TensorView<Index, Cuda>(g_rows));
        const TensorView<Index> rows_view = rows;
        const TensorView<Index, Cuda> g_rows_view = g_rows;
        const Tensor<T, Cuda> gz = to_device<T>(z), g_table = to_device<T>(table);

        ops::SoftTargetWorkspace<T, Cpu> ws;
        ops::SoftTargetWorkspace<T, Cuda> g_ws;
        Tensor<T> dz = nan_tensor<T>({M, K});
        Guarded<T> gdz(dz);
        const double expected = ops::soft_target_loss(z, table, gathered ? &rows_view : nullptr,
                                                      entropy, 0.37, dz, ws);
        const double got = ops::soft_target_loss(gz, g_table, gathered ? &g_rows_view : nullptr,
                                                 entropy, 0.37, gdz.view(), g_ws);
        INFO("loss cpu ", expected, " cuda ", got);
        CHECK(std::abs(got - expected) <= tolerance<T>(M * K) * std::abs(expected));
        check_parity<T>("soft_target_loss dz", dz, gdz, tolerance<T>(K));
        // The fused kernel leaves the composed form's buffers alone.
        CHECK(g_ws.work.numel() == 0);
        CHECK(g_ws.gathered.numel() == 0);

        // Loss only, and the gradient written over the logits (dz aliases z).
        const double loss_only = ops::soft_target_loss(
            gz, g_table, gathered ? &g_rows_view : nullptr, entropy, 0.37,
            TensorView<T, Cuda>(), g_ws);
        CHECK(loss_only == got);
        Guarded<T> inplace(z);
        const double again = ops::soft_target_loss(inplace.view(), g_table,
                                                   gathered ? &g_rows_view : nullptr, entropy,
                                                   0.37, inplace.view(), g_ws);
        CHECK(again == got);
        check_parity<T>("soft_target_loss dz over z", dz, inplace, tolerance<T>(K));
      }
    }
  }
}

TEST_CASE("cuda: a target row index out of range makes the loss NaN, never a read") {
  SKIP_WITHOUT_CUDA_DEVICE();
  const std::int64_t M = 4, K = 16, R = 3;
  const Tensor<float, Cuda> z = to_device<float>(random_tensor<float>({M, K}));
  const Tensor<float, Cuda> table = to_device<float>(full<float>({R, K}, 1.0f / K));
  Tensor<Index> rows({M});
  const Index bad[] = {0, 2, 3, -1};  // rows 2 and 3 point outside the 3 target rows
  std::copy(bad, bad + M, rows.data());
  Tensor<Index, Cuda> g_rows({M});
  copy(TensorView<Index>(rows), TensorView<Index, Cuda>(g_rows));
  const TensorView<Index, Cuda> rows_view = g_rows;
  Tensor<float, Cuda> dz({M, K});
  ops::SoftTargetWorkspace<float, Cuda> ws;
  const double loss = ops::soft_target_loss(TensorView<float, Cuda>(z), TensorView<float, Cuda>(table),
                                            &rows_view, true, 1.0, TensorView<float, Cuda>(dz), ws);
  CHECK(std::isnan(loss));
  const Tensor<float> host = to_host(TensorView<float, Cuda>(dz));
  for (std::int64_t k = 0; k < K; ++k) {
    CHECK(std::isfinite(host.data()[k]));           // row 0: a valid target
    CHECK(std::isnan(host.data()[2 * K + k]));      // row 2: index 3
    CHECK(std::isnan(host.data()[3 * K + k]));      // row 3: index -1
  }
}

TEST_CASE_TEMPLATE("cuda parity: sum_squares in double, deterministic", T, float, double) {
  SKIP_WITHOUT_CUDA_DEVICE();
  for (std::int64_t n : {0, 1, 7, 257, 1000003}) {
    CAPTURE(n);
    const Tensor<T> x = random_tensor<T>({n});
    const Tensor<T, Cuda> gx = to_device<T>(x);
    const double expected = ops::sum_squares(x);
    const double got = ops::sum_squares(gx);
    const double err = expected > 0 ? std::abs(expected - got) / expected : std::abs(got);
    CHECK(err <= 1e-12);
    CHECK(ops::sum_squares(gx) == got);  // same bits on every call
  }
}

TEST_CASE("cuda: values read later (PendingValues) equal the waiting forms, with one wait") {
  SKIP_WITHOUT_CUDA_DEVICE();
  cuda::Context& ctx = cuda::Context::get();
  const std::int64_t M = 300, K = 129, R = 2 * M + 3;
  const Tensor<float> z = random_tensor<float>({M, K}, -6.0, 6.0);
  Tensor<float> table = random_tensor<float>({R, K}, 0.0, 1.0);
  for (std::int64_t r = 0; r < R; ++r) {
    float total = 0;
    for (std::int64_t k = 0; k < K; ++k) total += table.data()[r * K + k];
    for (std::int64_t k = 0; k < K; ++k) table.data()[r * K + k] /= total;
  }
  Tensor<Index> rows({M});
  for (std::int64_t r = 0; r < M; ++r) rows.data()[r] = static_cast<Index>((7 * r + 2) % R);
  const Tensor<Index, Cuda> g_rows = rows.to<Cuda>();
  const TensorView<Index, Cuda> g_rows_view = g_rows;
  const Tensor<float, Cuda> gz = to_device<float>(z), g_table = to_device<float>(table);
  const Tensor<float> big = random_tensor<float>({1000003});
  const Tensor<float, Cuda> g_big = to_device<float>(big);
  ops::SoftTargetWorkspace<float, Cuda> ws;
  Tensor<float, Cuda> dz_now({M, K}), dz_later({M, K});

  const double loss =
      ops::soft_target_loss(TensorView<float, Cuda>(gz), TensorView<float, Cuda>(g_table),
                            &g_rows_view, true, 0.37, TensorView<float, Cuda>(dz_now), ws);
  const double squares = ops::sum_squares(TensorView<float, Cuda>(g_big));
  const double empty = ops::sum_squares(TensorView<float, Cuda>(g_big).rows(0, 0));

  PendingValues<Cuda> values;
  Tensor<float, Cuda> one({1});
  ops::fill(TensorView<float, Cuda>(one), 6.5f);
  cuda::synchronize();
  const std::uint64_t waits = ctx.host_waits();
  const auto t_loss = ops::soft_target_loss(
      TensorView<float, Cuda>(gz), TensorView<float, Cuda>(g_table), &g_rows_view, true, 0.37,
      TensorView<float, Cuda>(dz_later), ws, values, 4.0);
  const auto t_squares = ops::sum_squares(TensorView<float, Cuda>(g_big), values);
  const auto t_empty = ops::sum_squares(TensorView<float, Cuda>(g_big).rows(0, 0), values);
  const auto t_one = values.capture(TensorView<float, Cuda>(one), 2.0);
  ops::fill(TensorView<float, Cuda>(one), -1.0f);  // after the capture: not seen by it
  // Enough partial sums to move the set's buffer: the values written before it keep their place.
  std::vector<PendingValues<Cuda>::Ticket> more;
  for (int i = 0; i < 40; ++i)
    more.push_back(ops::sum_squares(TensorView<float, Cuda>(g_big), values));
  CHECK(ctx.host_waits() == waits);  // nothing waited for yet
  values.read();
  CHECK(ctx.host_waits() == waits + 1);
  values.read();  // read already: no second wait
  CHECK(ctx.host_waits() == waits + 1);
  CHECK(values[t_loss] == loss / 4.0);  // the same partial sums, added in the same order
  CHECK(values[t_squares] == squares);
  CHECK(values[t_empty] == empty);
  CHECK(empty == 0.0);
  CHECK(values[t_one] == 3.25);
  for (const auto& t : more) CHECK(values[t] == squares);
  const Tensor<float> now = to_host(TensorView<float, Cuda>(dz_now));
  const Tensor<float> later = to_host(TensorView<float, Cuda>(dz_later));
  CHECK(std::equal(now.begin(), now.end(), later.begin()));  // the same kernel, the same gradient
}

TEST_CASE("cuda: uploads are queued without a wait, and their source may change at once") {
  SKIP_WITHOUT_CUDA_DEVICE();
  cuda::Context& ctx = cuda::Context::get();
  REQUIRE(ctx.staged_uploads());
  // A long kernel queue ahead of the uploads: they must land in order after it, not before.
  Tensor<float, Cuda> busy({1 << 24});
  for (int i = 0; i < 20; ++i) ops::scale(TensorView<float, Cuda>(busy), 1.0f);
  Tensor<Index, Cuda> a({4096}), b({300000});
  Tensor<Index> host({300000});
  const std::uint64_t waits = ctx.host_waits();
  for (int round = 0; round < 50; ++round) {
    for (std::int64_t i = 0; i < 4096; ++i) host.data()[i] = static_cast<Index>(round * 4096 + i);
    copy(TensorView<Index>(host).rows(0, 4096), TensorView<Index, Cuda>(a));
    for (std::int64_t i = 0; i < 4096; ++i) host.data()[i] = -1;  // reused at once
    // Each round's upload lands in b after the last round's copy of b into itself was queued.
    if (round == 49) {
      for (std::int64_t i = 0; i < 300000; ++i) host.data()[i] = static_cast<Index>(3 * i);
      copy(TensorView<Index>(host), TensorView<Index, Cuda>(b));
      for (std::int64_t i = 0; i < 300000; ++i) host.data()[i] = 0;
    }
  }
  CHECK(ctx.host_waits() == waits);  // not one wait for 51 uploads
  const Tensor<Index> back_a = a.to<Cpu>(), back_b = b.to<Cpu>();
  for (std::int64_t i = 0; i < 4096; ++i) CHECK(back_a.data()[i] == 49 * 4096 + i);
  bool b_ok = true;
  for (std::int64_t i = 0; i < 300000; ++i) b_ok = b_ok && back_b.data()[i] == 3 * i;
  CHECK(b_ok);
  const cuda::StagingStats st = ctx.staging_stats();
  MESSAGE("staging: ", st.blocks, " blocks, ", st.allocations, " allocations, ", st.waits,
          " waits");
  CHECK(st.blocks <= 64);
  CHECK(st.bytes <= (std::size_t{256} << 20));

  // An upload above kMaxStagedUpload (weights loaded at start) waits instead of pinning more.
  const std::int64_t n_big = static_cast<std::int64_t>(cuda::Context::kMaxStagedUpload / 4) + 1;
  Tensor<float> big_host({n_big});
  big_host.data()[n_big - 1] = 42.0f;
  const std::uint64_t before_big = ctx.host_waits();
  const Tensor<float, Cuda> big = big_host.to<Cuda>();
  CHECK(ctx.host_waits() == before_big + 1);
  CHECK(ctx.staging_stats().bytes == st.bytes);
  CHECK(to_host(TensorView<float, Cuda>(big).rows(n_big - 1, n_big)).data()[0] == 42.0f);

  // With staging off, each upload waits for the stream, as copies from the host once did.
  ctx.set_staged_uploads(false);
  const std::uint64_t before = ctx.host_waits();
  copy(TensorView<Index>(host).rows(0, 4096), TensorView<Index, Cuda>(a));
  ctx.set_staged_uploads(true);
  CHECK(ctx.host_waits() == before + 1);
  CHECK(a.to<Cpu>().data()[7] == host.data()[7]);
}

// ---- gather / scatter ----------------------------------------------------------------------------

TEST_CASE_TEMPLATE("cuda parity: gather_rows and scatter_add_rows", T, float, double) {
  SKIP_WITHOUT_CUDA_DEVICE();
  const std::int64_t R = 17, M = 40;
  Tensor<Index> idx({M});
  for (std::int64_t i = 0; i < M; ++i) idx(i) = static_cast<Index>((i * 7 + 3) % R);  // repeats
  const Tensor<Index, Cuda> g_idx = idx.to<Cuda>();
  for (std::int64_t C : {1, 7, 33, 257}) {
    CAPTURE(C);
    const Tensor<T> src = random_tensor<T>({R, C});
    const Tensor<T, Cuda> g_src = to_device<T>(src);
    Tensor<T> dst = nan_tensor<T>({M, C});
    Guarded<T> g_dst(dst);
    ops::gather_rows(src, idx, dst);
    ops::gather_rows(g_src, g_idx, g_dst.view());
    check_parity<T>("gather_rows", dst, g_dst, 0.0);  // a copy: exact

    const Tensor<T> rows = random_tensor<T>({M, C});
    const Tensor<T, Cuda> g_rows = to_device<T>(rows);
    Tensor<T> acc = random_tensor<T>({R, C});
    Guarded<T> g_acc(acc);
    ops::scatter_add_rows(rows, idx, acc);
    ops::scatter_add_rows(g_rows, g_idx, g_acc.view());
    check_parity<T>("scatter_add_rows", acc, g_acc, tolerance<T>(M));
  }
}

TEST_CASE("cuda: out-of-range indices are skipped on the device, never followed") {
  SKIP_WITHOUT_CUDA_DEVICE();
  const std::int64_t R = 4, C = 5;
  Tensor<Index> idx({3});
  idx(0) = 2;
  idx(1) = -1;
  idx(2) = static_cast<Index>(R);
  const Tensor<Index, Cuda> g_idx = idx.to<Cuda>();
  const Tensor<float> src = random_tensor<float>({R, C});
  const Tensor<float, Cuda> g_src = to_device<float>(src);

  Guarded<float> g_dst(nan_tensor<float>({3, C}));
  ops::gather_rows(g_src, g_idx, g_dst.view());
  const Tensor<float> dst = g_dst.result();
  for (std::int64_t c = 0; c < C; ++c) {
    CHECK(dst(0, c) == src(2, c));
    CHECK(dst(1, c) == 0.0f);
    CHECK(dst(2, c) == 0.0f);
  }
  CHECK(g_dst.guards_intact());

  const Tensor<float> rows = full<float>({3, C}, 1.0f);
  Guarded<float> g_acc(full<float>({R, C}, 0.0f));
  ops::scatter_add_rows(to_device<float>(rows), g_idx, g_acc.view());
  const Tensor<float> acc = g_acc.result();
  for (std::int64_t r = 0; r < R; ++r)
    for (std::int64_t c = 0; c < C; ++c) CHECK(acc(r, c) == (r == 2 ? 1.0f : 0.0f));
  CHECK(g_acc.guards_intact());
  CHECK_NOTHROW(cuda::synchronize());
}

// ---- layout ------------------------------------------------------------------------------------

TEST_CASE_TEMPLATE("cuda parity: copy_strided, with broadcast sources and accumulation", T, float,
                   double) {
  SKIP_WITHOUT_CUDA_DEVICE();
  const std::int64_t N = 3, K = 7, D = 33, S = 1 + K;
  const Tensor<T> cls = random_tensor<T>({D}), tok = random_tensor<T>({N, K, D});
  const Tensor<T, Cuda> g_cls = to_device<T>(cls), g_tok = to_device<T>(tok);
  // seq [N, 1 + K, D]: cls in row 0 of every sample (one row broadcast to N matrices), tokens
  // after it; then cls broadcast to all K token rows (ld 0) and added.
  auto assemble = [&](const auto& c, const auto& t, const auto& seq, bool accumulate) {
    ops::copy_strided(ops::strided_batch(c, 0, 1, D, 0, 0, N),
                      ops::strided_batch(seq, 0, 1, D, D, S * D, N), accumulate);
    ops::copy_strided(ops::strided_batch(t, 0, K, D, D, K * D, N),
                      ops::strided_batch(seq, D, K, D, D, S * D, N), accumulate);
    ops::copy_strided(ops::strided_batch(c, 0, K, D, 0, 0, N),
                      ops::strided_batch(seq, D, K, D, D, S * D, N), true);
  };
  for (bool accumulate : {false, true}) {
    CAPTURE(accumulate);
    Tensor<T> seq = random_tensor<T>({N, S, D});
    Guarded<T> g_seq(seq);
    assemble(TensorView<T>(cls), TensorView<T>(tok), TensorView<T>(seq), accumulate);
    assemble(TensorView<T, Cuda>(g_cls), TensorView<T, Cuda>(g_tok), g_seq.view(), accumulate);
    check_parity<T>("copy_strided", seq, g_seq, tolerance<T>());
  }
}

TEST_CASE_TEMPLATE("cuda parity: patchify and unpatchify", T, float, double) {
  SKIP_WITHOUT_CUDA_DEVICE();
  const std::int64_t N = 2, C = 3, H = 8, W = 12, p = 4, L = (H / p) * (W / p);
  const Tensor<T> images = random_tensor<T>({N, C, H, W});
  Tensor<T> patches = nan_tensor<T>({N, L, C * p * p});
  Guarded<T> g_patches(patches);
  ops::patchify(images, p, patches);
  ops::patchify(TensorView<T, Cuda>(to_device<T>(images)), p, g_patches.view());
  check_parity<T>("patchify", patches, g_patches, 0.0);  // a permutation: exact

  const Tensor<T> src = random_tensor<T>({N, L, C * p * p});
  Tensor<T> back = nan_tensor<T>({N, C, H, W});
  Guarded<T> g_back(back);
  ops::unpatchify(src, p, back);
  ops::unpatchify(TensorView<T, Cuda>(to_device<T>(src)), p, g_back.view());
  check_parity<T>("unpatchify", back, g_back, 0.0);
}

// ---- statistics ----------------------------------------------------------------------------------

TEST_CASE_TEMPLATE("cuda parity: row_max", T, float, double) {
  SKIP_WITHOUT_CUDA_DEVICE();
  for (std::int64_t M : {1, 5, 64}) {
    for (std::int64_t N : {1, 7, 33, 257, 1500}) {
      CAPTURE(M);
      CAPTURE(N);
      const Tensor<T> x = random_tensor<T>({M, N}, -3.0, 3.0);
      Tensor<T> y = nan_tensor<T>({M});
      Guarded<T> gy(y);
      ops::row_max(x, y);
      ops::row_max(TensorView<T, Cuda>(to_device<T>(x)), gy.view());
      check_parity<T>("row_max", y, gy, 0.0);  // a maximum is exact
    }
  }
}

TEST_CASE_TEMPLATE("cuda parity: batch_norm forward and backward", T, float, double) {
  SKIP_WITHOUT_CUDA_DEVICE();
  const double eps = 1e-5;
  for (std::int64_t M : {2, 7, 64, 300}) {
    for (std::int64_t N : {1, 7, 33, 257}) {
      for (bool affine : {true, false}) {
        CAPTURE(M);
        CAPTURE(N);
        CAPTURE(affine);
        const Tensor<T> x = random_tensor<T>({M, N}, -2.0, 4.0);
        const Tensor<T> gamma = affine ? random_tensor<T>({N}, 0.5, 1.5) : Tensor<T>();
        const Tensor<T> beta = affine ? random_tensor<T>({N}) : Tensor<T>();
        const Tensor<T, Cuda> gx = to_device<T>(x);
        const Tensor<T, Cuda> g_gamma = affine ? to_device<T>(gamma) : Tensor<T, Cuda>();
        const Tensor<T, Cuda> g_beta = affine ? to_device<T>(beta) : Tensor<T, Cuda>();

        Tensor<T> y = nan_tensor<T>({M, N}), mean = nan_tensor<T>({N}), var = nan_tensor<T>({N});
        Guarded<T> gy(y), gmean(mean), gvar(var);
        ops::batch_norm(x, gamma, beta, eps, y, mean, var);
        ops::batch_norm(gx, g_gamma, g_beta, eps, gy.view(), gmean.view(), gvar.view());
        check_parity<T>("batch_norm y", y, gy, tolerance<T>(M));
        check_parity<T>("batch_norm mean", mean, gmean, tolerance<T>(M));
        check_parity<T>("batch_norm var", var, gvar, tolerance<T>(M));

        // Backward from the CPU's statistics; dgamma and dbeta accumulate, dx aliases dy.
        const Tensor<T> dy = random_tensor<T>({M, N});
        const Tensor<T, Cuda> g_mean = to_device<T>(mean), g_var = to_device<T>(var);
        Tensor<T> dgamma = random_tensor<T>({N}), dbeta = random_tensor<T>({N});
        Guarded<T> g_dgamma(dgamma), g_dbeta(dbeta);
        auto xhat = [&](std::int64_t r, std::int64_t j) {
          return (x.data()[r * N + j] - mean.data()[j]) /
                 std::sqrt(var.data()[j] + static_cast<T>(eps));
        };
        const double dgamma_scale = accumulation_scale(
            dgamma, M, N, [&](std::int64_t r, std::int64_t j) { return dy.data()[r * N + j] * xhat(r, j); });
        const double dbeta_scale = accumulation_scale(
            dbeta, M, N, [&](std::int64_t r, std::int64_t j) { return dy.data()[r * N + j]; });
        Tensor<T> dx = dy.clone();
        Guarded<T> gdx(dy);
        ops::batch_norm_backward(x, gamma, mean, var, eps, dx, dx, dgamma, dbeta);
        ops::batch_norm_backward(gx, g_gamma, g_mean, g_var, eps, gdx.view(), gdx.view(),
                                 g_dgamma.view(), g_dbeta.view());
        // dx = rstd · (g − mean(g) − xhat · mean(g · xhat)), g = dy · gamma, nearly cancels
        // when M = 2 (xhat = ±1): its rounding error scales with rstd · g, not with dx.
        Tensor<T> terms = dy.clone();
        for (std::int64_t r = 0; r < M; ++r)
          for (std::int64_t j = 0; j < N; ++j)
            terms.data()[r * N + j] *= (affine ? gamma.data()[j] : T(1)) /
                                       std::sqrt(var.data()[j] + static_cast<T>(eps));
        check_parity<T>("batch_norm_backward dx in place", dx, gdx, tolerance<T>(M),
                        norm_of<T>(terms));
        check_parity<T>("batch_norm_backward dgamma (accumulated)", dgamma, g_dgamma,
                        tolerance<T>(M), dgamma_scale);
        check_parity<T>("batch_norm_backward dbeta (accumulated)", dbeta, g_dbeta,
                        tolerance<T>(M), dbeta_scale);
      }
    }
  }
}

TEST_CASE_TEMPLATE("cuda parity: xlogy_sum in double, zeros of x masked", T, float, double) {
  SKIP_WITHOUT_CUDA_DEVICE();
  for (std::int64_t n : {0, 1, 7, 257, 1000003}) {
    CAPTURE(n);
    Tensor<T> x = random_tensor<T>({n}, 0.0, 1.0);
    Tensor<T> y = random_tensor<T>({n}, 0.01, 1.0);
    for (std::int64_t i = 0; i < n; i += 3) {
      x(i) = T(0);
      y(i) = T(0);  // 0 · log 0 counts as 0
    }
    const Tensor<T, Cuda> gx = to_device<T>(x), gy = to_device<T>(y);
    const double expected = ops::xlogy_sum(x, y);
    const double got = ops::xlogy_sum(gx, gy);
    const double err = expected != 0 ? std::abs(expected - got) / std::abs(expected) : std::abs(got);
    CHECK(err <= 1e-12);
  }
}

// ---- optimiser -----------------------------------------------------------------------------------

TEST_CASE_TEMPLATE("cuda parity: adamw over several steps", T, float, double) {
  SKIP_WITHOUT_CUDA_DEVICE();
  for (std::int64_t n : {1, 7, 1000}) {
    CAPTURE(n);
    Tensor<T> p = random_tensor<T>({n}), m({n}), v({n});
    Guarded<T> gp(p), gm(m), gv(v);
    ops::AdamWStep s{.lr = 1e-2, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8, .weight_decay = 0.05};
    // m is a decaying sum of gradients that can cancel (n = 1); p moves by about lr per step
    // and may sit near zero. Their rounding errors scale with the size of what they add up.
    std::vector<double> m_terms(static_cast<std::size_t>(n), 0.0), p_terms(static_cast<std::size_t>(n));
    for (std::int64_t i = 0; i < n; ++i) p_terms[i] = std::abs(static_cast<double>(p.data()[i]));
    for (std::int64_t step = 1; step <= 3; ++step) {
      s.step = step;
      const Tensor<T> g = random_tensor<T>({n});
      for (std::int64_t i = 0; i < n; ++i) {
        m_terms[i] = s.beta1 * m_terms[i] + (1 - s.beta1) * std::abs(static_cast<double>(g.data()[i]));
        p_terms[i] += s.lr;
      }
      const Tensor<T, Cuda> gg = to_device<T>(g);
      ops::adamw(p, g, m, v, s);
      ops::adamw(gp.view(), gg, gm.view(), gv.view(), s);
    }
    auto l2 = [](const std::vector<double>& x) {
      double t = 0.0;
      for (double e : x) t += e * e;
      return std::sqrt(t);
    };
    check_parity<T>("adamw p", p, gp, tolerance<T>(), l2(p_terms));
    check_parity<T>("adamw m", m, gm, tolerance<T>(), l2(m_terms));
    check_parity<T>("adamw v", v, gv, tolerance<T>());
  }
}

TEST_CASE("cuda parity: bf16 conversions and AdamW on float masters with bf16 gradients") {
  SKIP_WITHOUT_CUDA_DEVICE();
  // Rounding to bf16 is exact arithmetic (round to nearest even): bit for bit the CPU's. Widening
  // is exact. The mixed AdamW is the float AdamW on the widened gradients.
  const std::int64_t n = 1000;
  Tensor<float> x = random_tensor<float>({n}, -3.0, 3.0);
  x.data()[0] = 1.0f + 1.0f / 256;  // an exact tie: stays 1
  x.data()[1] = std::numeric_limits<float>::quiet_NaN();
  x.data()[2] = std::numeric_limits<float>::max();  // overflows to infinity
  Tensor<bf16> h({n});
  ops::convert(TensorView<float>(x), TensorView<bf16>(h));
  const Tensor<float, Cuda> gx = to_device<float>(x);
  Tensor<bf16, Cuda> gh({n});
  ops::convert(TensorView<float, Cuda>(gx), TensorView<bf16, Cuda>(gh));
  const Tensor<bf16> back = gh.to<Cpu>();
  std::int64_t differ = 0;
  for (std::int64_t i = 0; i < n; ++i) differ += back.data()[i].bits() != h.data()[i].bits();
  CHECK(differ == 0);
  Tensor<float, Cuda> gw({n});
  ops::convert(TensorView<bf16, Cuda>(gh), TensorView<float, Cuda>(gw));
  const Tensor<float> wide = gw.to<Cpu>();
  for (std::int64_t i = 3; i < n; ++i) CHECK(wide.data()[i] == float(h.data()[i]));

  Tensor<float> p = random_tensor<float>({n}), m({n}), v({n});
  Guarded<float> gp(p), gm(m), gv(v);
  ops::AdamWStep s{.lr = 1e-2, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8, .weight_decay = 0.05};
  for (std::int64_t step = 1; step <= 3; ++step) {
    s.step = step;
    const Tensor<float> g32 = random_tensor<float>({n});
    Tensor<bf16> g({n});
    ops::convert(TensorView<float>(g32), TensorView<bf16>(g));
    Tensor<bf16, Cuda> gg({n});
    copy(TensorView<bf16>(g), TensorView<bf16, Cuda>(gg));
    ops::adamw(TensorView<float>(p), TensorView<bf16>(g), TensorView<float>(m),
               TensorView<float>(v), s);
    ops::adamw(gp.view(), TensorView<bf16, Cuda>(gg), gm.view(), gv.view(), s);
  }
  // As in the float AdamW test: p moves by about lr per step from values of size 1.
  check_parity<float>("mixed adamw p", p, gp, tolerance<float>(), std::sqrt(static_cast<double>(n)));
  check_parity<float>("mixed adamw m", m, gm, tolerance<float>(), norm_of(TensorView<float>(m)));
  check_parity<float>("mixed adamw v", v, gv, tolerance<float>());
}

namespace {

// Elements where a and b differ by more than one bf16 ulp of the larger: the CPU's bf16 product
// is the exact float product rounded once, the GPU's an fp32 accumulation in another order
// rounded once, so a result near a rounding boundary may land one ulp away, never more.
std::int64_t beyond_one_ulp(const Tensor<bf16>& a, const Tensor<bf16>& b) {
  std::int64_t bad = 0;
  for (std::int64_t i = 0; i < a.numel(); ++i) {
    const float x = a.data()[i], y = b.data()[i];
    if (x == y) continue;  // zeros included (ilogb(0) is not an exponent)
    const float ulp = std::ldexp(1.0f, std::ilogb(std::max(std::abs(x), std::abs(y))) - 7);
    bad += !(std::abs(x - y) <= ulp);  // NaN counts
  }
  return bad;
}

Tensor<bf16> random_bf16(Shape shape, double lo = -1.0, double hi = 1.0) {
  const Tensor<float> f = random_tensor<float>(shape, lo, hi);
  Tensor<bf16> h(shape);
  ops::convert(TensorView<float>(f), TensorView<bf16>(h));
  return h;
}

Tensor<bf16, Cuda> bf16_to_device(const Tensor<bf16>& h) {
  Tensor<bf16, Cuda> d(h.shape());
  copy(TensorView<bf16>(h), TensorView<bf16, Cuda>(d));
  return d;
}

/// A guarded bf16 device output, NaN until a kernel writes it.
Guarded<bf16> bf16_output(Shape shape) { return Guarded<bf16>(nan_tensor<bf16>(shape)); }
/// The same for the float statistics of bf16 ops (LayerNorm's mean and rstd, norms, ...).
Guarded<float> float_output(Shape shape) { return Guarded<float>(nan_tensor<float>(shape)); }

}  // namespace

TEST_CASE("cuda parity: a bf16 product with bias and residual, against its float value") {
  SKIP_WITHOUT_CUDA_DEVICE();
  // Fused, the device rounds acc + bias + residual once; composed (and on the CPU) the product
  // with its bias is rounded, then the sum. Where the residual cancels the product, the first
  // rounding is large beside the result, so both are held to the float value normwise: within
  // a few bf16 roundings (2^-9 each).
  bool fused = true;
  SUBCASE("fused") { fused = true; }
  SUBCASE("composed") { fused = false; }
  const ContextSwitch scope(&cuda::Context::set_fused_residual, fused, true);
  const std::int64_t M = 11392 / 4, N = 768, K = 3072;  // fc2 at the student's width
  const Tensor<bf16> x = random_bf16({M, K}), w = random_bf16({N, K}), bias = random_bf16({N});
  const Tensor<bf16> r = random_bf16({M, N}, -4.0, 4.0);
  auto widen = [](const Tensor<bf16>& h) {
    Tensor<float> f(h.shape());
    ops::convert(TensorView<bf16>(h), TensorView<float>(f));
    return f;
  };
  const Tensor<float> xf = widen(x), wf = widen(w), bf = widen(bias), rf = widen(r);
  Tensor<float> want({M, N});
  ops::gemm_bias_residual(TensorView<float>(xf), Trans::N, TensorView<float>(wf), Trans::T,
                          TensorView<float>(bf), TensorView<float>(rf), TensorView<float>(want));
  const Tensor<bf16, Cuda> gx = bf16_to_device(x), gw = bf16_to_device(w),
                           gbias = bf16_to_device(bias), gr = bf16_to_device(r);
  Guarded<bf16> gy = bf16_output({M, N});
  ops::gemm_bias_residual(TensorView<bf16, Cuda>(gx), Trans::N, TensorView<bf16, Cuda>(gw),
                          Trans::T, TensorView<bf16, Cuda>(gbias), TensorView<bf16, Cuda>(gr),
                          gy.view());
  const double err = relative_error(TensorView<float>(want), TensorView<float>(widen(gy.result())));
  const char* how = fused ? "fused" : "composed";
  MESSAGE(how, ": ", err, " from the float value (normwise)");
  CHECK(err <= 4e-3);
  CHECK(gy.guards_intact());
  const Tensor<bf16> r_after = to_host(TensorView<bf16, Cuda>(gr));
  CHECK(std::equal(r.begin(), r.end(), r_after.begin(),
                   [](bf16 a, bf16 b) { return float(a) == float(b); }));  // only read
}

TEST_CASE("cuda parity: bf16 products (plain, batched, with bias) within one ulp of the CPU's") {
  SKIP_WITHOUT_CUDA_DEVICE();
  for (int t = 0; t < 4; ++t) {
    const bool ta = (t & 1) != 0, tb = (t & 2) != 0;
    CAPTURE(ta);
    CAPTURE(tb);
    const std::int64_t M = 70, N = 96, K = 200;
    const Tensor<bf16> A = random_bf16(ta ? Shape{K, M} : Shape{M, K});
    const Tensor<bf16> B = random_bf16(tb ? Shape{N, K} : Shape{K, N});
    const Tensor<bf16> C0 = random_bf16({M, N}), bias = random_bf16({N});
    Tensor<bf16, Cuda> gA({A.shape()}), gB({B.shape()}), gC({M, N}), gbias({N});
    copy(TensorView<bf16>(A), TensorView<bf16, Cuda>(gA));
    copy(TensorView<bf16>(B), TensorView<bf16, Cuda>(gB));
    copy(TensorView<bf16>(C0), TensorView<bf16, Cuda>(gC));
    copy(TensorView<bf16>(bias), TensorView<bf16, Cuda>(gbias));
    Tensor<bf16> C = C0.clone();
    ops::gemm(A, trans(ta), B, trans(tb), C, 0.5f, -1.0f);
    ops::gemm(gA, trans(ta), gB, trans(tb), gC, 0.5f, -1.0f);
    CHECK(beyond_one_ulp(C, gC.to<Cpu>()) == 0);
    ops::gemm_bias(A, trans(ta), B, trans(tb), bias, C);
    ops::gemm_bias(gA, trans(ta), gB, trans(tb), gbias, gC);
    CHECK(beyond_one_ulp(C, gC.to<Cpu>()) == 0);
  }
  // A batch of per-head products, as attention's composed form runs them.
  const std::int64_t batch = 6, S = 17, hd = 16;
  const Tensor<bf16> Q = random_bf16({batch, S, hd}), Kt = random_bf16({batch, S, hd});
  Tensor<bf16> P({batch, S, S});
  Tensor<bf16, Cuda> gQ({batch, S, hd}), gK({batch, S, hd}), gP({batch, S, S});
  copy(TensorView<bf16>(Q), TensorView<bf16, Cuda>(gQ));
  copy(TensorView<bf16>(Kt), TensorView<bf16, Cuda>(gK));
  Backend<Cpu>::gemm_strided_batched<bf16>(false, true, S, S, hd, bf16(0.25f), Q.data(), hd,
                                           S * hd, Kt.data(), hd, S * hd, bf16(0.0f), P.data(), S,
                                           S * S, batch);
  Backend<Cuda>::gemm_strided_batched<bf16>(false, true, S, S, hd, bf16(0.25f), gQ.data(), hd,
                                            S * hd, gK.data(), hd, S * hd, bf16(0.0f), gP.data(),
                                            S, S * S, batch);
  CHECK(beyond_one_ulp(P, gP.to<Cpu>()) == 0);
}

/// bf16 ops against the CPU's bf16 ops: both compute in float from the same bf16 inputs and
/// round once what they store; the sums run in different orders, so a result may land one bf16
/// ulp away. Normwise that stays far below one rounding (2^-8), which any broken kernel exceeds
/// by orders of magnitude.
constexpr double kBf16OpBudget = 1.0 / 256;
/// The float statistics those ops save (mean, rstd, var, norms) and the float parameter
/// gradients they accumulate (grad_t<bf16>): the same float sums of the same bf16 inputs in other
/// orders, so a few float roundings apart, far below one bf16 rounding.
constexpr double kBf16StatBudget = 1e-5;

// Every storage type takes the CUDA backend's fused kernels. The op set picks them by concept
// checks, and a backend signature that drifts from a check (a statistic's or a gradient's type)
// would silently select the composed form.
static_assert(ops::norm_impl::ResidualNormBackend<bf16, Cuda>);
static_assert(ops::norm_impl::ResidualNormBackend<float, Cuda>);
static_assert(ops::gemm_impl::BiasGemmBackend<bf16, Cuda>);
static_assert(ops::gemm_impl::BiasGemmBackend<float, Cuda>);
static_assert(ops::softmax_impl::SpreadBackend<bf16, Cuda>);
static_assert(ops::softmax_impl::SpreadBackend<float, Cuda>);
static_assert(ops::soft_target_impl::FusedBackend<bf16, Cuda>);
static_assert(ops::soft_target_impl::FusedBackend<float, Cuda>);
static_assert(ops::attention_impl::FusedAttentionBackend<bf16, Cuda>);
static_assert(ops::attention_impl::FusedAttentionBackend<float, Cuda>);

TEST_CASE("cuda: tuned bf16 products agree with the CPU, are planned once, and run once on C") {
  SKIP_WITHOUT_CUDA_DEVICE();
  // Tuning times several algorithms on the call's own operands: C must come out as one call
  // makes it (a product accumulated into a float gradient is not accumulated more than once),
  // and a second call with the same problem plans nothing.
  struct TuningScope {
    TuningScope() { cuda::Context::get().set_gemm_tuning(8); }
    ~TuningScope() { cuda::Context::get().set_gemm_tuning(0); }
  } tuning;
  CHECK_THROWS_WITH_AS(cuda::Context::get().set_gemm_tuning(17),
                       doctest::Contains("0 to 16 candidate algorithms"), Error);
  const std::size_t tuned = cuda::LtMatmul::get().tuned_plans();
  // Sizes no other test uses, so that these problems are planned here.
  const std::int64_t M = 520, N = 392, K = 264;
  const Tensor<bf16> dy = random_bf16({M, N}), x = random_bf16({M, K}), w = random_bf16({N, K});
  const Tensor<bf16> bias = random_bf16({N});
  const Tensor<bf16, Cuda> gdy = bf16_to_device(dy), gx = bf16_to_device(x), gw = bf16_to_device(w),
                           gbias = bf16_to_device(bias);
  const Tensor<float> dw0 = random_tensor<float>({N, K});
  for (int call = 0; call < 2; ++call) {
    CAPTURE(call);
    const std::size_t plans = cuda::LtMatmul::get().plans();
    Tensor<float> dw = dw0.clone();
    Guarded<float> gdw(dw0);
    ops::gemm(TensorView<bf16>(dy), Trans::T, TensorView<bf16>(x), Trans::N, TensorView<float>(dw),
              1.0f, 1.0f);
    ops::gemm(TensorView<bf16, Cuda>(gdy), Trans::T, TensorView<bf16, Cuda>(gx), Trans::N,
              gdw.view(), 1.0f, 1.0f);
    check_parity<float>("tuned bf16 weight gradient into float", dw, gdw, kBf16StatBudget);
    Tensor<bf16> y({M, N});
    Guarded<bf16> gy = bf16_output({M, N});
    ops::gemm_bias(TensorView<bf16>(x), Trans::N, TensorView<bf16>(w), Trans::T,
                   TensorView<bf16>(bias), TensorView<bf16>(y));
    ops::gemm_bias(TensorView<bf16, Cuda>(gx), Trans::N, TensorView<bf16, Cuda>(gw), Trans::T,
                   TensorView<bf16, Cuda>(gbias), gy.view());
    CHECK(beyond_one_ulp(y, gy.result()) == 0);
    CHECK(gy.guards_intact());
    if (call == 0)
      CHECK(cuda::LtMatmul::get().plans() == plans + 2);
    else
      CHECK(cuda::LtMatmul::get().plans() == plans);
  }
  const std::size_t now_tuned = cuda::LtMatmul::get().tuned_plans();
  MESSAGE("plans tuned: ", now_tuned - tuned, ", another algorithm than the heuristic's first: ",
          cuda::LtMatmul::get().retuned_plans());
  CHECK(now_tuned == tuned + 2);  // cuBLASLt offers several algorithms at these sizes
}

static_assert(ops::gemm_impl::LinearGradsBackend<bf16, float, Cuda>);

TEST_CASE(
    "cuda parity: a bf16 Linear's gradients, the bias's from the column sums or the product") {
  SKIP_WITHOUT_CUDA_DEVICE();
  // ops::linear_grads: dW += dyᵀ·x and db += Σ dy. With Context::set_fused_bias_grads the sums
  // come from cuBLASLt's BGRADB epilogue, reading dy once for both; both sides sum the same bf16
  // values in fp32, in other orders.
  bool fused = false;
  SUBCASE("column sums") { fused = false; }
  SUBCASE("the product's epilogue") { fused = true; }
  const ContextSwitch scope(&cuda::Context::set_fused_bias_grads, fused, false);
  // A small case, the step's widest Linear (fc1's gradient: 3072 outputs over 11,392 rows) and
  // one with an odd width.
  for (auto [M, N, K] :
       {std::array<std::int64_t, 3>{150, 48, 40}, {11392, 3072, 768}, {1000, 770, 96}}) {
    CAPTURE(M);
    CAPTURE(N);
    CAPTURE(K);
    const Tensor<bf16> dy = random_bf16({M, N}), x = random_bf16({M, K});
    const Tensor<float> dw0 = random_tensor<float>({N, K}), db0 = random_tensor<float>({N});
    Tensor<float> dw = dw0.clone(), db = db0.clone();
    Guarded<float> gdw(dw0), gdb(db0);
    const Tensor<bf16, Cuda> gdy = bf16_to_device(dy), gx = bf16_to_device(x);
    const std::uint64_t runs = cuda::Context::get().fused_bias_grad_runs();
    ops::linear_grads(TensorView<bf16>(dy), TensorView<bf16>(x), TensorView<float>(dw),
                      TensorView<float>(db));
    ops::linear_grads(TensorView<bf16, Cuda>(gdy), TensorView<bf16, Cuda>(gx), gdw.view(),
                      gdb.view());
    check_parity<float>("weight gradient", dw, gdw, kBf16StatBudget);
    check_parity<float>("bias gradient", db, gdb, kBf16StatBudget);
    const bool ran = cuda::Context::get().fused_bias_grad_runs() > runs;
    if (!fused) CHECK_FALSE(ran);
    // cuBLASLt may decline the epilogue for a problem; that is reported, not failed.
    if (fused) WARN_MESSAGE(ran, "cuBLASLt declined the BGRADB epilogue here");
  }
}

TEST_CASE("cuda parity: bf16 products and column sums into float gradients, accumulated") {
  SKIP_WITHOUT_CUDA_DEVICE();
  // grad_t<bf16> is float: a Linear's dW += dyᵀ·x and db += Σ dy read bf16 and accumulate into
  // float without rounding. Both sides sum the same exact products in fp32, in other orders.
  const std::int64_t M = 150, N = 48, K = 40;
  const Tensor<bf16> dy = random_bf16({M, N}), x = random_bf16({M, K});
  const Tensor<float> dw0 = random_tensor<float>({N, K}), db0 = random_tensor<float>({N});
  Tensor<float> dw = dw0.clone(), db = db0.clone();
  Guarded<float> gdw(dw0), gdb(db0);
  const Tensor<bf16, Cuda> gdy = bf16_to_device(dy), gx = bf16_to_device(x);
  ops::gemm(TensorView<bf16>(dy), Trans::T, TensorView<bf16>(x), Trans::N, TensorView<float>(dw),
            1.0f, 1.0f);
  ops::gemm(TensorView<bf16, Cuda>(gdy), Trans::T, TensorView<bf16, Cuda>(gx), Trans::N, gdw.view(),
            1.0f, 1.0f);
  check_parity<float>("bf16 weight gradient into float", dw, gdw, kBf16StatBudget);
  ops::sum(TensorView<bf16>(dy), 0, TensorView<float>(db), 1.0f, 1.0f);
  ops::sum(TensorView<bf16, Cuda>(gdy), 0, gdb.view(), 1.0f, 1.0f);
  check_parity<float>("bf16 bias gradient into float", db, gdb, kBf16StatBudget);
  // The accumulated results are not bf16 values: nothing rounded them.
  const Tensor<float> got = gdw.result();
  std::int64_t not_bf16 = 0;
  for (std::int64_t i = 0; i < got.numel(); ++i)
    not_bf16 += float(bf16(got.data()[i])) != got.data()[i];
  CHECK(not_bf16 > got.numel() / 2);
}

/// The residual + LayerNorm forward and the LayerNorm backward, plain and joined to a residual
/// gradient, of M rows of N in bf16 storage, against the CPU's bf16 ops.
void check_bf16_layer_norm(std::int64_t M, std::int64_t N) {
  CAPTURE(N);
  constexpr double kBudget = kBf16OpBudget;
  const auto up = bf16_to_device;
  const auto out = bf16_output;
  const Tensor<bf16> x = random_bf16({M, N}), dy = random_bf16({M, N}), r = random_bf16({M, N});
  const Tensor<bf16> gamma = random_bf16({N}), beta = random_bf16({N});
  const Tensor<bf16, Cuda> gx = up(x), gdy = up(dy), gr = up(r), ggamma = up(gamma), gbeta = up(beta);
  Tensor<bf16> y({M, N}), sum({M, N});
  Tensor<float> mean({M}), rstd({M});
  Guarded<bf16> gy = out({M, N}), gsum = out({M, N});
  Guarded<float> gmean = float_output({M}), grstd = float_output({M});
  ops::add_layer_norm(x, r, gamma, beta, 1e-6, sum, y, mean, rstd);
  ops::add_layer_norm(gx, gr, ggamma, gbeta, 1e-6, gsum.view(), gy.view(), gmean.view(),
                      grstd.view());
  check_parity<bf16>("residual sum", sum, gsum, 0.0);  // one rounding of the same float sum
  check_parity<bf16>("layer_norm", y, gy, kBudget);
  check_parity<float>("layer_norm mean", mean, gmean, kBf16StatBudget);
  check_parity<float>("layer_norm rstd", rstd, grstd, kBf16StatBudget);
  // The parameter gradients are float and accumulate into what they hold.
  const Tensor<float> dg0 = random_tensor<float>({N}), db0 = random_tensor<float>({N});
  Tensor<bf16> dx({M, N});
  Tensor<float> dg = dg0.clone(), db = db0.clone();
  Guarded<bf16> gdx = out({M, N});
  Guarded<float> gdg(dg0), gdb(db0);
  const Tensor<float, Cuda> gmean_cpu = to_device<float>(mean), grstd_cpu = to_device<float>(rstd);
  const Tensor<bf16, Cuda> gs = up(sum);
  ops::layer_norm_backward(sum, gamma, mean, rstd, dy, dx, dg, db);
  ops::layer_norm_backward(gs, ggamma, gmean_cpu, grstd_cpu, gdy, gdx.view(), gdg.view(),
                           gdb.view());
  check_parity<bf16>("layer_norm dx", dx, gdx, kBudget);
  check_parity<float>("layer_norm dgamma", dg, gdg, kBf16StatBudget);
  check_parity<float>("layer_norm dbeta", db, gdb, kBf16StatBudget);
  // The fused form the ViT blocks run: dx = residual + the LayerNorm gradient, in place over dy.
  Tensor<bf16> dxr = dy.clone();
  Tensor<float> dgr = dg0.clone(), dbr = db0.clone();
  Guarded<bf16> gdxr(dy);
  Guarded<float> gdgr(dg0), gdbr(db0);
  ops::layer_norm_backward_add(TensorView<bf16>(sum), TensorView<bf16>(gamma),
                               TensorView<float>(mean), TensorView<float>(rstd),
                               TensorView<bf16>(dxr), TensorView<bf16>(r), TensorView<bf16>(dxr),
                               TensorView<float>(dgr), TensorView<float>(dbr));
  ops::layer_norm_backward_add(TensorView<bf16, Cuda>(gs), TensorView<bf16, Cuda>(ggamma),
                               TensorView<float, Cuda>(gmean_cpu),
                               TensorView<float, Cuda>(grstd_cpu), gdxr.view(),
                               TensorView<bf16, Cuda>(gr), gdxr.view(), gdgr.view(), gdbr.view());
  check_parity<bf16>("layer_norm_backward_add dx", dxr, gdxr, kBudget);
  check_parity<float>("layer_norm_backward_add dgamma", dgr, gdgr, kBf16StatBudget);
  check_parity<float>("layer_norm_backward_add dbeta", dbr, gdbr, kBf16StatBudget);
}

TEST_CASE("cuda parity: column sums over many rows, on 16-byte rows and element by element") {
  SKIP_WITHOUT_CUDA_DEVICE();
  // Every case on the chunked kernels (where the rows allow them), then all element by element
  // (Context::set_column_chunks(false), as moca_cuda_bench --column-chunks 0 times them).
  bool chunks = true;
  SUBCASE("chunked where the rows allow") { chunks = true; }
  SUBCASE("element by element") { chunks = false; }
  const ContextSwitch scope(&cuda::Context::set_column_chunks, chunks, true);
  // A Linear's bias gradient db += Σ_r dy and a LayerNorm's parameter gradients, at the ViT
  // step's row counts (the student's 128 · 89 rows, the teacher's 128 · 197) and widths: rows of
  // whole 16-byte chunks take the chunked kernels (64-row chunks, up to 256 of them), 770 and
  // the misaligned view the element-by-element ones. The float sums of the same products, in
  // other orders: measured against the sums of the terms' sizes.
  for (const auto& [M, N, offset] :
       {std::tuple<std::int64_t, std::int64_t, std::int64_t>{11392, 768, 0},
        {25216, 3072, 0},
        {65, 2304, 0},
        {1, 768, 0},
        {11392, 770, 0},
        {4000, 768, 1}}) {
    CAPTURE(M);
    CAPTURE(N);
    CAPTURE(offset);
    const Tensor<bf16> whole = random_bf16({M * N + offset});
    const Tensor<bf16, Cuda> g_whole = bf16_to_device(whole);
    const TensorView<bf16> dy(whole.data() + offset, {M, N});
    const TensorView<bf16, Cuda> gdy(g_whole.data() + offset, {M, N});
    const Tensor<float> db0 = random_tensor<float>({N});
    Tensor<float> db = db0.clone();
    Guarded<float> gdb(db0);
    ops::sum(dy, 0, TensorView<float>(db), 1.0f, 1.0f);
    ops::sum(gdy, 0, gdb.view(), 1.0f, 1.0f);
    const double scale = accumulation_scale(
        db0, M, N, [&](std::int64_t r, std::int64_t j) { return float(dy.data()[r * N + j]); });
    check_parity<float>("bias gradient", db, gdb, tolerance<float>(M), scale);
  }
  // The LayerNorm's two parameter gradients over 178 chunks (dx is check_bf16_layer_norm's).
  const std::int64_t M = 11392, N = 768;
  const Tensor<bf16> x = random_bf16({M, N}, -3.0, 5.0), dy = random_bf16({M, N});
  const Tensor<bf16> gamma = random_bf16({N}, 0.5, 1.5), beta = random_bf16({N});
  Tensor<bf16> y({M, N}), dx({M, N});
  Tensor<float> mean({M}), rstd({M});
  ops::layer_norm(x, gamma, beta, 1e-6, y, mean, rstd);
  const Tensor<float> dg0 = random_tensor<float>({N}), db0 = random_tensor<float>({N});
  Tensor<float> dg = dg0.clone(), db = db0.clone();
  Guarded<bf16> gdx = bf16_output({M, N});
  Guarded<float> gdg(dg0), gdb(db0);
  ops::layer_norm_backward(x, gamma, mean, rstd, dy, dx, dg, db);
  ops::layer_norm_backward(
      TensorView<bf16, Cuda>(bf16_to_device(x)), TensorView<bf16, Cuda>(bf16_to_device(gamma)),
      TensorView<float, Cuda>(to_device<float>(mean)),
      TensorView<float, Cuda>(to_device<float>(rstd)), TensorView<bf16, Cuda>(bf16_to_device(dy)),
      gdx.view(), gdg.view(), gdb.view());
  auto term_dy = [&](std::int64_t r, std::int64_t j) { return float(dy.data()[r * N + j]); };
  auto term_dg = [&](std::int64_t r, std::int64_t j) {
    return term_dy(r, j) * (float(x.data()[r * N + j]) - mean.data()[r]) * rstd.data()[r];
  };
  check_parity<float>("layer_norm dgamma", dg, gdg, tolerance<float>(M),
                      accumulation_scale(dg0, M, N, term_dg));
  check_parity<float>("layer_norm dbeta", db, gdb, tolerance<float>(M),
                      accumulation_scale(db0, M, N, term_dy));
  check_parity<bf16>("layer_norm dx", dx, gdx, kBf16OpBudget);
}
TEST_CASE("cuda parity: elementwise and row ops in bf16 storage against the CPU's bf16 ops") {
  SKIP_WITHOUT_CUDA_DEVICE();
  // kBf16OpBudget; every device output is guarded (check_parity also checks the guards).
  constexpr double kBudget = kBf16OpBudget;
  const auto up = bf16_to_device;
  const auto out = bf16_output;
  const std::int64_t M = 37, N = 257;
  const Tensor<bf16> x = random_bf16({M, N}), dy = random_bf16({M, N}), r = random_bf16({M, N});
  const Tensor<bf16> gamma = random_bf16({N}), beta = random_bf16({N});
  const Tensor<bf16, Cuda> gx = up(x), gdy = up(dy), gr = up(r), ggamma = up(gamma), gbeta = up(beta);
  for (const std::int64_t width : {N, std::int64_t(64), std::int64_t(384), std::int64_t(768)})
    check_bf16_layer_norm(M, width);  // 257: a block per row; the others: a warp per row
  {
    Tensor<bf16> p({M, N}), lp({M, N}), dp({M, N});
    Guarded<bf16> gp = out({M, N}), glp = out({M, N}), gdp = out({M, N});
    ops::softmax(x, p);
    ops::softmax(gx, gp.view());
    check_parity<bf16>("softmax", p, gp, kBudget);
    ops::log_softmax(x, lp);
    ops::log_softmax(gx, glp.view());
    check_parity<bf16>("log_softmax", lp, glp, kBudget);
    ops::softmax_backward(p, dy, dp);
    ops::softmax_backward(up(p), gdy, gdp.view());
    check_parity<bf16>("softmax backward", dp, gdp, kBudget);
  }
  {
    Tensor<bf16> g({M, N}), dg({M, N}), a = dy.clone(), l2({M, N});
    Tensor<float> nrm({M});
    Guarded<bf16> gg = out({M, N}), gdg = out({M, N}), ga(dy), gl2 = out({M, N});
    Guarded<float> gnrm = float_output({M});
    ops::gelu(x, g);
    ops::gelu(gx, gg.view());
    check_parity<bf16>("gelu", g, gg, kBudget);
    ops::gelu_backward(x, dy, dg);
    ops::gelu_backward(gx, gdy, gdg.view());
    check_parity<bf16>("gelu backward", dg, gdg, kBudget);
    ops::axpby(0.5f, x, -2.0f, a);
    ops::axpby(0.5f, gx, -2.0f, ga.view());
    // The float expression may contract into an FMA on one side.
    check_parity<bf16>("axpby", a, ga, kBudget);
    ops::l2_normalize(x, 1e-12, l2, nrm);
    ops::l2_normalize(gx, 1e-12, gl2.view(), gnrm.view());
    check_parity<bf16>("l2_normalize", l2, gl2, kBudget);
    check_parity<float>("l2_normalize norms", nrm, gnrm, kBf16StatBudget);
    Tensor<bf16> l1 = x.clone();
    Guarded<bf16> gl1(x);
    ops::l1_normalize(TensorView<bf16>(l1), 1e-5);
    ops::l1_normalize(gl1.view(), 1e-5);
    check_parity<bf16>("l1_normalize", l1, gl1, kBudget);
  }
  {
    // Reductions (column and row sums, row maxima) and data movement (gather, patchify).
    Tensor<bf16> cols({N}), rows({M}), mx({M}), picked({5, N});
    Guarded<bf16> gcols = out({N}), grows = out({M}), gmx = out({M}), gpicked = out({5, N});
    ops::sum(x, 0, cols);
    ops::sum(gx, 0, gcols.view());
    check_parity<bf16>("column sums", cols, gcols, kBudget);
    ops::sum(x, 1, rows);
    ops::sum(gx, 1, grows.view());
    check_parity<bf16>("row sums", rows, grows, kBudget);
    ops::row_max(x, mx);
    ops::row_max(gx, gmx.view());
    check_parity<bf16>("row_max", mx, gmx, 0.0);
    Tensor<Index> idx({5});
    for (int i = 0; i < 5; ++i) idx.data()[i] = static_cast<Index>((7 * i + 3) % M);
    const Tensor<Index, Cuda> gidx = idx.to<Cuda>();
    ops::gather_rows(x, idx, picked);
    ops::gather_rows(gx, TensorView<Index, Cuda>(gidx), gpicked.view());
    check_parity<bf16>("gather_rows", picked, gpicked, 0.0);
    const Tensor<bf16> img = random_bf16({2, 3, 8, 8});
    Tensor<bf16> patches({2, 16, 12});
    Guarded<bf16> gpatches = out({2, 16, 12});
    ops::patchify(img, 2, patches);
    ops::patchify(up(img), 2, gpatches.view());
    check_parity<bf16>("patchify", patches, gpatches, 0.0);
  }
}

TEST_CASE("cuda parity: soft-target loss, BatchNorm and scatter-add in bf16 storage") {
  SKIP_WITHOUT_CUDA_DEVICE();
  // As the elementwise and row ops above: float arithmetic on both sides, one rounding of what
  // is stored, sums in other orders; normwise within one bf16 rounding (2^-8), guards intact.
  constexpr double kBudget = 1.0 / 256;
  {
    // The codebook loss: 37 rows against 4096 words, gathered targets, KL, dz over z.
    const std::int64_t M = 37, K = 4096, R = 50;
    const Tensor<bf16> z = random_bf16({M, K}, -6.0, 6.0);
    Tensor<float> t32 = random_tensor<float>({R, K}, -0.5, 1.0);
    for (std::int64_t r = 0; r < R; ++r) {
      float* row = t32.data() + r * K;
      float total = 0;
      for (std::int64_t k = 0; k < K; ++k) total += (row[k] = std::max(row[k], 0.0f));
      for (std::int64_t k = 0; k < K; ++k) row[k] /= total;
    }
    Tensor<bf16> table({R, K});
    ops::convert(TensorView<float>(t32), TensorView<bf16>(table));
    Tensor<Index> rows({M});
    for (std::int64_t r = 0; r < M; ++r) rows.data()[r] = static_cast<Index>((7 * r + 2) % R);
    const Tensor<Index, Cuda> g_rows = rows.to<Cuda>();
    const TensorView<Index> rows_view = rows;
    const TensorView<Index, Cuda> g_rows_view = g_rows;
    const Tensor<bf16, Cuda> g_table = bf16_to_device(table);
    ops::SoftTargetWorkspace<bf16, Cpu> ws;
    ops::SoftTargetWorkspace<bf16, Cuda> g_ws;
    for (bool entropy : {false, true}) {
      CAPTURE(entropy);
      Tensor<bf16> dz = z.clone();
      Guarded<bf16> gdz(z);
      const double expected = ops::soft_target_loss(TensorView<bf16>(dz), table, &rows_view,
                                                    entropy, 0.37, TensorView<bf16>(dz), ws);
      const double got = ops::soft_target_loss(gdz.view(), g_table, &g_rows_view, entropy, 0.37,
                                               gdz.view(), g_ws);
      INFO("loss cpu ", expected, " cuda ", got);
      // The loss is summed in float (per row) and double: far inside one bf16 rounding.
      CHECK(std::abs(got - expected) <= 1e-5 * std::abs(expected));
      check_parity<bf16>("soft_target_loss dz over z", dz, gdz, kBudget);
    }
  }
  {
    // The prototype generator's BatchNorm: 64 samples of 256 features, away from zero mean.
    const std::int64_t M = 64, N = 256;
    const Tensor<bf16> x = random_bf16({M, N}, -2.0, 4.0), dy = random_bf16({M, N});
    const Tensor<bf16> gamma = random_bf16({N}, 0.5, 1.5), beta = random_bf16({N});
    Tensor<bf16> y({M, N});
    Tensor<float> mean({N}), var({N});
    Guarded<bf16> gy = bf16_output({M, N});
    Guarded<float> gmean = float_output({N}), gvar = float_output({N});
    const Tensor<bf16, Cuda> gx = bf16_to_device(x), g_gamma = bf16_to_device(gamma),
                             g_beta = bf16_to_device(beta);
    ops::batch_norm(x, gamma, beta, 1e-5, y, mean, var);
    ops::batch_norm(gx, g_gamma, g_beta, 1e-5, gy.view(), gmean.view(), gvar.view());
    check_parity<bf16>("batch_norm y", y, gy, kBudget);
    check_parity<float>("batch_norm mean", mean, gmean, kBf16StatBudget);
    check_parity<float>("batch_norm var", var, gvar, kBf16StatBudget);
    // Backward from the CPU's statistics; dgamma and dbeta accumulate into what they hold.
    const Tensor<float> dgamma0 = random_tensor<float>({N}), dbeta0 = random_tensor<float>({N});
    Tensor<bf16> dx({M, N});
    Tensor<float> dgamma = dgamma0.clone(), dbeta = dbeta0.clone();
    Guarded<bf16> gdx = bf16_output({M, N});
    Guarded<float> g_dgamma(dgamma0), g_dbeta(dbeta0);
    ops::batch_norm_backward(x, gamma, mean, var, 1e-5, dy, dx, dgamma, dbeta);
    ops::batch_norm_backward(gx, g_gamma, to_device<float>(mean), to_device<float>(var), 1e-5,
                             bf16_to_device(dy), gdx.view(), g_dgamma.view(), g_dbeta.view());
    check_parity<bf16>("batch_norm dx", dx, gdx, kBudget);
    check_parity<float>("batch_norm dgamma", dgamma, g_dgamma, kBf16StatBudget);
    check_parity<float>("batch_norm dbeta", dbeta, g_dbeta, kBf16StatBudget);
  }
  {
    // Scatter-add with repeated indices (the atomic bf16 addition): each of the 17 rows gets
    // two or three additions in some order, each rounded once.
    const std::int64_t R = 17, M = 40, C = 33;
    Tensor<Index> idx({M});
    for (std::int64_t i = 0; i < M; ++i) idx(i) = static_cast<Index>((i * 7 + 3) % R);
    const Tensor<bf16> src = random_bf16({M, C}), acc0 = random_bf16({R, C});
    Tensor<bf16> acc = acc0.clone();
    Guarded<bf16> g_acc(acc0);
    ops::scatter_add_rows(src, idx, acc);
    ops::scatter_add_rows(bf16_to_device(src), idx.to<Cuda>(), g_acc.view());
    check_parity<bf16>("scatter_add_rows", acc, g_acc, kBudget);
  }
}

/// The fused attention of bf16 heads [B, S, H, hd] at the launch the context picks, against the
/// CPU's float attention of the same bf16 values.
void check_bf16_attention(std::int64_t B, std::int64_t S, std::int64_t H, std::int64_t hd) {
  // bf16 q, k, v and do on the tensor cores' bf16 products, float scores, softmax, lse and δ,
  // p and dS rounded to bf16 for the products that read them, ctx and dqkv rounded once:
  // against the CPU's float attention of the same (bf16) values, the budget of the host run of
  // these programs (tests/flash_attention_test.cpp, kBf16Budget: 5e-3, worst there 3.3e-3),
  // normwise. The lse buffer is [B, H, 2·S] bf16 elements: S floats per row.
  const std::int64_t dim = H * hd;
  CAPTURE(S);
  CAPTURE(hd);
  const Tensor<bf16> qkv = random_bf16({B, S, 3 * dim}, -2.0, 2.0);
  const Tensor<bf16> dctx = random_bf16({B, S, dim});
  Tensor<float> qkv32({B, S, 3 * dim}), dctx32({B, S, dim});
  ops::convert(TensorView<bf16>(qkv), TensorView<float>(qkv32));
  ops::convert(TensorView<bf16>(dctx), TensorView<float>(dctx32));
  // The layer's scale is a bf16 (1/√8 rounds; 1/√64 is exact): both sides use the rounded one.
  const bf16 scale_h(1.0f / std::sqrt(float(hd)));
  const float scale = scale_h;
  Tensor<float> probs({B, H, S, S}), ctx({B, S, dim}), dprobs({B, H, S, S}),
      dqkv({B, S, 3 * dim});
  ops::attention_forward(qkv32, H, scale, probs, ctx);
  ops::attention_backward(qkv32, probs, ctx, dctx32, H, scale, dprobs, dqkv);

  REQUIRE(ops::attention_saved_shape<bf16, Cuda>(B, H, S) == Shape({B, H, 2 * S}));
  const Tensor<bf16, Cuda> gqkv = bf16_to_device(qkv), gdctx = bf16_to_device(dctx);
  Guarded<bf16> glse = bf16_output({B, H, 2 * S}), gctx = bf16_output({B, S, dim}),
                gwork = bf16_output({B, H, 2 * S}), gdqkv = bf16_output({B, S, 3 * dim});
  ops::attention_forward(gqkv, H, scale_h, glse.view(), gctx.view());
  ops::attention_backward(gqkv, glse.view(), gctx.view(), gdctx, H, scale_h, gwork.view(),
                          gdqkv.view());
  Tensor<bf16> ctx_h({B, S, dim}), dqkv_h({B, S, 3 * dim});
  ops::convert(TensorView<float>(ctx), TensorView<bf16>(ctx_h));
  ops::convert(TensorView<float>(dqkv), TensorView<bf16>(dqkv_h));
  check_parity<bf16>("bf16 attention ctx", ctx_h, gctx, 5e-3);
  check_parity<bf16>("bf16 attention dqkv", dqkv_h, gdqkv, 5e-3);
  CHECK(gwork.guards_intact());
  // The saved lse: S floats per (image, head), the float log-sum-exp of the scores.
  const Tensor<bf16> lse_raw = glse.result();
  std::vector<float> lse(static_cast<std::size_t>(B * H * S));
  std::memcpy(lse.data(), lse_raw.data(), lse.size() * sizeof(float));
  const std::vector<double> lse_ref =
      attention_reference::log_sum_exp_rows(qkv32.data(), B, H, S, hd, double(scale));
  double worst = 0;
  for (std::size_t i = 0; i < lse.size(); ++i)
    worst = std::max(worst, std::abs(double(lse[i]) - lse_ref[i]) / std::abs(lse_ref[i]));
  CHECK(worst < 3e-3);
  CHECK(glse.guards_intact());
}

TEST_CASE("cuda parity: fused attention in bf16 storage against the float attention") {
  SKIP_WITHOUT_CUDA_DEVICE();
  // The register-fragment kernels take all but the last (80 features: the block programs); the
  // second has three 64-row tiles, so every pass double-buffers.
  const std::int64_t shapes[][4] = {
      {2, 17, 3, 8}, {1, 130, 2, 64}, {3, 197, 12, 64}, {1, 33, 1, 80}};
  for (const auto& [B, S, H, hd] : shapes) {
    // One subcase per shape, named as in the float test, for racecheck's small ones.
    const std::string label = detail::str("B=", B, " S=", S, " H=", H, " hd=", hd);
    SUBCASE(label.c_str()) { check_bf16_attention(B, S, H, hd); }
  }
}

TEST_CASE("cuda parity: bf16 attention on register fragments at every head width they take") {
  SKIP_WITHOUT_CUDA_DEVICE();
  // bf16 heads of up to 64 features (multiples of 8) run on kernels/flash_mma.cuh: every width
  // each of their four instantiations takes (16·NK − 8 pads its last 16-feature step), against
  // the CPU's float attention at the budget of the block programs; token counts that end a
  // 64-row tile with 1, 15, 16 and 63 rows, exactly fill one or three, and ViT's 197 (whole
  // warps past the last row, 16-row steps past the last key). Each shape launches the three
  // passes there, and none of the block programs' settings is needed for it.
  cuda::Context& context = cuda::Context::get();
  REQUIRE(context.flash_mma());
  for (const std::int64_t hd : {8, 16, 24, 32, 40, 48, 56, 64})
    for (const std::int64_t S : {1, 15, 16, 64, 65, 127, 192, 197}) {
      const std::uint64_t before = context.flash_mma_launches();
      check_bf16_attention(2, S, 3, hd);
      CHECK(context.flash_mma_launches() == before + 3);
    }
  // Widths they do not take run on the block programs, as does every head when the context
  // asks for them.
  const std::uint64_t before = context.flash_mma_launches();
  check_bf16_attention(2, 33, 2, 80);
  check_bf16_attention(1, 40, 2, 12);
  context.set_flash_mma(false);
  check_bf16_attention(2, 197, 3, 64);
  context.set_flash_mma(true);
  CHECK(context.flash_mma_launches() == before);
}

namespace {

/// Whether every pass of the fused attention fits the device's shared memory at this fixed tile
/// for heads of width hd stored as T (the launcher refuses a fixed tile that does not).
template <class T>
bool flash_tile_fits(int tile, std::int64_t hd) {
  const cuda::flash::Geometry g = cuda::flash::make_geometry<T>(tile, static_cast<int>(hd));
  const std::size_t limit = cuda::Context::get().max_shared_per_block();
  for (const auto p : {cuda::flash::Program::Forward, cuda::flash::Program::Dq,
                       cuda::flash::Program::Dkdv})
    if (cuda::flash::shared_bytes(p, g) > limit) return false;
  return true;
}

}  // namespace

TEST_CASE("cuda parity: fused attention at every tile and block size, and sizes that are not") {
  SKIP_WITHOUT_CUDA_DEVICE();
  // The launcher picks one tile per head width and four warps; every tile the programs support,
  // on four and eight warps, runs here on the device for float and bf16 heads (the host run of
  // tests/flash_attention_test.cpp covers every tile with one serial thread): ragged ends of
  // each, ViT's 197 tokens, a 128-wide head.
  const std::int64_t shapes[][4] = {{2, 17, 3, 8}, {2, 197, 3, 64}, {1, 48, 1, 128}};
  for (const auto& [tile, threads] : {std::pair{64, 128}, {32, 128}, {16, 128}, {64, 256},
                                      {32, 256}, {16, 256}}) {
    const FlashLaunchScope scope(tile, threads);
    CHECK(cuda::Context::get().flash_tile() == tile);
    CHECK(cuda::Context::get().flash_threads() == threads);
    for (const auto& shape : shapes) {
      const std::int64_t B = shape[0], S = shape[1], H = shape[2], hd = shape[3], dim = H * hd;
      CAPTURE(tile);
      CAPTURE(threads);
      CAPTURE(S);
      CAPTURE(hd);
      const float scale = 1.0f / std::sqrt(float(hd));
      const Tensor<float> qkv = random_tensor<float>({B, S, 3 * dim}, -2.0, 2.0);
      const Tensor<float> dctx = random_tensor<float>({B, S, dim});
      Tensor<float> probs({B, H, S, S}), ctx({B, S, dim}), dprobs({B, H, S, S}),
          dqkv({B, S, 3 * dim});
      ops::attention_forward(qkv, H, scale, probs, ctx);
      ops::attention_backward(qkv, probs, ctx, dctx, H, scale, dprobs, dqkv);
      const Tensor<float, Cuda> gqkv = to_device<float>(qkv), gdctx = to_device<float>(dctx);
      Tensor<float, Cuda> glse({B, H, S}), gwork({B, H, S});
      Guarded<float> gctx(nan_tensor<float>({B, S, dim})), gdqkv(nan_tensor<float>({B, S, 3 * dim}));
      const auto run = [&] {
        ops::attention_forward(gqkv, H, scale, glse, gctx.view());
        ops::attention_backward(gqkv, glse, gctx.view(), gdctx, H, scale, gwork, gdqkv.view());
      };
      if (flash_tile_fits<float>(tile, hd)) {
        run();
        check_parity<float>("attention ctx", ctx, gctx, tolerance<float>(S * hd));
        check_parity<float>("attention dqkv", dqkv, gdqkv, tolerance<float>(4 * S * hd));
      } else {  // e.g. float dk/dv at 64-row tiles of 128-wide heads: a clear refusal
        CHECK_THROWS_WITH_AS(run(), doctest::Contains("bytes of shared memory per block"), Error);
      }
      // bf16 heads: their own shared-memory layout.
      if (flash_tile_fits<bf16>(tile, hd)) check_bf16_attention(B, S, H, hd);
    }
  }
  CHECK(cuda::Context::get().flash_tile() == 0);
  CHECK(cuda::Context::get().flash_threads() == 128);
  CHECK_THROWS_WITH_AS(cuda::Context::get().set_flash_tile(48),
                       doctest::Contains("must be 0 (automatic), 16, 32 or 64, got 48"), Error);
  CHECK_THROWS_WITH_AS(cuda::Context::get().set_flash_threads(192),
                       doctest::Contains("must be 0 (the default, 128), 128 or 256, got 192"),
                       Error);
}

// ---- the same layer code on both devices ---------------------------------------------------------

namespace {

// A pre-norm MLP block with a softmax head, written once against ops/ for any device:
// y = softmax(gelu(layer_norm(x) · W1ᵀ + b1) · W2ᵀ).
template <class T, class D>
void tiny_block(const TensorView<T, D>& x, const TensorView<T, D>& w1, const TensorView<T, D>& b1,
                const TensorView<T, D>& w2, const TensorView<T, D>& h, const TensorView<T, D>& z,
                const TensorView<T, D>& mean, const TensorView<T, D>& rstd,
                const TensorView<T, D>& y) {
  ops::layer_norm(x, TensorView<T, D>(), TensorView<T, D>(), 1e-5, h, mean, rstd);
  ops::gemm(h, Trans::N, w1, Trans::T, z);
  ops::add_bias(z, b1);
  ops::gelu(z, z);
  ops::gemm(z, Trans::N, w2, Trans::T, y);
  ops::softmax(y, y);
}

}  // namespace

TEST_CASE_TEMPLATE("cuda parity: a block written once against ops/ runs on both devices", T,
                   float, double) {
  SKIP_WITHOUT_CUDA_DEVICE();
  const std::int64_t tokens = 65, dim = 48, hidden = 96, classes = 10;
  const Tensor<T> x = random_tensor<T>({tokens, dim}, -2.0, 2.0);
  const Tensor<T> w1 = random_tensor<T>({hidden, dim}, -0.2, 0.2);
  const Tensor<T> b1 = random_tensor<T>({hidden}, -0.1, 0.1);
  const Tensor<T> w2 = random_tensor<T>({classes, hidden}, -0.2, 0.2);

  Tensor<T> h({tokens, dim}), z({tokens, hidden}), mean({tokens}), rstd({tokens}),
      y({tokens, classes});
  tiny_block<T, Cpu>(x, w1, b1, w2, h, z, mean, rstd, y);

  const Tensor<T, Cuda> gx = to_device<T>(x), gw1 = to_device<T>(w1), gb1 = to_device<T>(b1), gw2 = to_device<T>(w2);
  Tensor<T, Cuda> gh({tokens, dim}), gz({tokens, hidden}), gmean({tokens}), grstd({tokens}),
      gy({tokens, classes});
  tiny_block<T, Cuda>(gx, gw1, gb1, gw2, gh, gz, gmean, grstd, gy);
  const Tensor<T> got = to_host(TensorView<T, Cuda>(gy));
  // Five ops in a row: allow the rounding differences of each to add up.
  const double err = relative_error(TensorView<T>(y), TensorView<T>(got));
  INFO("relative error ", err);
  CHECK(err <= 5 * tolerance<T>(hidden));
}

// ---- fused attention -------------------------------------------------------------------------

TEST_CASE_TEMPLATE("cuda parity: fused attention forward and backward against the CPU", T, float,
                   double) {
  SKIP_WITHOUT_CUDA_DEVICE();
  // The CUDA forward keeps the rows' log-sum-exp [B, H, S] and the backward recomputes the
  // probabilities; ctx and dqkv must match the CPU's (which keeps the probabilities), lse the
  // double reference. Shapes: ragged ends of every tile (16, 32, 64), one token, head widths
  // that are not multiples of 16, 128-wide heads, ViT-B's 12 heads at 197 tokens.
  const std::int64_t shapes[][4] = {{2, 17, 3, 8},  {1, 65, 2, 16}, {2, 30, 3, 64},
                                    {3, 197, 12, 64}, {1, 5, 1, 4}, {2, 1, 2, 24},
                                    {1, 33, 1, 80}, {1, 48, 1, 128}, {2, 257, 2, 64}};
  for (const auto& shape : shapes) {
    const std::int64_t B = shape[0], S = shape[1], H = shape[2], hd = shape[3], dim = H * hd;
    // One subcase per shape, "B=2 S=17 H=3 hd=8", so that a slow tool (racecheck) can run a few.
    const std::string label = detail::str("B=", B, " S=", S, " H=", H, " hd=", hd);
    SUBCASE(label.c_str()) {
      const T scale = T(1) / std::sqrt(T(hd));
      const Tensor<T> qkv = random_tensor<T>({B, S, 3 * dim}, -2.0, 2.0);
      const Tensor<T> dctx = random_tensor<T>({B, S, dim});
      Tensor<T> probs({B, H, S, S}), ctx({B, S, dim}), dprobs({B, H, S, S}), dqkv({B, S, 3 * dim});
      ops::attention_forward(qkv, H, scale, probs, ctx);
      ops::attention_backward(qkv, probs, ctx, dctx, H, scale, dprobs, dqkv);
      const std::vector<double> lse_ref =
          attention_reference::log_sum_exp_rows(qkv.data(), B, H, S, hd, double(scale));
      Tensor<T> lse_expected({B, H, S});
      std::transform(lse_ref.begin(), lse_ref.end(), lse_expected.data(),
                     [](double v) { return static_cast<T>(v); });

      REQUIRE(ops::attention_saved_shape<T, Cuda>(B, H, S) == Shape({B, H, S}));
      const Tensor<T, Cuda> gqkv = to_device<T>(qkv), gdctx = to_device<T>(dctx);
      Guarded<T> glse(nan_tensor<T>({B, H, S})), gctx(nan_tensor<T>({B, S, dim}));
      ops::attention_forward(gqkv, H, scale, glse.view(), gctx.view());
      check_parity<T>("attention ctx", ctx, gctx, tolerance<T>(S * hd));
      check_parity<T>("attention lse", lse_expected, glse, tolerance<T>(S * hd));

      Guarded<T> gwork(nan_tensor<T>({B, H, S})), gdqkv(nan_tensor<T>({B, S, 3 * dim}));
      ops::attention_backward(gqkv, glse.view(), gctx.view(), gdctx, H, scale, gwork.view(),
                              gdqkv.view());
      check_parity<T>("attention dqkv", dqkv, gdqkv, tolerance<T>(4 * S * hd));
      CHECK(gwork.guards_intact());

      if constexpr (std::is_same_v<T, float>) {
        // Tensor cores (TF32 operands) in the tf32 and bf16 modes: within the budget the host run
        // of the same programs holds them to (tests/flash_attention_test.cpp), and not exact.
        const FloatMatmulScope scope(cuda::FloatMatmul::Bf16);
        Guarded<T> tctx(nan_tensor<T>({B, S, dim})), tdqkv(nan_tensor<T>({B, S, 3 * dim}));
        ops::attention_forward(gqkv, H, scale, glse.view(), tctx.view());
        ops::attention_backward(gqkv, glse.view(), tctx.view(), gdctx, H, scale, gwork.view(),
                                tdqkv.view());
        for (const auto& [what, expected, got] :
             {std::tuple<const char*, const Tensor<T>*, const Guarded<T>*>{"tf32 ctx", &ctx, &tctx},
              {"tf32 dqkv", &dqkv, &tdqkv}}) {
          const Tensor<T> result = got->result();
          const double err = relative_error(TensorView<T>(*expected), TensorView<T>(result));
          INFO(what, ": relative error ", err);
          CHECK(err < 3e-3);
          CHECK(err > 1e-6);
          CHECK(got->guards_intact());
        }
      }
    }
  }
}

TEST_CASE("cuda: fused attention names a buffer of the wrong shape") {
  SKIP_WITHOUT_CUDA_DEVICE();
  // 3 heads of width 4: qkv [2, 5, 3·12], ctx [2, 5, 12].
  Tensor<float, Cuda> qkv({2, 5, 36}), probs({2, 3, 5, 5}), lse({2, 3, 5}), ctx({2, 5, 12});
  try {
    ops::attention_forward(qkv, 3, 0.5f, probs, ctx);  // the CPU's [B, H, S, S] buffer
    FAIL("no error for a probabilities-shaped buffer");
  } catch (const Error& e) {
    const std::string msg = e.what();
    CHECK(msg.find("attention") != std::string::npos);
    CHECK(msg.find("[2, 3, 5]") != std::string::npos);
  }
  CHECK_NOTHROW(ops::attention_forward(qkv, 3, 0.5f, lse, ctx));
}

TEST_CASE("cuda: the profiler times scopes on the stream, charging each its own device time") {
  SKIP_WITHOUT_CUDA_DEVICE();
  // Eight 2048³ float products (about 140 GFLOP) inside "gemm", nested in "outer", which queues
  // nothing of its own: the products' device time goes to "gemm", and "outer" keeps only the
  // instants between its marks and the inner ones. Nothing waits until the report.
  const std::int64_t n = 2048;
  Tensor<float, Cuda> a({n, n}), b({n, n}), c({n, n});
  cuda::EventTimeline timeline;
  profiler::reset();
  profiler::set_timeline(&timeline);
  profiler::enable();
  const auto t0 = std::chrono::steady_clock::now();
  {
    MOCA_PROFILE_SCOPE("outer");
    MOCA_PROFILE_SCOPE("gemm");
    for (int i = 0; i < 8; ++i) ops::gemm(a, Trans::N, b, Trans::N, c);
  }
  profiler::enable(false);
  const double queued =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const auto report = profiler::report();
  cuda::synchronize();
  const double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  profiler::set_timeline(nullptr);
  double gemm = -1, outer = -1;
  for (const auto& e : report) {
    if (std::string(e.name) == "gemm") gemm = e.seconds;
    if (std::string(e.name) == "outer") outer = e.seconds;
  }
  INFO("gemm ", gemm, " s, outer ", outer, " s; queued in ", queued, " s, done in ", total, " s");
  CHECK(gemm > 0);
  CHECK(gemm <= total);
  CHECK(outer >= 0);
  CHECK(outer < 0.1 * gemm);
  profiler::reset();
}
