// `moca extract`: loads timm-named ViT weights (optionally under a prefix such as
// "encoder_teacher." in a full MOCA checkpoint), runs the encoder on float32 images [N, C, H, W]
// (already normalised) read from the tensor `images` of a safetensors file, and writes float32
// `cls` [N, D] (class token after the final norm) and `avg` [N, D] (mean of the patch tokens
// after the final norm).
#include "extract.hpp"

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <moca/io/safetensors.hpp>
#include <moca/io/state_dict.hpp>
#include <moca/models/vit.hpp>

namespace moca::cli {

CLI::App* add_extract_command(CLI::App& app, ExtractOptions& opt) {
  CLI::App* cmd = app.add_subcommand("extract", "Extract class-token and average-pooled features");
  cmd->add_option("--weights", opt.weights, "safetensors file with timm-named ViT weights")
      ->required()
      ->check(CLI::ExistingFile);
  cmd->add_option("--input", opt.input,
                  "safetensors file whose tensor `images` is float32 [N, C, H, W], normalised")
      ->required()
      ->check(CLI::ExistingFile);
  cmd->add_option("--output", opt.output, "safetensors file to write (`cls`, `avg`)")->required();
  cmd->add_option("--img-size", opt.img_size, "image side in pixels")->required()->check(CLI::PositiveNumber);
  cmd->add_option("--patch", opt.patch, "patch side in pixels")->required()->check(CLI::PositiveNumber);
  cmd->add_option("--in-chans", opt.in_chans, "image channels")->required()->check(CLI::PositiveNumber);
  cmd->add_option("--embed-dim", opt.embed_dim, "encoder width")->required()->check(CLI::PositiveNumber);
  cmd->add_option("--depth", opt.depth, "number of blocks")->required()->check(CLI::PositiveNumber);
  cmd->add_option("--heads", opt.heads, "attention heads")->required()->check(CLI::PositiveNumber);
  cmd->add_option("--mlp-ratio", opt.mlp_ratio, "MLP hidden width / width")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--prefix", opt.prefix,
                  "name prefix of the encoder in the weights file, e.g. encoder_teacher.");
  cmd->add_option("--batch", opt.batch, "images per forward pass")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  return cmd;
}

void run_extract(const ExtractOptions& opt) {
  VitConfig cfg;
  cfg.img_size = opt.img_size;
  cfg.patch = opt.patch;
  cfg.in_chans = opt.in_chans;
  cfg.dim = opt.embed_dim;
  cfg.depth = opt.depth;
  cfg.heads = opt.heads;
  cfg.mlp_ratio = opt.mlp_ratio;
  VisionTransformer<float> vit(cfg);  // validates the configuration
  ParameterStore<float> params(vit, /*with_grads=*/false);
  params.initialize(0);  // gives pos_embed its fixed sin-cos table should the file lack it

  const auto weights = SafetensorsFile::open(opt.weights);
  const LoadReport report = load_parameters(params, weights, opt.prefix, /*strict=*/false);
  std::vector<std::string> missing;
  for (const std::string& name : report.missing)
    if (name != opt.prefix + "pos_embed") missing.push_back(name);
  MOCA_CHECK(missing.empty() && report.mismatched.empty(), opt.weights,
             ": the weights do not fit the ViT given on the command line (", cfg.dim, " wide, ",
             cfg.depth, " deep, patch ", cfg.patch, ", ", cfg.in_chans, " channels): ",
             report.str());
  if (!report.unexpected.empty())
    std::fprintf(stderr, "note: %zu tensors under prefix '%s' are not part of the ViT and were "
                 "ignored (e.g. %s)\n", report.unexpected.size(), opt.prefix.c_str(),
                 report.unexpected.front().c_str());

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
  const std::int64_t N = images.size(0), D = cfg.dim, L = cfg.num_patches(), S = 1 + L;

  Tensor<float> cls({N, D}), avg({N, D}), patches;
  const auto start = std::chrono::steady_clock::now();
  for (std::int64_t b = 0; b < N; b += opt.batch) {
    const std::int64_t e = std::min(N, b + opt.batch), n = e - b;
    vit.forward(images.rows(b, e));
    const TensorView<float> out = vit.output();
    ops::copy_strided(ops::strided_batch(out, 0, 1, D, D, S * D, n),
                      ops::strided_batch(TensorView<float>(cls).rows(b, e), 0, 1, D, D, D, n));
    patches.resize({n, L, D});
    ops::copy_strided(ops::strided_batch(out, D, L, D, D, S * D, n),
                      ops::strided_batch(TensorView<float>(patches), 0, L, D, D, L * D, n));
    ops::mean(TensorView<float>(patches), 1, TensorView<float>(avg).rows(b, e));
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::fprintf(stderr, "\rextract %lld/%lld images  %.1f images/s", static_cast<long long>(e),
                 static_cast<long long>(N), static_cast<double>(e) / std::max(secs, 1e-9));
  }
  std::fprintf(stderr, "\n");

  SafetensorsWriter out;
  out.add("cls", TensorView<float>(cls));
  out.add("avg", TensorView<float>(avg));
  out.set_metadata("weights", opt.weights);
  out.set_metadata("prefix", opt.prefix);
  out.write(opt.output);
  std::printf("wrote %s: cls [%lld, %lld], avg [%lld, %lld]\n", opt.output.c_str(),
              static_cast<long long>(N), static_cast<long long>(D), static_cast<long long>(N),
              static_cast<long long>(D));
}

}  // namespace moca::cli
