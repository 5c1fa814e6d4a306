// The whole MOCA step on the CUDA backend: the same model code as on the CPU (Moca<T, Cuda>),
// checked against the CPU step iteration by iteration (losses, gradients, weights, teacher and
// codebook), a short run of the tiny preset that lowers the loss, and no device allocation once
// the first step has sized every buffer.
//
// Without a device each test reports "skipped: no CUDA device" and passes.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <moca/cuda.hpp>
#include <moca/moca.hpp>
#include <type_traits>
#include <vector>

#include "cuda_testing.hpp"
#include "../moca_small.hpp"

using namespace moca;
using namespace moca::testing;

namespace {

MocaConfig small_config() { return testing::small_moca_config(); }

double relative_diff(double a, double b) {
  return std::abs(a - b) / std::max(std::abs(a), 1e-30);
}

/// The configurations both backends step through: the small model of the CPU step tests, and the
/// tiny preset (spec §16) as `moca pretrain` trains it, at a batch the CPU steps in seconds.
struct ParityCase {
  const char* name;
  MocaConfig cfg;
  std::int64_t batch;
};
std::vector<ParityCase> parity_cases() {
  MocaConfig tiny = MocaConfig::tiny();
  tiny.words_per_iter = 8;
  return {{"small model", small_config(), 4}, {"tiny preset", tiny, 8}};
}

/// Three steps of Moca<T, Cpu> and Moca<T, Cuda> from the same initial values, batches and
/// plans: losses, gradients, weights, teacher and codebook after each.
template <class T>
void check_three_steps(const ParityCase& c) {
  CAPTURE(c.name);
  const MocaConfig& cfg = c.cfg;
  const std::int64_t B = c.batch;
  // Float: the two backends sum in different orders in every op of a ~40-op chain, then AdamW
  // divides by sqrt(v); 1e-4 is about a hundred times float's rounding of one op. Double: the
  // same chain at double's precision.
  const double tol = std::is_same_v<T, float> ? 1e-4 : 1e-10;

  Moca<T, Cpu> cpu(cfg);
  Moca<T, Cuda> gpu(cfg);
  cpu.initialize(1);
  gpu.initialize(1);
  // The initial values are drawn on the host: bit-identical on both devices.
  CHECK(relative_error(cpu.params().values(), TensorView<T>(to_host(gpu.params().values()))) ==
        0.0);
  CHECK(relative_error(cpu.codebook().embedding.value, TensorView<T>(to_host(gpu.codebook().embedding.value))) ==
        0.0);

  const Tensor<T> x1 = random_images<T>(B, cfg.encoder, 1), x2 = random_images<T>(B, cfg.encoder, 2);
  const Tensor<T, Cuda> g1 = to_device<T>(x1), g2 = to_device<T>(x2);
  MocaHyper h;
  h.lr = 1e-3;
  for (std::uint64_t s = 0; s < 3; ++s) {
    CAPTURE(s);
    const MocaPlan plan = cpu.draw_plan(Philox(2), s, B);
    const MocaStepResult a = cpu.train_step(x1, x2, plan, h);
    const MocaStepResult b = gpu.train_step(g1, g2, plan, h);
    INFO("loss cpu ", a.loss, " cuda ", b.loss, "; L_IMG ", a.l_img, " / ", b.l_img, "; L_LOC ",
         a.l_loc, " / ", b.l_loc, "; grad norm ", a.grad_norm, " / ", b.grad_norm);
    CHECK(relative_diff(a.loss, b.loss) <= tol);
    CHECK(relative_diff(a.l_img, b.l_img) <= tol);
    CHECK(relative_diff(a.l_loc, b.l_loc) <= tol);
    CHECK(relative_diff(a.grad_norm, b.grad_norm) <= tol);
    CHECK(relative_diff(a.dist_norm, b.dist_norm) <= tol);
    const double grads =
        relative_error(cpu.params().grads(), TensorView<T>(to_host(gpu.params().grads())));
    const double values =
        relative_error(cpu.params().values(), TensorView<T>(to_host(gpu.params().values())));
    const double teacher = relative_error(cpu.teacher_params().values(),
                                          TensorView<T>(to_host(gpu.teacher_params().values())));
    const double words =
        relative_error(cpu.codebook().embedding.value, TensorView<T>(to_host(gpu.codebook().embedding.value)));
    INFO("relative errors: gradients ", grads, ", weights ", values, ", teacher ", teacher,
         ", codebook ", words);
    CHECK(grads <= tol);
    CHECK(values <= tol);
    CHECK(teacher <= tol);
    CHECK(words <= tol);
  }
}

}  // namespace

TEST_CASE_TEMPLATE("cuda: three MOCA steps match the CPU steps", T, float, double) {
  SKIP_WITHOUT_CUDA_DEVICE();
  for (const ParityCase& c : parity_cases()) check_three_steps<T>(c);
}

TEST_CASE_TEMPLATE("cuda: the tiny preset learns on the device, and a step allocates nothing", T,
                   float, bf16) {
  SKIP_WITHOUT_CUDA_DEVICE();
  MocaConfig cfg = MocaConfig::tiny();
  const std::int64_t B = 32;
  cfg.words_per_iter = 32;
  Moca<T, Cuda> moca(cfg);
  moca.initialize(0);
  const VitConfig& v = cfg.encoder;
  Tensor<T, Cuda> x1({B, v.in_chans, v.img_size, v.img_size}), x2(x1.shape());
  Tensor<T> stage;
  ops::upload_converted(TensorView<float>(random_images<float>(B, cfg.encoder, 11)),
                        TensorView<T, Cuda>(x1), stage);
  ops::upload_converted(TensorView<float>(random_images<float>(B, cfg.encoder, 12)),
                        TensorView<T, Cuda>(x2), stage);
  MocaHyper h;
  h.lr = 5e-4;
  std::vector<double> losses;
  long long allocations_after_first = 0;
  for (std::uint64_t s = 0; s < 20; ++s) {
    const MocaPlan plan = moca.draw_plan(Philox(0), s, B);
    const MocaStepResult r = moca.train_step(x1, x2, plan, h);
    REQUIRE(std::isfinite(r.loss));
    losses.push_back(r.loss);
    if (s == 0) allocations_after_first = memory_stats<Cuda>().allocations;
  }
  CHECK(memory_stats<Cuda>().allocations == allocations_after_first);
  const std::size_t n = losses.size();
  const double first = (losses[0] + losses[1] + losses[2]) / 3;
  const double last = (losses[n - 3] + losses[n - 2] + losses[n - 1]) / 3;
  CAPTURE(first);
  CAPTURE(last);
  CHECK(last < first);
}

TEST_CASE("cuda: with bf16 Linears the tiny preset starts at the fp32 loss and learns") {
  SKIP_WITHOUT_CUDA_DEVICE();
  MocaConfig cfg = MocaConfig::tiny();
  const std::int64_t B = 32;
  cfg.words_per_iter = 32;
  const Tensor<float, Cuda> x1 = to_device<float>(random_images<float>(B, cfg.encoder, 11));
  const Tensor<float, Cuda> x2 = to_device<float>(random_images<float>(B, cfg.encoder, 12));
  auto run = [&](cuda::FloatMatmul mode, int steps) {
    cuda::Context::get().set_float_matmul(mode);
    Moca<float, Cuda> moca(cfg);
    moca.initialize(0);
    MocaHyper h;
    h.lr = 5e-4;
    std::vector<double> losses;
    for (int s = 0; s < steps; ++s) {
      const MocaPlan plan = moca.draw_plan(Philox(0), static_cast<std::uint64_t>(s), B);
      losses.push_back(moca.train_step(x1, x2, plan, h).loss);
    }
    cuda::Context::get().set_float_matmul(cuda::FloatMatmul::Fp32);
    return losses;
  };
  const std::vector<double> fp32 = run(cuda::FloatMatmul::Fp32, 1);
  const std::vector<double> bf16 = run(cuda::FloatMatmul::Bf16, 20);
  INFO("first loss fp32 ", fp32[0], " bf16 ", bf16[0]);
  // The same model and data: bf16 inputs to the products move the loss by well under 1%.
  CHECK(relative_diff(fp32[0], bf16[0]) < 1e-2);
  CHECK(relative_diff(fp32[0], bf16[0]) > 0.0);
  const std::size_t n = bf16.size();
  const double first = (bf16[0] + bf16[1] + bf16[2]) / 3;
  const double last = (bf16[n - 3] + bf16[n - 2] + bf16[n - 1]) / 3;
  CAPTURE(first);
  CAPTURE(last);
  for (double l : bf16) CHECK(std::isfinite(l));
  CHECK(last < first);
}

TEST_CASE("cuda: three MOCA steps in bf16 storage follow the CPU's bf16 steps") {
  SKIP_WITHOUT_CUDA_DEVICE();
  // Both backends store every activation and gradient in bf16 and compute in float, but round
  // at different points: the CPU keeps the [B, H, S, S] attention probabilities in bf16, the
  // fused kernels keep float scores and round p and dS only for the products that read them,
  // and sums run in other orders, so a value may land one bf16 step (2^-8) apart. Each backend is held to the float step by tests/bf16_test.cpp (losses within 2e-2,
  // master weights within 3e-3); the two bf16 runs are held to twice those budgets of each other.
  const MocaConfig cfg = small_config();
  const std::int64_t B = 4;
  Moca<bf16, Cpu> cpu(cfg);
  Moca<bf16, Cuda> gpu(cfg);
  cpu.initialize(1);
  gpu.initialize(1);
  CHECK(relative_error(cpu.params().master(),
                       TensorView<float>(to_host(gpu.params().master()))) == 0.0);
  CHECK(relative_error(cpu.params().values(),
                       TensorView<bf16>(to_host(gpu.params().values()))) == 0.0);

  auto bf16_images = [&](std::uint64_t stream) {
    const Tensor<float> x = random_images<float>(B, cfg.encoder, stream);
    Tensor<bf16> h(x.shape());
    ops::convert(TensorView<float>(x), TensorView<bf16>(h));
    return h;
  };
  const Tensor<bf16> x1 = bf16_images(1), x2 = bf16_images(2);
  const Tensor<bf16, Cuda> g1 = to_device<bf16>(x1), g2 = to_device<bf16>(x2);
  MocaHyper h;
  h.lr = 1e-3;
  for (std::uint64_t s = 0; s < 3; ++s) {
    CAPTURE(s);
    const MocaPlan plan = cpu.draw_plan(Philox(2), s, B);
    const MocaStepResult a = cpu.train_step(x1, x2, plan, h);
    const MocaStepResult b = gpu.train_step(g1, g2, plan, h);
    INFO("loss cpu ", a.loss, " cuda ", b.loss, "; L_IMG ", a.l_img, " / ", b.l_img, "; L_LOC ",
         a.l_loc, " / ", b.l_loc);
    REQUIRE(std::isfinite(b.loss));
    CHECK(relative_diff(a.loss, b.loss) <= 4e-2);
    const double master =
        relative_error(cpu.params().master(), TensorView<float>(to_host(gpu.params().master())));
    const double teacher =
        relative_error(cpu.teacher_params().master(),
                       TensorView<float>(to_host(gpu.teacher_params().master())));
    MESSAGE("step ", s, ": loss cpu ", a.loss, " cuda ", b.loss, "; master weights ", master,
            ", teacher ", teacher, " apart (normwise)");
    CHECK(master <= 6e-3);
    CHECK(teacher <= 6e-3);
  }
  // The device's bf16 values are its master rounded, as on the CPU.
  const Tensor<float> m = to_host(gpu.params().master());
  const Tensor<bf16> v = to_host(gpu.params().values());
  bool rounded = true;
  for (std::int64_t i = 0; i < m.numel(); ++i)
    rounded = rounded && bf16(m.data()[i]).bits() == v.data()[i].bits();
  CHECK(rounded);
}
