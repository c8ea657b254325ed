// The README's complete routed transformer block (attention and feedforward,
// each with its residual) on 2 x 32768 tokens of width 512. `--small` runs
// reduced sizes on the CPU.
#include <torch/torch.h>

#include <cstring>
#include <iostream>

#include "colt5/nn/conditional.h"

int main(int argc, char** argv) {
  const bool small = argc > 1 && std::strcmp(argv[1], "--small") == 0;
  const torch::Device device = !small && torch::cuda::is_available() ? torch::kCUDA : torch::kCPU;
  const int64_t seq = small ? 2048 : 32768, dim = small ? 128 : 512, heavy = small ? 128 : 1024;

  auto tokens = torch::randn({2, seq, dim}, device);
  auto mask = torch::ones({2, seq}, torch::TensorOptions().dtype(torch::kBool).device(device));

  colt5::nn::ConditionalRoutedTransformerBlock block(
      colt5::nn::ConditionalRoutedTransformerBlockOptions(dim, /*num_heavy_attn_tokens_q=*/heavy,
                                                          /*num_heavy_attn_tokens_kv=*/heavy,
                                                          /*num_heavy_ff_tokens=*/heavy)
          .light_dim_head(64)
          .light_heads(small ? 2 : 8)
          .light_window_size(128)
          .heavy_dim_head(64)
          .heavy_heads(small ? 2 : 8)
          .light_ff_mult(0.5)
          .heavy_ff_mult(4));
  block->to(device);

  torch::NoGradGuard no_grad;
  auto block_out = block(tokens, mask);
  std::cout << "block_out " << block_out.sizes() << " on " << device << "\n";
  return 0;
}
