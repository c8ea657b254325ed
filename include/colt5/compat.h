// The LibTorch API differences that matter to colt5 and to programs built on it
// (Debian's LibTorch 1.13 and the 2.x of PyTorch installs), in one place.
#pragma once

#include <ATen/autocast_mode.h>
#include <ATen/core/Tensor.h>
#include <torch/version.h>

#include <string>

#if defined(TORCH_VERSION_MAJOR) && TORCH_VERSION_MAJOR >= 2
#define COLT5_TORCH2 1
#else
#define COLT5_TORCH2 0
#include <c10/util/string_utils.h>
#endif

// at::scaled_dot_product_attention appeared in LibTorch 2.0.
#define COLT5_HAS_SDPA COLT5_TORCH2

namespace colt5 {
namespace compat {

// The key of a parameter in torch::optim::Optimizer::state().
#if COLT5_TORCH2
inline void* optimizer_state_key(const at::Tensor& p) { return p.unsafeGetTensorImpl(); }
#else
inline std::string optimizer_state_key(const at::Tensor& p) { return c10::guts::to_string(p.unsafeGetTensorImpl()); }
#endif

// Autocast switches for the CPU or CUDA.
inline bool autocast_enabled(c10::DeviceType device) {
#if COLT5_TORCH2
  return at::autocast::is_autocast_enabled(device);
#else
  return device == c10::DeviceType::CPU ? at::autocast::is_cpu_enabled() : at::autocast::is_enabled();
#endif
}
inline at::ScalarType autocast_dtype(c10::DeviceType device) {
#if COLT5_TORCH2
  return at::autocast::get_autocast_dtype(device);
#else
  return device == c10::DeviceType::CPU ? at::autocast::get_autocast_cpu_dtype()
                                        : at::autocast::get_autocast_gpu_dtype();
#endif
}
inline void set_autocast(c10::DeviceType device, bool enabled, at::ScalarType dtype) {
#if COLT5_TORCH2
  at::autocast::set_autocast_dtype(device, dtype);
  at::autocast::set_autocast_enabled(device, enabled);
#else
  if (device == c10::DeviceType::CPU) {
    at::autocast::set_autocast_cpu_dtype(dtype);
    at::autocast::set_cpu_enabled(enabled);
  } else {
    at::autocast::set_autocast_gpu_dtype(dtype);
    at::autocast::set_enabled(enabled);
  }
#endif
}

}  // namespace compat
}  // namespace colt5
