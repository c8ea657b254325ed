// ConditionalRoutedTransformerBlock on the CPU: 2 x 4096 x 512, 256 heavy
// tokens (feedforward, attention queries and key/values), float32. Times the
// whole block forward and forward+backward, a same-run baseline (the block's
// light branches alone, i.e. no routing and no heavy branch), and each part:
// the routers, the light attention, the heavy attention, the feedforwards.
//   bench_block_cpu [--runs N] [--batch B] [--seq N] [--dim D] [--heavy K]
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "colt5/nn/conditional.h"
#include "support/support.h"

namespace {

using namespace colt5::nn;

double median_seconds(int runs, const std::function<void()>& f) {
  f();  // warm-up
  std::vector<double> t;
  for (int i = 0; i < runs; ++i) {
    auto start = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

struct Timing {
  const char* name;
  double fwd, fwd_bwd;
};

// Forward alone (no autograd graph) and forward + backward of sum(out * g).
Timing time_part(const char* name, int runs, const std::function<torch::Tensor()>& forward) {
  Timing t{name, 0, 0};
  t.fwd = median_seconds(runs, [&] {
    torch::NoGradGuard no_grad;
    forward();
  });
  t.fwd_bwd = median_seconds(runs, [&] {
    auto out = forward();
    out.backward(torch::ones_like(out));
  });
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  int runs = 5;
  int64_t batch = 2, seq = 4096, dim = 512, heavy = 256;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    const long v = std::atol(argv[i + 1]);
    if (v <= 0) {
      std::fprintf(stderr, "bench_block_cpu: %s needs a positive number\n", a.c_str());
      return 2;
    }
    if (a == "--runs")
      runs = static_cast<int>(v);
    else if (a == "--batch")
      batch = v;
    else if (a == "--seq")
      seq = v;
    else if (a == "--dim")
      dim = v;
    else if (a == "--heavy")
      heavy = v;
    else {
      std::fprintf(stderr, "usage: bench_block_cpu [--runs N] [--batch B] [--seq N] [--dim D] [--heavy K]\n");
      return 2;
    }
  }
  torch::manual_seed(0);
  ConditionalRoutedTransformerBlock block(ConditionalRoutedTransformerBlockOptions(dim, heavy, heavy, heavy));
  auto x = torch::randn({batch, seq, dim}, torch::requires_grad());
  auto mask = torch::ones({batch, seq}, torch::kBool);
  auto& attn = block->conditional_attn;
  auto& ff = block->conditional_ff;

  std::printf(
      "ConditionalRoutedTransformerBlock, CPU float32, %lld x %lld x %lld, %lld heavy tokens, "
      "%d threads, median of %d runs\n",
      (long long)batch, (long long)seq, (long long)dim, (long long)heavy, torch::get_num_threads(), runs);

  // Validate before timing: the float32 block against a float64 copy of itself (same routed tokens
  // unless a routing score sits at the boundary, so compared in norm).
  {
    torch::NoGradGuard no_grad;
    auto block64 = std::dynamic_pointer_cast<ConditionalRoutedTransformerBlockImpl>(block->clone());
    block64->to(torch::kDouble);
    const torch::Tensor y = block(x, mask), y64 = block64->forward(x.to(torch::kDouble), mask);
    const double err = colt5::testing::norm_rel_error(y, y64);
    if (!(y.sizes() == x.sizes() && torch::isfinite(y).all().item<bool>() && err < 1e-3)) {
      std::fprintf(stderr, "bench_block_cpu: the float32 block disagrees with float64 (relative error %.3g)\n", err);
      return 1;
    }
    std::printf("checked against float64: relative error %.2g\n", err);
  }

  // Routed tokens for the heavy parts alone.
  RouterOutput rq, rkv, rff;
  {
    torch::NoGradGuard no_grad;
    rq = attn->q_router(x, heavy, mask);
    rkv = attn->kv_router(x, heavy, mask);
    rff = ff->router(x, heavy, mask);
  }
  auto q_tokens = rq.routed_tokens.detach().requires_grad_(true);
  auto kv_tokens = rkv.routed_tokens.detach().requires_grad_(true);
  auto ff_tokens = rff.routed_tokens.detach().requires_grad_(true);
  auto kv_mask = rkv.routed_mask;

  {
    // Checked before timing: the float32 block against a float64 copy of it
    // (in norm: a token whose routing flips at the top-k boundary differs).
    auto block64 = std::dynamic_pointer_cast<ConditionalRoutedTransformerBlockImpl>(block->clone());
    block64->to(torch::kDouble);
    torch::NoGradGuard no_grad;
    torch::Tensor y = block(x, mask), y64 = block64->forward(x.to(torch::kDouble), mask);
    const double err = ((y.to(torch::kDouble) - y64).norm() / y64.norm()).item<double>();
    if (!(err < 0.02)) {
      std::fprintf(stderr, "bench_block_cpu: float32 output differs from float64 by %.3g in norm\n", err);
      return 1;
    }
    std::printf("float32 vs float64 output: %.2e relative in norm\n", err);
  }

  std::vector<Timing> parts;
  Timing whole = time_part("block", runs, [&] { return block(x, mask); });
  Timing light = time_part("baseline: light branches alone", runs, [&] {
    auto h = attn->light_attn(x, mask) + x;
    return ff->light_ff(h) + h;
  });
  parts.push_back(time_part("routers (3: attn q, attn kv, ff)", runs, [&] {
    auto a = attn->q_router(x, heavy, mask);
    auto b = attn->kv_router(x, heavy, mask);
    auto c = ff->router(x, heavy, mask);
    return (a.routed_tokens * a.scores.unsqueeze(-1)).sum() + (b.routed_tokens * b.scores.unsqueeze(-1)).sum() +
           (c.routed_tokens * c.scores.unsqueeze(-1)).sum();
  }));
  parts.push_back(time_part("light attention (local, window 64)", runs, [&] { return attn->light_attn(x, mask); }));
  parts.push_back(time_part("heavy attention (routed tokens)", runs,
                            [&] { return attn->heavy_attn(q_tokens, kv_tokens, kv_mask); }));
  parts.push_back(time_part("light feedforward (all tokens)", runs, [&] { return ff->light_ff(x); }));
  parts.push_back(time_part("heavy feedforward (routed tokens)", runs, [&] { return ff->heavy_ff(ff_tokens); }));

  std::printf("%-40s %12s %12s\n", "part", "fwd (s)", "fwd+bwd (s)");
  std::printf("%-40s %12.4f %12.4f\n", whole.name, whole.fwd, whole.fwd_bwd);
  std::printf("%-40s %12.4f %12.4f\n", light.name, light.fwd, light.fwd_bwd);
  double sum_fwd = 0, sum_bwd = 0;
  for (const auto& p : parts) {
    std::printf("  %-38s %12.4f %12.4f\n", p.name, p.fwd, p.fwd_bwd);
    sum_fwd += p.fwd;
    sum_bwd += p.fwd_bwd;
  }
  std::printf("  %-38s %12.4f %12.4f\n", "rest (gathers, scatters, residuals)", whole.fwd - sum_fwd,
              whole.fwd_bwd - sum_bwd);
  std::printf("block / light-only baseline: fwd %.2fx, fwd+bwd %.2fx\n", whole.fwd / light.fwd,
              whole.fwd_bwd / light.fwd_bwd);
  std::printf(
      "reference (2-core CPU, libtorch 1.13 + OpenBLAS): fwd 0.54 s, fwd+bwd 1.58 s -> "
      "speed-up fwd %.2fx, fwd+bwd %.2fx\n",
      0.54 / whole.fwd, 1.58 / whole.fwd_bwd);
  return 0;
}
