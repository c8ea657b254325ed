// Checkpoints: a directory `ckpt-<step>` in the run directory holding
//   model.safetensors      weights and buffers by name (colt5::nn::save_state)
//   optimizer.safetensors  AdamW moments and step by parameter name, CPU RNG state
//   config.json            model and training settings
//   state.json             step, run id, seed, tokens seen, elapsed time
//   complete               written last: the step and a checksum of each file above
// The directory is filled under a temporary name and renamed into place, so a
// process killed at any moment leaves only complete checkpoints behind.
// Reading one checks everything (checksums, every setting, the state, and on
// loading the tensors' names, shapes, dtypes and values) before anything runs.
#pragma once

#include <torch/nn/module.h>
#include <torch/optim/adamw.h>

#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>
#include <vector>

#include "program/config.h"

namespace colt5 {
namespace app {

std::string checkpoint_name(int64_t step);
// The step of a name `ckpt-<digits>`; -1 for any other name.
int64_t checkpoint_step(const std::string& name);
bool is_complete_checkpoint(const std::string& dir);
// Complete checkpoints of a run directory, by step, oldest first.
std::vector<std::string> list_checkpoints(const std::string& run_dir);
// A checkpoint directory itself, or the newest complete checkpoint of a run directory.
std::string resolve_checkpoint(const std::string& dir);

// A fresh run's identity: checkpoints of one run carry the same id.
std::string new_run_id();

struct CheckpointState {
  int64_t step = 0;
  std::string run_id;
  uint64_t seed = 0;
  int64_t tokens_seen = 0;
  double elapsed_s = 0;
};

// Writes checkpoint `state.step` into run_dir and keeps only the newest
// `keep` complete checkpoints. Returns the checkpoint's directory.
std::string save_checkpoint(const std::string& run_dir, torch::nn::Module& model, torch::optim::AdamW* opt,
                            const ModelConfig& m, const TrainConfig& t, const CheckpointState& state, int keep = 2);

struct CheckpointInfo {
  std::string dir;
  ModelConfig model;
  TrainConfig train;
  CheckpointState state;
  int64_t step = 0;
};

// Resolves `path`, verifies the completion marker's checksums and reads and
// validates config.json and state.json. UsageError names the file and field.
CheckpointInfo read_checkpoint_info(const std::string& path);

// The run id of the newest complete checkpoint in run_dir ("" when it has none).
std::string run_id_of(const std::string& run_dir);

// Loads model.safetensors of a checkpoint into model: every tensor of the
// model present with its shape and dtype, finite, nothing else.
void load_model_weights(torch::nn::Module& model, const std::string& path);

void save_optimizer(const std::string& path, torch::nn::Module& model, torch::optim::AdamW& opt);
// Restores the optimizer's state and the CPU generator, after checking every
// entry (a state for each parameter, shapes, dtypes, finite moments, steps in
// 1..max_step, the generator state's size). Nothing changes on error.
void load_optimizer(const std::string& path, torch::nn::Module& model, torch::optim::AdamW& opt, int64_t max_step);

}  // namespace app
}  // namespace colt5
