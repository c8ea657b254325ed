// Numerical extremes on the GPU, as tests/test_extremes.cpp checks them on the
// CPU: coordinate descent with scores up to 1e4 in magnitude, eps down to
// 1e-4, k = 1 and k = n, a row with one unmasked token, in every CUDA kernel
// and against the CPU; NaN/Inf scores make their row NaN; the routed modules finite for
// extreme finite input in float32 and under bf16 autocast.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <string>

#include "colt5/colt5.h"
#include "colt5/compat.h"

namespace {

using colt5::CoorDescentOptions;

bool finite(const torch::Tensor& t) { return torch::isfinite(t).all().item<bool>(); }
const torch::Device kCuda(torch::kCUDA, 0);

}  // namespace

TEST(ExtremesCuda, CoorDescentLargeScoresSmallEpsEveryKAndKernel) {
  torch::manual_seed(3);
  const int64_t n = 512;
  for (const char* kernel : {"warp", "block", "cluster", "grid"}) {
    for (double scale : {1.0, 1e2, 1e4}) {
      for (double eps : {1e-1, 1e-4}) {
        for (int64_t k : {int64_t{1}, int64_t{37}, n}) {
          const std::string where = std::string(kernel) + " scale " + std::to_string(scale) + " eps " +
                                    std::to_string(eps) + " k " + std::to_string(k);
          torch::Tensor s = torch::randn({8, n}) * scale;
          auto opts = CoorDescentOptions().n_iters(50).eps(eps).eps_init(4.0).eps_decay(0.7).cuda_kernel(kernel);
          torch::Tensor sc = s.to(kCuda).requires_grad_(true);
          torch::Tensor out = colt5::coor_descent(sc, static_cast<double>(k), opts);
          ASSERT_TRUE(finite(out)) << where;
          EXPECT_GE(out.min().item<double>(), 0.0) << where;
          EXPECT_LE(out.max().item<double>(), 1.0 + 1e-5) << where;
          out.sum().backward();
          EXPECT_TRUE(finite(sc.grad())) << where;
          // Monotone in the raw score, as on the CPU.
          torch::Tensor order = std::get<1>(s.sort(-1)).to(kCuda);
          torch::Tensor sorted = out.detach().gather(-1, order);
          EXPECT_GE((sorted.narrow(-1, 1, n - 1) - sorted.narrow(-1, 0, n - 1)).min().item<double>(), -1e-5) << where;
          // The CPU computes the same (float32 sums in another order).
          torch::Tensor cpu = colt5::coor_descent(s, static_cast<double>(k), opts);
          EXPECT_LE((out.detach().cpu() - cpu).abs().max().item<double>(), 2e-3) << where;
        }
      }
    }
  }
}

TEST(ExtremesCuda, CoorDescentRowWithOneUnmaskedToken) {
  torch::Tensor s = (torch::randn({3, 300}) * 1e4).to(kCuda);
  torch::Tensor mask = torch::zeros({3, 300}, torch::TensorOptions().dtype(torch::kBool).device(kCuda));
  mask.index_put_({0, 5}, true);
  mask.index_put_({1, 299}, true);
  mask.index_put_({2}, true);
  for (double k : {1.0, 4.0}) {
    torch::Tensor out =
        colt5::coor_descent(s, k, CoorDescentOptions().eps(1e-4).eps_init(4.0).eps_decay(0.7), mask).cpu();
    ASSERT_TRUE(finite(out));
    EXPECT_EQ(out.index({0}).sum().item<double>(), out.index({0, 5}).item<double>());
    EXPECT_NEAR(out.index({0, 5}).item<double>(), 1.0, 1e-3);
    EXPECT_NEAR(out.index({1, 299}).item<double>(), 1.0, 1e-3);
  }
}

// On CUDA a check would cost a host synchronization (and break CUDA graph
// capture), so a non-finite unmasked score is not an error there: its row's
// output and gradients are NaN throughout (never a plausible-looking number),
// and the other rows are untouched. Every kernel does the same.
TEST(ExtremesCuda, CoorDescentNonFiniteScoresMakeTheirRowNaN) {
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  for (const char* kernel : {"warp", "block", "cluster", "grid"}) {
    for (double bad : {nan, inf, -inf}) {
      const std::string where = std::string(kernel) + " " + std::to_string(bad);
      torch::Tensor s = torch::randn({3, 300});
      s.index_put_({1, 3}, bad);
      torch::Tensor sc = s.to(kCuda).requires_grad_(true);
      auto opts = CoorDescentOptions().cuda_kernel(kernel);
      torch::Tensor out = colt5::coor_descent(sc, 2.0, opts);
      (out * torch::arange(300, out.options())).sum().backward();
      torch::Tensor y = out.detach().cpu(), g = sc.grad().cpu();
      EXPECT_TRUE(torch::isnan(y.index({1})).all().item<bool>()) << where;
      EXPECT_TRUE(torch::isnan(g.index({1})).all().item<bool>()) << where;
      for (int64_t r : {0, 2}) {
        EXPECT_TRUE(finite(y.index({r}))) << where;
        EXPECT_TRUE(finite(g.index({r}))) << where;
        EXPECT_LE((y.index({r}) - colt5::coor_descent(s.index({torch::indexing::Slice(r, r + 1)}), 2.0)[0])
                      .abs()
                      .max()
                      .item<double>(),
                  1e-5)
            << where;
      }
      // A masked non-finite score is not used.
      torch::Tensor mask = torch::ones({3, 300}, torch::TensorOptions().dtype(torch::kBool));
      mask.index_put_({1, 3}, false);
      EXPECT_TRUE(finite(colt5::coor_descent(s.to(kCuda), 2.0, opts, mask.to(kCuda)))) << where;
    }
  }
  // The CPU refuses the same input with an error naming it.
  torch::Tensor s = torch::randn({2, 300});
  s.index_put_({1, 3}, nan);
  EXPECT_THROW(colt5::coor_descent(s, 2.0), c10::Error);
}

TEST(ExtremesCuda, RoutedModulesGiveFiniteOutputForExtremeFiniteInput) {
  using namespace colt5::nn;
  torch::manual_seed(5);
  auto router = RouterKwargs().eps(1e-4);
  ConditionalRoutedFeedForward ff(ConditionalRoutedFeedForwardOptions(64, 16).router_kwargs(router));
  ConditionalRoutedAttention attn(ConditionalRoutedAttentionOptions(64, 16, 16)
                                      .light_window_size(16)
                                      .light_heads(2)
                                      .light_dim_head(32)
                                      .heavy_heads(2)
                                      .heavy_dim_head(32)
                                      .router_kwargs(router));
  ff->to(kCuda);
  attn->to(kCuda);
  for (bool bf16 : {false, true}) {
    for (double scale : {1e-6, 1.0, 1e4}) {
      const std::string where = std::string(bf16 ? "bf16 " : "fp32 ") + std::to_string(scale);
      torch::Tensor x = (torch::randn({2, 96, 64}) * scale).to(kCuda).requires_grad_(true);
      torch::Tensor mask = torch::zeros({2, 96}, torch::TensorOptions().dtype(torch::kBool).device(kCuda));
      mask.index_put_({0, 7}, true);  // a row with one real token
      mask.index_put_({1}, true);
      colt5::compat::set_autocast(at::kCUDA, bf16, at::kBFloat16);
      torch::Tensor a = attn->forward(x, mask), f = ff->forward(x, mask);
      torch::Tensor a2 = attn->forward(x), f2 = ff->forward(x);
      colt5::compat::set_autocast(at::kCUDA, false, at::kBFloat16);
      at::autocast::clear_cache();
      EXPECT_TRUE(finite(a)) << where;
      EXPECT_TRUE(finite(f)) << where;
      EXPECT_TRUE(finite(a2)) << where;
      EXPECT_TRUE(finite(f2)) << where;
      (a.to(torch::kFloat).sum() + f.to(torch::kFloat).sum()).backward();
      EXPECT_TRUE(finite(x.grad())) << where;
    }
  }
}
