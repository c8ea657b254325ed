// The operators one training step (forward + backward, gradients unset first)
// of each routed module dispatches, counted with LibTorch's RecordFunction
// callbacks, and the step's host time. On a GPU each operator is at least one
// host dispatch and most are a kernel launch: at 8k tokens the block's eager
// step is launch-bound (about twice its time replayed from a CUDA graph), so
// these counts are what its fixed cost scales with. On the CPU the same
// counts (and the step time at small shapes, mostly dispatch) measure the
// host overhead of the code both devices share.
//   bench_ops [--device cpu|cuda] [--seq N] [--dim D] [--dim-head H] [--runs N] [--top N]
//             [--only block|block-no-mask|autoregressive|cross|feedforward]
//             [--trace SCOPE]     print the calls made in a scope (router, backward, ...)
//             [--forward-only 1]  the forward alone, without autograd
// Per module:
//   calls   operators called by colt5's code or by an autograd node (not from
//           inside another operator): the host dispatches of the step
//   leaves  operators that call no other operator
//   kernels leaves that are not views, metadata, allocations or no-op
//           conversions: about the kernels launched on a GPU (colt5's own
//           CUDA kernels are called from its autograd functions, not as
//           operators, and are not counted)
//   nodes   autograd nodes the backward evaluates
// then the most called operators, calls/kernels by colt5's innermost scope
// (RECORD_USER_SCOPE "colt5::...", which a profiler trace also shows; the
// backward as "backward"), and the host time inside each scope.
#include <ATen/record_function.h>
#include <torch/torch.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "colt5/nn/conditional.h"

namespace {

using namespace colt5::nn;

// Leaf operators that launch no kernel: views, metadata, allocation.
bool launches_nothing(const char* name) {
  static const char* const none[] = {"aten::view",       "aten::reshape",   "aten::_reshape_alias", "aten::t",
                                     "aten::transpose",  "aten::permute",   "aten::unsqueeze",      "aten::squeeze",
                                     "aten::expand",     "aten::narrow",    "aten::slice",          "aten::select",
                                     "aten::as_strided", "aten::detach",    "aten::alias",          "aten::unfold",
                                     "aten::empty",      "aten::empty_like", "aten::empty_strided", "aten::_unsafe_view",
                                     "aten::lift_fresh", "aten::split",     "aten::chunk",          "aten::unbind",
                                     "aten::expand_as",  "aten::view_as",   "aten::resize_",        "aten::set_",
                                     "aten::diagonal",   "aten::movedim",   "aten::flatten",        "aten::_local_scalar_dense",
                                     // a leaf conversion or contiguous() is a no-op (one that works calls _to_copy or clone)
                                     "aten::to", "aten::contiguous", "aten::type_as"};
  for (const char* n : none)
    if (std::strcmp(name, n) == 0) return true;
  return false;
}

struct Counts {
  int64_t calls = 0, leaves = 0, kernels = 0, backward_nodes = 0;
  std::map<std::string, int64_t> by_name;  // calls by operator name
  // calls and kernels by colt5's innermost scope (forward) or "backward"
  std::map<std::string, std::pair<int64_t, int64_t>> by_scope;
  // host time in each scope, inclusive of the scopes inside it (the forward's
  // colt5 scopes; "backward": every autograd node), ms
  std::map<std::string, double> scope_ms;
};

std::mutex counts_mutex;
Counts counts;
std::atomic<bool> counting{false};
std::string trace_scope;
bool forward_only = false;  // --forward-only: the forward alone, without autograd  // --trace: print the calls made in this scope, in order

struct Frame {
  bool op;            // an operator (not an autograd node or a user scope)
  bool has_child;     // called another operator
  std::string scope;  // colt5's scope ("colt5::router", ...), "backward" for an autograd node, or ""
  std::chrono::steady_clock::time_point start;
};
thread_local std::vector<Frame> frames;

// An operator: not an autograd node, nor the engine's frame around one
// ("autograd::engine::evaluate_function: ...", recorded as a function).
bool is_operator(const at::RecordFunction& fn) {
  return fn.scope() == at::RecordScope::FUNCTION && std::strncmp(fn.name(), "autograd::", 10) != 0;
}

std::unique_ptr<at::ObserverContext> on_start(const at::RecordFunction& fn) {
  const bool op = is_operator(fn);
  if (!frames.empty() && op) frames.back().has_child = true;
  std::string scope;
  if (fn.scope() == at::RecordScope::USER_SCOPE && std::strncmp(fn.name(), "colt5::", 7) == 0)
    scope = fn.name() + 7;
  else if (std::strncmp(fn.name(), "autograd::engine::evaluate_function", 35) == 0)
    scope = "backward";
  frames.push_back({op, false, std::move(scope), std::chrono::steady_clock::now()});
  return nullptr;
}

void on_end(const at::RecordFunction& fn, at::ObserverContext*) {
  if (frames.empty()) return;
  const Frame f = frames.back();
  frames.pop_back();
  if (!counting) return;
  std::lock_guard<std::mutex> lock(counts_mutex);
  if (!f.scope.empty() && !f.op)
    counts.scope_ms[f.scope] +=
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - f.start).count();
  if (!f.op) {
    if (std::strncmp(fn.name(), "autograd::engine::evaluate_function", 35) == 0) ++counts.backward_nodes;
    return;
  }
  std::string scope = "(module)";
  for (auto it = frames.rbegin(); it != frames.rend(); ++it)
    if (!it->scope.empty()) {
      scope = it->scope;
      break;
    }
  if (frames.empty() || !frames.back().op) {
    ++counts.calls;
    ++counts.by_name[fn.name()];
    ++counts.by_scope[scope].first;
    if (scope == trace_scope) std::printf("      %s %s\n", scope.c_str(), fn.name());
  }
  if (!f.has_child) {
    ++counts.leaves;
    if (!launches_nothing(fn.name())) {
      ++counts.kernels;
      ++counts.by_scope[scope].second;
    }
  }
}

// The step's operators, counted once (after a warm-up step), and its median
// host time (synchronized on CUDA).
Counts count_step(const std::function<void()>& step_in, const torch::Device& device) {
  auto step = [&] {
    if (!forward_only) return step_in();
    torch::NoGradGuard no_grad;
    step_in();
  };
  step();
  if (device.is_cuda()) torch::cuda::synchronize();
  {
    std::lock_guard<std::mutex> lock(counts_mutex);
    counts = Counts();
    counting = true;
  }
  step();
  if (device.is_cuda()) torch::cuda::synchronize();
  std::lock_guard<std::mutex> lock(counts_mutex);
  counting = false;
  return counts;
}

// The end of a step: the backward of the output's sum (none with --forward-only).
void finish(const torch::Tensor& y) {
  if (!forward_only) y.sum().backward();
}

// Gradients unset before a step, as a training step starts (the backward then
// writes them instead of adding to them).
void unset_grads(torch::nn::Module& m, const std::vector<torch::Tensor>& inputs) {
  for (auto& p : m.parameters()) p.mutable_grad() = torch::Tensor();
  for (auto t : inputs) t.mutable_grad() = torch::Tensor();
}

double median_ms(int runs, const std::function<void()>& step_in, const torch::Device& device) {
  auto step = [&] {
    if (!forward_only) return step_in();
    torch::NoGradGuard no_grad;
    step_in();
  };
  std::vector<double> t;
  for (int i = 0; i < runs; ++i) {
    const auto start = std::chrono::steady_clock::now();
    step();
    if (device.is_cuda()) torch::cuda::synchronize();
    t.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

int usage() {
  std::fprintf(stderr,
               "usage: bench_ops [--device cpu|cuda] [--seq N] [--dim D] [--dim-head H] [--runs N] [--top N]\n"
               "                 [--only block|block-no-mask|autoregressive|cross|feedforward] [--trace SCOPE]\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string device_name = "cpu", only;
  int64_t seq = 2048, dim = 128, dim_head = 32;
  int runs = 20, top = 12;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (i + 1 >= argc) return usage();
    const std::string v = argv[++i];
    auto number = [&]() -> long {
      const long n = std::atol(v.c_str());
      if (n <= 0) {
        std::fprintf(stderr, "bench_ops: %s needs a positive number, got '%s'\n", a.c_str(), v.c_str());
        std::exit(2);
      }
      return n;
    };
    if (a == "--device")
      device_name = v;
    else if (a == "--only")
      only = v;
    else if (a == "--trace")
      trace_scope = v;
    else if (a == "--forward-only")
      forward_only = v == "1" || v == "true";
    else if (a == "--seq")
      seq = number();
    else if (a == "--dim")
      dim = number();
    else if (a == "--dim-head")
      dim_head = number();
    else if (a == "--runs")
      runs = static_cast<int>(number());
    else if (a == "--top")
      top = static_cast<int>(number());
    else
      return usage();
  }
  if (device_name != "cpu" && device_name != "cuda") return usage();
  if (device_name == "cuda" && !torch::cuda::is_available()) {
    std::fprintf(stderr, "bench_ops: --device cuda but no CUDA device is available\n");
    return 1;
  }
  if (dim % (2 * dim_head) != 0 || seq < 256 || seq % 128 != 0) {
    std::fprintf(stderr,
                 "bench_ops: --dim must be a multiple of twice --dim-head, --seq a multiple of 128, at least 256\n");
    return 2;
  }
  const torch::Device device(device_name);
  const auto handle = at::addGlobalCallback(
      at::RecordFunctionCallback(on_start, on_end)
          .scopes({at::RecordScope::FUNCTION, at::RecordScope::BACKWARD_FUNCTION, at::RecordScope::USER_SCOPE}));

  torch::manual_seed(0);
  const int64_t heads = dim / dim_head, k = seq / 8;
  auto opts = torch::TensorOptions().device(device);
  std::printf("operators of one training step (forward + backward), %s, float32, dim %lld, %lld heads of %lld\n",
              device_name.c_str(), (long long)dim, (long long)heads, (long long)dim_head);
  std::printf("%-40s %7s %7s %7s %7s %9s %8s\n", "module", "calls", "leaves", "kernels", "nodes", "step ms",
              "us/call");

  struct Row {
    std::string name;
    std::function<void()> step;
  };
  std::vector<Row> rows;

  auto block_opts = ConditionalRoutedTransformerBlockOptions(dim, k, k, k)
                        .light_dim_head(dim_head)
                        .light_heads(heads)
                        .heavy_dim_head(dim_head)
                        .heavy_heads(heads)
                        .light_window_size(128);
  ConditionalRoutedTransformerBlock block(block_opts);
  block->to(device);
  auto x = torch::randn({2, seq, dim}, opts).requires_grad_(true);
  auto all_true = torch::ones({2, seq}, opts.dtype(torch::kBool));
  rows.push_back({"block 2 x " + std::to_string(seq) + ", all-true mask",
                  [&] {
                    unset_grads(*block, {x});
                    finish(block->forward(x, all_true));
                  }});
  rows.push_back({"block-no-mask", [&] {
                    unset_grads(*block, {x});
                    finish(block->forward(x));
                  }});

  ConditionalRoutedAutoregressiveAttention ar(ConditionalRoutedAutoregressiveAttentionOptions(dim, 32, k)
                                                  .light_dim_head(dim_head)
                                                  .light_heads(heads)
                                                  .heavy_dim_head(dim_head)
                                                  .heavy_heads(heads)
                                                  .light_window_size(128)
                                                  .num_routed_kv(2)
                                                  .rotary_emb(true));
  ar->to(device);
  rows.push_back({"autoregressive 2 x " + std::to_string(seq), [&] {
                    unset_grads(*ar, {x});
                    finish(ar->forward(x));
                  }});

  ConditionalRoutedCrossAttention cross(
      ConditionalRoutedCrossAttentionOptions(dim, 64, k).dim_head(dim_head).heads(heads).kv_routing_tokens(2));
  cross->to(device);
  auto q = torch::randn({2, 256, dim}, opts).requires_grad_(true);
  rows.push_back({"cross 2 x 256 over " + std::to_string(seq), [&] {
                    unset_grads(*cross, {q, x});
                    finish(cross->forward(q, x));
                  }});

  ConditionalRoutedFeedForward ff(ConditionalRoutedFeedForwardOptions(dim, k));
  ff->to(device);
  rows.push_back({"feedforward 2 x " + std::to_string(seq), [&] {
                    unset_grads(*ff, {x});
                    finish(ff->forward(x));
                  }});

  static const char* keys[] = {"block", "block-no-mask", "autoregressive", "cross", "feedforward"};
  bool any = only.empty();
  for (size_t i = 0; i < rows.size(); ++i) {
    if (!only.empty() && only != keys[i]) continue;
    any = true;
    const Counts c = count_step(rows[i].step, device);
    const double ms = median_ms(runs, rows[i].step, device);
    std::printf("%-40s %7lld %7lld %7lld %7lld %9.3f %8.1f\n", rows[i].name.c_str(), (long long)c.calls,
                (long long)c.leaves, (long long)c.kernels, (long long)c.backward_nodes, ms,
                1000.0 * ms / std::max<int64_t>(c.calls, 1));
    std::vector<std::pair<int64_t, std::string>> names;
    for (const auto& [name, n] : c.by_name) names.push_back({n, name});
    std::sort(names.rbegin(), names.rend());
    std::string line = "    most called:";
    for (int j = 0; j < top && j < static_cast<int>(names.size()); ++j)
      line += " " + names[j].second + " " + std::to_string(names[j].first) + (j + 1 < top ? "," : "");
    std::printf("%s\n", line.c_str());
    line = "    calls/kernels by scope:";
    for (const auto& [scope, n] : c.by_scope)
      line += " " + scope + " " + std::to_string(n.first) + "/" + std::to_string(n.second) + ",";
    line.pop_back();
    std::printf("%s\n", line.c_str());
    line = "    host ms by scope (inclusive; the counted step):";
    for (const auto& [scope, ms] : c.scope_ms) {
      char buf[96];
      std::snprintf(buf, sizeof buf, " %s %.2f,", scope.c_str(), ms);
      line += buf;
    }
    line.pop_back();
    std::printf("%s\n", line.c_str());
  }
  at::removeCallback(handle);
  if (!any) return usage();
  return 0;
}
