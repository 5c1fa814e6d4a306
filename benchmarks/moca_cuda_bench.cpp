// One full MOCA iteration on the GPU (Moca<T, Cuda>: the layer code of the CPU step on the
// CUDA op set), with throughput, model FLOPs, their share of the card's peak, and peak device
// memory. compare_moca_cuda.py runs it beside the same iteration in PyTorch and prints the ratio.
//
//   moca_cuda_bench [--preset tiny|vit-s16|vit-b16] [--batch B] [--steps N] [--warmup W]
//                   [--precision fp32|bf16] [--matmul fp32|tf32|bf16] [--flash-tile 0|16|32|64]
//                   [--flash-threads 128|256] [--flash-mma 0|1] [--peak-tflops P] [--profile]
//
// --precision fp32 trains Moca<float, Cuda> with its products in --matmul's mode; --precision
// bf16 trains Moca<bf16, Cuda> (bf16 values and activations, fp32 parameter gradients, master
// weights, moments and accumulation: PyTorch AMP's counterpart), reported as "bf16-mixed".
// --flash-tile fixes the fused attention's tile (0: the launcher's choice) and --flash-threads its
// block size, to time one against another; --flash-mma 0 runs bf16 heads on those block programs
// instead of the register-fragment kernels (the default for heads of up to 64 features); the
// JSON's "fragment_passes" counts the passes (forward, dq, dk/dv) a step ran on those.
//
// Prints one JSON object; with --profile, first a table of where the step's device time goes
// (the profiler's scopes, each waiting for the device at its start and end, over `--steps`
// further steps). The masks and codebook refreshes are drawn before timing (a real run's
// loader draws them on its own threads). Model FLOPs are what the step's matrix products and
// attention report (2·M·N·K each), counted on one extra step; `mfu` divides their rate by
// --peak-tflops, by default 989 TFLOP/s, the dense bf16 tensor-core peak of an H100/H200 SXM
// (NVIDIA's datasheet), the yardstick the issue sets whatever precision the step runs in.
#include <cuda_runtime_api.h>

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
               "[--peak-tflops P] "
               "[--profile]\n%s\n",
               problem.c_str());
  std::exit(2);
}

struct Options {
  std::string preset = "vit-b16";
  std::int64_t batch = 64, steps = 10, warmup = 3;
  std::string precision = "fp32", matmul = "fp32";
  int flash_tile = 0, flash_threads = 128;
  bool flash_mma = true;
  bool profile = false;
  double peak_tflops = 989.0;
};

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
  const auto t0 = std::chrono::steady_clock::now();
  double loss = 0;
  for (std::int64_t i = 0; i < steps; ++i, ++s) loss = model.train_step(x1, x2, plans[s], hyper).loss;
  cuda::synchronize();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double per_step = seconds / static_cast<double>(steps);
  const double fragment_passes =
      static_cast<double>(cuda::Context::get().flash_mma_launches() - fragment_launches) /
      static_cast<double>(steps);

  if (profile) {
    profiler::reset();
    profiler::set_synchronizer(&cuda::synchronize);
    profiler::enable();
    const auto p0 = std::chrono::steady_clock::now();
    for (std::int64_t i = 0; i < steps; ++i, ++s) model.train_step(x1, x2, plans[s], hyper);
    profiler::enable(false);
    const double all = std::chrono::duration<double>(std::chrono::steady_clock::now() - p0).count();
    std::printf("%-18s %10s %7s %12s %10s\n", "scope", "ms/step", "share", "calls/step",
                "TFLOP/s");
    for (const auto& e : profiler::report()) {
      std::printf("%-18s %10.2f %6.1f%% %12.1f", e.name,
                  1e3 * e.seconds / static_cast<double>(steps), 100.0 * e.seconds / all,
                  static_cast<double>(e.calls) / static_cast<double>(steps));
      if (e.flops > 0) std::printf(" %10.1f", e.flops / e.seconds / 1e12);
      std::printf("\n");
    }
    std::printf("profiled step: %.2f ms (synchronised scopes)\n",
                1e3 * all / static_cast<double>(steps));
  }

  std::size_t free_bytes = 0, total_bytes = 0;
  MOCA_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  cudaDeviceProp prop{};
  MOCA_CUDA_CHECK(cudaGetDeviceProperties(&prop, cuda::Context::get().device()));
  const double mib = 1024.0 * 1024.0;
  std::printf(
      "{\"side\": \"moca\", \"device\": \"%s\", \"preset\": \"%s\", \"batch\": %lld, "
      "\"precision\": \"%s\", \"flash_tile\": %d, \"flash_threads\": %d, "
      "\"fragment_passes\": %.0f, "
      "\"steps\": %lld, \"ms_per_step\": %.3f, \"pairs_per_s\": %.2f, "
      "\"images_per_s\": %.2f, \"gflop_per_step\": %.2f, \"tflops\": %.2f, \"mfu\": %.4f, "
      "\"peak_tensor_MiB\": %.1f, \"pool_reserved_peak_MiB\": %.1f, \"device_used_MiB\": %.1f, "
      "\"step_allocations\": %lld, "
      "\"loss\": %s}\n",
      prop.name, o.preset.c_str(), static_cast<long long>(batch), label.c_str(), o.flash_tile,
      o.flash_threads, fragment_passes, static_cast<long long>(steps), 1e3 * per_step,
      static_cast<double>(batch) / per_step, 2.0 * static_cast<double>(batch) / per_step,
      flops / 1e9, flops / per_step / 1e12, flops / per_step / (o.peak_tflops * 1e12),
      static_cast<double>(memory_stats<Cuda>().peak_bytes) / mib,
      static_cast<double>(cuda::pool_stats().reserved_peak) / mib,
      static_cast<double>(total_bytes - free_bytes) / mib,
      static_cast<long long>(memory_stats<Cuda>().allocations - allocations),
      json_number(loss).c_str());
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
    } else if (a == "--profile") {
      o.profile = true;
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
    if (o.precision == "bf16") {
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
