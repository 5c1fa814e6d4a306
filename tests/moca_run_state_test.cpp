// What a pretraining run writes besides the weights: the MocaConfig as JSON (round trip, strict
// reading with errors naming the key and the source, differences between two configurations)
// and the optimiser state, with which a reloaded model continues bit for bit.
#include <doctest/doctest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <moca/models/moca/checkpoint.hpp>
#include <moca/models/moca/config_json.hpp>
#include <moca/models/moca/train_state.hpp>
#include <string>
#include <vector>

#include "moca_small.hpp"
#include "temp_files.hpp"

using namespace moca;
namespace fs = std::filesystem;

namespace {

using testing::contains;
using testing::TempDir;

using testing::random_images;

MocaConfig small_config() { return testing::small_moca_config(); }

// The message of the moca::Error that reading `j` throws (empty if it does not throw).
std::string read_error(const nlohmann::json& j) {
  try {
    (void)moca_config_from_json(j, "run/config.json");
  } catch (const Error& e) {
    return e.what();
  }
  return {};
}

template <class T>
bool same_bits(const TensorView<T>& a, const TensorView<T>& b) {
  return a.numel() == b.numel() && std::memcmp(a.data(), b.data(), a.bytes()) == 0;
}

}  // namespace

TEST_CASE("MocaConfig as JSON: a lossless round trip") {
  MocaConfig custom = small_config();
  custom.mask_ratio[0] = 0.5;
  custom.kappa = 2.5;
  custom.avg_pooling = false;
  custom.clip_grad = -1;
  custom.adamw.beta2 = 0.95;
  for (const MocaConfig& c : {MocaConfig::tiny(), MocaConfig::vit_b16(), custom}) {
    const nlohmann::json j = config_to_json(c);
    // Through text, as a file or a checkpoint's metadata holds it.
    const nlohmann::json parsed = nlohmann::json::parse(j.dump());
    const MocaConfig back = moca_config_from_json(parsed, "test");
    CHECK(config_to_json(back) == j);
    CHECK(config_to_json(back).dump() == j.dump());
    CHECK(back.encoder.dim == c.encoder.dim);
    CHECK(back.decoder.heads == c.decoder.heads);
    CHECK(back.mask_ratio[0] == c.mask_ratio[0]);
    CHECK(back.avg_pooling == c.avg_pooling);
    CHECK(back.adamw.beta2 == c.adamw.beta2);
    CHECK(config_differences(j, config_to_json(back)).empty());
  }
  CHECK(config_to_json(MocaConfig::tiny()) != config_to_json(MocaConfig::vit_b16()));
}

TEST_CASE("MocaConfig from JSON: errors name the key and the source") {
  const nlohmann::json good = config_to_json(MocaConfig::tiny());
  CHECK(read_error(good).empty());

  nlohmann::json j = good;
  j["encoder"].erase("depth");
  std::string e = read_error(j);
  CHECK(contains(e, "run/config.json"));
  CHECK(contains(e, "missing key 'encoder.depth'"));

  j = good;
  j.erase("decoder");
  CHECK(contains(read_error(j), "missing key 'decoder'"));

  j = good;
  j["adamw"]["beta3"] = 0.5;
  e = read_error(j);
  CHECK(contains(e, "run/config.json"));
  CHECK(contains(e, "unknown key 'adamw.beta3'"));

  j = good;
  j["num_wrods"] = 10;  // a typo must not pass silently
  CHECK(contains(read_error(j), "unknown key 'num_wrods'"));

  j = good;
  j["num_words"] = "many";
  e = read_error(j);
  CHECK(contains(e, "'num_words' should be an integer"));
  CHECK(contains(e, "run/config.json"));

  j = good;
  j["encoder"]["depth"] = 2.5;
  CHECK(contains(read_error(j), "'encoder.depth' should be an integer"));

  j = good;
  j["kappa"] = 3;  // an integer is a number
  CHECK(read_error(j).empty());
  j["kappa"] = true;
  CHECK(contains(read_error(j), "'kappa' should be a number"));

  j = good;
  j["avg_pooling"] = 1;
  CHECK(contains(read_error(j), "'avg_pooling' should be true or false"));

  j = good;
  j["mask_ratio"] = {0.5};
  CHECK(contains(read_error(j), "'mask_ratio' should be a pair of numbers"));

  j = good;
  j["encoder"] = 5;
  CHECK(contains(read_error(j), "'encoder' should be a JSON object"));
  CHECK(contains(read_error(nlohmann::json::array()), "the document should be a JSON object"));

  j = good;
  j["encoder"]["heads"] = 5;  // 192 is not divisible by 5
  e = read_error(j);
  CHECK(contains(e, "run/config.json"));
  CHECK(contains(e, "invalid MOCA configuration"));
  CHECK(contains(e, "heads"));
}

TEST_CASE("config_differences lists the keys that changed") {
  const nlohmann::json a = config_to_json(MocaConfig::tiny());
  nlohmann::json b = a;
  CHECK(config_differences(a, b).empty());
  b["encoder"]["depth"] = 12;
  b["kappa"] = 4.0;
  const std::vector<std::string> d = config_differences(a, b);
  REQUIRE(d.size() == 2);
  CHECK(d[0].rfind("encoder.depth", 0) == 0);
  CHECK(contains(d[0], "6 vs 12"));
  CHECK(d[1].rfind("kappa", 0) == 0);

  b = a;
  b["extra"] = 1;
  b.erase("clip_grad");
  const std::vector<std::string> d2 = config_differences(a, b);
  REQUIRE(d2.size() == 2);
  CHECK(d2[0] == "clip_grad");
  CHECK(d2[1] == "extra");
}

TEST_CASE("Training state: a reloaded run continues bit for bit") {
  const TempDir tmp("run_state");
  const fs::path& dir = tmp.path;
  const MocaConfig cfg = small_config();
  const std::int64_t B = 4;
  auto x1 = random_images<double>(B, cfg.encoder, 1);
  auto x2 = random_images<double>(B, cfg.encoder, 2);
  MocaHyper h;
  h.lr = 1e-3;

  Moca<double> a(cfg);
  a.initialize(5);
  for (std::uint64_t s = 0; s < 2; ++s) a.train_step(x1, x2, a.draw_plan(Philox(1), s, B), h);
  save_moca_weights(a, dir / "weights.safetensors", {}, SafetensorsDtype::F64);
  save_moca_train_state(a, 2, dir / "state.safetensors", {{"note", "two steps"}});

  Moca<double> b(cfg);
  b.initialize(99);
  load_moca_weights(b, dir / "weights.safetensors");
  const auto state = SafetensorsFile::open(dir / "state.safetensors");
  CHECK(load_moca_train_state(b, state) == 2);
  CHECK(state.metadata("note") == std::optional<std::string>("two steps"));
  CHECK(b.optimizer().steps() == a.optimizer().steps());
  CHECK(same_bits(b.optimizer().exp_avg(), a.optimizer().exp_avg()));
  CHECK(same_bits(b.optimizer().exp_avg_sq(), a.optimizer().exp_avg_sq()));

  for (std::uint64_t s = 2; s < 4; ++s) {
    const auto plan = a.draw_plan(Philox(1), s, B);
    const MocaStepResult ra = a.train_step(x1, x2, plan, h);
    const MocaStepResult rb = b.train_step(x1, x2, plan, h);
    CHECK(ra.loss == rb.loss);
    CHECK(ra.grad_norm == rb.grad_norm);
  }
  CHECK(same_bits(a.params().values(), b.params().values()));
  CHECK(same_bits(a.teacher_params().values(), b.teacher_params().values()));
  CHECK(same_bits(a.optimizer().exp_avg_sq(), b.optimizer().exp_avg_sq()));

  SUBCASE("without the state, fresh moments make the runs differ (the test can fail)") {
    Moca<double> c(cfg);
    c.initialize(99);
    load_moca_weights(c, dir / "weights.safetensors");
    Moca<double> d(cfg);
    d.initialize(99);
    load_moca_weights(d, dir / "weights.safetensors");
    load_moca_train_state(d, state);
    const auto plan = a.draw_plan(Philox(1), 2, B);
    CHECK(c.train_step(x1, x2, plan, h).loss == d.train_step(x1, x2, plan, h).loss);
    CHECK_FALSE(same_bits(c.params().values(), d.params().values()));
  }

  SUBCASE("a state of another model, or not a state file, is an error naming the file") {
    MocaConfig other = cfg;
    other.encoder.dim = 8;
    other.decoder = {8, 1, 2, 4.0, 1e-6};
    Moca<double> c(other);
    try {
      load_moca_train_state(c, state);
      FAIL("loaded the state of another model");
    } catch (const Error& e) {
      CHECK(contains(e.what(), "state.safetensors"));
      CHECK(contains(e.what(), "does not fit"));
    }
    try {
      load_moca_train_state(b, SafetensorsFile::open(dir / "weights.safetensors"));
      FAIL("loaded a weights file as a state");
    } catch (const Error& e) {
      CHECK(contains(e.what(), "weights.safetensors"));
      CHECK(contains(e.what(), "missing optimizer.exp_avg."));
    }
  }
}
