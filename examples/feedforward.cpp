// The README's routed feedforward: 2 x 32768 tokens of width 512, 1024 of them
// through the heavy branch. `--small` runs reduced sizes on the CPU.
#include <torch/torch.h>

#include <iostream>

#include "example_args.h"
#include "colt5/nn/conditional.h"

int main(int argc, char** argv) {
  const ExampleArgs args(argc, argv);
  const int64_t seq = args.size(32768, 2048), dim = args.size(512, 128), heavy = args.size(1024, 128);

  auto tokens = args.tokens(2, seq, dim);
  auto mask = args.mask(2, seq);

  colt5::nn::ConditionalRoutedFeedForward ff(colt5::nn::ConditionalRoutedFeedForwardOptions(dim, heavy)
                                                 .light_ff_mult(0.5)  // hidden dimension ratio of the light branch
                                                 .heavy_ff_mult(4));  // hidden dimension ratio of the heavy branch
  ff->to(args.device);

  torch::NoGradGuard no_grad;
  auto ff_out = ff(tokens, mask);  // light and heavy branch summed
  std::cout << "ff_out " << ff_out.sizes() << " on " << args.device << "\n";
  return 0;
}
