// colt5._C: the Python binding of the library (one translation unit).
//
// Modules are built from the reference's keyword names (a JSON object) and
// exposed as a tree of nodes whose parameters and buffers are the C++
// module's own tensors; python/colt5/_module.py mirrors that tree with
// torch.nn.Module objects. The soft top-k is also registered as the operators
// torch.ops.colt5.*.
#include <torch/extension.h>

#include <nlohmann/json.hpp>

#include <chrono>
#include <memory>
#include <set>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "colt5/colt5.h"

namespace py = pybind11;
using json = nlohmann::json;

namespace colt5 {
namespace python {
namespace {

// ------------------------------------------------------------------ modules

// One module of the tree (a handle shared with Python).
struct Node {
  std::shared_ptr<torch::nn::Module> module;

  template <typename Impl>
  std::shared_ptr<Impl> as(const char* kind) const {
    auto p = std::dynamic_pointer_cast<Impl>(module);
    TORCH_CHECK(p != nullptr, "colt5: the module is not a ", kind, " (it is ", module->name(), ")");
    return p;
  }
};

// Every kind is built by the library from the reference's keywords.
Node build(const std::string& kind, const std::string& config_json) {
  return {nn::build_module(kind, config_json).module()};
}

using Tensors = std::vector<std::pair<std::string, torch::Tensor>>;

Tensors local_parameters(const Node& n) {
  Tensors out;
  for (const auto& p : n.module->named_parameters(/*recurse=*/false)) out.emplace_back(p.key(), p.value());
  return out;
}

Tensors local_buffers(const Node& n) {
  Tensors out;
  for (const auto& b : n.module->named_buffers(/*recurse=*/false)) out.emplace_back(b.key(), b.value());
  return out;
}

std::vector<std::pair<std::string, Node>> children(const Node& n) {
  std::vector<std::pair<std::string, Node>> out;
  for (const auto& c : n.module->named_children()) out.emplace_back(c.key(), Node{c.value()});
  return out;
}

torch::Tensor opt(const c10::optional<torch::Tensor>& t) { return t.has_value() ? *t : torch::Tensor(); }

py::object maybe(const torch::Tensor& t) { return t.defined() ? py::cast(t) : py::none(); }

// Forward calls, one per kind, with the reference's arguments. The GIL is
// released while the library runs.
py::tuple router_forward(const Node& n, const torch::Tensor& x, int64_t num_tokens,
                         const c10::optional<torch::Tensor>& mask, bool random_route,
                         const c10::optional<torch::Tensor>& routing_tokens, bool keep_one_route_dim) {
  auto m = n.as<nn::CoordinateDescentRouterImpl>("CoordinateDescentRouter");
  nn::RouterOutput r;
  {
    py::gil_scoped_release no_gil;
    r = m->forward(x, num_tokens, opt(mask), random_route, opt(routing_tokens), keep_one_route_dim);
  }
  return py::make_tuple(maybe(r.indices), r.scores, r.routed_tokens, maybe(r.routed_mask));
}

torch::Tensor router_route_back(const Node& n, const torch::Tensor& src, const torch::Tensor& routed,
                                const torch::Tensor& indices) {
  auto m = n.as<nn::CoordinateDescentRouterImpl>("CoordinateDescentRouter");
  py::gil_scoped_release no_gil;
  return m->route_back(src, routed, indices);
}

torch::Tensor ff_forward(const Node& n, const torch::Tensor& x, const c10::optional<torch::Tensor>& mask,
                         c10::optional<int64_t> num_heavy_tokens) {
  auto m = n.as<nn::ConditionalRoutedFeedForwardImpl>("ConditionalRoutedFeedForward");
  py::gil_scoped_release no_gil;
  return m->forward(x, opt(mask), num_heavy_tokens);
}

torch::Tensor attn_forward(const Node& n, const torch::Tensor& x, const c10::optional<torch::Tensor>& mask,
                           c10::optional<int64_t> q, c10::optional<int64_t> kv) {
  auto m = n.as<nn::ConditionalRoutedAttentionImpl>("ConditionalRoutedAttention");
  py::gil_scoped_release no_gil;
  return m->forward(x, opt(mask), q, kv);
}

torch::Tensor block_forward(const Node& n, const torch::Tensor& x, const c10::optional<torch::Tensor>& mask,
                            c10::optional<int64_t> q, c10::optional<int64_t> kv, c10::optional<int64_t> ff) {
  auto m = n.as<nn::ConditionalRoutedTransformerBlockImpl>("ConditionalRoutedTransformerBlock");
  py::gil_scoped_release no_gil;
  return m->forward(x, opt(mask), q, kv, ff);
}

torch::Tensor ar_forward(const Node& n, const torch::Tensor& x, c10::optional<int64_t> q, c10::optional<int64_t> kv,
                         bool random_route) {
  auto m = n.as<nn::ConditionalRoutedAutoregressiveAttentionImpl>("ConditionalRoutedAutoregressiveAttention");
  py::gil_scoped_release no_gil;
  return m->forward(x, q, kv, random_route);
}

torch::Tensor cross_forward(const Node& n, const torch::Tensor& x, const torch::Tensor& context,
                            const c10::optional<torch::Tensor>& mask, const c10::optional<torch::Tensor>& context_mask,
                            c10::optional<int64_t> q, c10::optional<int64_t> kv) {
  auto m = n.as<nn::ConditionalRoutedCrossAttentionImpl>("ConditionalRoutedCrossAttention");
  py::gil_scoped_release no_gil;
  return m->forward(x, context, opt(mask), opt(context_mask), q, kv);
}

torch::Tensor image_forward(const Node& n, const torch::Tensor& x, const c10::optional<torch::Tensor>& mask,
                            c10::optional<int64_t> q, c10::optional<int64_t> kv) {
  auto m = n.as<nn::ConditionalRoutedImageAttentionImpl>("ConditionalRoutedImageAttention");
  py::gil_scoped_release no_gil;
  return m->forward(x, opt(mask), q, kv);
}

torch::Tensor vit_forward(const Node& n, const torch::Tensor& img) {
  auto m = n.as<nn::ConditionalRoutedViTImpl>("ConditionalRoutedViT");
  py::gil_scoped_release no_gil;
  return m->forward(img);
}

// ---------------------------------------------------------------- operators

CoorDescentOptions cd_options(int64_t n_iters, double eps, c10::optional<double> eps_init, double eps_decay,
                              int64_t checkpoint_segments) {
  return CoorDescentOptions().n_iters(n_iters).eps(eps).eps_init(eps_init).eps_decay(eps_decay).checkpoint_segments(
      checkpoint_segments);
}

torch::Tensor op_coor_descent(const torch::Tensor& s, double k, int64_t n_iters, double eps,
                              c10::optional<double> eps_init, double eps_decay,
                              const c10::optional<torch::Tensor>& mask, int64_t checkpoint_segments) {
  return coor_descent(s, k, cd_options(n_iters, eps, eps_init, eps_decay, checkpoint_segments), opt(mask));
}

torch::Tensor op_coor_descent_row_k(const torch::Tensor& s, const torch::Tensor& k, int64_t n_iters, double eps,
                                    c10::optional<double> eps_init, double eps_decay,
                                    const c10::optional<torch::Tensor>& mask, int64_t checkpoint_segments) {
  return coor_descent(s, k, cd_options(n_iters, eps, eps_init, eps_decay, checkpoint_segments), opt(mask));
}

torch::Tensor op_topk_indices(const torch::Tensor& scores, int64_t k, const c10::optional<torch::Tensor>& tiebreak,
                              const c10::optional<torch::Tensor>& mask) {
  return topk_indices(scores, k, opt(tiebreak), opt(mask));
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor> op_topk(
    const torch::Tensor& x, int64_t k, double coor_descent_k_ratio, int64_t n_iters, double eps,
    c10::optional<double> eps_init, double eps_decay, const c10::optional<torch::Tensor>& mask) {
  TopkResult r = topk(x, k,
                      TopkOptions()
                          .coor_descent_k_ratio(coor_descent_k_ratio)
                          .n_iters(n_iters)
                          .eps(eps)
                          .eps_init(eps_init)
                          .eps_decay(eps_decay),
                      opt(mask));
  return {r.values, r.indices, r.coor_descent_values, r.gates};
}

// ---------------------------------------------------------------- safetensors

py::tuple load_safetensors_py(const std::string& path) {
  SafetensorsData data;
  {
    py::gil_scoped_release no_gil;
    data = load_safetensors(path);
  }
  py::dict tensors;
  for (const auto& [name, t] : data.tensors) tensors[py::str(name)] = t;
  return py::make_tuple(tensors, data.metadata);
}

void save_safetensors_py(const std::string& path, const Tensors& tensors,
                         const std::map<std::string, std::string>& metadata) {
  Tensors detached;
  for (const auto& [name, t] : tensors) detached.emplace_back(name, t.detach());
  py::gil_scoped_release no_gil;
  save_safetensors(path, detached, metadata);
}

// ---------------------------------------------------------------- references for the tests and the benchmark

// `steps` AdamW steps of a stack of transformer blocks (built from the JSON
// configs, state loaded from `state`) on mean squared error, entirely in C++:
// the reference the Python training path is tested against. Returns the
// losses and the final state.
std::pair<std::vector<double>, Tensors> cpp_train_steps(const std::vector<std::string>& block_configs,
                                                        const Tensors& state, const torch::Tensor& x,
                                                        const c10::optional<torch::Tensor>& mask,
                                                        const torch::Tensor& target, double lr, double weight_decay,
                                                        int64_t steps) {
  py::gil_scoped_release no_gil;
  auto root = std::make_shared<torch::nn::Module>("TrainStepModel");
  torch::nn::ModuleList blocks;
  std::vector<std::shared_ptr<nn::ConditionalRoutedTransformerBlockImpl>> stack;
  for (const auto& config : block_configs) {
    auto block = std::dynamic_pointer_cast<nn::ConditionalRoutedTransformerBlockImpl>(
        nn::build_module("ConditionalRoutedTransformerBlock", config).module());
    blocks->push_back(block);
    stack.push_back(block);
  }
  root->register_module("blocks", blocks);
  if (!state.empty()) root->to(state.front().second.scalar_type());
  nn::load_state_dict(*root, state);
  torch::optim::AdamW optimizer(root->parameters(), torch::optim::AdamWOptions(lr).weight_decay(weight_decay));
  std::vector<double> losses;
  for (int64_t step = 0; step < steps; ++step) {
    optimizer.zero_grad();
    torch::Tensor h = x;
    for (auto& block : stack) h = block->forward(h, opt(mask));
    torch::Tensor loss = torch::mse_loss(h, target);
    loss.backward();
    optimizer.step();
    losses.push_back(loss.item<double>());
  }
  Tensors out;
  for (const auto& [name, t] : nn::state_dict(*root)) out.emplace_back(name, t.detach().clone());
  return {losses, out};
}

// Seconds per call of the block's forward called from C++ (median of `iters`
// after one warm-up), for the Python call overhead measurement.
std::vector<double> cpp_block_forward_seconds(const Node& n, const torch::Tensor& x,
                                              const c10::optional<torch::Tensor>& mask, int64_t iters) {
  auto m = n.as<nn::ConditionalRoutedTransformerBlockImpl>("ConditionalRoutedTransformerBlock");
  py::gil_scoped_release no_gil;
  torch::NoGradGuard no_grad;
  const torch::Tensor mk = opt(mask);
  m->forward(x, mk);
  std::vector<double> seconds;
  for (int64_t i = 0; i < iters; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    m->forward(x, mk);
    seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return seconds;
}

}  // namespace
}  // namespace python
}  // namespace colt5

// Composite operators: their autograd is the library's own (CompositeImplicitAutograd).
TORCH_LIBRARY(colt5, m) {
  using namespace colt5::python;
  m.def(
      "coor_descent(Tensor s, float k, *, int n_iters=20, float eps=0.1, float? eps_init=None, "
      "float eps_decay=1.0, Tensor? mask=None, int checkpoint_segments=0) -> Tensor",
      &op_coor_descent);
  m.def(
      "coor_descent.row_k(Tensor s, Tensor k, *, int n_iters=20, float eps=0.1, float? eps_init=None, "
      "float eps_decay=1.0, Tensor? mask=None, int checkpoint_segments=0) -> Tensor",
      &op_coor_descent_row_k);
  m.def("topk_indices(Tensor scores, int k, Tensor? tiebreak=None, Tensor? mask=None) -> Tensor", &op_topk_indices);
  m.def(
      "topk(Tensor x, int k, float coor_descent_k_ratio=1.125, int n_iters=20, float eps=0.1, float? eps_init=None, "
      "float eps_decay=1.0, Tensor? mask=None) -> (Tensor values, Tensor indices, Tensor coor_descent_values, "
      "Tensor gates)",
      &op_topk);
}

PYBIND11_MODULE(_C, m) {
  using namespace colt5::python;
  m.doc() = "colt5 C++ core";

  // Library errors reach Python as RuntimeError with the library's message
  // (without the C++ backtrace); c10's typed errors keep their Python type.
  py::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const c10::IndexError& e) {
      PyErr_SetString(PyExc_IndexError, e.what_without_backtrace());
    } catch (const c10::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    } catch (const c10::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what_without_backtrace());
    } catch (const c10::NotImplementedError& e) {
      PyErr_SetString(PyExc_NotImplementedError, e.what_without_backtrace());
    } catch (const c10::Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    }
  });

  py::class_<Node>(m, "Node", py::module_local())
      .def("name", [](const Node& n) { return n.module->name(); })
      .def("local_parameters", &local_parameters)
      .def("local_buffers", &local_buffers)
      .def("children", &children)
      .def("train", [](const Node& n, bool mode) { n.module->train(mode); })
      .def("is_training", [](const Node& n) { return n.module->is_training(); })
      .def("__repr__", [](const Node& n) {
        std::ostringstream os;
        n.module->pretty_print(os);
        return os.str();
      });

  m.def("build", &build, py::arg("kind"), py::arg("config_json"));
  m.def("module_kinds", []() {
    auto kinds = colt5::nn::module_kinds();
    kinds.push_back("ConditionalRoutedImageAttention");
    kinds.push_back("ConditionalRoutedViT");
    return kinds;
  });
  m.def("router_forward", &router_forward);
  m.def("router_route_back", &router_route_back);
  m.def("ff_forward", &ff_forward);
  m.def("attn_forward", &attn_forward);
  m.def("block_forward", &block_forward);
  m.def("ar_forward", &ar_forward);
  m.def("cross_forward", &cross_forward);
  m.def("image_forward", &image_forward);
  m.def("vit_forward", &vit_forward);
  m.def("posemb_sincos_2d", &colt5::nn::posemb_sincos_2d, py::arg("patches"), py::arg("temperature") = 10000.0);
  m.def("load_safetensors", &load_safetensors_py, py::arg("path"));
  m.def("save_safetensors", &save_safetensors_py, py::arg("path"), py::arg("tensors"),
        py::arg("metadata") = std::map<std::string, std::string>());
  m.def("cpp_train_steps", &cpp_train_steps);
  m.def("cpp_block_forward_seconds", &cpp_block_forward_seconds);
  m.attr("with_cuda") =
#ifdef COLT5_WITH_CUDA
      true;
#else
      false;
#endif
}
