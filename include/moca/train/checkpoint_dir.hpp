// A folder of numbered checkpoints with a pointer to the latest complete one.
//
//   CheckpointDir ckpts("run/checkpoints", /*keep=*/3);
//   ckpts.save(step, [&](const std::filesystem::path& dir) {
//     save_moca_weights(moca, dir / "weights.safetensors");
//     save_moca_train_state(moca, step, dir / "state.safetensors");
//   });
//   if (auto dir = ckpts.latest()) { ... load from *dir ... }
//
// Layout: run/checkpoints/step-0001200/{weights,state}.safetensors and run/checkpoints/latest, a
// one-line text file naming the latest checkpoint folder. A checkpoint is written into a hidden
// temporary folder, renamed into place once every file in it is on disk, and only then does
// `latest` (itself replaced atomically) point to it. A process killed at any moment, even with
// SIGKILL in the middle of a file, therefore leaves `latest` naming a complete checkpoint (or no
// `latest` at all before the first one). Older checkpoints beyond the `keep` most recent are
// removed after the pointer moves; temporary folders left by a killed process are removed by the
// next save.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <string>
#include <system_error>
#include <unistd.h>
#include <vector>

#include "moca/core/check.hpp"
#include "moca/io/atomic_file.hpp"

namespace moca::train {

class CheckpointDir {
 public:
  /// `keep` ≥ 1: how many checkpoints stay on disk (the latest always does).
  CheckpointDir(std::filesystem::path root, int keep = 3) : root_(std::move(root)), keep_(keep) {
    MOCA_CHECK(keep_ >= 1, "checkpoints: --keep must be at least 1, got ", keep_);
  }

  const std::filesystem::path& root() const { return root_; }

  /// The folder name of step `step`: "step-0001200".
  static std::string folder_name(std::int64_t step) {
    char buf[48];
    std::snprintf(buf, sizeof buf, "step-%07lld", static_cast<long long>(step));
    return buf;
  }

  /// Writes checkpoint `step`: `write(dir)` fills a fresh folder, which then becomes the latest.
  /// Returns the checkpoint's folder.
  std::filesystem::path save(std::int64_t step,
                             const std::function<void(const std::filesystem::path&)>& write) {
    namespace fs = std::filesystem;
    std::error_code ec;
    fs::create_directories(root_, ec);
    MOCA_CHECK(!ec, "cannot create the checkpoint folder ", root_.string(), ": ", ec.message());
    remove_temporaries();
    MOCA_CHECK(step >= 0, "checkpoints: negative step ", step);
    // The latest checkpoint is complete and never replaced (the caller does not save a step
    // twice); a folder of the same step from an earlier, abandoned attempt makes way below.
    MOCA_CHECK(latest_name() != folder_name(step), "checkpoints: step ", step,
               " is already the latest checkpoint in ", root_.string());
    const fs::path final_dir = root_ / folder_name(step);
    const fs::path tmp = root_ / ("." + folder_name(step) + ".tmp-" + std::to_string(::getpid()));
    fs::remove_all(tmp, ec);
    fs::create_directory(tmp, ec);
    MOCA_CHECK(!ec, "cannot create ", tmp.string(), ": ", ec.message());
    try {
      write(tmp);
    } catch (...) {
      fs::remove_all(tmp, ec);
      throw;
    }
    if (fs::exists(final_dir, ec)) fs::remove_all(final_dir, ec);
    fs::rename(tmp, final_dir, ec);
    if (ec) {
      const std::string why = ec.message();
      fs::remove_all(tmp, ec);
      MOCA_CHECK(false, "cannot rename ", tmp.string(), " to ", final_dir.string(), ": ", why);
    }
    {
      AtomicFileWriter pointer(root_ / "latest");
      const std::string line = folder_name(step) + "\n";
      pointer.write(line.data(), line.size());
      pointer.commit();
    }
    prune();
    return final_dir;
  }

  /// The latest complete checkpoint folder, if any.
  std::optional<std::filesystem::path> latest() const {
    const std::string name = latest_name();
    if (name.empty()) return std::nullopt;
    const std::filesystem::path dir = root_ / name;
    std::error_code ec;
    MOCA_CHECK(std::filesystem::is_directory(dir, ec), root_.string(), "/latest names ", name,
               ", which does not exist");
    return dir;
  }

  /// The step of a checkpoint folder named by folder_name(), or -1.
  static std::int64_t step_of(const std::filesystem::path& dir) {
    const std::string n = dir.filename().string();
    if (n.rfind("step-", 0) != 0 || n.size() <= 5) return -1;
    std::int64_t v = 0;
    for (std::size_t i = 5; i < n.size(); ++i) {
      if (n[i] < '0' || n[i] > '9') return -1;
      v = v * 10 + (n[i] - '0');
    }
    return v;
  }

  /// The checkpoint folders on disk, by step.
  std::vector<std::filesystem::path> list() const {
    namespace fs = std::filesystem;
    std::vector<fs::path> out;
    std::error_code ec;
    for (auto it = fs::directory_iterator(root_, ec); !ec && it != fs::directory_iterator();
         it.increment(ec)) {
      std::error_code tec;
      if (it->is_directory(tec) && step_of(it->path()) >= 0) out.push_back(it->path());
    }
    std::sort(out.begin(), out.end(), [](const fs::path& a, const fs::path& b) {
      return step_of(a) < step_of(b);
    });
    return out;
  }

 private:
  std::string latest_name() const {
    std::ifstream in(root_ / "latest");
    std::string name;
    if (!in || !std::getline(in, name)) return {};
    while (!name.empty() && (name.back() == '\r' || name.back() == ' ')) name.pop_back();
    MOCA_CHECK(step_of(name) >= 0, (root_ / "latest").string(), " holds '", name,
               "', not a checkpoint folder name");
    return name;
  }

  void remove_temporaries() const {
    namespace fs = std::filesystem;
    std::error_code ec;
    for (auto it = fs::directory_iterator(root_, ec); !ec && it != fs::directory_iterator();
         it.increment(ec)) {
      const std::string n = it->path().filename().string();
      if (n.rfind(".step-", 0) == 0 && n.find(".tmp-") != std::string::npos) {
        std::error_code rec;
        fs::remove_all(it->path(), rec);
      }
    }
    fs::remove(root_ / "latest.tmp", ec);
  }

  void prune() const {
    const std::string latest = latest_name();
    std::vector<std::filesystem::path> all = list();
    const std::size_t n = all.size();
    for (std::size_t i = 0; i + static_cast<std::size_t>(keep_) < n; ++i) {
      if (all[i].filename() == latest) continue;
      std::error_code ec;
      std::filesystem::remove_all(all[i], ec);
    }
  }

  std::filesystem::path root_;
  int keep_;
};

}  // namespace moca::train
