// The routing scores' share of x's gradient, handed from the routing-scores
// node to the norm node that passed x on to it (CUDA only). Where a router
// takes its scores from x as a fused norm passed it on (the block's light
// attention and light feedforward norms), the scores' backward would write
// x's gradient in a pass of its own (read x and the residual's gradient,
// write the sum) only for the norm's backward to read it back. Instead the
// scores' node leaves its terms here and gives x no gradient; the norm's node,
// which runs after it (it waits for every consumer of its outputs), adds them
// as its kernel writes x's gradient (kernels::RmsNormParams::route_*).
#pragma once

#ifdef COLT5_WITH_CUDA
#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>

#include <cstdint>

namespace colt5 {
namespace nn {

struct NormRouteGrad : torch::CustomClassHolder {
  bool pending = false;  // terms left for the norm's backward
  int64_t task = -1;     // the backward pass (graph task) that left them
  int64_t r = 0;
  at::Tensor tokens;     // [r, d] float32
  at::Tensor grad_dots;  // [N, r] float32, or undefined
  at::Tensor grad_norms, norms;  // [N] float32, or undefined
  at::Tensor passed;     // x's gradient through the scores' alias of x, x's dtype, or undefined
  at::Tensor slot[2], slot_rows[2];  // gathered rows' gradients by each row's slot
  void clear() {
    pending = false;
    tokens = grad_dots = grad_norms = norms = passed = at::Tensor();
    for (int i = 0; i < 2; ++i) slot[i] = slot_rows[i] = at::Tensor();
  }
};
using NormRouteGradPtr = c10::intrusive_ptr<NormRouteGrad>;

// The hand-over of the fused norm node that passed x [N, d] on (x that
// output, or a reshape of it: the same elements in the same order), or null.
NormRouteGradPtr norm_route_grad_of(const at::Tensor& x);

// The id of the backward pass running now (-1 outside one).
int64_t current_backward_pass();

}  // namespace nn
}  // namespace colt5
#endif
