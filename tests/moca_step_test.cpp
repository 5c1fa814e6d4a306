// The MOCA step as a whole: gradients of the full loss against central differences, parameter
// counts (spec §10), micro-batch accumulation, no allocation in steady state, and a short run of
// the tiny preset that lowers the loss and repeats bit for bit.
#include <doctest/doctest.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <moca/models/moca/checkpoint.hpp>
#include <moca/testing/gradcheck.hpp>
#include <new>
#include <vector>

#include "moca_small.hpp"

using namespace moca;

// Every heap allocation of this test program is counted, so "allocates nothing" covers
// std::vector and friends, not only tensors.
namespace {

using testing::random_images;
std::atomic<long long> g_heap_allocations{0};
}
// These replacements allocate with malloc, so free matches; GCC cannot see that.
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
void* operator new(std::size_t n) {
  g_heap_allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) { return operator new(n); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }

namespace {

MocaConfig small_config() { return testing::small_moca_config(); }

template <class T>
void perturb(Moca<T>& moca) {
  for (const auto& e : moca.params().entries())
    if (e.trainable && (e.name.find("norm") != std::string::npos ||
                        e.name.find("bn") != std::string::npos || e.name.ends_with(".bias")))
      fill_uniform(moca.params().view(e), Philox(21), name_stream(e.name), 0.5, 1.5);
}

}  // namespace

TEST_CASE("ViT-B/16 with the 512×2 decoder has 97,075,456 trainable parameters (spec §10)") {
  const MocaConfig c = MocaConfig::vit_b16();
  // The parts, built without a store: counting allocates no parameter memory.
  VisionTransformer<float> enc(c.encoder);
  WeightGenerator<float> gb(c.encoder.dim, c.generator_hidden(), c.encoder.dim, c.kappa);
  WeightGenerator<float> gd(c.encoder.dim, c.generator_hidden(), c.decoder.dim, c.kappa);
  CondenserDecoder<float> dec(c.encoder.dim, c.encoder.grid(), c.decoder);
  auto count = [](auto& module) {
    std::int64_t n = 0;
    for_each_param(module, [&](const std::string&, Param<float>& p) {
      if (p.trainable) n += p.shape.numel();
    });
    return n;
  };
  CHECK(count(enc) == 85'647'360);
  CHECK(count(dec) == 6'701'568);
  CHECK(count(gb) == 2'363'136);
  CHECK(count(gd) == 2'363'392);
  CHECK(count(enc) + count(dec) + count(gb) + count(gd) == 97'075'456);
}

TEST_CASE("The whole MOCA loss passes the gradient check for every trainable tensor") {
  Moca<double> moca(small_config());
  moca.initialize(3);
  perturb(moca);
  const std::int64_t B = 4;
  auto x1 = random_images<double>(B, moca.config().encoder, 1);
  auto x2 = random_images<double>(B, moca.config().encoder, 2);
  const MocaPlan plan = moca.draw_plan(Philox(4), 0, B);
  moca.prepare_targets(x1, x2, nullptr);  // targets and codebook fixed from here on
  auto& params = moca.params();
  params.zero_grad();
  moca.student_forward_backward(plan.masks);
  Tensor<double> analytic({params.num_trainable()});
  copy(params.grads(), TensorView<double>(analytic));
  auto loss = [&] {
    params.zero_grad();
    return moca.student_forward_backward(plan.masks).loss;
  };
  testing::GradcheckOptions opt;
  opt.max_checks = 4;
  // The loss is O(10): with a step of 1e-6 the differences carry ~5e-9 of roundoff, as large as
  // small gradient entries' tolerance; 1e-5 divides it by ten, truncation stays near 1e-10.
  opt.eps = 1e-5;
  opt.rtol = 1e-5;
  opt.atol = 1e-9;
  int checked = 0;
  for (const auto& e : params.entries()) {
    if (!e.trainable) continue;
    CAPTURE(e.name);
    const TensorView<double> g(analytic.data() + e.offset, e.shape);
    const auto report = testing::gradcheck(e.name, params.view(e), g, loss, opt);
    INFO(report.message());
    CHECK(report.ok);
    ++checked;
  }
  CHECK(checked == 72);
  // The analytic gradient is not trivially zero anywhere it should flow.
  CHECK(ops::sum_squares(TensorView<double>(analytic)) > 0);
}

TEST_CASE("Two micro-batches accumulate to the gradient of one batch") {
  // With the teacher frozen (momentum 1), accumulation over halves must reproduce the full
  // batch: the losses are batch means and the targets use the same codebook and temperature.
  const std::int64_t B = 8;
  auto x1 = random_images<double>(B, small_config().encoder, 5);
  auto x2 = random_images<double>(B, small_config().encoder, 6);
  Moca<double> full(small_config()), accum(small_config());
  full.initialize(7);
  accum.initialize(7);
  const MocaPlan plan = full.draw_plan(Philox(8), 0, B);
  MocaHyper h;
  h.lr = 1e-3;
  h.momentum = 1.0;
  // The same masks, split by rows: view-1 rows [0, B) and view-2 rows [B, 2B) of each half.
  auto half_masks = [&](int part) {
    Tensor<Index> s1({B, 16});
    for (std::int64_t n = 0; n < B / 2; ++n)
      for (int l = 0; l < 16; ++l) {
        s1(n, l) = plan.masks.s[0](part * (B / 2) + n, l);
        s1(B / 2 + n, l) = plan.masks.s[0](B + part * (B / 2) + n, l);
      }
    return complementary_masks(std::move(s1), full.mask_lengths());
  };
  const MaskPlan m0 = half_masks(0), m1 = half_masks(1);
  CodebookRefresh refresh = plan.refresh;
  refresh.images = {static_cast<Index>(B / 2 + 0), static_cast<Index>(B / 2 + 1),
                    static_cast<Index>(B / 2 + 2), static_cast<Index>(B / 2 + 3)};
  // The same images as the last micro-batch's 0 .. 3 (it holds images B/2 .. B-1).
  const CodebookRefresh refresh_micro{refresh.view, {0, 1, 2, 3}, refresh.inner_tokens};
  full.config();
  const MocaPlan full_plan{complementary_masks(plan.masks.s[0].clone(), full.mask_lengths()), refresh};
  const auto rf = full.train_step(x1, x2, full_plan, h);
  using Micro = Moca<double>::MicroBatch;
  const Micro micro[2] = {{x1.rows(0, B / 2), x2.rows(0, B / 2), &m0},
                          {x1.rows(B / 2, B), x2.rows(B / 2, B), &m1}};
  const auto ra = accum.train_step(std::span<const Micro>(micro, 2), refresh_micro, h);
  CHECK(ra.loss == doctest::Approx(rf.loss).epsilon(1e-12));
  CHECK(ra.grad_norm == doctest::Approx(rf.grad_norm).epsilon(1e-10));
  double diff = 0, ref = 0;
  for (std::int64_t i = 0; i < full.params().num_trainable(); ++i) {
    diff = std::max(diff, std::abs(full.params().values()(i) - accum.params().values()(i)));
    ref = std::max(ref, std::abs(full.params().values()(i)));
  }
  CHECK(diff / ref < 1e-10);
  CHECK(full.codebook().ptr == accum.codebook().ptr);
}

TEST_CASE("After the first iteration a step allocates nothing") {
  Moca<float> moca(small_config());
  moca.initialize(1);
  const std::int64_t B = 4;
  auto x1 = random_images<float>(B, moca.config().encoder, 1);
  auto x2 = random_images<float>(B, moca.config().encoder, 2);
  std::vector<MocaPlan> plans;
  for (int s = 0; s < 3; ++s) plans.push_back(moca.draw_plan(Philox(2), s, B));
  MocaHyper h;
  h.lr = 1e-3;
  moca.train_step(x1, x2, plans[0], h);
  const long long heap = g_heap_allocations.load();
  const auto tensors = memory_stats<Cpu>().allocations;
  moca.train_step(x1, x2, plans[1], h);
  moca.train_step(x1, x2, plans[2], h);
  CHECK(g_heap_allocations.load() == heap);
  CHECK(memory_stats<Cpu>().allocations == tensors);
}

// Sanitizer builds run about ten times slower; they check memory safety of the same code path
// with fewer iterations, the optimised suite runs all twenty.
#if defined(__SANITIZE_ADDRESS__)
constexpr int kTinyIterations = 4;
#else
constexpr int kTinyIterations = 20;
#endif

TEST_CASE("Twenty iterations of the tiny preset lower the loss and repeat bit for bit") {
  MocaConfig cfg = MocaConfig::tiny();
  cfg.words_per_iter = 4;  // a small batch keeps the test quick; new words must not exceed it
  const std::int64_t B = 4;
  auto run = [&](std::vector<double>& losses) {
    Moca<float> moca(cfg);
    moca.initialize(0);
    auto x1 = random_images<float>(B, cfg.encoder, 11);
    auto x2 = random_images<float>(B, cfg.encoder, 12);
    MocaHyper h;
    h.lr = 5e-4;
    for (int s = 0; s < kTinyIterations; ++s) {
      const MocaPlan plan = moca.draw_plan(Philox(0), static_cast<std::uint64_t>(s), B);
      losses.push_back(moca.train_step(x1, x2, plan, h).loss);
    }
  };
  std::vector<double> a, b;
  run(a);
  run(b);
  CHECK(a == b);  // bitwise: same seed, same data, same thread count
  const std::size_t n = a.size();
  const double first = (a[0] + a[1] + a[2]) / 3, last = (a[n - 3] + a[n - 2] + a[n - 1]) / 3;
  CAPTURE(first);
  CAPTURE(last);
  CHECK(last < first);
}

TEST_CASE("Weights round trip: a reloaded model continues exactly like the original") {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / "moca_step_checkpoint_test";
  fs::create_directories(dir);
  const std::int64_t B = 4;
  auto x1 = random_images<double>(B, small_config().encoder, 1);
  auto x2 = random_images<double>(B, small_config().encoder, 2);
  MocaHyper h;
  h.lr = 1e-3;
  Moca<double> a(small_config());
  a.initialize(5);
  a.train_step(x1, x2, a.draw_plan(Philox(1), 0, B), h);  // moves weights, codebook, BN stats
  save_moca_weights(a, dir / "model.safetensors", {}, SafetensorsDtype::F64);
  Moca<double> b(small_config());
  b.initialize(99);
  load_moca_weights(b, dir / "model.safetensors");
  CHECK(b.codebook().ptr == a.codebook().ptr);
  CHECK(b.codebook().dist_norm() == a.codebook().dist_norm());
  CHECK(b.encoder_pred.layers_w[0].generator.b0_bn.num_batches_tracked == 1);
  // The optimiser state is not part of the weights: compare one plain step from the same state
  // with fresh moments on both sides.
  a.optimizer().reset();
  const auto plan = a.draw_plan(Philox(1), 1, B);
  const auto ra = a.train_step(x1, x2, plan, h);
  const auto rb = b.train_step(x1, x2, plan, h);
  CHECK(ra.loss == rb.loss);
  CHECK(ra.grad_norm == rb.grad_norm);

  // A file with a missing piece names the file and the missing tensor.
  const auto f = SafetensorsFile::open(dir / "model.safetensors");
  SafetensorsWriter partial;
  for (const auto& name : f.names())
    if (name != "bow_extractor.bow_extractor.0._dist_norm" && name != "decoder_norm_cls_pt.bias")
      partial.add_raw(name, f.dtype(name), f.shape(name), f.raw(name));
  partial.write(dir / "partial.safetensors");
  try {
    load_moca_weights(b, dir / "partial.safetensors");
    FAIL("loaded a checkpoint with missing tensors");
  } catch (const Error& e) {
    const std::string msg = e.what();
    CHECK(msg.find("partial.safetensors") != std::string::npos);
    CHECK(msg.find("_dist_norm") != std::string::npos);
    CHECK(msg.find("decoder_norm_cls_pt.bias") != std::string::npos);
  }
  // A checkpoint of another configuration is refused with the mismatched shapes.
  MocaConfig other = small_config();
  other.num_words = 64;
  Moca<double> c(other);
  CHECK_THROWS_WITH_AS(load_moca_weights(c, dir / "model.safetensors"),
                       doctest::Contains("_embedding"), Error);
  fs::remove_all(dir);
}
