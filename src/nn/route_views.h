// Routing views whose masks are prefixes, in groups over the prefix each
// group needs (the autoregressive module's windows).
#pragma once

#include <c10/util/Optional.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "colt5/nn/router.h"

namespace colt5 {
namespace nn {

// router.forward(x, num_tokens, mask, random_route, {}, keep_one_route_dim,
// gather_tokens) for a [b, views, n] mask whose view v is false from position
// lengths[v] on (non-decreasing): the routing scores are computed once, then
// the views are routed in `groups` groups of consecutive views, each over the
// prefix its longest view needs (at least enough positions that coordinate
// descent's k and the top-k's are those of the whole). The same output apart
// from the positions picked for masked slots; the work of coordinate descent
// and top-k falls from views x n towards the sum of the lengths. Other masks,
// route_block_size, or groups 1 route as forward() does.
RouterOutput route_prefix_views(CoordinateDescentRouterImpl& router, const torch::Tensor& x, int64_t num_tokens,
                                const torch::Tensor& mask, const std::vector<int64_t>& lengths, int64_t groups,
                                bool random_route, bool keep_one_route_dim, bool gather_tokens);

// q_router.forward(x, num_q, mask, random_route) and kv_router.forward(x,
// num_kv, mask, random_route) of the same x (self-attention's routers). With
// joint_scores, where both score x with their own tokens on CUDA's routing
// kernel over the whole sequence (no route blocks, at most 4 tokens in all),
// both routers' scores come from one read of x (one kernel forward, one
// backward) and their routed rows from one gather: the backward writes one
// gradient of x for the two instead of four to be added. The same routing;
// the gradients equal up to the order of the additions. Otherwise the two
// calls.
std::pair<RouterOutput, RouterOutput> route_pair(CoordinateDescentRouterImpl& q_router,
                                                 CoordinateDescentRouterImpl& kv_router, const torch::Tensor& x,
                                                 int64_t num_q, int64_t num_kv, const torch::Tensor& mask,
                                                 bool random_route, bool joint_scores);

// The query router over `queries` and route_prefix_views(kv_router, context,
// num_kv, context_mask, lengths, groups, random_route, keep_one_route_dim,
// gather_tokens) when the queries are a view of the context (the same
// elements in the same order: the autoregressive module's windows of its
// sequence). Where both routers score the sequence with their own tokens on
// CUDA's routing kernel (no route blocks, at most 4 tokens in all), both
// scores come from one read of it and its gradient from one backward kernel
// (the queries' gathered rows and the context's later uses, through each
// output's x_passed, added in it) rather than a kernel per router. The same
// routing; the gradients equal up to the order of the additions. nullopt
// where that does not apply (then route them one after the other).
c10::optional<std::pair<RouterOutput, RouterOutput>> route_queries_of_context(
    CoordinateDescentRouterImpl& q_router, CoordinateDescentRouterImpl& kv_router, const torch::Tensor& queries,
    int64_t num_q, const torch::Tensor& query_mask, const torch::Tensor& context, int64_t num_kv,
    const torch::Tensor& context_mask, const std::vector<int64_t>& lengths, int64_t groups, bool random_route,
    bool keep_one_route_dim, bool gather_tokens);

}  // namespace nn
}  // namespace colt5
