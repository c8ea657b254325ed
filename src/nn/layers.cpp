#include "colt5/nn/layers.h"

#include <ATen/record_function.h>

#include <cmath>

namespace colt5 {
namespace nn {

// ---------------------------------------------------------------- RMSNorm

RMSNormImpl::RMSNormImpl(const RMSNormOptions& options_) : options(options_) { reset(); }

void RMSNormImpl::reset() {
  TORCH_CHECK(options.dim() > 0, "RMSNorm: dim must be positive, got ", options.dim());
  gamma = register_parameter("gamma", torch::ones({options.dim()}));
}

void RMSNormImpl::pretty_print(std::ostream& stream) const {
  stream << "colt5::nn::RMSNorm(dim=" << options.dim() << ")";
}

torch::Tensor RMSNormImpl::forward(const torch::Tensor& x) {
  TORCH_CHECK(x.defined(), "RMSNorm: input x is undefined");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == options.dim(), "RMSNorm: input x must end in dimension ", options.dim(),
              ", got shape ", x.sizes());
  const double scale = std::sqrt(static_cast<double>(options.dim()));
  // F.normalize: x / max(||x||, 1e-12); the row factor and sqrt(dim) are
  // combined before touching x (two passes over x instead of three).
  auto factor = x.norm(2, {-1}, /*keepdim=*/true).clamp_min(1e-12).reciprocal() * scale;
  return x * factor * gamma;
}

// ---------------------------------------------------------------- FeedForward

FeedForwardImpl::FeedForwardImpl(const FeedForwardOptions& options_) : options(options_) { reset(); }

int64_t FeedForwardImpl::hidden_dim() const {
  return static_cast<int64_t>(static_cast<double>(options.dim()) * options.mult());
}

void FeedForwardImpl::reset() {
  TORCH_CHECK(options.dim() > 0, "FeedForward: dim must be positive, got ", options.dim());
  TORCH_CHECK(std::isfinite(options.mult()) && options.mult() > 0, "FeedForward: mult must be positive, got ",
              options.mult());
  const int64_t hidden = hidden_dim();
  TORCH_CHECK(hidden > 0, "FeedForward: int(dim * mult) = int(", options.dim(), " * ", options.mult(),
              ") is 0; the hidden layer would be empty");
  norm = register_module("0", RMSNorm(options.dim()));
  proj_in = register_module("1", torch::nn::Linear(options.dim(), hidden));
  act = register_module("2", torch::nn::GELU());
  proj_out = register_module("3", torch::nn::Linear(hidden, options.dim()));
}

void FeedForwardImpl::pretty_print(std::ostream& stream) const {
  stream << "colt5::nn::FeedForward(dim=" << options.dim() << ", mult=" << options.mult() << ")";
}

torch::Tensor FeedForwardImpl::forward(const torch::Tensor& x) {
  RECORD_USER_SCOPE("colt5::feedforward");
  TORCH_CHECK(x.defined(), "FeedForward: input x is undefined");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == options.dim(), "FeedForward: input x must end in dimension ", options.dim(),
              ", got shape ", x.sizes());
  return proj_out->forward(torch::gelu(proj_in->forward(norm->forward(x))));
}

// ---------------------------------------------------------------- rotary embedding

RotaryEmbeddingImpl::RotaryEmbeddingImpl(const RotaryEmbeddingOptions& options_) : options(options_) { reset(); }

void RotaryEmbeddingImpl::reset() {
  TORCH_CHECK(options.dim() > 0 && options.dim() % 2 == 0, "RotaryEmbedding: dim must be positive and even, got ",
              options.dim());
  TORCH_CHECK(std::isfinite(options.theta()) && options.theta() > 0, "RotaryEmbedding: theta must be positive, got ",
              options.theta());
  auto exponent = torch::arange(0, options.dim(), 2, torch::kFloat) / static_cast<double>(options.dim());
  auto values = 1.0 / torch::pow(options.theta(), exponent);
  inv_freq = register_buffer("inv_freq", values);
}

void RotaryEmbeddingImpl::pretty_print(std::ostream& stream) const {
  stream << "colt5::nn::RotaryEmbedding(dim=" << options.dim() << ", theta=" << options.theta() << ")";
}

torch::Tensor RotaryEmbeddingImpl::forward(int64_t seq_len) {
  TORCH_CHECK(seq_len >= 0, "RotaryEmbedding: seq_len must be non-negative, got ", seq_len);
  auto t = torch::arange(seq_len, inv_freq.options());
  auto freqs = torch::outer(t, inv_freq);
  return torch::cat({freqs, freqs}, -1);
}

torch::Tensor rotate_half(const torch::Tensor& x) {
  TORCH_CHECK(x.defined(), "rotate_half: x is undefined");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) % 2 == 0, "rotate_half: the last dimension of x must be even, got shape ",
              x.sizes());
  auto halves = x.chunk(2, -1);
  return torch::cat({-halves[1], halves[0]}, -1);
}

torch::Tensor apply_rotary_pos_emb(const torch::Tensor& pos, const torch::Tensor& t) {
  TORCH_CHECK(pos.defined() && t.defined(), "apply_rotary_pos_emb: pos and t must be defined");
  TORCH_CHECK(pos.dim() >= 1 && t.dim() >= 1 && pos.size(-1) == t.size(-1),
              "apply_rotary_pos_emb: pos must end in t's last dimension ", t.size(-1), ", got pos shape ", pos.sizes(),
              " and t shape ", t.sizes());
  auto out = t * pos.cos() + rotate_half(t) * pos.sin();
  return out.scalar_type() == t.scalar_type() ? out : out.to(t.scalar_type());
}

}  // namespace nn
}  // namespace colt5
