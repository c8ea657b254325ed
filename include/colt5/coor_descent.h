// Differentiable soft top-k by coordinate descent, and the straight-through
// hard top-k built on it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <torch/arg.h>

#include <cstdint>
#include <string>

namespace colt5 {

struct CoorDescentOptions {
  // Iterations of coordinate descent (>= 1).
  TORCH_ARG(int64_t, n_iters) = 20;
  // Final (smallest) entropy regularisation (> 0).
  TORCH_ARG(double, eps) = 0.1;
  // Starting epsilon for eps-scaling; nullopt means eps. Values below eps are raised to eps.
  TORCH_ARG(c10::optional<double>, eps_init) = c10::nullopt;
  // eps_{t+1} = max(eps_t * eps_decay, eps); 1 disables eps-scaling. In (0, 1].
  TORCH_ARG(double, eps_decay) = 1.0;
  // Memory/recompute trade-off of the backward. The state of a row is one
  // scalar per iteration, so 0 (the default) keeps every iterate and the
  // backward recomputes nothing; c >= 1 keeps c iterates per row and the
  // backward re-runs each of the c segments first. Results are identical.
  TORCH_ARG(int64_t, checkpoint_segments) = 0;
  // CUDA row kernel: "auto" (chosen by row length), or one forced by name:
  // "warp", "block", "cluster" or "grid". Every kernel takes any row length
  // and gives the same result to rounding; forcing one is for tests and
  // benchmarks.
  TORCH_ARG(std::string, cuda_kernel) = "auto";
  // "cluster" and "grid": blocks per row; 0 = the fewest that hold the row in
  // registers, at least 2.
  TORCH_ARG(int64_t, cuda_blocks_per_row) = 0;
  // "auto": the largest thread-block cluster a row may get while all rows
  // still run at once (1 = one block per row up to 8192 float32 entries).
  TORCH_ARG(int64_t, cuda_max_cluster) = 1;
};

// Soft top-k of the last dimension of `s` (any leading shape, last dim >= 1).
//  - k: number of entries each row should select, > 0. Values above a row's
//    unmasked count are allowed: the scores then saturate towards 1.
//  - mask: bool, the shape of s; false entries are excluded and get score 0.
//    A fully masked row gives zeros and zero gradients.
//  - A NaN or infinite score at an unmasked position is an error on the CPU;
//    on CUDA (where checking would cost a host synchronization) its row's
//    scores and gradients are NaN throughout, and the other rows are unchanged.
// Float32, float64, bfloat16 and float16 inputs; arithmetic in float64 for
// float64 and float32 otherwise; the result has the dtype of s. Differentiable
// with respect to s and, in the tensor overload, k.
at::Tensor coor_descent(const at::Tensor& s, double k, const CoorDescentOptions& options = {},
                        const at::Tensor& mask = {});
// k: one value per row, shape s.shape[:-1].
at::Tensor coor_descent(const at::Tensor& s, const at::Tensor& k, const CoorDescentOptions& options = {},
                        const at::Tensor& mask = {});

// Indices of the k largest `scores` along the last dimension under a total
// order: larger score first, then larger `tiebreak` (optional, same shape),
// then smaller position; masked-out entries (mask false) rank last. Identical
// on CPU and CUDA. Returns int64 indices of shape [..., k], best first.
at::Tensor topk_indices(const at::Tensor& scores, int64_t k, const at::Tensor& tiebreak = {},
                        const at::Tensor& mask = {});

struct TopkOptions {
  TORCH_ARG(double, coor_descent_k_ratio) = 9.0 / 8.0;
  TORCH_ARG(int64_t, n_iters) = 20;
  TORCH_ARG(double, eps) = 0.1;
  TORCH_ARG(c10::optional<double>, eps_init) = c10::nullopt;
  TORCH_ARG(double, eps_decay) = 1.0;
  // Plain hard top-k without gradients.
  TORCH_ARG(bool, non_differentiable) = false;
};

struct TopkResult {
  at::Tensor values;               // x gathered at indices (straight-through gated)
  at::Tensor indices;              // [..., k]
  at::Tensor coor_descent_values;  // soft scores at indices (undefined if non_differentiable)
  at::Tensor gates;                // straight-through gates at indices (1 in value)
};

// Straight-through differentiable top-k of the last dimension: values equal
// x's top-k in value, their gradient flows through coordinate descent run with
// k * coor_descent_k_ratio (capped at the row length). Ties break as in
// topk_indices, by lower position.
TopkResult topk(const at::Tensor& x, int64_t k, const TopkOptions& options = {}, const at::Tensor& mask = {});

}  // namespace colt5
