// The README's Simple ViT with routed attention and feedforward: 256 x 256
// images in 32 x 32 patches, 1000 classes. `--small` runs 64 x 64 images in
// 16 x 16 patches with a narrower, shallower model on the CPU.
#include <torch/torch.h>

#include <iostream>

#include "example_args.h"
#include "colt5/nn/image.h"

int main(int argc, char** argv) {
  const ExampleArgs args(argc, argv);

  colt5::nn::ConditionalRoutedViT vit(
      colt5::nn::ConditionalRoutedViTOptions(/*image_size=*/args.size(256, 64), /*patch_size=*/args.size(32, 16),
                                             /*num_classes=*/1000, /*dim=*/args.size(1024, 128),
                                             /*depth=*/args.size(6, 2))
          .attn_num_heavy_tokens_q(args.size(16, 8))   // routed queries of the heavy attention
          .attn_num_heavy_tokens_kv(args.size(16, 8))  // routed key/values of the heavy attention
          .attn_heavy_dim_head(64)                     // head dimension of the heavy attention
          .attn_heavy_heads(args.size(8, 2))           // heads of the heavy attention
          .attn_light_window_size(args.size(4, 2))     // window of the light local attention
          .attn_light_dim_head(32)                     // head dimension of the light attention
          .attn_light_heads(4)                         // heads of the light attention
          .ff_num_heavy_tokens(args.size(16, 8))       // tokens routed to the heavy feedforward
          .ff_heavy_mult(4)                            // expansion of the heavy feedforward
          .ff_light_mult(2));                          // expansion of the light feedforward
  vit->to(args.device);

  auto images = torch::randn({1, 3, args.size(256, 64), args.size(256, 64)}, args.device);

  torch::NoGradGuard no_grad;
  auto logits = vit(images);
  std::cout << "logits " << logits.sizes() << " on " << args.device << "\n";  // (1, 1000)
  return 0;
}
