// Routed modules: masks, short and odd lengths, routes and blocks, dtypes,
// tie-breaks, state files, JSON configs and bad input.
#include <gtest/gtest.h>

#include <sstream>
#include <torch/torch.h>

#include <filesystem>
#include <functional>
#include <string>
#include <unistd.h>

#include "colt5/compat.h"
#include "colt5/nn/conditional.h"
#include "colt5/nn/image.h"
#include "colt5/nn/router.h"
#include "colt5/nn/state.h"
#include "nn/heavy_branch.h"
#include "support/support.h"

using colt5::testing::error_message;
using colt5::testing::max_rel_error;

namespace {

using namespace colt5::nn;

RouterKwargs smooth_router() { return RouterKwargs().eps(1.0).eps_init(4.0).eps_decay(0.7); }

torch::Tensor bool_ones(int64_t b, int64_t n) { return torch::ones({b, n}, torch::kBool); }
// Runs f and returns its error message ("" when it did not throw).
std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() / (name + "_" + std::to_string(::getpid()) + ".safetensors")).string();
}

ConditionalRoutedAttentionOptions small_attn(int64_t q = 16, int64_t kv = 24) {
  return ConditionalRoutedAttentionOptions(32, q, kv)
      .light_dim_head(8)
      .light_heads(2)
      .light_window_size(16)
      .heavy_dim_head(8)
      .heavy_heads(4)
      .router_kwargs(smooth_router());
}

ConditionalRoutedTransformerBlockOptions small_block() {
  return ConditionalRoutedTransformerBlockOptions(32, 16, 24, 20)
      .light_dim_head(8)
      .light_heads(2)
      .light_window_size(16)
      .heavy_dim_head(8)
      .heavy_heads(4)
      .router_kwargs(smooth_router());
}

// ------------------------------------------------------------------ masks

TEST(ConditionalMask, PaddedPositionsDoNotChangeRealOnesAndFullyPaddedRowIsFinite) {
  torch::manual_seed(0);
  ConditionalRoutedAttention attn(small_attn());
  ConditionalRoutedFeedForward ff(ConditionalRoutedFeedForwardOptions(32, 16).router_kwargs(smooth_router()));
  auto x = torch::randn({3, 64, 32});
  auto mask = bool_ones(3, 64);
  mask[0].slice(0, 40).fill_(false);  // row 0: 40 real tokens
  mask[2].fill_(false);               // row 2: all padding
  auto x2 = x.clone();
  x2.masked_scatter_(~mask.unsqueeze(-1).expand_as(x2), torch::randn({3, 64, 32}) * 10);

  for (auto* name : {"attention", "feedforward"}) {
    SCOPED_TRACE(name);
    auto run = [&](const torch::Tensor& in) {
      return std::string(name) == "attention" ? attn(in, mask) : ff(in, mask);
    };
    auto a = run(x), b = run(x2);
    EXPECT_TRUE(torch::isfinite(a).all().item<bool>());
    // Real tokens of rows 0 and 1 see only real tokens.
    EXPECT_LT(max_rel_error(b[0].slice(0, 0, 40), a[0].slice(0, 0, 40)), 1e-5);
    EXPECT_LT(max_rel_error(b[1], a[1]), 1e-5);
  }

  auto xg = x.clone().requires_grad_(true);
  ConditionalRoutedTransformerBlock block(small_block());
  block(xg, mask).sum().backward();
  EXPECT_TRUE(torch::isfinite(xg.grad()).all().item<bool>());
}

TEST(ConditionalMask, RouterSelectsRealTokensFirstAndZeroesPaddedScores) {
  torch::manual_seed(1);
  CoordinateDescentRouter router(CoordinateDescentRouterOptions(16).eps(1.0));
  auto x = torch::randn({2, 40, 16});
  auto mask = bool_ones(2, 40);
  mask[0].slice(0, 5).fill_(false);  // 5 real tokens, 8 routed
  auto r = router(x, 8, mask);
  ASSERT_TRUE(r.indices.defined());
  EXPECT_TRUE(r.routed_mask[0].slice(0, 0, 5).all().item<bool>());
  EXPECT_FALSE(r.routed_mask[0].slice(0, 5).any().item<bool>());
  EXPECT_TRUE(r.indices[0].slice(0, 0, 5).lt(5).all().item<bool>());
  EXPECT_TRUE(r.scores[0].slice(0, 5).eq(0).all().item<bool>());
  EXPECT_TRUE(r.scores[1].eq(1).all().item<bool>());
}

// -------------------------------------------------- short and odd lengths

TEST(ConditionalShort, NoRoutingWhenSequenceFitsMeansDenseHeavyBranch) {
  torch::manual_seed(2);
  auto x = torch::randn({2, 12, 32}, torch::kFloat64);
  ConditionalRoutedFeedForward ff(ConditionalRoutedFeedForwardOptions(32, 12));
  ff->to(torch::kFloat64);
  EXPECT_LT(max_rel_error(ff(x), ff->light_ff(x) + ff->heavy_ff(x)), 1e-12);

  ConditionalRoutedAttention attn(small_attn(12, 12));
  attn->to(torch::kFloat64);
  auto want = attn->light_attn(x) + attn->heavy_attn(x, x, torch::Tensor(), torch::ones({2, 12}, torch::kFloat64));
  EXPECT_LT(max_rel_error(attn(x), want), 1e-12);

  auto r = attn->q_router(x, 12);
  EXPECT_FALSE(r.indices.defined());
  EXPECT_TRUE(r.scores.eq(1).all().item<bool>());
  EXPECT_EQ(r.scores.sizes(), (std::vector<int64_t>{2, 12}));
}

TEST(ConditionalShort, OddLengthsKeepTheirShape) {
  torch::manual_seed(3);
  ConditionalRoutedAttention attn(small_attn());
  for (int64_t n : {1, 17, 37, 101}) {
    auto out = attn(torch::randn({2, n, 32}));
    EXPECT_EQ(out.sizes(), (std::vector<int64_t>{2, n, 32}));
    EXPECT_TRUE(torch::isfinite(out).all().item<bool>());
  }
  ConditionalRoutedAutoregressiveAttention ar(ConditionalRoutedAutoregressiveAttentionOptions(32, 4, 24)
                                                  .light_dim_head(8)
                                                  .light_heads(2)
                                                  .light_window_size(16)
                                                  .heavy_dim_head(8)
                                                  .heavy_heads(4)
                                                  .num_routed_kv(2)
                                                  .rotary_emb(true)
                                                  .router_kwargs(smooth_router()));
  for (int64_t n : {5, 16, 17, 100}) {
    auto x = torch::randn({2, n, 32});
    auto out = ar(x);
    EXPECT_EQ(out.sizes(), (std::vector<int64_t>{2, n, 32}));
    EXPECT_TRUE(torch::isfinite(out).all().item<bool>());
    // The first window has only the light branch.
    const int64_t w = std::min<int64_t>(n, 16);
    EXPECT_LT(max_rel_error(out.slice(1, 0, w), ar->light_attn(x).slice(1, 0, w)), 1e-6);
  }
}

// The autoregressive module's kv router routes its windows in groups over the
// prefixes they see (kv_route_groups): any grouping gives the same output and
// gradients, with rotary embeddings and several routes, at odd lengths.
TEST(ConditionalAutoregressive, KvRouteGroupsGiveTheSameOutput) {
  torch::manual_seed(12);
  ConditionalRoutedAutoregressiveAttention ar(ConditionalRoutedAutoregressiveAttentionOptions(16, 6, 20)
                                                  .light_dim_head(8)
                                                  .light_heads(2)
                                                  .light_window_size(12)
                                                  .heavy_dim_head(8)
                                                  .heavy_heads(4)
                                                  .num_routed_kv(2)
                                                  .rotary_emb(true)
                                                  .router_kwargs(smooth_router()));
  ar->to(torch::kFloat64);
  for (int64_t n : {100, 131}) {
    SCOPED_TRACE(n);
    const torch::Tensor x = torch::randn({2, n, 16}, torch::kFloat64);
    ar->kv_route_groups = 1;
    torch::Tensor x1 = x.clone().requires_grad_(true);
    torch::Tensor want = ar(x1);
    want.pow(2).sum().backward();
    for (int64_t groups : {0, 2, 3, 5, 50}) {
      SCOPED_TRACE(groups);
      ar->kv_route_groups = groups;
      torch::Tensor xg = x.clone().requires_grad_(true);
      torch::Tensor got = ar(xg);
      EXPECT_LT(max_rel_error(got, want), 1e-12);
      got.pow(2).sum().backward();
      EXPECT_LT(max_rel_error(xg.grad(), x1.grad()), 1e-10);
    }
  }
  ar->kv_route_groups = -1;
  try {
    ar(torch::randn({1, 40, 16}, torch::kFloat64));
    ADD_FAILURE() << "no error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("kv_route_groups"), std::string::npos) << e.what();
  }
  ar->kv_route_groups = 0;
}

// ------------------------------------------------------ routes and blocks

TEST(ConditionalRoutes, SeveralRoutesGatherFromTheirOwnBatchRow) {
  torch::manual_seed(4);
  CoordinateDescentRouter router(CoordinateDescentRouterOptions(16).num_routing_tokens(3).eps(1.0));
  auto x = torch::randn({4, 50, 16});
  auto r = router(x, 6);
  ASSERT_EQ(r.indices.sizes(), (std::vector<int64_t>{4, 3, 6}));
  ASSERT_EQ(r.routed_tokens.sizes(), (std::vector<int64_t>{4, 3, 6, 16}));
  for (int64_t b = 0; b < 4; ++b)
    for (int64_t route = 0; route < 3; ++route)
      EXPECT_TRUE(torch::equal(r.routed_tokens[b][route], x[b].index_select(0, r.indices[b][route])));
  // Routes differ (their routing tokens differ).
  EXPECT_FALSE(torch::equal(r.indices.select(1, 0), r.indices.select(1, 1)));
}

TEST(ConditionalRoutes, RouteBlocksWithATailRouteEvenlyFromWholeBlocks) {
  torch::manual_seed(5);
  CoordinateDescentRouter router(
      CoordinateDescentRouterOptions(16).num_routing_tokens(2).route_block_size(32).eps(1.0));
  auto x = torch::randn({3, 100, 16});  // 3 whole blocks and a tail of 4
  auto mask = bool_ones(3, 100);
  mask[1].slice(0, 90).fill_(false);
  auto r = router(x, 8, mask);  // ceil(8 / 3) = 3 per block
  ASSERT_EQ(r.indices.sizes(), (std::vector<int64_t>{3, 2, 9}));
  for (int64_t blk = 0; blk < 3; ++blk) {
    auto part = r.indices.slice(2, blk * 3, blk * 3 + 3);
    EXPECT_TRUE(part.ge(blk * 32).all().item<bool>());
    EXPECT_TRUE(part.lt(blk * 32 + 32).all().item<bool>());
  }
  for (int64_t b = 0; b < 3; ++b)
    for (int64_t route = 0; route < 2; ++route) {
      EXPECT_TRUE(torch::equal(r.routed_tokens[b][route], x[b].index_select(0, r.indices[b][route])));
      EXPECT_TRUE(torch::equal(r.routed_mask[b][route], mask[b].index_select(0, r.indices[b][route])));
    }
}

TEST(ConditionalRoutes, CrossAttentionWithRoutesAndBlocksRuns) {
  torch::manual_seed(6);
  ConditionalRoutedCrossAttention cross(ConditionalRoutedCrossAttentionOptions(32, 16, 32)
                                            .dim_head(8)
                                            .heads(4)
                                            .kv_routing_tokens(2)
                                            .route_block_size(64)
                                            .router_kwargs(smooth_router()));
  auto x = torch::randn({2, 40, 32}, torch::requires_grad());
  auto ctx = torch::randn({2, 300, 32}, torch::requires_grad());
  auto out = cross(x, ctx);
  EXPECT_EQ(out.sizes(), x.sizes());
  out.sum().backward();
  EXPECT_TRUE(torch::isfinite(ctx.grad()).all().item<bool>());
  // Unrouted queries get the null query token.
  auto r = cross->q_router(x, 16);
  auto routed = torch::zeros({2, 40}, torch::kBool).scatter(1, r.indices, true);
  auto unrouted = out.detach()[0].index({~routed[0]});
  EXPECT_TRUE(torch::allclose(unrouted, cross->null_q_token.detach().expand_as(unrouted)));
  // Short queries are not routed: every query gets the heavy output.
  auto short_out = cross(torch::randn({2, 10, 32}), ctx);
  EXPECT_EQ(short_out.sizes(), (std::vector<int64_t>{2, 10, 32}));
}

// ---------------------------------------------------------------- dtypes

TEST(ConditionalDtype, Float32AgreesWithFloat64) {
  torch::manual_seed(7);
  ConditionalRoutedTransformerBlock block(small_block());
  auto x = torch::randn({2, 90, 32});
  auto mask = bool_ones(2, 90);
  mask[1].slice(0, 70).fill_(false);
  auto out32 = block(x, mask);
  block->to(torch::kFloat64);
  auto out64 = block(x.to(torch::kFloat64), mask);
  EXPECT_EQ(out32.scalar_type(), torch::kFloat32);
  EXPECT_LT(max_rel_error(out32, out64), 1e-4);
}

TEST(ConditionalDtype, ReducedPrecisionBlockRunsAndAgrees) {
  torch::manual_seed(12);
  ConditionalRoutedTransformerBlock block(small_block());
  auto x = torch::randn({2, 90, 32});
  auto out32 = block(x);
  // LibTorch 1.13 has no float16 matrix products on the CPU.
  std::vector<torch::ScalarType> dtypes = {torch::kBFloat16};
  if (COLT5_TORCH2) dtypes.push_back(torch::kFloat16);
  for (auto dtype : dtypes) {
    auto low = std::dynamic_pointer_cast<ConditionalRoutedTransformerBlockImpl>(block->clone());
    low->to(dtype);
    auto xl = x.to(dtype).requires_grad_(true);
    auto out = low->forward(xl);
    EXPECT_EQ(out.scalar_type(), dtype);
    // A token near the routing threshold may be routed differently, so compare in norm.
    const double norm_err = ((out.to(torch::kFloat32) - out32).norm() / out32.norm()).item<double>();
    EXPECT_LT(norm_err, dtype == torch::kBFloat16 ? 2e-2 : 5e-3) << dtype;
    out.sum().backward();
    EXPECT_TRUE(torch::isfinite(xl.grad()).all().item<bool>()) << dtype;
  }
}

// ------------------------------------------------------------- tie-break

TEST(ConditionalTieBreak, SaturatedScoresFollowTheRawRoutingScoreOnEveryRun) {
  torch::manual_seed(8);
  // eps = 0.03 saturates many scores at exactly 1.
  CoordinateDescentRouter router(CoordinateDescentRouterOptions(16));
  auto x = torch::randn({2, 256, 16});
  auto first = router(x, 32);
  auto s = torch::matmul(x, router->routing_token.detach().t()).squeeze(-1);
  auto by_score = std::get<1>(s.topk(32, -1));
  EXPECT_TRUE(torch::equal(first.indices, by_score));
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(torch::equal(router(x, 32).indices, first.indices));
}

// ---------------------------------------------------------------- state

TEST(ConditionalState, SaveLoadRoundTrip) {
  torch::manual_seed(9);
  ConditionalRoutedAttention a(small_attn().rotary_emb(true));
  ConditionalRoutedAttention b(small_attn().rotary_emb(true));
  const auto path = temp_path("colt5_attn_state");
  save_state(*a, path);
  auto x = torch::randn({2, 50, 32});
  EXPECT_FALSE(torch::allclose(a(x), b(x)));
  load_state(*b, path);
  EXPECT_TRUE(torch::equal(a(x), b(x)));
  auto names = state_dict(*b);
  bool has_inv_freq = false, has_to_kv = false;
  for (const auto& [name, t] : names) {
    has_inv_freq |= name == "rotary_emb.inv_freq";
    has_to_kv |= name == "heavy_attn.to_kv.weight";
  }
  EXPECT_TRUE(has_inv_freq);
  EXPECT_TRUE(has_to_kv);
  std::filesystem::remove(path);
}

TEST(ConditionalState, LoadErrorsNameTheKeys) {
  ConditionalRoutedAttention with_null(small_attn());
  ConditionalRoutedAttention without_null(small_attn().use_null_q_tokens(false));
  ConditionalRoutedAttention wider(ConditionalRoutedAttentionOptions(48, 16, 24)
                                       .light_dim_head(8)
                                       .light_heads(2)
                                       .light_window_size(16)
                                       .heavy_dim_head(8)
                                       .heavy_heads(4));
  const auto path_with = temp_path("colt5_with_null"), path_without = temp_path("colt5_without_null");
  save_state(*with_null, path_with);
  save_state(*without_null, path_without);

  auto missing = error_message([&] { load_state(*with_null, path_without); });
  EXPECT_NE(missing.find("missing keys: null_q_token"), std::string::npos) << missing;
  auto unexpected = error_message([&] { load_state(*without_null, path_with); });
  EXPECT_NE(unexpected.find("unexpected keys: null_q_token"), std::string::npos) << unexpected;
  EXPECT_EQ(error_message([&] { load_state(*without_null, path_with, /*strict=*/false); }), "");
  auto shape = error_message([&] { load_state(*wider, path_with); });
  EXPECT_NE(shape.find("shape mismatch: null_q_token"), std::string::npos) << shape;
  EXPECT_NE(shape.find(path_with), std::string::npos) << shape;
  std::filesystem::remove(path_with);
  std::filesystem::remove(path_without);
}

TEST(ConditionalState, BuildFromJsonConfig) {
  auto m = build_module("ConditionalRoutedTransformerBlock",
                        R"({"dim": 32, "num_heavy_attn_tokens_q": 16, "num_heavy_attn_tokens_kv": 24,
                            "num_heavy_ff_tokens": 20, "light_dim_head": 8, "light_heads": 2,
                            "light_window_size": 16, "heavy_dim_head": 8, "heavy_heads": 4,
                            "router_kwargs": {"eps": 1.0, "eps_init": 4.0, "eps_decay": 0.7}})");
  EXPECT_EQ(m.kind(), "ConditionalRoutedTransformerBlock");
  auto out = m.call({torch::randn({2, 40, 32})}, {}, R"({"num_heavy_ff_tokens": 8})");
  EXPECT_EQ(out.outputs.at("out").sizes(), (std::vector<int64_t>{2, 40, 32}));
  auto named = m.module()->named_parameters();
  EXPECT_TRUE(named.contains("conditional_ff.light_ff.1.bias"));
  EXPECT_TRUE(named.contains("conditional_attn.heavy_attn.to_kv.weight"));

  auto unknown = error_message(
      [] { build_module("ConditionalRoutedFeedForward", R"({"dim": 8, "num_heavy_tokens": 4, "hevy_ff_mult": 2})"); });
  EXPECT_NE(unknown.find("'hevy_ff_mult'"), std::string::npos) << unknown;
  auto required = error_message([] { build_module("ConditionalRoutedFeedForward", R"({"dim": 8})"); });
  EXPECT_NE(required.find("'num_heavy_tokens' is missing"), std::string::npos) << required;
  auto wrong_type =
      error_message([] { build_module("ConditionalRoutedFeedForward", R"({"dim": "8", "num_heavy_tokens": 4})"); });
  EXPECT_NE(wrong_type.find("'dim' must be an integer"), std::string::npos) << wrong_type;
  auto kwargs = error_message([] {
    build_module("ConditionalRoutedAttention",
                 R"({"dim": 8, "num_heavy_tokens_q": 4, "num_heavy_tokens_kv": 4, "router_kwargs": {"epz": 1}})");
  });
  EXPECT_NE(kwargs.find("router_kwargs: unknown keyword 'epz'"), std::string::npos) << kwargs;
  auto kind = error_message([] { build_module("ConditionalRoutedThing", "{}"); });
  EXPECT_NE(kind.find("unknown module kind 'ConditionalRoutedThing'"), std::string::npos) << kind;
  auto call_kw = error_message([&] { m.call({torch::randn({2, 40, 32})}, {}, R"({"num_tokens": 3})"); });
  EXPECT_NE(call_kw.find("unknown keyword argument 'num_tokens'"), std::string::npos) << call_kw;
}

// ------------------------------------------------------------- examples

TEST(ConditionalExamples, ReadmeShapesAtSmallSizes) {
  torch::NoGradGuard no_grad;
  auto tokens = torch::randn({2, 1024, 64});
  auto mask = bool_ones(2, 1024);
  ConditionalRoutedFeedForward ff(ConditionalRoutedFeedForwardOptions(64, 64).light_ff_mult(0.5).heavy_ff_mult(4));
  EXPECT_EQ(ff(tokens, mask).sizes(), tokens.sizes());
  ConditionalRoutedAttention attn(ConditionalRoutedAttentionOptions(64, 64, 64)
                                      .light_dim_head(16)
                                      .light_heads(2)
                                      .light_window_size(128)
                                      .heavy_dim_head(16)
                                      .heavy_heads(2));
  EXPECT_EQ(attn(tokens, mask).sizes(), tokens.sizes());
  ConditionalRoutedTransformerBlock block(ConditionalRoutedTransformerBlockOptions(64, 64, 64, 64)
                                              .light_dim_head(16)
                                              .light_heads(2)
                                              .heavy_dim_head(16)
                                              .heavy_heads(2));
  EXPECT_EQ(block(tokens, mask).sizes(), tokens.sizes());

  auto q = torch::randn({1, 128, 64});
  auto memories = torch::randn({1, 8192, 64});
  ConditionalRoutedCrossAttention cross(ConditionalRoutedCrossAttentionOptions(64, 64, 256)
                                            .dim_head(16)
                                            .heads(8)
                                            .kv_routing_tokens(2)
                                            .use_triton(true)
                                            .route_block_size(2048));
  EXPECT_EQ(cross(q, memories, bool_ones(1, 128), bool_ones(1, 8192)).sizes(), q.sizes());

  ConditionalRoutedAutoregressiveAttention ar(ConditionalRoutedAutoregressiveAttentionOptions(64, 32, 256)
                                                  .light_dim_head(16)
                                                  .light_heads(2)
                                                  .light_window_size(128)
                                                  .heavy_window_size(128)
                                                  .heavy_dim_head(16)
                                                  .heavy_heads(4)
                                                  .num_routed_kv(2));
  auto t = torch::randn({2, 512, 64});
  EXPECT_EQ((ar(t) + t).sizes(), t.sizes());
}

// ------------------------------------------------------------ bad input

TEST(ConditionalBadInput, ErrorsNameTheProblem) {
  torch::manual_seed(10);
  ConditionalRoutedAttention attn(small_attn());
  ConditionalRoutedFeedForward ff(ConditionalRoutedFeedForwardOptions(32, 16));
  ConditionalRoutedCrossAttention cross(ConditionalRoutedCrossAttentionOptions(32, 8, 8).dim_head(8).heads(4));
  CoordinateDescentRouter router(CoordinateDescentRouterOptions(32));
  auto x = torch::randn({2, 40, 32});

  struct Case {
    const char* what;
    std::function<void()> run;
    const char* expect;
  };
  const std::vector<Case> cases = {
      {"x of rank 2",
       [&] {
         attn(torch::randn({40, 32}));
       },
       "x must be (b, n, dim)"},
      {"x too wide",
       [&] {
         attn(torch::randn({2, 40, 33}));
       },
       "x has width 33 but the module's dim is 32"},
      {"integer x",
       [&] {
         ff(torch::ones({2, 40, 32}, torch::kLong));
       },
       "x must be floating point"},
      {"mask of the wrong length", [&] { attn(x, bool_ones(2, 41)); }, "mask must be (b, n) = (2, 40)"},
      {"mask of the wrong batch", [&] { ff(x, bool_ones(3, 40)); }, "mask must be (b, n) = (2, 40)"},
      {"float mask",
       [&] {
         ff(x, torch::ones({2, 40}));
       },
       "mask must be bool"},
      {"mask on another device",
       [&] {
         ff(x, torch::ones({2, 40}, torch::TensorOptions().dtype(torch::kBool).device(torch::kMeta)));
       },
       "mask is on meta but x is on cpu"},
      {"float64 x into a float32 module", [&] { attn(x.to(torch::kFloat64)); },
       "input is Double but the module's parameters are Float"},
      {"context of another dtype", [&] { cross(x, x.to(torch::kFloat64)); }, "x is Float but context is Double"},
      {"context of another batch",
       [&] {
         cross(x, torch::randn({3, 40, 32}));
       },
       "context has batch 3 but x has batch 2"},
      {"context mask of the wrong shape", [&] { cross(x, x, torch::Tensor(), bool_ones(2, 39)); },
       "context_mask must be (b, n)"},
      {"zero heavy tokens", [&] { ff(x, torch::Tensor(), 0); }, "num_heavy_tokens must be at least 1, got 0"},
      {"heads not divisible by routes", [&] { ConditionalRoutedAttention(small_attn().num_routed_kv(3)); },
       "heavy_heads (4) must be divisible by num_routed_kv (3)"},
      {"cross heads not divisible by routes",
       [&] {
         ConditionalRoutedCrossAttention(
             ConditionalRoutedCrossAttentionOptions(32, 8, 8).heads(6).kv_routing_tokens(4));
       },
       "heads (6) must be divisible by kv_routing_tokens (4)"},
      {"route block size twice",
       [&] {
         ConditionalRoutedCrossAttention(
             ConditionalRoutedCrossAttentionOptions(32, 8, 8).route_block_size(16).router_kwargs(
                 RouterKwargs().route_block_size(16)));
       },
       "do not also set it in router_kwargs"},
      {"fetch_k_ratio below 1", [&] { CoordinateDescentRouter(CoordinateDescentRouterOptions(8).fetch_k_ratio(0.5)); },
       "fetch_k_ratio must be >= 1"},
      {"sequence shorter than a route block",
       [&] { CoordinateDescentRouter(CoordinateDescentRouterOptions(32).route_block_size(64))(x, 8); },
       "is shorter than route_block_size"},
      {"learned routing tokens missing",
       [&] { CoordinateDescentRouter(CoordinateDescentRouterOptions(32).learned_routing_tokens(true))(x, 8); },
       "routing_tokens are required with learned_routing_tokens"},
      {"routing tokens of the wrong width",
       [&] {
         CoordinateDescentRouter(CoordinateDescentRouterOptions(32).learned_routing_tokens(true))(
             x, 8, torch::Tensor(), false, torch::randn({2, 31}));
       },
       "routing_tokens must be (b, dim)"},
      {"routing tokens for a router that has its own",
       [&] {
         router(x, 8, torch::Tensor(), false, torch::randn({2, 32}));
       },
       "routing_tokens given but the router has its own"},
      {"zero routed tokens", [&] { router(x, 0); }, "num_tokens must be at least 1"},
  };
  for (const auto& c : cases) {
    const std::string msg = error_message(c.run);
    EXPECT_NE(msg.find(c.expect), std::string::npos) << c.what << ": got \"" << msg << "\"";
  }
}

TEST(ConditionalRoutes, LearnedRoutingTokensPerCall) {
  torch::manual_seed(11);
  CoordinateDescentRouter router(
      CoordinateDescentRouterOptions(16).learned_routing_tokens(true).num_routing_tokens(2).eps(1.0));
  EXPECT_EQ(router->named_parameters().size(), 0u);
  auto x = torch::randn({2, 30, 16});
  auto tokens = torch::randn({2, 2, 16}, torch::requires_grad());
  auto r = router(x, 5, torch::Tensor(), false, tokens);
  EXPECT_EQ(r.indices.sizes(), (std::vector<int64_t>{2, 2, 5}));
  (r.routed_tokens * r.scores.unsqueeze(-1)).sum().backward();
  EXPECT_GT(tokens.grad().abs().sum().item<double>(), 0);
}

// ------------------------------------------------------------ frontend conventions

TEST(ConditionalOptions, BlockPartsGetEveryOptionOfTheBlock) {
  auto o = ConditionalRoutedTransformerBlockOptions(32, 6, 7, 8)
               .num_routed_kv(2)
               .light_dim_head(8)
               .light_heads(3)
               .light_window_size(10)
               .heavy_dim_head(12)
               .heavy_heads(4)
               .light_ff_mult(0.25)
               .heavy_ff_mult(3.0)
               .router_straight_through(false)
               .router_kwargs(RouterKwargs().eps(0.5).n_iters(7).cosine_sim_routing(true))
               .multiply_keys_by_score(true)
               .multiply_queries_by_score(true)
               .use_null_q_tokens(false);
  const auto attn = o.attention();
  EXPECT_EQ(attn.dim(), 32);
  EXPECT_EQ(attn.num_heavy_tokens_q(), 6);
  EXPECT_EQ(attn.num_heavy_tokens_kv(), 7);
  EXPECT_EQ(attn.num_routed_kv(), 2);
  EXPECT_EQ(attn.light_dim_head(), 8);
  EXPECT_EQ(attn.light_heads(), 3);
  EXPECT_EQ(attn.light_window_size(), 10);
  EXPECT_EQ(attn.heavy_dim_head(), 12);
  EXPECT_EQ(attn.heavy_heads(), 4);
  EXPECT_FALSE(attn.router_straight_through());
  EXPECT_TRUE(attn.multiply_keys_by_score());
  EXPECT_TRUE(attn.multiply_queries_by_score());
  EXPECT_FALSE(attn.use_null_q_tokens());
  EXPECT_EQ(attn.router_kwargs().n_iters(), 7);
  EXPECT_EQ(attn.router_kwargs().eps(), 0.5);
  EXPECT_TRUE(attn.router_kwargs().cosine_sim_routing());
  const auto ff = o.feedforward();
  EXPECT_EQ(ff.num_heavy_tokens(), 8);
  EXPECT_EQ(ff.light_ff_mult(), 0.25);
  EXPECT_EQ(ff.heavy_ff_mult(), 3.0);
  EXPECT_FALSE(ff.router_straight_through());
  EXPECT_EQ(ff.router_kwargs().n_iters(), 7);

  // The built block's parts carry them.
  ConditionalRoutedTransformerBlock block(o);
  EXPECT_EQ(block->conditional_attn->options.light_heads(), 3);
  EXPECT_EQ(block->conditional_attn->kv_router->options.num_routing_tokens(), 2);
  EXPECT_EQ(block->conditional_attn->q_router->options.eps(), 0.5);
  EXPECT_FALSE(block->conditional_ff->router->options.straight_through());
  EXPECT_EQ(block->conditional_ff->light_ff->options.mult(), 0.25);
}

TEST(ConditionalOptions, RouterScheduleDefaultsAreTheNamedOnes) {
  const RouterKwargs k;
  EXPECT_EQ(k.eps(), router_defaults::eps);
  EXPECT_EQ(k.eps_init(), router_defaults::eps_init);
  EXPECT_EQ(k.eps_decay(), router_defaults::eps_decay);
  EXPECT_EQ(k.n_iters(), router_defaults::n_iters);
  const CoordinateDescentRouterOptions r(8);
  EXPECT_EQ(r.eps(), router_defaults::eps);
  EXPECT_EQ(r.fetch_k_ratio(), router_defaults::fetch_k_ratio);
  // The router's schedule and the kwargs convert both ways.
  const auto back = CoordinateDescentRouterOptions(8).kwargs(RouterKwargs().eps(0.2).route_block_size(16)).kwargs();
  EXPECT_EQ(back.eps(), 0.2);
  EXPECT_EQ(back.route_block_size(), c10::optional<int64_t>(16));
}

TEST(ConditionalOptions, JsonReadsEveryOptionByItsName) {
  // A non-default value for options of every kind (integer, number, bool,
  // optional, nested router_kwargs) reaches the module.
  auto m = build_module("ConditionalRoutedAutoregressiveAttention",
                        R"({"dim": 16, "num_heavy_tokens_q": 2, "num_heavy_tokens_kv": 3, "light_heads": 2,
                            "light_dim_head": 4, "heavy_window_size": 6, "multiply_queries_by_score": true,
                            "router_kwargs": {"eps": 0.25, "eps_init": null, "triton_checkpoint_segments": 2}})");
  auto ar = std::dynamic_pointer_cast<ConditionalRoutedAutoregressiveAttentionImpl>(m.module());
  ASSERT_TRUE(ar);
  EXPECT_EQ(ar->options.light_heads(), 2);
  EXPECT_EQ(ar->options.heavy_window_size(), c10::optional<int64_t>(6));
  EXPECT_TRUE(ar->options.multiply_queries_by_score());
  EXPECT_EQ(ar->q_router->options.eps(), 0.25);
  EXPECT_FALSE(ar->q_router->options.eps_init().has_value());
  EXPECT_EQ(ar->q_router->options.checkpoint_segments(), 2);
  auto nested = error_message([] {
    build_module("ConditionalRoutedFeedForward", R"({"dim": 8, "num_heavy_tokens": 4, "router_kwargs": {"epz": 1}})");
  });
  EXPECT_NE(nested.find("unknown keyword 'epz'"), std::string::npos) << nested;
}

TEST(ConditionalOptions, JsonBuildsImageAttentionAndViT) {
  auto image = build_module("ConditionalRoutedImageAttention",
                            R"({"dim": 16, "num_heavy_tokens_q": 4, "num_heavy_tokens_kv": 4, "light_heads": 2,
                                "light_dim_head": 8, "heavy_heads": 2, "heavy_dim_head": 8, "light_window_size": 4,
                                "channel_first": true, "router_kwargs": {"eps": 0.5}})");
  auto img = std::dynamic_pointer_cast<ConditionalRoutedImageAttentionImpl>(image.module());
  ASSERT_TRUE(img);
  EXPECT_TRUE(img->options.channel_first());
  EXPECT_EQ(img->q_router->options.eps(), 0.5);
  torch::Tensor fmap = torch::randn({1, 16, 8, 8});
  EXPECT_EQ(image.call({fmap}).outputs.at("out").sizes(), fmap.sizes());

  auto vit = build_module("ConditionalRoutedViT",
                          R"({"image_size": [16, 8], "patch_size": 4, "num_classes": 3, "dim": 16, "depth": 1,
                              "attn_num_heavy_tokens_q": 2, "attn_num_heavy_tokens_kv": 2, "attn_heavy_dim_head": 8,
                              "attn_heavy_heads": 2, "attn_light_dim_head": 8, "attn_light_heads": 2,
                              "attn_light_window_size": 2, "ff_num_heavy_tokens": 2, "ff_heavy_mult": 2,
                              "ff_light_mult": 0.5})");
  auto v = std::dynamic_pointer_cast<ConditionalRoutedViTImpl>(vit.module());
  ASSERT_TRUE(v);
  EXPECT_EQ((*v->options.image_size())[0], 16);
  EXPECT_EQ((*v->options.image_size())[1], 8);
  EXPECT_EQ((*v->options.patch_size())[1], 4);
  EXPECT_EQ(vit.call({torch::randn({2, 3, 16, 8})}).outputs.at("out").sizes(), (std::vector<int64_t>{2, 3}));
  auto missing = error_message([] {
    build_module("ConditionalRoutedViT", R"({"image_size": 8, "patch_size": 4, "num_classes": 3, "dim": 16})");
  });
  EXPECT_NE(missing.find("'depth' is missing"), std::string::npos) << missing;
}

TEST(ConditionalFrontend, ModulesWorkInAnyModuleWithDefaultArguments) {
  torch::manual_seed(0);
  torch::Tensor x = torch::randn({1, 24, 16});
  ConditionalRoutedTransformerBlock block(ConditionalRoutedTransformerBlockOptions(16, 4, 4, 4)
                                              .light_heads(2)
                                              .light_dim_head(8)
                                              .heavy_heads(2)
                                              .heavy_dim_head(8)
                                              .light_window_size(8));
  torch::nn::AnyModule any(block);
  torch::Tensor via_any = any.forward(x);
  EXPECT_TRUE(torch::equal(via_any, block(x)));

  ConditionalRoutedFeedForward ff(ConditionalRoutedFeedForwardOptions(16, 4));
  ConditionalRoutedAttention attn(ConditionalRoutedAttentionOptions(16, 4, 4)
                                      .light_heads(2)
                                      .light_dim_head(8)
                                      .heavy_heads(2)
                                      .heavy_dim_head(8)
                                      .light_window_size(8));
  torch::nn::Sequential seq(attn, ff);
  torch::Tensor via_seq = seq->forward(x);
  EXPECT_TRUE(torch::equal(via_seq, ff(attn(x))));

  ConditionalRoutedAutoregressiveAttention ar(ConditionalRoutedAutoregressiveAttentionOptions(16, 2, 2)
                                                  .light_heads(2)
                                                  .light_dim_head(8)
                                                  .heavy_heads(2)
                                                  .heavy_dim_head(8)
                                                  .light_window_size(8));
  torch::nn::AnyModule any_ar(ar);
  EXPECT_TRUE(torch::equal(any_ar.forward(x), ar(x)));
}

TEST(ConditionalFrontend, PrettyPrintShowsRequiredAndChangedOptions) {
  std::ostringstream os;
  os << *ConditionalRoutedAttention(
      ConditionalRoutedAttentionOptions(32, 4, 6).light_heads(2).router_kwargs(RouterKwargs().eps(0.5)));
  const std::string s = os.str();
  EXPECT_NE(s.find("ConditionalRoutedAttention(dim=32, num_heavy_tokens_q=4, num_heavy_tokens_kv=6"), std::string::npos)
      << s;
  EXPECT_NE(s.find("light_heads=2"), std::string::npos) << s;
  EXPECT_NE(s.find("router_kwargs={eps=0.5}"), std::string::npos) << s;
  EXPECT_EQ(s.find("heavy_heads="), std::string::npos) << "unchanged options are not printed: " << s;
  EXPECT_NE(s.find("colt5::nn::CoordinateDescentRouter(dim=32, eps=0.5)"), std::string::npos) << s;
}

}  // namespace

// residual_forward (what the block calls) is x + forward(x), with the sums made
// in one pass and the routed rows added in place: float64 agreement to
// rounding, gradients included, for routed and unrouted lengths, with and
// without the null query token, the light branch or a mask.
TEST(ConditionalResidual, ResidualForwardIsXPlusForward) {
  torch::manual_seed(41);
  auto check = [](const std::function<torch::Tensor(const torch::Tensor&, bool)>& f, const torch::Tensor& x_in,
                  const std::vector<torch::Tensor>& params) {
    torch::Tensor xa = x_in.clone().requires_grad_(true), xb = x_in.clone().requires_grad_(true);
    torch::Tensor a = f(xa, true), b = xb + f(xb, false);
    EXPECT_LT(max_rel_error(a.detach(), b.detach()), 1e-12);
    torch::Tensor g = torch::randn_like(a);
    std::vector<torch::Tensor> ga = torch::autograd::grad({a}, {xa}, {g}, true);
    std::vector<torch::Tensor> gb = torch::autograd::grad({b}, {xb}, {g}, true);
    EXPECT_LT(max_rel_error(ga[0], gb[0]), 1e-12);
    for (const auto& p : params) {
      torch::Tensor pa = torch::autograd::grad({a}, {p}, {g}, true, false, true)[0];
      torch::Tensor pb = torch::autograd::grad({b}, {p}, {g}, true, false, true)[0];
      ASSERT_EQ(pa.defined(), pb.defined());
      if (pa.defined()) EXPECT_LT(max_rel_error(pa, pb), 1e-11);
    }
  };
  for (const bool null_q : {true, false}) {
    for (const bool light : {true, false}) {
      SCOPED_TRACE(std::string("null q ") + (null_q ? "on" : "off") + ", light " + (light ? "on" : "off"));
      ConditionalRoutedAttention attn(small_attn().use_null_q_tokens(null_q).has_light_attn(light));
      attn->to(torch::kDouble);
      std::vector<torch::Tensor> params = attn->parameters();
      for (const int64_t n : {40, 12}) {  // routed; shorter than the token counts (unrouted)
        torch::Tensor x = torch::randn({2, n, 32}, torch::kDouble);
        torch::Tensor mask = torch::rand({2, n}) > 0.2;
        for (const bool masked : {false, true}) {
          torch::Tensor m = masked ? mask : torch::Tensor();
          check([&](const torch::Tensor& t, bool r) { return r ? attn->residual_forward(t, m) : attn->forward(t, m); },
                x, params);
        }
      }
    }
  }
  ConditionalRoutedFeedForward ff(ConditionalRoutedFeedForwardOptions(32, 16).router_kwargs(smooth_router()));
  ff->to(torch::kDouble);
  for (const int64_t n : {40, 12}) {
    torch::Tensor x = torch::randn({2, n, 32}, torch::kDouble);
    check([&](const torch::Tensor& t, bool r) { return r ? ff->residual_forward(t) : ff->forward(t); }, x,
          ff->parameters());
  }
  // The autoregressive module: with and without the null token, whole
  // windows, a ragged length, one window only.
  for (const bool null_q : {true, false}) {
    ConditionalRoutedAutoregressiveAttention ar(ConditionalRoutedAutoregressiveAttentionOptions(32, 6, 20)
                                                    .light_dim_head(8)
                                                    .light_heads(2)
                                                    .light_window_size(12)
                                                    .heavy_dim_head(8)
                                                    .heavy_heads(4)
                                                    .use_null_q_tokens(null_q)
                                                    .rotary_emb(true)
                                                    .router_kwargs(smooth_router()));
    ar->to(torch::kDouble);
    for (const int64_t n : {96, 100, 10}) {
      SCOPED_TRACE("autoregressive, null q " + std::string(null_q ? "on" : "off") + ", length " + std::to_string(n));
      torch::Tensor x = torch::randn({2, n, 32}, torch::kDouble);
      check([&](const torch::Tensor& t, bool r) { return r ? ar->residual_forward(t) : ar->forward(t); }, x,
            ar->parameters());
    }
  }
  // The block is attention then feedforward, each with its residual.
  ConditionalRoutedTransformerBlock block(ConditionalRoutedTransformerBlockOptions(32, 16, 24, 16)
                                              .light_dim_head(8)
                                              .light_heads(2)
                                              .light_window_size(16)
                                              .heavy_dim_head(8)
                                              .heavy_heads(4)
                                              .router_kwargs(smooth_router()));
  block->to(torch::kDouble);
  torch::Tensor x = torch::randn({2, 40, 32}, torch::kDouble);
  torch::Tensor h = x + block->conditional_attn->forward(x);
  torch::Tensor want = h + block->conditional_ff->forward(h);
  EXPECT_LT(max_rel_error(block->forward(x).detach(), want.detach()), 1e-12);
}

// The autoregressive module's null query token stands in for the heavy output
// where a query is not routed; with every query of a window routed it takes
// no part, and its gradient is exactly zero (as the reference's is), through
// forward and residual_forward alike. With fewer routed it has a gradient.
TEST(ConditionalResidual, AutoregressiveNullTokenIsUnusedWhenEveryQueryIsRouted) {
  torch::manual_seed(43);
  for (const int64_t kq : {12, 6}) {
    ConditionalRoutedAutoregressiveAttention ar(ConditionalRoutedAutoregressiveAttentionOptions(32, kq, 20)
                                                    .light_dim_head(8)
                                                    .light_heads(2)
                                                    .light_window_size(12)
                                                    .heavy_dim_head(8)
                                                    .heavy_heads(4)
                                                    .router_kwargs(smooth_router()));
    ar->to(torch::kDouble);
    for (const bool residual : {false, true}) {
      for (const int64_t n : {48, 41}) {
        SCOPED_TRACE("routed per window " + std::to_string(kq) + ", residual " + std::to_string(residual) +
                     ", length " + std::to_string(n));
        ar->zero_grad();
        torch::Tensor x = torch::randn({2, n, 32}, torch::kDouble);
        torch::Tensor y = residual ? ar->residual_forward(x) : ar->forward(x);
        y.backward(torch::randn_like(y));
        const torch::Tensor& g = ar->null_q_token.grad();
        const int64_t nonzero = g.defined() ? torch::count_nonzero(g).item<int64_t>() : 0;
        if (kq == 12)
          EXPECT_EQ(nonzero, 0) << g;
        else
          EXPECT_GT(nonzero, 0);
      }
    }
  }
}

// The routed rows' sum (add_scaled_rows) against the same sum written out
// row by row, in float64: its value and the gradients of the sum, the rows,
// their scores and the bias, with and without lead rows, scale and bias.
TEST(ConditionalResidual, AddScaledRowsIsTheRowByRowSum) {
  torch::manual_seed(3);
  const int64_t b = 2, n = 20, k = 5, d = 6;
  auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  for (int64_t lead : {0, 3}) {
    for (bool scaled : {false, true}) {
      for (bool biased : {false, true}) {
        if (lead > 0 && !biased) continue;
        SCOPED_TRACE("lead " + std::to_string(lead) + " scaled " + std::to_string(scaled) + " bias " +
                     std::to_string(biased));
        torch::Tensor idx = torch::stack({torch::randperm(n - lead, torch::kLong).narrow(0, 0, k) + lead,
                                          torch::randperm(n - lead, torch::kLong).narrow(0, 0, k) + lead});
        torch::Tensor base = torch::randn({b, n, d}, f64).requires_grad_(true);
        torch::Tensor src = torch::randn({b, k, d}, f64).requires_grad_(true);
        torch::Tensor scale = scaled ? torch::rand({b, k}, f64).requires_grad_(true) : torch::Tensor();
        torch::Tensor bias = biased ? torch::randn({d}, f64).requires_grad_(true) : torch::Tensor();
        torch::Tensor gy = torch::randn({b, n, d}, f64);
        torch::Tensor y = colt5::nn::add_scaled_rows(base.clone(), idx, src, scale, bias, lead);
        std::vector<torch::Tensor> params = {base, src};
        if (scaled) params.push_back(scale);
        if (biased) params.push_back(bias);
        auto got = torch::autograd::grad({(y * gy).sum()}, params);
        // Row by row.
        std::vector<torch::Tensor> rows;
        for (int64_t i = 0; i < b; ++i) {
          std::vector<torch::Tensor> out;
          for (int64_t p = 0; p < n; ++p) {
            torch::Tensor r = base[i][p];
            if (p < lead) r = r - bias;
            for (int64_t j = 0; j < k; ++j)
              if (idx[i][j].item<int64_t>() == p) {
                torch::Tensor add = scaled ? src[i][j] * scale[i][j] : src[i][j];
                r = r + (biased ? add - bias : add);
              }
            out.push_back(r);
          }
          rows.push_back(torch::stack(out));
        }
        torch::Tensor want = torch::stack(rows);
        auto want_grads = torch::autograd::grad({(want * gy).sum()}, params);
        EXPECT_LT(max_rel_error(y.detach(), want.detach()), 1e-12);
        for (size_t i = 0; i < params.size(); ++i) EXPECT_LT(max_rel_error(got[i], want_grads[i]), 1e-12) << i;
      }
    }
  }
}
