// The README's routed image attention: a 1 x 32 x 256 x 256 feature map
// (65536 tokens), 1024 routed queries and key/values, light attention inside
// 32 x 32 windows. `--small` runs a 1 x 32 x 32 x 32 map with 64 routed tokens
// on the CPU.
#include <torch/torch.h>

#include <iostream>

#include "example_args.h"
#include "colt5/nn/image.h"

int main(int argc, char** argv) {
  const ExampleArgs args(argc, argv);
  const int64_t side = args.size(256, 32), heavy = args.size(1024, 64), window = args.size(32, 8);

  colt5::nn::ConditionalRoutedImageAttention attn(
      colt5::nn::ConditionalRoutedImageAttentionOptions(/*dim=*/32, /*num_heavy_tokens_q=*/heavy,
                                                        /*num_heavy_tokens_kv=*/heavy)
          .light_dim_head(64)              // attention head dimension of the light branch
          .light_heads(args.size(8, 2))    // attention heads of the light branch
          .light_window_size(window)       // height and width of the light branch's local windows
          .channel_first(true)             // feature maps are (batch, channels, height, width)
          .heavy_dim_head(64)              // attention head dimension of the heavy branch
          .heavy_heads(args.size(8, 2)));  // attention heads of the heavy branch
  attn->to(args.device);

  auto fmap = torch::randn({1, 32, side, side}, args.device);

  torch::NoGradGuard no_grad;
  auto out = attn(fmap);
  std::cout << "out " << out.sizes() << " on " << args.device << "\n";  // (1, 32, side, side)
  return 0;
}
