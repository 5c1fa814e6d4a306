// Losses against soft targets, batch-mean over rows: the core of MOCA's L_IMG / L_LOC, and of
// ordinary classification with one-hot targets.
//
//   SoftTargetCrossEntropy<float> ce;
//   double loss = ce.forward(logits, targets);   // −(1/rows) Σ_r Σ_k t[r,k] · log softmax(z[r])_k
//   ce.backward(logits, targets, dlogits);       // dlogits = (softmax(z) − t) / rows
//   loss = ce.forward_backward(logits, targets, dlogits);   // both in one pass over the rows
//
// KlDivergence<T> is the same with the entropy of the targets added (torch's kl_div(log_softmax(z),
// t, reduction="batchmean"), 0 · log 0 = 0); it shares the gradient. Its forward_backward can read
// the target of row r from row rows[r] of a larger table (MOCA's L_LOC gathers token codes).
//
// Each target row must sum to 1 (one-hot labels, softmax codes, L1-normalised histograms): the
// gradient formula relies on it.
#pragma once

#include "moca/core/profiler.hpp"
#include "moca/ops.hpp"

namespace moca {

template <class T, class D, bool WithEntropy>
class SoftTargetLoss {
 public:
  /// Loss of logits z [..., K] against targets of the same shape.
  double forward(const TensorView<T, D>& logits, const TensorView<T, D>& targets) {
    MOCA_PROFILE_SCOPE("loss");
    check(logits, targets, "");
    return ops::soft_target_loss(logits, targets, nullptr, WithEntropy, 0, {}, workspace_) /
           rows(logits);
  }

  /// dlogits = scale · (softmax(z) − t) / rows (or adds it, with `accumulate`); dlogits may be
  /// logits itself.
  void backward(const TensorView<T, D>& logits, const TensorView<T, D>& targets,
                const TensorView<T, D>& dlogits, double scale = 1.0, bool accumulate = false) {
    MOCA_PROFILE_SCOPE("loss");
    check(logits, targets, " backward");
    MOCA_CHECK(logits.shape() == dlogits.shape(), name(), " backward: logits ", logits.shape(),
               " and gradient ", dlogits.shape(), " differ");
    const T s = static_cast<T>(scale / rows(logits));
    // The loss value is discarded here: skip the entropy (it does not enter the gradient).
    if (!accumulate) {
      ops::soft_target_loss(logits, targets, nullptr, false, s, dlogits, workspace_);
      return;
    }
    grad_.resize(logits.shape());
    ops::soft_target_loss(logits, targets, nullptr, false, s, TensorView<T, D>(grad_),
                          workspace_);
    ops::axpy(T(1), TensorView<T, D>(grad_), dlogits);
  }

  /// forward and backward (overwriting dlogits, which may be logits) in one pass; returns the
  /// loss.
  double forward_backward(const TensorView<T, D>& logits, const TensorView<T, D>& targets,
                          const TensorView<T, D>& dlogits, double scale = 1.0) {
    MOCA_PROFILE_SCOPE("loss");
    check(logits, targets, "");
    const double n = rows(logits);
    return ops::soft_target_loss(logits, targets, nullptr, WithEntropy,
                                 static_cast<T>(scale / n), dlogits, workspace_) /
           n;
  }

  /// The same with the target of row r read from row target_rows[r] of `table` [R, K].
  double forward_backward(const TensorView<T, D>& logits, const TensorView<T, D>& table,
                          const TensorView<Index, D>& target_rows, const TensorView<T, D>& dlogits,
                          double scale = 1.0) {
    MOCA_PROFILE_SCOPE("loss");
    const double n = rows(logits);
    return ops::soft_target_loss(logits, table, &target_rows, WithEntropy,
                                 static_cast<T>(scale / n), dlogits, workspace_) /
           n;
  }

  /// The two forms above with the loss as a value of `into`, read later with the set's other
  /// values instead of waiting for the device here (the same value).
  typename PendingValues<D>::Ticket forward_backward(const TensorView<T, D>& logits,
                                                     const TensorView<T, D>& targets,
                                                     const TensorView<T, D>& dlogits, double scale,
                                                     PendingValues<D>& into) {
    MOCA_PROFILE_SCOPE("loss");
    check(logits, targets, "");
    const double n = rows(logits);
    return ops::soft_target_loss(logits, targets, nullptr, WithEntropy, static_cast<T>(scale / n),
                                 dlogits, workspace_, into, n);
  }
  typename PendingValues<D>::Ticket forward_backward(const TensorView<T, D>& logits,
                                                     const TensorView<T, D>& table,
                                                     const TensorView<Index, D>& target_rows,
                                                     const TensorView<T, D>& dlogits, double scale,
                                                     PendingValues<D>& into) {
    MOCA_PROFILE_SCOPE("loss");
    const double n = rows(logits);
    return ops::soft_target_loss(logits, table, &target_rows, WithEntropy,
                                 static_cast<T>(scale / n), dlogits, workspace_, into, n);
  }

 private:
  static const char* name() { return WithEntropy ? "KL divergence" : "cross-entropy"; }
  static void check(const TensorView<T, D>& logits, const TensorView<T, D>& targets,
                    const char* what) {
    MOCA_CHECK(logits.shape() == targets.shape(), name(), what, ": logits ", logits.shape(),
               " and targets ", targets.shape(), " differ");
  }
  static double rows(const TensorView<T, D>& logits) {
    MOCA_CHECK(logits.rank() >= 1 && logits.shape().leading() > 0, name(), ": no rows in ",
               logits.shape());
    return static_cast<double>(logits.shape().leading());
  }

  ops::SoftTargetWorkspace<T, D> workspace_;
  Tensor<T, D> grad_;
};

/// −(1/rows) Σ t · log softmax(z).
template <class T, class D = Cpu>
using SoftTargetCrossEntropy = SoftTargetLoss<T, D, false>;

/// KL(t ‖ softmax z), batch-mean over rows.
template <class T, class D = Cpu>
using KlDivergence = SoftTargetLoss<T, D, true>;

}  // namespace moca
