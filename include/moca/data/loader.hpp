// Loaders: batches of augmented two-view pairs for pretraining, and preprocessed single images
// in order for evaluation, prepared on background threads while the caller trains.
//
//   auto train = FashionMnist::load(Split::Train);
//   TwoViewLoader loader(train, AugmentConfig::fashion_mnist_tiny(),
//                        {.batch_size = 128, .workers = 2, .seed = 0});
//   loader.seek(epoch, batch);                  // resume: continues the same sequence
//   for (;;) {
//     const TwoViewBatch& b = loader.next();    // valid until the next call to next() or seek()
//     step(b.view1, b.view2);                   // [B, C, S, S] each
//   }
//
// Determinism: batch b of epoch e holds the samples order(e)[b·B .. b·B + B), where order(e) is a
// permutation drawn from Philox(seed) on shuffle_stream(e), and each view is a pure function of
// (seed, epoch, index, view) (augment.hpp). What a batch contains therefore does not depend on
// the number of workers, on which worker made it, or on where the run started.
//
// Threading: N std::threads claim batch numbers in order and fill slots of a ring of
// prefetch + 1 preallocated batches; a worker never runs more than `prefetch` batches ahead of
// the consumer (a bounded queue), and the slot the consumer holds is never written. Slots are
// reused, so after the first round the loader allocates no tensors (the allocation counters of
// a training step stay flat). seek() cancels the work in flight (workers poll between samples)
// and waits for it before restarting at the new cursor. An exception thrown while preparing a
// batch (e.g. an unreadable image in strict mode) is rethrown by the next() that would have
// returned that batch. next() and seek() belong to one consumer thread; workers = 0 prepares
// each batch inside next().
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <thread>
#include <utility>
#include <vector>

#include "moca/core/check.hpp"
#include "moca/core/rng.hpp"
#include "moca/core/tensor.hpp"
#include "moca/data/augment.hpp"
#include "moca/data/dataset.hpp"

namespace moca::data {

/// Settings of a TwoViewLoader.
struct LoaderOptions {
  std::int64_t batch_size = 128;
  bool shuffle = true;     ///< a new permutation every epoch; false: data set order
  bool drop_last = true;   ///< drop the last incomplete batch of an epoch
  int workers = 2;         ///< background threads; 0: batches are prepared inside next()
  int prefetch = 4;        ///< batches prepared ahead of the consumer (at least 1)
  std::uint64_t seed = 0;  ///< seeds the shuffle and the augmentation
};

/// One batch of two augmented views per sample.
struct TwoViewBatch {
  Tensor<float> view1;                ///< [B, C, S, S], normalised
  Tensor<float> view2;                ///< [B, C, S, S], normalised
  std::vector<std::int64_t> indices;  ///< data set index of each sample
  std::vector<std::int32_t> labels;   ///< its label (-1 when unlabelled), for evaluation only
  std::int64_t epoch = 0;
  std::int64_t batch = 0;  ///< position within the epoch
  std::int64_t size() const { return static_cast<std::int64_t>(indices.size()); }
};

/// One batch of preprocessed images, in data set order.
struct EvalBatch {
  Tensor<float> images;               ///< [B, C, S, S], normalised
  std::vector<std::int64_t> indices;  ///< data set index of each image
  std::vector<std::int32_t> labels;
  std::int64_t batch = 0;
  std::int64_t size() const { return static_cast<std::int64_t>(indices.size()); }
};

/// The permutation of epoch `epoch`: Fisher-Yates with swaps drawn from Philox(seed) on
/// shuffle_stream(epoch).
inline std::vector<std::int64_t> shuffled_order(std::int64_t n, std::uint64_t seed,
                                                std::int64_t epoch) {
  std::vector<std::int64_t> order(static_cast<std::size_t>(n));
  std::iota(order.begin(), order.end(), std::int64_t{0});
  const Philox rng(seed);
  const std::uint64_t stream = shuffle_stream(epoch);
  for (std::int64_t i = n - 1; i > 0; --i) {
    const auto j = static_cast<std::int64_t>(
        rng.below(static_cast<std::uint64_t>(i + 1), stream, static_cast<std::uint64_t>(i)));
    std::swap(order[static_cast<std::size_t>(i)], order[static_cast<std::size_t>(j)]);
  }
  return order;
}

namespace detail {

/// What a producer polls to stop early when its work has been cancelled.
class CancelToken {
 public:
  CancelToken(const std::atomic<std::uint64_t>& generation, std::uint64_t mine)
      : generation_(generation), mine_(mine) {}
  bool cancelled() const { return generation_.load(std::memory_order_relaxed) != mine_; }

 private:
  const std::atomic<std::uint64_t>& generation_;
  std::uint64_t mine_;
};

/// A ring of prefetch + 1 slots filled in order by worker threads: item g goes to slot
/// g mod (prefetch + 1) and is claimed only once item g - prefetch - 1 has been released by the
/// consumer. `total` < 0 means an endless sequence.
template <class Slot>
class Prefetcher {
 public:
  using Produce =
      std::function<void(std::int64_t item, Slot& slot, int worker, const CancelToken&)>;

  Prefetcher(int workers, int prefetch, std::int64_t total, Produce produce)
      : produce_(std::move(produce)), workers_(workers), total_(total) {
    MOCA_CHECK(workers >= 0 && prefetch >= 1, "loader: workers ", workers, " prefetch ", prefetch,
               " (need workers >= 0, prefetch >= 1)");
    slots_.resize(static_cast<std::size_t>(prefetch) + 1);
    state_.resize(slots_.size());
    threads_.reserve(static_cast<std::size_t>(workers));
    for (int w = 0; w < workers; ++w) threads_.emplace_back([this, w] { work(w); });
  }
  Prefetcher(const Prefetcher&) = delete;
  Prefetcher& operator=(const Prefetcher&) = delete;
  ~Prefetcher() {
    {
      std::lock_guard lock(mutex_);
      stop_ = true;
      generation_.fetch_add(1);
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }

  /// The next item (nullptr after the last one of a finite sequence). Releases the previous one.
  Slot* next() {
    std::unique_lock lock(mutex_);
    if (holding_) {
      holding_ = false;
      cv_.notify_all();
    }
    if (total_ >= 0 && head_ >= total_) return nullptr;
    const std::int64_t item = head_;
    State& st = state_[slot_of(item)];
    if (workers_ == 0) {
      st = State{item, false, nullptr};
      next_claim_ = item + 1;
      const std::uint64_t gen = generation_.load();
      lock.unlock();
      std::exception_ptr error;
      try {
        produce_(item, slots_[slot_of(item)], 0, CancelToken(generation_, gen));
      } catch (...) {
        error = std::current_exception();
      }
      lock.lock();
      st.ready = true;
      st.error = error;
    } else {
      cv_.wait(lock, [&] { return st.item == item && st.ready; });
    }
    head_ = item + 1;
    holding_ = true;
    if (st.error) std::rethrow_exception(st.error);
    return &slots_[slot_of(item)];
  }

  /// Restarts at item `first`: cancels and waits for the work in flight, drops prepared items.
  void seek(std::int64_t first) {
    MOCA_CHECK(first >= 0, "loader: seek to negative position ", first);
    std::unique_lock lock(mutex_);
    seeking_ = true;
    generation_.fetch_add(1);
    cv_.notify_all();
    cv_.wait(lock, [&] { return in_flight_ == 0; });
    for (auto& st : state_) st = State{};
    head_ = first;
    next_claim_ = first;
    holding_ = false;
    seeking_ = false;
    cv_.notify_all();
  }

  /// The item the next call to next() returns.
  std::int64_t position() const {
    std::lock_guard lock(mutex_);
    return head_;
  }

 private:
  struct State {
    std::int64_t item = -1;
    bool ready = false;
    std::exception_ptr error;
  };

  std::size_t slot_of(std::int64_t item) const {
    return static_cast<std::size_t>(item % static_cast<std::int64_t>(slots_.size()));
  }

  // Under the lock: whether the next item may be claimed now.
  bool claimable() const {
    if (seeking_ || (total_ >= 0 && next_claim_ >= total_)) return false;
    const std::int64_t oldest_kept = holding_ ? head_ - 1 : head_;
    return next_claim_ < oldest_kept + static_cast<std::int64_t>(slots_.size());
  }

  void work(int worker) {
    std::unique_lock lock(mutex_);
    for (;;) {
      cv_.wait(lock, [&] { return stop_ || claimable(); });
      if (stop_) return;
      const std::int64_t item = next_claim_++;
      const std::size_t s = slot_of(item);
      const std::uint64_t gen = generation_.load();
      state_[s] = State{item, false, nullptr};
      ++in_flight_;
      lock.unlock();
      std::exception_ptr error;
      try {
        produce_(item, slots_[s], worker, CancelToken(generation_, gen));
      } catch (...) {
        error = std::current_exception();
      }
      lock.lock();
      --in_flight_;
      if (generation_.load() == gen) {
        state_[s].ready = true;
        state_[s].error = error;
      }
      cv_.notify_all();
    }
  }

  Produce produce_;
  int workers_;
  std::int64_t total_;
  std::vector<Slot> slots_;
  std::vector<State> state_;
  mutable std::mutex mutex_;
  std::condition_variable cv_;
  std::atomic<std::uint64_t> generation_{0};
  std::int64_t head_ = 0;        // next item for the consumer
  std::int64_t next_claim_ = 0;  // next item for a worker
  bool holding_ = false;         // the consumer holds item head_ - 1
  bool seeking_ = false;
  bool stop_ = false;
  int in_flight_ = 0;
  std::vector<std::thread> threads_;  // last: started once everything else exists
};

}  // namespace detail

/// Endless batches of two augmented views, epoch after epoch (spec §8: shuffled per epoch,
/// drop_last). See the top of this header for determinism and threading.
class TwoViewLoader {
 public:
  /// `data` must outlive the loader and allow concurrent get() calls.
  TwoViewLoader(const Dataset& data, AugmentConfig config, LoaderOptions options = {})
      : data_(data), augment_(config, options.seed), opt_(options) {
    MOCA_CHECK(opt_.batch_size > 0, "TwoViewLoader: batch size ", opt_.batch_size);
    const std::int64_t n = data_.size();
    MOCA_CHECK(n > 0, "TwoViewLoader: the data set is empty");
    batches_ = opt_.drop_last ? n / opt_.batch_size : (n + opt_.batch_size - 1) / opt_.batch_size;
    MOCA_CHECK(batches_ > 0, "TwoViewLoader: ", n, " samples make no full batch of ",
               opt_.batch_size, " (drop_last)");
    scratch_.resize(static_cast<std::size_t>(std::max(1, opt_.workers)));
    prefetcher_ = std::make_unique<detail::Prefetcher<TwoViewBatch>>(
        opt_.workers, opt_.prefetch, -1,
        [this](std::int64_t item, TwoViewBatch& b, int worker, const detail::CancelToken& c) {
          produce(item, b, worker, c);
        });
  }

  /// Batches in one epoch.
  std::int64_t batches_per_epoch() const { return batches_; }
  /// Samples in the data set.
  std::int64_t dataset_size() const { return data_.size(); }
  const TwoViewAugment& augment() const { return augment_; }
  const LoaderOptions& options() const { return opt_; }

  /// The batch at the cursor; advances the cursor (to the next epoch after the last batch).
  /// The reference stays valid until the next call to next() or seek().
  const TwoViewBatch& next() { return *prefetcher_->next(); }

  /// Moves the cursor to batch `batch` of epoch `epoch`: next() continues from there with the
  /// same batches an uninterrupted run would have had.
  void seek(std::int64_t epoch, std::int64_t batch) {
    MOCA_CHECK(epoch >= 0 && batch >= 0 && batch < batches_, "TwoViewLoader: cannot seek to epoch ",
               epoch, " batch ", batch, " (", batches_, " batches per epoch)");
    prefetcher_->seek(epoch * batches_ + batch);
  }
  /// Epoch of the batch the next call to next() returns.
  std::int64_t epoch() const { return prefetcher_->position() / batches_; }
  /// Position within its epoch of the batch the next call to next() returns.
  std::int64_t batch() const { return prefetcher_->position() % batches_; }

  /// The data set order of an epoch (identity when shuffling is off).
  std::vector<std::int64_t> epoch_order(std::int64_t epoch) const {
    if (!opt_.shuffle) {
      std::vector<std::int64_t> order(static_cast<std::size_t>(data_.size()));
      std::iota(order.begin(), order.end(), std::int64_t{0});
      return order;
    }
    return shuffled_order(data_.size(), opt_.seed, epoch);
  }

 private:
  // The order of an epoch, computed once and shared by the workers.
  std::shared_ptr<const std::vector<std::int64_t>> order(std::int64_t epoch) {
    std::lock_guard lock(order_mutex_);
    auto it = orders_.find(epoch);
    if (it != orders_.end()) return it->second;
    auto o = std::make_shared<const std::vector<std::int64_t>>(epoch_order(epoch));
    orders_[epoch] = o;
    while (orders_.size() > 3) orders_.erase(orders_.begin());  // keep the latest epochs
    return o;
  }

  void produce(std::int64_t item, TwoViewBatch& b, int worker, const detail::CancelToken& cancel) {
    const std::int64_t epoch = item / batches_, batch = item % batches_;
    const auto ord = order(epoch);
    const std::int64_t begin = batch * opt_.batch_size;
    const std::int64_t end = std::min(begin + opt_.batch_size, data_.size());
    const std::int64_t n = end - begin;
    const int c = augment_.channels(), s = augment_.size();
    b.view1.resize(Shape{n, c, s, s});
    b.view2.resize(Shape{n, c, s, s});
    b.indices.resize(static_cast<std::size_t>(n));
    b.labels.resize(static_cast<std::size_t>(n));
    b.epoch = epoch;
    b.batch = batch;
    AugmentScratch& scratch = scratch_[static_cast<std::size_t>(worker)];
    const std::int64_t numel = augment_.view_numel();
    for (std::int64_t k = 0; k < n; ++k) {
      if (cancel.cancelled()) return;
      const std::int64_t index = (*ord)[static_cast<std::size_t>(begin + k)];
      const Sample sample = data_.get(index);
      b.indices[static_cast<std::size_t>(k)] = index;
      b.labels[static_cast<std::size_t>(k)] = sample.label;
      augment_.apply(sample.image, epoch, index, 0, b.view1.data() + k * numel, scratch);
      augment_.apply(sample.image, epoch, index, 1, b.view2.data() + k * numel, scratch);
    }
  }

  const Dataset& data_;
  TwoViewAugment augment_;
  LoaderOptions opt_;
  std::int64_t batches_ = 0;
  std::vector<AugmentScratch> scratch_;  // one per worker
  std::mutex order_mutex_;
  std::map<std::int64_t, std::shared_ptr<const std::vector<std::int64_t>>> orders_;
  std::unique_ptr<detail::Prefetcher<TwoViewBatch>> prefetcher_;  // last: its threads use the rest
};

/// The evaluation images of a data set, in order, preprocessed by EvalTransform (no
/// augmentation), in batches of batch_size (the last one may be smaller).
class EvalLoader {
 public:
  /// `data` must outlive the loader and allow concurrent get() calls.
  EvalLoader(const Dataset& data, AugmentConfig config, std::int64_t batch_size, int workers = 2,
             int prefetch = 2)
      : data_(data), transform_(config), batch_size_(batch_size) {
    MOCA_CHECK(batch_size > 0, "EvalLoader: batch size ", batch_size);
    batches_ = (data_.size() + batch_size - 1) / batch_size;
    scratch_.resize(static_cast<std::size_t>(std::max(1, workers)));
    prefetcher_ = std::make_unique<detail::Prefetcher<EvalBatch>>(
        workers, prefetch, batches_,
        [this](std::int64_t item, EvalBatch& b, int worker, const detail::CancelToken& c) {
          produce(item, b, worker, c);
        });
  }

  std::int64_t num_batches() const { return batches_; }
  const EvalTransform& transform() const { return transform_; }

  /// The next batch, or nullptr after the last one. The batch stays valid until the next call
  /// to next() or reset().
  const EvalBatch* next() { return prefetcher_->next(); }

  /// Starts again from the first batch.
  void reset() { prefetcher_->seek(0); }

 private:
  void produce(std::int64_t item, EvalBatch& b, int worker, const detail::CancelToken& cancel) {
    const std::int64_t begin = item * batch_size_;
    const std::int64_t n = std::min(batch_size_, data_.size() - begin);
    const int c = transform_.channels(), s = transform_.size();
    b.images.resize(Shape{n, c, s, s});
    b.indices.resize(static_cast<std::size_t>(n));
    b.labels.resize(static_cast<std::size_t>(n));
    b.batch = item;
    AugmentScratch& scratch = scratch_[static_cast<std::size_t>(worker)];
    for (std::int64_t k = 0; k < n; ++k) {
      if (cancel.cancelled()) return;
      const Sample sample = data_.get(begin + k);
      b.indices[static_cast<std::size_t>(k)] = begin + k;
      b.labels[static_cast<std::size_t>(k)] = sample.label;
      transform_.apply(sample.image, b.images.data() + k * transform_.numel(), scratch);
    }
  }

  const Dataset& data_;
  EvalTransform transform_;
  std::int64_t batch_size_;
  std::int64_t batches_ = 0;
  std::vector<AugmentScratch> scratch_;
  std::unique_ptr<detail::Prefetcher<EvalBatch>> prefetcher_;  // last: its threads use the rest
};

}  // namespace moca::data
