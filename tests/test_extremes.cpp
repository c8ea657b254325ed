// Numerical extremes of coordinate descent and the routed modules on the CPU
// (scores up to 1e4, eps down to 1e-4, k = 1 and k = n, one unmasked token,
// NaN/Inf input), and the modules used for inference from several threads at
// once, which must give the serial results.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "colt5/colt5.h"

namespace {

using colt5::CoorDescentOptions;

bool finite(const torch::Tensor& t) { return torch::isfinite(t).all().item<bool>(); }

}  // namespace

TEST(Extremes, CoorDescentLargeScoresSmallEpsAndEveryK) {
  torch::manual_seed(3);
  const int64_t n = 64;
  for (double scale : {1.0, 1e2, 1e4}) {
    for (double eps : {1e-1, 1e-4}) {
      for (int64_t k : {int64_t{1}, int64_t{7}, n}) {
        torch::Tensor s = (torch::randn({4, n}, torch::kDouble) * scale).to(torch::kFloat).requires_grad_(true);
        auto opts = CoorDescentOptions().n_iters(50).eps(eps).eps_init(4.0).eps_decay(0.7);
        torch::Tensor out = colt5::coor_descent(s, static_cast<double>(k), opts);
        const std::string where =
            "scale " + std::to_string(scale) + " eps " + std::to_string(eps) + " k " + std::to_string(k);
        ASSERT_TRUE(finite(out)) << where;
        EXPECT_GE(out.min().item<double>(), 0.0) << where;
        EXPECT_LE(out.max().item<double>(), 1.0 + 1e-5) << where;
        out.sum().backward();
        EXPECT_TRUE(finite(s.grad())) << where;
        // A higher raw score never gets a lower soft score: out = exp((min(s, -a) + a) / eps) per row.
        torch::Tensor order = std::get<1>(s.detach().sort(-1));
        torch::Tensor sorted = out.detach().gather(-1, order);
        EXPECT_GE((sorted.narrow(-1, 1, n - 1) - sorted.narrow(-1, 0, n - 1)).min().item<double>(), -1e-6) << where;
      }
    }
  }
}

TEST(Extremes, CoorDescentRowWithOneUnmaskedToken) {
  torch::Tensor s = torch::randn({3, 16}) * 1e4;
  torch::Tensor mask = torch::zeros({3, 16}, torch::kBool);
  mask.index_put_({0, 5}, true);
  mask.index_put_({1, 0}, true);
  mask.index_put_({2}, true);
  for (double k : {1.0, 4.0}) {
    torch::Tensor out = colt5::coor_descent(s, k, CoorDescentOptions().eps(1e-4).eps_init(4.0).eps_decay(0.7), mask);
    ASSERT_TRUE(finite(out));
    EXPECT_TRUE(torch::equal(out.masked_select(~mask), torch::zeros({16 * 2 - 2})));
    // The single token saturates towards 1 (k >= its unmasked count).
    EXPECT_NEAR(out.index({0, 5}).item<double>(), 1.0, 1e-3);
    EXPECT_NEAR(out.index({1, 0}).item<double>(), 1.0, 1e-3);
  }
}

TEST(Extremes, CoorDescentNonFiniteScoresAreAnErrorNamingThem) {
  for (double bad : {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity()}) {
    torch::Tensor s = torch::randn({2, 8});
    s.index_put_({1, 3}, bad);
    try {
      colt5::coor_descent(s, 2.0);
      FAIL() << "non-finite score accepted: " << bad;
    } catch (const c10::Error& e) {
      const std::string what = e.what_without_backtrace();
      EXPECT_TRUE(what.find("finite") != std::string::npos || what.find("NaN") != std::string::npos) << what;
    }
    // A masked non-finite score is not used.
    torch::Tensor mask = torch::ones({2, 8}, torch::kBool);
    mask.index_put_({1, 3}, false);
    EXPECT_TRUE(finite(colt5::coor_descent(s, 2.0, {}, mask)));
  }
}

TEST(Extremes, RoutedModulesGiveFiniteOutputForExtremeFiniteInput) {
  using namespace colt5::nn;
  torch::manual_seed(5);
  auto router = RouterKwargs().eps(1e-4);
  ConditionalRoutedFeedForward ff(ConditionalRoutedFeedForwardOptions(16, 4).router_kwargs(router));
  ConditionalRoutedAttention attn(ConditionalRoutedAttentionOptions(16, 4, 4)
                                      .light_window_size(8)
                                      .light_heads(2)
                                      .light_dim_head(8)
                                      .heavy_heads(2)
                                      .heavy_dim_head(8)
                                      .router_kwargs(router));
  ff->eval();
  attn->eval();
  torch::NoGradGuard no_grad;
  for (double scale : {1e-6, 1.0, 1e4}) {
    torch::Tensor x = torch::randn({2, 24, 16}) * scale;
    torch::Tensor mask = torch::zeros({2, 24}, torch::kBool);
    mask.index_put_({0, 7}, true);  // a row with one real token
    mask.index_put_({1}, true);
    EXPECT_TRUE(finite(ff->forward(x, mask))) << scale;
    EXPECT_TRUE(finite(attn->forward(x, mask))) << scale;
    EXPECT_TRUE(finite(ff->forward(x))) << scale;
    EXPECT_TRUE(finite(attn->forward(x))) << scale;
  }
  // k = n: every token routed.
  EXPECT_TRUE(finite(ff->forward(torch::randn({1, 4, 16}) * 1e4)));
}

TEST(Concurrency, ModulesUsedFromSeveralThreadsGiveTheSerialResults) {
  using namespace colt5::nn;
  torch::manual_seed(11);
  ConditionalRoutedTransformerBlock block(ConditionalRoutedTransformerBlockOptions(32, 8, 8, 8)
                                              .light_window_size(16)
                                              .light_heads(2)
                                              .light_dim_head(16)
                                              .heavy_heads(2)
                                              .heavy_dim_head(16));
  ConditionalRoutedAutoregressiveAttention ar(ConditionalRoutedAutoregressiveAttentionOptions(32, 8, 8)
                                                  .light_window_size(16)
                                                  .light_heads(2)
                                                  .light_dim_head(16)
                                                  .heavy_heads(2)
                                                  .heavy_dim_head(16));
  block->eval();
  ar->eval();
  const int threads = 4, rounds = 3;
  std::vector<torch::Tensor> inputs, serial_block, serial_ar;
  {
    torch::NoGradGuard no_grad;
    for (int i = 0; i < threads; ++i) {
      inputs.push_back(torch::randn({2, 64, 32}));
      serial_block.push_back(block->forward(inputs.back()));
      serial_ar.push_back(ar->forward(inputs.back()));
    }
  }
  std::vector<int> mismatches(threads, 0);
  std::vector<std::thread> pool;
  for (int i = 0; i < threads; ++i)
    pool.emplace_back([&, i] {
      torch::NoGradGuard no_grad;  // thread-local
      for (int r = 0; r < rounds; ++r) {
        if (!torch::equal(block->forward(inputs[i]), serial_block[i])) ++mismatches[i];
        if (!torch::equal(ar->forward(inputs[i]), serial_ar[i])) ++mismatches[i];
      }
    });
  for (auto& t : pool) t.join();
  for (int i = 0; i < threads; ++i) EXPECT_EQ(mismatches[i], 0) << "thread " << i;
}
