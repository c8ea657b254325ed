// What every example program shares: `--small` picks reduced sizes on the CPU;
// otherwise the README's sizes run on the GPU when there is one.
#pragma once

#include <torch/torch.h>

#include <cstring>
#include <iostream>

struct ExampleArgs {
  bool small = false;
  torch::Device device = torch::kCPU;

  ExampleArgs(int argc, char** argv) {
    small = argc > 1 && std::strcmp(argv[1], "--small") == 0;
    device = !small && torch::cuda::is_available() ? torch::kCUDA : torch::kCPU;
  }

  // The README's value, or the reduced one with --small.
  int64_t size(int64_t readme, int64_t reduced) const { return small ? reduced : readme; }

  // Random tokens (batch, seq, dim) and an all-true padding mask (batch, seq).
  torch::Tensor tokens(int64_t batch, int64_t seq, int64_t dim) const {
    return torch::randn({batch, seq, dim}, device);
  }
  torch::Tensor mask(int64_t batch, int64_t seq) const {
    return torch::ones({batch, seq}, torch::TensorOptions().dtype(torch::kBool).device(device));
  }
};
