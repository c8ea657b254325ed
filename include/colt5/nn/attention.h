// Dense attention pieces: the attention core, the heavy routed-token
// `Attention` (several key/value routes, learned null key/value, score
// gating, rotary) and the plain `SelfAttention` of the image light branch.
#pragma once

#include <torch/nn/modules/common.h>
#include <torch/nn/modules/container/any_value.h>

#include <torch/nn.h>

#include <cstdint>
#include <utility>

#include "colt5/nn/layers.h"

namespace colt5 {
namespace nn {

// softmax(q k^T / sqrt(d)) v over (b, h, i, d) queries and (b, h, j, d)
// keys/values. mask: optional bool, broadcastable to (b, h, i, j), true =
// attend. With use_fused and a LibTorch that has it, runs
// at::scaled_dot_product_attention; float64 always takes the explicit path
// (masked entries filled with the most negative finite value, then softmax),
// so float64 results are exact math. A row with every key masked gives the
// explicit path's uniform average.
torch::Tensor attend(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                     const torch::Tensor& mask = {}, bool use_fused = true);

// Whether this build of colt5 can call the fused attention at all.
bool fused_attention_available();

// ---------------------------------------------------------------- Attention

struct AttentionOptions {
  /* implicit */ AttentionOptions(int64_t dim) : dim_(dim) {}
  /// Width of the tokens.
  TORCH_ARG(int64_t, dim);
  /// Width of an attention head.
  TORCH_ARG(int64_t, dim_head) = 64;
  /// Attention heads.
  TORCH_ARG(int64_t, heads) = 8;
  /// Scale the keys (and values) by the key scores given to forward().
  TORCH_ARG(bool, multiply_keys_by_score) = false;
  /// Fused scaled-dot-product attention where available (not for float64).
  TORCH_ARG(bool, use_flash) = true;
};

// Parameters: norm.gamma, null_kv (2, heads, dim_head), to_q.weight,
// to_kv.weight, to_out.weight.
class AttentionImpl : public torch::nn::Cloneable<AttentionImpl> {
 public:
  explicit AttentionImpl(int64_t dim) : AttentionImpl(AttentionOptions(dim)) {}
  explicit AttentionImpl(const AttentionOptions& options);

  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  // x: (b, n, dim) queries.
  // context: keys/values, (b, m, dim), or (b, r, m, dim) for r key/value
  //   routes (heads must be divisible by r; route i uses heads
  //   [i*heads/r, (i+1)*heads/r)). Undefined: x itself.
  // mask: bool key padding mask, (b, m) or (b, r, m); true = keep. A learned
  //   null key/value is always prepended and never masked.
  // normalized_scores_kv: (b, m) or (b, r, m); values (and keys with
  //   multiply_keys_by_score) are multiplied by them.
  // normalized_scores_q: (b, n); queries are multiplied by them.
  // rotary_emb: (q freqs, k freqs), both defined or both undefined. q freqs
  //   (n, dim_head) or (b, 1, n, dim_head); k freqs (m, dim_head),
  //   (b, 1, m, dim_head) or (b, r, 1, m, dim_head).
  // Returns (b, n, dim).
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& context = {}, const torch::Tensor& mask = {},
                        const torch::Tensor& normalized_scores_kv = {}, const torch::Tensor& normalized_scores_q = {},
                        const std::pair<torch::Tensor, torch::Tensor>& rotary_emb = {});

 protected:
  FORWARD_HAS_DEFAULT_ARGS({1, torch::nn::AnyValue(torch::Tensor())}, {2, torch::nn::AnyValue(torch::Tensor())},
                           {3, torch::nn::AnyValue(torch::Tensor())}, {4, torch::nn::AnyValue(torch::Tensor())},
                           {5, torch::nn::AnyValue(std::pair<torch::Tensor, torch::Tensor>())})

 public:
  AttentionOptions options;
  RMSNorm norm{nullptr};
  torch::Tensor null_kv;
  torch::nn::Linear to_q{nullptr};
  torch::nn::Linear to_kv{nullptr};
  torch::nn::Linear to_out{nullptr};
};
TORCH_MODULE(Attention);

// ---------------------------------------------------------------- SelfAttention

struct SelfAttentionOptions {
  /* implicit */ SelfAttentionOptions(int64_t dim) : dim_(dim) {}
  /// Width of the tokens.
  TORCH_ARG(int64_t, dim);
  /// Width of an attention head.
  TORCH_ARG(int64_t, dim_head) = 64;
  /// Attention heads.
  TORCH_ARG(int64_t, heads) = 8;
  /// Fused scaled-dot-product attention where available (not for float64).
  TORCH_ARG(bool, use_flash) = true;
  /// RMSNorm (norm.gamma) before the projections.
  TORCH_ARG(bool, prenorm) = false;
};

// Parameters: norm.gamma (with prenorm), to_qkv.weight, to_out.weight.
class SelfAttentionImpl : public torch::nn::Cloneable<SelfAttentionImpl> {
 public:
  explicit SelfAttentionImpl(int64_t dim) : SelfAttentionImpl(SelfAttentionOptions(dim)) {}
  explicit SelfAttentionImpl(const SelfAttentionOptions& options);

  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  // x: (b, n, dim) -> (b, n, dim), every token attending to every token.
  torch::Tensor forward(const torch::Tensor& x);

  SelfAttentionOptions options;
  RMSNorm norm{nullptr};
  torch::nn::Linear to_qkv{nullptr};
  torch::nn::Linear to_out{nullptr};
};
TORCH_MODULE(SelfAttention);

}  // namespace nn
}  // namespace colt5
