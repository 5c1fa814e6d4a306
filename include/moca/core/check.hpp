// Errors and argument checks.
//
//   MOCA_CHECK(a.size(1) == b.size(0), "gemm: inner sizes differ: A ", a.shape(), " B ", b.shape());
//
// A failed check throws moca::Error whose message names the source location, the condition and
// whatever the caller streamed after it (shapes, file names). Library code never calls exit() or
// abort(): a program decides what an error means. MOCA_DCHECK is compiled only in debug builds and
// is meant for hot loops.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace moca {

/// The one exception type thrown by the library.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {

template <class... Args>
[[noreturn]] void throw_check_failure(const char* file, int line, const char* condition,
                                      const Args&... args) {
  std::ostringstream os;
  os << file << ":" << line << ": ";
  if constexpr (sizeof...(Args) == 0) {
    os << "check failed: " << condition;
  } else {
    (os << ... << args);
  }
  throw Error(os.str());
}

/// Builds a message from streamable pieces: str("expected ", n, " rows").
template <class... Args>
std::string str(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

}  // namespace detail
}  // namespace moca

#define MOCA_CHECK(condition, ...)                                                          \
  do {                                                                                      \
    if (!(condition)) [[unlikely]]                                                          \
      ::moca::detail::throw_check_failure(__FILE__, __LINE__, #condition __VA_OPT__(, )     \
                                              __VA_ARGS__);                                 \
  } while (0)

#ifdef NDEBUG
#define MOCA_DCHECK(condition, ...) \
  do {                              \
  } while (0)
#else
#define MOCA_DCHECK(condition, ...) MOCA_CHECK(condition __VA_OPT__(, ) __VA_ARGS__)
#endif
