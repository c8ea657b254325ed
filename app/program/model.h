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
  // x + the routed feedforward of x, routed within each heavy window.
  torch::Tensor routed_ff(const torch::Tensor& x);
  // x + the plain feedforward of x.
  torch::Tensor plain_ff_residual(const torch::Tensor& x);
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

// A forward pass over a short fixed sequence (token i % vocab at position i,
// up to 16 tokens), run after a checkpoint's weights are loaded: finite weights
// can still be damaged so that the activations overflow. Returns the logits;
// a UsageError naming `source` when the forward fails or gives NaN or
// infinite values. Leaves the model's training mode as it was.
torch::Tensor check_model_runs(LanguageModelImpl& model, const std::string& source);

int64_t count_parameters(const torch::nn::Module& module);

// Memory a run needs, estimated from the settings before anything is built:
// the parameters (counted from the widths: projections, feedforwards,
// embeddings and head; the small vectors left out), and, when training, their
// gradients and AdamW's two moments, plus the activations kept for the
// backward, bytes_per_unit for each token × layer × model dimension (measured
// on the CPU in float32: 150-190; bf16 autocast on the GPU keeps about half).
double estimate_parameters(const ModelConfig& m);
struct MemoryEstimate {
  double parameters = 0;
  double bytes = 0;  // the whole estimate
};
MemoryEstimate estimate_memory(const ModelConfig& m, int64_t batch, int64_t seq_len, bool training, bool bf16);
// Bytes this process may still allocate on `device` (CPU: MemAvailable plus
// free swap, bounded by the cgroup's memory limit; CUDA: the free device
// memory); NaN when unknown.
double available_memory(const torch::Device& device);
// UsageError when the estimate exceeds what is available, naming both and
// the flags that shrink the run. `what` names the run ("training", "colt5 bench's routed model").
void check_memory_fits(const ModelConfig& m, int64_t batch, int64_t seq_len, bool training, bool bf16,
                       const torch::Device& device, const std::string& what);

}  // namespace app
}  // namespace colt5
