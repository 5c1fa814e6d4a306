// Where a training step's time goes: scoped wall-clock timers around layers and updates, each
// charged with its own time only (a scope nested inside another is subtracted from it), so the
// entries of a report add up to the time spent inside the outermost scopes.
//
//   moca::profiler::enable();                      // on this thread; off by default
//   for (...) model.train_step(...);
//   for (const auto& e : moca::profiler::report()) // largest first
//     std::printf("%-20s %8.1f ms %6lld calls\n", e.name, 1e3 * e.seconds, e.calls);
//   moca::profiler::reset();
//
// Layers that know their arithmetic report it with count_flops(), for GFLOP/s per entry.
//
// Layers mark themselves with MOCA_PROFILE_SCOPE("name"). Off, a scope costs one thread-local
// load and a branch; on, two clock reads and no allocation. The timers measure the calling
// thread's wall time, which on the CPU backend includes the OpenMP work the scope waits for.
// A device that queues work asynchronously (CUDA) registers a synchronizer: while the profiler
// is on, every scope waits for the device at its start and end, so each scope is charged the
// device time of the work it queued (and the step runs slower, without overlap).
#pragma once

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <exception>
#include <vector>

namespace moca::profiler {

struct Entry {
  const char* name = nullptr;
  double seconds = 0.0;     ///< exclusive of nested scopes
  std::int64_t calls = 0;
  double flops = 0.0;       ///< floating-point operations the scope reported (count_flops)
};

namespace detail {

using Clock = std::chrono::steady_clock;
inline constexpr int kMaxEntries = 64;  // distinct scope names
inline constexpr int kMaxDepth = 64;    // nesting

struct Frame {
  int entry;
  Clock::time_point start;
  double child_seconds;
};

struct State {
  bool enabled = false;
  void (*synchronize)() = nullptr;
  int entries_used = 0;
  int depth = 0;
  std::array<Entry, kMaxEntries> entries{};
  std::array<Frame, kMaxDepth> stack{};
};

inline State& state() {
  thread_local State s;
  return s;
}

/// The entry of `name` (names are usually string literals: pointers compare first). When the
/// table is full, further names share the last entry, renamed "(other)".
inline int entry_of(State& s, const char* name) {
  for (int i = 0; i < s.entries_used; ++i)
    if (s.entries[i].name == name || std::strcmp(s.entries[i].name, name) == 0) return i;
  if (s.entries_used == kMaxEntries) {
    s.entries[kMaxEntries - 1].name = "(other)";
    return kMaxEntries - 1;
  }
  s.entries[s.entries_used].name = name;
  return s.entries_used++;
}

}  // namespace detail

/// Turns the timers of this thread on or off.
inline void enable(bool on = true) { detail::state().enabled = on; }
inline bool enabled() { return detail::state().enabled; }

/// Waits for the device at every scope boundary while the profiler is on (nullptr: never).
inline void set_synchronizer(void (*synchronize)()) { detail::state().synchronize = synchronize; }

/// Forgets what was measured on this thread (scopes still open keep timing).
inline void reset() {
  detail::State& s = detail::state();
  for (int i = 0; i < s.entries_used; ++i) {
    s.entries[i].seconds = 0;
    s.entries[i].calls = 0;
    s.entries[i].flops = 0;
  }
}

/// This thread's entries, largest time first.
inline std::vector<Entry> report() {
  const detail::State& s = detail::state();
  std::vector<Entry> out;
  for (int i = 0; i < s.entries_used; ++i)
    if (s.entries[i].calls > 0) out.push_back(s.entries[i]);
  std::sort(out.begin(), out.end(),
            [](const Entry& a, const Entry& b) { return a.seconds > b.seconds; });
  return out;
}

/// Adds `flops` operations to the innermost open scope (GEMMs report 2·M·N·K), so a report
/// can show GFLOP/s per entry. Does nothing while the profiler is off or no scope is open.
inline void count_flops(double flops) {
  detail::State& s = detail::state();
  if (s.enabled && s.depth > 0) s.entries[s.stack[s.depth - 1].entry].flops += flops;
}

/// Times its own lifetime under `name` while the profiler is on.
class Scope {
 public:
  explicit Scope(const char* name) {
    detail::State& s = detail::state();
    if (!s.enabled || s.depth == detail::kMaxDepth) return;
    if (s.synchronize) s.synchronize();  // a failure here opens no scope
    active_ = true;
    exceptions_ = std::uncaught_exceptions();
    s.stack[s.depth++] = {detail::entry_of(s, name), detail::Clock::now(), 0.0};
  }
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;
  /// The synchronizer may report a failure of the work the scope queued (a CUDA error): it is
  /// thrown from here, after the scope is closed, unless the scope is being left by an exception
  /// already, which then goes on (a second one would end the program).
  ~Scope() noexcept(false) {
    if (!active_) return;
    detail::State& s = detail::state();
    std::exception_ptr failure;
    if (s.synchronize) {
      try {
        s.synchronize();
      } catch (...) {
        failure = std::current_exception();
      }
    }
    const detail::Frame f = s.stack[--s.depth];
    const double elapsed =
        std::chrono::duration<double>(detail::Clock::now() - f.start).count();
    Entry& e = s.entries[f.entry];
    e.seconds += elapsed - f.child_seconds;
    ++e.calls;
    if (s.depth > 0) s.stack[s.depth - 1].child_seconds += elapsed;
    if (failure && std::uncaught_exceptions() == exceptions_) std::rethrow_exception(failure);
  }

 private:
  bool active_ = false;
  int exceptions_ = 0;  // in flight when the scope opened
};

}  // namespace moca::profiler

#define MOCA_PROFILE_CONCAT_(a, b) a##b
#define MOCA_PROFILE_CONCAT(a, b) MOCA_PROFILE_CONCAT_(a, b)
/// Charges the rest of the enclosing block to `name` (a string that outlives the report).
#define MOCA_PROFILE_SCOPE(name) \
  ::moca::profiler::Scope MOCA_PROFILE_CONCAT(moca_profile_scope_, __LINE__)(name)
