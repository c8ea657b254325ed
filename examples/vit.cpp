// The README's Simple ViT with routed attention and feedforward: 256 x 256
// images in 32 x 32 patches, 1000 classes. `--small` runs 64 x 64 images in
// 16 x 16 patches with a narrower, shallower model on the CPU.
#include <torch/torch.h>

#include <cstring>
#include <iostream>

#include "colt5/nn/image.h"

int main(int argc, char** argv) {
  const bool small = argc > 1 && std::strcmp(argv[1], "--small") == 0;
  const torch::Device device = !small && torch::cuda::is_available() ? torch::kCUDA : torch::kCPU;

  colt5::nn::ConditionalRoutedViT vit(
      colt5::nn::ConditionalRoutedViTOptions(/*image_size=*/small ? 64 : 256, /*patch_size=*/small ? 16 : 32,
                                             /*num_classes=*/1000, /*dim=*/small ? 128 : 1024,
                                             /*depth=*/small ? 2 : 6)
          .attn_num_heavy_tokens_q(small ? 8 : 16)   // routed queries of the heavy attention
          .attn_num_heavy_tokens_kv(small ? 8 : 16)  // routed key/values of the heavy attention
          .attn_heavy_dim_head(64)                   // head dimension of the heavy attention
          .attn_heavy_heads(small ? 2 : 8)           // heads of the heavy attention
          .attn_light_window_size(small ? 2 : 4)     // window of the light local attention
          .attn_light_dim_head(32)                   // head dimension of the light attention
          .attn_light_heads(4)                       // heads of the light attention
          .ff_num_heavy_tokens(small ? 8 : 16)       // tokens routed to the heavy feedforward
          .ff_heavy_mult(4)                          // expansion of the heavy feedforward
          .ff_light_mult(2));                        // expansion of the light feedforward
  vit->to(device);

  auto images = torch::randn({1, 3, small ? 64 : 256, small ? 64 : 256}, device);

  torch::NoGradGuard no_grad;
  auto logits = vit(images);
  std::cout << "logits " << logits.sizes() << " on " << device << "\n";  // (1, 1000)
  return 0;
}
