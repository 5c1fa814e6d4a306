// The fixed MOCA iteration the benchmarks time: a model at one preset (float, or bf16 storage
// with float master weights), two random views of a batch, and one step before timing so that
// every buffer is sized (moca_bench, moca_profile).
#pragma once

#include <algorithm>
#include <cstdint>
#include <moca/models/moca/moca.hpp>
#include <moca/ops/elementwise.hpp>

namespace moca::bench {

template <class T = float>
struct MocaRig {
  MocaConfig cfg;
  std::int64_t batch;
  Moca<T> model;
  Tensor<T> x1, x2;
  MocaHyper hyper;
  std::uint64_t step = 0;

  MocaRig(MocaConfig c, std::int64_t b) : cfg(with_batch(c, b)), batch(b), model(cfg) {
    model.initialize(0);
    const auto& v = cfg.encoder;
    Tensor<float> f1({batch, v.in_chans, v.img_size, v.img_size}), f2(f1.shape());
    fill_uniform(f1, Philox(1), 0, -1.0, 1.0);
    fill_uniform(f2, Philox(1), 1, -1.0, 1.0);
    x1.resize(f1.shape());
    x2.resize(f2.shape());
    ops::convert(TensorView<float>(f1), TensorView<T>(x1));
    ops::convert(TensorView<float>(f2), TensorView<T>(x2));
    hyper.lr = 1e-4;
    train(next_plan());  // sizes every buffer
    reset_peak_memory<Cpu>();
  }

  /// The masks and codebook refresh of the next iteration (the loader's job in a real run).
  MocaPlan next_plan() { return model.draw_plan(Philox(2), step++, batch); }
  MocaStepResult train(const MocaPlan& plan) { return model.train_step(x1, x2, plan, hyper); }

 private:
  static MocaConfig with_batch(MocaConfig c, std::int64_t b) {
    c.words_per_iter = std::min<std::int64_t>(c.words_per_iter, b);
    return c;
  }
};

}  // namespace moca::bench
