// The moca library: header-only C++20 deep learning for Vision Transformers and MOCA
// self-supervised pretraining. This umbrella header brings in the CPU library; for the CUDA
// backend include <moca/cuda.hpp> as well and link moca::cuda.
#pragma once

#include "moca/core/check.hpp"
#include "moca/core/device.hpp"
#include "moca/core/memory.hpp"
#include "moca/core/rng.hpp"
#include "moca/core/shape.hpp"
#include "moca/core/tensor.hpp"
#include "moca/core/version.hpp"
#include "moca/ops.hpp"
