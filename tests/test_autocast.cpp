// Modules under bf16 autocast (on the CPU here; the same code path as CUDA's):
// the routing math stays float32 and the results stay close to float32 ones.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "colt5/nn/conditional.h"
#include "colt5/compat.h"
#include "support/support.h"

using colt5::testing::max_rel_error;

namespace {

class CpuAutocast {
 public:
  CpuAutocast() : enabled_(colt5::compat::autocast_enabled(at::kCPU)), dtype_(colt5::compat::autocast_dtype(at::kCPU)) {
    colt5::compat::set_autocast(at::kCPU, true, at::kBFloat16);
  }
  ~CpuAutocast() {
    at::autocast::clear_cache();
    colt5::compat::set_autocast(at::kCPU, enabled_, dtype_);
  }

 private:
  bool enabled_;
  at::ScalarType dtype_;
};
}  // namespace

TEST(Autocast, TransformerBlockUnderBFloat16Autocast) {
  using namespace colt5::nn;
  torch::manual_seed(21);
  ConditionalRoutedTransformerBlock block(ConditionalRoutedTransformerBlockOptions(64, 32, 32, 32)
                                              .light_dim_head(16)
                                              .light_heads(2)
                                              .light_window_size(16)
                                              .heavy_dim_head(16)
                                              .heavy_heads(4)
                                              .num_routed_kv(2)
                                              .router_kwargs(RouterKwargs().eps(1.0)));
  torch::Tensor x = torch::randn({2, 200, 64});
  torch::Tensor mask = torch::rand({2, 200}) > 0.1;
  torch::Tensor ref = block->forward(x, mask).detach();
  torch::Tensor xa = x.clone().requires_grad_(true);
  torch::Tensor out;
  {
    CpuAutocast autocast;
    out = block->forward(xa, mask);
  }
  EXPECT_TRUE(torch::isfinite(out).all().item<bool>());
  EXPECT_LT(max_rel_error(out.detach(), ref), 0.05);
  out.to(torch::kFloat).sum().backward();
  ASSERT_TRUE(xa.grad().defined());
  EXPECT_TRUE(torch::isfinite(xa.grad()).all().item<bool>());
}

TEST(Autocast, AutoregressiveAndCrossAttentionUnderBFloat16Autocast) {
  using namespace colt5::nn;
  torch::manual_seed(22);
  ConditionalRoutedAutoregressiveAttention ar(ConditionalRoutedAutoregressiveAttentionOptions(32, 4, 24)
                                                  .light_dim_head(8)
                                                  .light_heads(2)
                                                  .light_window_size(16)
                                                  .heavy_dim_head(8)
                                                  .heavy_heads(4)
                                                  .num_routed_kv(2)
                                                  .rotary_emb(true));
  ConditionalRoutedCrossAttention cross(
      ConditionalRoutedCrossAttentionOptions(32, 16, 32).dim_head(8).heads(4).kv_routing_tokens(2));
  torch::Tensor x = torch::randn({2, 128, 32}), ctx = torch::randn({2, 300, 32});
  torch::Tensor ref_ar = ar->forward(x).detach(), ref_cross = cross->forward(x, ctx).detach();
  torch::Tensor out_ar, out_cross;
  {
    CpuAutocast autocast;
    out_ar = ar->forward(x);
    out_cross = cross->forward(x, ctx);
  }
  EXPECT_LT(max_rel_error(out_ar.detach(), ref_ar), 0.05);
  EXPECT_LT(max_rel_error(out_cross.detach(), ref_cross), 0.05);
}

// A norm that feeds a matrix product (FeedForward's, Attention's) returns the
// autocast dtype: exactly the float32 output cast as the product would cast
// it, and exactly the gradients that flow back through that cast.
TEST(Autocast, RMSNormAutocastOutputIsTheCastFloat32Output) {
  using namespace colt5::nn;
  torch::manual_seed(24);
  RMSNorm cast(RMSNormOptions(48).autocast_output(true)), plain(48);
  {
    torch::NoGradGuard no_grad;
    plain->gamma.copy_(torch::randn({48}));
    cast->gamma.copy_(plain->gamma);
  }
  torch::Tensor x = torch::randn({3, 20, 48}) * 3;
  torch::Tensor xa = x.clone().requires_grad_(true), xb = x.clone().requires_grad_(true);
  torch::Tensor a, b;
  {
    CpuAutocast autocast;
    a = cast->forward(xa);
    b = plain->forward(xb);
  }
  ASSERT_EQ(a.scalar_type(), torch::kBFloat16);
  ASSERT_EQ(b.scalar_type(), torch::kFloat);
  torch::Tensor b16 = b.to(torch::kBFloat16);
  EXPECT_TRUE(torch::equal(a, b16));
  torch::Tensor gy = torch::randn({3, 20, 48}).to(torch::kBFloat16);
  a.backward(gy);
  b16.backward(gy);
  EXPECT_TRUE(torch::equal(xa.grad(), xb.grad()));
  EXPECT_TRUE(torch::equal(cast->gamma.grad(), plain->gamma.grad()));
  // Outside autocast, and for float64, the option changes nothing.
  EXPECT_EQ(cast->forward(x).scalar_type(), torch::kFloat);
  {
    CpuAutocast autocast;
    cast->to(torch::kDouble);
    EXPECT_EQ(cast->forward(x.to(torch::kDouble)).scalar_type(), torch::kDouble);
  }
  // FeedForward's norm feeds its first projection: the feedforward's output
  // under autocast is unchanged by the option.
  FeedForward ff(FeedForwardOptions(48).mult(2));
  torch::Tensor with, without;
  {
    CpuAutocast autocast;
    with = ff->forward(x);
    ff->norm->options.autocast_output(false);
    without = ff->forward(x);
  }
  EXPECT_TRUE(torch::equal(with, without));
}

// colt5::nn::layer_norm off CUDA is torch::layer_norm; with autocast_output,
// under autocast its output is that result cast to the autocast dtype; and
// LocalMHA's fused_norm changes nothing under autocast on the CPU.
TEST(Autocast, LayerNormAutocastOutputIsTheCastOutput) {
  using namespace colt5::nn;
  torch::manual_seed(25);
  torch::nn::LayerNorm ln(torch::nn::LayerNormOptions({40}));
  {
    torch::NoGradGuard no_grad;
    ln->weight.copy_(torch::randn({40}));
    ln->bias.copy_(torch::randn({40}));
  }
  torch::Tensor x = torch::randn({3, 9, 40}) * 2 + 1;
  EXPECT_TRUE(torch::equal(layer_norm(x, ln->weight, ln->bias, 1e-5), ln->forward(x)));
  torch::Tensor a, b;
  {
    CpuAutocast autocast;
    a = layer_norm(x, ln->weight, ln->bias, 1e-5, /*autocast_output=*/true);
    b = ln->forward(x);
  }
  ASSERT_EQ(a.scalar_type(), torch::kBFloat16);
  EXPECT_TRUE(torch::equal(a, b.to(torch::kBFloat16)));
  LocalMHA mha(LocalMHAOptions(40, 8).dim_head(8).heads(2).prenorm(true).use_rotary_pos_emb(false));
  torch::Tensor with, without;
  {
    CpuAutocast autocast;
    with = mha->forward(x);
    mha->options.fused_norm(false);
    without = mha->forward(x);
  }
  EXPECT_TRUE(torch::equal(with, without));
}
