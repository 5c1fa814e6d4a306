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
// Ops report their arithmetic with count_flops(), for GFLOP/s per entry, and the bytes they move
// at least (each operand read once, each output written once) with count_bytes(), for GB/s: a
// memory-bound scope's rate against the device's copy bandwidth says how far it is from done.
//
// Layers mark themselves with MOCA_PROFILE_SCOPE("name"). Off, a scope costs one thread-local
// load and a branch; on, two clock reads and no allocation (on a timeline, two marks, and
// room for its record, which stays allocated from one report to the next). The timers measure the
// calling thread's wall time, which on the CPU backend includes the OpenMP work the scope waits
// for. A device that queues work asynchronously (CUDA) either registers a synchronizer: while the
// profiler is on, every scope waits for the device at its start and end, so each scope is
// charged the device time of the work it queued (and the step runs slower, with a gap at every
// boundary); or a Timeline: a scope marks the device's queue where it opens and closes (CUDA
// events), and report() reads the device time between the marks, so the step runs as it does
// unprofiled. A scope's timeline time includes the device's idle gaps inside it, where the host
// queues work slower than the device runs it.
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
  double bytes = 0.0;       ///< least memory traffic the scope reported (count_bytes)
};

namespace detail {

using Clock = std::chrono::steady_clock;
inline constexpr int kMaxEntries = 64;  // distinct scope names
inline constexpr int kMaxDepth = 64;    // nesting

struct Frame {
  int entry;
  Clock::time_point start;
  double child_seconds;
  int span;  // its Span on a timeline, or -1
};

/// A scope timed on a device timeline, resolved by report(): its marks and its parent's span.
struct Span {
  int entry, begin, end, parent;
};

}  // namespace detail

/// A device's queue, as points in it (see the top): the CUDA backend's is cuda::EventTimeline.
class Timeline {
 public:
  virtual ~Timeline() = default;
  /// Marks the queue where it stands now; returns the mark's number, counting from 0 after
  /// clear().
  virtual int mark() = 0;
  /// Device seconds between two marks; waits until the device has passed the second.
  virtual double seconds_between(int first, int second) = 0;
  /// Forgets the marks (keeping their storage for the next ones).
  virtual void clear() = 0;
};

namespace detail {

struct State {
  bool enabled = false;
  void (*synchronize)() = nullptr;
  Timeline* timeline = nullptr;
  std::vector<Span> spans;  // closed and open scopes on the timeline since the last report
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

/// Times scopes on this device timeline while the profiler is on (nullptr: by the host's clock).
/// The timeline must outlive its use; set it while no scope is open.
inline void set_timeline(Timeline* timeline) {
  detail::State& s = detail::state();
  s.spans.clear();
  s.timeline = timeline;
}

namespace detail {

/// Charges the timeline's closed scopes their own device time, once no scope is open (an open
/// one's marks are not all there yet), and forgets their marks.
inline void resolve(State& s) {
  if (s.timeline == nullptr || s.spans.empty() || s.depth > 0) return;
  for (const Span& span : s.spans) {
    const double t = s.timeline->seconds_between(span.begin, span.end);
    s.entries[span.entry].seconds += t;
    if (span.parent >= 0) s.entries[s.spans[span.parent].entry].seconds -= t;
  }
  s.spans.clear();
  s.timeline->clear();
}

}  // namespace detail

/// Forgets what was measured on this thread (scopes still open keep timing).
inline void reset() {
  detail::State& s = detail::state();
  detail::resolve(s);
  for (int i = 0; i < s.entries_used; ++i) {
    s.entries[i].seconds = 0;
    s.entries[i].calls = 0;
    s.entries[i].flops = 0;
    s.entries[i].bytes = 0;
  }
}

/// This thread's entries, largest time first. On a timeline, waits for the device first.
inline std::vector<Entry> report() {
  detail::State& s = detail::state();
  detail::resolve(s);
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

/// Adds `bytes` of memory traffic to the innermost open scope: what the op must move at least,
/// each operand it reads counted once and each output it writes once (an input that is also its
/// output, twice). Does nothing while the profiler is off or no scope is open.
inline void count_bytes(double bytes) {
  detail::State& s = detail::state();
  if (s.enabled && s.depth > 0) s.entries[s.stack[s.depth - 1].entry].bytes += bytes;
}

/// Times its own lifetime under `name` while the profiler is on.
class Scope {
 public:
  explicit Scope(const char* name) {
    detail::State& s = detail::state();
    if (!s.enabled || s.depth == detail::kMaxDepth) return;
    if (s.synchronize) s.synchronize();  // a failure here opens no scope
    const int entry = detail::entry_of(s, name);
    int span = -1;
    if (s.timeline) {
      const int parent = s.depth > 0 ? s.stack[s.depth - 1].span : -1;
      const int begin = s.timeline->mark();  // likewise
      span = static_cast<int>(s.spans.size());
      s.spans.push_back({entry, begin, -1, parent});
    }
    active_ = true;
    exceptions_ = std::uncaught_exceptions();
    s.stack[s.depth++] = {entry, detail::Clock::now(), 0.0, span};
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
    Entry& e = s.entries[f.entry];
    ++e.calls;
    if (f.span >= 0) {
      // On the timeline: the span's time is read by report(). A mark that fails leaves the span
      // without time (its begin, as a zero-length span).
      detail::Span& span = s.spans[f.span];
      span.end = span.begin;
      try {
        span.end = s.timeline->mark();
      } catch (...) {
        if (!failure) failure = std::current_exception();
      }
    } else {
      const double elapsed = std::chrono::duration<double>(detail::Clock::now() - f.start).count();
      e.seconds += elapsed - f.child_seconds;
      if (s.depth > 0) s.stack[s.depth - 1].child_seconds += elapsed;
    }
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
