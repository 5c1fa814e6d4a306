// The CUDA backend: Tensor<T, Cuda> and every op of <moca/ops.hpp> on an NVIDIA GPU.
//
//   #include <moca/moca.hpp>
//   #include <moca/cuda.hpp>      // and link moca::cuda (CMake)
//
//   if (moca::cuda::available()) {
//     moca::Tensor<float, moca::Cuda> x = host.to<moca::Cuda>();
//     moca::ops::gelu(x, x);
//     moca::Tensor<float> back = x.to<moca::Cpu>();
//   }
//
// An ordinary C++ compiler builds code that includes this header; the kernels themselves are
// compiled by nvcc into the moca_cuda_kernels library that moca::cuda links.
#pragma once

#include "moca/backend/cuda/backend.hpp"
#include "moca/backend/cuda/check.hpp"
#include "moca/backend/cuda/context.hpp"
#include "moca/backend/cuda/memory.hpp"
#include "moca/backend/cuda/timeline.hpp"
