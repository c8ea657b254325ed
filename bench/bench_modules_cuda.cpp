// The seed README's modules on one GPU: the transformer block (2 x 32768 x 512,
// 1024 heavy tokens) and the autoregressive attention (2 x 8192 x 512), forward
// and forward+backward in float32 and under bf16 autocast, with peak memory;
// a same-run baseline of dense attention over the whole sequence (what routing
// saves), and the reference's figures from the same GPU type.
#include <torch/torch.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <vector>

#include "colt5/nn/conditional.h"
#include "colt5/compat.h"

#ifdef COLT5_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <cuda_runtime.h>
#endif

#ifndef COLT5_WITH_CUDA
int main() {
  std::printf("bench_modules_cuda: built without CUDA\n");
  return 0;
}
#else

namespace {

using namespace colt5::nn;

struct Measure {
  double ms;
  double peak_gib;
};

Measure time_cuda(const std::function<void()>& f, int reps = 10) {
  f();
  f();
  torch::cuda::synchronize();
  c10::cuda::CUDACachingAllocator::resetPeakStats(0);
  std::vector<double> t;
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  for (int i = 0; i < reps; ++i) {
    cudaEventRecord(a, at::cuda::getCurrentCUDAStream());
    f();
    cudaEventRecord(b, at::cuda::getCurrentCUDAStream());
    cudaEventSynchronize(b);
    float ms = 0;
    cudaEventElapsedTime(&ms, a, b);
    t.push_back(ms);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(t.begin(), t.end());
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(0);
  return {t[t.size() / 2], static_cast<double>(stats.allocated_bytes[0].peak) / (1024.0 * 1024 * 1024)};
}

class Autocast {
 public:
  explicit Autocast(bool on) : on_(on) {
    if (on_) colt5::compat::set_autocast(at::kCUDA, true, at::kBFloat16);
  }
  ~Autocast() {
    if (!on_) return;
    at::autocast::clear_cache();
    colt5::compat::set_autocast(at::kCUDA, false, at::kBFloat16);
  }

 private:
  bool on_;
};

void row(const char* work, const char* pass, const Measure& m, const char* reference) {
  std::printf("%-44s %-8s %10.2f %9.2f   %s\n", work, pass, m.ms, m.peak_gib, reference);
  std::fflush(stdout);
}

}  // namespace

int main() {
  if (!torch::cuda::is_available()) {
    std::printf("bench_modules_cuda: no CUDA device\n");
    return 0;
  }
  torch::manual_seed(0);
  const torch::Device dev(torch::kCUDA, 0);
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  std::printf("device: %s; median of CUDA-event timings; peak = allocated GiB during the timed runs\n\n", prop.name);
  std::printf("%-44s %-8s %10s %9s   %s\n", "work", "pass", "ms", "peak GiB", "reference (SPEC, same GPU type)");

  {
    ConditionalRoutedTransformerBlock block(ConditionalRoutedTransformerBlockOptions(512, 1024, 1024, 1024)
                                                .light_dim_head(64)
                                                .light_heads(8)
                                                .light_window_size(128)
                                                .heavy_dim_head(64)
                                                .heavy_heads(8));
    block->to(dev);
    torch::Tensor x = torch::randn({2, 32768, 512}, torch::TensorOptions(dev));
    torch::Tensor mask = torch::ones({2, 32768}, torch::TensorOptions(dev).dtype(torch::kBool));
    for (bool amp : {false, true}) {
      const char* name = amp ? "block 2x32768x512, bf16 autocast" : "block 2x32768x512, fp32";
      row(name, "fwd", time_cuda([&] {
            torch::NoGradGuard g;
            Autocast ac(amp);
            block->forward(x, mask);
          }),
          amp ? "crashes" : "8.76 (Triton), 18.3 (plain); peak 3.4 GiB");
      torch::Tensor xg = x.detach().requires_grad_(true);
      row(name, "fwd+bwd", time_cuda([&] {
            torch::Tensor out;
            {
              Autocast ac(amp);
              out = block->forward(xg, mask);
            }
            out.sum().backward();
          }),
          amp ? "crashes" : "25.9 (Triton), 40.1 (plain)");
    }
  }
  {
    // Same-run baseline: dense attention of every token to every token, the cost routing avoids.
    auto o = torch::TensorOptions(dev).dtype(torch::kBFloat16);
    torch::Tensor q = torch::randn({2, 8, 32768, 64}, o).requires_grad_(true);
    torch::Tensor k = torch::randn({2, 8, 32768, 64}, o).requires_grad_(true);
    torch::Tensor v = torch::randn({2, 8, 32768, 64}, o).requires_grad_(true);
    row("dense SDPA 2x8x32768x64 (baseline), bf16", "fwd+bwd",
        time_cuda([&] { at::scaled_dot_product_attention(q, k, v).sum().backward(); }), "32.3");
  }
  {
    ConditionalRoutedAutoregressiveAttention attn(ConditionalRoutedAutoregressiveAttentionOptions(512, 32, 1024)
                                                      .light_dim_head(64)
                                                      .light_heads(8)
                                                      .light_window_size(128)
                                                      .heavy_window_size(128)
                                                      .heavy_dim_head(64)
                                                      .heavy_heads(8)
                                                      .num_routed_kv(2));
    attn->to(dev);
    torch::Tensor x = torch::randn({2, 8192, 512}, torch::TensorOptions(dev)).requires_grad_(true);
    for (bool amp : {false, true}) {
      const char* name = amp ? "autoregressive 2x8192x512, bf16 autocast" : "autoregressive 2x8192x512, fp32";
      row(name, "fwd+bwd", time_cuda([&] {
            torch::Tensor out;
            {
              Autocast ac(amp);
              out = attn->forward(x);
            }
            out.sum().backward();
          }),
          amp ? "-" : "66.3, peak 8.7 GiB");
    }
  }
  return 0;
}
#endif
