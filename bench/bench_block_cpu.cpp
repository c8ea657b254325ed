// ConditionalRoutedTransformerBlock on the CPU: 2 x 4096 x 512, 256 heavy
// tokens (feedforward, attention queries and key/values), float32. Times the
// whole block forward and forward+backward, a same-run baseline (the block's
// light branches alone, i.e. no routing and no heavy branch), and each part:
// the routers, the light attention, the heavy attention, the feedforwards.
// With --reference, the reference Python package's block of the same shape
// (bench/bench_block_reference.py, needs colt5-attention and torch in that
// Python) in alternation with this one, --rounds times, and the ratios.
//   bench_block_cpu [--runs N] [--batch B] [--seq N] [--dim D] [--heavy K]
//                   [--reference] [--python PATH] [--rounds R]
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <regex>
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

// The word in single quotes for the shell.
std::string shell_quoted(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

// One run of the reference script: its fwd and fwd+bwd seconds and its
// summary line; false (with the output in `line`) when it failed.
bool run_reference(const std::string& command, Timing& t, std::string& line) {
  std::fflush(stdout);
  FILE* p = popen((command + " 2>&1").c_str(), "r");
  if (!p) {
    line = "could not start: " + command;
    return false;
  }
  std::string out;
  char buf[4096];
  while (std::fgets(buf, sizeof buf, p)) out += buf;
  const int status = pclose(p);
  static const std::regex summary(R"((reference colt5-attention block[^\n]*fwd ([0-9.]+) s, fwd\+bwd ([0-9.]+) s))");
  std::smatch m;
  if (status != 0 || !std::regex_search(out, m, summary)) {
    line = out.empty() ? "no output" : out;
    return false;
  }
  line = m[1];
  t.fwd = std::stod(m[2]);
  t.fwd_bwd = std::stod(m[3]);
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  int runs = 5, rounds = 2;
  int64_t batch = 2, seq = 4096, dim = 512, heavy = 256;
  bool reference = false;
  std::string python = "python3";
  const char* usage =
      "usage: bench_block_cpu [--runs N] [--batch B] [--seq N] [--dim D] [--heavy K] [--reference] [--python PATH] "
      "[--rounds R]\n";
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      std::fputs(usage, stdout);
      return 0;
    }
    if (a == "--reference") {
      reference = true;
      continue;
    }
    if (i + 1 >= argc) {
      std::fprintf(stderr, "bench_block_cpu: %s needs a value\n%s", a.c_str(), usage);
      return 2;
    }
    if (a == "--python") {
      python = argv[++i];
      continue;
    }
    char* end = nullptr;
    const long v = std::strtol(argv[i + 1], &end, 10);
    if (!(a == "--runs" || a == "--batch" || a == "--seq" || a == "--dim" || a == "--heavy" || a == "--rounds")) {
      std::fprintf(stderr, "bench_block_cpu: unknown flag %s\n%s", a.c_str(), usage);
      return 2;
    }
    if (*end != '\0' || end == argv[i + 1] || v <= 0) {
      std::fprintf(stderr, "bench_block_cpu: %s needs a positive number, got '%s'\n", a.c_str(), argv[i + 1]);
      return 2;
    }
    ++i;
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
    else
      rounds = static_cast<int>(v);
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
  if (!reference) {
    std::printf("against the reference: --reference (same machine, same run, in alternation)\n");
    return 0;
  }

  // The reference in alternation with this block: each round times this
  // block, then runs the reference script (this process waits, so the two
  // never share the cores).
  const std::string command = shell_quoted(python) + " " +
                              shell_quoted(std::string(COLT5_BENCH_DIR) + "/bench_block_reference.py") + " --runs " +
                              std::to_string(runs) + " --threads " + std::to_string(torch::get_num_threads()) +
                              " --batch " + std::to_string(batch) + " --seq " + std::to_string(seq) + " --dim " +
                              std::to_string(dim) + " --heavy " + std::to_string(heavy);
  std::printf("\nreference, in alternation (%d rounds; this build: LibTorch %s):\n", rounds, TORCH_VERSION);
  std::printf("%-8s %12s %12s %12s %12s %12s %12s\n", "round", "colt5 fwd", "ref fwd", "ratio", "colt5 f+b", "ref f+b",
              "ratio");
  std::vector<double> rf, rfb;
  for (int r = 0; r < rounds; ++r) {
    const Timing ours = time_part("block", runs, [&] { return block(x, mask); });
    Timing ref{"reference", 0, 0};
    std::string line;
    if (!run_reference(command, ref, line)) {
      std::fprintf(stderr, "bench_block_cpu: the reference did not run (%s):\n%s\n", command.c_str(), line.c_str());
      return 1;
    }
    if (r == 0) std::printf("  %s\n", line.c_str());
    rf.push_back(ref.fwd / ours.fwd);
    rfb.push_back(ref.fwd_bwd / ours.fwd_bwd);
    std::printf("%-8d %12.4f %12.4f %11.2fx %12.4f %12.4f %11.2fx\n", r + 1, ours.fwd, ref.fwd, rf.back(), ours.fwd_bwd,
                ref.fwd_bwd, rfb.back());
  }
  auto range = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    char b[64];
    std::snprintf(b, sizeof b, v.front() == v.back() ? "%.2fx" : "%.2f-%.2fx", v.front(), v.back());
    return std::string(b);
  };
  std::printf("colt5 faster than the reference by: fwd %s, fwd+bwd %s (reference time / colt5 time)\n",
              range(rf).c_str(), range(rfb).c_str());
  return 0;
}
