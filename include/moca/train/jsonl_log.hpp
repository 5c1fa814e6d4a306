// A machine-readable training log: one JSON object per line (JSON Lines), flushed line by line
// so that a crash loses at most the line being written and `tail -f` or pandas can follow it.
//
//   auto log = JsonlLog::create("run/log.jsonl");           // a new run: starts empty
//   auto log = JsonlLog::resume("run/log.jsonl", 1200);      // keeps records with step <= 1200
//   log.write({{"step", 1201}, {"loss", 6.5}});
//
// resume() drops the records a resumed run will write again (those after its checkpoint), so
// the log of an interrupted and resumed run reads like the log of one that never stopped. The
// rewrite is atomic; a last line cut short by a crash is dropped.
#pragma once

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "moca/core/check.hpp"
#include "moca/io/atomic_file.hpp"

namespace moca::train {

class JsonlLog {
 public:
  JsonlLog() = default;
  JsonlLog(const JsonlLog&) = delete;
  JsonlLog& operator=(const JsonlLog&) = delete;
  JsonlLog(JsonlLog&& o) noexcept : path_(std::move(o.path_)), file_(o.file_) { o.file_ = nullptr; }
  JsonlLog& operator=(JsonlLog&& o) noexcept {
    if (this != &o) {
      close();
      path_ = std::move(o.path_);
      file_ = o.file_;
      o.file_ = nullptr;
    }
    return *this;
  }
  ~JsonlLog() { close(); }

  /// Starts an empty log at `path` (replacing any file there).
  static JsonlLog create(const std::filesystem::path& path) {
    { AtomicFileWriter(path).commit(); }
    return JsonlLog(path);
  }

  /// Keeps the records of `path` whose "step" is at most `step` (and those without a step), then
  /// appends after them. A missing file starts empty.
  static JsonlLog resume(const std::filesystem::path& path, std::int64_t step) {
    std::string kept;
    std::ifstream in(path);
    std::string line;
    while (std::getline(in, line)) {
      if (line.empty()) continue;
      const nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (j.is_discarded() || !j.is_object()) continue;  // a line cut short by a crash
      if (j.contains("step") && j["step"].is_number() && j["step"].get<double>() > step) continue;
      kept += line;
      kept += '\n';
    }
    AtomicFileWriter out(path);
    out.write(kept.data(), kept.size());
    out.commit();
    return JsonlLog(path);
  }

  /// Appends one record and flushes it.
  void write(const nlohmann::json& record) {
    MOCA_CHECK(file_ != nullptr, "JsonlLog: write to a closed log");
    const std::string s = record.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    if (std::fprintf(file_, "%s\n", s.c_str()) < 0 || std::fflush(file_) != 0)
      MOCA_CHECK(false, "cannot write to the log ", path_.string());
  }

  /// All records of a log file, in order (lines that are not JSON objects are skipped).
  static std::vector<nlohmann::json> read(const std::filesystem::path& path) {
    std::ifstream in(path);
    MOCA_CHECK(in.good(), "cannot open the log ", path.string());
    std::vector<nlohmann::json> out;
    std::string line;
    while (std::getline(in, line)) {
      nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
      if (!j.is_discarded() && j.is_object()) out.push_back(std::move(j));
    }
    return out;
  }

  const std::filesystem::path& path() const { return path_; }

 private:
  explicit JsonlLog(std::filesystem::path path) : path_(std::move(path)) {
    file_ = std::fopen(path_.c_str(), "a");
    MOCA_CHECK(file_ != nullptr, "cannot open the log ", path_.string(), " for appending");
  }
  void close() {
    if (file_ != nullptr) std::fclose(file_);
    file_ = nullptr;
  }

  std::filesystem::path path_;
  std::FILE* file_ = nullptr;
};

}  // namespace moca::train
