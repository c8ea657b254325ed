// The README's routed cross attention: 1024 tokens attending to a million
// memories, 512 queries and 1024 memories routed, two routing tokens for the
// memories (4 of the 8 heads each), routed evenly from blocks of 131072.
// `--small` runs reduced sizes on the CPU.
#include <torch/torch.h>

#include <iostream>

#include "example_args.h"
#include "colt5/nn/conditional.h"

int main(int argc, char** argv) {
  const ExampleArgs args(argc, argv);
  const int64_t n = args.size(1024, 256), memories_len = args.size(1048576, 16384), dim = args.size(512, 128);
  auto bool_opts = torch::TensorOptions().dtype(torch::kBool).device(args.device);

  auto tokens = args.tokens(1, n, dim);
  auto tokens_mask = torch::ones({1, n}, bool_opts);
  auto memories = args.tokens(1, memories_len, dim);
  auto memories_mask = torch::ones({1, memories_len}, bool_opts);

  colt5::nn::ConditionalRoutedCrossAttention cross_attn(
      colt5::nn::ConditionalRoutedCrossAttentionOptions(dim, /*num_tokens_q=*/n / 2, /*num_tokens_kv=*/1024)
          .dim_head(64)
          .heads(8)
          .kv_routing_tokens(2)
          .use_triton(true)
          .route_block_size(args.size(131072, 2048)));
  cross_attn->to(args.device);

  torch::NoGradGuard no_grad;
  auto cross_attn_out = cross_attn(tokens, memories, tokens_mask, memories_mask);
  std::cout << "cross_attn_out " << cross_attn_out.sizes() << " on " << args.device << "\n";  // same as tokens
  return 0;
}
