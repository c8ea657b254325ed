// The README's routed autoregressive attention on 2 x 8192 tokens of width
// 512: windows of 128, 32 routed queries per window, 1024 routed key/values
// in two sets. `--small` runs reduced sizes on the CPU.
#include <torch/torch.h>

#include <cstring>
#include <iostream>

#include "colt5/nn/conditional.h"

int main(int argc, char** argv) {
  const bool small = argc > 1 && std::strcmp(argv[1], "--small") == 0;
  const torch::Device device = !small && torch::cuda::is_available() ? torch::kCUDA : torch::kCPU;
  const int64_t seq = small ? 1024 : 8192, dim = small ? 128 : 512, kv = small ? 256 : 1024;

  auto tokens = torch::randn({2, seq, dim}, device);

  colt5::nn::ConditionalRoutedAutoregressiveAttention attn(
      colt5::nn::ConditionalRoutedAutoregressiveAttentionOptions(dim, /*num_heavy_tokens_q=*/32,
                                                                 /*num_heavy_tokens_kv=*/kv)
          .light_dim_head(64)
          .light_heads(small ? 2 : 8)
          .light_window_size(128)
          .heavy_window_size(128)
          .heavy_dim_head(64)
          .heavy_heads(small ? 4 : 8)
          .num_routed_kv(2)  // groups of heads attend to different sets of key/values
          .use_triton(true)
          .use_flash_attn(true));
  attn->to(device);

  torch::NoGradGuard no_grad;
  auto attn_out = attn(tokens) + tokens;  // with the residual (prenorm is included)
  std::cout << "attn_out " << attn_out.sizes() << " on " << device << "\n";
  return 0;
}
