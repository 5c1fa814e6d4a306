// Where one MOCA iteration spends its time, by layer and update (moca/core/profiler.hpp), with
// throughput and peak memory: the per-op profile docs/performance.md records.
//
//   build/benchmarks/moca_profile [--preset tiny|vit-s16|vit-b16] [--batch B] [--steps N]
//                                 [--precision fp32|bf16]
//
// The first step sizes every buffer and is not counted; threads come from OMP_NUM_THREADS.
// "linear" is the GEMMs of every Linear (with their bias); "attention" is the attention core
// (q·kᵀ, softmax, p·v and their backward) without its two Linears; "moca step" is what the
// step does outside every layer (masking, gathers, the teacher's targets bookkeeping).
// GFLOP/s counts the matrix products each scope ran (2·M·N·K each), the model FLOPs of the step;
// GB/s the least memory traffic of its ops (each operand read once, each output written once).
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <moca/core/profiler.hpp>
#include <moca/models/moca/moca.hpp>
#include <string>

#include "moca_rig.hpp"

namespace {

/// Runs `steps` profiled steps of a MocaRig<T> and prints where they went.
template <class T>
void profile(const std::string& preset, std::int64_t batch, std::int64_t steps) {
  using namespace moca;
  bench::MocaRig<T> rig(preset == "tiny"      ? MocaConfig::tiny()
                        : preset == "vit-s16" ? MocaConfig::vit_s16()
                                              : MocaConfig::vit_b16(),
                        batch);
  profiler::reset();
  profiler::enable();
  double total = 0;
  for (std::int64_t s = 0; s < steps; ++s) {
    const MocaPlan plan = rig.next_plan();
    const auto t0 = std::chrono::steady_clock::now();
    rig.train(plan);
    total += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  profiler::enable(false);
  const double per_step = total / static_cast<double>(steps);
  std::printf("preset %s, %s, batch %lld pairs, %d threads, %lld steps: %.3f s/step, "
              "%.1f pairs/s, peak %.0f MiB\n",
              preset.c_str(), std::is_same_v<T, float> ? "fp32" : "bf16",
              static_cast<long long>(batch), cpu::max_threads(),
              static_cast<long long>(steps), per_step, static_cast<double>(batch) / per_step,
              static_cast<double>(memory_stats<Cpu>().peak_bytes) / (1024.0 * 1024.0));
  std::printf("%-18s %10s %7s %12s %10s %9s %9s\n", "scope", "ms/step", "share", "calls/step",
              "GFLOP/s", "GB/step", "GB/s");
  double gemm_flops = 0;
  double covered = 0;
  for (const auto& e : profiler::report()) {
    const double ms = 1e3 * e.seconds / static_cast<double>(steps);
    covered += e.seconds;
    gemm_flops += e.flops;
    std::printf("%-18s %10.1f %6.1f%% %12.1f", e.name, ms, 100.0 * e.seconds / total,
                static_cast<double>(e.calls) / static_cast<double>(steps));
    if (e.flops > 0)
      std::printf(" %10.1f", e.flops / e.seconds / 1e9);
    else
      std::printf(" %10s", "");
    if (e.bytes > 0)
      std::printf(" %9.2f %9.1f", e.bytes / 1e9 / static_cast<double>(steps),
                  e.bytes / e.seconds / 1e9);
    std::printf("\n");
  }
  std::printf("%-18s %10.1f %6.1f%%\n", "(outside scopes)",
              1e3 * (total - covered) / static_cast<double>(steps),
              100.0 * (total - covered) / total);
  std::printf("matrix products: %.1f GFLOP per step; whole step %.1f GFLOP/s\n",
              gemm_flops / 1e9 / static_cast<double>(steps), gemm_flops / total / 1e9);
}

}  // namespace

int main(int argc, char** argv) {
  using namespace moca;
  std::string preset = "tiny";
  std::string precision = "fp32";
  std::int64_t batch = 128, steps = 3;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--preset" && i + 1 < argc) {
      preset = argv[++i];
    } else if (a == "--batch" && i + 1 < argc) {
      batch = std::atoll(argv[++i]);
    } else if (a == "--steps" && i + 1 < argc) {
      steps = std::atoll(argv[++i]);
    } else if (a == "--precision" && i + 1 < argc) {
      precision = argv[++i];
    } else {
      std::fprintf(stderr,
                   "usage: moca_profile [--preset tiny|vit-s16|vit-b16] [--batch B] [--steps N] "
                   "[--precision fp32|bf16]\n"
                   "unknown or incomplete argument: %s\n",
                   a.c_str());
      return 2;
    }
  }
  if (preset != "tiny" && preset != "vit-s16" && preset != "vit-b16") {
    std::fprintf(stderr, "moca_profile: --preset must be tiny, vit-s16 or vit-b16, got %s\n",
                 preset.c_str());
    return 2;
  }
  if (precision != "fp32" && precision != "bf16") {
    std::fprintf(stderr, "moca_profile: --precision must be fp32 or bf16, got %s\n",
                 precision.c_str());
    return 2;
  }
  if (batch < 2 || steps < 1) {
    std::fprintf(stderr, "moca_profile: --batch must be >= 2 and --steps >= 1\n");
    return 2;
  }
  if (precision == "bf16") {
    profile<moca::bf16>(preset, batch, steps);
  } else {
    profile<float>(preset, batch, steps);
  }
  return 0;
}
