// The README's complete routed transformer block (attention and feedforward,
// each with its residual) on 2 x 32768 tokens of width 512. `--small` runs
// reduced sizes on the CPU.
#include <torch/torch.h>

#include <iostream>

#include "example_args.h"
#include "colt5/nn/conditional.h"

int main(int argc, char** argv) {
  const ExampleArgs args(argc, argv);
  const int64_t seq = args.size(32768, 2048), dim = args.size(512, 128), heavy = args.size(1024, 128);

  auto tokens = args.tokens(2, seq, dim);
  auto mask = args.mask(2, seq);

  colt5::nn::ConditionalRoutedTransformerBlock block(
      colt5::nn::ConditionalRoutedTransformerBlockOptions(dim, /*num_heavy_attn_tokens_q=*/heavy,
                                                          /*num_heavy_attn_tokens_kv=*/heavy,
                                                          /*num_heavy_ff_tokens=*/heavy)
          .light_dim_head(64)
          .light_heads(args.size(8, 2))
          .light_window_size(128)
          .heavy_dim_head(64)
          .heavy_heads(args.size(8, 2))
          .light_ff_mult(0.5)
          .heavy_ff_mult(4));
  block->to(args.device);

  torch::NoGradGuard no_grad;
  auto block_out = block(tokens, mask);
  std::cout << "block_out " << block_out.sizes() << " on " << args.device << "\n";
  return 0;
}
