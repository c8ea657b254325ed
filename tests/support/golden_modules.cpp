// Module parity cases: build the module from the case's config, load its
// parameters, call it as the case says, back-propagate grad_output.*.
#include <torch/torch.h>

#include <algorithm>

#include "colt5/nn/state.h"
#include "support/golden.h"

namespace colt5 {
namespace golden {

namespace {

// Saturated coordinate-descent scores are exactly 1 for several tokens, so the
// order of the selected tokens within a row is the reference backend's
// arbitrary tie order (our tie-break is by raw routing score). When a row
// selects the same set of tokens as the case, put our results in the case's
// order; a different set is left alone and fails the comparison.
void match_tie_order(const Case& c, nn::ModuleOutputs& result) {
  auto it = result.aux.find("indices");
  if (it == result.aux.end()) return;
  const torch::Tensor ours = it->second;
  const torch::Tensor want = c.data.at("aux.indices");
  if (ours.sizes() != want.sizes()) return;
  torch::Tensor eq = want.unsqueeze(-1) == ours.unsqueeze(-2);  // [..., k (want), k (ours)]
  torch::Tensor same_set = (eq.sum(-1) == 1).all(-1, /*keepdim=*/true);
  torch::Tensor perm = torch::where(same_set, eq.to(torch::kLong).argmax(-1),
                                    torch::arange(ours.size(-1), ours.options()).expand_as(ours));
  for (auto* group : {&result.aux, &result.outputs}) {
    for (auto& [name, t] : *group) {
      if (name == "scores" || name == "indices" || name == "routed_mask") {
        t = t.gather(-1, perm);
      } else {
        std::vector<int64_t> shape = ours.sizes().vec();
        shape.push_back(t.size(-1));
        t = t.gather(-2, perm.unsqueeze(-1).expand(shape));
      }
    }
  }
}

}  // namespace

bool run_module_case(const Case& c, Run& run) {
  const auto kinds = nn::module_kinds();
  if (std::find(kinds.begin(), kinds.end(), c.kind) == kinds.end()) return false;

  nn::BuiltModule any = nn::build_module(c.kind, c.config.dump());
  auto module = any.module();
  module->to(torch::kFloat64);

  // The router case stores its parameter as router.<name>.
  const std::string param_prefix = c.kind == "CoordinateDescentRouter" ? "router." : "";
  std::vector<std::pair<std::string, torch::Tensor>> params;
  for (const auto& [name, t] : c.with_prefix("param.")) {
    TORCH_CHECK(name.compare(0, param_prefix.size(), param_prefix) == 0, c.name, ": parameter '", name,
                "' does not start with '", param_prefix, "'");
    params.emplace_back(name.substr(param_prefix.size()), t);
  }
  nn::load_state_dict(*module, params);

  std::map<std::string, torch::Tensor> inputs;
  for (const auto& [name, t] : c.with_prefix("input.")) {
    torch::Tensor x = t.clone();
    if (x.is_floating_point()) x.requires_grad_(true);
    inputs[name] = x;
  }
  auto input = [&](const std::string& name) {
    auto it = inputs.find(name);
    TORCH_CHECK(it != inputs.end(), c.name, ": the call names input '", name, "' which the case does not hold");
    return it->second;
  };

  std::vector<torch::Tensor> args;
  std::map<std::string, torch::Tensor> tensor_kwargs;
  nlohmann::json kwargs = nlohmann::json::object();
  if (c.call.contains("args"))
    for (const auto& a : c.call.at("args")) args.push_back(input(a.get<std::string>()));
  if (c.call.contains("tensor_kwargs"))
    for (auto it = c.call.at("tensor_kwargs").begin(); it != c.call.at("tensor_kwargs").end(); ++it)
      tensor_kwargs[it.key()] = input(it.value().get<std::string>());
  if (c.call.contains("kwargs")) kwargs = c.call.at("kwargs");

  nn::ModuleOutputs result = any.call(args, tensor_kwargs, kwargs.dump());
  if (c.kind == "CoordinateDescentRouter" && c.data.contains("aux.indices")) match_tie_order(c, result);

  torch::Tensor loss;
  for (const auto& [name, g] : c.with_prefix("grad_output.")) {
    auto it = result.outputs.find(name);
    TORCH_CHECK(it != result.outputs.end(), c.name, ": the module gives no output '", name, "'");
    torch::Tensor term = (it->second * g).sum();
    loss = loss.defined() ? loss + term : term;
  }
  for (const auto& [name, t] : result.outputs) run.outputs[name] = t.detach();
  for (const auto& [name, t] : result.aux) run.aux[name] = t.detach();
  if (!loss.defined()) return true;
  loss.backward();

  for (const auto& [name, x] : inputs) {
    if (!x.is_floating_point()) continue;
    run.input_grads[name] = x.grad().defined() ? x.grad() : torch::zeros_like(x);
  }
  for (const auto& p : module->named_parameters(/*recurse=*/true)) {
    const torch::Tensor& g = p.value().grad();
    run.param_grads[param_prefix + p.key()] = g.defined() ? g : torch::zeros_like(p.value());
  }
  return true;
}

}  // namespace golden
}  // namespace colt5
