// Routes 8 of 64 tokens through a heavy feedforward with an installed colt5.
#include <colt5/colt5.h>
#include <torch/torch.h>

#include <iostream>

int main() {
  using namespace colt5::nn;
  ConditionalRoutedFeedForward ff(ConditionalRoutedFeedForwardOptions(32, 8));
  torch::Tensor x = torch::randn({2, 64, 32});
  torch::Tensor y = ff(x);
  std::cout << "output " << y.sizes() << "\n";
  return y.sizes() == x.sizes() ? 0 : 1;
}
