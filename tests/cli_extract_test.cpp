// `moca extract` end to end: the binary's features equal an in-process forward; bad arguments,
// missing tensors and shape mismatches end with a non-zero status and a message saying what was
// expected.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <moca/io/safetensors.hpp>
#include <moca/io/state_dict.hpp>
#include <moca/models/vit.hpp>
#include <sstream>
#include <string>

#include "cli_program.hpp"

using namespace moca;
namespace fs = std::filesystem;

namespace {

using moca::testing::CliRun;
using moca::testing::run_cli;

VitConfig small() {
  VitConfig c;
  c.img_size = 8;
  c.patch = 2;
  c.in_chans = 2;
  c.dim = 16;
  c.depth = 2;
  c.heads = 2;
  return c;
}

std::string model_flags(const VitConfig& c) {
  return " --img-size " + std::to_string(c.img_size) + " --patch " + std::to_string(c.patch) +
         " --in-chans " + std::to_string(c.in_chans) + " --embed-dim " + std::to_string(c.dim) +
         " --depth " + std::to_string(c.depth) + " --heads " + std::to_string(c.heads);
}

}  // namespace

TEST_CASE("moca extract writes the class token and the patch average of the final output") {
  const fs::path dir = fs::temp_directory_path() / "moca_cli_extract_test";
  fs::remove_all(dir);
  fs::create_directories(dir);
  const VitConfig cfg = small();
  VisionTransformer<float> vit(cfg);
  ParameterStore<float> params(vit, false);
  params.initialize(42);
  save_parameters(params, dir / "ckpt.safetensors", "encoder_teacher.");

  Tensor<float> images({5, 2, 8, 8});
  fill_uniform(images, Philox(3), 0, -1, 1);
  {
    SafetensorsWriter w;
    w.add("images", TensorView<float>(images));
    w.write(dir / "images.safetensors");
  }
  const std::string io = " --weights " + (dir / "ckpt.safetensors").string() + " --input " +
                         (dir / "images.safetensors").string() + " --output " +
                         (dir / "features.safetensors").string();

  SUBCASE("features match an in-process forward, across batches") {
    const CliRun r = run_cli("extract" + io + model_flags(cfg) +
                              " --prefix encoder_teacher. --batch 2",
                          dir);
    REQUIRE_MESSAGE(r.status == 0, r.err);
    const auto f = SafetensorsFile::open(dir / "features.safetensors");
    const Tensor<float> cls = f.read<float>("cls"), avg = f.read<float>("avg");
    REQUIRE(cls.shape() == Shape{5, 16});
    REQUIRE(avg.shape() == Shape{5, 16});
    vit.forward(images);
    const auto out = vit.output();
    double max_abs = 0;
    for (int n = 0; n < 5; ++n)
      for (int d = 0; d < 16; ++d) {
        double mean = 0;
        for (int l = 1; l <= 16; ++l) mean += out(n, l, d) / 16.0;
        CHECK(cls(n, d) == doctest::Approx(out(n, 0, d)).epsilon(1e-5));
        CHECK(avg(n, d) == doctest::Approx(mean).epsilon(1e-5).scale(1.0));
        max_abs = std::max(max_abs, std::abs(static_cast<double>(cls(n, d))));
      }
    CHECK(max_abs > 0.1);  // real features, not zeros
  }

  SUBCASE("--device cuda: the GPU's features equal the CPU's, or a clear error without one") {
    const std::string args = " --input " + (dir / "images.safetensors").string() + " --weights " +
                             (dir / "ckpt.safetensors").string() + model_flags(cfg) +
                             " --prefix encoder_teacher. --batch 2 --output ";
    const CliRun cpu = run_cli("extract" + args + (dir / "cpu.safetensors").string(), dir);
    REQUIRE_MESSAGE(cpu.status == 0, cpu.err);
    const CliRun gpu =
        run_cli("extract --device cuda" + args + (dir / "gpu.safetensors").string(), dir);
    if (gpu.status == 0) {
      MESSAGE("extracted on the GPU");
      const auto a = SafetensorsFile::open(dir / "cpu.safetensors");
      const auto b = SafetensorsFile::open(dir / "gpu.safetensors");
      CHECK(b.metadata("device") == "cuda");
      for (const char* name : {"cls", "avg"}) {
        // fp32 products on both devices: the same features up to float rounding.
        const Tensor<float> x = a.read<float>(name), y = b.read<float>(name);
        REQUIRE(x.shape() == y.shape());
        double d = 0, n = 0;
        for (std::int64_t i = 0; i < x.numel(); ++i) {
          d += (double(y.data()[i]) - x.data()[i]) * (double(y.data()[i]) - x.data()[i]);
          n += double(x.data()[i]) * x.data()[i];
        }
        CHECK_MESSAGE(std::sqrt(d / n) < 1e-4, name);
      }
    } else {
      CAPTURE(gpu.err);
      CHECK(std::getenv("MOCA_REQUIRE_CUDA") == nullptr);  // a run asking for the GPU fails here
      CHECK((gpu.err.find("--device cuda: no CUDA device is available") != std::string::npos ||
             gpu.err.find("--device cuda: this moca was built without the CUDA backend") !=
                 std::string::npos));
      CHECK(!fs::exists(dir / "gpu.safetensors"));
    }
    const CliRun wrong = run_cli("extract --device gpu" + args + "x.safetensors", dir);
    CHECK(wrong.status != 0);
    CHECK(wrong.err.find("--device must be cpu or cuda, got 'gpu'") != std::string::npos);
  }

  SUBCASE("weights that do not fit the given architecture") {
    VitConfig wrong = cfg;
    wrong.dim = 32;
    const CliRun r = run_cli("extract" + io + model_flags(wrong) + " --prefix encoder_teacher.", dir);
    CHECK(r.status != 0);
    CHECK(r.err.find("ckpt.safetensors") != std::string::npos);
    CHECK(r.err.find("expected [32") != std::string::npos);
  }

  SUBCASE("a wrong prefix leaves every tensor missing") {
    const CliRun r = run_cli("extract" + io + model_flags(cfg) + " --prefix encoder.", dir);
    CHECK(r.status != 0);
    CHECK(r.err.find("missing") != std::string::npos);
    CHECK(r.err.find("encoder.cls_token") != std::string::npos);
  }

  SUBCASE("an input without `images`, or with the wrong image size") {
    {
      SafetensorsWriter w;
      w.add("pixels", TensorView<float>(images));
      w.write(dir / "noimages.safetensors");
    }
    CliRun r = run_cli("extract --weights " + (dir / "ckpt.safetensors").string() + " --input " +
                        (dir / "noimages.safetensors").string() + " --output " +
                        (dir / "f.safetensors").string() + model_flags(cfg) +
                        " --prefix encoder_teacher.",
                    dir);
    CHECK(r.status != 0);
    CHECK(r.err.find("no tensor named `images`") != std::string::npos);
    CHECK(r.err.find("pixels") != std::string::npos);
    VitConfig bigger = cfg;
    bigger.img_size = 16;  // more patches: the position table in the file no longer fits
    r = run_cli("extract" + io + model_flags(bigger) + " --prefix encoder_teacher.", dir);
    CHECK(r.status != 0);
    CHECK(r.err.find("pos_embed") != std::string::npos);
  }

  SUBCASE("missing files and unknown flags") {
    CliRun r = run_cli("extract --weights " + (dir / "nope.safetensors").string() + " --input " +
                        (dir / "images.safetensors").string() + " --output x" + model_flags(cfg),
                    dir);
    CHECK(r.status != 0);
    CHECK(r.err.find("nope.safetensors") != std::string::npos);
    r = run_cli("extract" + io + model_flags(cfg) + " --frobnicate 3", dir);
    CHECK(r.status != 0);
    CHECK(r.err.find("frobnicate") != std::string::npos);
    r = run_cli("extract" + io, dir);  // no architecture
    CHECK(r.status != 0);
    CHECK(r.err.find("--img-size") != std::string::npos);
  }
  fs::remove_all(dir);
}
