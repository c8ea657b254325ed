// The README's routed attention: 2 x 32768 tokens of width 512, 1024 routed
// queries and key/values. `--small` runs reduced sizes on the CPU.
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

  colt5::nn::ConditionalRoutedAttention attn(colt5::nn::ConditionalRoutedAttentionOptions(dim, heavy, heavy)
                                                 .light_dim_head(64)  // head dimension of the light branch
                                                 .light_heads(small ? 2 : 8)
                                                 .light_window_size(128)  // local receptive field of the light branch
                                                 .heavy_dim_head(64)      // head dimension of the heavy branch
                                                 .heavy_heads(small ? 2 : 8));
  attn->to(device);

  torch::NoGradGuard no_grad;
  auto attn_out = attn(tokens, mask);  // light and heavy branch summed
  std::cout << "attn_out " << attn_out.sizes() << " on " << device << "\n";
  return 0;
}
