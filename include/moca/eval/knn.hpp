// Weighted k-nearest-neighbour classification of features (spec §9.1, the DINO protocol).
//
//   auto res = moca::eval::knn_evaluate(train_feats, train_labels, test_feats, test_labels,
//                                       /*ks=*/{10, 20}, /*temperature=*/0.07);
//   // res[i].top1, res[i].top5: fractions in [0, 1] for k = ks[i]
//
// Features are compared by cosine similarity: each row is L2-normalised (divided by
// max(‖x‖, 1e-12)). Each query's k most similar rows of the memory bank vote for their class with
// weight exp(sim / T); the class with the largest sum is the top-1 prediction and the query
// counts as top-5 correct when its class is among the min(5, k) best-scored classes.
//
// Memory stays bounded whatever the bank size: similarities are computed block by block
// (query_block × bank_block values at a time, with ops::gemm) and each query keeps only its
// running best candidates. Ties are broken deterministically: neighbours of equal similarity by
// lower bank index, classes of equal score by lower class index, so results do not depend on the
// block sizes or the thread count. The neighbour search runs once for the largest k; voting for
// several k or temperatures reuses it (knn_vote), as in a temperature sweep.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <span>
#include <utility>
#include <vector>

#include "moca/backend/cpu/parallel.hpp"
#include "moca/core/check.hpp"
#include "moca/core/tensor.hpp"
#include "moca/ops/gemm.hpp"
#include "moca/ops/normalization.hpp"

namespace moca::eval {

/// Block sizes and the normalisation epsilon of the neighbour search.
struct KnnOptions {
  std::int64_t query_block = 256;   ///< queries per block
  std::int64_t bank_block = 16384;  ///< bank rows per block (query_block · bank_block values)
  double eps = 1e-12;               ///< of the L2 normalisation
};

/// The k most similar bank rows of every query, most similar first.
template <class T>
struct Neighbours {
  std::int64_t queries = 0;
  std::int64_t k = 0;
  std::vector<T> similarity;        ///< [queries, k] cosine similarities
  std::vector<std::int64_t> index;  ///< [queries, k] bank rows
};

/// Accuracy of one (k, T) setting.
struct KnnAccuracy {
  std::int64_t k = 0;
  double temperature = 0.0;
  double top1 = 0.0;  ///< fraction of queries whose top-1 prediction is right
  double top5 = 0.0;  ///< fraction whose class is among the min(5, k) best-scored classes
  std::int64_t correct1 = 0, correct5 = 0, count = 0;
};

namespace detail {

template <class T>
struct Candidate {
  T sim;
  std::int64_t index;
};

// The order of neighbours: higher similarity first, then lower index. A strict total order.
template <class T>
bool before(const Candidate<T>& a, const Candidate<T>& b) {
  return a.sim > b.sim || (a.sim == b.sim && a.index < b.index);
}

// Keeps the best k of `c` (by before()) in c[0, k), unordered.
template <class T>
void keep_best(std::vector<Candidate<T>>& c, std::int64_t k) {
  if (static_cast<std::int64_t>(c.size()) <= k) return;
  std::nth_element(c.begin(), c.begin() + (k - 1), c.end(), before<T>);
  c.resize(static_cast<std::size_t>(k));
}

}  // namespace detail

/// Finds, for every query row, the k bank rows of highest cosine similarity. bank [N, D] and
/// queries [M, D] are left unchanged (they need not be normalised). k ≤ N.
template <class T>
Neighbours<T> knn_search(const TensorView<T, Cpu>& bank, const TensorView<T, Cpu>& queries,
                         std::int64_t k, const KnnOptions& options = {}) {
  MOCA_CHECK(bank.rank() == 2 && queries.rank() == 2 && bank.size(1) == queries.size(1),
             "knn_search: expected bank [N, D] and queries [M, D], got ", bank.shape(), " and ",
             queries.shape());
  const std::int64_t N = bank.size(0), M = queries.size(0), D = bank.size(1);
  MOCA_CHECK(k >= 1 && k <= N, "knn_search: k = ", k, " with a bank of ", N, " rows");
  MOCA_CHECK(options.query_block > 0 && options.bank_block > 0,
             "knn_search: block sizes must be positive");

  // 1 / max(‖b‖, eps) per bank row: similarities are scaled after the product, so the bank is
  // never copied.
  std::vector<T> inv_norm(static_cast<std::size_t>(N));
  cpu::parallel_for(N, N * D, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      const T* row = bank.data() + r * D;
      double ss = 0.0;
      for (std::int64_t j = 0; j < D; ++j) ss += static_cast<double>(row[j]) * row[j];
      inv_norm[static_cast<std::size_t>(r)] =
          static_cast<T>(1.0 / std::max(std::sqrt(ss), options.eps));
    }
  });

  Neighbours<T> out;
  out.queries = M;
  out.k = k;
  out.similarity.resize(static_cast<std::size_t>(M * k));
  out.index.resize(static_cast<std::size_t>(M * k));

  const std::int64_t qb_max = std::min(options.query_block, std::max<std::int64_t>(M, 1));
  const std::int64_t bb_max = std::min(options.bank_block, N);
  Tensor<T> q({qb_max, D}), sims({qb_max, bb_max});
  Tensor<compute_t<T>> qnorm({qb_max});
  std::vector<std::vector<detail::Candidate<T>>> cand(static_cast<std::size_t>(qb_max));
  for (auto& c : cand) c.reserve(static_cast<std::size_t>(2 * k + bb_max));
  std::vector<T> worst(static_cast<std::size_t>(qb_max));
  std::vector<std::int64_t> worst_index(static_cast<std::size_t>(qb_max));

  for (std::int64_t q0 = 0; q0 < M; q0 += qb_max) {
    const std::int64_t qb = std::min(qb_max, M - q0);
    q.resize(Shape{qb, D});
    qnorm.resize(Shape{qb});
    copy(queries.rows(q0, q0 + qb), static_cast<const TensorView<T, Cpu>&>(q));
    ops::l2_normalize(static_cast<const TensorView<T, Cpu>&>(q), options.eps,
                      static_cast<const TensorView<T, Cpu>&>(q),
                      static_cast<const TensorView<compute_t<T>, Cpu>&>(qnorm));
    for (std::int64_t r = 0; r < qb; ++r) cand[static_cast<std::size_t>(r)].clear();

    for (std::int64_t b0 = 0; b0 < N; b0 += bb_max) {
      const std::int64_t bb = std::min(bb_max, N - b0);
      sims.resize(Shape{qb, bb});
      ops::gemm(static_cast<const TensorView<T, Cpu>&>(q), Trans::N, bank.rows(b0, b0 + bb),
                Trans::T, static_cast<const TensorView<T, Cpu>&>(sims));
      cpu::parallel_for(qb, qb * bb, [&](std::int64_t r0, std::int64_t r1) {
        for (std::int64_t r = r0; r < r1; ++r) {
          auto& c = cand[static_cast<std::size_t>(r)];
          const T* srow = sims.data() + r * bb;
          for (std::int64_t j = 0; j < bb; ++j) {
            T s = srow[j] * inv_norm[static_cast<std::size_t>(b0 + j)];
            if (std::isnan(s)) s = -std::numeric_limits<T>::infinity();
            const detail::Candidate<T> cj{s, b0 + j};
            // Once k candidates are known, only better ones can enter.
            if (static_cast<std::int64_t>(c.size()) >= k &&
                !detail::before(cj, detail::Candidate<T>{worst[static_cast<std::size_t>(r)],
                                                         worst_index[static_cast<std::size_t>(r)]}))
              continue;
            c.push_back(cj);
            if (static_cast<std::int64_t>(c.size()) >= 2 * k + 64 ||
                static_cast<std::int64_t>(c.size()) == k) {
              detail::keep_best(c, k);
              const auto w = std::min_element(c.begin(), c.end(), [](const auto& a, const auto& b) {
                return detail::before(b, a);
              });
              worst[static_cast<std::size_t>(r)] = w->sim;
              worst_index[static_cast<std::size_t>(r)] = w->index;
            }
          }
        }
      });
    }

    for (std::int64_t r = 0; r < qb; ++r) {
      auto& c = cand[static_cast<std::size_t>(r)];
      detail::keep_best(c, k);
      std::sort(c.begin(), c.end(), detail::before<T>);
      const std::size_t o = static_cast<std::size_t>((q0 + r) * k);
      for (std::int64_t j = 0; j < k; ++j) {
        out.similarity[o + static_cast<std::size_t>(j)] = c[static_cast<std::size_t>(j)].sim;
        out.index[o + static_cast<std::size_t>(j)] = c[static_cast<std::size_t>(j)].index;
      }
    }
  }
  return out;
}

/// The class scores of one query from its first k neighbours: Σ exp(sim / T) per class.
template <class T>
void knn_class_scores(const Neighbours<T>& nb, std::int64_t query,
                      std::span<const std::int32_t> bank_labels, std::int64_t k, double temperature,
                      std::span<double> scores) {
  std::fill(scores.begin(), scores.end(), 0.0);
  const std::size_t o = static_cast<std::size_t>(query * nb.k);
  for (std::int64_t j = 0; j < k; ++j) {
    const std::int64_t b = nb.index[o + static_cast<std::size_t>(j)];
    const std::int32_t label = bank_labels[static_cast<std::size_t>(b)];
    scores[static_cast<std::size_t>(label)] +=
        std::exp(static_cast<double>(nb.similarity[o + static_cast<std::size_t>(j)]) / temperature);
  }
}

namespace detail {

inline int count_classes(std::span<const std::int32_t> a, std::span<const std::int32_t> b) {
  std::int32_t hi = -1;
  for (std::int32_t v : a) hi = std::max(hi, v);
  for (std::int32_t v : b) hi = std::max(hi, v);
  return hi + 1;
}

inline void check_labels(std::span<const std::int32_t> labels, int classes, const char* what) {
  for (std::size_t i = 0; i < labels.size(); ++i)
    MOCA_CHECK(labels[i] >= 0 && labels[i] < classes, "knn: ", what, " label ", labels[i],
               " of row ", i, " is outside [0, ", classes, ")");
}

}  // namespace detail

/// Top-1 predictions of every query from its first k neighbours (ties: lower class).
template <class T>
std::vector<std::int32_t> knn_predict(const Neighbours<T>& nb,
                                      std::span<const std::int32_t> bank_labels, std::int64_t k,
                                      double temperature, int num_classes) {
  MOCA_CHECK(k >= 1 && k <= nb.k && temperature > 0 && num_classes > 0, "knn_predict: k = ", k,
             " (neighbours hold ", nb.k, ") T = ", temperature, " classes ", num_classes);
  detail::check_labels(bank_labels, num_classes, "bank");
  std::vector<std::int32_t> pred(static_cast<std::size_t>(nb.queries));
  std::vector<double> scores(static_cast<std::size_t>(num_classes));
  for (std::int64_t q = 0; q < nb.queries; ++q) {
    knn_class_scores(nb, q, bank_labels, k, temperature, std::span<double>(scores));
    pred[static_cast<std::size_t>(q)] =
        static_cast<std::int32_t>(std::max_element(scores.begin(), scores.end()) - scores.begin());
  }
  return pred;
}

/// Top-1 and top-5 accuracy of the weighted vote of the first k neighbours at temperature T.
template <class T>
KnnAccuracy knn_vote(const Neighbours<T>& nb, std::span<const std::int32_t> bank_labels,
                     std::span<const std::int32_t> query_labels, std::int64_t k, double temperature,
                     int num_classes) {
  MOCA_CHECK(k >= 1 && k <= nb.k && temperature > 0 && num_classes > 0, "knn_vote: k = ", k,
             " (neighbours hold ", nb.k, ") T = ", temperature, " classes ", num_classes);
  MOCA_CHECK(static_cast<std::int64_t>(query_labels.size()) == nb.queries,
             "knn_vote: ", query_labels.size(), " query labels for ", nb.queries, " queries");
  detail::check_labels(bank_labels, num_classes, "bank");
  detail::check_labels(query_labels, num_classes, "query");
  const std::int64_t top = std::min<std::int64_t>({5, k, num_classes});
  KnnAccuracy acc;
  acc.k = k;
  acc.temperature = temperature;
  acc.count = nb.queries;
  std::vector<double> scores(static_cast<std::size_t>(num_classes));
  for (std::int64_t q = 0; q < nb.queries; ++q) {
    knn_class_scores(nb, q, bank_labels, k, temperature, std::span<double>(scores));
    const std::int32_t truth = query_labels[static_cast<std::size_t>(q)];
    const double mine = scores[static_cast<std::size_t>(truth)];
    // Rank of the true class: classes scored higher, or equal with a lower index, come first.
    std::int64_t rank = 0;
    for (int c = 0; c < num_classes; ++c) {
      const double s = scores[static_cast<std::size_t>(c)];
      if (s > mine || (s == mine && c < truth)) ++rank;
    }
    acc.correct1 += rank == 0;
    acc.correct5 += rank < top;
  }
  if (acc.count > 0) {
    acc.top1 = static_cast<double>(acc.correct1) / static_cast<double>(acc.count);
    acc.top5 = static_cast<double>(acc.correct5) / static_cast<double>(acc.count);
  }
  return acc;
}

/// The whole protocol: one neighbour search for the largest k, then a vote for each k in `ks`
/// at temperature T. num_classes 0 takes the largest label + 1.
template <class T>
std::vector<KnnAccuracy> knn_evaluate(const TensorView<T, Cpu>& bank,
                                      std::span<const std::int32_t> bank_labels,
                                      const TensorView<T, Cpu>& queries,
                                      std::span<const std::int32_t> query_labels,
                                      std::span<const std::int64_t> ks, double temperature,
                                      int num_classes = 0, const KnnOptions& options = {}) {
  MOCA_CHECK(!ks.empty(), "knn_evaluate: no k given");
  MOCA_CHECK(bank.rank() == 2 && static_cast<std::int64_t>(bank_labels.size()) == bank.size(0),
             "knn_evaluate: ", bank_labels.size(), " labels for a bank of shape ", bank.shape());
  if (num_classes == 0) num_classes = detail::count_classes(bank_labels, query_labels);
  const std::int64_t kmax = std::min(*std::max_element(ks.begin(), ks.end()), bank.size(0));
  const Neighbours<T> nb = knn_search(bank, queries, kmax, options);
  std::vector<KnnAccuracy> out;
  for (std::int64_t k : ks)
    out.push_back(
        knn_vote(nb, bank_labels, query_labels, std::min(k, kmax), temperature, num_classes));
  return out;
}

/// knn_evaluate with the ks as a list: knn_evaluate(bank, bl, queries, ql, {10, 20}, 0.07).
template <class T>
std::vector<KnnAccuracy> knn_evaluate(const TensorView<T, Cpu>& bank,
                                      std::span<const std::int32_t> bank_labels,
                                      const TensorView<T, Cpu>& queries,
                                      std::span<const std::int32_t> query_labels,
                                      std::initializer_list<std::int64_t> ks, double temperature,
                                      int num_classes = 0, const KnnOptions& options = {}) {
  const std::vector<std::int64_t> v(ks);
  return knn_evaluate(bank, bank_labels, queries, query_labels, std::span<const std::int64_t>(v),
                      temperature, num_classes, options);
}

}  // namespace moca::eval
