// The heavy Attention in parts, for callers that project keys/values once and
// gather the projected rows (the autoregressive module's windows):
// AttentionImpl::forward is project_queries + the key/value projection +
// attend_projected.
#pragma once

#include <ATen/core/Tensor.h>

#include <utility>

#include "colt5/nn/attention.h"

namespace colt5 {
namespace nn {

// Queries from normalized tokens xn [b, n, dim], times scores_q [b, n] when
// defined: [b, heads, n, dim_head].
torch::Tensor project_queries(AttentionImpl& a, const torch::Tensor& xn, const torch::Tensor& scores_q);

// Normalized and projected keys/values of every token of context [..., dim]:
// [..., heads * 2 * dim_head], (route, head) blocks of 2 * dim_head (keys
// first) in the order of to_kv's rows. With context_passed: the context as the
// norm passes it on (RMSNorm::forward_passing), for its uses downstream.
torch::Tensor project_keys_values(AttentionImpl& a, const torch::Tensor& context,
                                  torch::Tensor* context_passed = nullptr);

// Attention of projected queries q [b, heads, n, dim_head] over projected
// keys/values kv [b, routes, heads / routes, m, 2 * dim_head]; x: the queries'
// tokens (dtype and device of the output). mask: bool [b, m] or [b, routes, m];
// scores_kv: [b, routes, 1, m, 1] in kv's dtype (or undefined); rotary as for
// AttentionImpl::forward. Returns [b, n, dim].
torch::Tensor attend_projected(AttentionImpl& a, const torch::Tensor& x, const torch::Tensor& q,
                               const torch::Tensor& kv, const torch::Tensor& mask, const torch::Tensor& scores_kv,
                               const std::pair<torch::Tensor, torch::Tensor>& rotary_emb);

// The same without rotary embeddings, gathering straight from the table of
// projected rows: proj [N * routes, heads / routes * 2 * dim_head] (as
// project_keys_values, one route's heads per row), rows [b, routes, m] indices
// into it, mask bool [b, routes, m] (or undefined), scores_kv [b, routes, m]
// (or undefined). Each route's null key/value is appended to the table and
// gathered as position 0 of every set, and the attention runs on the gathered
// rows with the routes folded into the batch. On the CPU where gradients are
// recorded one pass gathers the rows and scales them by the scores (its
// backward: one pass for the scores' gradients, one adding the rows' gradients
// into the table's); elsewhere the gathered rows are viewed in place.
// On CUDA (float32, float16 or bfloat16; head width 16, 32, 64 or 128) the
// attention instead reads the rows by index in one kernel, forward and
// backward, with no gathered copy at all, unless index_kernel is false.
// pair_views >= 2 (one route): rows' groups are pair_views consecutive views
// of each context row, whose keys are positions [0, pair_span) of that row
// (table row = context row * pair_span + position), consecutive views sharing
// most keys: the 16-bit backward then takes the groups in pairs and adds each
// shared key's gradient once (COLT5_GATHERED_PAIRS=0 turns that off).
torch::Tensor attend_gathered(AttentionImpl& a, const torch::Tensor& x, const torch::Tensor& q,
                              const torch::Tensor& proj, const torch::Tensor& rows, const torch::Tensor& mask,
                              const torch::Tensor& scores_kv, bool index_kernel = true, int64_t pair_views = 0,
                              int64_t pair_span = 0);

}  // namespace nn
}  // namespace colt5
