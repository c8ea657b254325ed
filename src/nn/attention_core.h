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
// first) in the order of to_kv's rows.
torch::Tensor project_keys_values(AttentionImpl& a, const torch::Tensor& context);

// Attention of projected queries q [b, heads, n, dim_head] over projected
// keys/values kv [b, routes, heads / routes, m, 2 * dim_head]; x: the queries'
// tokens (dtype and device of the output). mask: bool [b, m] or [b, routes, m];
// scores_kv: [b, routes, 1, m, 1] in kv's dtype (or undefined); rotary as for
// AttentionImpl::forward. Returns [b, n, dim].
torch::Tensor attend_projected(AttentionImpl& a, const torch::Tensor& x, const torch::Tensor& q,
                               const torch::Tensor& kv, const torch::Tensor& mask, const torch::Tensor& scores_kv,
                               const std::pair<torch::Tensor, torch::Tensor>& rotary_emb);

}  // namespace nn
}  // namespace colt5
