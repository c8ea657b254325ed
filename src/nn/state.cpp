#include "colt5/nn/state.h"

#include <torch/torch.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <functional>
#include <set>
#include <sstream>
#include <type_traits>

#include "colt5/nn/conditional.h"
#include "colt5/nn/image.h"
#include "colt5/nn/router.h"
#include "colt5/safetensors.h"

namespace colt5 {
namespace nn {

using json = nlohmann::json;

// ================================================================= state dict

std::vector<std::pair<std::string, torch::Tensor>> state_dict(const torch::nn::Module& module) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& p : module.named_parameters(/*recurse=*/true)) out.emplace_back(p.key(), p.value());
  for (const auto& b : module.named_buffers(/*recurse=*/true)) out.emplace_back(b.key(), b.value());
  return out;
}

namespace {

std::string join(const std::vector<std::string>& names) {
  std::string s;
  for (size_t i = 0; i < names.size(); ++i) s += (i ? ", " : "") + names[i];
  return s;
}

}  // namespace

void load_state_dict(torch::nn::Module& module, const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                     bool strict) {
  std::map<std::string, torch::Tensor> given;
  for (const auto& [name, t] : tensors) {
    TORCH_CHECK(t.defined(), "load_state_dict: tensor '", name, "' is undefined");
    TORCH_CHECK(given.emplace(name, t).second, "load_state_dict: tensor '", name, "' is given twice");
  }
  auto own = state_dict(module);
  std::vector<std::string> missing, mismatched;
  std::set<std::string> own_names;
  for (const auto& [name, t] : own) {
    own_names.insert(name);
    auto it = given.find(name);
    if (it == given.end()) {
      missing.push_back(name);
    } else if (it->second.sizes() != t.sizes()) {
      std::ostringstream os;
      os << name << " (module " << t.sizes() << ", given " << it->second.sizes() << ")";
      mismatched.push_back(os.str());
    }
  }
  std::vector<std::string> unexpected;
  for (const auto& [name, t] : given)
    if (!own_names.count(name)) unexpected.push_back(name);
  TORCH_CHECK(missing.empty(), "load_state_dict: missing keys: ", join(missing));
  TORCH_CHECK(!strict || unexpected.empty(), "load_state_dict: unexpected keys: ", join(unexpected));
  TORCH_CHECK(mismatched.empty(), "load_state_dict: shape mismatch: ", join(mismatched));
  torch::NoGradGuard no_grad;
  for (auto& [name, t] : own) t.copy_(given.at(name));
}

void save_state(const torch::nn::Module& module, const std::string& path,
                const std::map<std::string, std::string>& metadata) {
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (const auto& [name, t] : state_dict(module)) tensors.emplace_back(name, t.detach());
  save_safetensors(path, tensors, metadata);
}

void load_state(torch::nn::Module& module, const std::string& path, bool strict) {
  SafetensorsData data = load_safetensors(path);
  try {
    load_state_dict(module, data.tensors, strict);
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, path, ": ", e.what_without_backtrace());
  }
}

// ================================================================ JSON config

namespace {

// Reads keywords from a JSON object and remembers which were used, so unused
// (unknown) ones can be reported.
class Keywords {
 public:
  Keywords(std::string what, const json& obj) : what_(std::move(what)), obj_(obj) {
    TORCH_CHECK(obj_.is_object(), what_, ": expected a JSON object, got ", obj_.dump());
  }

  bool has(const std::string& key) {
    used_.insert(key);
    return obj_.contains(key);
  }
  bool is_null(const std::string& key) { return has(key) && obj_.at(key).is_null(); }

  int64_t integer(const std::string& key) {
    TORCH_CHECK(has(key), what_, ": required keyword '", key, "' is missing");
    return as_integer(key);
  }
  template <typename Set>
  void integer(const std::string& key, Set&& set) {
    if (has(key)) set(as_integer(key));
  }
  template <typename Set>
  void optional_integer(const std::string& key, Set&& set) {
    if (!has(key)) return;
    if (obj_.at(key).is_null()) {
      set(c10::optional<int64_t>());
    } else {
      set(c10::optional<int64_t>(as_integer(key)));
    }
  }
  template <typename Set>
  void number(const std::string& key, Set&& set) {
    if (has(key)) set(as_number(key));
  }
  template <typename Set>
  void optional_number(const std::string& key, Set&& set) {
    if (!has(key)) return;
    if (obj_.at(key).is_null()) {
      set(c10::optional<double>());
    } else {
      set(c10::optional<double>(as_number(key)));
    }
  }
  template <typename Set>
  void boolean(const std::string& key, Set&& set) {
    if (!has(key)) return;
    const json& v = obj_.at(key);
    TORCH_CHECK(v.is_boolean(), what_, ": keyword '", key, "' must be true or false, got ", v.dump());
    set(v.get<bool>());
  }
  // An integer or a pair of integers (image and patch sizes).
  torch::ExpandingArray<2> pair(const std::string& key) {
    TORCH_CHECK(has(key), what_, ": required keyword '", key, "' is missing");
    const json& v = obj_.at(key);
    if (!v.is_array()) return torch::ExpandingArray<2>(as_integer(key));
    TORCH_CHECK(v.size() == 2 && v[0].is_number_integer() && v[1].is_number_integer(), what_, ": keyword '", key,
                "' must be an integer or a pair of integers, got ", v.dump());
    return torch::ExpandingArray<2>({v[0].get<int64_t>(), v[1].get<int64_t>()});
  }
  const json& object(const std::string& key) {
    used_.insert(key);
    return obj_.at(key);
  }

  // Throws naming every keyword that was never asked for.
  void finish() const {
    std::vector<std::string> unknown;
    for (auto it = obj_.begin(); it != obj_.end(); ++it)
      if (!used_.count(it.key())) unknown.push_back("'" + it.key() + "'");
    TORCH_CHECK(unknown.empty(), what_, ": unknown keyword", unknown.size() > 1 ? "s " : " ", join(unknown));
  }

  const std::string& what() const { return what_; }

 private:
  int64_t as_integer(const std::string& key) const {
    const json& v = obj_.at(key);
    if (v.is_number_integer()) return v.get<int64_t>();
    // Python configs may hold integral floats (e.g. 4.0).
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

void read_option(Keywords& k, const char* name, int64_t& field) {
  k.integer(name, [&](int64_t v) { field = v; });
}
void read_option(Keywords& k, const char* name, double& field) {
  k.number(name, [&](double v) { field = v; });
}
void read_option(Keywords& k, const char* name, bool& field) {
  k.boolean(name, [&](bool v) { field = v; });
}
void read_option(Keywords& k, const char* name, c10::optional<int64_t>& field) {
  k.optional_integer(name, [&](c10::optional<int64_t> v) { field = v; });
}
void read_option(Keywords& k, const char* name, c10::optional<double>& field) {
  k.optional_number(name, [&](c10::optional<double> v) { field = v; });
}
void read_option(Keywords& k, const char* name, RouterKwargs& field);

// Reads every option of `options` that the config names (by the option's own
// name); checkpoint_segments may be null and has the reference's older name
// triton_checkpoint_segments too.
template <typename Options>
void read_options(Keywords& k, Options& options) {
  options.visit([&](const char* name, auto& field) {
    using Field = std::decay_t<decltype(field)>;
    if constexpr (std::is_same_v<Field, int64_t>) {
      if (std::string(name) == "checkpoint_segments") {
        auto segments = [&](c10::optional<int64_t> v) { field = v.value_or(0); };
        k.optional_integer("checkpoint_segments", segments);
        k.optional_integer("triton_checkpoint_segments", segments);
        return;
      }
    }
    read_option(k, name, field);
  });
}

void read_option(Keywords& parent, const char* name, RouterKwargs& field) {
  if (!parent.has(name) || parent.is_null(name)) return;
  Keywords k(parent.what() + " " + name, parent.object(name));
  read_options(k, field);
  k.finish();
}

// The call arguments of one kind: tensor names in positional order, the
// tensors that may only be given by keyword, and the other keywords.
struct Signature {
  std::vector<std::string> positional;
  std::set<std::string> tensor_keywords;
  std::set<std::string> keywords;
};

struct CallArgs {
  std::map<std::string, torch::Tensor> tensors;
  json kwargs;

  torch::Tensor tensor(const std::string& name) const {
    auto it = tensors.find(name);
    return it == tensors.end() ? torch::Tensor() : it->second;
  }
  c10::optional<int64_t> count(const std::string& name) const {
    if (!kwargs.contains(name) || kwargs.at(name).is_null()) return c10::nullopt;
    const json& v = kwargs.at(name);
    TORCH_CHECK(v.is_number_integer(), "keyword '", name, "' must be an integer, got ", v.dump());
    return v.get<int64_t>();
  }
  bool flag(const std::string& name, bool fallback = false) const {
    if (!kwargs.contains(name) || kwargs.at(name).is_null()) return fallback;
    const json& v = kwargs.at(name);
    TORCH_CHECK(v.is_boolean(), "keyword '", name, "' must be true or false, got ", v.dump());
    return v.get<bool>();
  }
};

}  // namespace

struct BuiltModule::Impl {
  std::string kind;
  std::shared_ptr<torch::nn::Module> module;
  Signature signature;
  std::function<ModuleOutputs(const CallArgs&)> call;
};

BuiltModule::BuiltModule(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {
  TORCH_CHECK(impl_ != nullptr, "BuiltModule: empty");
}

const std::string& BuiltModule::kind() const { return impl_->kind; }
std::shared_ptr<torch::nn::Module> BuiltModule::module() const { return impl_->module; }

ModuleOutputs BuiltModule::call(const std::vector<torch::Tensor>& args,
                                const std::map<std::string, torch::Tensor>& tensor_kwargs,
                                const std::string& kwargs_json) const {
  const Signature& sig = impl_->signature;
  const std::string& kind = impl_->kind;
  TORCH_CHECK(args.size() <= sig.positional.size(), kind, ": takes at most ", sig.positional.size(),
              " positional tensors, got ", args.size());
  CallArgs ca;
  for (size_t i = 0; i < args.size(); ++i) ca.tensors[sig.positional[i]] = args[i];
  for (const auto& [name, t] : tensor_kwargs) {
    const bool known = sig.tensor_keywords.count(name) ||
                       std::find(sig.positional.begin(), sig.positional.end(), name) != sig.positional.end();
    TORCH_CHECK(known, kind, ": unknown tensor argument '", name, "'");
    TORCH_CHECK(ca.tensors.emplace(name, t).second, kind, ": argument '", name, "' given twice");
  }
  json kw;
  try {
    kw = json::parse(kwargs_json.empty() ? std::string("{}") : kwargs_json);
  } catch (const json::exception& e) {
    TORCH_CHECK(false, kind, ": keyword arguments are not valid JSON: ", e.what());
  }
  TORCH_CHECK(kw.is_object(), kind, ": keyword arguments must be a JSON object, got ", kw.dump());
  for (auto it = kw.begin(); it != kw.end(); ++it) {
    TORCH_CHECK(sig.keywords.count(it.key()), kind, ": unknown keyword argument '", it.key(), "'");
  }
  ca.kwargs = std::move(kw);
  TORCH_CHECK(!sig.positional.empty() && ca.tensor(sig.positional[0]).defined(), kind, ": argument '",
              sig.positional.empty() ? std::string("x") : sig.positional[0], "' is required");
  return impl_->call(ca);
}

std::vector<std::string> module_kinds() {
  return {"CoordinateDescentRouter",
          "ConditionalRoutedFeedForward",
          "ConditionalRoutedAttention",
          "ConditionalRoutedTransformerBlock",
          "ConditionalRoutedAutoregressiveAttention",
          "ConditionalRoutedCrossAttention",
          "ConditionalRoutedImageAttention",
          "ConditionalRoutedViT"};
}

namespace {

ModuleOutputs single(torch::Tensor out) {
  ModuleOutputs o;
  o.outputs["out"] = std::move(out);
  return o;
}

std::shared_ptr<BuiltModule::Impl> build_router(Keywords& k) {
  CoordinateDescentRouterOptions o(k.integer("dim"));
  read_options(k, o);
  // Call defaults.
  c10::optional<int64_t> num_tokens;
  bool keep_one_route_dim = false;
  k.integer("num_tokens", [&](int64_t v) { num_tokens = v; });
  k.boolean("keep_one_route_dim", [&](bool v) { keep_one_route_dim = v; });

  CoordinateDescentRouter router(o);
  auto impl = std::make_shared<BuiltModule::Impl>();
  impl->module = router.ptr();
  impl->signature = {{"x"}, {"mask", "routing_tokens"}, {"num_tokens", "random_route", "keep_one_route_dim"}};
  impl->call = [router, num_tokens, keep_one_route_dim](const CallArgs& a) mutable {
    c10::optional<int64_t> n = a.count("num_tokens");
    if (!n) n = num_tokens;
    TORCH_CHECK(n.has_value(), "CoordinateDescentRouter: num_tokens is required (in the call or the config)");
    RouterOutput r = router->forward(a.tensor("x"), *n, a.tensor("mask"), a.flag("random_route"),
                                     a.tensor("routing_tokens"), a.flag("keep_one_route_dim", keep_one_route_dim));
    ModuleOutputs o;
    o.outputs["out"] = r.routed_tokens * r.scores.unsqueeze(-1);
    o.outputs["routed_tokens"] = r.routed_tokens;
    o.aux["scores"] = r.scores;
    if (r.indices.defined()) o.aux["indices"] = r.indices;
    if (r.routed_mask.defined()) o.aux["routed_mask"] = r.routed_mask;
    return o;
  };
  return impl;
}

// A built module of holder type Holder: options read from the config (the
// required ones first, by the caller), the call's signature, and the call.
template <typename Holder, typename Options, typename Call>
std::shared_ptr<BuiltModule::Impl> built(Keywords& k, Options options, Signature signature, Call call) {
  read_options(k, options);
  Holder m(options);
  auto impl = std::make_shared<BuiltModule::Impl>();
  impl->module = m.ptr();
  impl->signature = std::move(signature);
  impl->call = [m, call](const CallArgs& a) mutable { return single(call(*m, a)); };
  return impl;
}

std::shared_ptr<BuiltModule::Impl> build_ff(Keywords& k) {
  return built<ConditionalRoutedFeedForward>(
      k, ConditionalRoutedFeedForwardOptions(k.integer("dim"), k.integer("num_heavy_tokens")),
      {{"x", "mask"}, {}, {"num_heavy_tokens"}}, [](ConditionalRoutedFeedForwardImpl& m, const CallArgs& a) {
        return m.forward(a.tensor("x"), a.tensor("mask"), a.count("num_heavy_tokens"));
      });
}

std::shared_ptr<BuiltModule::Impl> build_attn(Keywords& k) {
  return built<ConditionalRoutedAttention>(
      k,
      ConditionalRoutedAttentionOptions(k.integer("dim"), k.integer("num_heavy_tokens_q"),
                                        k.integer("num_heavy_tokens_kv")),
      {{"x"}, {"mask"}, {"num_heavy_tokens_q", "num_heavy_tokens_kv"}},
      [](ConditionalRoutedAttentionImpl& m, const CallArgs& a) {
        return m.forward(a.tensor("x"), a.tensor("mask"), a.count("num_heavy_tokens_q"),
                         a.count("num_heavy_tokens_kv"));
      });
}

std::shared_ptr<BuiltModule::Impl> build_block(Keywords& k) {
  const int64_t dim = k.integer("dim");
  const int64_t q = k.integer("num_heavy_attn_tokens_q");
  const int64_t kv = k.integer("num_heavy_attn_tokens_kv");
  return built<ConditionalRoutedTransformerBlock>(
      k, ConditionalRoutedTransformerBlockOptions(dim, q, kv, k.integer("num_heavy_ff_tokens")),
      {{"x", "mask"}, {}, {"num_heavy_attn_tokens_q", "num_heavy_attn_tokens_kv", "num_heavy_ff_tokens"}},
      [](ConditionalRoutedTransformerBlockImpl& m, const CallArgs& a) {
        return m.forward(a.tensor("x"), a.tensor("mask"), a.count("num_heavy_attn_tokens_q"),
                         a.count("num_heavy_attn_tokens_kv"), a.count("num_heavy_ff_tokens"));
      });
}

std::shared_ptr<BuiltModule::Impl> build_ar(Keywords& k) {
  return built<ConditionalRoutedAutoregressiveAttention>(
      k,
      ConditionalRoutedAutoregressiveAttentionOptions(k.integer("dim"), k.integer("num_heavy_tokens_q"),
                                                      k.integer("num_heavy_tokens_kv")),
      {{"x"}, {}, {"num_heavy_tokens_q", "num_heavy_tokens_kv", "random_route"}},
      [](ConditionalRoutedAutoregressiveAttentionImpl& m, const CallArgs& a) {
        return m.forward(a.tensor("x"), a.count("num_heavy_tokens_q"), a.count("num_heavy_tokens_kv"),
                         a.flag("random_route"));
      });
}

std::shared_ptr<BuiltModule::Impl> build_cross(Keywords& k) {
  return built<ConditionalRoutedCrossAttention>(
      k,
      ConditionalRoutedCrossAttentionOptions(k.integer("dim"), k.integer("num_tokens_q"), k.integer("num_tokens_kv")),
      {{"x", "context"}, {"mask", "context_mask"}, {"num_tokens_q", "num_tokens_kv"}},
      [](ConditionalRoutedCrossAttentionImpl& m, const CallArgs& a) {
        TORCH_CHECK(a.tensor("context").defined(), "ConditionalRoutedCrossAttention: argument 'context' is required");
        return m.forward(a.tensor("x"), a.tensor("context"), a.tensor("mask"), a.tensor("context_mask"),
                         a.count("num_tokens_q"), a.count("num_tokens_kv"));
      });
}

std::shared_ptr<BuiltModule::Impl> build_image(Keywords& k) {
  return built<ConditionalRoutedImageAttention>(
      k,
      ConditionalRoutedImageAttentionOptions(k.integer("dim"), k.integer("num_heavy_tokens_q"),
                                             k.integer("num_heavy_tokens_kv")),
      {{"x"}, {"mask"}, {"num_heavy_tokens_q", "num_heavy_tokens_kv"}},
      [](ConditionalRoutedImageAttentionImpl& m, const CallArgs& a) {
        return m.forward(a.tensor("x"), a.tensor("mask"), a.count("num_heavy_tokens_q"),
                         a.count("num_heavy_tokens_kv"));
      });
}

std::shared_ptr<BuiltModule::Impl> build_vit(Keywords& k) {
  return built<ConditionalRoutedViT>(
      k,
      ConditionalRoutedViTOptions(k.pair("image_size"), k.pair("patch_size"), k.integer("num_classes"),
                                  k.integer("dim"), k.integer("depth")),
      {{"img"}, {}, {}}, [](ConditionalRoutedViTImpl& m, const CallArgs& a) { return m.forward(a.tensor("img")); });
}

}  // namespace

BuiltModule build_module(const std::string& kind, const std::string& config_json) {
  json config;
  try {
    config = json::parse(config_json);
  } catch (const json::exception& e) {
    TORCH_CHECK(false, kind, " config is not valid JSON: ", e.what());
  }
  Keywords k(kind + " config", config);
  std::shared_ptr<BuiltModule::Impl> impl;
  if (kind == "CoordinateDescentRouter") {
    impl = build_router(k);
  } else if (kind == "ConditionalRoutedFeedForward") {
    impl = build_ff(k);
  } else if (kind == "ConditionalRoutedAttention") {
    impl = build_attn(k);
  } else if (kind == "ConditionalRoutedTransformerBlock") {
    impl = build_block(k);
  } else if (kind == "ConditionalRoutedAutoregressiveAttention") {
    impl = build_ar(k);
  } else if (kind == "ConditionalRoutedCrossAttention") {
    impl = build_cross(k);
  } else if (kind == "ConditionalRoutedImageAttention") {
    impl = build_image(k);
  } else if (kind == "ConditionalRoutedViT") {
    impl = build_vit(k);
  } else {
    TORCH_CHECK(false, "build_module: unknown module kind '", kind, "' (known: ", join(module_kinds()), ")");
  }
  k.finish();
  impl->kind = kind;
  return BuiltModule(std::move(impl));
}

}  // namespace nn
}  // namespace colt5
