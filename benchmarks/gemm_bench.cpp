// GEMM throughput at the shapes of one ViT training step (tiny preset: D = 192, 3 heads of 64,
// MLP 768, batch 128 × 64 patches + cls = 8192 token rows, rounded), in float and bf16 on the CPU.
//
// A Linear y[M,N] = x[M,K] · w[N,K]ᵀ runs three GEMMs per step:
//   fwd   y  = x · wᵀ      (N·T)
//   dx    dx = dy · w      (N·N)
//   dw    dw = dyᵀ · x     (T·N, summed over the M token rows)
// Attention runs batched 65×65 products per image and head.
//
// Threads come from OpenMP (OMP_NUM_THREADS); the "threads" counter records how many were used.
// Run: build/benchmarks/gemm_bench --benchmark_min_time=0.2
#include <benchmark/benchmark.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#include <cmath>
#include <cstdint>
#include <moca/core/random.hpp>
#include <moca/moca.hpp>
#include <string>

namespace {

using moca::Tensor;
using moca::Trans;

void set_counters(benchmark::State& state, double flops_per_iteration) {
  // FLOP per second, printed with an SI prefix (e.g. 52.1G/s = 52.1 GFLOP/s).
  state.counters["flops"] = benchmark::Counter(flops_per_iteration,
                                               benchmark::Counter::kIsIterationInvariantRate,
                                               benchmark::Counter::kIs1000);
  state.counters["threads"] = moca::cpu::max_threads();
}

template <class T = float>
Tensor<T> random_tensor(moca::Shape shape, std::uint64_t stream) {
  Tensor<T> t(shape);
  moca::fill_uniform(t, moca::Philox(1234), stream, -1.0, 1.0);
  return t;
}

enum class Form { Fwd, Dx, Dw, NN };

// Linear with M token rows, K input and N output features; `form` picks which product runs.
// T = bf16 multiplies bf16 operands into a bf16 result (float sums, one rounding).
template <class T>
void linear_product(benchmark::State& state, Form form) {
  const std::int64_t M = state.range(0), K = state.range(1), N = state.range(2);
  Tensor<T> x = random_tensor<T>({M, K}, 1), w = random_tensor<T>({N, K}, 2);
  Tensor<T> y = random_tensor<T>({M, N}, 3);
  for (auto _ : state) {
    switch (form) {
      case Form::Fwd: moca::ops::gemm(x, Trans::N, w, Trans::T, y); break;
      case Form::Dx: moca::ops::gemm(y, Trans::N, w, Trans::N, x); break;
      case Form::Dw: moca::ops::gemm(y, Trans::T, x, Trans::N, w); break;
      case Form::NN: moca::ops::gemm(x, Trans::N, w.reshape({K, N}), Trans::N, y); break;
    }
    benchmark::ClobberMemory();
  }
  set_counters(state, 2.0 * double(M) * double(N) * double(K));
}

void BM_linear(benchmark::State& state, Form form) { linear_product<float>(state, form); }
void BM_linear_bf16(benchmark::State& state, Form form) { linear_product<moca::bf16>(state, form); }

// The ViT step's Linear shapes as {M, K, N}.
void vit_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"M", "K", "N"});
  b->Args({8192, 192, 576});  // qkv
  b->Args({8192, 192, 192});  // proj
  b->Args({8192, 192, 768});  // fc1
  b->Args({8192, 768, 192});  // fc2
}

BENCHMARK_CAPTURE(BM_linear, fwd, Form::Fwd)
    ->Apply(vit_shapes)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_linear, dx, Form::Dx)
    ->Apply(vit_shapes)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_linear, dw, Form::Dw)
    ->Apply(vit_shapes)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_linear_bf16, bf16_fwd, Form::Fwd)
    ->Apply(vit_shapes)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_linear_bf16, bf16_dx, Form::Dx)
    ->Apply(vit_shapes)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_linear_bf16, bf16_dw, Form::Dw)
    ->Apply(vit_shapes)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_linear, square_nn, Form::NN)
    ->ArgNames({"M", "K", "N"})->Args({1024, 1024, 1024})
    ->UseRealTime()->Unit(benchmark::kMillisecond);

// Attention per (image, head): scores S = Q · Kᵀ ([T,hd]·[T,hd]ᵀ) and output O = P · V
// ([T,T]·[T,hd]), T = 65 tokens, hd = 64, batch = 128 images × 3 heads.
void BM_attention(benchmark::State& state, bool scores) {
  const std::int64_t B = state.range(0), T = state.range(1), hd = state.range(2);
  Tensor<float> q = random_tensor({B, T, hd}, 4), k = random_tensor({B, T, hd}, 5);
  Tensor<float> s = random_tensor({B, T, T}, 6);
  for (auto _ : state) {
    if (scores) {
      moca::ops::gemm_batched(q, Trans::N, k, Trans::T, s);
    } else {
      moca::ops::gemm_batched(s, Trans::N, k, Trans::N, q);
    }
    benchmark::ClobberMemory();
  }
  set_counters(state, 2.0 * double(B) * double(T) * double(T) * double(hd));
}

BENCHMARK_CAPTURE(BM_attention, qk, true)
    ->ArgNames({"batch", "T", "hd"})->Args({128 * 3, 65, 64})
    ->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_attention, pv, false)
    ->ArgNames({"batch", "T", "hd"})->Args({128 * 3, 65, 64})
    ->UseRealTime()->Unit(benchmark::kMillisecond);

// The attention core op as layers run it, forward and backward, on a [B, S, 3·dim] qkv buffer,
// at the tiny preset's MOCA step shapes: the teacher's 65 tokens (one view of 128 images), the
// student's 29 and 17 (both views, 3 heads of 64), the decoder's 42 (4 heads of 32); and
// ViT-S/16's 197 tokens (6 heads of 64). T = bf16 is Moca<bf16>'s attention: bf16 qkv, P, ctx
// and gradients.
template <class T>
void BM_attention_core(benchmark::State& state) {
  const std::int64_t B = state.range(0), S = state.range(1), H = state.range(2),
                     hd = state.range(3), dim = H * hd;
  Tensor<T> qkv = random_tensor<T>({B, S, 3 * dim}, 7), dctx = random_tensor<T>({B, S, dim}, 8);
  Tensor<T> probs({B, H, S, S}), ctx({B, S, dim}), dprobs({B, H, S, S}), dqkv({B, S, 3 * dim});
  const T scale = T(1.0f / std::sqrt(float(hd)));
  for (auto _ : state) {
    moca::ops::attention_forward(qkv, H, scale, probs, ctx);
    moca::ops::attention_backward(qkv, probs, ctx, dctx, H, scale, dprobs, dqkv);
    benchmark::ClobberMemory();
  }
  // Six products of 2·S·S·hd FLOP per (image, head): two forward, four backward.
  set_counters(state, 6.0 * 2.0 * double(B * H) * double(S * S) * double(hd));
}

#define MOCA_ATTENTION_SHAPES(T)                          \
  BENCHMARK_TEMPLATE(BM_attention_core, T)                \
      ->ArgNames({"B", "S", "H", "hd"})                   \
      ->Args({128, 65, 3, 64})                            \
      ->Args({256, 29, 3, 64})                            \
      ->Args({256, 17, 3, 64})                            \
      ->Args({256, 42, 4, 32})                            \
      ->Args({16, 197, 6, 64})                            \
      ->UseRealTime()                                     \
      ->Unit(benchmark::kMillisecond)
MOCA_ATTENTION_SHAPES(float);
MOCA_ATTENTION_SHAPES(moca::bf16);

// GELU forward and backward over the tiny preset's fc1 output (8192 token rows × 768); bf16
// looks both up by table. Elements per second in "elements".
template <class T>
void BM_gelu(benchmark::State& state) {
  const std::int64_t n = state.range(0);
  Tensor<T> x = random_tensor<T>({n}, 9), dy = random_tensor<T>({n}, 10), y({n});
  for (auto _ : state) {
    moca::ops::gelu(x, y);
    moca::ops::gelu_backward(x, dy, y);
    benchmark::ClobberMemory();
  }
  state.counters["elements"] = benchmark::Counter(2.0 * double(n),
                                                  benchmark::Counter::kIsIterationInvariantRate,
                                                  benchmark::Counter::kIs1000);
}
BENCHMARK_TEMPLATE(BM_gelu, float)->Arg(8192 * 768)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_gelu, moca::bf16)
    ->Arg(8192 * 768)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

#if defined(__AVX2__) && defined(__FMA__)
// The FMA peak of the cores: every thread runs 10 independent chains of fused multiply-adds as
// wide as the packed GEMM's (16 lanes with AVX-512, 8 otherwise), enough to cover the FMA latency
// on two pipes, and nothing else. The MFU figures of docs/performance.md divide by this.
void BM_fma_peak(benchmark::State& state) {
  constexpr std::int64_t kIterations = 20'000'000;
  int threads = 1;
  for (auto _ : state) {
    float sink = 0;
#pragma omp parallel reduction(+ : sink)
    {
#ifdef _OPENMP
#pragma omp single
      threads = omp_get_num_threads();
#endif
      // Distinct starting values: identical chains could be merged into one by the compiler.
      // The widest vectors the packed GEMM uses: zmm with AVX-512, ymm otherwise.
#ifdef MOCA_CPU_SGEMM_AVX512
      __m512 a[10];
      for (int j = 0; j < 10; ++j) a[j] = _mm512_set1_ps(1.0f + 0.01f * static_cast<float>(j));
      const __m512 m = _mm512_set1_ps(0.9999999f), c = _mm512_set1_ps(1e-7f);
      for (std::int64_t i = 0; i < kIterations; ++i)
        for (auto& v : a) v = _mm512_fmadd_ps(v, m, c);
      __m512 s = a[0];
      for (int j = 1; j < 10; ++j) s = _mm512_add_ps(s, a[j]);
      sink += _mm512_cvtss_f32(s);
#else
      __m256 a[10];
      for (int j = 0; j < 10; ++j) a[j] = _mm256_set1_ps(1.0f + 0.01f * static_cast<float>(j));
      const __m256 m = _mm256_set1_ps(0.9999999f), c = _mm256_set1_ps(1e-7f);
      for (std::int64_t i = 0; i < kIterations; ++i)
        for (auto& v : a) v = _mm256_fmadd_ps(v, m, c);
      __m256 s = a[0];
      for (int j = 1; j < 10; ++j) s = _mm256_add_ps(s, a[j]);
      sink += _mm256_cvtss_f32(s);
#endif
    }
    benchmark::DoNotOptimize(sink);
  }
  // 10 chains × (16 or 8) lanes × 2 FLOP per FMA, per thread.
#ifdef MOCA_CPU_SGEMM_AVX512
  constexpr double kLanes = 16;
#else
  constexpr double kLanes = 8;
#endif
  state.counters["flops"] = benchmark::Counter(20.0 * kLanes * double(kIterations) * threads,
                                               benchmark::Counter::kIsIterationInvariantRate,
                                               benchmark::Counter::kIs1000);
  state.counters["threads"] = threads;
}
BENCHMARK(BM_fma_peak)->UseRealTime()->Unit(benchmark::kMillisecond);
#endif

}  // namespace

BENCHMARK_MAIN();
