// The CUDA kernels' element type (kernels::RowDtype) for a LibTorch dtype.
#pragma once

#ifdef COLT5_WITH_CUDA
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include "kernels/coor_descent.h"

namespace colt5 {

// float32, float16 or bfloat16 into `out`; false for any other dtype.
inline bool row_dtype(at::ScalarType t, kernels::RowDtype& out) {
  switch (t) {
    case at::kFloat:
      out = kernels::RowDtype::f32;
      return true;
    case at::kHalf:
      out = kernels::RowDtype::f16;
      return true;
    case at::kBFloat16:
      out = kernels::RowDtype::bf16;
      return true;
    default:
      return false;
  }
}

// The same for a dtype the caller has already checked.
inline kernels::RowDtype row_dtype(at::ScalarType t) {
  kernels::RowDtype out = kernels::RowDtype::f32;
  TORCH_CHECK(row_dtype(t, out), "colt5 CUDA kernels take float32, float16 or bfloat16, got ", t);
  return out;
}

}  // namespace colt5
#endif
