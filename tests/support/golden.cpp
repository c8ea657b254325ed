#include "support/golden.h"

#include <torch/torch.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <vector>

#include "colt5/coor_descent.h"

namespace colt5 {
namespace golden {

namespace fs = std::filesystem;

std::map<std::string, at::Tensor> Case::with_prefix(const std::string& prefix) const {
  std::map<std::string, at::Tensor> out;
  for (const auto& [name, t] : data.tensors)
    if (name.compare(0, prefix.size(), prefix) == 0) out[name.substr(prefix.size())] = t;
  return out;
}

Case load_case(const std::string& path) {
  Case c;
  c.data = load_safetensors(path);
  auto meta = [&](const char* key) -> std::string {
    auto it = c.data.metadata.find(key);
    return it == c.data.metadata.end() ? std::string() : it->second;
  };
  c.name = meta("case");
  if (c.name.empty()) c.name = fs::path(path).stem().string();
  c.kind = meta("kind");
  TORCH_CHECK(!c.kind.empty(), path, ": golden case without a \"kind\" in its metadata");
  try {
    const std::string config = meta("config"), call = meta("call");
    c.config = config.empty() ? nlohmann::json::object() : nlohmann::json::parse(config);
    c.call = call.empty() ? nlohmann::json::object() : nlohmann::json::parse(call);
  } catch (const nlohmann::json::exception& e) {
    TORCH_CHECK(false, path, ": metadata config/call is not valid JSON: ", e.what());
  }
  return c;
}

namespace {

// coor_descent(s, n_iters, k, eps, eps_init, eps_decay, mask)
void run_coor_descent(const Case& c, Run& run) {
  const auto& cfg = c.config;
  CoorDescentOptions o;
  o.n_iters(cfg.at("n_iters").get<int64_t>()).eps(cfg.value("eps", 0.1));
  if (cfg.contains("eps_init") && !cfg["eps_init"].is_null()) o.eps_init(cfg["eps_init"].get<double>());
  if (cfg.contains("eps_decay")) o.eps_decay(cfg["eps_decay"].get<double>());
  at::Tensor s = c.data.at("input.s").clone().requires_grad_(true);
  at::Tensor mask = c.data.contains("input.mask") ? c.data.at("input.mask") : at::Tensor();
  at::Tensor y;
  if (cfg.at("k").is_number()) {
    y = coor_descent(s, cfg["k"].get<double>(), o, mask);
  } else {
    at::Tensor k = c.data.contains("input.k") ? c.data.at("input.k")
                                              : torch::tensor(cfg["k"].get<std::vector<double>>(), torch::kDouble);
    y = coor_descent(s, k, o, mask);
  }
  run.outputs["scores"] = y.detach();
  y.backward(c.data.at("grad_output.scores"));
  run.input_grads["s"] = s.grad();
}

// Max abs difference over max abs reference (abs difference for an all-zero
// reference); exact equality for integer and bool tensors.
double compare(const at::Tensor& got, const at::Tensor& want, const std::string& name, std::string& why) {
  if (!got.defined()) {
    why = name + ": not produced";
    return INFINITY;
  }
  if (got.sizes() != want.sizes()) {
    std::ostringstream os;
    os << name << ": shape " << got.sizes() << ", expected " << want.sizes();
    why = os.str();
    return INFINITY;
  }
  if (!at::isFloatingType(want.scalar_type())) {
    const bool same = got.to(want.scalar_type()).cpu().equal(want);
    if (!same) why = name + ": values differ (exact comparison)";
    return same ? 0.0 : INFINITY;
  }
  at::Tensor g = got.detach().to(at::kDouble).cpu(), w = want.to(at::kDouble);
  if (w.numel() == 0) return 0.0;
  if (!at::isfinite(g).all().item<bool>()) {
    why = name + ": non-finite values";
    return INFINITY;
  }
  const double diff = (g - w).abs().max().item<double>();
  const double scale = w.abs().max().item<double>();
  return scale > 0 ? diff / scale : diff;
}

}  // namespace

Result check_case(const Case& c, double tolerance) {
  Result r;
  Run run;
  try {
    if (c.kind == "coor_descent") {
      run_coor_descent(c, run);
    } else if (!run_module_case(c, run)) {
      r.status = Result::Skip;
      r.detail = "kind " + c.kind + " is not implemented";
      return r;
    }
  } catch (const std::exception& e) {
    r.status = Result::Fail;
    r.worst = INFINITY;
    r.detail = e.what();
    const auto nl = r.detail.find('\n');
    if (nl != std::string::npos) r.detail.resize(nl);
    return r;
  }
  struct Group {
    const char* prefix;
    const std::map<std::string, at::Tensor>* produced;
  };
  const Group groups[] = {{"output.", &run.outputs},
                          {"aux.", &run.aux},
                          {"grad.input.", &run.input_grads},
                          {"grad.param.", &run.param_grads}};
  r.status = Result::Pass;
  int compared = 0;
  for (const auto& g : groups) {
    for (const auto& [name, want] : c.with_prefix(g.prefix)) {
      auto it = g.produced->find(name);
      std::string why;
      const double err = compare(it == g.produced->end() ? at::Tensor() : it->second, want, g.prefix + name, why);
      ++compared;
      if (err > r.worst || std::isnan(err)) r.worst = err;
      if (!(err <= tolerance)) {
        r.status = Result::Fail;
        if (r.detail.empty()) {
          std::ostringstream os;
          os << (why.empty() ? g.prefix + name : why) << " (relative error " << err << ")";
          r.detail = os.str();
        }
      }
    }
  }
  if (compared == 0) {
    r.status = Result::Fail;
    r.detail = "the case holds no outputs or gradients to compare";
  }
  return r;
}

int main_for_dir(const std::string& dir, double tolerance) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    std::fprintf(stderr, "golden: %s is not a directory\n", dir.c_str());
    return 2;
  }
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(dir, ec))
    if (e.path().extension() == ".safetensors") files.push_back(e.path());
  std::sort(files.begin(), files.end());
  if (files.empty()) {
    std::fprintf(stderr, "golden: no *.safetensors cases in %s\n", dir.c_str());
    return 2;
  }
  int passed = 0, failed = 0, skipped = 0;
  for (const auto& f : files) {
    Result r;
    std::string name = f.stem().string();
    try {
      Case c = load_case(f.string());
      name = c.name;
      r = check_case(c, tolerance);
    } catch (const std::exception& e) {
      r.status = Result::Fail;
      r.worst = INFINITY;
      r.detail = e.what();
      const auto nl = r.detail.find('\n');
      if (nl != std::string::npos) r.detail.resize(nl);
    }
    const char* tag = r.status == Result::Pass ? "PASS" : r.status == Result::Fail ? "FAIL" : "SKIP";
    if (r.status == Result::Skip)
      std::printf("%s  %-32s  -         %s\n", tag, name.c_str(), r.detail.c_str());
    else
      std::printf("%s  %-32s  %.3e%s%s\n", tag, name.c_str(), r.worst, r.detail.empty() ? "" : "  ", r.detail.c_str());
    (r.status == Result::Pass ? passed : r.status == Result::Fail ? failed : skipped)++;
  }
  std::printf("%d passed, %d failed, %d skipped\n", passed, failed, skipped);
  std::fflush(stdout);
  return failed == 0 ? 0 : 1;
}

}  // namespace golden
}  // namespace colt5
