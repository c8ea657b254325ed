// The README's routed attention: 2 x 32768 tokens of width 512, 1024 routed
// queries and key/values. `--small` runs reduced sizes on the CPU.
#include <torch/torch.h>

#include <iostream>

#include "example_args.h"
#include "colt5/nn/conditional.h"

int main(int argc, char** argv) {
  const ExampleArgs args(argc, argv);
  const int64_t seq = args.size(32768, 2048), dim = args.size(512, 128), heavy = args.size(1024, 128);

  auto tokens = args.tokens(2, seq, dim);
  auto mask = args.mask(2, seq);

  colt5::nn::ConditionalRoutedAttention attn(colt5::nn::ConditionalRoutedAttentionOptions(dim, heavy, heavy)
                                                 .light_dim_head(64)  // head dimension of the light branch
                                                 .light_heads(args.size(8, 2))
                                                 .light_window_size(128)  // local receptive field of the light branch
                                                 .heavy_dim_head(64)      // head dimension of the heavy branch
                                                 .heavy_heads(args.size(8, 2)));
  attn->to(args.device);

  torch::NoGradGuard no_grad;
  auto attn_out = attn(tokens, mask);  // light and heavy branch summed
  std::cout << "attn_out " << attn_out.sizes() << " on " << args.device << "\n";
  return 0;
}
