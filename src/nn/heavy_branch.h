// The heavy routed attention branch shared by ConditionalRoutedAttention,
// ConditionalRoutedAutoregressiveAttention, ConditionalRoutedCrossAttention and
// ConditionalRoutedImageAttention: route queries and keys/values, attend over
// the routed sets with the heavy Attention (rotary at the original positions),
// scale by the query scores, and write the outputs back at the routed query
// positions over the null query token.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

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
};

// The heavy output at every query position, [b, n, dim]: the routed queries'
// attention outputs times their scores, null_q_token (or zeros when undefined)
// elsewhere. Unrouted inputs (no longer than the token count) attend as they are.
torch::Tensor heavy_routed_attention(CoordinateDescentRouterImpl& q_router, CoordinateDescentRouterImpl& kv_router,
                                     AttentionImpl& heavy_attn, const torch::Tensor& null_q_token,
                                     const HeavyBranchInputs& in);

// The heavy Attention's options, the same for every conditional module: fused
// attention wherever LibTorch has it (use_flash_attn is accepted and implied).
AttentionOptions heavy_attention_options(int64_t dim, int64_t dim_head, int64_t heads, bool multiply_keys_by_score);

// A module's router kwargs with its own use_triton folded in (the fused
// coordinate-descent kernels run either way).
inline RouterKwargs module_router_kwargs(RouterKwargs kwargs, bool use_triton) {
  if (use_triton) kwargs.use_triton(true);
  return kwargs;
}

}  // namespace nn
}  // namespace colt5
