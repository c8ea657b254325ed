// CoLT5 conditionally routed modules: a light branch sees every token, a heavy
// branch only the tokens its coordinate-descent routers pick.
#pragma once

#include <torch/nn/cloneable.h>
#include <torch/nn/module.h>
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

// The reference's `router_kwargs` dict: router options a module passes through
// to each of its routers (the module itself sets dim, straight_through and the
// number of routing tokens).
struct RouterKwargs {
  TORCH_ARG(int64_t, n_iters) = 20;
  TORCH_ARG(double, fetch_k_ratio) = 9.0 / 8.0;
  TORCH_ARG(double, eps) = 0.03;
  TORCH_ARG(double, eps_decay) = 0.7;
  TORCH_ARG(c10::optional<double>, eps_init) = 4.0;
  TORCH_ARG(bool, use_triton) = false;
  TORCH_ARG(bool, cosine_sim_routing) = false;
  TORCH_ARG(double, cosine_sim_scale) = 8.0;
  TORCH_ARG(c10::optional<int64_t>, route_block_size) = c10::nullopt;
  TORCH_ARG(int64_t, checkpoint_segments) = 0;
};

// Router options from a module's settings.
CoordinateDescentRouterOptions router_options(int64_t dim, bool straight_through, const RouterKwargs& kwargs,
                                              int64_t num_routing_tokens = 1);

// ----------------------------------------------------------------- feedforward

struct ConditionalRoutedFeedForwardOptions {
  ConditionalRoutedFeedForwardOptions(int64_t dim, int64_t num_heavy_tokens)
      : dim_(dim), num_heavy_tokens_(num_heavy_tokens) {}
  TORCH_ARG(int64_t, dim);
  TORCH_ARG(int64_t, num_heavy_tokens);
  TORCH_ARG(double, light_ff_mult) = 0.5;
  TORCH_ARG(double, heavy_ff_mult) = 4.0;
  TORCH_ARG(bool, router_straight_through) = true;
  TORCH_ARG(RouterKwargs, router_kwargs) = {};
  TORCH_ARG(bool, use_triton) = false;
};

class ConditionalRoutedFeedForwardImpl : public torch::nn::Cloneable<ConditionalRoutedFeedForwardImpl> {
 public:
  explicit ConditionalRoutedFeedForwardImpl(const ConditionalRoutedFeedForwardOptions& options);
  void reset() override;

  // x: [b, n, dim]; mask: bool [b, n] or undefined; num_heavy_tokens overrides the option.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& mask = {},
                        c10::optional<int64_t> num_heavy_tokens = c10::nullopt);

  ConditionalRoutedFeedForwardOptions options;
  CoordinateDescentRouter router{nullptr};
  FeedForward light_ff{nullptr};
  FeedForward heavy_ff{nullptr};
};
TORCH_MODULE(ConditionalRoutedFeedForward);

// ------------------------------------------------------------------- attention

struct ConditionalRoutedAttentionOptions {
  ConditionalRoutedAttentionOptions(int64_t dim, int64_t num_heavy_tokens_q, int64_t num_heavy_tokens_kv)
      : dim_(dim), num_heavy_tokens_q_(num_heavy_tokens_q), num_heavy_tokens_kv_(num_heavy_tokens_kv) {}
  TORCH_ARG(int64_t, dim);
  TORCH_ARG(int64_t, num_heavy_tokens_q);
  TORCH_ARG(int64_t, num_heavy_tokens_kv);
  // Sets of routed key/values (routing tokens of the kv router); heavy_heads
  // are split evenly across them.
  TORCH_ARG(int64_t, num_routed_kv) = 1;
  TORCH_ARG(bool, has_light_attn) = true;
  TORCH_ARG(int64_t, light_dim_head) = 64;
  TORCH_ARG(int64_t, light_heads) = 8;
  // Non-causal local attention, windows of light_window_size / 2 looking one back and one forward.
  TORCH_ARG(int64_t, light_window_size) = 128;
  TORCH_ARG(int64_t, heavy_dim_head) = 64;
  TORCH_ARG(int64_t, heavy_heads) = 8;
  TORCH_ARG(bool, router_straight_through) = true;
  TORCH_ARG(RouterKwargs, router_kwargs) = {};
  TORCH_ARG(bool, multiply_keys_by_score) = false;
  TORCH_ARG(bool, multiply_queries_by_score) = false;
  TORCH_ARG(bool, use_triton) = false;
  // A learned output for the queries the router does not pick.
  TORCH_ARG(bool, use_null_q_tokens) = true;
  TORCH_ARG(bool, use_flash_attn) = false;
  // Rotary embedding of the heavy queries and keys at their original positions.
  TORCH_ARG(bool, rotary_emb) = false;
};

class ConditionalRoutedAttentionImpl : public torch::nn::Cloneable<ConditionalRoutedAttentionImpl> {
 public:
  explicit ConditionalRoutedAttentionImpl(const ConditionalRoutedAttentionOptions& options);
  void reset() override;

  // x: [b, n, dim]; mask: bool [b, n] or undefined.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& mask = {},
                        c10::optional<int64_t> num_heavy_tokens_q = c10::nullopt,
                        c10::optional<int64_t> num_heavy_tokens_kv = c10::nullopt);

  ConditionalRoutedAttentionOptions options;
  LocalMHA light_attn{nullptr};  // null without has_light_attn
  torch::Tensor null_q_token;    // [dim]; undefined without use_null_q_tokens
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
  TORCH_ARG(int64_t, dim);
  TORCH_ARG(int64_t, num_heavy_attn_tokens_q);
  TORCH_ARG(int64_t, num_heavy_attn_tokens_kv);
  TORCH_ARG(int64_t, num_heavy_ff_tokens);
  TORCH_ARG(int64_t, num_routed_kv) = 1;
  TORCH_ARG(int64_t, light_dim_head) = 64;
  TORCH_ARG(int64_t, light_heads) = 8;
  TORCH_ARG(int64_t, light_window_size) = 128;
  TORCH_ARG(int64_t, heavy_dim_head) = 64;
  TORCH_ARG(int64_t, heavy_heads) = 8;
  TORCH_ARG(double, light_ff_mult) = 0.5;
  TORCH_ARG(double, heavy_ff_mult) = 4.0;
  TORCH_ARG(bool, router_straight_through) = true;
  TORCH_ARG(RouterKwargs, router_kwargs) = {};
  TORCH_ARG(bool, multiply_keys_by_score) = false;
  TORCH_ARG(bool, multiply_queries_by_score) = false;
  TORCH_ARG(bool, use_triton) = false;
  TORCH_ARG(bool, use_null_q_tokens) = true;
  TORCH_ARG(bool, use_flash_attn) = false;
};

// x = attn(x) + x; x = ff(x) + x.
class ConditionalRoutedTransformerBlockImpl : public torch::nn::Cloneable<ConditionalRoutedTransformerBlockImpl> {
 public:
  explicit ConditionalRoutedTransformerBlockImpl(const ConditionalRoutedTransformerBlockOptions& options);
  void reset() override;

  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& mask = {},
                        c10::optional<int64_t> num_heavy_attn_tokens_q = c10::nullopt,
                        c10::optional<int64_t> num_heavy_attn_tokens_kv = c10::nullopt,
                        c10::optional<int64_t> num_heavy_ff_tokens = c10::nullopt);

  ConditionalRoutedTransformerBlockOptions options;
  ConditionalRoutedFeedForward conditional_ff{nullptr};
  ConditionalRoutedAttention conditional_attn{nullptr};
};
TORCH_MODULE(ConditionalRoutedTransformerBlock);

// ------------------------------------------------------ autoregressive attention

struct ConditionalRoutedAutoregressiveAttentionOptions {
  ConditionalRoutedAutoregressiveAttentionOptions(int64_t dim, int64_t num_heavy_tokens_q, int64_t num_heavy_tokens_kv)
      : dim_(dim), num_heavy_tokens_q_(num_heavy_tokens_q), num_heavy_tokens_kv_(num_heavy_tokens_kv) {}
  TORCH_ARG(int64_t, dim);
  // Queries routed per heavy window.
  TORCH_ARG(int64_t, num_heavy_tokens_q);
  // Keys/values routed, per window, from all the windows before it.
  TORCH_ARG(int64_t, num_heavy_tokens_kv);
  TORCH_ARG(int64_t, num_routed_kv) = 1;
  TORCH_ARG(int64_t, light_dim_head) = 64;
  TORCH_ARG(int64_t, light_heads) = 8;
  // Causal local attention, windows of this size looking one back.
  TORCH_ARG(int64_t, light_window_size) = 128;
  // nullopt means light_window_size.
  TORCH_ARG(c10::optional<int64_t>, heavy_window_size) = c10::nullopt;
  TORCH_ARG(int64_t, heavy_dim_head) = 64;
  TORCH_ARG(int64_t, heavy_heads) = 8;
  TORCH_ARG(bool, router_straight_through) = true;
  TORCH_ARG(RouterKwargs, router_kwargs) = {};
  TORCH_ARG(bool, multiply_keys_by_score) = false;
  TORCH_ARG(bool, multiply_queries_by_score) = false;
  TORCH_ARG(bool, use_triton) = false;
  TORCH_ARG(bool, use_null_q_tokens) = true;
  TORCH_ARG(bool, use_flash_attn) = false;
  TORCH_ARG(bool, rotary_emb) = false;
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

  // x: [b, n, dim].
  torch::Tensor forward(const torch::Tensor& x, c10::optional<int64_t> num_heavy_tokens_q = c10::nullopt,
                        c10::optional<int64_t> num_heavy_tokens_kv = c10::nullopt, bool random_route = false);

  ConditionalRoutedAutoregressiveAttentionOptions options;
  LocalMHA light_attn{nullptr};
  torch::Tensor null_q_token;  // [dim]; undefined without use_null_q_tokens
  CoordinateDescentRouter q_router{nullptr};
  CoordinateDescentRouter kv_router{nullptr};
  Attention heavy_attn{nullptr};
  RotaryEmbedding rotary_emb{nullptr};
};
TORCH_MODULE(ConditionalRoutedAutoregressiveAttention);

// -------------------------------------------------------------- cross attention

struct ConditionalRoutedCrossAttentionOptions {
  ConditionalRoutedCrossAttentionOptions(int64_t dim, int64_t num_tokens_q, int64_t num_tokens_kv)
      : dim_(dim), num_tokens_q_(num_tokens_q), num_tokens_kv_(num_tokens_kv) {}
  TORCH_ARG(int64_t, dim);
  TORCH_ARG(int64_t, num_tokens_q);
  TORCH_ARG(int64_t, num_tokens_kv);
  // Accepted for compatibility with the reference, which does not use it.
  TORCH_ARG(int64_t, num_sets_kv) = 1;
  TORCH_ARG(int64_t, dim_head) = 64;
  TORCH_ARG(int64_t, heads) = 8;
  TORCH_ARG(bool, router_straight_through) = true;
  TORCH_ARG(RouterKwargs, router_kwargs) = {};
  // Routing tokens of the context router; heads are split evenly across them.
  TORCH_ARG(int64_t, kv_routing_tokens) = 1;
  TORCH_ARG(bool, multiply_keys_by_score) = false;
  TORCH_ARG(bool, use_triton) = false;
  TORCH_ARG(bool, use_null_q_tokens) = true;
  TORCH_ARG(bool, use_flash_attn) = false;
  // Route the context evenly from blocks of this size (router_kwargs must not set it too).
  TORCH_ARG(c10::optional<int64_t>, route_block_size) = c10::nullopt;
};

// Queries are routed when the query length exceeds num_tokens_q (unrouted
// queries then get null_q_token, or zeros); the context is routed when longer
// than num_tokens_kv.
class ConditionalRoutedCrossAttentionImpl : public torch::nn::Cloneable<ConditionalRoutedCrossAttentionImpl> {
 public:
  explicit ConditionalRoutedCrossAttentionImpl(const ConditionalRoutedCrossAttentionOptions& options);
  void reset() override;

  // x: [b, nq, dim]; context: [b, nkv, dim]; mask: bool [b, nq]; context_mask: bool [b, nkv].
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& context, const torch::Tensor& mask = {},
                        const torch::Tensor& context_mask = {}, c10::optional<int64_t> num_tokens_q = c10::nullopt,
                        c10::optional<int64_t> num_tokens_kv = c10::nullopt);

  ConditionalRoutedCrossAttentionOptions options;
  torch::Tensor null_q_token;
  CoordinateDescentRouter q_router{nullptr};
  CoordinateDescentRouter kv_router{nullptr};
  Attention heavy_attn{nullptr};
};
TORCH_MODULE(ConditionalRoutedCrossAttention);

}  // namespace nn
}  // namespace colt5
