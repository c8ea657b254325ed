// Routing one sequence under several masks ([batch, views, seq]) equals routing
// copies of the sequence, one per view, without making the copies.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "colt5/nn/router.h"

TEST(RouterViews, EqualsRoutingExpandedCopies) {
  using namespace colt5::nn;
  torch::manual_seed(31);
  for (int64_t routes : {1, 2}) {
    SCOPED_TRACE(routes);
    CoordinateDescentRouter router(CoordinateDescentRouterOptions(16).num_routing_tokens(routes).eps(1.0));
    router->to(torch::kDouble);
    const int64_t b = 2, views = 3, n = 40, d = 16;
    torch::Tensor x = torch::randn({b, n, d}, torch::kDouble).requires_grad_(true);
    torch::Tensor masks = torch::rand({b, views, n}) > 0.3;
    masks.select(1, 0).slice(1, 20).fill_(false);  // a view that sees only the first half
    auto viewed = router->forward(x, 12, masks);
    torch::Tensor xc = x.detach().clone().requires_grad_(true);
    auto copies = router->forward(xc.unsqueeze(1).expand({b, views, n, d}).reshape({b * views, n, d}), 12,
                                  masks.reshape({b * views, n}));
    EXPECT_TRUE(torch::equal(viewed.indices, copies.indices));
    EXPECT_TRUE(torch::allclose(viewed.scores, copies.scores));
    EXPECT_TRUE(torch::equal(viewed.routed_tokens, copies.routed_tokens));
    EXPECT_TRUE(torch::equal(viewed.routed_mask, copies.routed_mask));
    (viewed.routed_tokens * viewed.scores.unsqueeze(-1)).sum().backward();
    (copies.routed_tokens * copies.scores.unsqueeze(-1)).sum().backward();
    EXPECT_TRUE(torch::allclose(x.grad(), xc.grad(), 1e-10, 1e-12));
  }
}

TEST(RouterViews, ViewsAndRouteBlocksDoNotCombine) {
  using namespace colt5::nn;
  CoordinateDescentRouter router(CoordinateDescentRouterOptions(8).route_block_size(16));
  try {
    router->forward(torch::randn({1, 64, 8}), 4, torch::ones({1, 2, 64}, torch::kBool));
    ADD_FAILURE() << "no error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("route_block_size"), std::string::npos) << e.what();
  }
}
