// One definition per option. The options that several modules share are
// written once, as lists of X(type, name, default, "what it does") entries;
// each module's options struct expands the lists it takes. The same lists
// give the JSON readers (build_module), pretty_print and the copying of
// options from a composite module (the transformer block) to its parts, so an
// option's name, type and default live in one place.
#pragma once

#include <torch/arg.h>

#include <c10/util/Optional.h>

#include <cstdint>
#include <ostream>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

// An option with its default: TORCH_ARG(type, name) = default.
#define COLT5_DECLARE_OPTION(type, name, default_value, doc) TORCH_ARG(type, name) = default_value;
// Calls v(name, field) for one option (inside the struct, where the field is visible).
#define COLT5_VISIT_OPTION(type, name, default_value, doc) v(#name, this->name##_);
// to.name(from.name()) for one option; `to` and `from` are in scope where expanded.
#define COLT5_COPY_OPTION(type, name, default_value, doc) to.name(from.name());

// The visit() members of an options struct over the given lists of options:
// v(const char* name, field&) for each, in order.
#define COLT5_OPTIONS_VISITOR(LISTS) \
 public:                             \
  template <typename V>              \
  void visit(V&& v) {                \
    LISTS(COLT5_VISIT_OPTION)        \
  }                                  \
  template <typename V>              \
  void visit(V&& v) const {          \
    LISTS(COLT5_VISIT_OPTION)        \
  }

namespace colt5 {
namespace nn {

// The router's coordinate-descent schedule and routing choices: the defaults
// every routed module starts from (the reference's CoordinateDescentRouter).
namespace router_defaults {
constexpr int64_t n_iters = 20;
constexpr double fetch_k_ratio = 9.0 / 8.0;
constexpr double eps = 0.03;
constexpr double eps_init = 4.0;
constexpr double eps_decay = 0.7;
}  // namespace router_defaults

// clang-format off
// The reference's `router_kwargs`: what a routed module passes to each of its routers.
#define COLT5_ROUTER_KWARGS_OPTIONS(X)                                                                            \
  X(int64_t, n_iters, ::colt5::nn::router_defaults::n_iters, "coordinate-descent iterations (>= 1)")              \
  X(double, fetch_k_ratio, ::colt5::nn::router_defaults::fetch_k_ratio,                                          \
    "coordinate descent runs with k = min(num_tokens * fetch_k_ratio, n) (>= 1)")                                 \
  X(double, eps, ::colt5::nn::router_defaults::eps, "final entropy regularisation (> 0)")                         \
  X(double, eps_decay, ::colt5::nn::router_defaults::eps_decay, "eps-scaling factor per iteration, in (0, 1]")    \
  X(c10::optional<double>, eps_init, ::colt5::nn::router_defaults::eps_init,                                     \
    "starting eps of eps-scaling; nullopt means eps (no scaling)")                                                \
  X(bool, use_triton, false, "accepted for compatibility; the fused kernels are always used")                    \
  X(bool, cosine_sim_routing, false, "score tokens by cosine similarity to the routing token")                   \
  X(double, cosine_sim_scale, 8.0, "scale of the cosine-similarity scores")                                      \
  X(c10::optional<int64_t>, route_block_size, c10::nullopt,                                                       \
    "route ceil(num_tokens / blocks) tokens from each whole block of this size (a shorter tail is never routed)") \
  X(int64_t, checkpoint_segments, 0,                                                                              \
    "coordinate-descent backward memory/recompute trade-off (0 keeps every iterate; see CoorDescentOptions)")

// How a routed module uses its routers.
#define COLT5_ROUTING_MODULE_OPTIONS(X)                                                                \
  X(bool, router_straight_through, true, "selected scores are 1 in value but keep the soft gradient") \
  X(::colt5::nn::RouterKwargs, router_kwargs, {}, "options passed to every router of the module")     \
  X(bool, use_triton, false, "accepted for compatibility; the fused kernels are always used")

// The widths of a routed feedforward.
#define COLT5_ROUTED_FF_OPTIONS(X)                                                   \
  X(double, light_ff_mult, 0.5, "hidden width of the light feedforward, times dim") \
  X(double, heavy_ff_mult, 4.0, "hidden width of the heavy feedforward, times dim")

// The heavy attention over routed queries and key/values.
#define COLT5_HEAVY_ATTN_OPTIONS(X)                                                                    \
  X(bool, multiply_keys_by_score, false, "scale the routed keys by their routing scores")             \
  X(bool, use_null_q_tokens, true, "a learned output for the queries the router does not pick")       \
  X(bool, use_flash_attn, false, "accepted for compatibility; fused attention is used where it applies")

// A routed self-attention: a light local attention over every token and the heavy attention.
#define COLT5_ROUTED_ATTN_OPTIONS(X)                                                                    \
  X(int64_t, num_routed_kv, 1, "sets of routed key/values; heavy_heads are split evenly across them") \
  X(int64_t, light_dim_head, 64, "width of a light attention head")                                   \
  X(int64_t, light_heads, 8, "light attention heads")                                                 \
  X(int64_t, light_window_size, 128, "window of the light local attention (its meaning per module)")  \
  X(int64_t, heavy_dim_head, 64, "width of a heavy attention head")                                   \
  X(int64_t, heavy_heads, 8, "heavy attention heads")                                                 \
  X(bool, multiply_queries_by_score, false, "scale the routed queries by their routing scores")       \
  COLT5_HEAVY_ATTN_OPTIONS(X)
// clang-format on

struct RouterKwargs {
  COLT5_ROUTER_KWARGS_OPTIONS(COLT5_DECLARE_OPTION)
  COLT5_OPTIONS_VISITOR(COLT5_ROUTER_KWARGS_OPTIONS)
};

namespace detail {

inline void print_value(std::ostream& os, bool v) { os << (v ? "true" : "false"); }
template <typename T>
void print_value(std::ostream& os, const c10::optional<T>& v) {
  if (v) {
    print_value(os, *v);
  } else {
    os << "None";
  }
}
inline void print_value(std::ostream& os, const RouterKwargs& v);
template <typename T>
auto print_value(std::ostream& os, const T& v) -> decltype(os << v, void()) {
  os << v;
}

// name=value for every option of `options` whose value differs from `defaults`.
template <typename Options>
std::vector<std::string> changed_options(const Options& options, const Options& defaults) {
  std::vector<std::pair<std::string, std::string>> all, base;
  auto collect = [](std::vector<std::pair<std::string, std::string>>& out) {
    return [&out](const char* name, const auto& value) {
      std::ostringstream os;
      print_value(os, value);
      out.emplace_back(name, os.str());
    };
  };
  options.visit(collect(all));
  defaults.visit(collect(base));
  std::vector<std::string> changed;
  for (size_t i = 0; i < all.size(); ++i)
    if (all[i].second != base[i].second) changed.push_back(all[i].first + "=" + all[i].second);
  return changed;
}

inline void print_value(std::ostream& os, const RouterKwargs& v) {
  os << "{";
  const auto changed = changed_options(v, RouterKwargs());
  for (size_t i = 0; i < changed.size(); ++i) os << (i ? ", " : "") << changed[i];
  os << "}";
}

}  // namespace detail

// Writes `Name(required..., changed options...)`: the options that differ from
// the defaults follow the required arguments, as in LibTorch's own modules.
template <typename Options>
void print_module(std::ostream& stream, const char* name, const std::string& required, const Options& options,
                  const Options& defaults) {
  stream << "colt5::nn::" << name << "(" << required;
  for (const auto& s : detail::changed_options(options, defaults)) stream << ", " << s;
  stream << ")";
}

}  // namespace nn
}  // namespace colt5
