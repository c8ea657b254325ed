// The heavy routed attention branch shared by ConditionalRoutedAttention,
// ConditionalRoutedAutoregressiveAttention, ConditionalRoutedCrossAttention and
// ConditionalRoutedImageAttention: route queries and keys/values, attend over
// the routed sets with the heavy Attention (rotary at the original positions),
// scale by the query scores, and write the outputs back at the routed query
// positions over the null query token.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/types.h>

#include <cstdint>
#include <vector>

#include "colt5/nn/attention.h"
#include "colt5/nn/conditional.h"
#include "colt5/nn/router.h"

namespace colt5 {
namespace nn {

struct HeavyBranchInputs {
  torch::Tensor queries;     // [b, n, dim]
  torch::Tensor query_mask;  // bool [b, n] or undefined
  torch::Tensor context;     // [b', m, dim]: the keys/values' sequence
  // bool [b', m], [b', views, m] (one routing of each context row per view;
  // b' * views = b) or undefined.
  torch::Tensor context_mask;
  int64_t num_q = 0;
  int64_t num_kv = 0;
  bool random_route = false;
  bool multiply_queries_by_score = false;
  // Rotary frequencies (both or neither): of the query positions, [n, dim_head]
  // or [b, n, dim_head]; of the context positions, [m, dim_head].
  torch::Tensor q_freqs;
  torch::Tensor kv_freqs;
  // Normalize and project the context's keys/values once, then gather the
  // projected rows of each routed set (the same math; cheaper when the
  // context is routed many times, as by the autoregressive module's windows).
  bool project_context_once = false;
  // With a [b', views, m] context_mask whose view v is false from position
  // context_view_lengths[v] on (non-decreasing lengths): the views are routed
  // in context_view_groups groups of consecutive views, each over the
  // context's prefix its longest view needs, rather than every view over the
  // whole context. The same routing (masked positions take no part in it);
  // the work of coordinate descent and top-k falls from views x m towards the
  // sum of the lengths.
  std::vector<int64_t> context_view_lengths;
  int64_t context_view_groups = 1;
  // When defined ([b, n, dim] each; plus_b may stay undefined): the result is
  // plus_a + plus_b + the heavy output, summed in one pass over the tokens and
  // the routed rows added in place (the light branch and the residual of a
  // block), rather than the heavy output written out at every position first.
  torch::Tensor plus_a;
  torch::Tensor plus_b;
  // plus_b already holds null_q_token at every position (added by the light
  // branch's output projection): the sum adds it no more, and the routed rows
  // still replace it with their outputs.
  bool plus_b_has_null = false;
  // When positive: queries (and query_mask, q_freqs) hold this many
  // consecutive rows per context row of which the first is routed but takes
  // no further part (the autoregressive module's window 0, which has no
  // earlier window to attend to): the queries stay a view of the sequence
  // rather than a copy of all but its first window, and only the first
  // rows' routed tokens are dropped. q_freqs covers the kept rows only.
  int64_t query_rows_dropping_first = 0;
  // The queries are a view of the whole context (the same elements in the
  // same order, as the autoregressive module's windows): the keys/values are
  // routed and projected from the context as the query router's scores node
  // passes it on, and the key/value router's node passes it on to the
  // projection's norm, so that x's uses give it one gradient (see
  // RouterOutput::x_passed). Where CUDA's routing-scores kernel takes both
  // routers, they score the context in one read of it and one backward
  // (route_queries_of_context).
  bool queries_view_context = false;
  // Queries and context the same tensor under the same mask (self-attention):
  // route both with route_pair's joint scores and gather where it applies.
  bool joint_routing = false;
};

// The heavy output at every query position, [b, n, dim]: the routed queries'
// attention outputs times their scores, null_q_token (or zeros when undefined)
// elsewhere (plus in.plus_a and in.plus_b where set). Unrouted inputs (no
// longer than the token count) attend as they are. Where in.plus_a is
// in.queries (a residual), the sum takes the queries as the query router
// passes them on, so that their gradient joins the router's backward kernel.
torch::Tensor heavy_routed_attention(CoordinateDescentRouterImpl& q_router, CoordinateDescentRouterImpl& kv_router,
                                     AttentionImpl& heavy_attn, const torch::Tensor& null_q_token,
                                     const HeavyBranchInputs& in);

// The routed queries' heavy outputs, [b, k, dim], their scores [b, k] (by
// which the outputs are to be multiplied) and their positions, int64 [b, k];
// when every query was routed (no longer than the token count), the outputs
// at every position (score 1) and undefined scores and positions.
// in.plus_a / in.plus_b are not used. x_passed: the queries as the query
// router's scores node passes them on (RouterOutput::x_passed), or undefined;
// context_passed: with queries_view_context and project_context_once, the
// context as the last of its uses (the keys/values' norm) passes it on, or
// undefined.
struct HeavyRoutedRows {
  torch::Tensor out;
  torch::Tensor scores;
  torch::Tensor indices;
  torch::Tensor x_passed;
  torch::Tensor context_passed;
};
HeavyRoutedRows heavy_routed_rows(CoordinateDescentRouterImpl& q_router, CoordinateDescentRouterImpl& kv_router,
                                  AttentionImpl& heavy_attn, const HeavyBranchInputs& in);

// out[b, indices[b, j]] += scale[b, j] * src[b, j] - bias for every routed
// row j, and out[b, p] -= bias for p < lead: out (b, n, d) changed in place
// and returned, indices int64 (b, k) distinct in each batch row and at least
// lead, src (b, k, d), scale (b, k) and bias (d) optional (lead needs a bias).
// On CUDA one kernel each way (the scaled rows never written out, their
// gradients from one read of out's); elsewhere the same sum by LibTorch
// operators (the rows scaled in the product's type, then out's).
torch::Tensor add_scaled_rows(torch::Tensor out, const torch::Tensor& indices, const torch::Tensor& src,
                              const torch::Tensor& scale, const torch::Tensor& bias, int64_t lead);

// The heavy Attention's options, the same for every conditional module: fused
// attention wherever LibTorch has it (use_flash_attn is accepted and implied).
AttentionOptions heavy_attention_options(int64_t dim, int64_t dim_head, int64_t heads, bool multiply_keys_by_score);

// A module's router kwargs with its own use_triton folded in (the fused
// coordinate-descent kernels run either way).
inline RouterKwargs module_router_kwargs(RouterKwargs kwargs, bool use_triton) {
  if (use_triton) kwargs.use_triton(true);
  return kwargs;
}

// Checks the options every routed self-attention has (the routed, autoregressive
// and image attention): positive sizes, heavy heads split evenly across the
// key/value sets, an even head width for rotary embeddings.
template <typename Options>
void check_routed_attention_options(const char* module, const Options& o, bool rotary) {
  TORCH_CHECK(o.dim() > 0, module, ": dim must be positive, got ", o.dim());
  TORCH_CHECK(o.num_heavy_tokens_q() >= 1, module, ": num_heavy_tokens_q must be at least 1, got ",
              o.num_heavy_tokens_q());
  TORCH_CHECK(o.num_heavy_tokens_kv() >= 1, module, ": num_heavy_tokens_kv must be at least 1, got ",
              o.num_heavy_tokens_kv());
  TORCH_CHECK(o.num_routed_kv() >= 1, module, ": num_routed_kv must be at least 1, got ", o.num_routed_kv());
  TORCH_CHECK(o.heavy_heads() >= 1 && o.heavy_heads() % o.num_routed_kv() == 0, module, ": heavy_heads (",
              o.heavy_heads(), ") must be divisible by num_routed_kv (", o.num_routed_kv(), ")");
  TORCH_CHECK(!rotary || o.heavy_dim_head() % 2 == 0, module, ": rotary_emb needs an even heavy_dim_head, got ",
              o.heavy_dim_head());
}

// Registers the heavy branch of a routed self-attention, in the reference's
// order and under its names: null_q_token (with use_null_q_tokens), q_router,
// kv_router (one routing token per key/value set), heavy_attn.
template <typename Impl, typename Options>
void register_heavy_branch(Impl& m, const Options& o) {
  const RouterKwargs kwargs = module_router_kwargs(o.router_kwargs(), o.use_triton());
  m.null_q_token = torch::Tensor();
  if (o.use_null_q_tokens()) m.null_q_token = m.register_parameter("null_q_token", torch::randn({o.dim()}));
  m.q_router = m.register_module("q_router",
                                 CoordinateDescentRouter(router_options(o.dim(), o.router_straight_through(), kwargs)));
  m.kv_router = m.register_module("kv_router", CoordinateDescentRouter(router_options(
                                                   o.dim(), o.router_straight_through(), kwargs, o.num_routed_kv())));
  m.heavy_attn = m.register_module(
      "heavy_attn",
      Attention(heavy_attention_options(o.dim(), o.heavy_dim_head(), o.heavy_heads(), o.multiply_keys_by_score())));
}

}  // namespace nn
}  // namespace colt5
