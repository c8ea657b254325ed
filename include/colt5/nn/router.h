// Coordinate-descent router: picks the tokens that go through a heavy branch.
#pragma once

#include <torch/nn/cloneable.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/common.h>
#include <torch/nn/modules/container/any_value.h>
#include <torch/nn/pimpl.h>
#include <torch/arg.h>
#include <torch/types.h>

#include <c10/util/Optional.h>

#include <cstdint>

#include "colt5/nn/options.h"

namespace colt5 {
namespace nn {

// clang-format off
// The router's own options besides its schedule (COLT5_ROUTER_KWARGS_OPTIONS).
#define COLT5_ROUTER_OPTIONS(X)                                                                         \
  X(bool, straight_through, true, "selected scores are 1 in value but keep the soft scores' gradient") \
  X(int64_t, num_routing_tokens, 1, "routes; more than one gives scores (b, r, n), routed (b, r, k, dim)") \
  X(bool, learned_routing_tokens, false, "routing tokens are passed to forward() instead of a parameter") \
  COLT5_ROUTER_KWARGS_OPTIONS(X)
// clang-format on

// Same names and defaults as the reference's CoordinateDescentRouter.
struct CoordinateDescentRouterOptions {
  /* implicit */ CoordinateDescentRouterOptions(int64_t dim = 0) : dim_(dim) {}

  /// Width of the tokens.
  TORCH_ARG(int64_t, dim);
  COLT5_ROUTER_OPTIONS(COLT5_DECLARE_OPTION)
  COLT5_OPTIONS_VISITOR(COLT5_ROUTER_OPTIONS)

  /// The schedule part of these options.
  RouterKwargs kwargs() const;
  /// Sets the schedule part of these options.
  CoordinateDescentRouterOptions& kwargs(const RouterKwargs& kwargs);
};

struct RouterOutput {
  // int64 (b, k) or (b, r, k) (positions in the whole sequence, best first);
  // undefined when nothing was routed (n <= num_tokens).
  torch::Tensor indices;
  // (b, k) or (b, r, k): the selected normalized scores (1 in value with
  // straight_through, 0 where the selected token is masked); all ones
  // (b, n) / (b, r, n) when nothing was routed.
  torch::Tensor scores;
  // (b, k, d) or (b, r, k, d); x itself (repeated over routes) when nothing was routed.
  torch::Tensor routed_tokens;
  // bool, the shape of scores; undefined when no mask was given.
  torch::Tensor routed_mask;
  // (b, n, d): x passed on through the routing scores' autograd node, where
  // the CUDA routing-scores kernel read x as given (undefined elsewhere). The
  // same values and storage as x; use it for x's other uses downstream (a
  // residual sum) and their gradient of x is added inside the scores'
  // backward kernel rather than in an addition of x's size of its own.
  torch::Tensor x_passed;
};

class CoordinateDescentRouterImpl : public torch::nn::Cloneable<CoordinateDescentRouterImpl> {
 public:
  explicit CoordinateDescentRouterImpl(const CoordinateDescentRouterOptions& options);
  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  // x: (b, n, dim) floating. mask: bool (b, n) (true = real token) or undefined.
  // num_tokens >= 1: tokens routed per row (and per route).
  // random_route: replace the scores by noise (a negative control).
  // routing_tokens: (b, dim) or (b, r, dim), required iff learned_routing_tokens.
  // keep_one_route_dim: give a route dimension of size 1 with one routing token.
  // gather_tokens: false leaves routed_tokens undefined when tokens are routed
  // (for callers that gather something else at the indices).
  RouterOutput forward(const torch::Tensor& x, int64_t num_tokens, const torch::Tensor& mask = {},
                       bool random_route = false, const torch::Tensor& routing_tokens = {},
                       bool keep_one_route_dim = false, bool gather_tokens = true);

 protected:
  FORWARD_HAS_DEFAULT_ARGS({2, torch::nn::AnyValue(torch::Tensor())}, {3, torch::nn::AnyValue(false)},
                           {4, torch::nn::AnyValue(torch::Tensor())}, {5, torch::nn::AnyValue(false)},
                           {6, torch::nn::AnyValue(true)})

 public:
  // src with routed_tokens (b, k, d) written at indices (b, k) of each row
  // (out of place, differentiable in both).
  torch::Tensor route_back(const torch::Tensor& src, const torch::Tensor& routed_tokens,
                           const torch::Tensor& indices) const;

  CoordinateDescentRouterOptions options;
  // (num_routing_tokens, dim); undefined with learned_routing_tokens.
  torch::Tensor routing_token;
};

TORCH_MODULE(CoordinateDescentRouter);

}  // namespace nn
}  // namespace colt5
