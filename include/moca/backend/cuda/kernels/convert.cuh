// Precision conversion for the bf16 matrix products (FloatMatmul::Bf16 in context.hpp).
// Included once, through instantiate.cuh: float_to_bf16 is an ordinary function defined here.
#pragma once

#include <cuda_bf16.h>

#include "moca/backend/cuda/kernels/common.cuh"

namespace moca::cuda {
namespace kernels {

struct FloatToBf16Op {
  const float* x;
  std::uint16_t* y;
  __device__ void operator()(std::int64_t i) const {
    y[i] = __bfloat16_as_ushort(__float2bfloat16_rn(x[i]));
  }
};

}  // namespace kernels

void float_to_bf16(std::int64_t n, const float* x, std::uint16_t* y) {
  kernels::launch_elementwise(n, kernels::FloatToBf16Op{x, y});
}

}  // namespace moca::cuda
