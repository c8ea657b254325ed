// Coordinate-descent router: picks the tokens that go through a heavy branch.
#pragma once

#include <torch/nn/cloneable.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>
#include <torch/arg.h>
#include <torch/types.h>

#include <c10/util/Optional.h>

#include <cstdint>

namespace colt5 {
namespace nn {

// Same names and defaults as the reference's CoordinateDescentRouter.
struct CoordinateDescentRouterOptions {
  /* implicit */ CoordinateDescentRouterOptions(int64_t dim = 0) : dim_(dim) {}

  TORCH_ARG(int64_t, dim);
  // Selected scores are 1 in value but keep the soft scores' gradient.
  TORCH_ARG(bool, straight_through) = true;
  TORCH_ARG(int64_t, n_iters) = 20;
  // Coordinate descent runs with k = min(num_tokens * fetch_k_ratio, n); >= 1.
  TORCH_ARG(double, fetch_k_ratio) = 9.0 / 8.0;
  TORCH_ARG(double, eps) = 0.03;
  TORCH_ARG(double, eps_decay) = 0.7;
  // nullopt means eps (no eps-scaling).
  TORCH_ARG(c10::optional<double>, eps_init) = 4.0;
  // More than one gives a route dimension: scores [b, r, n], routed tokens [b, r, k, d].
  TORCH_ARG(int64_t, num_routing_tokens) = 1;
  // Routing tokens are passed to forward() instead of being a parameter.
  TORCH_ARG(bool, learned_routing_tokens) = false;
  // Accepted for compatibility; the fused coordinate descent is always used.
  TORCH_ARG(bool, use_triton) = false;
  TORCH_ARG(bool, cosine_sim_routing) = false;
  TORCH_ARG(double, cosine_sim_scale) = 8.0;
  // Route ceil(num_tokens / blocks) tokens from each whole block of this size
  // (a tail shorter than a block is never routed).
  TORCH_ARG(c10::optional<int64_t>, route_block_size) = c10::nullopt;
  // Backward memory/recompute trade-off of coordinate descent (see CoorDescentOptions).
  TORCH_ARG(int64_t, checkpoint_segments) = 0;
};

struct RouterOutput {
  // int64 [b, k] or [b, r, k] (positions in the whole sequence, best first);
  // undefined when nothing was routed (n <= num_tokens).
  torch::Tensor indices;
  // [b, k] or [b, r, k]: the selected normalized scores (1 in value with
  // straight_through, 0 where the selected token is masked); all ones
  // [b, n] / [b, r, n] when nothing was routed.
  torch::Tensor scores;
  // [b, k, d] or [b, r, k, d]; x itself (repeated over routes) when nothing was routed.
  torch::Tensor routed_tokens;
  // bool, the shape of scores; undefined when no mask was given.
  torch::Tensor routed_mask;
};

class CoordinateDescentRouterImpl : public torch::nn::Cloneable<CoordinateDescentRouterImpl> {
 public:
  explicit CoordinateDescentRouterImpl(const CoordinateDescentRouterOptions& options);
  void reset() override;

  // x: [b, n, dim] floating. mask: bool [b, n] (true = real token) or undefined.
  // num_tokens >= 1: tokens routed per row (and per route).
  // random_route: replace the scores by noise (a negative control).
  // routing_tokens: [b, dim] or [b, r, dim], required iff learned_routing_tokens.
  // keep_one_route_dim: give a route dimension of size 1 with one routing token.
  // gather_tokens: false leaves routed_tokens undefined when tokens are routed
  // (for callers that gather something else at the indices).
  RouterOutput forward(const torch::Tensor& x, int64_t num_tokens, const torch::Tensor& mask = {},
                       bool random_route = false, const torch::Tensor& routing_tokens = {},
                       bool keep_one_route_dim = false, bool gather_tokens = true);

  // src with routed_tokens [b, k, d] written at indices [b, k] of each row
  // (out of place, differentiable in both).
  torch::Tensor route_back(const torch::Tensor& src, const torch::Tensor& routed_tokens,
                           const torch::Tensor& indices) const;

  CoordinateDescentRouterOptions options;
  // [num_routing_tokens, dim]; undefined with learned_routing_tokens.
  torch::Tensor routing_token;
};

TORCH_MODULE(CoordinateDescentRouter);

}  // namespace nn
}  // namespace colt5
