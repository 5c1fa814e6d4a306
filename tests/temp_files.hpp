// Shared by the tests that write and read files: a temporary folder removed at scope exit, and
// the message of the moca::Error an action throws.
#pragma once

#include <doctest/doctest.h>
#include <unistd.h>

#include <filesystem>
#include <moca/core/check.hpp>
#include <string>
#include <system_error>

namespace moca::testing {

/// A fresh folder under the system temporary directory, named after the test (`tag`), the
/// process and a counter so that tests running side by side never share one; removed with
/// everything in it at scope exit.
struct TempDir {
  std::filesystem::path path;
  explicit TempDir(const std::string& tag) {
    static int counter = 0;
    path = std::filesystem::temp_directory_path() /
           ("moca_" + tag + "_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  /// The path of `name` inside the folder.
  std::string file(const std::string& name) const { return (path / name).string(); }
};

/// The message of the moca::Error that f throws; fails the test when f throws none.
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  FAIL("no moca::Error was thrown");
  return {};
}

inline bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

}  // namespace moca::testing
