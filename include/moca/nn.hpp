// Layers: parameters and their arena, Linear, LayerNorm, activations, Mlp, attention, Block,
// PatchEmbed, losses.
#pragma once

#include "moca/nn/activation.hpp"
#include "moca/nn/attention.hpp"
#include "moca/nn/block.hpp"
#include "moca/nn/concepts.hpp"
#include "moca/nn/layer_norm.hpp"
#include "moca/nn/linear.hpp"
#include "moca/nn/losses.hpp"
#include "moca/nn/mlp.hpp"
#include "moca/nn/parameter.hpp"
#include "moca/nn/patch_embed.hpp"
