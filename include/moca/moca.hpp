// The moca library: header-only C++20 deep learning for Vision Transformers and MOCA
// self-supervised pretraining. This umbrella header brings in the whole CPU library; for the
// CUDA backend include <moca/cuda.hpp> as well and link moca::cuda. Finer-grained headers
// (<moca/ops.hpp>, <moca/nn.hpp>, <moca/models/vit.hpp>, ...) keep compile times down.
#pragma once

#include "moca/core/check.hpp"
#include "moca/core/device.hpp"
#include "moca/core/memory.hpp"
#include "moca/core/pending_values.hpp"
#include "moca/core/random.hpp"
#include "moca/core/rng.hpp"
#include "moca/core/shape.hpp"
#include "moca/core/tensor.hpp"
#include "moca/core/version.hpp"
#include "moca/io.hpp"
#include "moca/models/moca/moca.hpp"
#include "moca/models/vit.hpp"
#include "moca/nn.hpp"
#include "moca/ops.hpp"
#include "moca/optim.hpp"
