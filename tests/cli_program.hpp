// The `moca` program the CLI tests drive, and running it: $MOCA_CLI_PROGRAM when set (a build run
// on another machine than it was built on, as scripts/gpu-check.sh does), else the one this
// build made.
#pragma once

#include <sys/wait.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

namespace moca::testing {

inline std::string cli_program() {
  const char* p = std::getenv("MOCA_CLI_PROGRAM");
  return p != nullptr && *p != '\0' ? std::string(p) : std::string(MOCA_CLI);
}

/// The whole content of a file ("" when it cannot be read).
inline std::string read_file_text(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

/// How one run of the program ended: its exit status (-1 when a signal ended it) and what it
/// wrote.
struct CliRun {
  int status;
  std::string out, err;
};

/// Runs `moca <args>` with its output captured in stdout.txt and stderr.txt under `dir`.
inline CliRun run_cli(const std::string& args, const std::filesystem::path& dir) {
  const std::filesystem::path out = dir / "stdout.txt", err = dir / "stderr.txt";
  const std::string cmd = cli_program() + " " + args + " > " + out.string() + " 2> " + err.string();
  const int rc = std::system(cmd.c_str());
  return {WIFEXITED(rc) ? WEXITSTATUS(rc) : -1, read_file_text(out), read_file_text(err)};
}

}  // namespace moca::testing
