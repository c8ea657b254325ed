#include "program/model.h"

#include <torch/torch.h>
#ifdef COLT5_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#endif

#include <cmath>
#include <cstdio>
#include <fstream>
#include <string>

#include "colt5/nn/attention.h"
#include "program/error.h"

namespace colt5 {
namespace app {

namespace nn = colt5::nn;

DenseCausalAttentionImpl::DenseCausalAttentionImpl(int64_t dim, int64_t heads_, int64_t dim_head_)
    : heads(heads_), dim_head(dim_head_) {
  norm = register_module("norm", nn::RMSNorm(dim));
  to_qkv =
      register_module("to_qkv", torch::nn::Linear(torch::nn::LinearOptions(dim, 3 * heads * dim_head).bias(false)));
  to_out = register_module("to_out", torch::nn::Linear(torch::nn::LinearOptions(heads * dim_head, dim).bias(false)));
}

torch::Tensor DenseCausalAttentionImpl::forward(const torch::Tensor& x) {
  const int64_t b = x.size(0), n = x.size(1);
  auto qkv = to_qkv->forward(norm->forward(x)).view({b, n, 3, heads, dim_head}).permute({2, 0, 3, 1, 4});
  auto causal = torch::ones({n, n}, torch::TensorOptions().dtype(torch::kBool).device(x.device())).tril();
  auto out = nn::attend(qkv[0], qkv[1], qkv[2], causal);  // (b, h, n, d)
  return to_out->forward(out.permute({0, 2, 1, 3}).reshape({b, n, heads * dim_head}));
}

DecoderBlockImpl::DecoderBlockImpl(const ModelConfig& m) : cfg_(m) {
  const auto& a = m.attn;
  switch (m.arch) {
    case Arch::light_only:
      light_attn = register_module("attn", nn::LocalMHA(nn::LocalMHAOptions(a.dim(), a.light_window_size())
                                                            .dim_head(a.light_dim_head())
                                                            .heads(a.light_heads())
                                                            .causal(true)
                                                            .prenorm(true)
                                                            .exact_windowsize(false)
                                                            .use_rotary_pos_emb(false)));
      plain_ff = register_module("ff", nn::FeedForward(nn::FeedForwardOptions(a.dim()).mult(m.ff.light_ff_mult())));
      break;
    case Arch::dense:
      dense_attn = register_module("attn", DenseCausalAttention(a.dim(), a.heavy_heads(), a.heavy_dim_head()));
      plain_ff = register_module("ff", nn::FeedForward(nn::FeedForwardOptions(a.dim()).mult(m.ff.heavy_ff_mult())));
      break;
    case Arch::routed:
      attn = register_module("attn", nn::ConditionalRoutedAutoregressiveAttention(a));
      ff = register_module("ff", nn::ConditionalRoutedFeedForward(m.feedforward_options()));
      break;
  }
}

torch::Tensor DecoderBlockImpl::forward(torch::Tensor x) {
  switch (cfg_.arch) {
    case Arch::light_only: {
      // x as the norms pass it on (one gradient of x from the norm and the
      // residual, as the routed modules' residual forwards give it).
      torch::Tensor x_passed;
      torch::Tensor y = light_attn->forward_with_output_bias(x, {}, {}, &x_passed);
      return plain_ff_residual(nn::residual_add(x_passed, y));
    }
    case Arch::dense:
      return plain_ff_residual(nn::residual_add(x, dense_attn->forward(x)));
    case Arch::routed:
      break;
  }
  // Each routed module adds its residual in its output's pass (and on CUDA
  // gives x one gradient from all its uses).
  return routed_ff(attn->residual_forward(x));
}

torch::Tensor DecoderBlockImpl::plain_ff_residual(const torch::Tensor& x) {
  auto [y, x_passed] = plain_ff->forward_passing(x);
  return nn::residual_add(x_passed, y);
}

// x plus the routed feedforward of x. The feedforward routes inside each heavy
// window, not over the whole sequence: a top-k over the whole sequence would
// let every token's routing depend on all later tokens. Per window it has the
// attention's granularity.
torch::Tensor DecoderBlockImpl::routed_ff(const torch::Tensor& x) {
  const int64_t b = x.size(0), n = x.size(1), d = x.size(2), w = cfg_.heavy_window();
  const int64_t windows = (n + w - 1) / w, padded = windows * w;
  torch::Tensor xp =
      padded == n ? x : torch::nn::functional::pad(x, torch::nn::functional::PadFuncOptions({0, 0, 0, padded - n}));
  torch::Tensor mask;
  if (padded != n) {
    mask = torch::ones({b, padded}, torch::TensorOptions().dtype(torch::kBool).device(x.device()));
    mask.narrow(1, n, padded - n).fill_(false);
    mask = mask.reshape({b * windows, w});
  }
  torch::Tensor out = ff->residual_forward(xp.reshape({b * windows, w, d}), mask);
  out = out.reshape({b, padded, d});
  return padded == n ? out : out.narrow(1, 0, n);
}

LanguageModelImpl::LanguageModelImpl(const ModelConfig& m) : cfg(m) {
  validate(m);
  token_emb = register_module("token_emb", torch::nn::Embedding(m.vocab_size, m.dim()));
  pos_emb = register_module("pos_emb", torch::nn::Embedding(m.max_seq_len, m.dim()));
  layers = register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < m.depth; ++i) layers->push_back(DecoderBlock(m));
  norm = register_module("norm", nn::RMSNorm(m.dim()));
  to_logits =
      register_module("to_logits", torch::nn::Linear(torch::nn::LinearOptions(m.dim(), m.vocab_size).bias(false)));
  torch::NoGradGuard no_grad;
  token_emb->weight.normal_(0.0, 0.02);
  pos_emb->weight.normal_(0.0, 0.02);
}

torch::Tensor LanguageModelImpl::hidden(const torch::Tensor& tokens) {
  TORCH_CHECK(tokens.dim() == 2, "tokens must be (batch, length), got ", tokens.sizes());
  TORCH_CHECK(tokens.size(1) >= 1 && tokens.size(1) <= cfg.max_seq_len, "sequence length ", tokens.size(1),
              " is outside 1..", cfg.max_seq_len, " (the model's position table)");
  auto pos = torch::arange(tokens.size(1), torch::TensorOptions().dtype(torch::kLong).device(tokens.device()));
  torch::Tensor x = token_emb->forward(tokens) + pos_emb->forward(pos).unsqueeze(0);
  for (const auto& layer : *layers) x = layer->as<DecoderBlock>()->forward(x);
  return norm->forward(x);
}

torch::Tensor check_model_runs(LanguageModelImpl& model, const std::string& source) {
  const bool was_training = model.is_training();
  model.eval();
  const auto device = model.token_emb->weight.device();
  const int64_t n = std::min<int64_t>(model.cfg.max_seq_len, 16);
  torch::Tensor tokens =
      torch::arange(n, torch::TensorOptions(device).dtype(torch::kLong)).remainder(model.cfg.vocab_size).unsqueeze(0);
  torch::Tensor logits;
  std::string problem;
  try {
    torch::NoGradGuard no_grad;
    logits = model.forward(tokens);
    if (!torch::isfinite(logits).all().item<bool>()) problem = "the logits hold NaN or infinite values";
  } catch (const c10::Error& e) {
    problem = e.what_without_backtrace();
  }
  model.train(was_training);
  if (!problem.empty())
    throw UsageError("'" + source + "': the weights are finite but a forward pass over " + std::to_string(n) +
                     " tokens fails (" + problem + "): the checkpoint is damaged");
  return logits;
}

int64_t count_parameters(const torch::nn::Module& module) {
  int64_t total = 0;
  for (const auto& p : module.parameters()) total += p.numel();
  return total;
}

namespace {

double file_number(const char* path) {
  std::ifstream in(path);
  std::string text;
  if (!(in >> text) || text == "max") return NAN;
  try {
    return std::stod(text);
  } catch (const std::exception&) {
    return NAN;
  }
}

double meminfo_bytes(const std::string& field) {
  std::ifstream in("/proc/meminfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(field + ":", 0) == 0) {
      try {
        return std::stod(line.substr(field.size() + 1)) * 1024.0;
      } catch (const std::exception&) {
        return NAN;
      }
    }
  return NAN;
}

std::string gib(double bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, bytes < 0.1 * 1073741824.0 ? "%.3f GiB" : "%.1f GiB", bytes / 1073741824.0);
  return buf;
}

}  // namespace

double estimate_parameters(const ModelConfig& m) {
  const auto& a = m.attn;
  const double d = static_cast<double>(m.dim());
  const double light_inner = static_cast<double>(a.light_heads() * a.light_dim_head());
  const double heavy_inner = static_cast<double>(a.heavy_heads() * a.heavy_dim_head());
  const double light_ff = 2.0 * d * std::ceil(d * m.ff.light_ff_mult());
  const double heavy_ff = 2.0 * d * std::ceil(d * m.ff.heavy_ff_mult());
  double block = 0;
  switch (m.arch) {
    case Arch::light_only:
      block = 4 * d * light_inner + light_ff;
      break;
    case Arch::dense:
      block = 4 * d * heavy_inner + heavy_ff;
      break;
    case Arch::routed:
      block = 4 * d * light_inner + 4 * d * heavy_inner + light_ff + heavy_ff;
      break;
  }
  const double embeddings = static_cast<double>(2 * m.vocab_size + m.max_seq_len) * d;
  return block * static_cast<double>(m.depth) + embeddings;
}

MemoryEstimate estimate_memory(const ModelConfig& m, int64_t batch, int64_t seq_len, bool training, bool bf16) {
  MemoryEstimate e;
  e.parameters = estimate_parameters(m);
  const double tokens = static_cast<double>(batch) * static_cast<double>(seq_len);
  const double units = tokens * static_cast<double>(m.depth) * static_cast<double>(m.dim());
  // Below the measured 150-190 bytes on purpose: a run refused must be one that cannot fit.
  const double per_unit = training ? (bf16 ? 64.0 : 128.0) : 16.0;
  const double logits = tokens * static_cast<double>(m.vocab_size) * 4.0 * (training ? 3.0 : 1.0);
  e.bytes = e.parameters * 4.0 * (training ? 4.0 : 1.0) + units * per_unit + logits;
  return e;
}

double available_memory(const torch::Device& device) {
  if (device.is_cuda()) {
#ifdef COLT5_WITH_CUDA
    size_t free_bytes = 0, total = 0;
    const c10::cuda::CUDAGuard guard(device.index() >= 0 ? device.index() : 0);
    if (cudaMemGetInfo(&free_bytes, &total) == cudaSuccess) return static_cast<double>(free_bytes);
#endif
    return NAN;
  }
  double bytes = meminfo_bytes("MemAvailable") + meminfo_bytes("SwapFree");
  // A cgroup v2 limit (containers, systemd units) below what the machine has.
  const double limit = file_number("/sys/fs/cgroup/memory.max");
  const double used = file_number("/sys/fs/cgroup/memory.current");
  if (std::isfinite(limit) && std::isfinite(used) && limit - used < bytes) bytes = std::max(0.0, limit - used);
  return bytes;
}

void check_memory_fits(const ModelConfig& m, int64_t batch, int64_t seq_len, bool training, bool bf16,
                       const torch::Device& device, const std::string& what) {
  const MemoryEstimate e = estimate_memory(m, batch, seq_len, training, bf16);
  const double available = available_memory(device);
  if (!std::isfinite(available) || e.bytes <= available) return;
  char params[32];
  std::snprintf(params, sizeof params, "%.3g", e.parameters);
  throw UsageError(what + " cannot fit: it needs about " + gib(e.bytes) + " (estimated: " + params + " parameters" +
                   (training ? " with their gradients and AdamW moments" : "") + ", and the " +
                   (training ? "activations kept for the backward" : "activations") + " of " + std::to_string(batch) +
                   " x " + std::to_string(seq_len) + " tokens through " + std::to_string(m.depth) +
                   " layers of width " + std::to_string(m.dim()) + ") but " +
                   (device.is_cuda() ? "the GPU has " : "this machine has ") + gib(available) +
                   " available; use a smaller --batch, --seq-len, --dim or --depth");
}

}  // namespace app
}  // namespace colt5
