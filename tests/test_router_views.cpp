// Routing one sequence under several masks ([batch, views, seq]) equals routing
// copies of the sequence, one per view, without making the copies.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "colt5/nn/router.h"
#include "nn/route_views.h"

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

// Views whose masks are prefixes, routed in groups over the prefix each group
// needs, route as the whole: the same scores, the same kept positions in the
// same order, the same gradients (masked slots may point elsewhere).
TEST(RouterViews, PrefixGroupsRouteAsTheWhole) {
  using namespace colt5::nn;
  torch::manual_seed(32);
  for (int64_t routes : {1, 2}) {
    SCOPED_TRACE(routes);
    CoordinateDescentRouter router(CoordinateDescentRouterOptions(16).num_routing_tokens(routes).eps(0.5));
    router->to(torch::kDouble);
    const int64_t b = 2, views = 7, w = 12, n = (views + 1) * w, d = 16, k = 20;
    std::vector<int64_t> lengths;
    for (int64_t v = 1; v <= views; ++v) lengths.push_back(v * w);
    torch::Tensor masks = torch::zeros({b, views, n}, torch::kBool);
    for (int64_t v = 0; v < views; ++v) masks.select(1, v).slice(1, 0, lengths[v]).fill_(true);
    masks.select(0, 1).select(1, 2).fill_(false);  // a hole in every view of row 1
    torch::Tensor x = torch::randn({b, n, d}, torch::kDouble);
    for (bool keep_route_dim : {false, true}) {
      for (bool gather : {true, false}) {
        torch::Tensor xw = x.clone().requires_grad_(true);
        auto whole = router->forward(xw, k, masks, false, {}, keep_route_dim, gather);
        for (int64_t groups : {1, 2, 3, 7, 20}) {
          SCOPED_TRACE(std::to_string(groups) + " groups, route dim " + std::to_string(keep_route_dim) + ", gather " +
                       std::to_string(gather));
          torch::Tensor xg = x.clone().requires_grad_(true);
          auto grouped = route_prefix_views(*router, xg, k, masks, lengths, groups, false, keep_route_dim, gather);
          ASSERT_EQ(grouped.indices.sizes(), whole.indices.sizes());
          ASSERT_TRUE(torch::equal(grouped.routed_mask, whole.routed_mask));
          EXPECT_TRUE(torch::equal(grouped.indices.masked_select(whole.routed_mask),
                                   whole.indices.masked_select(whole.routed_mask)));
          EXPECT_TRUE(torch::allclose(grouped.scores, whole.scores, 1e-12, 1e-14));
          ASSERT_EQ(grouped.routed_tokens.defined(), gather);
          if (gather) {
            const torch::Tensor kept = whole.routed_mask.unsqueeze(-1).expand_as(whole.routed_tokens);
            EXPECT_TRUE(torch::equal(grouped.routed_tokens.masked_select(kept), whole.routed_tokens.masked_select(kept)));
          }
          // A loss of the kept slots' scores (and tokens): the same gradient.
          auto loss = [&](const RouterOutput& o) {
            torch::Tensor l = (o.scores * whole.routed_mask * torch::arange(o.scores.numel(), torch::kDouble)
                                                                  .view(o.scores.sizes()))
                                  .sum();
            if (gather) l = l + (o.routed_tokens * whole.routed_mask.unsqueeze(-1)).pow(2).sum();
            return l;
          };
          torch::Tensor gw = torch::autograd::grad({loss(whole)}, {xw}, {}, true)[0];
          torch::Tensor gg = torch::autograd::grad({loss(grouped)}, {xg})[0];
          EXPECT_TRUE(torch::allclose(gg, gw, 1e-10, 1e-12)) << (gg - gw).abs().max().item<double>();
        }
      }
    }
  }
}
