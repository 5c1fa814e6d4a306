// The op set every layer is written against. Ops take TensorView arguments (a Tensor is one),
// check shapes, and run on the tensors' device through Backend<Device>.
#pragma once

#include "moca/ops/attention.hpp"
#include "moca/ops/elementwise.hpp"
#include "moca/ops/gemm.hpp"
#include "moca/ops/index.hpp"
#include "moca/ops/layout.hpp"
#include "moca/ops/losses.hpp"
#include "moca/ops/normalization.hpp"
#include "moca/ops/optim.hpp"
#include "moca/ops/reduce.hpp"
#include "moca/ops/softmax.hpp"
#include "moca/ops/stats.hpp"
