#pragma once

#define MOCA_VERSION_MAJOR 0
#define MOCA_VERSION_MINOR 1
#define MOCA_VERSION_PATCH 0

namespace moca {
inline constexpr const char* kVersion = "0.1.0";
}
