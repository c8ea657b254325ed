// The decoder language model of the `colt5` program: token and position
// embeddings, N blocks of attention + feedforward (each with a residual; the
// modules normalize their own inputs), a final RMSNorm and a linear head.
// Blocks by ModelConfig::arch:
//   routed      ConditionalRoutedAutoregressiveAttention + ConditionalRoutedFeedForward
//   light-only  causal LocalMHA + FeedForward, the routed model's light branches
//   dense       full causal attention + FeedForward at the heavy branches' widths
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include "colt5/nn/conditional.h"
#include "colt5/nn/layers.h"
#include "colt5/nn/local_attention.h"
#include "program/config.h"

namespace colt5 {
namespace app {

// Full causal multi-head attention: RMSNorm, q/k/v projections, fused attention, output projection.
class DenseCausalAttentionImpl : public torch::nn::Module {
 public:
  DenseCausalAttentionImpl(int64_t dim, int64_t heads, int64_t dim_head);
  torch::Tensor forward(const torch::Tensor& x);  // (b, n, dim) -> (b, n, dim)

  int64_t heads, dim_head;
  colt5::nn::RMSNorm norm{nullptr};
  torch::nn::Linear to_qkv{nullptr};
  torch::nn::Linear to_out{nullptr};
};
TORCH_MODULE(DenseCausalAttention);

class DecoderBlockImpl : public torch::nn::Module {
 public:
  explicit DecoderBlockImpl(const ModelConfig& m);
  torch::Tensor forward(torch::Tensor x);

  colt5::nn::ConditionalRoutedAutoregressiveAttention attn{nullptr};
  colt5::nn::ConditionalRoutedFeedForward ff{nullptr};
  colt5::nn::LocalMHA light_attn{nullptr};
  DenseCausalAttention dense_attn{nullptr};
  colt5::nn::FeedForward plain_ff{nullptr};

 private:
  torch::Tensor routed_ff(const torch::Tensor& x);
  ModelConfig cfg_;
};
TORCH_MODULE(DecoderBlock);

class LanguageModelImpl : public torch::nn::Module {
 public:
  explicit LanguageModelImpl(const ModelConfig& m);

  // tokens: int64 (b, n), n <= max_seq_len -> final normalized hidden states (b, n, dim).
  torch::Tensor hidden(const torch::Tensor& tokens);
  torch::Tensor logits(const torch::Tensor& hidden_states) { return to_logits->forward(hidden_states); }
  torch::Tensor forward(const torch::Tensor& tokens) { return logits(hidden(tokens)); }

  ModelConfig cfg;
  torch::nn::Embedding token_emb{nullptr};
  torch::nn::Embedding pos_emb{nullptr};
  torch::nn::ModuleList layers{nullptr};
  colt5::nn::RMSNorm norm{nullptr};
  torch::nn::Linear to_logits{nullptr};
};
TORCH_MODULE(LanguageModel);

int64_t count_parameters(const torch::nn::Module& module);

}  // namespace app
}  // namespace colt5
