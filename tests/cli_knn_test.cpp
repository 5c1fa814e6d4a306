// `moca knn` end to end on a tiny checkpoint and a small IDX data set: the accuracies equal an
// in-process run of the same protocol, for the teacher and the student; bad checkpoints, flags
// and data sets end with a non-zero status and a message naming the file or flag; an unreadable
// image in a folder is skipped with a warning, or is an error with --strict.
#include "cli_helpers.hpp"

#include <cstdlib>

#define STB_IMAGE_WRITE_STATIC
#define STB_IMAGE_WRITE_IMPLEMENTATION
#include <stb/stb_image_write.h>

#include <moca/data/loader.hpp>
#include <moca/eval/features.hpp>
#include <moca/eval/knn.hpp>
#include <moca/io/state_dict.hpp>
#include <nlohmann/json.hpp>

using namespace moca;
using namespace moca::testing;

namespace {

// The k-NN protocol in this process: features of the encoder under `prefix` of `weights`, with
// the tiny preset's evaluation preprocessing of 28×28 images.
std::vector<eval::KnnAccuracy> reference_knn(const fs::path& weights, const std::string& prefix,
                                             const TinyImages& bank, const TinyImages& queries,
                                             std::int64_t bank_n, std::int64_t query_n) {
  const MocaConfig cfg = tiny_cli_config();
  VisionTransformer<float> vit(cfg.encoder);
  ParameterStore<float> params(vit, false);
  REQUIRE(load_parameters(params, SafetensorsFile::open(weights), prefix, false).missing.empty());
  auto features = [&](const TinyImages& t, std::int64_t n) {
    std::vector<std::int32_t> labels(t.labels.begin(), t.labels.begin() + n);
    std::vector<std::uint8_t> px(t.pixels.begin(), t.pixels.begin() + n * 28 * 28);
    data::ArrayDataset ds(std::move(px), n, 28, 28, 1, std::move(labels), 4);
    data::EvalLoader loader(ds, data::AugmentConfig::fashion_mnist_tiny(), 7, 0);
    return eval::encode(vit, loader, eval::Pooling::Avg, n);
  };
  const eval::Features b = features(bank, bank_n), q = features(queries, query_n);
  return eval::knn_evaluate(TensorView<float>(b.features), std::span<const std::int32_t>(b.labels),
                            TensorView<float>(q.features), std::span<const std::int32_t>(q.labels),
                            {10, 20}, 0.07, 10);
}

// A 20×20 grey PNG: bright left half (vertical) or bright top half (not vertical).
void write_png(const fs::path& p, bool vertical) {
  const int side = 20;
  std::vector<std::uint8_t> px(static_cast<std::size_t>(side * side));
  for (int y = 0; y < side; ++y)
    for (int x = 0; x < side; ++x)
      px[static_cast<std::size_t>(y * side + x)] = (vertical ? x < side / 2 : y < side / 2) ? 220 : 20;
  REQUIRE(stbi_write_png(p.string().c_str(), side, side, 1, px.data(), side) != 0);
}

// An image folder with train/ and val/, classes a and b, three PNGs each (the same per class).
void write_png_folder(const fs::path& root) {
  for (const char* split : {"train", "val"})
    for (const char* cls : {"a", "b"}) {
      const fs::path d = root / split / cls;
      fs::create_directories(d);
      for (int i = 0; i < 3; ++i)
        write_png(d / ("img" + std::to_string(i) + ".png"), cls[0] == 'a');
    }
}

}  // namespace

TEST_CASE("moca knn reports the accuracies of the in-process protocol") {
  TempDir tmp("cli_knn");
  const fs::path& dir = tmp.path;
  const TinyImages train = tiny_images(40, 4, 1), test = tiny_images(20, 4, 2);
  write_idx_folder(dir / "idx", train, test);
  const MocaConfig cfg = tiny_cli_config();
  Moca<float> m(cfg);
  init_distinct(m, 3);
  const fs::path ckpt = write_checkpoint(m, dir / "run", cfg, 7);
  const fs::path weights = ckpt / "weights.safetensors";
  const std::string data = " --data " + (dir / "idx").string();

  SUBCASE("teacher (default), from the run folder, with a JSON file") {
    const CliRun r = run_cli("knn --checkpoint " + (dir / "run").string() + data +
                                 " --json " + (dir / "knn.json").string(),
                             dir);
    REQUIRE_MESSAGE(r.status == 0, r.err);
    CHECK(contains(r.out, "top-1 %"));
    const nlohmann::json j = nlohmann::json::parse(read_file_text(dir / "knn.json"));
    CHECK(j["encoder"] == "teacher");
    CHECK(j["pooling"] == "avg");
    CHECK(j["bank"] == 40);
    CHECK(j["queries"] == 20);
    CHECK(j["classes"] == 10);  // a folder of IDX files is read as Fashion-MNIST: ten classes
    CHECK(contains(j["weights"].get<std::string>(), "step-0000007"));
    const auto ref = reference_knn(weights, "encoder_teacher.", train, test, 40, 20);
    REQUIRE(j["results"].size() == 2);
    for (std::size_t i = 0; i < 2; ++i) {
      const nlohmann::json& e = j["results"][i];
      CHECK(e["k"] == (i == 0 ? 10 : 20));
      CHECK(e["temperature"] == 0.07);
      CHECK(e["count"] == 20);
      const double top1 = e["top1"], top5 = e["top5"];
      CHECK(top1 >= 0.0);
      CHECK(top1 <= top5);
      CHECK(top5 <= 1.0);
      CHECK(e["correct1"] == ref[i].correct1);
      CHECK(e["correct5"] == ref[i].correct5);
    }
    // Only four of the ten classes occur, so every query's class is among the best five.
    CHECK(j["results"][0]["top5"] == 1.0);
  }

  SUBCASE("--device cuda: the encoder on the GPU, or a clear error without one") {
    const CliRun r = run_cli("knn --device cuda --checkpoint " + (dir / "run").string() + data +
                                 " --json " + (dir / "knn_cuda.json").string(),
                             dir);
    if (r.status == 0) {
      MESSAGE("encoded on the GPU");
      const nlohmann::json j = nlohmann::json::parse(read_file_text(dir / "knn_cuda.json"));
      CHECK(j["device"] == "cuda");
      CHECK(j["bank"] == 40);
      CHECK(j["queries"] == 20);
      CHECK(j["results"].size() == 2);
    } else {
      CAPTURE(r.err);
      CHECK(std::getenv("MOCA_REQUIRE_CUDA") == nullptr);  // a run asking for the GPU fails here
      CHECK((contains(r.err, "--device cuda: no CUDA device is available") ||
             contains(r.err, "--device cuda: this moca was built without the CUDA backend")));
      CHECK(!fs::exists(dir / "knn_cuda.json"));
    }
  }

  SUBCASE("student, a checkpoint folder, limits, cls pooling and other k") {
    CliRun r = run_cli("knn --checkpoint " + ckpt.string() + data +
                           " --student --bank-limit 24 --query-limit 8 -k 3,5 --temperature 0.1 "
                           "--pool cls --batch 5 --threads 1 --json " +
                           (dir / "s.json").string(),
                       dir);
    REQUIRE_MESSAGE(r.status == 0, r.err);
    nlohmann::json j = nlohmann::json::parse(read_file_text(dir / "s.json"));
    CHECK(j["encoder"] == "student");
    CHECK(j["pooling"] == "cls");
    CHECK(j["bank"] == 24);
    CHECK(j["queries"] == 8);
    REQUIRE(j["results"].size() == 2);
    CHECK(j["results"][0]["k"] == 3);
    CHECK(j["results"][1]["k"] == 5);
    CHECK(j["results"][1]["temperature"] == 0.1);
    CHECK(j["results"][0]["count"] == 8);

    // The student's numbers with the default protocol match the in-process student.
    r = run_cli("knn --checkpoint " + weights.string() + data + " --student --json " +
                    (dir / "s2.json").string(),
                dir);
    REQUIRE_MESSAGE(r.status == 0, r.err);
    j = nlohmann::json::parse(read_file_text(dir / "s2.json"));
    const auto ref = reference_knn(weights, "encoder.", train, test, 40, 20);
    CHECK(j["results"][0]["correct1"] == ref[0].correct1);
    CHECK(j["results"][1]["correct1"] == ref[1].correct1);
  }

  SUBCASE("an image folder with train/ and val/") {
    write_png_folder(dir / "png");
    const CliRun r = run_cli("knn --checkpoint " + weights.string() + " --data " +
                                 (dir / "png").string() + " -k 1 --json " +
                                 (dir / "p.json").string(),
                             dir);
    REQUIRE_MESSAGE(r.status == 0, r.err);
    const nlohmann::json j = nlohmann::json::parse(read_file_text(dir / "p.json"));
    CHECK(j["bank"] == 6);
    CHECK(j["queries"] == 6);
    CHECK(j["classes"] == 2);
    CHECK(j["results"][0]["top1"] == 1.0);  // identical images in both splits
  }
}

TEST_CASE("moca knn: bad checkpoints, flags and data sets") {
  TempDir tmp("cli_knn_bad");
  const fs::path& dir = tmp.path;
  const TinyImages train = tiny_images(12, 4, 1), test = tiny_images(8, 4, 2);
  write_idx_folder(dir / "idx", train, test);
  const MocaConfig cfg = tiny_cli_config();
  Moca<float> m(cfg);
  init_distinct(m, 3);
  const fs::path good = write_checkpoint(m, dir / "run", cfg) / "weights.safetensors";
  const std::string data = " --data " + (dir / "idx").string();
  auto knn = [&](const std::string& args) { return run_cli("knn " + args, dir); };

  SUBCASE("an unknown device, and a device for the raw-pixel baseline") {
    CliRun r = knn("--checkpoint " + good.string() + data + " --device gpu");
    CHECK(r.status != 0);
    CHECK(contains(r.err, "--device must be cpu or cuda, got 'gpu'"));
    r = knn("--pixels" + data + " --device cuda");
    CHECK(r.status != 0);
    CHECK(contains(r.err, "--pixels reads no encoder"));
  }

  SUBCASE("a checkpoint path that does not exist") {
    const CliRun r = knn("--checkpoint " + (dir / "nope").string() + data);
    CHECK(r.status != 0);
    CHECK(contains(r.err, "nope"));
    CHECK(contains(r.err, "does not exist"));
  }

  SUBCASE("a folder that is no checkpoint") {
    fs::create_directories(dir / "empty");
    const CliRun r = knn("--checkpoint " + (dir / "empty").string() + data);
    CHECK(r.status != 0);
    CHECK(contains(r.err, "empty"));
    CHECK(contains(r.err, "checkpoints/latest"));
  }

  SUBCASE("weights without the moca_config metadata") {
    save_moca_weights(m, dir / "plain.safetensors");
    const CliRun r = knn("--checkpoint " + (dir / "plain.safetensors").string() + data);
    CHECK(r.status != 0);
    CHECK(contains(r.err, "plain.safetensors"));
    CHECK(contains(r.err, "moca_config"));
  }

  SUBCASE("a recorded configuration that does not match the tensors") {
    MocaConfig wider = cfg;
    wider.encoder.dim = 32;
    const fs::path lying = write_checkpoint(m, dir / "lying", wider) / "weights.safetensors";
    const CliRun r = knn("--checkpoint " + lying.string() + data);
    CHECK(r.status != 0);
    CHECK(contains(r.err, lying.string()));
    CHECK(contains(r.err, "do not fit"));
    CHECK(contains(r.err, "encoder_teacher."));
  }

  SUBCASE("a file that is not safetensors") {
    write_bytes(dir / "junk.safetensors", {1, 2, 3});
    const CliRun r = knn("--checkpoint " + (dir / "junk.safetensors").string() + data);
    CHECK(r.status != 0);
    CHECK(contains(r.err, "junk.safetensors"));
  }

  SUBCASE("unknown and invalid flags") {
    CliRun r = knn("--checkpoint " + good.string() + data + " --frobnicate 3");
    CHECK(r.status != 0);
    CHECK(contains(r.err, "frobnicate"));
    r = knn("--checkpoint " + good.string() + data + " --pool max");
    CHECK(r.status != 0);
    CHECK(contains(r.err, "--pool"));
    r = knn("--checkpoint " + good.string() + data + " -k 10,0");
    CHECK(r.status != 0);
    CHECK(contains(r.err, "-k: must be positive, got 0"));
    r = knn("--checkpoint " + good.string() + data + " --temperature abc");
    CHECK(r.status != 0);
    CHECK(contains(r.err, "--temperature"));
    r = knn("--checkpoint " + good.string() + data + " --teacher --student");
    CHECK(r.status != 0);
    CHECK(contains(r.err, "--student"));
    r = knn(data);
    CHECK(r.status != 0);
    CHECK(contains(r.err, "--checkpoint"));
  }

  SUBCASE("a data folder that does not exist") {
    const CliRun r = knn("--checkpoint " + good.string() + " --data " + (dir / "nodata").string());
    CHECK(r.status != 0);
    CHECK(contains(r.err, "nodata"));
    CHECK(contains(r.err, "does not exist"));
  }

  SUBCASE("data without a test split") {
    const CliRun r = knn("--checkpoint " + good.string() + " --data " +
                         (dir / "idx" / "train-images-idx3-ubyte").string());
    CHECK(r.status != 0);
    CHECK(contains(r.err, "test split"));
  }

  SUBCASE("an IDX file with the wrong magic") {
    const fs::path f = dir / "idx" / "train-images-idx3-ubyte";
    std::string bytes = read_file_text(f);
    bytes[3] = 0x01;
    { std::ofstream(f, std::ios::binary | std::ios::trunc) << bytes; }
    const CliRun r = knn("--checkpoint " + good.string() + data);
    CHECK(r.status != 0);
    CHECK(contains(r.err, "train-images-idx3-ubyte"));
    CHECK(contains(r.err, "magic"));
  }

  SUBCASE("a truncated IDX file") {
    const fs::path f = dir / "idx" / "t10k-images-idx3-ubyte";
    fs::resize_file(f, fs::file_size(f) - 100);
    const CliRun r = knn("--checkpoint " + good.string() + data);
    CHECK(r.status != 0);
    CHECK(contains(r.err, "t10k-images-idx3-ubyte"));
    CHECK(contains(r.err, "truncated"));
  }

  SUBCASE("an image folder with an empty class folder") {
    write_png_folder(dir / "png");
    fs::create_directories(dir / "png" / "train" / "c");
    const CliRun r = knn("--checkpoint " + good.string() + " --data " + (dir / "png").string());
    CHECK(r.status != 0);
    CHECK(contains(r.err, (dir / "png" / "train" / "c").string()));
    CHECK(contains(r.err, "no images"));
  }

  SUBCASE("a truncated PNG: skipped with a warning, or an error with --strict") {
    write_png_folder(dir / "png");
    const fs::path bad = dir / "png" / "train" / "a" / "img1.png";
    fs::resize_file(bad, fs::file_size(bad) / 2);
    const std::string args = "--checkpoint " + good.string() + " --data " +
                             (dir / "png").string() + " -k 1 --workers 0";
    CliRun r = knn(args);
    CHECK_MESSAGE(r.status == 0, r.err);
    CHECK(contains(r.err, "skipping unreadable image"));
    CHECK(contains(r.err, bad.string()));
    r = knn(args + " --strict");
    CHECK(r.status != 0);
    CHECK(contains(r.err, bad.string()));
    CHECK(contains(r.err, "truncated PNG"));
  }
}
