// The training run's utilities: the progress bar's text, the JSON Lines log and its resumption,
// the SVG curves, and the checkpoint folder — including a process killed with SIGKILL in the
// middle of writing a checkpoint.
#include <doctest/doctest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <moca/io/atomic_file.hpp>
#include <moca/io/safetensors.hpp>
#include <moca/train/checkpoint_dir.hpp>
#include <moca/train/jsonl_log.hpp>
#include <moca/train/progress.hpp>
#include <moca/train/svg_plot.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "temp_files.hpp"

using namespace moca;
using namespace moca::train;
namespace fs = std::filesystem;

namespace {

using testing::TempDir;

std::string read_text(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void append_text(const fs::path& p, const std::string& s) {
  std::ofstream out(p, std::ios::binary | std::ios::app);
  out << s;
}

std::size_t count(const std::string& s, const std::string& what) {
  std::size_t n = 0;
  for (std::size_t at = s.find(what); at != std::string::npos; at = s.find(what, at + 1)) ++n;
  return n;
}

// The folders under `root` whose names mark an unfinished checkpoint.
std::vector<std::string> temporaries(const fs::path& root) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(root)) {
    const std::string n = e.path().filename().string();
    if (n.rfind(".step-", 0) == 0) out.push_back(n);
  }
  return out;
}

// A checkpoint's one file: tensor `w` = [step, step + 0.5, step + 1].
void write_weights(const fs::path& dir, std::int64_t step) {
  double v[3] = {double(step), step + 0.5, step + 1.0};
  SafetensorsWriter w;
  w.add("w", TensorView<double>(v, Shape{3}));
  w.write(dir / "weights.safetensors");
}

double first_weight(const fs::path& dir) {
  const auto f = SafetensorsFile::open(dir / "weights.safetensors");
  const Tensor<double> t = f.read<double>("w");
  REQUIRE(t.numel() == 3);
  CHECK(t.data()[1] == t.data()[0] + 0.5);
  CHECK(t.data()[2] == t.data()[0] + 1.0);
  return t.data()[0];
}

}  // namespace

TEST_CASE("format_duration and the progress bar's text") {
  CHECK(format_duration(0) == "00:00");
  CHECK(format_duration(59.4) == "00:59");
  CHECK(format_duration(59.5) == "01:00");
  CHECK(format_duration(3599) == "59:59");
  CHECK(format_duration(3600) == "1:00:00");
  CHECK(format_duration(3725) == "1:02:05");
  CHECK(format_duration(360000) == "100:00:00");
  CHECK(format_duration(-1) == "--:--");
  CHECK(format_duration(std::nan("")) == "--:--");
  CHECK(format_duration(std::numeric_limits<double>::infinity()) == "--:--");

  CHECK(ProgressBar::render("train", 50, 100, 65.0, 2.0, 10, "loss 1.5") ==
        "train  50% [=====>    ] 50/100 [01:05<00:25, 2.00 it/s] loss 1.5");
  CHECK(ProgressBar::render("x", 100, 100, 3725, 0, 4, "") ==
        "x 100% [====] 100/100 [1:02:05<--:--, 0.00 it/s]");
  CHECK(ProgressBar::render("x", 0, 3, 0, 0, 3, "") == "x   0% [>  ] 0/3 [00:00<--:--, 0.00 it/s]");
  // Past the end or an unknown total: full, never more.
  CHECK(ProgressBar::render("x", 7, 5, 1, 1, 2, "").find("100% [==]") != std::string::npos);
  CHECK(ProgressBar::render("x", 7, 0, 1, 1, 2, "").find("100% [==]") != std::string::npos);

  SUBCASE("plain lines when the stream is not a terminal") {
    std::FILE* f = std::tmpfile();
    REQUIRE(f != nullptr);
    ProgressBar::Options o;
    o.out = f;
    o.terminal = 0;
    o.plain_every_s = 3600;
    {
      ProgressBar bar("eval", 3, 0, o);
      bar.update(1, "a");  // the first update draws
      bar.update(2, "b");  // too soon
      bar.finish("done");  // shows the state not shown yet
    }
    {
      ProgressBar bar("test", 3, 0, o);
      bar.update(3, "c");  // complete: drawn at once
      bar.finish("x");     // already shown: no second line
    }
    std::rewind(f);
    std::string text;
    for (int c; (c = std::fgetc(f)) != EOF;) text += static_cast<char>(c);
    std::fclose(f);
    CHECK(count(text, "\n") == 3);
    CHECK(text.find("eval  33% [========>               ] 1/3 [") == 0);
    CHECK(text.find("] a\n") != std::string::npos);
    CHECK(text.find("] b\n") == std::string::npos);
    CHECK(text.find("2/3 [") != std::string::npos);
    CHECK(text.find("] done\n") != std::string::npos);
    CHECK(count(text, "3/3 [") == 1);
    CHECK(text.find("] c\n") != std::string::npos);
    CHECK(text.find("] x\n") == std::string::npos);
    CHECK(text.find('\r') == std::string::npos);
  }
}

TEST_CASE("JsonlLog: create, write, read, and resume at a step") {
  TempDir tmp("train_utils");
  const fs::path path = tmp.path / "log.jsonl";
  append_text(path, "old content\n");
  {
    JsonlLog log = JsonlLog::create(path);  // replaces what was there
    log.write({{"event", "start"}});
    for (int s = 1; s <= 5; ++s) log.write({{"step", s}, {"loss", 10.0 - s}});
  }
  std::vector<nlohmann::json> all = JsonlLog::read(path);
  REQUIRE(all.size() == 6);
  CHECK(all[0]["event"] == "start");
  CHECK(all[5]["step"] == 5);
  CHECK(read_text(path).find("old content") == std::string::npos);

  // A crash in the middle of a line leaves it cut short.
  append_text(path, "{\"step\": 2, \"lo");
  CHECK(JsonlLog::read(path).size() == 6);  // the fragment is not a record
  {
    JsonlLog log = JsonlLog::resume(path, 3);  // steps 4 and 5 will be written again
    all = JsonlLog::read(path);
    REQUIRE(all.size() == 4);
    CHECK(all[3]["step"] == 3);
    log.write({{"step", 4}, {"loss", 0.5}});
  }
  const std::string text = read_text(path);
  CHECK(text.find("\"lo\n") == std::string::npos);
  CHECK(text.find("{\"step\": 2, \"lo") == std::string::npos);
  all = JsonlLog::read(path);
  REQUIRE(all.size() == 5);
  CHECK(all[0]["event"] == "start");
  for (int s = 1; s <= 4; ++s) CHECK(all[static_cast<std::size_t>(s)]["step"] == s);
  CHECK(all[4]["loss"] == 0.5);
  CHECK(text.back() == '\n');

  // Resuming a log that does not exist starts an empty one.
  { JsonlLog log = JsonlLog::resume(tmp.path / "new.jsonl", 10); }
  CHECK(fs::exists(tmp.path / "new.jsonl"));
  CHECK(JsonlLog::read(tmp.path / "new.jsonl").empty());
  CHECK_THROWS_WITH_AS(JsonlLog::read(tmp.path / "missing.jsonl"),
                       doctest::Contains("missing.jsonl"), Error);
}

TEST_CASE("svg_plot: one polyline per series with several points, escaped names") {
  const double nan = std::nan("");
  Panel loss{"loss & <friends>", "step", "value",
             {{"a<b&c", {0, 1, 2}, {3, 2, 1}},
              {"single", {1}, {2}},
              {"empty", {}, {}},
              {"with gaps", {0, 1, nan, 3}, {1, nan, 2, 4}}}};
  Panel knn{"k-NN \"top-1\"", "step", "", {{"teacher", {10, 20}, {50, 60}}}};
  Panel none{"nothing", "step", "", {}};
  // Huge offsets with tiny spans: the ticks must still end.
  Panel odd{"odd", "x", "", {{"s", {1e17, 1e17 + 16}, {1e10, 1e10 + 1e-5}}}};
  const std::string svg = svg_plot({loss, knn, none, odd});
  CHECK(svg.rfind("<svg", 0) == 0);
  CHECK(svg.size() > 7);
  CHECK(svg.substr(svg.size() - 7) == "</svg>\n");
  CHECK(count(svg, "<polyline") == 4);  // a<b&c, with gaps, teacher, s
  CHECK(count(svg, "<text") == count(svg, "</text>"));
  CHECK(svg.find("a&lt;b&amp;c") != std::string::npos);
  CHECK(svg.find("a<b") == std::string::npos);
  CHECK(svg.find("loss &amp; &lt;friends&gt;") != std::string::npos);
  CHECK(svg.find("k-NN &quot;top-1&quot;") != std::string::npos);
  CHECK(svg.find("no data yet") != std::string::npos);
  CHECK(svg.find("nan") == std::string::npos);
  CHECK(svg.find("inf") == std::string::npos);

  TempDir tmp("train_utils");
  write_svg_plot(tmp.path / "curves.svg", {loss, knn});
  CHECK(read_text(tmp.path / "curves.svg") == svg_plot({loss, knn}));
}

TEST_CASE("CheckpointDir: numbered folders, the latest pointer, pruning") {
  CHECK(CheckpointDir::folder_name(1200) == "step-0001200");
  CHECK(CheckpointDir::step_of("run/checkpoints/step-0001200") == 1200);
  CHECK(CheckpointDir::step_of("step-12345678") == 12345678);
  CHECK(CheckpointDir::step_of("step-") == -1);
  CHECK(CheckpointDir::step_of("step-12a") == -1);
  CHECK(CheckpointDir::step_of(".step-0000001.tmp-5") == -1);
  CHECK(CheckpointDir::step_of("latest") == -1);
  CHECK_THROWS_AS(CheckpointDir("x", 0), Error);

  TempDir tmp("train_utils");
  const fs::path root = tmp.path / "checkpoints";
  CheckpointDir ckpts(root, /*keep=*/2);
  CHECK_FALSE(ckpts.latest().has_value());  // nothing saved yet (the folder does not exist)
  for (std::int64_t s : {10, 20, 30}) {
    const fs::path dir = ckpts.save(s, [&](const fs::path& d) { write_weights(d, s); });
    CHECK(dir == root / CheckpointDir::folder_name(s));
    REQUIRE(ckpts.latest().has_value());
    CHECK(*ckpts.latest() == dir);
    CHECK(first_weight(*ckpts.latest()) == s);
  }
  std::vector<fs::path> kept = ckpts.list();
  REQUIRE(kept.size() == 2);
  CHECK(CheckpointDir::step_of(kept[0]) == 20);
  CHECK(CheckpointDir::step_of(kept[1]) == 30);
  CHECK(read_text(root / "latest") == "step-0000030\n");
  CHECK(temporaries(root).empty());

  SUBCASE("a failing write leaves the previous checkpoint as the latest") {
    CHECK_THROWS_WITH_AS(ckpts.save(40,
                                    [&](const fs::path& d) {
                                      write_weights(d, 40);
                                      throw Error("disk full");
                                    }),
                         doctest::Contains("disk full"), Error);
    CHECK(*ckpts.latest() == root / "step-0000030");
    CHECK(first_weight(*ckpts.latest()) == 30);
    CHECK(temporaries(root).empty());
    CHECK_FALSE(fs::exists(root / "step-0000040"));
    CHECK(ckpts.list().size() == 2);
  }

  SUBCASE("saving the latest step again is refused and leaves nothing behind") {
    CHECK_THROWS_WITH_AS(ckpts.save(30, [&](const fs::path& d) { write_weights(d, 99); }),
                         doctest::Contains("already the latest"), Error);
    CHECK(first_weight(*ckpts.latest()) == 30);
    CHECK(temporaries(root).empty());
  }

  SUBCASE("a pointer naming a missing folder is an error naming it") {
    { std::ofstream(root / "latest") << "step-0000050\n"; }
    CHECK_THROWS_WITH_AS(ckpts.latest(), doctest::Contains("step-0000050"), Error);
    { std::ofstream(root / "latest") << "garbage\n"; }
    CHECK_THROWS_WITH_AS(ckpts.latest(), doctest::Contains("garbage"), Error);
  }
}

TEST_CASE("CheckpointDir: a process killed in the middle of a checkpoint file") {
  TempDir tmp("train_utils");
  const fs::path root = tmp.path / "checkpoints";
  CheckpointDir ckpts(root, 3);
  ckpts.save(100, [&](const fs::path& d) { write_weights(d, 100); });

  std::fflush(nullptr);
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    // The child saves step 200: the weights file completely, then half of the state file,
    // and dies there without any chance to clean up.
    try {
      CheckpointDir(root, 3).save(200, [&](const fs::path& d) {
        write_weights(d, 200);
        double m[4] = {1, 2, 3, 4};
        SafetensorsWriter state;
        state.add("optimizer.exp_avg.w", TensorView<double>(m, Shape{4}));
        const std::vector<std::byte> bytes = state.serialize();
        AtomicFileWriter out(d / "state.safetensors");
        out.write(bytes.data(), bytes.size() / 2);
        std::raise(SIGKILL);
      });
    } catch (...) {
    }
    ::_exit(3);  // not reached when the kill works
  }
  int status = 0;
  REQUIRE(::waitpid(child, &status, 0) == child);
  REQUIRE(WIFSIGNALED(status));
  CHECK(WTERMSIG(status) == SIGKILL);

  // The pointer still names the complete checkpoint, which loads.
  REQUIRE(ckpts.latest().has_value());
  CHECK(*ckpts.latest() == root / "step-0000100");
  CHECK(first_weight(*ckpts.latest()) == 100);
  CHECK_FALSE(fs::exists(root / "step-0000200"));
  const std::vector<std::string> left = temporaries(root);
  REQUIRE(left.size() == 1);  // the killed process's unfinished folder
  CHECK(left[0].find("step-0000200") != std::string::npos);

  // The next save clears it away.
  ckpts.save(200, [&](const fs::path& d) { write_weights(d, 200); });
  CHECK(temporaries(root).empty());
  CHECK(first_weight(*ckpts.latest()) == 200);
  CHECK(ckpts.list().size() == 2);
}
