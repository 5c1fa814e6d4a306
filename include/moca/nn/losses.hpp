// Cross-entropy against soft targets, batch-mean over rows (the core of MOCA's L_IMG / L_LOC,
// and of ordinary classification with one-hot targets).
//
//   SoftTargetCrossEntropy<float> ce;
//   double loss = ce.forward(logits, targets);   // −(1/rows) Σ_r Σ_k t[r,k] · log softmax(z[r])_k
//   ce.backward(logits, targets, dlogits);       // dlogits = (softmax(z) − t) / rows
//
// Each target row must sum to 1 (one-hot labels, softmax codes, L1-normalised histograms): the
// gradient formula relies on it. KL(t ‖ softmax z) differs from this loss by the entropy of t,
// a constant for the logits, so it shares the gradient.
#pragma once

#include "moca/core/profiler.hpp"
#include "moca/ops.hpp"

namespace moca {

template <class T, class D = Cpu>
class SoftTargetCrossEntropy {
 public:
  /// Loss of logits z [..., K] against targets of the same shape; one buffer of z's size is
  /// reused across calls.
  double forward(const TensorView<T, D>& logits, const TensorView<T, D>& targets) {
    MOCA_PROFILE_SCOPE("loss");
    MOCA_CHECK(logits.shape() == targets.shape(), "cross-entropy: logits ", logits.shape(),
               " and targets ", targets.shape(), " differ");
    const std::int64_t rows = logits.shape().leading();
    MOCA_CHECK(rows > 0, "cross-entropy: no rows in ", logits.shape());
    work_.resize(logits.shape());
    total_.resize({1});
    ops::log_softmax(logits, TensorView<T, D>(work_));
    ops::mul(TensorView<T, D>(work_), targets, TensorView<T, D>(work_));
    ops::sum(TensorView<T, D>(work_).flat(), 0, TensorView<T, D>(total_));
    T host = 0;
    copy(TensorView<T, D>(total_), TensorView<T, Cpu>(&host, Shape{1}));
    return -static_cast<double>(host) / static_cast<double>(rows);
  }

  /// dlogits = scale · (softmax(z) − t) / rows (or adds it, with `accumulate`).
  void backward(const TensorView<T, D>& logits, const TensorView<T, D>& targets,
                const TensorView<T, D>& dlogits, double scale = 1.0, bool accumulate = false) {
    MOCA_PROFILE_SCOPE("loss");
    MOCA_CHECK(logits.shape() == targets.shape() && logits.shape() == dlogits.shape(),
               "cross-entropy backward: logits ", logits.shape(), ", targets ", targets.shape(),
               " and gradient ", dlogits.shape(), " differ");
    const T s = static_cast<T>(scale / static_cast<double>(logits.shape().leading()));
    TensorView<T, D> out = dlogits;
    if (accumulate) {
      work_.resize(logits.shape());
      out = work_;
    }
    ops::softmax(logits, out);
    ops::axpby(T(-s), targets, s, out);
    if (accumulate) ops::axpy(T(1), out, dlogits);
  }

 private:
  Tensor<T, D> work_, total_;
};

}  // namespace moca

namespace moca {

/// KL(t ‖ softmax z) with batch-mean normalisation over rows (torch's kl_div(log_softmax(z), t,
/// reduction="batchmean")): the soft-target cross-entropy minus the entropy of t, with
/// 0 · log 0 = 0. Same gradient as the cross-entropy; backward may write dlogits over logits.
template <class T, class D = Cpu>
class KlDivergence {
 public:
  double forward(const TensorView<T, D>& logits, const TensorView<T, D>& targets) {
    MOCA_PROFILE_SCOPE("loss");
    const double ce = ce_.forward(logits, targets);
    const auto rows = static_cast<double>(logits.shape().leading());
    return ce + ops::xlogy_sum(targets, targets) / rows;
  }
  void backward(const TensorView<T, D>& logits, const TensorView<T, D>& targets,
                const TensorView<T, D>& dlogits, double scale = 1.0) {
    MOCA_PROFILE_SCOPE("loss");
    ce_.backward(logits, targets, dlogits, scale);
  }

 private:
  SoftTargetCrossEntropy<T, D> ce_;
};

}  // namespace moca
