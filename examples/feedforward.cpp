// The README's routed feedforward: 2 x 32768 tokens of width 512, 1024 of them
// through the heavy branch. `--small` runs reduced sizes on the CPU.
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

  colt5::nn::ConditionalRoutedFeedForward ff(colt5::nn::ConditionalRoutedFeedForwardOptions(dim, heavy)
                                                 .light_ff_mult(0.5)  // hidden dimension ratio of the light branch
                                                 .heavy_ff_mult(4));  // hidden dimension ratio of the heavy branch
  ff->to(device);

  torch::NoGradGuard no_grad;
  auto ff_out = ff(tokens, mask);  // light and heavy branch summed
  std::cout << "ff_out " << ff_out.sizes() << " on " << device << "\n";
  return 0;
}
