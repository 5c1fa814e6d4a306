// `moca extract` with a MOCA checkpoint (architecture from its metadata, --teacher/--student) and
// a data set as input (IDX folder with a split, IDX images file): features equal an in-process
// forward of the chosen encoder, labels come along; conflicting flags are errors naming them.
#include "cli_helpers.hpp"

#include <cmath>
#include <moca/data/loader.hpp>
#include <moca/eval/features.hpp>
#include <moca/io/state_dict.hpp>

using namespace moca;
using namespace moca::testing;

namespace {

// Average-pooled features of the encoder under `prefix` for the tiny preset's evaluation view of
// 28×28 images.
Tensor<float> reference_avg(const fs::path& weights, const std::string& prefix,
                            const TinyImages& t) {
  const MocaConfig cfg = tiny_cli_config();
  VisionTransformer<float> vit(cfg.encoder);
  ParameterStore<float> params(vit, false);
  REQUIRE(load_parameters(params, SafetensorsFile::open(weights), prefix, false).missing.empty());
  const auto n = static_cast<std::int64_t>(t.labels.size());
  std::vector<std::int32_t> labels(t.labels.begin(), t.labels.end());
  data::ArrayDataset ds(t.pixels, n, 28, 28, 1, std::move(labels), 4);
  data::EvalLoader loader(ds, data::AugmentConfig::fashion_mnist_tiny(), 16, 0);
  return std::move(eval::encode(vit, loader, eval::Pooling::Avg, n).features);
}

double max_abs_diff(const TensorView<float>& a, const TensorView<float>& b) {
  REQUIRE(a.shape() == b.shape());
  double m = 0;
  for (std::int64_t i = 0; i < a.numel(); ++i)
    m = std::max(m, std::abs(static_cast<double>(a.data()[i]) - b.data()[i]));
  return m;
}

}  // namespace

TEST_CASE("moca extract from a checkpoint and a data set") {
  TempDir tmp("cli_extract_data");
  const fs::path& dir = tmp.path;
  const TinyImages train = tiny_images(12, 4, 1), test = tiny_images(10, 4, 2);
  write_idx_folder(dir / "idx", train, test);
  const MocaConfig cfg = tiny_cli_config();
  Moca<float> m(cfg);
  init_distinct(m, 5);
  const fs::path weights = write_checkpoint(m, dir / "run", cfg) / "weights.safetensors";
  const std::string run = " --checkpoint " + (dir / "run").string();
  const std::string out = " --output " + (dir / "f.safetensors").string();

  SUBCASE("teacher and student of the test split, with labels") {
    CliRun r = run_cli("extract" + run + " --input " + (dir / "idx").string() + ":test" + out +
                           " --batch 4",
                       dir);
    REQUIRE_MESSAGE(r.status == 0, r.err);
    auto f = SafetensorsFile::open(dir / "f.safetensors");
    const Tensor<float> teacher = f.read<float>("avg");
    REQUIRE(teacher.shape() == Shape{10, 16});
    CHECK(f.read<float>("cls").shape() == Shape{10, 16});
    REQUIRE(f.contains("labels"));
    CHECK(f.dtype("labels") == SafetensorsDtype::I32);
    const Tensor<std::int32_t> labels = f.read<std::int32_t>("labels");
    REQUIRE(labels.numel() == 10);
    for (int i = 0; i < 10; ++i) CHECK(labels.data()[i] == test.labels[static_cast<std::size_t>(i)]);
    CHECK(max_abs_diff(teacher, reference_avg(weights, "encoder_teacher.", test)) < 1e-5);

    r = run_cli("extract" + run + " --input " + (dir / "idx").string() + ":test" + out +
                    " --student",
                dir);
    REQUIRE_MESSAGE(r.status == 0, r.err);
    f = SafetensorsFile::open(dir / "f.safetensors");
    const Tensor<float> student = f.read<float>("avg");
    CHECK(max_abs_diff(student, reference_avg(weights, "encoder.", test)) < 1e-5);
    CHECK(max_abs_diff(student, teacher) > 1e-3);  // the flag picks another encoder
  }

  SUBCASE("the train split by default, and an IDX images file with its labels file") {
    CliRun r = run_cli("extract" + run + " --input " + (dir / "idx").string() + out, dir);
    REQUIRE_MESSAGE(r.status == 0, r.err);
    CHECK(SafetensorsFile::open(dir / "f.safetensors").shape("cls")[0] == 12);
    r = run_cli("extract --checkpoint " + weights.string() + " --input " +
                    (dir / "idx" / "train-images-idx3-ubyte").string() + out,
                dir);
    REQUIRE_MESSAGE(r.status == 0, r.err);
    const auto f = SafetensorsFile::open(dir / "f.safetensors");
    CHECK(max_abs_diff(f.read<float>("avg"), reference_avg(weights, "encoder_teacher.", train)) <
          1e-5);
    CHECK(f.read<std::int32_t>("labels").numel() == 12);
  }

  SUBCASE("an unlabelled IDX file gives no labels") {
    fs::create_directories(dir / "solo");
    fs::copy_file(dir / "idx" / "t10k-images-idx3-ubyte", dir / "solo" / "t10k-images-idx3-ubyte");
    const CliRun r = run_cli("extract" + run + " --input " +
                                 (dir / "solo" / "t10k-images-idx3-ubyte").string() + out,
                             dir);
    REQUIRE_MESSAGE(r.status == 0, r.err);
    const auto f = SafetensorsFile::open(dir / "f.safetensors");
    CHECK(f.shape("avg")[0] == 10);
    CHECK_FALSE(f.contains("labels"));
  }

  SUBCASE("conflicting or missing flags, and missing data") {
    const std::string in = " --input " + (dir / "idx").string();
    CliRun r = run_cli("extract" + run + in + out + " --img-size 32", dir);
    CHECK(r.status != 0);
    CHECK(contains(r.err, "--img-size"));
    r = run_cli("extract" + run + " --weights " + weights.string() + in + out, dir);
    CHECK(r.status != 0);
    CHECK(contains(r.err, "--weights"));
    CHECK(contains(r.err, "--checkpoint"));
    r = run_cli("extract" + run + " --prefix encoder." + in + out, dir);
    CHECK(r.status != 0);
    CHECK(contains(r.err, "--prefix"));
    r = run_cli("extract --weights " + weights.string() + in + out +
                    " --img-size 32 --patch 8 --in-chans 1 --embed-dim 16 --depth 2 --heads 2 "
                    "--student",
                dir);
    CHECK(r.status != 0);
    CHECK(contains(r.err, "--student"));
    CHECK(contains(r.err, "--prefix"));
    r = run_cli("extract" + in + out, dir);
    CHECK(r.status != 0);
    CHECK(contains(r.err, "--checkpoint"));
    r = run_cli("extract" + run + " --input " + (dir / "nothing").string() + out, dir);
    CHECK(r.status != 0);
    CHECK(contains(r.err, "nothing"));
    CHECK(contains(r.err, "does not exist"));
    r = run_cli("extract" + run + " --input " + (dir / "idx").string() + ":val" + out, dir);
    CHECK(r.status != 0);
    CHECK(contains(r.err, "idx:val"));
    CHECK_FALSE(fs::exists(dir / "f.safetensors"));
  }

  SUBCASE("timm-named weights with the architecture flags still work on a data set") {
    const CliRun r = run_cli("extract --weights " + weights.string() +
                                 " --prefix encoder_teacher. --input " + (dir / "idx").string() +
                                 ":test" + out +
                                 " --img-size 32 --patch 8 --in-chans 1 --embed-dim 16 --depth 2 "
                                 "--heads 2",
                             dir);
    REQUIRE_MESSAGE(r.status == 0, r.err);
    const auto f = SafetensorsFile::open(dir / "f.safetensors");
    CHECK(max_abs_diff(f.read<float>("avg"), reference_avg(weights, "encoder_teacher.", test)) <
          1e-5);
  }
}
