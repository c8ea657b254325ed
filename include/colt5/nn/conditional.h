// CoLT5 conditionally routed modules: a light branch sees every token, a heavy
// branch only the tokens its coordinate-descent routers pick.
#pragma once

#include <torch/nn/cloneable.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/common.h>
#include <torch/nn/modules/container/any_value.h>
#include <torch/nn/pimpl.h>
#include <torch/arg.h>
#include <torch/types.h>

#include <c10/util/Optional.h>

#include <cstdint>

#include "colt5/nn/attention.h"
#include "colt5/nn/layers.h"
#include "colt5/nn/local_attention.h"
#include "colt5/nn/router.h"

namespace colt5 {
namespace nn {

// Router options from a module's settings.
CoordinateDescentRouterOptions router_options(int64_t dim, bool straight_through, const RouterKwargs& kwargs,
                                              int64_t num_routing_tokens = 1);

// ----------------------------------------------------------------- feedforward

struct ConditionalRoutedFeedForwardOptions {
  ConditionalRoutedFeedForwardOptions(int64_t dim, int64_t num_heavy_tokens)
      : dim_(dim), num_heavy_tokens_(num_heavy_tokens) {}
  /// Width of the tokens.
  TORCH_ARG(int64_t, dim);
  /// Tokens routed to the heavy feedforward per row.
  TORCH_ARG(int64_t, num_heavy_tokens);
#define COLT5_FF_MODULE_OPTIONS(X) COLT5_ROUTED_FF_OPTIONS(X) COLT5_ROUTING_MODULE_OPTIONS(X)
  COLT5_FF_MODULE_OPTIONS(COLT5_DECLARE_OPTION)
  COLT5_OPTIONS_VISITOR(COLT5_FF_MODULE_OPTIONS)
};

class ConditionalRoutedFeedForwardImpl : public torch::nn::Cloneable<ConditionalRoutedFeedForwardImpl> {
 public:
  explicit ConditionalRoutedFeedForwardImpl(const ConditionalRoutedFeedForwardOptions& options);
  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  // x: (b, n, dim); mask: bool (b, n) or undefined; num_heavy_tokens overrides the option.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& mask = {},
                        c10::optional<int64_t> num_heavy_tokens = c10::nullopt);
  // x + forward(x) (a residual block's feedforward), the sums made in one pass
  // over the tokens (equal to x + forward(x) up to rounding).
  torch::Tensor residual_forward(const torch::Tensor& x, const torch::Tensor& mask = {},
                                 c10::optional<int64_t> num_heavy_tokens = c10::nullopt);

 protected:
  FORWARD_HAS_DEFAULT_ARGS({1, torch::nn::AnyValue(torch::Tensor())},
                           {2, torch::nn::AnyValue(c10::optional<int64_t>())})

 public:
  ConditionalRoutedFeedForwardOptions options;
  CoordinateDescentRouter router{nullptr};
  // (forward, or residual_forward when residual)
  torch::Tensor forward_plus(const torch::Tensor& x, const torch::Tensor& mask, c10::optional<int64_t> num_heavy_tokens,
                             bool residual);

  FeedForward light_ff{nullptr};
  FeedForward heavy_ff{nullptr};
};
TORCH_MODULE(ConditionalRoutedFeedForward);

// ------------------------------------------------------------------- attention

struct ConditionalRoutedAttentionOptions {
  ConditionalRoutedAttentionOptions(int64_t dim, int64_t num_heavy_tokens_q, int64_t num_heavy_tokens_kv)
      : dim_(dim), num_heavy_tokens_q_(num_heavy_tokens_q), num_heavy_tokens_kv_(num_heavy_tokens_kv) {}
  /// Width of the tokens.
  TORCH_ARG(int64_t, dim);
  /// Queries routed to the heavy attention per row.
  TORCH_ARG(int64_t, num_heavy_tokens_q);
  /// Keys/values routed to the heavy attention per row (and per set).
  TORCH_ARG(int64_t, num_heavy_tokens_kv);
  // light_window_size: non-causal windows of light_window_size / 2 looking one back and one forward.
  // clang-format off
#define COLT5_ATTN_MODULE_OPTIONS(X)                                                                           \
  COLT5_ROUTED_ATTN_OPTIONS(X)                                                                                 \
  COLT5_ROUTING_MODULE_OPTIONS(X)                                                                              \
  X(bool, has_light_attn, true, "the light local attention branch (off: heavy branch only)")                \
  X(bool, rotary_emb, false, "rotary embedding of the heavy queries and keys at their original positions")
  // clang-format on
  COLT5_ATTN_MODULE_OPTIONS(COLT5_DECLARE_OPTION)
  COLT5_OPTIONS_VISITOR(COLT5_ATTN_MODULE_OPTIONS)
  /// On CUDA, the query and key/value routers score x in one read (one kernel
  /// each way) and gather their routed rows in one gather, where both route
  /// the whole sequence with their own tokens (at most 4 between them): one
  /// gradient of x from the routers instead of four added (false: each router
  /// on its own; the same routing, gradients equal up to rounding). Not a
  /// model setting: not saved with the options.
  TORCH_ARG(bool, joint_routing) = true;
};

class ConditionalRoutedAttentionImpl : public torch::nn::Cloneable<ConditionalRoutedAttentionImpl> {
 public:
  explicit ConditionalRoutedAttentionImpl(const ConditionalRoutedAttentionOptions& options);
  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  // x: (b, n, dim); mask: bool (b, n) or undefined.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& mask = {},
                        c10::optional<int64_t> num_heavy_tokens_q = c10::nullopt,
                        c10::optional<int64_t> num_heavy_tokens_kv = c10::nullopt);
  // x + forward(x) (a residual block's attention), the light output, x and the
  // heavy output summed in one pass over the tokens (equal up to rounding).
  torch::Tensor residual_forward(const torch::Tensor& x, const torch::Tensor& mask = {},
                                 c10::optional<int64_t> num_heavy_tokens_q = c10::nullopt,
                                 c10::optional<int64_t> num_heavy_tokens_kv = c10::nullopt);

 protected:
  FORWARD_HAS_DEFAULT_ARGS({1, torch::nn::AnyValue(torch::Tensor())},
                           {2, torch::nn::AnyValue(c10::optional<int64_t>())},
                           {3, torch::nn::AnyValue(c10::optional<int64_t>())})

 public:
  ConditionalRoutedAttentionOptions options;
  // (forward, or residual_forward when residual)
  torch::Tensor forward_plus(const torch::Tensor& x, const torch::Tensor& mask,
                             c10::optional<int64_t> num_heavy_tokens_q, c10::optional<int64_t> num_heavy_tokens_kv,
                             bool residual);
  LocalMHA light_attn{nullptr};  // null without has_light_attn
  torch::Tensor null_q_token;    // (dim); undefined without use_null_q_tokens
  CoordinateDescentRouter q_router{nullptr};
  CoordinateDescentRouter kv_router{nullptr};
  Attention heavy_attn{nullptr};
  RotaryEmbedding rotary_emb{nullptr};  // null without rotary_emb
};
TORCH_MODULE(ConditionalRoutedAttention);

// ----------------------------------------------------------------------- block

struct ConditionalRoutedTransformerBlockOptions {
  ConditionalRoutedTransformerBlockOptions(int64_t dim, int64_t num_heavy_attn_tokens_q,
                                           int64_t num_heavy_attn_tokens_kv, int64_t num_heavy_ff_tokens)
      : dim_(dim),
        num_heavy_attn_tokens_q_(num_heavy_attn_tokens_q),
        num_heavy_attn_tokens_kv_(num_heavy_attn_tokens_kv),
        num_heavy_ff_tokens_(num_heavy_ff_tokens) {}
  /// Width of the tokens.
  TORCH_ARG(int64_t, dim);
  /// Queries routed to the heavy attention per row.
  TORCH_ARG(int64_t, num_heavy_attn_tokens_q);
  /// Keys/values routed to the heavy attention per row.
  TORCH_ARG(int64_t, num_heavy_attn_tokens_kv);
  /// Tokens routed to the heavy feedforward per row.
  TORCH_ARG(int64_t, num_heavy_ff_tokens);
#define COLT5_BLOCK_OPTIONS(X) COLT5_ROUTED_ATTN_OPTIONS(X) COLT5_ROUTED_FF_OPTIONS(X) COLT5_ROUTING_MODULE_OPTIONS(X)
  COLT5_BLOCK_OPTIONS(COLT5_DECLARE_OPTION)
  COLT5_OPTIONS_VISITOR(COLT5_BLOCK_OPTIONS)

  /// The options of the block's attention (conditional_attn) and feedforward (conditional_ff).
  ConditionalRoutedAttentionOptions attention() const;
  ConditionalRoutedFeedForwardOptions feedforward() const;
};

// x = attn(x) + x; x = ff(x) + x.
class ConditionalRoutedTransformerBlockImpl : public torch::nn::Cloneable<ConditionalRoutedTransformerBlockImpl> {
 public:
  explicit ConditionalRoutedTransformerBlockImpl(const ConditionalRoutedTransformerBlockOptions& options);
  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& mask = {},
                        c10::optional<int64_t> num_heavy_attn_tokens_q = c10::nullopt,
                        c10::optional<int64_t> num_heavy_attn_tokens_kv = c10::nullopt,
                        c10::optional<int64_t> num_heavy_ff_tokens = c10::nullopt);

 protected:
  FORWARD_HAS_DEFAULT_ARGS({1, torch::nn::AnyValue(torch::Tensor())},
                           {2, torch::nn::AnyValue(c10::optional<int64_t>())},
                           {3, torch::nn::AnyValue(c10::optional<int64_t>())},
                           {4, torch::nn::AnyValue(c10::optional<int64_t>())})

 public:
  ConditionalRoutedTransformerBlockOptions options;
  ConditionalRoutedFeedForward conditional_ff{nullptr};
  ConditionalRoutedAttention conditional_attn{nullptr};
};
TORCH_MODULE(ConditionalRoutedTransformerBlock);

// ------------------------------------------------------ autoregressive attention

struct ConditionalRoutedAutoregressiveAttentionOptions {
  ConditionalRoutedAutoregressiveAttentionOptions(int64_t dim, int64_t num_heavy_tokens_q, int64_t num_heavy_tokens_kv)
      : dim_(dim), num_heavy_tokens_q_(num_heavy_tokens_q), num_heavy_tokens_kv_(num_heavy_tokens_kv) {}
  /// Width of the tokens.
  TORCH_ARG(int64_t, dim);
  /// Queries routed per heavy window.
  TORCH_ARG(int64_t, num_heavy_tokens_q);
  /// Keys/values routed, per window, from all the windows before it.
  TORCH_ARG(int64_t, num_heavy_tokens_kv);
  // light_window_size: causal local attention, windows of this size looking one back.
  // clang-format off
#define COLT5_AR_MODULE_OPTIONS(X)                                                                             \
  COLT5_ROUTED_ATTN_OPTIONS(X)                                                                                 \
  COLT5_ROUTING_MODULE_OPTIONS(X)                                                                              \
  X(c10::optional<int64_t>, heavy_window_size, c10::nullopt, "heavy window length; nullopt means light_window_size") \
  X(bool, rotary_emb, false, "rotary embedding of the heavy queries and keys at their original positions")
  // clang-format on
  COLT5_AR_MODULE_OPTIONS(COLT5_DECLARE_OPTION)
  COLT5_OPTIONS_VISITOR(COLT5_AR_MODULE_OPTIONS)
};

// The sequence is cut into heavy windows. Queries of window w >= 1 are routed
// by a top-k inside that window and attend to keys/values routed from windows
// 0..w-1; window 0 gets only the light branch. As in the reference, whether a
// token of a window is routed to the heavy branch depends on the other tokens
// of its window, later ones included: the output at a position is causal only
// at window granularity for the routing decision (its heavy attention itself
// only sees earlier windows).
class ConditionalRoutedAutoregressiveAttentionImpl
    : public torch::nn::Cloneable<ConditionalRoutedAutoregressiveAttentionImpl> {
 public:
  explicit ConditionalRoutedAutoregressiveAttentionImpl(const ConditionalRoutedAutoregressiveAttentionOptions& options);
  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  // x: (b, n, dim).
  torch::Tensor forward(const torch::Tensor& x, c10::optional<int64_t> num_heavy_tokens_q = c10::nullopt,
                        c10::optional<int64_t> num_heavy_tokens_kv = c10::nullopt, bool random_route = false);

  // x + forward(x), the residual added in the output's one pass. On CUDA x's
  // uses (the light branch's norm, both routers, the keys/values' norm and the
  // residual) give it one gradient, each backward kernel adding the next
  // one's, where x + forward(x) would add two gradients of x's size.
  torch::Tensor residual_forward(const torch::Tensor& x, c10::optional<int64_t> num_heavy_tokens_q = c10::nullopt,
                                 c10::optional<int64_t> num_heavy_tokens_kv = c10::nullopt, bool random_route = false);

 protected:
  FORWARD_HAS_DEFAULT_ARGS({1, torch::nn::AnyValue(c10::optional<int64_t>())},
                           {2, torch::nn::AnyValue(c10::optional<int64_t>())}, {3, torch::nn::AnyValue(false)})

 private:
  torch::Tensor forward_impl(const torch::Tensor& x, c10::optional<int64_t> num_heavy_tokens_q,
                             c10::optional<int64_t> num_heavy_tokens_kv, bool random_route, bool residual);

 public:
  ConditionalRoutedAutoregressiveAttentionOptions options;
  LocalMHA light_attn{nullptr};
  torch::Tensor null_q_token;  // (dim); undefined without use_null_q_tokens
  CoordinateDescentRouter q_router{nullptr};
  CoordinateDescentRouter kv_router{nullptr};
  Attention heavy_attn{nullptr};
  RotaryEmbedding rotary_emb{nullptr};
  // How many groups of consecutive windows the kv router routes separately,
  // each over the prefix of the sequence its windows see (rather than every
  // window over the whole sequence, masked): 0 picks one group per 4096
  // positions on the CPU, per 8192 on CUDA (where each group's launches cost
  // more), at most 8. Every value gives the same output; more groups do less
  // routing work (towards half) in more launches. Not saved.
  int64_t kv_route_groups = 0;
};
TORCH_MODULE(ConditionalRoutedAutoregressiveAttention);

// -------------------------------------------------------------- cross attention

struct ConditionalRoutedCrossAttentionOptions {
  ConditionalRoutedCrossAttentionOptions(int64_t dim, int64_t num_tokens_q, int64_t num_tokens_kv)
      : dim_(dim), num_tokens_q_(num_tokens_q), num_tokens_kv_(num_tokens_kv) {}
  /// Width of the queries and of the context.
  TORCH_ARG(int64_t, dim);
  /// Queries routed per row when there are more.
  TORCH_ARG(int64_t, num_tokens_q);
  /// Context tokens routed per row when there are more.
  TORCH_ARG(int64_t, num_tokens_kv);
  // clang-format off
#define COLT5_CROSS_MODULE_OPTIONS(X)                                                                          \
  X(int64_t, num_sets_kv, 1, "accepted for compatibility with the reference, which does not use it")         \
  X(int64_t, dim_head, 64, "width of an attention head")                                                     \
  X(int64_t, heads, 8, "attention heads")                                                                    \
  X(int64_t, kv_routing_tokens, 1, "routing tokens of the context router; heads are split evenly across them") \
  X(c10::optional<int64_t>, route_block_size, c10::nullopt,                                                  \
    "route the context evenly from blocks of this size (router_kwargs must not set it too)")                  \
  COLT5_HEAVY_ATTN_OPTIONS(X)                                                                                  \
  COLT5_ROUTING_MODULE_OPTIONS(X)
  // clang-format on
  COLT5_CROSS_MODULE_OPTIONS(COLT5_DECLARE_OPTION)
  COLT5_OPTIONS_VISITOR(COLT5_CROSS_MODULE_OPTIONS)
};

// Queries are routed when the query length exceeds num_tokens_q (unrouted
// queries then get null_q_token, or zeros); the context is routed when longer
// than num_tokens_kv.
class ConditionalRoutedCrossAttentionImpl : public torch::nn::Cloneable<ConditionalRoutedCrossAttentionImpl> {
 public:
  explicit ConditionalRoutedCrossAttentionImpl(const ConditionalRoutedCrossAttentionOptions& options);
  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  // x: (b, nq, dim); context: (b, nkv, dim); mask: bool (b, nq); context_mask: bool (b, nkv).
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& context, const torch::Tensor& mask = {},
                        const torch::Tensor& context_mask = {}, c10::optional<int64_t> num_tokens_q = c10::nullopt,
                        c10::optional<int64_t> num_tokens_kv = c10::nullopt);

 protected:
  FORWARD_HAS_DEFAULT_ARGS({2, torch::nn::AnyValue(torch::Tensor())}, {3, torch::nn::AnyValue(torch::Tensor())},
                           {4, torch::nn::AnyValue(c10::optional<int64_t>())},
                           {5, torch::nn::AnyValue(c10::optional<int64_t>())})

 public:
  ConditionalRoutedCrossAttentionOptions options;
  torch::Tensor null_q_token;
  CoordinateDescentRouter q_router{nullptr};
  CoordinateDescentRouter kv_router{nullptr};
  Attention heavy_attn{nullptr};
};
TORCH_MODULE(ConditionalRoutedCrossAttention);

}  // namespace nn
}  // namespace colt5
