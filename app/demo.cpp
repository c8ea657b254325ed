// Routes generated data through coordinate descent and prints what was routed.
#include <torch/torch.h>

#include <cstdio>

#include "colt5/coor_descent.h"

int main() {
  torch::manual_seed(0);
  const int64_t n = 64, k = 8;
  // Scores with a clear signal: every 8th token is important.
  torch::Tensor s = torch::randn({1, n}) * 0.5;
  s.index_put_({0, torch::arange(0, n, 8)}, 3.0);
  auto opts = colt5::CoorDescentOptions().n_iters(20).eps(0.03).eps_init(4.0).eps_decay(0.7);
  torch::Tensor soft = colt5::coor_descent(s, static_cast<double>(k), opts);
  torch::Tensor idx = colt5::topk_indices(soft, k, s);
  std::printf("colt5 demo: routing %lld of %lld tokens by coordinate descent (k = %lld)\n", (long long)k,
              (long long)n, (long long)k);
  std::printf("soft scores sum to %.4f (k = %lld)\n", soft.sum().item<double>(), (long long)k);
  auto sorted = std::get<0>(idx.sort(-1));
  std::printf("routed positions:");
  for (int64_t i = 0; i < k; ++i) std::printf(" %lld", (long long)sorted[0][i].item<int64_t>());
  std::printf("\n");
  return 0;
}
