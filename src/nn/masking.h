// The value attention logits take where a mask hides them, as the reference
// sets it: the most negative finite value of the dtype.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <limits>

namespace colt5 {
namespace nn {

inline double most_negative(at::ScalarType t) {
  switch (t) {
    case at::kDouble:
      return -std::numeric_limits<double>::max();
    case at::kFloat:
      return -std::numeric_limits<float>::max();
    case at::kHalf:
      return -static_cast<double>(std::numeric_limits<c10::Half>::max());
    case at::kBFloat16:
      return -static_cast<double>(std::numeric_limits<c10::BFloat16>::max());
    default:
      TORCH_CHECK(false, "attention: unsupported dtype ", t);
  }
}

}  // namespace nn
}  // namespace colt5
