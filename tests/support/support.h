// What the tests and benchmarks share: error measures, an error-message
// matcher, the coordinate-descent algorithm written with plain LibTorch ops
// (the reference the fused kernels are checked and timed against), and the
// router's coordinate-descent schedule.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <string>

#include "colt5/coor_descent.h"

namespace colt5 {
namespace testing {

// max |got - want| / max |want| over all entries, in float64 on the CPU (the
// plain difference when want is all zeros). The measure for parity checks:
// no entry may be off by more than the tolerance times the largest value.
double max_rel_error(const at::Tensor& got, const at::Tensor& want);

// ||got - want|| / max(||want||, floor), in float64 on the CPU. The measure for
// reduced precision, where isolated entries may move (a routing flip near the
// boundary) but the whole must stay close.
double norm_rel_error(const at::Tensor& got, const at::Tensor& want, double floor = 1e-6);

// The message of the c10::Error that f throws, without its backtrace; "" when
// f does not throw.
std::string error_message(const std::function<void()>& f);

// Whether the autograd graph behind t has a node whose name contains `what`
// (a custom function's node carries its class name): which path a module took.
bool graph_has(const at::Tensor& t, const std::string& what);

// Coordinate descent written with plain LibTorch ops (logsumexp and relu per
// iteration), differentiated by autograd. k: one value per row (shape
// s.shape[:-1]); mask: bool, the shape of s, or undefined.
at::Tensor plain_coor_descent(const at::Tensor& s, const at::Tensor& k, const CoorDescentOptions& options,
                              const at::Tensor& mask = {});
// The same with one k for every row.
at::Tensor plain_coor_descent(const at::Tensor& s, double k, const CoorDescentOptions& options,
                              const at::Tensor& mask = {});

// The routers' coordinate-descent schedule (colt5::nn::router_defaults).
CoorDescentOptions router_schedule();

}  // namespace testing
}  // namespace colt5
