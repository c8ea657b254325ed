// colt5: conditionally routed attention and feedforward (CoLT5) on LibTorch.
// One include for the whole public API.
#pragma once

#include "colt5/coor_descent.h"
#include "colt5/nn/attention.h"
#include "colt5/nn/conditional.h"
#include "colt5/nn/image.h"
#include "colt5/nn/layers.h"
#include "colt5/nn/local_attention.h"
#include "colt5/nn/router.h"
#include "colt5/nn/state.h"
#include "colt5/safetensors.h"
