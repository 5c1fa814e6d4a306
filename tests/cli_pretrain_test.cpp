// `moca pretrain` end to end on a small MNIST-format data set written by the test: a run, a run
// stopped and resumed (same losses bit for bit), Ctrl-C, SIGKILL during checkpointing, then
// `moca knn` and `moca extract` on the result, and the errors of a misused run folder.
#include <doctest/doctest.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <moca/core/rng.hpp>
#include <moca/io/safetensors.hpp>
#include <moca/train/checkpoint_dir.hpp>
#include <moca/train/jsonl_log.hpp>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "cli_program.hpp"

using namespace moca;
namespace fs = std::filesystem;
using nlohmann::json;

extern char** environ;

namespace {

using moca::testing::CliRun;
using moca::testing::run_cli;
using moca::testing::read_file_text;

// Starts the program in the background; returns its pid.
pid_t spawn_cli(const std::vector<std::string>& args, const fs::path& log) {
  std::vector<std::string> all = {moca::testing::cli_program()};
  all.insert(all.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : all) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 2, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
  pid_t pid = 0;
  REQUIRE(posix_spawn(&pid, all[0].c_str(), &fa, nullptr, argv.data(), environ) == 0);
  posix_spawn_file_actions_destroy(&fa);
  return pid;
}

int wait_status(pid_t pid, bool* signalled = nullptr, int* sig = nullptr) {
  int st = 0;
  REQUIRE(waitpid(pid, &st, 0) == pid);
  if (signalled) *signalled = WIFSIGNALED(st);
  if (sig) *sig = WIFSIGNALED(st) ? WTERMSIG(st) : 0;
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

// Steps logged so far in a run folder.
std::int64_t logged_steps(const fs::path& out) {
  std::ifstream in(out / "log.jsonl");
  std::string line;
  std::int64_t last = 0;
  while (std::getline(in, line)) {
    const json j = json::parse(line, nullptr, false);
    if (!j.is_discarded() && j.contains("loss")) last = j["step"].get<std::int64_t>();
  }
  return last;
}

void write_be32(std::ofstream& f, std::uint32_t v) {
  const unsigned char b[4] = {static_cast<unsigned char>(v >> 24),
                              static_cast<unsigned char>(v >> 16),
                              static_cast<unsigned char>(v >> 8), static_cast<unsigned char>(v)};
  f.write(reinterpret_cast<const char*>(b), 4);
}

// An MNIST-format split: class c ∈ {0..3} is a bright horizontal bar, vertical bar, diagonal or
// hollow square at a random place, in noise.
void write_split(const fs::path& dir, const char* stem, int n, std::uint64_t seed) {
  const Philox rng(seed);
  std::vector<unsigned char> px(static_cast<std::size_t>(n) * 28 * 28);
  std::vector<unsigned char> labels(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) {
    const int c = i % 4;
    labels[static_cast<std::size_t>(i)] = static_cast<unsigned char>(c);
    unsigned char* img = px.data() + static_cast<std::size_t>(i) * 784;
    for (int k = 0; k < 784; ++k) img[k] = static_cast<unsigned char>(rng.below(40, i, k));
    const int o = 6 + static_cast<int>(rng.below(8, i, 1000));
    for (int t = 4; t < 24; ++t) {
      if (c == 0) img[o * 28 + t] = img[(o + 1) * 28 + t] = 255;
      if (c == 1) img[t * 28 + o] = img[t * 28 + o + 1] = 255;
      if (c == 2) img[t * 28 + t] = img[t * 28 + std::min(27, t + 1)] = 255;
      if (c == 3 && (t == 4 || t == 23)) {
        for (int u = 4; u < 24; ++u) img[t * 28 + u] = img[u * 28 + t] = 255;
      }
    }
  }
  {
    std::ofstream f(dir / (std::string(stem) + "-images-idx3-ubyte"), std::ios::binary);
    write_be32(f, 0x803);
    write_be32(f, static_cast<std::uint32_t>(n));
    write_be32(f, 28);
    write_be32(f, 28);
    f.write(reinterpret_cast<const char*>(px.data()), static_cast<std::streamsize>(px.size()));
  }
  std::ofstream f(dir / (std::string(stem) + "-labels-idx1-ubyte"), std::ios::binary);
  write_be32(f, 0x801);
  write_be32(f, static_cast<std::uint32_t>(n));
  f.write(reinterpret_cast<const char*>(labels.data()), n);
}

// A small model of the tiny preset's geometry (32×32 grey, patch 4) and the data folder.
const std::string kModel =
    " --preset tiny --embed-dim 32 --depth 2 --heads 2 --dec-dim 16 --dec-depth 1 --dec-heads 2"
    " --early-layer 0 --num-words 64 --words-per-iter 8 --batch 16 --threads 1 --workers 1"
    " --log-every 1 --knn-k 5 --knn-batch 32";

struct Fixture {
  fs::path dir, data;
  Fixture() {
    dir = fs::temp_directory_path() / ("moca_cli_pretrain_test_" + std::to_string(::getpid()));
    fs::remove_all(dir);
    data = dir / "idx";
    fs::create_directories(data);
    write_split(data, "train", 96, 1);  // 6 steps per epoch at batch 16
    write_split(data, "t10k", 40, 2);
  }
  ~Fixture() {
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
  std::string base(const fs::path& out) const {
    return "pretrain --data " + data.string() + kModel + " --out " + out.string();
  }
};

std::vector<json> step_records(const fs::path& out) {
  std::vector<json> r;
  for (const json& j : train::JsonlLog::read(out / "log.jsonl"))
    if (j.contains("loss")) r.push_back(j);
  return r;
}

}  // namespace

TEST_CASE("moca pretrain: a run, a stopped and resumed run, then knn and extract on it") {
  Fixture fx;
  const fs::path a = fx.dir / "a", b = fx.dir / "b";

  CliRun r = run_cli(fx.base(a) + " --epochs 2 --knn-every 1", fx.dir);
  INFO(r.err);
  REQUIRE(r.status == 0);
  CHECK(r.err.find("steps planned") == std::string::npos);  // planned in epochs
  const std::vector<json> ra = step_records(a);
  REQUIRE(ra.size() == 12);
  for (const char* key : {"step", "epoch", "elapsed_s", "loss", "l_img", "l_loc", "lr", "wd",
                          "momentum", "grad_norm", "pairs_per_s", "data_wait_share"})
    CHECK(ra.back().contains(key));
  for (const json& rec : ra) {
    CHECK(rec["data_wait_share"].get<double>() >= 0.0);
    CHECK(rec["data_wait_share"].get<double>() <= 1.0);
  }
  CHECK(ra.back()["step"] == 12);
  CHECK(ra.back()["epoch"].get<double>() == doctest::Approx(2.0));
  CHECK(ra.front()["lr"].get<double>() == 0.0);  // warmup starts at zero
  int knn_records = 0;
  for (const json& j : train::JsonlLog::read(a / "log.jsonl"))
    if (j.contains("knn_top1")) {
      ++knn_records;
      CHECK(j["knn_top1"].get<double>() >= 0.0);
      CHECK(j["knn_top1"].get<double>() <= 1.0);
      CHECK(j["queries"] == 40);
    }
  CHECK(knn_records == 2);  // after epoch 1 and at the end
  CHECK(fs::exists(a / "curves.svg"));
  CHECK(read_file_text(a / "curves.svg").find("<polyline") != std::string::npos);
  CHECK(fs::exists(a / "config.json"));
  const auto latest = train::CheckpointDir(a / "checkpoints").latest();
  REQUIRE(latest.has_value());
  CHECK(latest->filename() == "step-0000012");
  CHECK(fs::exists(*latest / "weights.safetensors"));
  CHECK(fs::exists(*latest / "state.safetensors"));

  // The same run stopped after step 5 and resumed with no training flags.
  r = run_cli(fx.base(b) + " --epochs 2 --knn-every 1 --until-step 5", fx.dir);
  INFO(r.err);
  REQUIRE(r.status == 0);
  CHECK(train::CheckpointDir(b / "checkpoints").latest()->filename() == "step-0000005");
  // Resumed twice: first with no evaluation flags (the run's own --knn-k 5 applies), then with
  // --knn-k 3, which wins over the saved setting.
  r = run_cli("pretrain --out " + b.string() +
                  " --resume --threads 1 --workers 2 --log-every 1 --until-step 8",
              fx.dir);
  INFO(r.err);
  REQUIRE(r.status == 0);
  r = run_cli("pretrain --out " + b.string() + " --resume --threads 1 --log-every 1 --knn-k 3",
              fx.dir);
  INFO(r.err);
  REQUIRE(r.status == 0);
  std::vector<std::int64_t> ks_b;
  for (const json& j : train::JsonlLog::read(b / "log.jsonl"))
    if (j.contains("knn_top1")) ks_b.push_back(j["k"].get<std::int64_t>());
  CHECK(ks_b == std::vector<std::int64_t>{5, 3});  // epoch 1 (step 6), then the end
  const std::vector<json> rb = step_records(b);
  REQUIRE(rb.size() == ra.size());
  for (std::size_t i = 0; i < ra.size(); ++i) {
    CAPTURE(i);
    CHECK(rb[i]["step"] == ra[i]["step"]);
    CHECK(rb[i]["loss"].get<double>() == ra[i]["loss"].get<double>());  // bit for bit
    CHECK(rb[i]["grad_norm"].get<double>() == ra[i]["grad_norm"].get<double>());
  }
  // The final weights agree too.
  const auto wa = SafetensorsFile::open(a / "checkpoints/step-0000012/weights.safetensors");
  const auto wb = SafetensorsFile::open(b / "checkpoints/step-0000012/weights.safetensors");
  for (const std::string& name : wa.names()) {
    CAPTURE(name);
    const auto x = wa.raw(name), y = wb.raw(name);
    REQUIRE(x.size() == y.size());
    CHECK(std::equal(x.begin(), x.end(), y.begin()));
  }

  // Resuming with different training flags, or starting over in a used folder, is refused.
  r = run_cli(fx.base(b) + " --epochs 2 --lr 0.5 --resume", fx.dir);
  CHECK(r.status != 0);
  CHECK(r.err.find("schedule.peak_lr") != std::string::npos);
  r = run_cli(fx.base(b) + " --epochs 2", fx.dir);
  CHECK(r.status != 0);
  CHECK(r.err.find("--resume") != std::string::npos);
  r = run_cli("pretrain --out " + (fx.dir / "nothing").string() + " --resume", fx.dir);
  CHECK(r.status != 0);
  CHECK(r.err.find("no checkpoint") != std::string::npos);

  // k-NN and feature extraction straight from the run folder.
  r = run_cli("knn --checkpoint " + a.string() + " --data " + fx.data.string() + " -k 5 --json " +
                  (fx.dir / "knn.json").string(),
              fx.dir);
  INFO(r.err);
  REQUIRE(r.status == 0);
  r = run_cli("extract --checkpoint " + a.string() + " --input " + fx.data.string() +
                  ":test --output " + (fx.dir / "f.safetensors").string(),
              fx.dir);
  INFO(r.err);
  REQUIRE(r.status == 0);
  const auto f = SafetensorsFile::open(fx.dir / "f.safetensors");
  CHECK(f.shape("avg") == std::vector<std::int64_t>{40, 32});

  // The raw-pixel baseline on the same data: the bars' orientation is plain in the pixels.
  r = run_cli("knn --pixels --data " + fx.data.string() + " -k 5 --json " +
                  (fx.dir / "pixels.json").string(),
              fx.dir);
  INFO(r.err);
  REQUIRE(r.status == 0);
  const json px = json::parse(read_file_text(fx.dir / "pixels.json"));
  CHECK(px["pooling"] == "pixels");
  CHECK(px["bank"] == 96);
  CHECK(px["results"][0]["count"] == 40);
  CHECK(px["results"][0]["top1"].get<double>() > 0.5);
  CHECK(run_cli("knn --data " + fx.data.string(), fx.dir).status != 0);  // neither source
  CHECK(run_cli("knn --pixels --checkpoint " + a.string(), fx.dir).status != 0);  // both
}

TEST_CASE("moca pretrain: --device chooses the CPU or the GPU, with clear errors") {
  Fixture fx;
  CliRun r = run_cli(fx.base(fx.dir / "gpu") + " --epochs 1 --device gpu", fx.dir);
  CHECK(r.status != 0);
  CHECK(r.err.find("--device must be cpu or cuda, got 'gpu'") != std::string::npos);
  r = run_cli(fx.base(fx.dir / "tf32") + " --epochs 1 --matmul tf32", fx.dir);
  CHECK(r.status != 0);
  CHECK(r.err.find("--matmul tf32 applies to --device cuda only") != std::string::npos);
  r = run_cli(fx.base(fx.dir / "fp16") + " --epochs 1 --device cuda --matmul fp16", fx.dir);
  CHECK(r.status != 0);
  CHECK(r.err.find("--matmul must be fp32, tf32 or bf16, got 'fp16'") != std::string::npos);
  CHECK(!fs::exists(fx.dir / "gpu" / "log.jsonl"));

  // With a GPU (and a build with the CUDA backend) the run trains there; anywhere else it stops
  // before any work, saying which of the two is missing.
  const fs::path cuda = fx.dir / "cuda";
  r = run_cli(fx.base(cuda) + " --epochs 1 --device cuda --no-final-knn --knn-every 0", fx.dir);
  if (r.status == 0) {
    MESSAGE("trained on the GPU");
    CHECK(step_records(cuda).size() >= 2);
    CHECK(fs::exists(cuda / "checkpoints"));
    // In bf16 mixed precision too, with the k-NN vote of the bf16 teacher at the end.
    const fs::path mixed = fx.dir / "cuda-bf16";
    r = run_cli(fx.base(mixed) + " --epochs 1 --device cuda --precision bf16 --knn-every 0",
                fx.dir);
    INFO(r.err);
    CHECK(r.status == 0);
    CHECK(r.err.find("k-NN") != std::string::npos);
    const std::vector<json> rm = step_records(mixed);
    CHECK(rm.size() == 6);
    for (const json& rec : rm) CHECK(std::isfinite(rec["loss"].get<double>()));
  } else {
    CAPTURE(r.err);
    CHECK(std::getenv("MOCA_REQUIRE_CUDA") == nullptr);  // a run that asks for the GPU fails here
    CHECK((r.err.find("--device cuda: no CUDA device is available") != std::string::npos ||
           r.err.find("--device cuda: this moca was built without the CUDA backend") !=
               std::string::npos));
    CHECK(!fs::exists(cuda / "log.jsonl"));
  }
}

TEST_CASE("moca pretrain --precision bf16: float checkpoints, resumable in either precision") {
  Fixture fx;
  const fs::path f = fx.dir / "fp32", h = fx.dir / "bf16", mixed = fx.dir / "mixed";
  CliRun r = run_cli(fx.base(f) + " --epochs 1 --knn-every 0 --no-final-knn", fx.dir);
  INFO(r.err);
  REQUIRE(r.status == 0);
  r = run_cli(fx.base(h) + " --epochs 1 --knn-every 0 --precision bf16", fx.dir);
  INFO(r.err);
  REQUIRE(r.status == 0);
  CHECK(r.err.find("bf16 values with fp32 master weights") != std::string::npos);
  CHECK(r.err.find("k-NN") != std::string::npos);  // the bf16 teacher encodes for the vote
  const std::vector<json> rf = step_records(f), rh = step_records(h);
  REQUIRE(rf.size() == 6);
  REQUIRE(rh.size() == 6);
  // The same initial master, data and masks: the first loss is the float loss to bf16's
  // rounding of the activations (tests/bf16_test.cpp measures 0.06% on the small model), and
  // not equal to it, which a run that silently trained in float would be.
  const double l0f = rf[0]["loss"].get<double>(), l0h = rh[0]["loss"].get<double>();
  CAPTURE(l0f);
  CAPTURE(l0h);
  CHECK(std::abs(l0h - l0f) <= 2e-2 * std::abs(l0f));
  CHECK(l0h != l0f);
  for (const json& rec : rh) CHECK(std::isfinite(rec["loss"].get<double>()));
  // Its checkpoint holds the float run's tensors, in the same types (F32 for every weight).
  const auto wh = SafetensorsFile::open(h / "checkpoints/step-0000006/weights.safetensors");
  const auto wf = SafetensorsFile::open(f / "checkpoints/step-0000006/weights.safetensors");
  CHECK(wh.names() == wf.names());
  int f32 = 0;
  for (const auto& t : wh.tensors()) {
    CAPTURE(t.name);
    REQUIRE(wf.contains(t.name));
    CHECK(t.dtype == wf.dtype(t.name));
    f32 += t.dtype == SafetensorsDtype::F32;
  }
  CHECK(f32 > 10);
  r = run_cli("knn --checkpoint " + h.string() + " --data " + fx.data.string() + " -k 5",
              fx.dir);
  INFO(r.err);
  CHECK(r.status == 0);

  // A bf16 run stopped at step 3 resumes in fp32, and a float run in bf16.
  r = run_cli(fx.base(mixed) + " --epochs 1 --knn-every 0 --no-final-knn --precision bf16"
                               " --until-step 3",
              fx.dir);
  INFO(r.err);
  REQUIRE(r.status == 0);
  r = run_cli("pretrain --out " + mixed.string() + " --resume --threads 1 --log-every 1"
              " --until-step 5",
              fx.dir);
  INFO(r.err);
  REQUIRE(r.status == 0);
  CHECK(r.err.find("fp32") != std::string::npos);
  r = run_cli("pretrain --out " + mixed.string() + " --resume --threads 1 --log-every 1"
              " --precision bf16",
              fx.dir);
  INFO(r.err);
  REQUIRE(r.status == 0);
  const std::vector<json> rm = step_records(mixed);
  REQUIRE(rm.size() == 6);
  // Steps 1–3 are the bf16 run's own.
  for (std::size_t i = 0; i < 3; ++i) CHECK(rm[i]["loss"].get<double>() == rh[i]["loss"].get<double>());
  for (const json& rec : rm) CHECK(std::isfinite(rec["loss"].get<double>()));

  r = run_cli(fx.base(fx.dir / "fp16") + " --epochs 1 --precision fp16", fx.dir);
  CHECK(r.status != 0);
  CHECK(r.err.find("--precision must be fp32 or bf16, got 'fp16'") != std::string::npos);
  r = run_cli(fx.base(fx.dir / "both") + " --epochs 1 --device cuda --precision bf16 --matmul tf32",
              fx.dir);
  CHECK(r.status != 0);
  CHECK(r.err.find("with --precision bf16 every product takes bf16 operands") !=
        std::string::npos);
}

TEST_CASE("moca pretrain: Ctrl-C saves a checkpoint; SIGKILL never leaves a broken one") {
  Fixture fx;
  const fs::path out = fx.dir / "run";
  auto args = [&](bool resume) {
    std::vector<std::string> v;
    std::istringstream ss(fx.base(out) + " --epochs 400 --knn-every 0 --no-final-knn" +
                          " --ckpt-minutes 0.0001" + (resume ? " --resume" : ""));
    for (std::string w; ss >> w;) v.push_back(w);
    return v;
  };
  auto wait_for_steps = [&](std::int64_t n) {
    for (int i = 0; i < 2400 && logged_steps(out) < n; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    REQUIRE(logged_steps(out) >= n);
  };

  // SIGKILL at moments spread over the step / checkpoint cycle (a checkpoint after every step):
  // the latest checkpoint always loads and the run resumes from it.
  for (int round = 0; round < 3; ++round) {
    CAPTURE(round);
    const std::int64_t before = logged_steps(out);
    const pid_t pid = spawn_cli(args(round > 0), fx.dir / "err.txt");
    wait_for_steps(before + 2);
    std::this_thread::sleep_for(std::chrono::milliseconds(7 * round));
    ::kill(pid, SIGKILL);
    bool signalled = false;
    (void)wait_status(pid, &signalled);
    CHECK(signalled);
    const auto latest = train::CheckpointDir(out / "checkpoints").latest();
    REQUIRE(latest.has_value());
    CHECK_NOTHROW(SafetensorsFile::open(*latest / "weights.safetensors"));
    CHECK_NOTHROW(SafetensorsFile::open(*latest / "state.safetensors"));
  }

  // Ctrl-C: exit status 130 after saving a checkpoint at the step reached.
  const pid_t pid = spawn_cli(args(true), fx.dir / "err.txt");
  wait_for_steps(logged_steps(out) + 2);
  ::kill(pid, SIGINT);
  const int status = wait_status(pid);
  INFO(read_file_text(fx.dir / "err.txt"));
  CHECK(status == 130);
  CHECK(read_file_text(fx.dir / "err.txt").find("interrupted at step") != std::string::npos);
  const auto latest = train::CheckpointDir(out / "checkpoints").latest();
  REQUIRE(latest.has_value());
  CHECK(train::CheckpointDir::step_of(*latest) == logged_steps(out));
  // Only the kept checkpoints remain, and no temporary folder.
  int folders = 0;
  for (const auto& e : fs::directory_iterator(out / "checkpoints")) {
    CHECK(e.path().filename().string().find(".tmp") == std::string::npos);
    folders += e.is_directory();
  }
  CHECK(folders <= 3);
}
