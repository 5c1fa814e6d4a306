// Files: safetensors reading and writing (atomic), loading and saving parameters by name.
#pragma once

#include "moca/io/safetensors.hpp"
#include "moca/io/state_dict.hpp"
