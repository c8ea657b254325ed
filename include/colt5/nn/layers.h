// Small building blocks shared by the routed modules: RMSNorm, the two-layer
// feedforward, and rotary position embeddings.
#pragma once

#include <torch/nn.h>

#include <cstdint>
#include <utility>
#include <vector>

namespace colt5 {
namespace nn {

// ---------------------------------------------------------------- RMSNorm

struct RMSNormOptions {
  /* implicit */ RMSNormOptions(int64_t dim) : dim_(dim) {}
  /// Width of the tokens.
  TORCH_ARG(int64_t, dim);
  /// On CUDA (float32, float16, bfloat16; dim up to 2048): one kernel forward
  /// and one backward instead of the composite (the same results to rounding;
  /// false: the composite, for comparison).
  TORCH_ARG(bool, cuda_kernel) = true;
  /// Under autocast (CUDA or CPU, bfloat16 or float16) with float32 x and
  /// gamma: return the output in the autocast dtype, as the matrix product it
  /// feeds would cast it (the same values; on CUDA the kernel writes the
  /// 16-bit rows directly, saving a float32 write and a cast each way).
  /// false: the output stays float32 under autocast. FeedForward and
  /// Attention set it for their norms, whose outputs only feed projections.
  TORCH_ARG(bool, autocast_output) = false;
};

// l2-normalizes the last dimension (norm clamped at 1e-12, as F.normalize),
// then scales by sqrt(dim) and the learned gain `gamma`.
class RMSNormImpl : public torch::nn::Cloneable<RMSNormImpl> {
 public:
  explicit RMSNormImpl(int64_t dim) : RMSNormImpl(RMSNormOptions(dim)) {}
  explicit RMSNormImpl(const RMSNormOptions& options);

  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  // x: (..., dim) -> same shape.
  torch::Tensor forward(const torch::Tensor& x);

  // (forward(x), x passed on): the second is x itself (the same values and
  // storage) as an output of the norm's autograd node. Use it for x's other
  // uses downstream (a residual sum, a router): their gradient of x then joins
  // the norm's inside its backward (on CUDA, in the kernel's one pass) rather
  // than in an addition of x's size of its own.
  std::pair<torch::Tensor, torch::Tensor> forward_passing(const torch::Tensor& x);

  RMSNormOptions options;
  torch::Tensor gamma;

 private:
  std::vector<torch::Tensor> apply_norm(const torch::Tensor& x, bool pass_x);
};
TORCH_MODULE(RMSNorm);

// Layer normalization over the last dimension with torch::nn::LayerNorm's
// weight and bias (eps: its option). On CUDA with cuda_kernel (float32,
// float16, bfloat16 rows up to 2048 wide; weight and bias float32 or of x's
// type) one kernel forward and one backward, keeping x and two floats per row;
// elsewhere torch::layer_norm. With autocast_output, under autocast the output
// comes in the autocast dtype (see RMSNormOptions::autocast_output). With
// x_passed: x passed on through the norm's node, as RMSNorm::forward_passing
// gives it (x itself where the kernel does not apply).
torch::Tensor layer_norm(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias,
                         double eps = 1e-5, bool autocast_output = false, bool cuda_kernel = true,
                         torch::Tensor* x_passed = nullptr);

// x + y for a residual stream: on CUDA where x is float32 and y
// float16/bfloat16 of the same shape (a branch's output under autocast) one
// vectorized pass, the gradients as autograd's (x's passes through, y's is it
// cast to y's type); elsewhere torch::add(x, y).
torch::Tensor residual_add(const torch::Tensor& x, const torch::Tensor& y);

// ---------------------------------------------------------------- FeedForward

struct FeedForwardOptions {
  /* implicit */ FeedForwardOptions(int64_t dim) : dim_(dim) {}
  /// Width of the tokens.
  TORCH_ARG(int64_t, dim);
  /// Hidden size is int(dim * mult), truncated as Python's int() does.
  TORCH_ARG(double, mult) = 4.0;
};

// RMSNorm -> Linear(dim, hidden) -> GELU (exact erf form) -> Linear(hidden, dim).
// The children are named "0", "1", "2", "3" so the parameter names are those
// of the reference's nn.Sequential: 0.gamma, 1.weight, 1.bias, 3.weight, 3.bias.
class FeedForwardImpl : public torch::nn::Cloneable<FeedForwardImpl> {
 public:
  explicit FeedForwardImpl(int64_t dim, double mult = 4.0) : FeedForwardImpl(FeedForwardOptions(dim).mult(mult)) {}
  explicit FeedForwardImpl(const FeedForwardOptions& options);

  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  int64_t hidden_dim() const;

  // x: (..., dim) -> same shape.
  torch::Tensor forward(const torch::Tensor& x);

  // (forward(x), x passed on through the norm: RMSNorm::forward_passing).
  std::pair<torch::Tensor, torch::Tensor> forward_passing(const torch::Tensor& x);

  FeedForwardOptions options;
  RMSNorm norm{nullptr};
  torch::nn::Linear proj_in{nullptr};
  torch::nn::GELU act{nullptr};
  torch::nn::Linear proj_out{nullptr};

 private:
  torch::Tensor forward_impl(const torch::Tensor& x, torch::Tensor* x_passed);
};
TORCH_MODULE(FeedForward);

// ---------------------------------------------------------------- rotary embedding

struct RotaryEmbeddingOptions {
  /* implicit */ RotaryEmbeddingOptions(int64_t dim) : dim_(dim) {}
  /// Head dimension the frequencies are for (even, > 0).
  TORCH_ARG(int64_t, dim);
  /// Base of the rotary frequencies.
  TORCH_ARG(double, theta) = 10000.0;
};

// Buffer `inv_freq` = 1 / theta^(2i / dim), i < dim / 2, computed in float32
// (the reference's values); converting the module converts the buffer.
class RotaryEmbeddingImpl : public torch::nn::Cloneable<RotaryEmbeddingImpl> {
 public:
  explicit RotaryEmbeddingImpl(int64_t dim, double theta = 10000.0)
      : RotaryEmbeddingImpl(RotaryEmbeddingOptions(dim).theta(theta)) {}
  explicit RotaryEmbeddingImpl(const RotaryEmbeddingOptions& options);

  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  // Frequencies of positions 0..seq_len-1: (seq_len, dim), dtype and device of inv_freq.
  torch::Tensor forward(int64_t seq_len);

  RotaryEmbeddingOptions options;
  torch::Tensor inv_freq;
};
TORCH_MODULE(RotaryEmbedding);

// (x1, x2) halves of the last dimension -> (-x2, x1).
torch::Tensor rotate_half(const torch::Tensor& x);

// t * cos(pos) + rotate_half(t) * sin(pos); pos broadcasts against t. Computed
// in the promoted dtype of pos and t, returned in t's dtype.
torch::Tensor apply_rotary_pos_emb(const torch::Tensor& pos, const torch::Tensor& t);

}  // namespace nn
}  // namespace colt5
