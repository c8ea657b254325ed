// A training or inference step captured once in a CUDA graph and replayed:
// the GPU's work without the host's launch overhead, for steps whose shapes
// stay the same. The routed modules' forward and backward make no host
// synchronization, so their steps can be captured (tests/cuda checks it).
#pragma once

#include <functional>
#include <memory>

namespace colt5 {

class CapturedStep {
 public:
  // Runs `step` `warmup` times on a side stream of the current CUDA device
  // (lazy initializations, workspace and cache allocations stay out of the
  // graph), then captures one more run. `before_each`, when set, runs before
  // each warm-up run and before the capture, outside the graph (for example:
  // unset the parameters' gradients, so that the captured backward allocates
  // them in the graph's memory and every replay rewrites them). Tensors the
  // captured run created (its loss, the gradients) keep their memory and are
  // rewritten by each replay; inputs are fed by copying into the tensors the
  // step read while captured. Throws where colt5 was built without CUDA or
  // the step cannot be captured (for example, it synchronizes with the host).
  explicit CapturedStep(const std::function<void()>& step, int warmup = 2,
                        const std::function<void()>& before_each = {});
  ~CapturedStep();
  CapturedStep(const CapturedStep&) = delete;
  CapturedStep& operator=(const CapturedStep&) = delete;

  // Launches the captured work on the current stream (asynchronously; the
  // first replay also uploads the graph, so time from the second on).
  void replay();

 private:
  struct Graph;
  std::unique_ptr<Graph> graph_;
};

}  // namespace colt5
