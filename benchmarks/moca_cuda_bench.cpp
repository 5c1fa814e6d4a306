// One full MOCA iteration on the GPU (Moca<T, Cuda>: the layer code of the CPU step on the
// CUDA op set), with throughput, model FLOPs, their share of the card's peak, and peak device
// memory. compare_moca_cuda.py runs it beside the same iteration in PyTorch and prints the ratio.
//
//   moca_cuda_bench [--preset tiny|vit-s16|vit-b16] [--batch B] [--steps N] [--warmup W]
//                   [--precision fp32|bf16] [--matmul fp32|tf32|bf16] [--flash-tile 0|16|32|64]
//                   [--flash-threads 128|256] [--flash-mma 0|1] [--gemm-tuning N] [--column-chunks
//                   0|1] [--staged-uploads 0|1] [--fused-bias-grads 0|1] [--fused-residual 0|1]
//                   [--peak-tflops P] [--profile | --profile-sync]
//
// --precision fp32 trains Moca<float, Cuda> with its products in --matmul's mode; --precision
// bf16 trains Moca<bf16, Cuda> (bf16 values and activations, fp32 parameter gradients, master
// weights, moments and accumulation: PyTorch AMP's counterpart), reported as "bf16-mixed".
// --flash-tile fixes the fused attention's tile (0: the launcher's choice) and --flash-threads its
// block size, to time one against another; --flash-mma 0 runs bf16 heads on those block programs
// instead of the register-fragment kernels (the default for heads of up to 64 features); the
// JSON's "fragment_passes" counts the passes (forward, dq, dk/dv) a step ran on those.
// --gemm-tuning N times up to N of cuBLASLt's candidate algorithms for each product when the
// first step plans it and keeps the fastest (Context::set_gemm_tuning; 0, the default, takes the
// heuristic's choice); the JSON's "gemm_plans_tuned" and "gemm_plans_retuned" count the plans
// tuned and those where another candidate than the heuristic's first won. --column-chunks 0 runs
// the bias and LayerNorm parameter gradients' column sums element by element instead of on the
// chunked kernels (Context::set_column_chunks). --staged-uploads 0 makes every copy from the host
// wait for the stream instead of going through pinned staging blocks (Context::set_staged_uploads);
// the JSON's "host_waits_per_step" counts the times a timed step waited for the device, and
// "host_busy_ms_per_step" is the host's own time in a step (its wall time less those waits): near
// ms_per_step, the step is bound by the host's launches rather than by the device.
// --fused-bias-grads 1 takes the bf16 Linears' bias gradients from their weight-gradient
// products (cuBLASLt's BGRADB epilogue; Context::set_fused_bias_grads); "fused_bias_grads" in the
// JSON counts the Linears per step that took them so. --fused-residual 0 adds each block's
// residual in a pass of its own instead of as its second MLP product stores its output
// (Context::set_fused_residual).
//
//   moca_cuda_bench --attention B,H,S,hd [--steps N] [--warmup W] [--flash-mma 0|1] ...
//
// times the fused attention of bf16 heads alone instead (random q, k, v and do; the kernels
// --flash-mma and the launch options choose): forward and backward (dq and dk/dv passes) between
// CUDA events, the median of --steps runs of each, with TFLOP/s counting 4·B·H·S²·hd for the
// forward and 2.5 times that for the backward (its five products, the convention of the
// FlashAttention papers; the recomputed scores are not counted). compare_attention_cuda.py runs
// it beside PyTorch's scaled_dot_product_attention.
//
// Prints one JSON object; with --profile, first a table of where the step's device time goes
// over `--steps` further steps, with each scope's TFLOP/s and its memory traffic (the least the
// ops in it must move, profiler::count_bytes) as GB/s and as a share of the device's measured
// copy bandwidth: the profiler's scopes timed on the stream by CUDA events
// (cuda::EventTimeline; the steps run as they do unprofiled), or with --profile-sync by
// waiting for the device at every scope's start and end (which adds a gap at each). The masks and
// codebook refreshes are drawn before timing (a real run's loader draws them on its own threads).
// Model FLOPs are what the step's matrix products and attention report (2·M·N·K each), counted on
// one extra step; `mfu` divides their rate by
// --peak-tflops, by default 989 TFLOP/s, the dense bf16 tensor-core peak of an H100/H200 SXM
// (NVIDIA's datasheet), the yardstick the issue sets whatever precision the step runs in.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <moca/core/profiler.hpp>
#include <moca/cuda.hpp>
#include <moca/models/moca/moca.hpp>
#include <moca/ops/elementwise.hpp>
#include <string>
#include <vector>

namespace {

// A JSON number, or null where the value is not finite (a diverged loss still reports its
// timing; JSON has no NaN).
std::string json_number(double v) {
  if (!std::isfinite(v)) return "null";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.6f", v);
  return buf;
}

using namespace moca;

[[noreturn]] void usage(const std::string& problem) {
  std::fprintf(stderr,
               "usage: moca_cuda_bench [--preset tiny|vit-s16|vit-b16] [--batch B] [--steps N] "
               "[--warmup W] [--precision fp32|bf16] [--matmul fp32|tf32|bf16] "
               "[--flash-tile 0|16|32|64] [--flash-threads 128|256] [--flash-mma 0|1] "
               "[--gemm-tuning N] [--column-chunks 0|1] [--staged-uploads 0|1] "
               "[--fused-bias-grads 0|1] [--fused-residual 0|1] "
               "[--peak-tflops P] [--profile | "
               "--profile-sync] [--attention "
               "B,H,S,hd]\n%s\n",
               problem.c_str());
  std::exit(2);
}

struct Options {
  std::string preset = "vit-b16";
  std::int64_t batch = 64, steps = 10, warmup = 3;
  std::string precision = "fp32", matmul = "fp32";
  int flash_tile = 0, flash_threads = 128;
  bool flash_mma = true;
  int gemm_tuning = 0;
  bool column_chunks = true;
  bool staged_uploads = true;
  bool fused_bias_grads = false;
  bool fused_residual = true;
  bool profile = false, profile_sync = false;
  std::vector<std::int64_t> attention;  // B, H, S, hd: time the attention alone
  double peak_tflops = 989.0;
};

/// The device's copy bandwidth, bytes read + written per second: the median of 5 copies of 1 GiB
/// within the device, the yardstick of the profile's memory-bound scopes.
double copy_bandwidth() {
  const std::size_t bytes = std::size_t{1} << 30;
  void *a = nullptr, *b = nullptr;
  MOCA_CUDA_CHECK(cudaMalloc(&a, bytes));
  MOCA_CUDA_CHECK(cudaMalloc(&b, bytes));
  cudaEvent_t start, stop;
  MOCA_CUDA_CHECK(cudaEventCreate(&start));
  MOCA_CUDA_CHECK(cudaEventCreate(&stop));
  std::vector<double> rates;
  for (int i = 0; i < 6; ++i) {
    MOCA_CUDA_CHECK(cudaEventRecord(start, cuda::stream()));
    MOCA_CUDA_CHECK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, cuda::stream()));
    MOCA_CUDA_CHECK(cudaEventRecord(stop, cuda::stream()));
    MOCA_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    MOCA_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    if (i > 0) rates.push_back(2.0 * static_cast<double>(bytes) / (1e-3 * ms));  // first: warm-up
  }
  MOCA_CUDA_CHECK(cudaEventDestroy(start));
  MOCA_CUDA_CHECK(cudaEventDestroy(stop));
  MOCA_CUDA_CHECK(cudaFree(a));
  MOCA_CUDA_CHECK(cudaFree(b));
  std::sort(rates.begin(), rates.end());
  return rates[rates.size() / 2];
}

/// Times the step of Moca<T, Cuda> and prints the JSON line (and the profile).
template <class T>
void bench(const Options& o, const MocaConfig& cfg) {
  const std::int64_t batch = o.batch, steps = o.steps, warmup = o.warmup;
  const bool profile = o.profile;
  const std::string label = std::is_same_v<T, float> ? o.matmul : "bf16-mixed";
  Moca<T, Cuda> model(cfg);
  model.initialize(0);
  const auto& v = cfg.encoder;
  Tensor<float> h1({batch, v.in_chans, v.img_size, v.img_size}), h2(h1.shape());
  fill_uniform(h1, Philox(1), 0, -1.0, 1.0);
  fill_uniform(h2, Philox(1), 1, -1.0, 1.0);
  Tensor<T, Cuda> x1(h1.shape()), x2(h2.shape());
  Tensor<T> stage;
  ops::upload_converted(TensorView<float>(h1), TensorView<T, Cuda>(x1), stage);
  ops::upload_converted(TensorView<float>(h2), TensorView<T, Cuda>(x2), stage);
  MocaHyper hyper;
  hyper.lr = 1e-4;

  const std::int64_t total = warmup + 1 + steps * (profile ? 2 : 1);
  std::vector<MocaPlan> plans;
  for (std::int64_t s = 0; s < total; ++s)
    plans.push_back(model.draw_plan(Philox(2), static_cast<std::uint64_t>(s), batch));

  std::int64_t s = 0;
  for (; s < warmup; ++s) model.train_step(x1, x2, plans[s], hyper);
  // One step counted by the profiler: the model FLOPs (timing comes from the plain steps).
  profiler::reset();
  profiler::enable();
  model.train_step(x1, x2, plans[s++], hyper);
  profiler::enable(false);
  double flops = 0;
  for (const auto& e : profiler::report()) flops += e.flops;

  const std::int64_t allocations = memory_stats<Cuda>().allocations;
  const std::uint64_t fragment_launches = cuda::Context::get().flash_mma_launches();
  cuda::synchronize();
  const std::uint64_t waits_before = cuda::Context::get().host_waits();
  const double waited_before = cuda::Context::get().host_wait_seconds();
  const std::uint64_t fused_before = cuda::Context::get().fused_bias_grad_runs();
  const auto t0 = std::chrono::steady_clock::now();
  double loss = 0;
  for (std::int64_t i = 0; i < steps; ++i, ++s) loss = model.train_step(x1, x2, plans[s], hyper).loss;
  // The host's own time in the steps: their wall time (the device may still be running the last
  // one's update) less the time spent waiting for the device.
  const double host_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() -
      (cuda::Context::get().host_wait_seconds() - waited_before);
  const double waits_per_step =
      static_cast<double>(cuda::Context::get().host_waits() - waits_before) /
      static_cast<double>(steps);
  const double fused_per_step =
      static_cast<double>(cuda::Context::get().fused_bias_grad_runs() - fused_before) /
      static_cast<double>(steps);
  cuda::synchronize();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double per_step = seconds / static_cast<double>(steps);
  const double fragment_passes =
      static_cast<double>(cuda::Context::get().flash_mma_launches() - fragment_launches) /
      static_cast<double>(steps);

  if (profile) {
    cuda::EventTimeline timeline;
    profiler::reset();
    if (o.profile_sync)
      profiler::set_synchronizer(&cuda::synchronize);
    else
      profiler::set_timeline(&timeline);
    profiler::enable();
    cuda::synchronize();
    const auto p0 = std::chrono::steady_clock::now();
    for (std::int64_t i = 0; i < steps; ++i, ++s) model.train_step(x1, x2, plans[s], hyper);
    cuda::synchronize();
    profiler::enable(false);
    const double all = std::chrono::duration<double>(std::chrono::steady_clock::now() - p0).count();
    const double copy_rate = copy_bandwidth();
    std::printf("device-to-device copy: %.0f GB/s (bytes read + written)\n", copy_rate / 1e9);
    std::printf("%-18s %10s %7s %12s %10s %9s %9s %7s\n", "scope", "ms/step", "share", "calls/step",
                "TFLOP/s", "GB/step", "GB/s", "of copy");
    for (const auto& e : profiler::report()) {
      std::printf("%-18s %10.2f %6.1f%% %12.1f", e.name,
                  1e3 * e.seconds / static_cast<double>(steps), 100.0 * e.seconds / all,
                  static_cast<double>(e.calls) / static_cast<double>(steps));
      if (e.flops > 0)
        std::printf(" %10.1f", e.flops / e.seconds / 1e12);
      else
        std::printf(" %10s", "");
      if (e.bytes > 0)
        std::printf(" %9.2f %9.0f %6.0f%%", e.bytes / 1e9 / static_cast<double>(steps),
                    e.bytes / e.seconds / 1e9, 100.0 * e.bytes / e.seconds / copy_rate);
      std::printf("\n");
    }
    profiler::set_synchronizer(nullptr);
    profiler::set_timeline(nullptr);
    std::printf("profiled step: %.2f ms (%s)\n", 1e3 * all / static_cast<double>(steps),
                o.profile_sync ? "synchronised scopes" : "scopes timed on the stream");
  }

  std::size_t free_bytes = 0, total_bytes = 0;
  MOCA_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  cudaDeviceProp prop{};
  MOCA_CUDA_CHECK(cudaGetDeviceProperties(&prop, cuda::Context::get().device()));
  const double mib = 1024.0 * 1024.0;
  std::printf(
      "{\"side\": \"moca\", \"device\": \"%s\", \"preset\": \"%s\", \"batch\": %lld, "
      "\"precision\": \"%s\", \"flash_tile\": %d, \"flash_threads\": %d, "
      "\"fragment_passes\": %.0f, \"column_chunks\": %d, \"staged_uploads\": %d, "
      "\"host_waits_per_step\": %.2f, \"host_busy_ms_per_step\": %.3f, "
      "\"fused_bias_grads\": %.0f, \"fused_residual\": %d, \"gemm_tuning\": %d, "
      "\"gemm_plans_tuned\": %zu, "
      "\"gemm_plans_retuned\": %zu, "
      "\"steps\": %lld, \"ms_per_step\": %.3f, \"pairs_per_s\": %.2f, "
      "\"images_per_s\": %.2f, \"gflop_per_step\": %.2f, \"tflops\": %.2f, \"mfu\": %.4f, "
      "\"peak_tensor_MiB\": %.1f, \"pool_reserved_peak_MiB\": %.1f, \"device_used_MiB\": %.1f, "
      "\"step_allocations\": %lld, "
      "\"loss\": %s}\n",
      prop.name, o.preset.c_str(), static_cast<long long>(batch), label.c_str(), o.flash_tile,
      o.flash_threads, fragment_passes, o.column_chunks ? 1 : 0, o.staged_uploads ? 1 : 0,
      waits_per_step, 1e3 * host_seconds / static_cast<double>(steps), fused_per_step,
      o.fused_residual ? 1 : 0, o.gemm_tuning, cuda::LtMatmul::get().tuned_plans(),
      cuda::LtMatmul::get().retuned_plans(), static_cast<long long>(steps), 1e3 * per_step,
      static_cast<double>(batch) / per_step, 2.0 * static_cast<double>(batch) / per_step,
      flops / 1e9, flops / per_step / 1e12, flops / per_step / (o.peak_tflops * 1e12),
      static_cast<double>(memory_stats<Cuda>().peak_bytes) / mib,
      static_cast<double>(cuda::pool_stats().reserved_peak) / mib,
      static_cast<double>(total_bytes - free_bytes) / mib,
      static_cast<long long>(memory_stats<Cuda>().allocations - allocations),
      json_number(loss).c_str());
}

/// The median of a sample.
double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/// Times the fused attention of bf16 heads alone (see the top) and prints one JSON line.
void bench_attention(const Options& o) {
  const std::int64_t B = o.attention[0], H = o.attention[1], S = o.attention[2],
                     hd = o.attention[3], dim = H * hd;
  auto random_device = [](const Shape& shape, std::uint64_t stream) {
    Tensor<float> h(shape);
    fill_uniform(h, Philox(3), stream, -2.0, 2.0);
    Tensor<bf16, Cuda> d(shape);
    Tensor<bf16> stage;
    ops::upload_converted(TensorView<float>(h), TensorView<bf16, Cuda>(d), stage);
    return d;
  };
  const Tensor<bf16, Cuda> qkv = random_device({B, S, 3 * dim}, 0);
  const Tensor<bf16, Cuda> dctx = random_device({B, S, dim}, 1);
  const Shape saved = ops::attention_saved_shape<bf16, Cuda>(B, H, S);
  Tensor<bf16, Cuda> lse(saved), work(saved), ctx({B, S, dim}), dqkv({B, S, 3 * dim});
  const bf16 scale(1.0f / std::sqrt(static_cast<float>(hd)));
  auto forward = [&] { ops::attention_forward(qkv, H, scale, lse, ctx); };
  auto backward = [&] { ops::attention_backward(qkv, lse, ctx, dctx, H, scale, work, dqkv); };
  cudaEvent_t start, stop;
  MOCA_CUDA_CHECK(cudaEventCreate(&start));
  MOCA_CUDA_CHECK(cudaEventCreate(&stop));
  auto time_ms = [&](auto&& pass) {
    std::vector<double> ms;
    for (std::int64_t i = 0; i < o.warmup + o.steps; ++i) {
      MOCA_CUDA_CHECK(cudaEventRecord(start, cuda::stream()));
      pass();
      MOCA_CUDA_CHECK(cudaEventRecord(stop, cuda::stream()));
      MOCA_CUDA_CHECK(cudaEventSynchronize(stop));
      float t = 0;
      MOCA_CUDA_CHECK(cudaEventElapsedTime(&t, start, stop));
      if (i >= o.warmup) ms.push_back(t);
    }
    return median(ms);
  };
  const std::uint64_t launches = cuda::Context::get().flash_mma_launches();
  forward();
  backward();
  const bool fragments = cuda::Context::get().flash_mma_launches() == launches + 3;
  const double fwd = time_ms(forward), bwd = time_ms(backward);
  MOCA_CUDA_CHECK(cudaEventDestroy(start));
  MOCA_CUDA_CHECK(cudaEventDestroy(stop));
  const double flops =
      4.0 * static_cast<double>(B * H) * static_cast<double>(S * S) * static_cast<double>(hd);
  std::printf(
      "{\"side\": \"moca\", \"kernels\": \"%s\", \"B\": %lld, \"H\": %lld, \"S\": %lld, "
      "\"hd\": %lld, \"forward_ms\": %.4f, \"backward_ms\": %.4f, \"forward_tflops\": %.1f, "
      "\"backward_tflops\": %.1f}\n",
      fragments ? "fragments" : "blocks", static_cast<long long>(B), static_cast<long long>(H),
      static_cast<long long>(S), static_cast<long long>(hd), fwd, bwd, flops / fwd / 1e9,
      2.5 * flops / bwd / 1e9);
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const bool has_value = i + 1 < argc;
    if (a == "--preset" && has_value) {
      o.preset = argv[++i];
    } else if (a == "--batch" && has_value) {
      o.batch = std::atoll(argv[++i]);
    } else if (a == "--steps" && has_value) {
      o.steps = std::atoll(argv[++i]);
    } else if (a == "--warmup" && has_value) {
      o.warmup = std::atoll(argv[++i]);
    } else if (a == "--peak-tflops" && has_value) {
      o.peak_tflops = std::atof(argv[++i]);
    } else if (a == "--precision" && has_value) {
      o.precision = argv[++i];
    } else if (a == "--matmul" && has_value) {
      o.matmul = argv[++i];
    } else if (a == "--flash-tile" && has_value) {
      o.flash_tile = std::atoi(argv[++i]);
    } else if (a == "--flash-threads" && has_value) {
      o.flash_threads = std::atoi(argv[++i]);
    } else if (a == "--flash-mma" && has_value) {
      o.flash_mma = std::atoi(argv[++i]) != 0;
    } else if (a == "--gemm-tuning" && has_value) {
      o.gemm_tuning = std::atoi(argv[++i]);
    } else if (a == "--column-chunks" && has_value) {
      o.column_chunks = std::atoi(argv[++i]) != 0;
    } else if (a == "--staged-uploads" && has_value) {
      o.staged_uploads = std::atoi(argv[++i]) != 0;
    } else if (a == "--fused-bias-grads" && has_value) {
      o.fused_bias_grads = std::atoi(argv[++i]) != 0;
    } else if (a == "--fused-residual" && has_value) {
      o.fused_residual = std::atoi(argv[++i]) != 0;
    } else if (a == "--attention" && has_value) {
      std::string spec = argv[++i];
      for (std::size_t at = 0; at <= spec.size();) {
        const std::size_t comma = std::min(spec.find(',', at), spec.size());
        o.attention.push_back(std::atoll(spec.substr(at, comma - at).c_str()));
        at = comma + 1;
      }
      if (o.attention.size() != 4 ||
          std::any_of(o.attention.begin(), o.attention.end(), [](auto v) { return v < 1; }))
        usage("--attention takes four positive numbers B,H,S,hd, got " + spec);
    } else if (a == "--profile") {
      o.profile = true;
    } else if (a == "--profile-sync") {
      o.profile = o.profile_sync = true;
    } else {
      usage("unknown or incomplete argument: " + a);
    }
  }
  MocaConfig cfg;
  if (o.preset == "tiny") {
    cfg = MocaConfig::tiny();
  } else if (o.preset == "vit-s16") {
    cfg = MocaConfig::vit_s16();
  } else if (o.preset == "vit-b16") {
    cfg = MocaConfig::vit_b16();
  } else {
    usage("--preset must be tiny, vit-s16 or vit-b16, got " + o.preset);
  }
  if (o.batch < 2 || o.steps < 1 || o.warmup < 1 || o.peak_tflops <= 0) {
    usage("--batch must be >= 2, --steps and --warmup >= 1, --peak-tflops > 0");
  }
  if (o.precision != "fp32" && o.precision != "bf16") {
    usage("--precision must be fp32 or bf16, got " + o.precision);
  }
  if (!cuda::available()) {
    std::fprintf(stderr, "moca_cuda_bench: no CUDA device\n");
    return 1;
  }
  cfg.words_per_iter = std::min<std::int64_t>(cfg.words_per_iter, o.batch);

  try {
    cuda::Context::get().set_float_matmul(cuda::parse_float_matmul(o.matmul, "--matmul"));
    cuda::Context::get().set_flash_tile(o.flash_tile);
    cuda::Context::get().set_flash_threads(o.flash_threads);
    cuda::Context::get().set_flash_mma(o.flash_mma);
    cuda::Context::get().set_gemm_tuning(o.gemm_tuning);
    cuda::Context::get().set_column_chunks(o.column_chunks);
    cuda::Context::get().set_staged_uploads(o.staged_uploads);
    cuda::Context::get().set_fused_bias_grads(o.fused_bias_grads);
    cuda::Context::get().set_fused_residual(o.fused_residual);
    if (!o.attention.empty()) {
      bench_attention(o);
    } else if (o.precision == "bf16") {
      bench<bf16>(o, cfg);
    } else {
      bench<float>(o, cfg);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moca_cuda_bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
