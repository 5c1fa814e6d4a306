// ViT forward + backward throughput (images/s) at the project's presets:
//   tiny     32×32 grey, patch 4, width 192, depth 6, heads 3, batch 128
//   vit_s16  224×224 RGB, patch 16, width 384, depth 12, heads 6, batch 16
// compare_vit.py runs this and the same configuration in PyTorch and prints the ratio.
#include <benchmark/benchmark.h>

#include <moca/models/vit.hpp>

namespace {

void vit_train_step(benchmark::State& state, moca::VitConfig cfg, std::int64_t batch) {
  using namespace moca;
  VisionTransformer<float> vit(cfg);
  ParameterStore<float> params(vit);
  params.initialize(0);
  Tensor<float> images({batch, cfg.in_chans, cfg.img_size, cfg.img_size});
  fill_uniform(images, Philox(1), 0, -1.0, 1.0);
  Tensor<float> dout({batch, 1 + cfg.num_patches(), cfg.dim});
  fill_uniform(dout, Philox(1), 1, -1.0, 1.0);
  auto step = [&] {
    params.zero_grad();
    vit.forward(images);
    vit.backward({{0, dout}});
  };
  step();  // sizes every buffer
  reset_peak_memory<Cpu>();
  for (auto _ : state) {
    step();
    benchmark::DoNotOptimize(params.grads().data());
  }
  state.counters["images_per_s"] = benchmark::Counter(
      static_cast<double>(batch), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["peak_MiB"] =
      static_cast<double>(memory_stats<Cpu>().peak_bytes) / (1024.0 * 1024.0);
}

}  // namespace

BENCHMARK_CAPTURE(vit_train_step, tiny_b128, moca::VitConfig::tiny(), 128)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MinTime(3.0);
BENCHMARK_CAPTURE(vit_train_step, vit_s16_b16, moca::VitConfig::vit_s16(), 16)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MinTime(5.0);

BENCHMARK_MAIN();
