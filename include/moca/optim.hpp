// Optimisers and what surrounds them: parameter groups, AdamW, SGD, schedules, gradient
// clipping, the EMA update.
#pragma once

#include "moca/optim/adamw.hpp"
#include "moca/optim/clip.hpp"
#include "moca/optim/ema.hpp"
#include "moca/optim/param_groups.hpp"
#include "moca/optim/schedules.hpp"
#include "moca/optim/sgd.hpp"
