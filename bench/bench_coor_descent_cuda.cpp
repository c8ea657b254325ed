// Fused CUDA coordinate descent against the same algorithm in plain LibTorch
// ops on the GPU, same process, timed with CUDA events (median of many
// repetitions after warm-up).
//   fused kernel: the forward (and backward) kernels alone, captured R times
//                 in a CUDA graph, replayed; time per call;
//   fused API:    colt5::coor_descent (autograd, allocations), per call;
//   plain torch:  logsumexp / relu per iteration, autograd, per call.
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <utility>
#include <stdexcept>
#include <vector>

#include "colt5/coor_descent.h"
#include "support/support.h"

#ifdef COLT5_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdlib>

#include "kernels/coor_descent.h"
#endif

#ifndef COLT5_WITH_CUDA
int main() {
  std::printf("bench_coor_descent_cuda: colt5 was built without CUDA; CUDA is unavailable, nothing to time.\n");
  return 0;
}
#else

namespace {

#define BC(x)                                                              \
  do {                                                                     \
    cudaError_t e_ = (x);                                                  \
    if (e_ != cudaSuccess) {                                               \
      std::fprintf(stderr, "%s failed: %s\n", #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                        \
    }                                                                      \
  } while (0)

// Median milliseconds of f on the current stream, per call.
double median_ms(const std::function<void()>& f, int warmup, int reps, cudaStream_t st) {
  for (int i = 0; i < warmup; ++i) f();
  BC(cudaStreamSynchronize(st));
  cudaEvent_t a, b;
  BC(cudaEventCreate(&a));
  BC(cudaEventCreate(&b));
  std::vector<float> t;
  for (int i = 0; i < reps; ++i) {
    BC(cudaEventRecord(a, st));
    f();
    BC(cudaEventRecord(b, st));
    BC(cudaEventSynchronize(b));
    float ms = 0;
    BC(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms);
  }
  BC(cudaEventDestroy(a));
  BC(cudaEventDestroy(b));
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// The kernels alone: R calls captured in one graph, replayed; ms per call.
// Where capture is refused, R back-to-back calls timed together.
double kernel_ms(const std::function<void(cudaStream_t)>& f, cudaStream_t st) {
  const int R = 10;
  f(st);  // module load, attributes
  BC(cudaStreamSynchronize(st));
  cudaGraph_t g = nullptr;
  cudaGraphExec_t ge = nullptr;
  bool ok = cudaStreamBeginCapture(st, cudaStreamCaptureModeRelaxed) == cudaSuccess;
  if (ok) {
    try {
      for (int i = 0; i < R; ++i) f(st);
    } catch (const std::exception&) {
      ok = false;
    }
    ok = cudaStreamEndCapture(st, &g) == cudaSuccess && ok && g != nullptr;
    ok = ok && cudaGraphInstantiate(&ge, g, 0) == cudaSuccess;
  }
  if (!ok) {
    (void)cudaGetLastError();
    std::printf("  (graph capture refused: timing back-to-back launches)\n");
    return median_ms(
               [&] {
                 for (int i = 0; i < R; ++i) f(st);
               },
               3, 40, st) /
           R;
  }
  const double ms = median_ms([&] { BC(cudaGraphLaunch(ge, st)); }, 3, 40, st);
  BC(cudaGraphExecDestroy(ge));
  BC(cudaGraphDestroy(g));
  return ms / R;
}

// The kernels' result against the CPU float64 path on the same (float32)
// inputs, before anything is timed: y always, the score gradient with
// `backward`. Exits on a mismatch.
void validate(const char* what, const colt5::kernels::CoorDescentParams<float>& p,
              const colt5::kernels::CoorDescentBackwardParams<float>* bp, const torch::Tensor& s,
              const torch::Tensor& k, const torch::Tensor& gy, const colt5::CoorDescentOptions& o, cudaStream_t st) {
  torch::Tensor y = torch::from_blob(p.y, {p.rows, p.cols}, s.options());
  y.fill_(std::nanf(""));  // poison: every entry must be written
  if (bp) torch::from_blob(bp->grad_s, {p.rows, p.cols}, s.options()).fill_(std::nanf(""));
  BC(cudaDeviceSynchronize());
  colt5::kernels::coor_descent_forward_cuda<float>(p, st);
  if (bp) colt5::kernels::coor_descent_backward_cuda<float>(*bp, st);
  BC(cudaStreamSynchronize(st));
  torch::Tensor s64 = s.to(torch::kCPU, torch::kDouble).requires_grad_(true);
  torch::Tensor y64 = colt5::coor_descent(s64, k.to(torch::kCPU, torch::kDouble), o);
  auto rel = [](const torch::Tensor& a, const torch::Tensor& b) {
    torch::Tensor x = a.to(torch::kCPU, torch::kDouble);
    return ((x - b).norm() / b.norm().clamp_min(1e-12)).item<double>();
  };
  double err = rel(y, y64.detach()), gerr = 0;
  if (bp) {
    y64.backward(gy.to(torch::kCPU, torch::kDouble));
    gerr = rel(torch::from_blob(bp->grad_s, {p.rows, p.cols}, s.options()), s64.grad());
  }
  if (!(err <= 1e-5) || !(gerr <= 1e-3)) {
    std::fprintf(stderr, "%s: the kernels disagree with the CPU float64 reference (y %.3g, grad %.3g)\n", what, err,
                 gerr);
    std::exit(1);
  }
}

struct Work {
  int64_t rows, cols, iters;
  bool backward;
  double triton_ms;  // SPEC's reference figure (Triton), <0: none
  double torch_ref_ms;
  double target_ms;  // <0: none
};

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1) {
    const bool help = !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h");
    if (!help) std::fprintf(stderr, "bench_coor_descent_cuda: unknown argument %s\n", argv[1]);
    std::fputs("usage: bench_coor_descent_cuda  (no arguments)\n", help ? stdout : stderr);
    return help ? 0 : 2;
  }
  if (!torch::cuda::is_available()) {
    std::printf("bench_coor_descent_cuda: CUDA is unavailable on this machine.\n");
    return 0;
  }
  torch::manual_seed(0);
  cudaDeviceProp prop;
  BC(cudaGetDeviceProperties(&prop, 0));
  std::printf("coordinate descent on %s (%d SMs, %.0f MB L2), LibTorch %s\n", prop.name, prop.multiProcessorCount,
              prop.l2CacheSize / 1e6, TORCH_VERSION);
  std::printf(
      "router schedule: eps 0.03, eps_init 4, eps_decay 0.7; k = 9/8 * n/16; float32; median of CUDA-event "
      "timings\n\n");
  const std::vector<Work> works = {
      {16, 32768, 20, false, 0.61, 4.45, 0.10}, {16, 32768, 20, true, 2.21, 7.75, 0.40},
      {16, 32768, 50, false, 0.58, -1, -1},     {16, 32768, 50, true, 6.01, -1, 1.0},
      {4, 131072, 20, false, 2.85, 4.11, 0.15}, {4, 131072, 20, true, 12.7, 8.02, 0.6},
      {64, 4096, 20, false, 0.38, -1, -1},      {64, 4096, 20, true, 1.63, -1, -1},
      {1, 1 << 20, 20, false, -1, -1, 0.5},     {1, 1 << 20, 20, true, -1, -1, -1},
  };
  auto dev = torch::TensorOptions().device(torch::kCUDA, 0);
  cudaStream_t st;
  BC(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  struct Row {
    std::string work;
    double kernel, api, plain;
    Work w;
  };
  std::vector<Row> table;
  for (const Work& w : works) {
    const colt5::CoorDescentOptions o =
        colt5::CoorDescentOptions().n_iters(w.iters).eps(0.03).eps_init(4.0).eps_decay(0.7);
    const double k = 9.0 / 8.0 * w.cols / 16.0;
    torch::Tensor s = torch::randn({w.rows, w.cols}, dev);
    torch::Tensor gy = torch::randn({w.rows, w.cols}, dev);
    torch::Tensor kr = torch::full({w.rows}, k, dev);
    torch::Tensor y = torch::empty_like(s), gs = torch::empty_like(s), gk = torch::empty_like(kr);
    torch::Tensor saved = torch::empty({w.rows, w.iters}, dev.dtype(torch::kDouble));
    torch::Tensor stats = torch::empty({w.rows, 2}, dev.dtype(torch::kDouble));
    colt5::kernels::CoorDescentParams<float> p;
    p.rows = w.rows;
    p.cols = w.cols;
    p.s = s.data_ptr<float>();
    p.k = kr.data_ptr<float>();
    p.n_iters = w.iters;
    p.eps = 0.03;
    p.eps_init = 4.0;
    p.eps_decay = 0.7;
    p.y = y.data_ptr<float>();
    p.saved = saved.data_ptr<double>();
    p.row_stats = stats.data_ptr<double>();
    colt5::kernels::CoorDescentBackwardParams<float> bp;
    bp.fwd = p;
    bp.grad_y = gy.data_ptr<float>();
    bp.grad_s = gs.data_ptr<float>();
    bp.grad_k = gk.data_ptr<float>();
    validate(("work " + std::to_string(w.rows) + "x" + std::to_string(w.cols)).c_str(), p, w.backward ? &bp : nullptr,
             s, kr, gy, o, st);
    const double kern = kernel_ms(
        [&](cudaStream_t s_) {
          colt5::kernels::coor_descent_forward_cuda<float>(p, s_);
          if (w.backward) colt5::kernels::coor_descent_backward_cuda<float>(bp, s_);
        },
        st);
    cudaStream_t cur = c10::cuda::getCurrentCUDAStream().stream();
    const int reps = w.cols >= (1 << 20) || w.iters > 20 ? 20 : 40;
    double api, plain;
    if (w.backward) {
      api = median_ms(
          [&] {
            torch::Tensor sv = s.detach().requires_grad_(true);
            colt5::coor_descent(sv, k, o).backward(gy);
          },
          3, reps, cur);
      plain = median_ms(
          [&] {
            torch::Tensor sv = s.detach().requires_grad_(true);
            colt5::testing::plain_coor_descent(sv, k, o).backward(gy);
          },
          3, reps, cur);
    } else {
      torch::NoGradGuard ng;
      api = median_ms([&] { colt5::coor_descent(s, k, o); }, 3, reps, cur);
      plain = median_ms([&] { colt5::testing::plain_coor_descent(s, k, o); }, 3, reps, cur);
    }
    char name[96];
    std::snprintf(name, sizeof name, "%lldx%lld %lld it %s", static_cast<long long>(w.rows),
                  static_cast<long long>(w.cols), static_cast<long long>(w.iters), w.backward ? "fwd+bwd" : "fwd");
    table.push_back({name, kern, api, plain, w});
    std::printf("  %-28s kernel %8.4f ms  api %8.4f ms  plain %8.3f ms\n", name, kern, api, plain);
    std::fflush(stdout);
  }
  // Variants: the automatic choice under each cap on the cluster size (1: one
  // block per row), then each kernel forced by name; every launch configuration
  // is checked against the CPU before it is timed.
  std::printf("\nforward kernel ms by variant (cuda_max_cluster cap for auto; forced kernels by name):\n%-20s",
              "rows x cols");
  const int caps[] = {1, 2, 4, 8, 16};
  using colt5::kernels::RowKernel;
  const std::pair<const char*, RowKernel> forced[] = {{"warp", RowKernel::kWarp},
                                                      {"block", RowKernel::kBlock},
                                                      {"cluster", RowKernel::kCluster},
                                                      {"grid", RowKernel::kGrid}};
  for (int c : caps) std::printf(" %8s%d", "auto/", c);
  for (const auto& f : forced) std::printf(" %9s", f.first);
  std::printf("\n");
  for (auto shape : {std::pair<int64_t, int64_t>{16, 32768}, {64, 4096}, {8, 16384}, {4, 131072}}) {
    torch::Tensor s = torch::randn({shape.first, shape.second}, dev);
    torch::Tensor kr = torch::full({shape.first}, 9.0 / 8.0 * shape.second / 16.0, dev);
    torch::Tensor y = torch::empty_like(s);
    torch::Tensor saved = torch::empty({shape.first, 20}, dev.dtype(torch::kDouble));
    torch::Tensor stats = torch::empty({shape.first, 2}, dev.dtype(torch::kDouble));
    colt5::kernels::CoorDescentParams<float> p;
    p.rows = shape.first;
    p.cols = shape.second;
    p.s = s.data_ptr<float>();
    p.k = kr.data_ptr<float>();
    p.n_iters = 20;
    p.eps = 0.03;
    p.eps_init = 4.0;
    p.eps_decay = 0.7;
    p.y = y.data_ptr<float>();
    p.saved = saved.data_ptr<double>();
    p.row_stats = stats.data_ptr<double>();
    std::printf("%5lldx%-14lld", static_cast<long long>(shape.first), static_cast<long long>(shape.second));
    const colt5::CoorDescentOptions o = colt5::CoorDescentOptions().n_iters(20).eps(0.03).eps_init(4.0).eps_decay(0.7);
    auto timed = [&](const char* what) {
      validate(what, p, nullptr, s, kr, s, o, st);
      std::printf(" %9.4f",
                  kernel_ms([&](cudaStream_t s_) { colt5::kernels::coor_descent_forward_cuda<float>(p, s_); }, st));
      std::fflush(stdout);
    };
    for (int c : caps) {
      p.launch = colt5::kernels::RowLaunch();
      p.launch.max_cluster = c;
      timed("auto");
    }
    for (const auto& f : forced) {
      p.launch = colt5::kernels::RowLaunch();
      p.launch.kernel = f.second;
      timed(f.first);
    }
    std::printf("\n");
  }
  BC(cudaStreamDestroy(st));
  std::printf("\ndevice: %s\n", prop.name);
  std::printf("%-28s %10s %10s %10s %8s %10s %10s %8s\n", "work", "fused ms", "fused API", "plain ms", "ratio",
              "Triton ms", "target ms", "met");
  for (const Row& r : table) {
    char tri[16] = "-", tgt[16] = "-", met[8] = "-";
    if (r.w.triton_ms > 0) std::snprintf(tri, sizeof tri, "%.2f", r.w.triton_ms);
    if (r.w.target_ms > 0) {
      std::snprintf(tgt, sizeof tgt, "%.2f", r.w.target_ms);
      std::snprintf(met, sizeof met, "%s", r.kernel <= r.w.target_ms ? "yes" : "no");
    }
    std::printf("%-28s %10.4f %10.4f %10.3f %7.0fx %10s %10s %8s\n", r.work.c_str(), r.kernel, r.api, r.plain,
                r.plain / r.kernel, tri, tgt, met);
  }
  std::printf(
      "(fused ms: kernels alone, CUDA-graph replay; fused API: colt5::coor_descent with autograd per call; "
      "ratio: plain / fused ms)\n");
  return 0;
}
#endif
