// The staging blocks that uploads to a GPU go through (backend/cuda/staging_blocks.hpp), run on
// the host with events that complete when the test says so; and the counter of the host's waits.
#include <doctest/doctest.h>

#include <chrono>
#include <cstdlib>
#include <moca/backend/cuda/host_waits.hpp>
#include <moca/backend/cuda/staging_blocks.hpp>
#include <set>
#include <stdexcept>
#include <thread>
#include <vector>

using moca::cuda::StagingBlocks;

namespace {

// An event is an index into `done`; record() marks it pending until the test completes it.
struct HostStaging {
  struct State {
    std::vector<bool> done;
    int allocated = 0, released = 0, waits = 0;
  };
  using Event = int;
  State* state;

  void* allocate(std::size_t bytes) {
    ++state->allocated;
    return std::malloc(bytes);
  }
  void release(void* p) {
    ++state->released;
    std::free(p);
  }
  Event create_event() {
    state->done.push_back(true);
    return static_cast<Event>(state->done.size() - 1);
  }
  void destroy_event(Event) {}
  void record(Event e) { state->done[static_cast<std::size_t>(e)] = false; }
  bool done(Event e) { return state->done[static_cast<std::size_t>(e)]; }
  void wait(Event e) {
    ++state->waits;
    state->done[static_cast<std::size_t>(e)] = true;
  }
  void complete_all() {
    for (std::size_t i = 0; i < state->done.size(); ++i) state->done[i] = true;
  }
};

}  // namespace

TEST_CASE("staging blocks: a block is not handed out again before its copy has run") {
  HostStaging::State st;
  HostStaging policy{&st};
  StagingBlocks<HostStaging> blocks(policy, 8);
  auto& a = blocks.acquire(100);
  CHECK(a.capacity == StagingBlocks<HostStaging>::kMinBytes);
  blocks.queued(a);
  auto& b = blocks.acquire(100);
  CHECK(&b != &a);  // a's copy is pending
  blocks.queued(b);
  CHECK(blocks.stats().blocks == 2);
  st.done[static_cast<std::size_t>(a.event)] = true;  // a's copy has run
  auto& c = blocks.acquire(50);
  CHECK(&c == &a);
  blocks.queued(c);
  CHECK(st.waits == 0);
  CHECK(blocks.stats().allocations == 2);
}

TEST_CASE("staging blocks: the smallest free block that fits; larger uploads get larger blocks") {
  HostStaging::State st;
  HostStaging policy{&st};
  StagingBlocks<HostStaging> blocks(policy, 8);
  constexpr std::size_t kMin = StagingBlocks<HostStaging>::kMinBytes;
  auto& big = blocks.acquire(5 * kMin);  // rounded up to a power of two
  CHECK(big.capacity == 8 * kMin);
  blocks.queued(big);
  auto& small = blocks.acquire(10);
  CHECK(small.capacity == kMin);
  blocks.queued(small);
  policy.complete_all();
  CHECK(&blocks.acquire(10) == &small);  // both are free: the smaller one serves
  CHECK(&blocks.acquire(2 * kMin) == &big);
  CHECK(blocks.stats().allocations == 2);
}

TEST_CASE("staging blocks: a steady stream of uploads settles on a fixed set of blocks") {
  HostStaging::State st;
  HostStaging policy{&st};
  StagingBlocks<HostStaging> blocks(policy, 64);
  // Each "step" uploads seven buffers of different sizes; the device finishes a step's copies
  // by the time the host has queued the next step's (it runs one step behind at most).
  const std::size_t sizes[7] = {4'000, 100'000, 4'000, 600, 100'000, 600, 128};
  std::vector<int> previous, current;
  std::uint64_t allocations_after_warmup = 0;
  for (int step = 0; step < 20; ++step) {
    current.clear();
    std::set<const void*> in_use;
    for (std::size_t s : sizes) {
      auto& b = blocks.acquire(s);
      CHECK(b.capacity >= s);
      CHECK(in_use.insert(b.data).second);  // never one block twice within a step
      blocks.queued(b);
      current.push_back(b.event);
    }
    for (int e : previous) st.done[static_cast<std::size_t>(e)] = true;
    previous = current;
    if (step == 2) allocations_after_warmup = blocks.stats().allocations;
  }
  CHECK(blocks.stats().allocations == allocations_after_warmup);
  CHECK(blocks.stats().blocks <= 14);
  CHECK(st.waits == 0);
}

TEST_CASE("staging blocks: with every block in use, the oldest is waited for and enlarged") {
  HostStaging::State st;
  HostStaging policy{&st};
  {
    StagingBlocks<HostStaging> blocks(policy, 2);
    auto& a = blocks.acquire(10);
    blocks.queued(a);
    auto& b = blocks.acquire(10);
    blocks.queued(b);
    auto& c = blocks.acquire(3 * StagingBlocks<HostStaging>::kMinBytes);
    CHECK(&c == &a);  // queued first
    CHECK(st.waits == 1);
    CHECK(st.done[static_cast<std::size_t>(a.event)]);
    CHECK(c.capacity == 4 * StagingBlocks<HostStaging>::kMinBytes);
    CHECK(st.released == 1);  // the old allocation of a
    blocks.queued(c);
    auto& d = blocks.acquire(10);
    CHECK(&d == &b);
    CHECK(st.waits == 2);
    CHECK(blocks.stats().waits == 2);
    CHECK(blocks.stats().blocks == 2);
  }
  CHECK(st.released == st.allocated);  // the destructor frees every block
}

TEST_CASE("staging blocks: pinned memory stays under max_bytes; a free block is enlarged first") {
  HostStaging::State st;
  HostStaging policy{&st};
  constexpr std::size_t kMin = StagingBlocks<HostStaging>::kMinBytes;
  StagingBlocks<HostStaging> blocks(policy, 64, 4 * kMin);
  auto& a = blocks.acquire(kMin);
  blocks.queued(a);
  auto& b = blocks.acquire(2 * kMin);
  blocks.queued(b);
  CHECK(blocks.stats().bytes == 3 * kMin);
  // Another 64 KiB block fits the limit; then a fourth would not: the oldest is waited for.
  auto& c = blocks.acquire(10);
  blocks.queued(c);
  CHECK(blocks.stats().bytes == 4 * kMin);
  CHECK(st.waits == 0);
  auto& d = blocks.acquire(10);
  CHECK(&d == &a);
  CHECK(st.waits == 1);
  blocks.queued(d);
  // A free block too small for the upload is enlarged without a wait, and the total follows.
  st.done[static_cast<std::size_t>(c.event)] = true;
  auto& e = blocks.acquire(2 * kMin);
  CHECK(&e == &c);
  CHECK(st.waits == 1);
  CHECK(e.capacity == 2 * kMin);
  CHECK(blocks.stats().bytes == 5 * kMin);  // over the limit only by what one upload needs
  CHECK(blocks.stats().blocks == 3);
  // With no block at all, the first upload gets one whatever its size.
  StagingBlocks<HostStaging> tiny(policy, 64, 1);
  CHECK(tiny.acquire(kMin).capacity == kMin);
}

TEST_CASE("host waits are counted and timed, a wait that throws included") {
  moca::cuda::HostWaitCounter waits;
  CHECK(waits.count() == 0);
  CHECK(waits.seconds() == 0.0);
  waits.wait([] { std::this_thread::sleep_for(std::chrono::milliseconds(20)); });
  CHECK(waits.count() == 1);
  CHECK(waits.seconds() >= 0.02);
  const double after_one = waits.seconds();
  CHECK_THROWS_AS(waits.wait([] {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    throw std::runtime_error("device failed");
  }),
                  std::runtime_error);
  CHECK(waits.count() == 2);
  CHECK(waits.seconds() >= after_one + 0.01);
}
