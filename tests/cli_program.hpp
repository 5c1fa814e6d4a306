// The `moca` program the CLI tests drive: $MOCA_CLI_PROGRAM when set (a build run on another
// machine than it was built on, as scripts/gpu-check.sh does), else the one this build made.
#pragma once

#include <cstdlib>
#include <string>

namespace moca::testing {

inline std::string cli_program() {
  const char* p = std::getenv("MOCA_CLI_PROGRAM");
  return p != nullptr && *p != '\0' ? std::string(p) : std::string(MOCA_CLI);
}

}  // namespace moca::testing
