// `moca extract`: runs a ViT encoder over images and writes float32 `cls` [N, D] (class token
// after the final norm) and `avg` [N, D] (mean of the patch tokens after the final norm), plus
// int32 `labels` [N] when the images are a labelled data set.
//
// The encoder comes either from timm-named weights (--weights, optionally under a --prefix such
// as "encoder_teacher.", with the architecture given by flags) or from a MOCA checkpoint
// (--checkpoint: weights file, checkpoint folder or run folder; the architecture is read from
// the checkpoint and --teacher/--student pick the encoder). The images are either the float32
// tensor `images` [N, C, H, W] (already normalised) of a .safetensors file, or any data set that
// `moca knn --data` accepts (fashion-mnist[:train|:test], an IDX folder[:split], an IDX images
// file, an image folder), preprocessed like the k-NN evaluation. --device cuda runs the encoder
// (in float) on the GPU; the images are read and preprocessed on the host.
#include "extract.hpp"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <memory>
#include <moca/data/loader.hpp>
#include <moca/eval/features.hpp>
#include <moca/io/safetensors.hpp>
#include <moca/io/state_dict.hpp>
#include <moca/models/vit.hpp>
#include <moca/train/progress.hpp>
#include <vector>

#include "data_source.hpp"
#include "device.hpp"
#include "knn.hpp"
#include "run_files.hpp"

namespace moca::cli {

namespace {

const char* const kArchitectureFlags[] = {"--img-size",  "--patch", "--in-chans",
                                          "--embed-dim", "--depth", "--heads"};

// Runs the encoder over a batch of images [n, C, H, W] and writes the class token and the patch
// average of its output into rows [b, b + n) of cls and avg.
using BatchEncoder = std::function<void(const TensorView<float>& images, std::int64_t b)>;

BatchEncoder encoder_on_cpu(VisionTransformer<float>& vit, Tensor<float>& cls, Tensor<float>& avg) {
  return [&vit, &cls, &avg, scratch = std::make_shared<Tensor<float>>()](
             const TensorView<float>& images, std::int64_t b) {
    vit.forward_inference(images);
    const TensorView<float> out = vit.output();
    const std::int64_t n = out.size(0);
    eval::pool_tokens(out, eval::Pooling::Cls, TensorView<float>(cls).rows(b, b + n), *scratch);
    eval::pool_tokens(out, eval::Pooling::Avg, TensorView<float>(avg).rows(b, b + n), *scratch);
  };
}

#if MOCA_WITH_CUDA
// The same encoder on the GPU (its parameter arenas have the host store's layout): each batch is
// copied up, and its two pooled rows come back.
struct GpuEncoder {
  GpuEncoder(const VitConfig& cfg, const ParameterStore<float>& host)
      : vit(cfg), params(vit, /*with_grads=*/false) {
    copy(host.values(), params.values());
    copy(host.frozen(), params.frozen());
  }
  void operator()(const TensorView<float>& images, std::int64_t b, Tensor<float>& cls,
                  Tensor<float>& avg) {
    const std::int64_t n = images.size(0), D = vit.config().dim;
    input.resize(images.shape());
    pooled.resize({n, D});
    ops::upload_converted(images, TensorView<float, Cuda>(input), stage);
    vit.forward_inference(input);
    for (auto [pooling, out] : {std::pair{eval::Pooling::Cls, &cls}, {eval::Pooling::Avg, &avg}}) {
      eval::pool_tokens(vit.output(), pooling, TensorView<float, Cuda>(pooled), scratch);
      ops::download_converted(TensorView<float, Cuda>(pooled),
                              TensorView<float>(*out).rows(b, b + n), stage);
    }
  }
  VisionTransformer<float, Cuda> vit;
  ParameterStore<float, Cuda> params;
  Tensor<float, Cuda> input, pooled, scratch;
  Tensor<float> stage;
};
#endif

}  // namespace

CLI::App* add_extract_command(CLI::App& app, ExtractOptions& opt) {
  CLI::App* cmd = app.add_subcommand("extract", "Extract class-token and average-pooled features");
  opt.command = cmd;
  auto* weights =
      cmd->add_option("--weights", opt.weights,
                      "safetensors file with timm-named ViT weights (give the architecture flags)")
          ->check(CLI::ExistingFile);
  auto* checkpoint = cmd->add_option(
      "--checkpoint", opt.checkpoint,
      "a MOCA checkpoint (weights file, checkpoint folder or run folder): the architecture is "
      "read from it");
  weights->excludes(checkpoint);
  cmd->add_option("--input", opt.input,
                  "a .safetensors file whose tensor `images` is float32 [N, C, H, W], normalised; "
                  "or a data set: fashion-mnist[:train|:test], a folder of IDX files[:train|:test], "
                  "an IDX images file, an image folder")
      ->required();
  cmd->add_option("--output", opt.output, "safetensors file to write (`cls`, `avg`, `labels`)")
      ->required();
  cmd->add_option("--img-size", opt.img_size, "image side in pixels")->check(positive_value());
  cmd->add_option("--patch", opt.patch, "patch side in pixels")->check(positive_value());
  cmd->add_option("--in-chans", opt.in_chans, "image channels")->check(positive_value());
  cmd->add_option("--embed-dim", opt.embed_dim, "encoder width")->check(positive_value());
  cmd->add_option("--depth", opt.depth, "number of blocks")->check(positive_value());
  cmd->add_option("--heads", opt.heads, "attention heads")->check(positive_value());
  cmd->add_option("--mlp-ratio", opt.mlp_ratio, "MLP hidden width / width")
      ->capture_default_str()
      ->check(positive_value());
  auto* prefix = cmd->add_option(
      "--prefix", opt.prefix, "name prefix of the encoder in the weights file, e.g. encoder_teacher.");
  prefix->excludes(checkpoint);
  auto* teacher = cmd->add_flag("--teacher", opt.teacher,
                                "with --checkpoint: the EMA teacher encoder (default)");
  auto* student =
      cmd->add_flag("--student", opt.student, "with --checkpoint: the student encoder");
  teacher->excludes(student);
  cmd->add_option("--device", opt.device, "where the encoder runs: cpu or cuda (the first GPU)")
      ->capture_default_str();
  cmd->add_option("--batch", opt.batch, "images per forward pass")
      ->capture_default_str()
      ->check(positive_value());
  cmd->add_option("--threads", opt.threads, "CPU threads (0: all)")
      ->capture_default_str()
      ->check(non_negative_value());
  cmd->add_option("--workers", opt.workers, "preprocessing threads for a data set input")
      ->capture_default_str()
      ->check(non_negative_value());
  cmd->add_flag("--strict", opt.strict,
                "an unreadable image is an error (default: skipped with a warning)");
  return cmd;
}

void run_extract(const ExtractOptions& opt) {
  namespace fs = std::filesystem;
  set_cpu_threads(opt.threads);
  require_device(opt.device);
  auto given = [&](const char* flag) { return opt.command != nullptr && opt.command->count(flag) > 0; };

  // The encoder.
  VitConfig cfg;
  std::string prefix, weights_path, model;
  SafetensorsFile weights;
  if (!opt.checkpoint.empty()) {
    std::string extra;
    for (const char* flag : kArchitectureFlags)
      if (given(flag)) extra += std::string(extra.empty() ? "" : ", ") + flag;
    if (given("--mlp-ratio")) extra += std::string(extra.empty() ? "" : ", ") + "--mlp-ratio";
    MOCA_CHECK(extra.empty(), "--checkpoint reads the architecture from the checkpoint: drop ",
               extra);
    weights_path = resolve_weights(opt.checkpoint).string();
    weights = SafetensorsFile::open(weights_path);
    cfg = read_moca_config(weights).encoder;
    prefix = encoder_prefix(!opt.student);
    model = detail::str("the encoder its '", kConfigKey, "' metadata describes");
  } else {
    MOCA_CHECK(!opt.weights.empty(), "give --checkpoint (a MOCA checkpoint or run folder) or "
               "--weights (timm-named ViT weights) with the architecture flags --img-size, "
               "--patch, --in-chans, --embed-dim, --depth, --heads");
    std::string missing;
    for (const char* flag : kArchitectureFlags)
      if (!given(flag)) missing += std::string(missing.empty() ? "" : ", ") + flag;
    MOCA_CHECK(missing.empty(), "--weights needs the architecture flags; missing: ", missing,
               " (or give a MOCA --checkpoint, which records its architecture)");
    MOCA_CHECK(!opt.teacher && !opt.student, "--teacher and --student choose the encoder of a "
               "--checkpoint; with --weights give the name --prefix instead");
    cfg.img_size = opt.img_size;
    cfg.patch = opt.patch;
    cfg.in_chans = opt.in_chans;
    cfg.dim = opt.embed_dim;
    cfg.depth = opt.depth;
    cfg.heads = opt.heads;
    cfg.mlp_ratio = opt.mlp_ratio;
    weights_path = opt.weights;
    weights = SafetensorsFile::open(weights_path);
    prefix = opt.prefix;
    model = "the ViT given on the command line";
  }
  VisionTransformer<float> vit(cfg);  // validates the configuration
  ParameterStore<float> params(vit, /*with_grads=*/false);
  params.initialize(0);  // gives pos_embed its fixed sin-cos table should the file lack it
  const LoadReport report =
      load_vit_weights(params, weights, prefix,
                       detail::str(model, " (", cfg.dim, " wide, ", cfg.depth, " deep, patch ",
                                   cfg.patch, ", ", cfg.in_chans, " channels)"));
  if (!report.unexpected.empty())
    std::fprintf(stderr, "note: %zu tensors under prefix '%s' are not part of the ViT and were "
                 "ignored (e.g. %s)\n", report.unexpected.size(), prefix.c_str(),
                 report.unexpected.front().c_str());

  // The images, and the features.
  const std::int64_t D = cfg.dim;
  Tensor<float> cls, avg;
  BatchEncoder encode = encoder_on_cpu(vit, cls, avg);
#if MOCA_WITH_CUDA
  std::shared_ptr<GpuEncoder> gpu;
  if (opt.device == "cuda") {
    gpu = std::make_shared<GpuEncoder>(cfg, params);
    encode = [gpu, &cls, &avg](const TensorView<float>& images, std::int64_t b) {
      (*gpu)(images, b, cls, avg);
    };
  }
#endif
  std::vector<std::int32_t> labels;
  bool labelled = false;
  std::string source;
  if (fs::path(opt.input).extension() == ".safetensors") {
    const auto input = SafetensorsFile::open(opt.input);
    MOCA_CHECK(input.contains("images"), opt.input, ": no tensor named `images` (found: ",
               [&] {
                 std::string s;
                 for (const auto& n : input.names()) s += (s.empty() ? "" : ", ") + n;
                 return s.empty() ? std::string("none") : s;
               }(),
               ")");
    const auto& shape = input.shape("images");
    MOCA_CHECK(shape.size() == 4 && shape[1] == cfg.in_chans && shape[2] == cfg.img_size &&
                   shape[3] == cfg.img_size,
               opt.input, ": `images` has shape ", detail::shape_str(shape), ", expected [N, ",
               cfg.in_chans, ", ", cfg.img_size, ", ", cfg.img_size, "]");
    const Tensor<float> images = input.read<float>("images");
    const std::int64_t N = images.size(0);
    cls.resize({N, D});
    avg.resize({N, D});
    train::ProgressBar bar("extract", N);
    for (std::int64_t b = 0; b < N; b += opt.batch) {
      const std::int64_t e = std::min(N, b + opt.batch);
      encode(images.rows(b, e), b);
      bar.update(e);
    }
    bar.finish();
    source = opt.input;
  } else {
    const std::unique_ptr<data::Dataset> ds = open_dataset(opt.input, opt.strict, &source);
    const std::int64_t N = ds->size();
    MOCA_CHECK(N > 0, opt.input, ": the data set holds no images");
    labelled = ds->num_classes() > 0;
    data::EvalLoader loader(*ds, augment_for(cfg, is_fashion_mnist_like(*ds)), opt.batch,
                            opt.workers);
    const auto& t = loader.transform();
    MOCA_CHECK(t.channels() == cfg.in_chans && t.size() == cfg.img_size, "preprocessing makes ",
               t.channels(), "×", t.size(), "×", t.size(), " images but the encoder takes ",
               cfg.in_chans, "×", cfg.img_size, "×", cfg.img_size);
    cls.resize({N, D});
    avg.resize({N, D});
    labels.assign(static_cast<std::size_t>(N), -1);
    train::ProgressBar bar("extract", N);
    std::int64_t done = 0;
    while (const data::EvalBatch* batch = loader.next()) {
      encode(batch->images, done);
      std::copy(batch->labels.begin(), batch->labels.end(),
                labels.begin() + static_cast<std::ptrdiff_t>(done));
      done += batch->size();
      bar.update(done);
    }
    bar.finish();
    MOCA_CHECK(done == N, opt.input, ": read ", done, " of ", N, " images");
  }

  const std::int64_t N = cls.size(0);
  SafetensorsWriter out;
  out.add("cls", TensorView<float>(cls));
  out.add("avg", TensorView<float>(avg));
  if (labelled) {
    out.add("labels",
            TensorView<std::int32_t>(labels.data(), Shape{static_cast<std::int64_t>(labels.size())}));
  }
  out.set_metadata("weights", weights_path);
  out.set_metadata("prefix", prefix);
  out.set_metadata("input", source);
  out.set_metadata("device", opt.device);
  out.write(opt.output);
  std::printf("wrote %s: cls [%lld, %lld], avg [%lld, %lld]%s\n", opt.output.c_str(),
              static_cast<long long>(N), static_cast<long long>(D), static_cast<long long>(N),
              static_cast<long long>(D),
              labelled ? detail::str(", labels [", N, "]").c_str() : "");
}

}  // namespace moca::cli
