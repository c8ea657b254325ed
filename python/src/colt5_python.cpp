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

// ------------------------------------------------------------------ keywords

std::string join(const std::vector<std::string>& names) {
  std::string s;
  for (size_t i = 0; i < names.size(); ++i) s += (i ? ", " : "") + names[i];
  return s;
}

// Reads the reference's keyword arguments from a JSON object; reports unknown
// keywords, missing required ones and wrong types by name.
class Keywords {
 public:
  Keywords(std::string what, const json& obj) : what_(std::move(what)), obj_(obj) {
    TORCH_CHECK(obj_.is_object(), what_, ": expected a JSON object, got ", obj_.dump());
  }
  bool has(const std::string& key) {
    used_.insert(key);
    return obj_.contains(key) && !obj_.at(key).is_null();
  }
  int64_t integer(const std::string& key) {
    TORCH_CHECK(has(key), what_, ": required keyword '", key, "' is missing");
    return as_integer(key);
  }
  double number(const std::string& key) {
    TORCH_CHECK(has(key), what_, ": required keyword '", key, "' is missing");
    return as_number(key);
  }
  template <typename Set>
  void integer(const std::string& key, Set&& set) {
    if (has(key)) set(as_integer(key));
  }
  template <typename Set>
  void number(const std::string& key, Set&& set) {
    if (has(key)) set(as_number(key));
  }
  template <typename Set>
  void boolean(const std::string& key, Set&& set) {
    if (!has(key)) return;
    const json& v = obj_.at(key);
    TORCH_CHECK(v.is_boolean(), what_, ": keyword '", key, "' must be True or False, got ", v.dump());
    set(v.get<bool>());
  }
  // An int or a pair of ints.
  torch::ExpandingArray<2> pair(const std::string& key) {
    TORCH_CHECK(has(key), what_, ": required keyword '", key, "' is missing");
    const json& v = obj_.at(key);
    if (v.is_array()) {
      TORCH_CHECK(v.size() == 2 && v[0].is_number_integer() && v[1].is_number_integer(), what_, ": keyword '", key,
                  "' must be an integer or a pair of integers, got ", v.dump());
      return torch::ExpandingArray<2>({v[0].get<int64_t>(), v[1].get<int64_t>()});
    }
    return torch::ExpandingArray<2>(as_integer(key));
  }
  // The raw value (for nested objects), null when absent.
  json raw(const std::string& key) {
    used_.insert(key);
    return obj_.contains(key) ? obj_.at(key) : json();
  }
  void finish() const {
    std::vector<std::string> unknown;
    for (auto it = obj_.begin(); it != obj_.end(); ++it)
      if (!used_.count(it.key())) unknown.push_back("'" + it.key() + "'");
    TORCH_CHECK(unknown.empty(), what_, ": unknown keyword", unknown.size() > 1 ? "s " : " ", join(unknown));
  }

 private:
  int64_t as_integer(const std::string& key) const {
    const json& v = obj_.at(key);
    if (v.is_number_integer()) return v.get<int64_t>();
    if (v.is_number_float() && v.get<double>() == static_cast<double>(static_cast<int64_t>(v.get<double>())))
      return static_cast<int64_t>(v.get<double>());
    TORCH_CHECK(false, what_, ": keyword '", key, "' must be an integer, got ", v.dump());
    return 0;
  }
  double as_number(const std::string& key) const {
    const json& v = obj_.at(key);
    TORCH_CHECK(v.is_number(), what_, ": keyword '", key, "' must be a number, got ", v.dump());
    return v.get<double>();
  }

  std::string what_;
  const json& obj_;
  std::set<std::string> used_;
};

// router_kwargs of the image attention and the ViT. The other kinds go
// through colt5::nn::build_module, which reads the same keywords.
nn::RouterKwargs router_kwargs(const std::string& what, const json& value) {
  nn::RouterKwargs r;
  if (value.is_null()) return r;
  Keywords k(what + " router_kwargs", value);
  k.integer("n_iters", [&](int64_t v) { r.n_iters(v); });
  k.number("fetch_k_ratio", [&](double v) { r.fetch_k_ratio(v); });
  k.number("eps", [&](double v) { r.eps(v); });
  k.number("eps_decay", [&](double v) { r.eps_decay(v); });
  if (k.has("eps_init")) {
    r.eps_init(k.number("eps_init"));
  } else if (value.contains("eps_init")) {
    r.eps_init(c10::nullopt);  // eps_init = None: no eps-scaling
  }
  k.boolean("use_triton", [&](bool v) { r.use_triton(v); });
  k.boolean("cosine_sim_routing", [&](bool v) { r.cosine_sim_routing(v); });
  k.number("cosine_sim_scale", [&](double v) { r.cosine_sim_scale(v); });
  k.integer("route_block_size", [&](int64_t v) { r.route_block_size(v); });
  k.integer("checkpoint_segments", [&](int64_t v) { r.checkpoint_segments(v); });
  k.integer("triton_checkpoint_segments", [&](int64_t v) { r.checkpoint_segments(v); });
  k.finish();
  return r;
}

std::shared_ptr<torch::nn::Module> build_image_attention(const json& config) {
  const std::string what = "ConditionalRoutedImageAttention";
  Keywords k(what, config);
  nn::ConditionalRoutedImageAttentionOptions o(k.integer("dim"), k.integer("num_heavy_tokens_q"),
                                               k.integer("num_heavy_tokens_kv"));
  k.integer("num_routed_kv", [&](int64_t v) { o.num_routed_kv(v); });
  k.integer("light_dim_head", [&](int64_t v) { o.light_dim_head(v); });
  k.integer("light_heads", [&](int64_t v) { o.light_heads(v); });
  k.integer("light_window_size", [&](int64_t v) { o.light_window_size(v); });
  k.integer("heavy_dim_head", [&](int64_t v) { o.heavy_dim_head(v); });
  k.integer("heavy_heads", [&](int64_t v) { o.heavy_heads(v); });
  k.boolean("router_straight_through", [&](bool v) { o.router_straight_through(v); });
  o.router_kwargs(router_kwargs(what, k.raw("router_kwargs")));
  k.boolean("multiply_keys_by_score", [&](bool v) { o.multiply_keys_by_score(v); });
  k.boolean("multiply_queries_by_score", [&](bool v) { o.multiply_queries_by_score(v); });
  k.boolean("use_triton", [&](bool v) { o.use_triton(v); });
  k.boolean("use_null_q_tokens", [&](bool v) { o.use_null_q_tokens(v); });
  k.boolean("use_flash_attn", [&](bool v) { o.use_flash_attn(v); });
  k.boolean("channel_first", [&](bool v) { o.channel_first(v); });
  k.finish();
  return nn::ConditionalRoutedImageAttention(o).ptr();
}

std::shared_ptr<torch::nn::Module> build_vit(const json& config) {
  const std::string what = "ConditionalRoutedViT";
  Keywords k(what, config);
  nn::ConditionalRoutedViTOptions o(k.pair("image_size"), k.pair("patch_size"), k.integer("num_classes"),
                                    k.integer("dim"), k.integer("depth"));
  o.attn_num_heavy_tokens_q(k.integer("attn_num_heavy_tokens_q"));
  o.attn_num_heavy_tokens_kv(k.integer("attn_num_heavy_tokens_kv"));
  o.attn_heavy_dim_head(k.integer("attn_heavy_dim_head"));
  o.attn_heavy_heads(k.integer("attn_heavy_heads"));
  o.attn_light_dim_head(k.integer("attn_light_dim_head"));
  o.attn_light_heads(k.integer("attn_light_heads"));
  o.attn_light_window_size(k.integer("attn_light_window_size"));
  o.ff_num_heavy_tokens(k.integer("ff_num_heavy_tokens"));
  o.ff_heavy_mult(k.number("ff_heavy_mult"));
  o.ff_light_mult(k.number("ff_light_mult"));
  k.integer("channels", [&](int64_t v) { o.channels(v); });
  k.boolean("router_straight_through", [&](bool v) { o.router_straight_through(v); });
  o.router_kwargs(router_kwargs(what, k.raw("router_kwargs")));
  k.boolean("router_use_triton", [&](bool v) { o.router_use_triton(v); });
  k.boolean("flash_attn", [&](bool v) { o.flash_attn(v); });
  k.integer("attn_num_routed_kv", [&](int64_t v) { o.attn_num_routed_kv(v); });
  k.number("default_coor_descent_eps", [&](double v) { o.default_coor_descent_eps(v); });
  k.finish();
  return nn::ConditionalRoutedViT(o).ptr();
}

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

Node build(const std::string& kind, const std::string& config_json) {
  json config;
  try {
    config = json::parse(config_json);
  } catch (const json::exception& e) {
    TORCH_CHECK(false, kind, ": the configuration is not valid JSON: ", e.what());
  }
  if (kind == "ConditionalRoutedImageAttention") return {build_image_attention(config)};
  if (kind == "ConditionalRoutedViT") return {build_vit(config)};
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
