// Checkpoints: a directory `ckpt-<step>` in the run directory holding
//   model.safetensors      weights and buffers by name
//   optimizer.safetensors  AdamW moments and step by parameter name, CPU RNG state
//   config.json            model and training settings
//   state.json             step, data position, seed, elapsed time
//   complete               written last
// The directory is filled under a temporary name and renamed into place, so a
// process killed at any moment leaves only complete checkpoints behind.
#pragma once

#include <torch/torch.h>
#include <ATen/CPUGeneratorImpl.h>

#include "colt5/compat.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "colt5/safetensors.h"

#include "config.h"
#include "model.h"

namespace colt5 {
namespace app {

// ------------------------------------------------------------ file helpers

inline bool path_exists(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0;
}

inline bool is_directory(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

inline void make_dirs(const std::string& path) {
  std::string cur;
  std::stringstream ss(path);
  std::string part;
  if (!path.empty() && path[0] == '/') cur = "/";
  while (std::getline(ss, part, '/')) {
    if (part.empty()) continue;
    cur += part + "/";
    if (::mkdir(cur.c_str(), 0755) != 0 && errno != EEXIST)
      throw UsageError("cannot create directory '" + cur + "': " + std::strerror(errno));
  }
  if (!is_directory(path)) throw UsageError("'" + path + "' exists and is not a directory");
}

inline std::vector<std::string> list_dir(const std::string& dir) {
  std::vector<std::string> names;
  DIR* d = ::opendir(dir.c_str());
  if (!d) return names;
  while (dirent* e = ::readdir(d)) {
    std::string n = e->d_name;
    if (n != "." && n != "..") names.push_back(n);
  }
  ::closedir(d);
  std::sort(names.begin(), names.end());
  return names;
}

inline void remove_tree(const std::string& path) {
  struct stat st;
  if (::lstat(path.c_str(), &st) != 0) return;
  if (S_ISDIR(st.st_mode)) {
    for (const auto& n : list_dir(path)) remove_tree(path + "/" + n);
    ::rmdir(path.c_str());
  } else {
    ::unlink(path.c_str());
  }
}

inline void fsync_path(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}

// Writes `text` to path through a temporary file and a rename.
inline void write_file_atomic(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) throw std::runtime_error("cannot write '" + tmp + "': " + std::strerror(errno));
  bool ok = std::fwrite(text.data(), 1, text.size(), f) == text.size();
  ok = std::fflush(f) == 0 && ok;
  ok = ::fsync(fileno(f)) == 0 && ok;
  ok = std::fclose(f) == 0 && ok;
  if (!ok || std::rename(tmp.c_str(), path.c_str()) != 0)
    throw std::runtime_error("cannot write '" + path + "': " + std::strerror(errno));
}

inline std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw UsageError("cannot read '" + path + "': " + std::strerror(errno));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

inline nlohmann::json read_json(const std::string& path) {
  try {
    return nlohmann::json::parse(read_text(path));
  } catch (const nlohmann::json::exception& e) {
    throw UsageError("'" + path + "' is not valid JSON: " + e.what());
  }
}

// --------------------------------------------------------------- checkpoints

inline std::string checkpoint_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "ckpt-%08lld", static_cast<long long>(step));
  return buf;
}

inline bool is_complete_checkpoint(const std::string& dir) { return path_exists(dir + "/complete"); }

// Complete checkpoints of a run directory, oldest first.
inline std::vector<std::string> list_checkpoints(const std::string& run_dir) {
  std::vector<std::string> out;
  for (const auto& n : list_dir(run_dir))
    if (n.rfind("ckpt-", 0) == 0 && is_complete_checkpoint(run_dir + "/" + n)) out.push_back(run_dir + "/" + n);
  return out;
}

// A checkpoint directory itself, or the newest complete checkpoint of a run directory.
inline std::string resolve_checkpoint(const std::string& dir) {
  if (!is_directory(dir)) throw UsageError("checkpoint '" + dir + "' does not exist or is not a directory");
  if (is_complete_checkpoint(dir)) return dir;
  auto all = list_checkpoints(dir);
  if (all.empty())
    throw UsageError("'" + dir +
                     "' holds no complete checkpoint (neither a 'complete' marker nor ckpt-* directories with one)");
  return all.back();
}

inline std::string parent_dir(const std::string& path) {
  auto pos = path.find_last_of('/');
  return pos == std::string::npos ? "." : (pos == 0 ? "/" : path.substr(0, pos));
}

inline std::vector<std::pair<std::string, torch::Tensor>> model_tensors(torch::nn::Module& model) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& p : model.named_parameters()) out.emplace_back(p.key(), p.value().detach().to(torch::kCPU));
  for (const auto& b : model.named_buffers()) out.emplace_back(b.key(), b.value().detach().to(torch::kCPU));
  return out;
}

inline void load_model_tensors(torch::nn::Module& model, const std::string& path) {
  SafetensorsData data = load_safetensors(path);
  torch::NoGradGuard no_grad;
  auto load_one = [&](const std::string& name, torch::Tensor& t) {
    if (!data.contains(name)) throw UsageError("'" + path + "' lacks tensor '" + name + "' of this model");
    const torch::Tensor& src = data.at(name);
    if (src.sizes() != t.sizes()) {
      std::ostringstream os;
      os << "'" << path << "': tensor '" << name << "' has shape " << src.sizes() << ", the model expects "
         << t.sizes();
      throw UsageError(os.str());
    }
    t.copy_(src);
  };
  for (auto& p : model.named_parameters()) load_one(p.key(), p.value());
  for (auto& b : model.named_buffers()) load_one(b.key(), b.value());
}

inline void save_optimizer(const std::string& path, torch::nn::Module& model, torch::optim::AdamW& opt) {
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  auto& state = opt.state();
  for (const auto& p : model.named_parameters()) {
    auto it = state.find(compat::optimizer_state_key(p.value()));
    if (it == state.end()) continue;
    auto& s = static_cast<torch::optim::AdamWParamState&>(*it->second);
    tensors.emplace_back("exp_avg/" + p.key(), s.exp_avg().to(torch::kCPU));
    tensors.emplace_back("exp_avg_sq/" + p.key(), s.exp_avg_sq().to(torch::kCPU));
    tensors.emplace_back("step/" + p.key(), torch::tensor(s.step(), torch::kLong));
  }
  {
    at::Generator gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    tensors.emplace_back("rng/cpu", gen.get_state());
  }
  save_safetensors(path, tensors);
}

inline void load_optimizer(const std::string& path, torch::nn::Module& model, torch::optim::AdamW& opt) {
  SafetensorsData data = load_safetensors(path);
  auto& state = opt.state();
  state.clear();
  for (const auto& p : model.named_parameters()) {
    const std::string m = "exp_avg/" + p.key(), v = "exp_avg_sq/" + p.key(), st = "step/" + p.key();
    if (!data.contains(m)) continue;
    if (!data.contains(v) || !data.contains(st))
      throw UsageError("'" + path + "' holds an incomplete optimizer state for '" + p.key() + "'");
    if (data.at(m).sizes() != p.value().sizes())
      throw UsageError("'" + path + "': optimizer state of '" + p.key() + "' does not match the parameter's shape");
    auto s = std::make_unique<torch::optim::AdamWParamState>();
    s->step(data.at(st).item<int64_t>());
    s->exp_avg(data.at(m).to(p.value().device(), p.value().scalar_type()).clone());
    s->exp_avg_sq(data.at(v).to(p.value().device(), p.value().scalar_type()).clone());
    state[compat::optimizer_state_key(p.value())] = std::move(s);
  }
  if (data.contains("rng/cpu")) {
    at::Generator gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(data.at("rng/cpu"));
  }
}

// Writes checkpoint `step` into run_dir and keeps only the newest `keep`
// complete checkpoints. Returns the checkpoint's directory.
inline std::string save_checkpoint(const std::string& run_dir, int64_t step, torch::nn::Module& model,
                                   torch::optim::AdamW* opt, const ModelConfig& m, const TrainConfig& t,
                                   nlohmann::json state, int keep = 2) {
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
  const std::string final_dir = run_dir + "/" + checkpoint_name(step);
  const std::string tmp = run_dir + "/.tmp-" + checkpoint_name(step) + "-" + std::to_string(::getpid());
  make_dirs(tmp);
  save_safetensors(tmp + "/model.safetensors", model_tensors(model), {{"format", "colt5-app"}});
  if (opt) save_optimizer(tmp + "/optimizer.safetensors", model, *opt);
  write_file_atomic(tmp + "/config.json", nlohmann::json{{"model", to_json(m)}, {"train", to_json(t)}}.dump(2) + "\n");
  state["step"] = step;
  write_file_atomic(tmp + "/state.json", state.dump(2) + "\n");
  write_file_atomic(tmp + "/complete", std::to_string(step) + "\n");
  fsync_path(tmp);
  if (is_directory(final_dir)) discard(final_dir);
  if (std::rename(tmp.c_str(), final_dir.c_str()) != 0)
    throw std::runtime_error("cannot move checkpoint into '" + final_dir + "': " + std::strerror(errno));
  fsync_path(run_dir);
  auto all = list_checkpoints(run_dir);
  for (size_t i = 0; i + static_cast<size_t>(keep) < all.size(); ++i) discard(all[i]);
  return final_dir;
}

struct CheckpointInfo {
  std::string dir;
  ModelConfig model;
  TrainConfig train;
  nlohmann::json state;
  int64_t step = 0;
};

inline CheckpointInfo read_checkpoint_info(const std::string& path) {
  CheckpointInfo info;
  info.dir = resolve_checkpoint(path);
  nlohmann::json cfg = read_json(info.dir + "/config.json");
  if (!cfg.contains("model") || !cfg.contains("train"))
    throw UsageError("'" + info.dir + "/config.json' lacks the model or train section");
  info.model = model_from_json(cfg.at("model"));
  info.train = train_from_json(cfg.at("train"));
  info.state = read_json(info.dir + "/state.json");
  info.step = info.state.value("step", int64_t(0));
  return info;
}

}  // namespace app
}  // namespace colt5
