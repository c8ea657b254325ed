// The one place that knows which LibTorch API differences matter.
#pragma once

#include <torch/version.h>

// at::scaled_dot_product_attention appeared in LibTorch 2.0.
#if defined(TORCH_VERSION_MAJOR) && TORCH_VERSION_MAJOR >= 2
#define COLT5_HAS_SDPA 1
#else
#define COLT5_HAS_SDPA 0
#endif
