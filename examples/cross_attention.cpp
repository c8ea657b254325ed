// The README's routed cross attention: 1024 tokens attending to a million
// memories, 512 queries and 1024 memories routed, two routing tokens for the
// memories (4 of the 8 heads each), routed evenly from blocks of 131072.
// `--small` runs reduced sizes on the CPU.
#include <torch/torch.h>

#include <cstring>
#include <iostream>

#include "colt5/nn/conditional.h"

int main(int argc, char** argv) {
  const bool small = argc > 1 && std::strcmp(argv[1], "--small") == 0;
  const torch::Device device = !small && torch::cuda::is_available() ? torch::kCUDA : torch::kCPU;
  const int64_t n = small ? 256 : 1024, memories_len = small ? 16384 : 1048576, dim = small ? 128 : 512;
  auto bool_opts = torch::TensorOptions().dtype(torch::kBool).device(device);

  auto tokens = torch::randn({1, n, dim}, device);
  auto tokens_mask = torch::ones({1, n}, bool_opts);
  auto memories = torch::randn({1, memories_len, dim}, device);
  auto memories_mask = torch::ones({1, memories_len}, bool_opts);

  colt5::nn::ConditionalRoutedCrossAttention cross_attn(
      colt5::nn::ConditionalRoutedCrossAttentionOptions(dim, /*num_tokens_q=*/n / 2, /*num_tokens_kv=*/1024)
          .dim_head(64)
          .heads(8)
          .kv_routing_tokens(2)
          .use_triton(true)
          .route_block_size(small ? 2048 : 131072));
  cross_attn->to(device);

  torch::NoGradGuard no_grad;
  auto cross_attn_out = cross_attn(tokens, memories, tokens_mask, memories_mask);
  std::cout << "cross_attn_out " << cross_attn_out.sizes() << " on " << device << "\n";  // same as tokens
  return 0;
}
