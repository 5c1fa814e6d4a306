// Customising the architecture: a Vision Transformer whose blocks use a ReLU MLP instead of
// GELU, trained with a linear head on a small synthetic task. Every part of a block is a
// template parameter checked by a concept (see include/moca/nn/concepts.hpp), so swapping one is
// a type alias:
//
//   using ReluBlock = moca::Block<float, moca::Cpu, moca::MultiHeadAttention<float>,
//                                 moca::Mlp<float, moca::Cpu, moca::Relu>>;
//   moca::VisionTransformer<float, moca::Cpu, ReluBlock> vit(config);
//
// The task: 16×16 grey images holding a bright bar, horizontal, vertical or one of the two
// diagonals, at a random place, in noise; the class is the orientation. The program trains for
// --steps steps, prints loss and accuracy, and exits with an error if the loss did not fall.
//
//   custom_architecture [--steps 300] [--batch 64] [--seed 0]
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

#include <moca/models/vit.hpp>
#include <moca/nn/losses.hpp>
#include <moca/optim/adamw.hpp>
#include <moca/optim/clip.hpp>
#include <moca/optim/param_groups.hpp>

namespace {

using namespace moca;

using ReluBlock = Block<float, Cpu, MultiHeadAttention<float>, Mlp<float, Cpu, Relu>>;
using ReluVit = VisionTransformer<float, Cpu, ReluBlock>;

constexpr int kClasses = 4;

/// The model: the customised encoder, average pooling of the patch tokens, a linear head. Its
/// parameters are named encoder.* and head.* by its visit method.
struct Classifier {
  ReluVit encoder;
  Linear<float> head;

  explicit Classifier(const VitConfig& cfg) : encoder(cfg), head(cfg.dim, kClasses) {}

  template <class V>
  void visit(V&& v) {
    v("encoder", encoder);
    v("head", head);
  }
};

/// Draws a batch: image n of step s is a function of (seed, s, n) only.
void make_batch(const Philox& rng, std::uint64_t step, Tensor<float>& images,
                Tensor<float>& targets, std::vector<int>& labels) {
  const std::int64_t N = images.size(0), S = images.size(2);
  ops::zero(TensorView<float>(targets));
  for (std::int64_t n = 0; n < N; ++n) {
    const std::uint64_t stream = step * 100003u + static_cast<std::uint64_t>(n);
    const int label = static_cast<int>(rng.below(kClasses, stream, 0));
    const auto r0 = static_cast<std::int64_t>(rng.below(static_cast<std::uint64_t>(S - 8), stream, 1));
    const auto c0 = static_cast<std::int64_t>(rng.below(static_cast<std::uint64_t>(S - 8), stream, 2));
    for (std::int64_t y = 0; y < S; ++y)
      for (std::int64_t x = 0; x < S; ++x)
        images(n, 0, y, x) = static_cast<float>(0.5 * rng.normal(stream, 16 + static_cast<std::uint64_t>(y * S + x)));
    for (std::int64_t t = 0; t < 8; ++t) {
      const std::int64_t dy[] = {0, t, t, t}, dx[] = {t, 0, t, 7 - t};
      const std::int64_t y = label == 0 ? r0 + 4 : r0 + dy[label];
      const std::int64_t x = label == 1 ? c0 + 4 : c0 + dx[label];
      images(n, 0, y, x) += 2.0f;
    }
    labels[static_cast<std::size_t>(n)] = label;
    targets(n, label) = 1.0f;
  }
}

int run(int argc, char** argv) {
  std::int64_t steps = 300, batch = 64;
  std::uint64_t seed = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&](const char* flag) -> const char* {
      MOCA_CHECK(i + 1 < argc, "option ", flag, " needs a value");
      return argv[++i];
    };
    if (a == "--steps") steps = std::atoll(value("--steps"));
    else if (a == "--batch") batch = std::atoll(value("--batch"));
    else if (a == "--seed") seed = std::strtoull(value("--seed"), nullptr, 10);
    else MOCA_CHECK(false, "unknown option '", a, "' (expected --steps, --batch or --seed)");
  }
  MOCA_CHECK(steps > 0 && batch > 0, "--steps and --batch must be positive");

  VitConfig cfg;
  cfg.img_size = 16;
  cfg.patch = 4;
  cfg.in_chans = 1;
  cfg.dim = 64;
  cfg.depth = 2;
  cfg.heads = 2;
  Classifier model(cfg);
  ParameterStore<float> params(model);
  params.initialize(seed);
  AdamW<float> optimizer(params);
  ParamGroups groups = decay_groups(params, /*lr=*/1e-3, /*weight_decay=*/0.05);
  SoftTargetCrossEntropy<float> loss_fn;

  const std::int64_t L = cfg.num_patches(), Dm = cfg.dim, S = 1 + L;
  Tensor<float> images({batch, 1, 16, 16}), targets({batch, kClasses});
  Tensor<float> patches({batch, L, Dm}), pooled({batch, Dm}), logits({batch, kClasses});
  Tensor<float> dlogits({batch, kClasses}), dpooled({batch, Dm}), dout({batch, S, Dm});
  std::vector<int> labels(static_cast<std::size_t>(batch));
  const Philox rng(seed);
  double first_loss = 0, recent_loss = 0;
  int recent_correct = 0, recent_seen = 0;

  std::printf("ViT with a ReLU MLP: %lld trainable parameters\n",
              static_cast<long long>(params.num_trainable()));
  for (std::int64_t step = 0; step < steps; ++step) {
    make_batch(rng, static_cast<std::uint64_t>(step), images, targets, labels);
    // Forward: encoder → mean of the patch tokens → head.
    model.encoder.forward(images);
    ops::copy_strided(ops::strided_batch(model.encoder.output(), Dm, L, Dm, Dm, S * Dm, batch),
                      ops::strided_batch(TensorView<float>(patches), 0, L, Dm, Dm, L * Dm, batch));
    ops::mean(TensorView<float>(patches), 1, TensorView<float>(pooled));
    model.head.forward(pooled, logits);
    const double loss = loss_fn.forward(logits, targets);
    // Backward, in reverse order; the pooled gradient is broadcast back onto every patch token.
    params.zero_grad();
    loss_fn.backward(logits, targets, dlogits);
    model.head.backward(pooled, dlogits, dpooled);
    ops::scale(TensorView<float>(dpooled), 1.0 / static_cast<double>(L));
    ops::zero(TensorView<float>(dout));
    ops::copy_strided(ops::strided_batch(TensorView<float>(dpooled), 0, L, Dm, 0, Dm, batch),
                      ops::strided_batch(TensorView<float>(dout), Dm, L, Dm, Dm, S * Dm, batch));
    model.encoder.backward({{0, dout}});
    clip_grad_norm(params, 1.0);
    optimizer.step(groups);

    for (std::int64_t n = 0; n < batch; ++n) {
      int best = 0;
      for (int k = 1; k < kClasses; ++k)
        if (logits(n, k) > logits(n, best)) best = k;
      recent_correct += best == labels[static_cast<std::size_t>(n)];
    }
    recent_seen += static_cast<int>(batch);
    if (step == 0) first_loss = loss;
    recent_loss = step == 0 ? loss : 0.9 * recent_loss + 0.1 * loss;
    if ((step + 1) % 25 == 0 || step + 1 == steps) {
      std::printf("step %5lld  loss %.4f  accuracy %.3f\n", static_cast<long long>(step + 1),
                  recent_loss, static_cast<double>(recent_correct) / recent_seen);
      recent_correct = recent_seen = 0;
    }
  }
  if (!(recent_loss < first_loss)) {
    std::fprintf(stderr, "error: the loss did not fall (%.4f at the start, %.4f at the end)\n",
                 first_loss, recent_loss);
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
}
