// ConditionalRoutedAutoregressiveAttention on the CPU, float32, the README's
// shape (dim 512, windows of 128, 32 heavy queries per window over 1024 routed
// keys/values in 2 routes) at 1 x 4096 and 1 x 8192 by default. For each
// length: forward and forward+backward with the kv router routing every window
// over the whole sequence (kv_route_groups 1) against the windows in groups
// over the prefixes they see (the module's default, and 8 groups), in the same
// run, after checking that the outputs agree; then the kv router alone (its
// routing of every window's prefix view) by the same groupings; then the light
// branch alone, its causal windows split into two flash calls or look-around.
//   bench_autoregressive_cpu [--runs N] [--batch B] [--seq N (repeatable)]
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "colt5/nn/conditional.h"
#include "nn/route_views.h"
#include "support/support.h"

namespace {

using namespace colt5::nn;

double median_ms(int runs, const std::function<void()>& f) {
  f();  // warm-up
  std::vector<double> t;
  for (int i = 0; i < runs; ++i) {
    auto start = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  int runs = 3;
  int64_t batch = 1;
  std::vector<int64_t> lengths;
  for (int i = 1; i < argc; i += 2) {
    const std::string a = argv[i];
    const long v = i + 1 < argc ? std::atol(argv[i + 1]) : 0;
    if (v <= 0 || (a != "--runs" && a != "--batch" && a != "--seq")) {
      std::fprintf(stderr, "usage: bench_autoregressive_cpu [--runs N] [--batch B] [--seq N]...\n");
      return 2;
    }
    if (a == "--runs") runs = static_cast<int>(v);
    if (a == "--batch") batch = v;
    if (a == "--seq") lengths.push_back(v);
  }
  if (lengths.empty()) lengths = {4096, 8192};
  torch::manual_seed(0);
  ConditionalRoutedAutoregressiveAttention ar(ConditionalRoutedAutoregressiveAttentionOptions(512, 32, 1024)
                                                  .light_dim_head(64)
                                                  .light_heads(8)
                                                  .light_window_size(128)
                                                  .heavy_dim_head(64)
                                                  .heavy_heads(8)
                                                  .num_routed_kv(2));
  std::printf(
      "ConditionalRoutedAutoregressiveAttention, CPU float32, dim 512, window 128, heavy q 32, kv 1024 in 2 "
      "routes, %d threads, median of %d runs\n",
      torch::get_num_threads(), runs);
  std::printf("%-8s %-22s %10s %12s %10s\n", "tokens", "kv routing", "fwd ms", "fwd+bwd ms", "÷ whole");
  for (int64_t n : lengths) {
    const torch::Tensor x = torch::randn({batch, n, 512});
    // Outputs first: the groupings must agree (same routing, float32 sums).
    torch::Tensor ref;
    for (int64_t groups : {1, 0, 8}) {
      torch::NoGradGuard ng;
      ar->kv_route_groups = groups;
      torch::Tensor y = ar(x);
      if (!ref.defined()) {
        ref = y;
      } else if (const double e = colt5::testing::norm_rel_error(y, ref); !(e < 1e-5)) {
        std::fprintf(stderr, "bench_autoregressive_cpu: %lld groups differ from one by %.3g\n", (long long)groups, e);
        return 1;
      }
    }
    double whole_fb = 0;
    for (int64_t groups : {1, 0, 8}) {
      ar->kv_route_groups = groups;
      const double fwd = median_ms(runs, [&] {
        torch::NoGradGuard ng;
        ar(x);
      });
      torch::Tensor xg = x.clone().requires_grad_(true);
      const double fb = median_ms(runs, [&] { ar(xg).sum().backward(); });
      if (groups == 1) whole_fb = fb;
      const std::string what = groups == 1   ? "whole sequence"
                               : groups == 0 ? "groups (the default)"
                                             : std::to_string(groups) + " groups";
      std::printf("%-8lld %-22s %10.1f %12.1f %9.2fx\n", (long long)n, what.c_str(), fwd, fb, fb / whole_fb);
      std::fflush(stdout);
    }
  }
  // The kv router alone: every window's view of the sequence (the windows
  // before it), as the module routes it.
  std::printf("\nkv router alone (routing scores, coordinate descent, top-k; fwd+bwd of the routed scores)\n");
  std::printf("%-8s %-22s %10s %12s %10s\n", "tokens", "kv routing", "fwd ms", "fwd+bwd ms", "÷ whole");
  for (int64_t n : lengths) {
    const int64_t w = 128, windows = (n + w - 1) / w, padded = windows * w;
    const torch::Tensor x = torch::randn({batch, padded, 512});
    const torch::Tensor mask = torch::ones({windows, windows}, torch::kBool)
                                   .tril(-1)
                                   .narrow(0, 1, windows - 1)
                                   .repeat_interleave(w, 1)
                                   .unsqueeze(0)
                                   .expand({batch, windows - 1, padded});
    std::vector<int64_t> view_lengths;
    for (int64_t v = 1; v < windows; ++v) view_lengths.push_back(v * w);
    double whole_fb = 0;
    for (int64_t groups : {1, 2, 4, 8}) {
      auto route = [&](const torch::Tensor& xi) {
        return route_prefix_views(*ar->kv_router, xi, 1024, mask, view_lengths, groups, false, true, false);
      };
      const double fwd = median_ms(runs, [&] {
        torch::NoGradGuard ng;
        route(x);
      });
      torch::Tensor xg = x.clone().requires_grad_(true);
      const double fb = median_ms(runs, [&] { route(xg).scores.sum().backward(); });
      if (groups == 1) whole_fb = fb;
      std::printf("%-8lld %-22s %10.1f %12.1f %9.2fx\n", (long long)n,
                  groups == 1 ? "whole sequence" : (std::to_string(groups) + " groups").c_str(), fwd, fb,
                  fb / whole_fb);
      std::fflush(stdout);
    }
  }
  ar->kv_route_groups = 0;
  // The light branch alone (the module's LocalMHA: causal windows of one
  // look-back): as two flash calls on views of the projection
  // (split_causal_windows) against look-around windows, in alternating rounds
  // so that both see the same machine state.
  std::printf(
      "\nlight branch alone (LocalMHA, window 128, 8 x 64): split causal windows against look-around, "
      "%d alternating rounds\n",
      runs);
  std::printf("%-8s %-14s %10s %12s %18s\n", "tokens", "windows", "fwd ms", "fwd+bwd ms", "module fwd+bwd ms");
  auto& mha = ar->light_attn->options;
  const c10::optional<bool> built = mha.split_causal_windows();
  for (int64_t n : lengths) {
    const torch::Tensor x = torch::randn({batch, n, 512});
    {
      torch::NoGradGuard ng;
      mha.split_causal_windows(true);
      const torch::Tensor a = ar->light_attn(x);
      mha.split_causal_windows(false);
      const torch::Tensor b = ar->light_attn(x);
      if (const double e = colt5::testing::norm_rel_error(a, b); !(e < 1e-5)) {
        std::fprintf(stderr, "bench_autoregressive_cpu: split and look-around windows differ by %.3g\n", e);
        return 1;
      }
    }
    torch::Tensor xg = x.clone().requires_grad_(true);
    std::vector<double> fwd[2], fb[2], whole[2];
    for (int round = 0; round < runs; ++round) {
      for (int on = 1; on >= 0; --on) {
        mha.split_causal_windows(on == 1);
        fwd[on].push_back(median_ms(1, [&] {
          torch::NoGradGuard ng;
          ar->light_attn(x);
        }));
        fb[on].push_back(median_ms(1, [&] { ar->light_attn(xg).sum().backward(); }));
        whole[on].push_back(median_ms(1, [&] { ar(xg).sum().backward(); }));
      }
    }
    for (int on = 1; on >= 0; --on) {
      std::sort(fwd[on].begin(), fwd[on].end());
      std::sort(fb[on].begin(), fb[on].end());
      std::sort(whole[on].begin(), whole[on].end());
      std::printf("%-8lld %-14s %10.1f %12.1f %18.1f   (fwd %.1f-%.1f, fwd+bwd %.1f-%.1f, module %.1f-%.1f)\n",
                  (long long)n, on ? "split" : "look-around", fwd[on][fwd[on].size() / 2], fb[on][fb[on].size() / 2],
                  whole[on][whole[on].size() / 2], fwd[on].front(), fwd[on].back(), fb[on].front(), fb[on].back(),
                  whole[on].front(), whole[on].back());
      std::fflush(stdout);
    }
  }
  mha.split_causal_windows(built);
  return 0;
}
