// The README's routed image attention: a 1 x 32 x 256 x 256 feature map
// (65536 tokens), 1024 routed queries and key/values, light attention inside
// 32 x 32 windows. `--small` runs a 1 x 32 x 32 x 32 map with 64 routed tokens
// on the CPU.
#include <torch/torch.h>

#include <cstring>
#include <iostream>

#include "colt5/nn/image.h"

int main(int argc, char** argv) {
  const bool small = argc > 1 && std::strcmp(argv[1], "--small") == 0;
  const torch::Device device = !small && torch::cuda::is_available() ? torch::kCUDA : torch::kCPU;
  const int64_t side = small ? 32 : 256, heavy = small ? 64 : 1024, window = small ? 8 : 32;

  colt5::nn::ConditionalRoutedImageAttention attn(
      colt5::nn::ConditionalRoutedImageAttentionOptions(/*dim=*/32, /*num_heavy_tokens_q=*/heavy,
                                                        /*num_heavy_tokens_kv=*/heavy)
          .light_dim_head(64)            // attention head dimension of the light branch
          .light_heads(small ? 2 : 8)    // attention heads of the light branch
          .light_window_size(window)     // height and width of the light branch's local windows
          .channel_first(true)           // feature maps are (batch, channels, height, width)
          .heavy_dim_head(64)            // attention head dimension of the heavy branch
          .heavy_heads(small ? 2 : 8));  // attention heads of the heavy branch
  attn->to(device);

  auto fmap = torch::randn({1, 32, side, side}, device);

  torch::NoGradGuard no_grad;
  auto out = attn(fmap);
  std::cout << "out " << out.sizes() << " on " << device << "\n";  // (1, 32, side, side)
  return 0;
}
