// t in dtype s: t itself when it already is (no operator call: each call is a
// host dispatch, and the hot paths convert many tensors that are already in
// the wanted dtype).
#pragma once

#include <ATen/core/Tensor.h>

namespace colt5 {

inline at::Tensor as_type(const at::Tensor& t, at::ScalarType s) { return t.scalar_type() == s ? t : t.to(s); }

}  // namespace colt5
