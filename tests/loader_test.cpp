// The two-view and evaluation loaders: the same batches whatever the number of workers,
// resuming with seek(), per-epoch shuffles, drop_last, errors from worker threads, and a steady
// state that allocates no tensors.
#include <doctest/doctest.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <moca/core/memory.hpp>
#include <moca/core/rng.hpp>
#include <moca/data/loader.hpp>
#include <set>
#include <vector>

using namespace moca;
using namespace moca::data;

namespace {

// n random 28×28 grey images, labels i mod 10.
ArrayDataset synthetic(std::int64_t n) {
  std::vector<std::uint8_t> px(static_cast<std::size_t>(n) * 28 * 28);
  const Philox rng(99);
  for (std::size_t i = 0; i < px.size(); ++i) px[i] = static_cast<std::uint8_t>(rng.bits(0, i));
  std::vector<std::int32_t> labels(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i)
    labels[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(i % 10);
  return ArrayDataset(std::move(px), n, 28, 28, 1, std::move(labels), 10);
}

// A copy of what a batch holds.
struct Snapshot {
  std::vector<float> v1, v2;
  std::vector<std::int64_t> indices;
  std::vector<std::int32_t> labels;
  std::int64_t epoch, batch;
  bool operator==(const Snapshot& o) const {
    return v1.size() == o.v1.size() && v2.size() == o.v2.size() &&
           std::memcmp(v1.data(), o.v1.data(), v1.size() * sizeof(float)) == 0 &&
           std::memcmp(v2.data(), o.v2.data(), v2.size() * sizeof(float)) == 0 &&
           indices == o.indices && labels == o.labels && epoch == o.epoch && batch == o.batch;
  }
};

Snapshot snap(const TwoViewBatch& b) {
  return {std::vector<float>(b.view1.begin(), b.view1.end()),
          std::vector<float>(b.view2.begin(), b.view2.end()),
          b.indices,
          b.labels,
          b.epoch,
          b.batch};
}

std::vector<Snapshot> take(TwoViewLoader& loader, int n) {
  std::vector<Snapshot> out;
  for (int i = 0; i < n; ++i) out.push_back(snap(loader.next()));
  return out;
}

LoaderOptions options(int workers, std::int64_t batch = 8) {
  LoaderOptions o;
  o.batch_size = batch;
  o.workers = workers;
  o.prefetch = 3;
  o.seed = 2024;
  return o;
}

// Throws for one index, to check that worker errors reach the consumer.
class FailingDataset : public Dataset {
 public:
  FailingDataset(const ArrayDataset& inner, std::int64_t bad) : inner_(inner), bad_(bad) {}
  std::int64_t size() const override { return inner_.size(); }
  Sample get(std::int64_t i) const override {
    MOCA_CHECK(i != bad_, "sample ", i, " is broken");
    return inner_.get(i);
  }
  std::int32_t label(std::int64_t i) const override { return inner_.label(i); }
  int num_classes() const override { return inner_.num_classes(); }

 private:
  const ArrayDataset& inner_;
  std::int64_t bad_;
};

}  // namespace

TEST_CASE("TwoViewLoader: identical batches with 0, 1 and 3 workers") {
  const ArrayDataset data = synthetic(53);
  const AugmentConfig cfg = AugmentConfig::fashion_mnist_tiny();
  TwoViewLoader l0(data, cfg, options(0)), l1(data, cfg, options(1)), l3(data, cfg, options(3));
  CHECK(l0.batches_per_epoch() == 6);                               // 53 / 8, drop_last
  const auto a = take(l0, 15), b = take(l1, 15), c = take(l3, 15);  // two and a half epochs
  for (int i = 0; i < 15; ++i) {
    CAPTURE(i);
    CHECK(a[i] == b[i]);
    CHECK(a[i] == c[i]);
  }
  CHECK(a[0].v1.size() == 8u * 32 * 32);
  CHECK(a[6].epoch == 1);
  CHECK(a[6].batch == 0);
  // Views of one sample differ; labels follow the data set.
  CHECK(std::memcmp(a[0].v1.data(), a[0].v2.data(), 32 * 32 * sizeof(float)) != 0);
  for (std::size_t k = 0; k < 8; ++k) CHECK(a[2].labels[k] == a[2].indices[k] % 10);
  // Each view equals the augmentation applied directly.
  TwoViewAugment aug(cfg, 2024);
  AugmentScratch s;
  std::vector<float> v(32 * 32);
  aug.apply(data.get(a[7].indices[3]).image, 1, a[7].indices[3], 1, v.data(), s);
  CHECK(std::memcmp(v.data(), a[7].v2.data() + 3 * 32 * 32, v.size() * sizeof(float)) == 0);
}

TEST_CASE("TwoViewLoader: seek resumes the same sequence") {
  const ArrayDataset data = synthetic(40);
  const AugmentConfig cfg = AugmentConfig::fashion_mnist_tiny();
  TwoViewLoader ref(data, cfg, options(2));
  const auto full = take(ref, 14);  // 5 batches per epoch: up to epoch 2 batch 3

  TwoViewLoader resumed(data, cfg, options(3));
  resumed.seek(1, 2);
  CHECK(resumed.epoch() == 1);
  CHECK(resumed.batch() == 2);
  const auto rest = take(resumed, 7);
  for (int i = 0; i < 7; ++i) CHECK(rest[i] == full[7 + i]);
  CHECK(resumed.epoch() == 2);
  CHECK(resumed.batch() == 4);

  // Seeking back on a loader with work in flight.
  resumed.seek(0, 0);
  CHECK(snap(resumed.next()) == full[0]);
  resumed.seek(2, 1);
  CHECK(snap(resumed.next()) == full[11]);
  CHECK(snap(resumed.next()) == full[12]);
  CHECK_THROWS_AS(resumed.seek(0, 5), Error);

  // Synchronous loader, same sequence.
  TwoViewLoader sync(data, cfg, options(0));
  sync.seek(2, 3);
  CHECK(snap(sync.next()) == full[13]);
}

TEST_CASE("TwoViewLoader: a new shuffle every epoch, no repeats within one") {
  const ArrayDataset data = synthetic(50);
  TwoViewLoader loader(data, AugmentConfig::fashion_mnist_tiny(), options(2, 10));
  std::vector<std::vector<std::int64_t>> epochs(3);
  for (int e = 0; e < 3; ++e)
    for (int b = 0; b < 5; ++b) {
      const TwoViewBatch& batch = loader.next();
      epochs[e].insert(epochs[e].end(), batch.indices.begin(), batch.indices.end());
    }
  for (const auto& e : epochs) {
    CHECK(e.size() == 50u);
    CHECK(std::set<std::int64_t>(e.begin(), e.end()).size() == 50u);
  }
  CHECK(epochs[0] != epochs[1]);
  CHECK(epochs[1] != epochs[2]);
  CHECK(epochs[0] == loader.epoch_order(0));
  CHECK(epochs[2] == shuffled_order(50, 2024, 2));
  // Another seed, another order.
  CHECK(shuffled_order(50, 2025, 0) != epochs[0]);

  // Without shuffling: data set order.
  LoaderOptions o = options(1, 10);
  o.shuffle = false;
  TwoViewLoader plain(data, AugmentConfig::fashion_mnist_tiny(), o);
  const TwoViewBatch& first = plain.next();
  for (std::int64_t k = 0; k < 10; ++k) CHECK(first.indices[static_cast<std::size_t>(k)] == k);
}

TEST_CASE("TwoViewLoader: drop_last and the short last batch") {
  const ArrayDataset data = synthetic(23);
  LoaderOptions o = options(2, 5);
  {
    TwoViewLoader l(data, AugmentConfig::fashion_mnist_tiny(), o);
    CHECK(l.batches_per_epoch() == 4);
    std::set<std::int64_t> seen;
    for (int b = 0; b < 4; ++b) {
      const TwoViewBatch& batch = l.next();
      CHECK(batch.size() == 5);
      seen.insert(batch.indices.begin(), batch.indices.end());
    }
    CHECK(seen.size() == 20u);  // 3 samples dropped this epoch
    CHECK(l.next().epoch == 1);
  }
  o.drop_last = false;
  TwoViewLoader l(data, AugmentConfig::fashion_mnist_tiny(), o);
  CHECK(l.batches_per_epoch() == 5);
  for (int b = 0; b < 4; ++b) CHECK(l.next().size() == 5);
  const TwoViewBatch& last = l.next();
  CHECK(last.size() == 3);
  CHECK(last.view1.shape() == Shape{3, 1, 32, 32});
  CHECK(l.next().size() == 5);  // next epoch, full again

  o.drop_last = true;
  o.batch_size = 24;
  CHECK_THROWS_AS(TwoViewLoader(data, AugmentConfig::fashion_mnist_tiny(), o), Error);
}

TEST_CASE("TwoViewLoader: an error while preparing a batch reaches next()") {
  const ArrayDataset data = synthetic(30);
  const FailingDataset failing(data, 17);
  LoaderOptions o = options(2, 6);
  o.shuffle = false;
  TwoViewLoader l(failing, AugmentConfig::fashion_mnist_tiny(), o);
  CHECK(l.next().batch == 0);
  CHECK(l.next().batch == 1);
  CHECK_THROWS_WITH_AS(l.next(), doctest::Contains("sample 17 is broken"), Error);  // batch 2
  CHECK(l.next().batch == 3);  // the loader goes on
}

TEST_CASE("TwoViewLoader: no tensor allocation once the ring of batches is filled") {
  const ArrayDataset data = synthetic(64);
  TwoViewLoader l(data, AugmentConfig::fashion_mnist_tiny(), options(2, 8));
  for (int i = 0; i < 12; ++i) l.next();
  const std::int64_t before = memory_stats<Cpu>().allocations;
  for (int i = 0; i < 20; ++i) l.next();
  CHECK(memory_stats<Cpu>().allocations == before);
}

TEST_CASE("TwoViewLoader: destroyed with work in flight, without waiting for it") {
  const ArrayDataset data = synthetic(200);
  for (int i = 0; i < 5; ++i) {
    TwoViewLoader l(data, AugmentConfig::fashion_mnist_tiny(), options(3, 16));
    if (i % 2) l.next();
  }
  CHECK(true);
}

TEST_CASE("EvalLoader: every image once, in order, preprocessed without augmentation") {
  const ArrayDataset data = synthetic(23);
  const AugmentConfig cfg = AugmentConfig::fashion_mnist_tiny();
  const EvalTransform t(cfg);
  for (int workers : {0, 2}) {
    CAPTURE(workers);
    EvalLoader l(data, cfg, 10, workers);
    CHECK(l.num_batches() == 3);
    for (int round = 0; round < 2; ++round) {
      std::int64_t next_index = 0;
      AugmentScratch s;
      std::vector<float> want(32 * 32);
      while (const EvalBatch* b = l.next()) {
        CHECK(b->images.shape() == Shape{b->size(), 1, 32, 32});
        for (std::int64_t k = 0; k < b->size(); ++k) {
          CHECK(b->indices[static_cast<std::size_t>(k)] == next_index);
          CHECK(b->labels[static_cast<std::size_t>(k)] == next_index % 10);
          t.apply(data.get(next_index).image, want.data(), s);
          CHECK(std::memcmp(want.data(), b->images.data() + k * 32 * 32,
                            want.size() * sizeof(float)) == 0);
          ++next_index;
        }
      }
      CHECK(next_index == 23);
      CHECK(l.next() == nullptr);
      l.reset();
    }
  }
}
