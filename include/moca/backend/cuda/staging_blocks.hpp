// Pinned host blocks that uploads to the device go through, each reused once the copy that read
// it has run: the host copies its bytes into a block, queues the block's copy to the device and
// records an event behind it, and returns without waiting.
//
//   StagingBlock<Event>& b = blocks.acquire(bytes);   // free of queued copies, >= bytes
//   std::memcpy(b.data, src, bytes);
//   cudaMemcpyAsync(dst, b.data, bytes, cudaMemcpyHostToDevice, stream);
//   blocks.queued(b);                                 // records b's event behind the copy
//
// A training step's uploads (mask indices, gathered rows) find their blocks free again one step
// later, so once the first steps have sized them nothing is allocated and nothing waits. Only
// when `max_blocks` are in use, or a new block would take the pinned memory past `max_bytes`,
// does acquire() wait, for the block queued longest ago.
//
// Plain C++: the policy does the pinned allocations and the events (CudaStaging in staging.hpp;
// the tests use a host policy whose events complete when told to).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace moca::cuda {

template <class Event>
struct StagingBlock {
  void* data = nullptr;
  std::size_t capacity = 0;
  Event event{};
  std::uint64_t queued_at = 0;  // 0: never queued (free); else the order it was queued in
};

/// Counters of a set of staging blocks.
struct StagingStats {
  std::size_t blocks = 0;         ///< blocks held
  std::size_t bytes = 0;          ///< pinned bytes they hold
  std::uint64_t allocations = 0;  ///< pinned allocations so far (new blocks and larger ones)
  std::uint64_t waits = 0;        ///< times acquire() waited for a block still being copied
};

/// Policy: `Event`; `void* allocate(std::size_t)`, `void release(void*)` (pinned memory);
/// `Event create_event()`, `void destroy_event(Event)`, `void record(Event)` (behind the work
/// queued so far), `bool done(Event)` (the work before it has run), `void wait(Event)`.
template <class Policy>
class StagingBlocks {
 public:
  using Event = typename Policy::Event;
  using Block = StagingBlock<Event>;

  /// Blocks are at least kMinBytes and a power of two, so a few sizes serve every upload.
  static constexpr std::size_t kMinBytes = std::size_t{64} << 10;

  explicit StagingBlocks(Policy policy = {}, std::size_t max_blocks = 64,
                         std::size_t max_bytes = std::size_t{256} << 20)
      : policy_(std::move(policy)),
        max_blocks_(max_blocks < 1 ? 1 : max_blocks),
        max_bytes_(max_bytes) {}
  StagingBlocks(const StagingBlocks&) = delete;
  StagingBlocks& operator=(const StagingBlocks&) = delete;
  ~StagingBlocks() {
    for (auto& b : blocks_) {
      policy_.release(b->data);
      policy_.destroy_event(b->event);
    }
  }

  /// A block of at least `bytes` that no queued copy reads any more: the smallest free one that
  /// fits, else a new one, else (at `max_blocks`, or a new block would pass `max_bytes`) a free
  /// one or the one queued longest ago, waited for, enlarged if it is too small.
  Block& acquire(std::size_t bytes) {
    Block* best = nullptr;
    for (auto& b : blocks_)
      if (b->capacity >= bytes && is_free(*b) && (best == nullptr || b->capacity < best->capacity))
        best = b.get();
    if (best != nullptr) return *best;
    if (blocks_.empty() ||
        (blocks_.size() < max_blocks_ && pinned_bytes_ + block_size(bytes) <= max_bytes_)) {
      auto b = std::make_unique<Block>();
      b->event = policy_.create_event();
      blocks_.push_back(std::move(b));
      Block& fresh = *blocks_.back();
      allocate(fresh, bytes);
      return fresh;
    }
    // The largest free block (all are too small), else the one queued longest ago, waited for.
    Block* pick = nullptr;
    for (auto& b : blocks_)
      if (is_free(*b) && (pick == nullptr || b->capacity > pick->capacity)) pick = b.get();
    if (pick == nullptr) {
      for (auto& b : blocks_)
        if (pick == nullptr || b->queued_at < pick->queued_at) pick = b.get();
      ++stats_.waits;
      policy_.wait(pick->event);
      pick->queued_at = 0;
    }
    if (pick->capacity < bytes) {
      policy_.release(pick->data);
      pinned_bytes_ -= pick->capacity;
      pick->data = nullptr;
      pick->capacity = 0;
      allocate(*pick, bytes);
    }
    return *pick;
  }

  /// Marks `block` as read by the copy just queued: it is not handed out again before that copy
  /// has run.
  void queued(Block& block) {
    policy_.record(block.event);
    block.queued_at = ++queue_count_;
  }

  StagingStats stats() const {
    StagingStats s = stats_;
    s.blocks = blocks_.size();
    s.bytes = pinned_bytes_;
    return s;
  }

 private:
  bool is_free(Block& b) {
    if (b.queued_at == 0) return true;
    if (!policy_.done(b.event)) return false;
    b.queued_at = 0;
    return true;
  }

  static std::size_t block_size(std::size_t bytes) {
    std::size_t capacity = kMinBytes;
    while (capacity < bytes) capacity *= 2;
    return capacity;
  }

  void allocate(Block& b, std::size_t bytes) {
    const std::size_t capacity = block_size(bytes);
    b.data = policy_.allocate(capacity);
    b.capacity = capacity;
    pinned_bytes_ += capacity;
    ++stats_.allocations;
  }

  Policy policy_;
  std::size_t max_blocks_, max_bytes_;
  std::size_t pinned_bytes_ = 0;
  std::vector<std::unique_ptr<Block>> blocks_;  // stable addresses: acquire() hands out references
  std::uint64_t queue_count_ = 0;
  StagingStats stats_;
};

}  // namespace moca::cuda
