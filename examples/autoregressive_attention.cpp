// The README's routed autoregressive attention on 2 x 8192 tokens of width
// 512: windows of 128, 32 routed queries per window, 1024 routed key/values
// in two sets. `--small` runs reduced sizes on the CPU.
#include <torch/torch.h>

#include <iostream>

#include "example_args.h"
#include "colt5/nn/conditional.h"

int main(int argc, char** argv) {
  const ExampleArgs args(argc, argv);
  const int64_t seq = args.size(8192, 1024), dim = args.size(512, 128), kv = args.size(1024, 256);

  auto tokens = args.tokens(2, seq, dim);

  colt5::nn::ConditionalRoutedAutoregressiveAttention attn(
      colt5::nn::ConditionalRoutedAutoregressiveAttentionOptions(dim, /*num_heavy_tokens_q=*/32,
                                                                 /*num_heavy_tokens_kv=*/kv)
          .light_dim_head(64)
          .light_heads(args.size(8, 2))
          .light_window_size(128)
          .heavy_window_size(128)
          .heavy_dim_head(64)
          .heavy_heads(args.size(8, 4))
          .num_routed_kv(2)  // groups of heads attend to different sets of key/values
          .use_triton(true)
          .use_flash_attn(true));
  attn->to(args.device);

  torch::NoGradGuard no_grad;
  auto attn_out = attn(tokens) + tokens;  // with the residual (prenorm is included)
  std::cout << "attn_out " << attn_out.sizes() << " on " << args.device << "\n";
  return 0;
}
