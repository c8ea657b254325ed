// The decoder language model of the `colt5` program: token and position
// embeddings, N blocks of routed autoregressive attention + routed feedforward
// (each with a residual; the modules normalize their own inputs), a final
// RMSNorm and a linear head. With light_only the heavy branches are gone:
// causal LocalMHA + the light feedforward at the same widths.
//
// Header-only so the tests can build it without a library target.
#pragma once

#include <torch/torch.h>

#include "colt5/nn/conditional.h"
#include "colt5/nn/layers.h"
#include "colt5/nn/local_attention.h"

#include "config.h"

namespace colt5 {
namespace app {

inline colt5::nn::RouterKwargs router_kwargs(const ModelConfig& m) {
  return colt5::nn::RouterKwargs()
      .n_iters(m.router_n_iters)
      .fetch_k_ratio(m.router_fetch_k_ratio)
      .eps(m.router_eps)
      .eps_decay(m.router_eps_decay)
      .eps_init(m.router_eps_init)
      .cosine_sim_routing(m.cosine_sim_routing)
      .cosine_sim_scale(m.cosine_sim_scale);
}

class DecoderBlockImpl : public torch::nn::Module {
 public:
  explicit DecoderBlockImpl(const ModelConfig& m) : cfg_(m) {
    if (m.light_only) {
      light_attn = register_module("attn", colt5::nn::LocalMHA(colt5::nn::LocalMHAOptions(m.dim, m.light_window_size)
                                                                   .dim_head(m.light_dim_head)
                                                                   .heads(m.light_heads)
                                                                   .causal(true)
                                                                   .prenorm(true)
                                                                   .exact_windowsize(false)
                                                                   .use_rotary_pos_emb(false)));
      light_ff =
          register_module("ff", colt5::nn::FeedForward(colt5::nn::FeedForwardOptions(m.dim).mult(m.light_ff_mult)));
    } else {
      attn = register_module("attn", colt5::nn::ConditionalRoutedAutoregressiveAttention(
                                         colt5::nn::ConditionalRoutedAutoregressiveAttentionOptions(
                                             m.dim, m.num_heavy_tokens_q, m.num_heavy_tokens_kv)
                                             .num_routed_kv(m.num_routed_kv)
                                             .light_dim_head(m.light_dim_head)
                                             .light_heads(m.light_heads)
                                             .light_window_size(m.light_window_size)
                                             .heavy_window_size(m.effective_heavy_window())
                                             .heavy_dim_head(m.heavy_dim_head)
                                             .heavy_heads(m.heavy_heads)
                                             .router_kwargs(router_kwargs(m))
                                             .use_flash_attn(true)));
      ff = register_module("ff", colt5::nn::ConditionalRoutedFeedForward(
                                     colt5::nn::ConditionalRoutedFeedForwardOptions(m.dim, m.num_heavy_ff_tokens)
                                         .light_ff_mult(m.light_ff_mult)
                                         .heavy_ff_mult(m.heavy_ff_mult)
                                         .router_kwargs(router_kwargs(m))));
    }
  }

  torch::Tensor forward(torch::Tensor x) {
    if (cfg_.light_only) {
      x = light_attn->forward(x) + x;
      return light_ff->forward(x) + x;
    }
    x = attn->forward(x) + x;
    return routed_ff(x) + x;
  }

  colt5::nn::ConditionalRoutedAutoregressiveAttention attn{nullptr};
  colt5::nn::ConditionalRoutedFeedForward ff{nullptr};
  colt5::nn::LocalMHA light_attn{nullptr};
  colt5::nn::FeedForward light_ff{nullptr};

 private:
  // The feedforward routes inside each heavy window, not over the whole
  // sequence: a top-k over the whole sequence would let every token's routing
  // depend on all later tokens. Per window it has the attention's granularity.
  torch::Tensor routed_ff(const torch::Tensor& x) {
    const int64_t b = x.size(0), n = x.size(1), d = x.size(2), w = cfg_.effective_heavy_window();
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

  ModelConfig cfg_;
};
TORCH_MODULE(DecoderBlock);

class LanguageModelImpl : public torch::nn::Module {
 public:
  explicit LanguageModelImpl(const ModelConfig& m) : cfg(m) {
    validate(m);
    token_emb = register_module("token_emb", torch::nn::Embedding(m.vocab_size, m.dim));
    pos_emb = register_module("pos_emb", torch::nn::Embedding(m.max_seq_len, m.dim));
    layers = register_module("layers", torch::nn::ModuleList());
    for (int64_t i = 0; i < m.depth; ++i) layers->push_back(DecoderBlock(m));
    norm = register_module("norm", colt5::nn::RMSNorm(m.dim));
    to_logits =
        register_module("to_logits", torch::nn::Linear(torch::nn::LinearOptions(m.dim, m.vocab_size).bias(false)));
    torch::NoGradGuard no_grad;
    token_emb->weight.normal_(0.0, 0.02);
    pos_emb->weight.normal_(0.0, 0.02);
  }

  // tokens: int64 [b, n], n <= max_seq_len -> final normalized hidden states [b, n, dim].
  torch::Tensor hidden(const torch::Tensor& tokens) {
    TORCH_CHECK(tokens.dim() == 2, "tokens must be [batch, length], got ", tokens.sizes());
    TORCH_CHECK(tokens.size(1) >= 1 && tokens.size(1) <= cfg.max_seq_len, "sequence length ", tokens.size(1),
                " is outside 1..", cfg.max_seq_len, " (the model's position table)");
    auto pos = torch::arange(tokens.size(1), torch::TensorOptions().dtype(torch::kLong).device(tokens.device()));
    torch::Tensor x = token_emb->forward(tokens) + pos_emb->forward(pos).unsqueeze(0);
    for (const auto& layer : *layers) x = layer->as<DecoderBlock>()->forward(x);
    return norm->forward(x);
  }

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

inline int64_t count_parameters(torch::nn::Module& module) {
  int64_t total = 0;
  for (const auto& p : module.parameters()) total += p.numel();
  return total;
}

}  // namespace app
}  // namespace colt5
