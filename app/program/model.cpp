#include "program/model.h"

#include <torch/torch.h>

#include "colt5/nn/attention.h"

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
    case Arch::light_only:
      x = light_attn->forward(x) + x;
      return plain_ff->forward(x) + x;
    case Arch::dense:
      x = dense_attn->forward(x) + x;
      return plain_ff->forward(x) + x;
    case Arch::routed:
      break;
  }
  x = attn->forward(x) + x;
  return routed_ff(x) + x;
}

// The feedforward routes inside each heavy window, not over the whole
// sequence: a top-k over the whole sequence would let every token's routing
// depend on all later tokens. Per window it has the attention's granularity.
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
  torch::Tensor out = ff->forward(xp.reshape({b * windows, w, d}), mask);
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

int64_t count_parameters(const torch::nn::Module& module) {
  int64_t total = 0;
  for (const auto& p : module.parameters()) total += p.numel();
  return total;
}

}  // namespace app
}  // namespace colt5
