// Parity cases computed with the reference implementation (tests/golden/README.md).
#pragma once

#include <ATen/core/Tensor.h>
#include <nlohmann/json.hpp>

#include <map>
#include <string>

#include "colt5/safetensors.h"

namespace colt5 {
namespace golden {

struct Case {
  std::string name;
  std::string kind;       // metadata "kind"
  nlohmann::json config;  // metadata "config"
  nlohmann::json call;    // metadata "call" ({} when absent)
  SafetensorsData data;   // every tensor of the file

  // Tensors whose names start with prefix, keyed by the rest of the name.
  std::map<std::string, at::Tensor> with_prefix(const std::string& prefix) const;
};

// What running a case produced; compared against the file's tensors of the
// same names: outputs["out"] vs "output.out", aux["indices"] vs "aux.indices",
// input_grads["x"] vs "grad.input.x", param_grads["to_q.weight"] vs
// "grad.param.to_q.weight".
struct Run {
  std::map<std::string, at::Tensor> outputs;
  std::map<std::string, at::Tensor> aux;
  std::map<std::string, at::Tensor> input_grads;
  std::map<std::string, at::Tensor> param_grads;
};

// Runs a module case (every kind but coor_descent): builds the module from
// config, loads params, calls it, back-propagates grad_output.*. Returns false
// when the kind is not implemented.
bool run_module_case(const Case& c, Run& run);

struct Result {
  enum Status { Pass, Fail, Skip } status = Skip;
  double worst = 0;    // worst relative error over compared tensors
  std::string detail;  // what failed, or why skipped
};

Case load_case(const std::string& path);
Result check_case(const Case& c, double tolerance = 1e-7);

// `colt5-golden DIR`: one line per case, then a summary; returns the exit status.
int main_for_dir(const std::string& dir, double tolerance = 1e-7);

}  // namespace golden
}  // namespace colt5
