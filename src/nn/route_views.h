// Routing views whose masks are prefixes, in groups over the prefix each
// group needs (the autoregressive module's windows).
#pragma once

#include <cstdint>
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

}  // namespace nn
}  // namespace colt5
