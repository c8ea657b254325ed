#include "program/checkpoint.h"

#include <torch/torch.h>
#include <ATen/CPUGeneratorImpl.h>

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <sstream>
#include <type_traits>

#include "colt5/nn/state.h"
#include "colt5/safetensors.h"
#include "program/files.h"

namespace colt5 {
namespace app {

namespace {

const char* const kCheckpointFiles[] = {"model.safetensors", "optimizer.safetensors", "config.json", "state.json"};

nlohmann::json read_json(const std::string& path) {
  const std::string text = read_text(path, kMaxJsonBytes, "checkpoint file");
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw UsageError("'" + path + "' is not valid JSON: " + e.what());
  }
}

// The key of a parameter in Optimizer::state(): the TensorImpl's address, as
// the pointer itself (LibTorch 2) or as its printed form (LibTorch 1.13).
template <typename State>
typename State::key_type state_key(const State&, const torch::Tensor& p) {
  using Key = typename State::key_type;
  if constexpr (std::is_same<Key, std::string>::value) {
    std::ostringstream os;
    os << p.unsafeGetTensorImpl();
    return os.str();
  } else {
    return static_cast<Key>(p.unsafeGetTensorImpl());
  }
}

colt5::SafetensorsData load_tensors(const std::string& path) {
  regular_file_size(path, kMaxTensorFileBytes, "checkpoint file");
  try {
    return colt5::load_safetensors(path);
  } catch (const c10::Error& e) {
    throw UsageError(e.what_without_backtrace());
  }
}

std::string shape(const torch::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

bool all_finite(const torch::Tensor& t) {
  return !t.is_floating_point() || t.numel() == 0 || torch::isfinite(t).all().item<bool>();
}

}  // namespace

std::string checkpoint_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "ckpt-%08lld", static_cast<long long>(step));
  return buf;
}

int64_t checkpoint_step(const std::string& name) {
  if (name.size() <= 5 || name.compare(0, 5, "ckpt-") != 0 || name.size() > 5 + 18) return -1;
  int64_t step = 0;
  for (size_t i = 5; i < name.size(); ++i) {
    if (name[i] < '0' || name[i] > '9') return -1;
    step = step * 10 + (name[i] - '0');
  }
  return step;
}

bool is_complete_checkpoint(const std::string& dir) { return path_exists(dir + "/complete"); }

std::vector<std::string> list_checkpoints(const std::string& run_dir) {
  std::vector<std::pair<int64_t, std::string>> found;
  for (const auto& n : list_dir(run_dir)) {
    const int64_t step = checkpoint_step(n);
    if (step >= 0 && is_complete_checkpoint(run_dir + "/" + n)) found.emplace_back(step, run_dir + "/" + n);
  }
  std::sort(found.begin(), found.end());
  std::vector<std::string> out;
  for (auto& f : found) out.push_back(std::move(f.second));
  return out;
}

std::string resolve_checkpoint(const std::string& dir) {
  if (!is_directory(dir)) throw UsageError("checkpoint '" + dir + "' does not exist or is not a directory");
  if (is_complete_checkpoint(dir)) return dir;
  auto all = list_checkpoints(dir);
  if (all.empty())
    throw UsageError("'" + dir +
                     "' holds no complete checkpoint (neither a 'complete' marker nor ckpt-* directories with one)");
  return all.back();
}

std::string new_run_id() {
  std::random_device rd;
  const uint64_t now = static_cast<uint64_t>(std::chrono::system_clock::now().time_since_epoch().count());
  std::mt19937_64 rng((static_cast<uint64_t>(rd()) << 32) ^ rd() ^ now ^ (static_cast<uint64_t>(::getpid()) << 16));
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(rng()));
  return buf;
}

// ------------------------------------------------------------------ writing

void save_optimizer(const std::string& path, torch::nn::Module& model, torch::optim::AdamW& opt) {
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  auto& state = opt.state();
  for (const auto& p : model.named_parameters()) {
    auto it = state.find(state_key(state, p.value()));
    if (it == state.end()) continue;
    auto& s = static_cast<torch::optim::AdamWParamState&>(*it->second);
    tensors.emplace_back("exp_avg/" + p.key(), s.exp_avg().to(torch::kCPU));
    tensors.emplace_back("exp_avg_sq/" + p.key(), s.exp_avg_sq().to(torch::kCPU));
    tensors.emplace_back("step/" + p.key(), torch::tensor(static_cast<int64_t>(s.step()), torch::kLong));
  }
  {
    at::Generator gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    tensors.emplace_back("rng/cpu", gen.get_state());
  }
  colt5::save_safetensors(path, tensors);
}

std::string save_checkpoint(const std::string& run_dir, torch::nn::Module& model, torch::optim::AdamW* opt,
                            const ModelConfig& m, const TrainConfig& t, const CheckpointState& state, int keep) {
  make_dirs(run_dir);
  for (const auto& n : list_dir(run_dir))
    if (n.rfind(".tmp-ckpt-", 0) == 0 || n.rfind(".old-ckpt-", 0) == 0) remove_tree(run_dir + "/" + n);
  // A checkpoint is taken out of sight by a rename before it is deleted, so a
  // kill during the deletion never leaves a half-deleted ckpt-* behind.
  auto discard = [&](const std::string& dir) {
    const std::string name = dir.substr(dir.find_last_of('/') + 1);
    const std::string gone = run_dir + "/.old-" + name + "-" + std::to_string(::getpid());
    if (std::rename(dir.c_str(), gone.c_str()) == 0) remove_tree(gone);
  };
  const std::string final_dir = run_dir + "/" + checkpoint_name(state.step);
  const std::string tmp = run_dir + "/.tmp-" + checkpoint_name(state.step) + "-" + std::to_string(::getpid());
  make_dirs(tmp);
  colt5::nn::save_state(model, tmp + "/model.safetensors", {{"format", "colt5-app"}});
  if (opt) {
    save_optimizer(tmp + "/optimizer.safetensors", model, *opt);
  } else {
    colt5::save_safetensors(tmp + "/optimizer.safetensors", {});
  }
  write_file_atomic(tmp + "/config.json", nlohmann::json{{"model", to_json(m)}, {"train", to_json(t)}}.dump(2) + "\n");
  const nlohmann::json st{{"step", state.step},
                          {"run_id", state.run_id},
                          {"seed", state.seed},
                          {"tokens_seen", state.tokens_seen},
                          {"elapsed_s", state.elapsed_s}};
  write_file_atomic(tmp + "/state.json", st.dump(2) + "\n");
  nlohmann::json marker{{"step", state.step}, {"fnv1a64", nlohmann::json::object()}};
  for (const char* f : kCheckpointFiles) marker["fnv1a64"][f] = file_checksum(tmp + "/" + f);
  write_file_atomic(tmp + "/complete", marker.dump(2) + "\n");
  fsync_path(tmp);
  if (is_directory(final_dir)) discard(final_dir);
  if (std::rename(tmp.c_str(), final_dir.c_str()) != 0)
    throw std::runtime_error("cannot move checkpoint into '" + final_dir + "': " + std::strerror(errno));
  fsync_path(run_dir);
  auto all = list_checkpoints(run_dir);
  for (size_t i = 0; i + static_cast<size_t>(keep) < all.size(); ++i) discard(all[i]);
  return final_dir;
}

// ------------------------------------------------------------------ reading

namespace {

int64_t json_int(const nlohmann::json& j, const char* key, const std::string& file, int64_t low) {
  if (!j.contains(key)) throw UsageError("'" + file + "': missing field " + key);
  const auto& v = j.at(key);
  if (!v.is_number_integer() || (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)))
    throw UsageError("'" + file + "': field " + key + " must be an integer, got " + v.dump());
  const int64_t x = v.get<int64_t>();
  if (x < low)
    throw UsageError("'" + file + "': field " + key + " must be at least " + std::to_string(low) + ", got " +
                     std::to_string(x));
  return x;
}

void only_keys(const nlohmann::json& j, const std::set<std::string>& keys, const std::string& file) {
  if (!j.is_object()) throw UsageError("'" + file + "' must hold a JSON object");
  for (const auto& item : j.items())
    if (!keys.count(item.key())) throw UsageError("'" + file + "': unknown field " + item.key());
}

}  // namespace

CheckpointInfo read_checkpoint_info(const std::string& path) {
  CheckpointInfo info;
  info.dir = resolve_checkpoint(path);
  const std::string dir = info.dir;

  // The completion marker and the checksums of the files it covers.
  const std::string marker_path = dir + "/complete";
  const nlohmann::json marker = read_json(marker_path);
  only_keys(marker, {"step", "fnv1a64"}, marker_path);
  info.step = json_int(marker, "step", marker_path, 1);
  if (!marker.contains("fnv1a64") || !marker.at("fnv1a64").is_object())
    throw UsageError("'" + marker_path + "': missing field fnv1a64 (the checksums of the checkpoint's files)");
  const auto& sums = marker.at("fnv1a64");
  only_keys(sums, std::set<std::string>(std::begin(kCheckpointFiles), std::end(kCheckpointFiles)), marker_path);
  for (const char* f : kCheckpointFiles) {
    if (!sums.contains(f) || !sums.at(f).is_string())
      throw UsageError("'" + marker_path + "': missing the checksum of " + f);
    const std::string actual = file_checksum(dir + "/" + f);
    if (actual != sums.at(f).get<std::string>())
      throw UsageError("'" + dir + "/" + f + "' is damaged: its checksum " + actual + " differs from " +
                       sums.at(f).get<std::string>() + " recorded in '" + marker_path + "'");
  }
  const int64_t named = checkpoint_step(dir.substr(dir.find_last_of('/') + 1));
  if (named >= 0 && named != info.step)
    throw UsageError("'" + marker_path + "': step " + std::to_string(info.step) + " differs from the directory's name");

  // Settings.
  const std::string config_path = dir + "/config.json";
  const nlohmann::json cfg = read_json(config_path);
  only_keys(cfg, {"model", "train"}, config_path);
  if (!cfg.contains("model") || !cfg.contains("train"))
    throw UsageError("'" + config_path + "' lacks the model or train section");
  const SettingNames names{config_path};
  info.model = model_from_json(cfg.at("model"), names);
  info.train = train_from_json(cfg.at("train"), names);
  validate(info.train, info.model, names);

  // State.
  const std::string state_path = dir + "/state.json";
  const nlohmann::json st = read_json(state_path);
  only_keys(st, {"step", "run_id", "seed", "tokens_seen", "elapsed_s"}, state_path);
  info.state.step = json_int(st, "step", state_path, 1);
  if (info.state.step != info.step)
    throw UsageError("'" + state_path + "': field step " + std::to_string(info.state.step) + " differs from " +
                     std::to_string(info.step) + " in '" + marker_path + "'");
  if (info.state.step > info.train.steps)
    throw UsageError("'" + state_path + "': field step " + std::to_string(info.state.step) + " is beyond train.steps " +
                     std::to_string(info.train.steps) + " of '" + config_path + "'");
  if (!st.contains("run_id") || !st.at("run_id").is_string() || st.at("run_id").get<std::string>().empty())
    throw UsageError("'" + state_path + "': field run_id must be a non-empty string");
  info.state.run_id = st.at("run_id").get<std::string>();
  if (!st.contains("seed") || !st.at("seed").is_number_unsigned() || st.at("seed").get<uint64_t>() != info.train.seed)
    throw UsageError("'" + state_path + "': field seed must equal train.seed of '" + config_path + "'");
  info.state.seed = info.train.seed;
  info.state.tokens_seen = json_int(st, "tokens_seen", state_path, 0);
  if (!st.contains("elapsed_s") || !st.at("elapsed_s").is_number() ||
      !std::isfinite(st.at("elapsed_s").get<double>()) || st.at("elapsed_s").get<double>() < 0)
    throw UsageError("'" + state_path + "': field elapsed_s must be a finite number >= 0");
  info.state.elapsed_s = st.at("elapsed_s").get<double>();
  return info;
}

std::string run_id_of(const std::string& run_dir) {
  auto all = list_checkpoints(run_dir);
  if (all.empty()) return "";
  const std::string path = all.back() + "/state.json";
  nlohmann::json st = read_json(path);
  if (!st.is_object() || !st.contains("run_id") || !st.at("run_id").is_string())
    throw UsageError("'" + path + "' does not say which run it belongs to (no run_id)");
  return st.at("run_id").get<std::string>();
}

void load_model_weights(torch::nn::Module& model, const std::string& path) {
  colt5::SafetensorsData data = load_tensors(path);
  std::map<std::string, torch::Tensor> own;
  for (const auto& [name, t] : colt5::nn::state_dict(model)) own.emplace(name, t);
  for (const auto& [name, t] : data.tensors) {
    auto it = own.find(name);
    if (it == own.end()) throw UsageError("'" + path + "': tensor '" + name + "' is not part of this model");
    if (t.scalar_type() != it->second.scalar_type())
      throw UsageError("'" + path + "': tensor '" + name + "' has dtype " +
                       std::string(c10::toString(t.scalar_type())) + ", the model's is " +
                       c10::toString(it->second.scalar_type()));
    if (!all_finite(t)) throw UsageError("'" + path + "': tensor '" + name + "' holds NaN or infinite values");
  }
  try {
    colt5::nn::load_state_dict(model, data.tensors, /*strict=*/true);
  } catch (const c10::Error& e) {
    throw UsageError("'" + path + "': " + e.what_without_backtrace());
  }
}

void load_optimizer(const std::string& path, torch::nn::Module& model, torch::optim::AdamW& opt, int64_t max_step) {
  colt5::SafetensorsData data = load_tensors(path);
  auto fail = [&](const std::string& message) { throw UsageError("'" + path + "': " + message); };
  auto get = [&](const std::string& name) -> const torch::Tensor& {
    if (!data.contains(name)) fail("lacks tensor '" + name + "'");
    return data.at(name);
  };
  std::set<std::string> expected{"rng/cpu"};
  struct Entry {
    torch::Tensor param, m, v;
    int64_t step;
  };
  std::vector<Entry> entries;
  for (const auto& p : model.named_parameters()) {
    const std::string m = "exp_avg/" + p.key(), v = "exp_avg_sq/" + p.key(), st = "step/" + p.key();
    expected.insert({m, v, st});
    // A parameter that never had a gradient has no state at all.
    if (!data.contains(m) && !data.contains(v) && !data.contains(st)) continue;
    const torch::Tensor &tm = get(m), &tv = get(v), &ts = get(st);
    for (const auto* name : {&m, &v}) {
      const torch::Tensor& t = data.at(*name);
      if (t.sizes() != p.value().sizes())
        fail("tensor '" + *name + "' has shape " + shape(t) + ", the parameter's is " + shape(p.value()));
      if (t.scalar_type() != p.value().scalar_type())
        fail("tensor '" + *name + "' has dtype " + std::string(c10::toString(t.scalar_type())) +
             ", the parameter's is " + c10::toString(p.value().scalar_type()));
      if (!all_finite(t)) fail("tensor '" + *name + "' holds NaN or infinite values");
    }
    if (tv.numel() > 0 && (tv < 0).any().item<bool>()) fail("tensor '" + v + "' holds negative second moments");
    if (ts.scalar_type() != torch::kLong || ts.numel() != 1) fail("tensor '" + st + "' must be one int64 step");
    const int64_t step = ts.item<int64_t>();
    if (step < 1 || step > max_step)
      fail("tensor '" + st + "' holds step " + std::to_string(step) + ", outside 1.." + std::to_string(max_step));
    entries.push_back({p.value(), tm, tv, step});
  }
  if (entries.empty()) fail("holds no optimizer state for any parameter");
  for (const auto& [name, t] : data.tensors)
    if (!expected.count(name)) fail("tensor '" + name + "' is not part of this model's optimizer state");
  at::Generator gen = at::detail::getDefaultCPUGenerator();
  const torch::Tensor& rng = get("rng/cpu");
  {
    std::lock_guard<std::mutex> lock(gen.mutex());
    const torch::Tensor now = gen.get_state();
    if (rng.scalar_type() != now.scalar_type() || rng.sizes() != now.sizes())
      fail("tensor 'rng/cpu' is not a CPU generator state (dtype " + std::string(c10::toString(rng.scalar_type())) +
           ", shape " + shape(rng) + ")");
  }
  // Everything checked: now the state changes.
  auto& state = opt.state();
  state.clear();
  for (const auto& e : entries) {
    auto s = std::make_unique<torch::optim::AdamWParamState>();
    s->step(e.step);
    s->exp_avg(e.m.to(e.param.device()).clone());
    s->exp_avg_sq(e.v.to(e.param.device()).clone());
    state[state_key(state, e.param)] = std::move(s);
  }
  std::lock_guard<std::mutex> lock(gen.mutex());
  try {
    gen.set_state(rng);
  } catch (const c10::Error& e) {
    fail(std::string("tensor 'rng/cpu': ") + e.what_without_backtrace());
  }
}

}  // namespace app
}  // namespace colt5
