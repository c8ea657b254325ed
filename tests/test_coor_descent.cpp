#include <gtest/gtest.h>
#include <torch/torch.h>

#include "colt5/coor_descent.h"

TEST(CoorDescent, Smoke) {
  torch::Tensor s = torch::randn({3, 50}, torch::kDouble);
  auto y = colt5::coor_descent(s, 5.0, colt5::CoorDescentOptions().n_iters(50));
  EXPECT_NEAR(y.sum(-1)[0].item<double>(), 5.0, 0.5);
}
