// Elementwise kernels: fill, scaled sums, products, bias, activations, and the C = beta · C
// update of a GEMM that has no product to add. Contracts as in backend/cpu/elementwise.hpp;
// every element is computed independently, so outputs may alias inputs.
#pragma once

#include "moca/backend/cuda/kernels/common.cuh"

namespace moca::cuda {
namespace kernels {

template <class T>
struct FillOp {
  T value;
  T* x;
  __device__ void operator()(std::int64_t i) const { x[i] = value; }
};

template <class T>
struct AddBiasOp {  // x [M, N] += bias [N], over the flat index
  std::int64_t N;
  const T* bias;
  T* x;
  __device__ void operator()(std::int64_t i) const { x[i] += bias[i % N]; }
};

// Exact GELU, the erf form, as on the CPU: gelu(x) = x · Phi(x).
template <class T>
__device__ inline T gelu_value(T x) {
  return T(0.5) * x * (T(1) + derf(x * T(0.70710678118654752440)));
}
template <class T>
__device__ inline T gelu_derivative(T x) {
  const T cdf = T(0.5) * (T(1) + derf(x * T(0.70710678118654752440)));
  const T pdf = T(0.39894228040143267794) * dexp(T(-0.5) * x * x);
  return cdf + x * pdf;
}

// Per-element functions for launch_map (common.cuh): computed as the CPU computes them (bf16
// operands widen to float, the result rounds once as it is stored).
template <class T>
struct AxpbyFn {  // alpha x + beta y
  T alpha, beta;
  __device__ T operator()(T x, T y) const { return static_cast<T>(alpha * x + beta * y); }
};

template <class T>
struct AxFn {  // alpha x: the beta == 0 case, which must not read y (it may hold NaN)
  T alpha;
  __device__ T operator()(T x) const { return static_cast<T>(alpha * x); }
};

template <class T>
struct AddFn {
  __device__ T operator()(T a, T b) const { return static_cast<T>(a + b); }
};

template <class T>
struct MulFn {
  __device__ T operator()(T a, T b) const { return static_cast<T>(a * b); }
};

template <class T>
struct GeluFn {
  __device__ T operator()(T x) const { return static_cast<T>(gelu_value<acc_t<T>>(x)); }
};

template <class T>
struct GeluGradFn {  // dy · gelu'(x)
  __device__ T operator()(T x, T dy) const {
    return static_cast<T>(dy * gelu_derivative<acc_t<T>>(x));
  }
};

template <class T>
struct ReluFn {
  __device__ T operator()(T x) const { return x > T(0) ? x : T(0); }
};

template <class T>
struct ReluGradFn {  // subgradient 0 at 0, as in PyTorch
  __device__ T operator()(T x, T dy) const { return x > T(0) ? dy : T(0); }
};

template <class T>
struct ScaleMatricesOp {  // over the flat index of batch × [M, N]
  std::int64_t M, N, ldc, stride;
  T beta;
  T* C;
  __device__ void operator()(std::int64_t i) const {
    const std::int64_t mn = M * N;
    const std::int64_t b = i / mn, rc = i - b * mn;
    const std::int64_t r = rc / N, c = rc - r * N;
    T& e = C[b * stride + r * ldc + c];
    e = beta == T(0) ? T(0) : static_cast<T>(beta * e);
  }
};

}  // namespace kernels

template <class T>
void fill(std::int64_t n, T value, T* x) {
  kernels::launch_elementwise(n, kernels::FillOp<T>{value, x});
}

template <class T>
void axpby(std::int64_t n, T alpha, const T* x, T beta, T* y) {
  if (beta == T(0))
    kernels::launch_map(n, kernels::AxFn<T>{alpha}, y, x);
  else
    kernels::launch_map(n, kernels::AxpbyFn<T>{alpha, beta}, y, x, static_cast<const T*>(y));
}

template <class T>
void scale(std::int64_t n, T alpha, T* x) {
  kernels::launch_map(n, kernels::AxFn<T>{alpha}, x, static_cast<const T*>(x));
}

template <class T>
void add(std::int64_t n, const T* a, const T* b, T* y) {
  kernels::launch_map(n, kernels::AddFn<T>{}, y, a, b);
}

template <class T>
void mul(std::int64_t n, const T* a, const T* b, T* y) {
  kernels::launch_map(n, kernels::MulFn<T>{}, y, a, b);
}

template <class T>
void add_bias(std::int64_t M, std::int64_t N, const T* bias, T* x) {
  if (N == 0) return;
  kernels::launch_elementwise(M * N, kernels::AddBiasOp<T>{N, bias, x});
}

template <class T>
void gelu_forward(std::int64_t n, const T* x, T* y) {
  kernels::launch_map(n, kernels::GeluFn<T>{}, y, x);
}

template <class T>
void gelu_backward(std::int64_t n, const T* x, const T* dy, T* dx) {
  kernels::launch_map(n, kernels::GeluGradFn<T>{}, dx, x, dy);
}

template <class T>
void relu_forward(std::int64_t n, const T* x, T* y) {
  kernels::launch_map(n, kernels::ReluFn<T>{}, y, x);
}

template <class T>
void relu_backward(std::int64_t n, const T* x, const T* dy, T* dx) {
  kernels::launch_map(n, kernels::ReluGradFn<T>{}, dx, x, dy);
}

template <class T>
void scale_matrices(std::int64_t batch, std::int64_t M, std::int64_t N, T beta, T* C,
                    std::int64_t ldc, std::int64_t stride) {
  if (batch <= 0 || M <= 0 || N <= 0) return;
  kernels::launch_elementwise(batch * M * N,
                              kernels::ScaleMatricesOp<T>{M, N, ldc, stride, beta, C});
}

}  // namespace moca::cuda
