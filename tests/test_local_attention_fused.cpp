// LocalMHA's fused attention path (float32, bf16) against its explicit float64
// path, which the golden cases and the naive tests pin to the reference.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>
#include <vector>

#include "colt5/compat.h"
#include "colt5/nn/local_attention.h"
#include "support/support.h"

using colt5::testing::graph_has;
using colt5::testing::max_rel_error;

namespace {

using namespace colt5::nn;

}  // namespace

TEST(LocalAttentionFused, Float32AgreesWithFloat64InEveryConfiguration) {
  torch::manual_seed(41);
  struct Config {
    bool causal;
    int64_t look_forward;
    bool exact;
    bool xpos;
  };
  for (Config c : {Config{false, 1, true, false}, Config{true, 0, false, false}, Config{true, 0, true, true},
                   Config{false, 0, false, false}}) {
    SCOPED_TRACE(std::to_string(c.causal) + std::to_string(c.look_forward) + std::to_string(c.exact));
    LocalMHA attn(LocalMHAOptions(32, 8)
                      .dim_head(8)
                      .heads(4)
                      .causal(c.causal)
                      .prenorm(true)
                      .look_forward(c.look_forward)
                      .exact_windowsize(c.exact)
                      .use_xpos(c.xpos));
    for (int64_t n : {8, 29, 64}) {
      torch::Tensor x = torch::randn({2, n, 32});
      torch::Tensor mask = torch::rand({2, n}) > 0.2;
      mask[1].fill_(false);  // a fully padded row
      torch::Tensor x32 = x.clone().requires_grad_(true);
      torch::Tensor out32 = attn->forward(x32, mask);
      auto attn64 = std::dynamic_pointer_cast<LocalMHAImpl>(attn->clone());
      attn64->to(torch::kDouble);
      torch::Tensor x64 = x.to(torch::kDouble).requires_grad_(true);
      torch::Tensor out64 = attn64->forward(x64, mask);
      EXPECT_TRUE(torch::isfinite(out32).all().item<bool>());
      EXPECT_LT(max_rel_error(out32, out64), 1e-5) << "n " << n;
      torch::Tensor g = torch::randn_like(out64);
      out32.backward(g.to(torch::kFloat));
      out64.backward(g);
      EXPECT_LT(max_rel_error(x32.grad(), x64.grad()), 1e-4) << "n " << n;
      // Without a mask too.
      EXPECT_LT(max_rel_error(attn->forward(x), attn64->forward(x.to(torch::kDouble))), 1e-5) << "n " << n;
    }
  }
}

TEST(LocalAttentionFused, BFloat16StaysFiniteWithAFullyPaddedRow) {
  torch::manual_seed(42);
  LocalMHA attn(LocalMHAOptions(32, 8).dim_head(8).heads(4).prenorm(true).look_forward(1));
  torch::Tensor x = torch::randn({2, 40, 32});
  torch::Tensor mask = torch::ones({2, 40}, torch::kBool);
  mask[0].fill_(false);
  torch::Tensor ref = attn->forward(x, mask);
  attn->to(torch::kBFloat16);
  torch::Tensor xb = x.to(torch::kBFloat16).requires_grad_(true);
  torch::Tensor out = attn->forward(xb, mask);
  EXPECT_TRUE(torch::isfinite(out.to(torch::kFloat)).all().item<bool>());
  EXPECT_LT(max_rel_error(out, ref), 5e-2);
  // The blind queries' gradients (through the average of their values) are
  // finite.
  out.sum().backward();
  EXPECT_TRUE(torch::isfinite(xb.grad().to(torch::kFloat)).all().item<bool>());
}

// Without a key mask or rotary embedding, block-aligned windows attend over
// contiguous ranges of the sequence with no mask at all (edge windows over the
// part of their look-around that exists). Forward and backward against the
// float64 path, for one window, two, many, ragged lengths and wider look-arounds.
TEST(LocalAttentionFused, UnmaskedWindowsAgreeWithFloat64) {
  torch::manual_seed(43);
  struct Config {
    int64_t look_backward, look_forward;
  };
  for (Config c : {Config{1, 1}, Config{1, 0}, Config{2, 1}, Config{0, 2}}) {
    LocalMHA attn(LocalMHAOptions(32, 8)
                      .dim_head(8)
                      .heads(4)
                      .prenorm(true)
                      .look_backward(c.look_backward)
                      .look_forward(c.look_forward)
                      .use_rotary_pos_emb(false));
    auto attn64 = std::dynamic_pointer_cast<LocalMHAImpl>(attn->clone());
    attn64->to(torch::kDouble);
    for (int64_t n : {5, 8, 16, 29, 64}) {
      SCOPED_TRACE("back " + std::to_string(c.look_backward) + " forward " + std::to_string(c.look_forward) + " n " +
                   std::to_string(n));
      torch::Tensor x = torch::randn({2, n, 32});
      torch::Tensor x32 = x.clone().requires_grad_(true);
      torch::Tensor x64 = x.to(torch::kDouble).requires_grad_(true);
      torch::Tensor out32 = attn->forward(x32), out64 = attn64->forward(x64);
      EXPECT_LT(max_rel_error(out32, out64), 1e-5);
      torch::Tensor g = torch::randn_like(out64);
      out32.backward(g.to(torch::kFloat));
      out64.backward(g);
      EXPECT_LT(max_rel_error(x32.grad(), x64.grad()), 1e-4);
      attn->zero_grad();
      attn64->zero_grad();
    }
  }
}

// LocalMHA's causal windows of one look-back as two flash calls on views of
// the projection merged by their log-sum-exps (split_causal_windows; on the
// CPU LibTorch's flash kernel) against the look-around windows: float64 to
// 1e-12 and float32 to 1e-5, the output and the gradients of x and both
// projections; one and three sequences (a sequence's first window must not
// see the one before it), 2 to 8 windows, heads 8 and 6 wide. A length that
// is not a multiple of the window, rotary embedding or a mask keep the
// look-around windows (as does LibTorch 1.13, which has no flash kernel).
TEST(LocalAttentionFused, SplitCausalWindowsMatchTheLookAroundWindows) {
  torch::manual_seed(44);
  for (int64_t dh : {8, 6}) {
    for (bool rotary : {false, true}) {
      LocalMHA attn(LocalMHAOptions(32, 8)
                        .dim_head(dh)
                        .heads(4)
                        .causal(true)
                        .prenorm(true)
                        .exact_windowsize(false)
                        .use_rotary_pos_emb(rotary));
      for (auto dtype : {torch::kDouble, torch::kFloat}) {
        for (int64_t b : {1, 3}) {
          for (int64_t n : {16, 40, 64, 29}) {
            for (bool masked : {false, true}) {
              SCOPED_TRACE("dh " + std::to_string(dh) + " rotary " + std::to_string(rotary) + " dtype " +
                           std::string(c10::toString(dtype)) + " b " + std::to_string(b) + " n " + std::to_string(n) +
                           " masked " + std::to_string(masked));
              torch::Tensor x = torch::randn({b, n, 32}, dtype), g = torch::randn({b, n, 32}, dtype);
              torch::Tensor mask = masked ? torch::rand({b, n}) > 0.2 : torch::Tensor();
              const double tol = dtype == torch::kDouble ? 1e-12 : 1e-5;
              std::vector<torch::Tensor> got[2];
              for (bool split : {false, true}) {
                auto m = std::dynamic_pointer_cast<LocalMHAImpl>(attn->clone());
                m->to(dtype);
                m->options.split_causal_windows(split);
                torch::Tensor xs = x.clone().requires_grad_(true);
                torch::Tensor out = m->forward(xs, mask);
                const bool takes = COLT5_HAS_SDPA && split && !rotary && !masked && n % 8 == 0;
                EXPECT_EQ(graph_has(out, "CausalWindowsFunction"), takes);
                out.backward(g);
                got[split] = {out, xs.grad(), m->to_qkv->weight.grad(), m->to_out->weight.grad()};
              }
              {
                // The default (nullopt) on the CPU splits where gradients are
                // recorded and keeps the look-around windows for a forward alone.
                auto m = std::dynamic_pointer_cast<LocalMHAImpl>(attn->clone());
                m->to(dtype);
                EXPECT_FALSE(m->options.split_causal_windows().has_value());
                const bool takes = COLT5_HAS_SDPA && !rotary && !masked && n % 8 == 0;
                torch::Tensor out = m->forward(x.clone().requires_grad_(true), mask);
                EXPECT_EQ(graph_has(out, "CausalWindowsFunction"), takes);
                EXPECT_LT(max_rel_error(out, got[0][0]), tol);
                torch::NoGradGuard no_grad;
                torch::Tensor inferred = m->forward(x, mask);
                EXPECT_LT(max_rel_error(inferred, got[0][0]), tol);
              }
              for (size_t i = 0; i < got[0].size(); ++i)
                EXPECT_LT(max_rel_error(got[1][i], got[0][i]), i == 0 ? tol : 10 * tol) << "tensor " << i;
            }
          }
        }
      }
    }
  }
}

// The masks LocalAttention keeps between calls are rebuilt when the length,
// device, stream or inference mode changes: a call under c10::InferenceMode
// (inference tensors, which autograd may not save) followed by training calls
// at other lengths, with and without a mask, in both paths.
TEST(LocalAttentionFused, KeptMasksFollowTheLengthAndInferenceMode) {
  torch::manual_seed(44);
  for (auto dtype : {torch::kFloat, torch::kDouble}) {
    for (bool exact : {false, true}) {
      SCOPED_TRACE(std::string(dtype == torch::kFloat ? "float32" : "float64") + (exact ? " exact" : ""));
      LocalMHA attn(LocalMHAOptions(32, 8).dim_head(8).heads(4).prenorm(true).exact_windowsize(exact));
      attn->to(dtype);
      for (int64_t n : {24, 40, 24}) {
        torch::Tensor x = torch::randn({2, n, 32}, dtype);
        torch::Tensor mask = torch::rand({2, n}) > 0.3;
        {
          c10::InferenceMode guard;
          attn->forward(x, mask);
          attn->forward(x);
        }
        for (bool masked : {true, false}) {
          auto fresh = std::dynamic_pointer_cast<LocalMHAImpl>(attn->clone());  // nothing kept
          torch::Tensor xg = x.clone().requires_grad_(true);
          torch::Tensor out;
          ASSERT_NO_THROW(out = masked ? attn->forward(xg, mask) : attn->forward(xg)) << "n " << n;
          ASSERT_NO_THROW(out.sum().backward()) << "n " << n;
          torch::Tensor xf = x.clone().requires_grad_(true);
          torch::Tensor want = masked ? fresh->forward(xf, mask) : fresh->forward(xf);
          want.sum().backward();
          EXPECT_EQ(max_rel_error(out, want), 0.0) << "n " << n << (masked ? " masked" : "");
          EXPECT_EQ(max_rel_error(xg.grad(), xf.grad()), 0.0) << "n " << n << (masked ? " masked" : "");
        }
      }
    }
  }
}
