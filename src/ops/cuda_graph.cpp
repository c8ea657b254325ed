#include "colt5/cuda_graph.h"

#include <stdexcept>

#ifdef COLT5_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/cuda.h>
#endif

namespace colt5 {

#ifdef COLT5_WITH_CUDA
struct CapturedStep::Graph {
  at::cuda::CUDAGraph graph;
};

CapturedStep::CapturedStep(const std::function<void()>& step, int warmup, const std::function<void()>& before_each)
    : graph_(std::make_unique<Graph>()) {
  if (!step) throw std::invalid_argument("CapturedStep: the step is empty");
  if (warmup < 1) throw std::invalid_argument("CapturedStep: warmup must be at least 1");
  at::cuda::CUDAStream side = at::cuda::getStreamFromPool();
  {
    at::cuda::CUDAStreamGuard guard(side);
    for (int i = 0; i < warmup; ++i) {
      if (before_each) before_each();
      step();
    }
    side.synchronize();
    if (before_each) before_each();
    graph_->graph.capture_begin();
    try {
      step();
    } catch (...) {
      // End the capture so that the stream is usable again, then report.
      try {
        graph_->graph.capture_end();
      } catch (...) {
      }
      throw;
    }
    graph_->graph.capture_end();
  }
  torch::cuda::synchronize();
}

void CapturedStep::replay() { graph_->graph.replay(); }
#else
struct CapturedStep::Graph {};

CapturedStep::CapturedStep(const std::function<void()>&, int, const std::function<void()>&) {
  throw std::runtime_error("CapturedStep: colt5 was built without CUDA");
}

void CapturedStep::replay() {}
#endif

CapturedStep::~CapturedStep() = default;

}  // namespace colt5
