// The benchmarks' baseline: coordinate descent written with plain LibTorch ops
// (logsumexp and relu per iteration, autograd through them), no mask.
#pragma once

#include <torch/torch.h>

#include <algorithm>
#include <cmath>

#include "colt5/coor_descent.h"

inline torch::Tensor plain_coor_descent(const torch::Tensor& s, double k, const colt5::CoorDescentOptions& o) {
  const double logk = std::log(k);
  torch::Tensor a, b = -s;
  double e = std::max(o.eps_init().value_or(o.eps()), o.eps());
  for (int64_t i = 0; i < o.n_iters(); ++i) {
    a = e * (logk - ((s + b) / e).logsumexp(-1, true));
    b = -torch::relu(s + a);
    e = std::max(e * o.eps_decay(), o.eps());
  }
  return ((s + a + b) / e).exp();
}
