// A module's whole state (parameters and buffers, by the reference's
// state_dict names) to and from safetensors, and modules built by name from a
// JSON config written with the reference's keyword names.
#pragma once

#include <torch/nn/module.h>
#include <torch/types.h>

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace colt5 {
namespace nn {

// Every parameter and buffer of module (recursively), dotted names, in registration order.
std::vector<std::pair<std::string, torch::Tensor>> state_dict(const torch::nn::Module& module);

// Copies tensors into the module's parameters and buffers of the same names,
// converting to each one's dtype and device. Throws c10::Error naming the keys
// when any of the module's entries is missing, when (with strict) a tensor
// matches no entry, or when a shape differs. Nothing is modified on error.
void load_state_dict(torch::nn::Module& module, const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                     bool strict = true);

// Writes state_dict(module) as a safetensors file (atomically).
void save_state(const torch::nn::Module& module, const std::string& path,
                const std::map<std::string, std::string>& metadata = {});

// Reads a safetensors file written by save_state or by the reference
// (safetensors.torch.save_file(model.state_dict(), ...)) into module.
void load_state(torch::nn::Module& module, const std::string& path, bool strict = true);

// What calling a module built by build_module returns. For the modules:
// outputs["out"]. For CoordinateDescentRouter: outputs["out"] = routed_tokens *
// scores[..., None], outputs["routed_tokens"], and aux "scores", "indices"
// (when routed) and "routed_mask" (when a mask was given).
struct ModuleOutputs {
  std::map<std::string, torch::Tensor> outputs;
  std::map<std::string, torch::Tensor> aux;
};

// A module of any supported kind with a call taking the reference's argument names.
class BuiltModule {
 public:
  struct Impl;
  explicit BuiltModule(std::shared_ptr<const Impl> impl);

  // The reference class name, e.g. "ConditionalRoutedAttention".
  const std::string& kind() const;
  std::shared_ptr<torch::nn::Module> module() const;

  // args: tensors passed positionally in the reference's argument order (for
  // example x, mask); tensor_kwargs: tensors by keyword (mask, context_mask,
  // routing_tokens, ...); kwargs_json: a JSON object of the other keywords
  // (token counts, random_route, keep_one_route_dim). Unknown or repeated
  // arguments are errors naming them.
  ModuleOutputs call(const std::vector<torch::Tensor>& args,
                     const std::map<std::string, torch::Tensor>& tensor_kwargs = {},
                     const std::string& kwargs_json = "{}") const;

 private:
  std::shared_ptr<const Impl> impl_;
};

// The kinds build_module knows.
std::vector<std::string> module_kinds();

// Builds kind (a reference class name: CoordinateDescentRouter,
// ConditionalRoutedFeedForward, ConditionalRoutedAttention,
// ConditionalRoutedTransformerBlock, ConditionalRoutedAutoregressiveAttention,
// ConditionalRoutedCrossAttention, ConditionalRoutedImageAttention,
// ConditionalRoutedViT) from a JSON object of the reference's
// constructor keywords (router_kwargs as a nested object). For the router,
// `num_tokens` and `keep_one_route_dim` may also be given as call defaults.
// Unknown keywords, missing required ones and wrong types are errors naming them.
BuiltModule build_module(const std::string& kind, const std::string& config_json);

}  // namespace nn
}  // namespace colt5
