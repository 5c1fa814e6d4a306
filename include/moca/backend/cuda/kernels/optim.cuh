// Optimiser updates over flat buffers, and the precision conversion of a mixed-precision
// model's master weights. Contracts as in backend/cpu/elementwise.hpp (adamw, convert).
#pragma once

#include <cmath>

#include "moca/backend/cuda/kernels/common.cuh"

namespace moca::cuda {
namespace kernels {

// One AdamW step (torch.optim.AdamW): p *= 1 − lr·wd, then the bias-corrected Adam update.
// The constants are computed once on the host, in double, exactly as the CPU backend computes
// them (1 − β included: rounding β to float first would be off by 1.3e-5 for β = 0.999), and
// enter the kernel rounded to T. The gradient may be narrower than T (bf16 gradients of float
// weights): it is widened exactly.
template <class T, class G>
struct AdamWOp {
  T *p, *m, *v;
  const G* g;
  T decay, step_size, inv_sqrt_bc2, b1, b2, one_minus_b1, one_minus_b2, eps;
  __device__ void operator()(std::int64_t i) const {
    const T gi = static_cast<T>(g[i]);
    const T mi = b1 * m[i] + one_minus_b1 * gi;
    const T vi = b2 * v[i] + one_minus_b2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] = p[i] * decay - step_size * mi / (dsqrt(vi) * inv_sqrt_bc2 + eps);
  }
};

template <class S, class T>
struct ConvertOp {
  const S* x;
  T* y;
  __device__ void operator()(std::int64_t i) const { y[i] = static_cast<T>(x[i]); }
};

}  // namespace kernels

template <class S, class T>
void convert(std::int64_t n, const S* x, T* y) {
  kernels::launch_elementwise(n, kernels::ConvertOp<S, T>{x, y});
}

template <class T, class G>
void adamw(std::int64_t n, T* p, const G* g, T* m, T* v, double lr, double beta1, double beta2,
           double eps, double weight_decay, std::int64_t step) {
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  kernels::AdamWOp<T, G> op{p,
                         m,
                         v,
                         g,
                         static_cast<T>(1.0 - lr * weight_decay),
                         static_cast<T>(lr / bc1),
                         static_cast<T>(1.0 / std::sqrt(bc2)),
                         static_cast<T>(beta1),
                         static_cast<T>(beta2),
                         static_cast<T>(1.0 - beta1),
                         static_cast<T>(1.0 - beta2),
                         static_cast<T>(eps)};
  kernels::launch_elementwise(n, op);
}

}  // namespace moca::cuda
