// One full MOCA iteration (teacher, codebook, both masking rounds, decoder, losses, backward,
// clipping, AdamW, EMA) at the project's presets, in image pairs per second, with peak memory:
//   tiny      Fashion-MNIST preset (spec §16), batch 128 pairs
//   vit_s16   ViT-S/16 encoder, 512×2 decoder, batch 16 pairs
// each in float and, with the suffix _bf16, in bf16 storage with float master weights.
// compare_moca.py runs this and the same iteration in PyTorch and prints the ratio.
#include <benchmark/benchmark.h>

#include <moca/models/moca/moca.hpp>

#include "moca_rig.hpp"

namespace {

template <class T>
void run_steps(benchmark::State& state, moca::MocaConfig cfg, std::int64_t batch) {
  using namespace moca;
  bench::MocaRig<T> rig(cfg, batch);
  for (auto _ : state) {
    state.PauseTiming();
    const MocaPlan plan = rig.next_plan();
    state.ResumeTiming();
    benchmark::DoNotOptimize(rig.train(plan).loss);
  }
  state.counters["pairs_per_s"] = benchmark::Counter(
      static_cast<double>(batch), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["peak_MiB"] =
      static_cast<double>(memory_stats<Cpu>().bytes_in_use + 0) / (1024.0 * 1024.0);
  state.counters["peak_step_MiB"] =
      static_cast<double>(memory_stats<Cpu>().peak_bytes) / (1024.0 * 1024.0);
}

void moca_step(benchmark::State& state, moca::MocaConfig cfg, std::int64_t batch) {
  run_steps<float>(state, cfg, batch);
}
void moca_step_bf16(benchmark::State& state, moca::MocaConfig cfg, std::int64_t batch) {
  run_steps<moca::bf16>(state, cfg, batch);
}

}  // namespace

BENCHMARK_CAPTURE(moca_step, tiny_b128, moca::MocaConfig::tiny(), 128)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MinTime(10.0);
BENCHMARK_CAPTURE(moca_step, vit_s16_b16, moca::MocaConfig::vit_s16(), 16)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MinTime(10.0);

BENCHMARK_CAPTURE(moca_step_bf16, tiny_b128_bf16, moca::MocaConfig::tiny(), 128)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MinTime(10.0);
BENCHMARK_CAPTURE(moca_step_bf16, vit_s16_b16_bf16, moca::MocaConfig::vit_s16(), 16)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MinTime(10.0);

BENCHMARK_MAIN();
