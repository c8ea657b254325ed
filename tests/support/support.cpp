#include "support/support.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <set>
#include <vector>

#include "colt5/nn/options.h"

namespace colt5 {
namespace testing {

double max_rel_error(const at::Tensor& got, const at::Tensor& want) {
  const torch::Tensor x = got.detach().to(torch::kCPU, torch::kDouble);
  const torch::Tensor y = want.detach().to(torch::kCPU, torch::kDouble);
  const double scale = y.abs().max().item<double>();
  const double diff = (x - y).abs().max().item<double>();
  return scale > 0 ? diff / scale : diff;
}

double norm_rel_error(const at::Tensor& got, const at::Tensor& want, double floor) {
  const torch::Tensor x = got.detach().to(torch::kCPU, torch::kDouble);
  const torch::Tensor y = want.detach().to(torch::kCPU, torch::kDouble);
  return (x - y).norm().item<double>() / std::max(y.norm().item<double>(), floor);
}

bool graph_has(const at::Tensor& t, const std::string& what) {
  std::vector<std::shared_ptr<torch::autograd::Node>> todo{t.grad_fn()};
  std::set<const torch::autograd::Node*> seen;
  while (!todo.empty()) {
    std::shared_ptr<torch::autograd::Node> node = todo.back();
    todo.pop_back();
    if (!node || !seen.insert(node.get()).second) continue;
    if (node->name().find(what) != std::string::npos) return true;
    for (const auto& edge : node->next_edges()) todo.push_back(edge.function);
  }
  return false;
}

std::string error_message(const std::function<void()>& f) {
  try {
    f();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "";
}

namespace {

// logk: a tensor broadcasting against s's rows (shape [..., 1]) or a double.
template <typename LogK>
at::Tensor iterate(const at::Tensor& s_in, const LogK& logk, const CoorDescentOptions& o, const at::Tensor& mask) {
  const double fill = -std::numeric_limits<double>::max();
  torch::Tensor s = mask.defined() ? s_in.masked_fill(~mask, fill) : s_in;
  torch::Tensor a, b = -s;
  double e = std::max(o.eps_init().value_or(o.eps()), o.eps());
  for (int64_t i = 0; i < o.n_iters(); ++i) {
    torch::Tensor sb = (s + b) / e;
    if (mask.defined()) sb = sb.masked_fill(~mask, fill);
    a = e * (logk - sb.logsumexp(-1, true));
    b = -torch::relu(s + a);
    e = std::max(e * o.eps_decay(), o.eps());
  }
  torch::Tensor y = ((s + a + b) / e).exp();
  return mask.defined() ? y.masked_fill(~mask, 0.0) : y;
}

}  // namespace

at::Tensor plain_coor_descent(const at::Tensor& s, const at::Tensor& k, const CoorDescentOptions& options,
                              const at::Tensor& mask) {
  return iterate(s, k.log().unsqueeze(-1), options, mask);
}

at::Tensor plain_coor_descent(const at::Tensor& s, double k, const CoorDescentOptions& options,
                              const at::Tensor& mask) {
  return iterate(s, std::log(k), options, mask);
}

CoorDescentOptions router_schedule() {
  namespace d = colt5::nn::router_defaults;
  return CoorDescentOptions().n_iters(d::n_iters).eps(d::eps).eps_init(d::eps_init).eps_decay(d::eps_decay);
}

}  // namespace testing
}  // namespace colt5
