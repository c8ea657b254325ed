// Checks of module options shared by the modules; a failure names the module,
// the option and the value.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>

namespace colt5 {
namespace nn {

inline void check_positive(const char* module, const char* option, int64_t value) {
  TORCH_CHECK(value > 0, module, ": ", option, " must be positive, got ", value);
}

// The options every multi-head attention has: width, head width and heads.
inline void check_heads(const char* module, int64_t dim, int64_t dim_head, int64_t heads) {
  check_positive(module, "dim", dim);
  check_positive(module, "dim_head", dim_head);
  check_positive(module, "heads", heads);
}

}  // namespace nn
}  // namespace colt5
