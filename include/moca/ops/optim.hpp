// Optimiser updates over flat buffers (a parameter arena, or one tensor).
#pragma once

#include "moca/ops/common.hpp"

namespace moca::ops {

/// Hyper-parameters of one AdamW update; `step` counts from 1.
struct AdamWStep {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  std::int64_t step = 1;
};

/// One AdamW update of p from g with moments m, v (torch.optim.AdamW semantics: decoupled
/// decay p ← p·(1 − lr·wd) before the Adam step, bias-corrected moments). The gradient may be
/// narrower than the parameters (bf16 gradients of float weights); it is widened exactly.
template <class T, class G, class D>
void adamw(const TensorView<T, D>& p, const TensorView<G, D>& g, const TensorView<T, D>& m,
           const TensorView<T, D>& v, const AdamWStep& s) {
  detail::check_same_size("adamw", p, g);
  detail::check_same_size("adamw", p, m);
  detail::check_same_size("adamw", p, v);
  MOCA_CHECK(s.step >= 1, "adamw: step counts from 1, got ", s.step);
  detail::count_traffic(p, p, g, m, m, v, v);
  Backend<D>::adamw(p.numel(), p.data(), g.data(), m.data(), v.data(), s.lr, s.beta1, s.beta2,
                    s.eps, s.weight_decay, s.step);
}

}  // namespace moca::ops
