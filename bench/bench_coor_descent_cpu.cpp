// Fused CPU coordinate descent against the same algorithm in plain LibTorch
// ops (logsumexp and relu per iteration, autograd through them), same process.
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "colt5/coor_descent.h"
#include "colt5/nn/options.h"
#include "support/support.h"

namespace {

double median_seconds(const std::function<void()>& f, double budget_s) {
  f();  // warm-up
  std::vector<double> times;
  const auto start = std::chrono::steady_clock::now();
  do {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  } while (times.size() < 3 ||
           (std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() < budget_s &&
            times.size() < 50));
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

std::string cpu_name() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  return "unknown CPU";
}

}  // namespace

int main(int argc, char** argv) {
  const char* usage = "usage: bench_coor_descent_cpu [SECONDS]  (time budget per measurement, default 2)\n";
  if (argc > 2) {
    std::fputs(usage, stderr);
    return 2;
  }
  double budget = 2.0;
  if (argc == 2) {
    const std::string a = argv[1];
    if (a == "--help" || a == "-h") {
      std::fputs(usage, stdout);
      return 0;
    }
    char* end = nullptr;
    budget = std::strtod(argv[1], &end);
    if (end == argv[1] || *end != '\0' || !(budget > 0.0) || budget > 3600.0) {
      std::fprintf(stderr,
                   "bench_coor_descent_cpu: the time budget must be a number of seconds in (0, 3600], got '%s'\n%s",
                   argv[1], usage);
      return 2;
    }
  }
  torch::manual_seed(0);
  std::printf("coordinate descent, CPU: %s, %d threads, LibTorch %s\n", cpu_name().c_str(), at::get_num_threads(),
              TORCH_VERSION);
  std::printf(
      "router schedule: eps %g, eps_init %g, eps_decay %g; k = 9/8 * n/16; each checked against the plain ops, then "
      "timed (median)\n\n",
      colt5::nn::router_defaults::eps, colt5::nn::router_defaults::eps_init, colt5::nn::router_defaults::eps_decay);
  std::printf("%-14s %5s %-8s %12s %12s %8s\n", "rows x cols", "iters", "pass", "fused ms", "plain ms", "speedup");
  struct Shape {
    int64_t rows, cols;
  };
  for (Shape sh : {Shape{16, 4096}, Shape{4, 32768}}) {
    for (int64_t iters : {20, 50}) {
      auto o = colt5::testing::router_schedule().n_iters(iters);
      const double k = 9.0 / 8.0 * static_cast<double>(sh.cols / 16);
      torch::Tensor s = torch::randn({sh.rows, sh.cols}) * 2;
      torch::Tensor gy = torch::randn({sh.rows, sh.cols});
      {
        // Checked before timing: the fused float32 kernels against the plain
        // algorithm in float64 (outputs and score gradients).
        torch::Tensor x32 = s.detach().requires_grad_(true);
        torch::Tensor x64 = s.to(torch::kDouble).requires_grad_(true);
        torch::Tensor y32 = colt5::coor_descent(x32, k, o), y64 = colt5::testing::plain_coor_descent(x64, k, o);
        y32.backward(gy);
        y64.backward(gy.to(torch::kDouble));
        const double ey = colt5::testing::norm_rel_error(y32, y64, 1e-12),
                     eg = colt5::testing::norm_rel_error(x32.grad(), x64.grad(), 1e-12);
        if (!(ey <= 1e-4) || !(eg <= 1e-2)) {
          std::fprintf(stderr, "bench_coor_descent_cpu: fused and plain disagree (y %.3g, grad %.3g)\n", ey, eg);
          return 1;
        }
      }
      for (bool backward : {false, true}) {
        auto run = [&](bool use_fused) {
          torch::Tensor x = backward ? s.detach().requires_grad_(true) : s;
          torch::Tensor y = use_fused ? colt5::coor_descent(x, k, o) : colt5::testing::plain_coor_descent(x, k, o);
          if (backward) y.backward(gy);
        };
        c10::optional<torch::NoGradGuard> no_grad;
        if (!backward) no_grad.emplace();
        const double tf = median_seconds([&] { run(true); }, budget);
        const double tp = median_seconds([&] { run(false); }, budget);
        no_grad.reset();
        char shape[32];
        std::snprintf(shape, sizeof shape, "%lld x %lld", (long long)sh.rows, (long long)sh.cols);
        std::printf("%-14s %5lld %-8s %12.3f %12.3f %7.1fx\n", shape, (long long)iters, backward ? "fwd+bwd" : "fwd",
                    tf * 1e3, tp * 1e3, tp / tf);
        std::fflush(stdout);
      }
    }
  }
  return 0;
}
