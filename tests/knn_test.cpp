// Weighted k-NN classification (spec §9.1): against a brute-force reference, on a synthetic
// problem with a known answer, independence from the block sizes, tie handling, and errors.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <moca/core/random.hpp>
#include <moca/eval/knn.hpp>
#include <numeric>
#include <vector>

using namespace moca;
using namespace moca::eval;

namespace {

// The protocol written out plainly in double: normalise, all similarities, sort, vote.
struct Reference {
  std::vector<std::vector<std::int64_t>> neighbours;  // per query, best first
  std::vector<std::vector<double>> sims;
};

template <class T>
Reference brute_force(const Tensor<T>& bank, const Tensor<T>& queries, std::int64_t k) {
  const std::int64_t N = bank.size(0), M = queries.size(0), D = bank.size(1);
  auto norm = [&](const Tensor<T>& x, std::int64_t r) {
    double s = 0;
    for (std::int64_t j = 0; j < D; ++j) s += double(x(r, j)) * double(x(r, j));
    return std::max(std::sqrt(s), 1e-12);
  };
  Reference ref;
  for (std::int64_t q = 0; q < M; ++q) {
    std::vector<std::pair<double, std::int64_t>> all;
    const double nq = norm(queries, q);
    for (std::int64_t b = 0; b < N; ++b) {
      double dot = 0;
      for (std::int64_t j = 0; j < D; ++j) dot += double(queries(q, j)) * double(bank(b, j));
      all.push_back({dot / (nq * norm(bank, b)), b});
    }
    std::sort(all.begin(), all.end(), [](const auto& a, const auto& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    });
    ref.neighbours.emplace_back();
    ref.sims.emplace_back();
    for (std::int64_t j = 0; j < k; ++j) {
      ref.neighbours.back().push_back(all[static_cast<std::size_t>(j)].second);
      ref.sims.back().push_back(all[static_cast<std::size_t>(j)].first);
    }
  }
  return ref;
}

// Top-1 / top-5 counts of the reference vote.
std::pair<std::int64_t, std::int64_t> reference_vote(const Reference& ref,
                                                     const std::vector<std::int32_t>& bank_labels,
                                                     const std::vector<std::int32_t>& query_labels,
                                                     std::int64_t k, double T, int classes) {
  std::int64_t c1 = 0, c5 = 0;
  for (std::size_t q = 0; q < ref.neighbours.size(); ++q) {
    std::vector<double> score(static_cast<std::size_t>(classes), 0.0);
    for (std::int64_t j = 0; j < k; ++j)
      score[static_cast<std::size_t>(
          bank_labels[static_cast<std::size_t>(ref.neighbours[q][static_cast<std::size_t>(j)])])] +=
          std::exp(ref.sims[q][static_cast<std::size_t>(j)] / T);
    std::vector<int> order(static_cast<std::size_t>(classes));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return score[a] > score[b]; });
    const std::int64_t top = std::min<std::int64_t>({5, k, classes});
    c1 += order[0] == query_labels[q];
    for (std::int64_t j = 0; j < top; ++j)
      c5 += order[static_cast<std::size_t>(j)] == query_labels[q];
  }
  return {c1, c5};
}

template <class T>
Tensor<T> random_features(std::int64_t n, std::int64_t d, std::uint64_t stream) {
  Tensor<T> x({n, d});
  fill_normal(static_cast<const TensorView<T>&>(x), Philox(5), stream, 0.0, 1.0);
  return x;
}

std::vector<std::int32_t> random_labels(std::int64_t n, int classes, std::uint64_t stream) {
  std::vector<std::int32_t> l(static_cast<std::size_t>(n));
  const Philox rng(6);
  for (std::int64_t i = 0; i < n; ++i)
    l[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(
        rng.below(static_cast<std::uint64_t>(classes), stream, static_cast<std::uint64_t>(i)));
  return l;
}

}  // namespace

TEST_CASE("knn_search equals brute force, whatever the block sizes") {
  const auto bank = random_features<double>(157, 12, 1);
  const auto queries = random_features<double>(41, 12, 2);
  const Reference ref = brute_force(bank, queries, 20);
  for (auto [qb, bb] :
       {std::pair<std::int64_t, std::int64_t>{256, 16384}, {7, 13}, {1, 1}, {41, 157}, {5, 30}}) {
    CAPTURE(qb);
    CAPTURE(bb);
    KnnOptions opt;
    opt.query_block = qb;
    opt.bank_block = bb;
    const Neighbours<double> nb = knn_search<double>(bank, queries, 20, opt);
    REQUIRE(nb.queries == 41);
    REQUIRE(nb.k == 20);
    for (std::int64_t q = 0; q < 41; ++q)
      for (std::int64_t j = 0; j < 20; ++j) {
        CHECK(nb.index[static_cast<std::size_t>(q * 20 + j)] ==
              ref.neighbours[static_cast<std::size_t>(q)][static_cast<std::size_t>(j)]);
        CHECK(nb.similarity[static_cast<std::size_t>(q * 20 + j)] ==
              doctest::Approx(ref.sims[static_cast<std::size_t>(q)][static_cast<std::size_t>(j)])
                  .epsilon(1e-12));
      }
  }
}

TEST_CASE("knn_evaluate matches the reference vote (float features, several k and T)") {
  const auto bank = random_features<float>(300, 16, 3);
  const auto queries = random_features<float>(80, 16, 4);
  const auto bl = random_labels(300, 7, 1), ql = random_labels(80, 7, 2);
  // Reference on the same float values, computed in double.
  const Reference ref = brute_force(bank, queries, 25);
  KnnOptions opt;
  opt.query_block = 16;
  opt.bank_block = 64;
  const Neighbours<float> nb = knn_search<float>(bank, queries, 25, opt);
  // Float similarities may reorder near-ties; with random data the top-25 sets agree.
  for (std::int64_t q = 0; q < 80; ++q)
    for (std::int64_t j = 0; j < 25; ++j)
      CHECK(nb.similarity[static_cast<std::size_t>(q * 25 + j)] ==
            doctest::Approx(ref.sims[static_cast<std::size_t>(q)][static_cast<std::size_t>(j)])
                .epsilon(1e-5));
  for (std::int64_t k : {1, 3, 10, 25})
    for (double T : {0.04, 0.07, 0.5}) {
      CAPTURE(k);
      CAPTURE(T);
      const KnnAccuracy acc = knn_vote(nb, bl, ql, k, T, 7);
      const auto [c1, c5] = reference_vote(ref, bl, ql, k, T, 7);
      CHECK(acc.correct1 == c1);
      CHECK(acc.correct5 == c5);
      CHECK(acc.count == 80);
      CHECK(acc.top1 == doctest::Approx(static_cast<double>(c1) / 80));
      CHECK(acc.top5 >= acc.top1);
    }
  const std::vector<std::int64_t> ks = {10, 25};
  const auto res = knn_evaluate<float>(bank, bl, queries, ql, ks, 0.07, 0, opt);
  REQUIRE(res.size() == 2);
  CHECK(res[0].k == 10);
  CHECK(res[1].k == 25);
  CHECK(res[0].correct1 == knn_vote(nb, bl, ql, 10, 0.07, 7).correct1);
  CHECK(res[1].correct5 == knn_vote(nb, bl, ql, 25, 0.07, 7).correct5);
}

TEST_CASE("a synthetic problem with a known answer: well-separated clusters") {
  // Five classes around five orthogonal directions; every query is classified right.
  const int classes = 5, per_class = 40, dim = 8;
  Tensor<float> bank({classes * per_class, dim}), queries({classes * 10, dim});
  std::vector<std::int32_t> bl, ql;
  const Philox rng(11);
  std::uint64_t c = 0;
  auto point = [&](Tensor<float>& t, std::int64_t row, int cls) {
    for (int j = 0; j < dim; ++j)
      t(row, j) = (j == cls ? 3.0f : 0.0f) + 0.3f * static_cast<float>(rng.normal(0, c++));
  };
  for (int k = 0; k < classes; ++k)
    for (int i = 0; i < per_class; ++i) {
      point(bank, k * per_class + i, k);
      bl.push_back(k);
    }
  for (int k = 0; k < classes; ++k)
    for (int i = 0; i < 10; ++i) {
      point(queries, k * 10 + i, k);
      ql.push_back(k);
    }
  const auto res = knn_evaluate<float>(bank, bl, queries, ql, {1, 10, 20, 200}, 0.07);
  for (const auto& r : res) {
    CAPTURE(r.k);
    CHECK(r.top1 == 1.0);
    CHECK(r.top5 == 1.0);
  }
  // Scaling rows does not change cosine neighbours (powers of two: exact in float).
  Tensor<float> scaled = queries.clone();
  for (std::int64_t r = 0; r < scaled.size(0); ++r)
    for (std::int64_t j = 0; j < dim; ++j) scaled(r, j) *= static_cast<float>(1 << (r % 4));
  CHECK(knn_search<float>(bank, scaled, 5).index == knn_search<float>(bank, queries, 5).index);
  // Shuffled labels: top-1 collapses towards chance.
  std::vector<std::int32_t> wrong(ql.size());
  for (std::size_t i = 0; i < ql.size(); ++i) wrong[i] = (ql[i] + 1) % classes;
  CHECK(knn_evaluate<float>(bank, bl, queries, wrong, {20}, 0.07)[0].top1 == 0.0);
}

TEST_CASE("ties: equal similarities by lower bank index, equal scores by lower class") {
  // Bank rows 0..3 identical; the query matches them equally.
  Tensor<double> bank({6, 2}), query({1, 2});
  for (int i = 0; i < 4; ++i) {
    bank(i, 0) = 1.0;
    bank(i, 1) = 0.0;
  }
  bank(4, 0) = 0.0;
  bank(4, 1) = 1.0;
  bank(5, 0) = -1.0;
  bank(5, 1) = 0.0;
  query(0, 0) = 2.0;
  const Neighbours<double> nb = knn_search<double>(bank, query, 5, {});
  CHECK(nb.index == std::vector<std::int64_t>{0, 1, 2, 3, 4});
  CHECK(nb.similarity[0] == doctest::Approx(1.0));
  CHECK(nb.similarity[4] == doctest::Approx(0.0));
  // Two classes with the same score: the lower class wins top-1.
  const std::vector<std::int32_t> labels = {3, 1, 3, 1, 0, 2};
  CHECK(knn_predict(nb, labels, 4, 0.1, 4) == std::vector<std::int32_t>{1});
  CHECK(knn_vote(nb, labels, std::vector<std::int32_t>{3}, 4, 0.1, 4).correct1 == 0);
  CHECK(knn_vote(nb, labels, std::vector<std::int32_t>{3}, 4, 0.1, 4).correct5 == 1);
  // Top-5 looks at min(5, k) classes: with k = 1 only the winner counts.
  CHECK(knn_vote(nb, labels, std::vector<std::int32_t>{1}, 1, 0.1, 4).correct5 == 0);
  CHECK(knn_vote(nb, labels, std::vector<std::int32_t>{3}, 1, 0.1, 4).correct5 == 1);
}

TEST_CASE("zero feature rows stay finite; bad arguments are errors") {
  Tensor<float> bank({4, 3}), query({2, 3});
  bank(1, 0) = 1.0f;
  bank(2, 1) = 1.0f;
  query(1, 2) = 1.0f;  // query 0 and bank rows 0, 3 are zero vectors
  const Neighbours<float> nb = knn_search<float>(bank, query, 4, {});
  for (float s : nb.similarity) CHECK(std::isfinite(s));
  const std::vector<std::int32_t> bl = {0, 1, 2, 1}, ql = {0, 2};
  CHECK_THROWS_AS(knn_search<float>(bank, query, 5, {}), Error);  // k > N
  Tensor<float> wrong_dim({2, 4});
  CHECK_THROWS_AS(knn_search<float>(bank, wrong_dim, 2, {}), Error);
  CHECK_THROWS_AS(knn_vote(nb, bl, std::vector<std::int32_t>{0, 7}, 2, 0.07, 3), Error);
  CHECK_THROWS_AS(knn_vote(nb, bl, ql, 5, 0.07, 3), Error);  // k above the neighbours held
  CHECK_THROWS_AS(knn_vote(nb, bl, std::vector<std::int32_t>{0}, 2, 0.07, 3), Error);
  CHECK_THROWS_AS(knn_evaluate<float>(bank, std::vector<std::int32_t>{0, 1}, query, ql, {2}, 0.07),
                  Error);
  // k larger than the bank is capped by knn_evaluate.
  CHECK(knn_evaluate<float>(bank, bl, query, ql, {200}, 0.07)[0].k == 4);
}
