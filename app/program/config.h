// Model and training settings of the `colt5` program. Every setting is one
// row of a table (settings.cpp): its JSON key in the checkpoint's config.json,
// its command-line flag and its help. The flags, the JSON reader and writer and
// the error messages of validate() all come from these tables, so a setting
// has one name per place and one check, whether it comes from the command line
// or from a checkpoint.
#pragma once

#include <nlohmann/json.hpp>

#include "colt5/nn/conditional.h"
#include "program/error.h"

#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <variant>
#include <vector>

namespace colt5 {
namespace app {

// Which model: routed branches, the light branches alone, or dense attention
// and a full-width feedforward at the heavy branches' widths.
enum class Arch { routed, light_only, dense };
const char* arch_name(Arch a);  // "routed", "light-only", "dense"

// The router settings the program uses: the library's defaults, except
// cosine-similarity routing scores and a final eps of 1. With the reference's
// dot-product scores and eps 0.03 the router barely learns in the first
// thousands of steps (docs/program.md); both stay selectable by flags.
colt5::nn::RouterKwargs default_router();

struct ModelConfig {
  ModelConfig();

  int64_t vocab_size = 256;
  int64_t depth = 2;
  int64_t max_seq_len = 512;  // length of the learned position table
  Arch arch = Arch::routed;

  // The blocks' modules. attn.dim() is the model width; attn.router_kwargs()
  // is used by the feedforward's router too; ff.dim() and ff.router_kwargs()
  // are set from them when the model is built (feedforward_options()).
  colt5::nn::ConditionalRoutedAutoregressiveAttentionOptions attn;
  colt5::nn::ConditionalRoutedFeedForwardOptions ff;

  int64_t dim() const { return attn.dim(); }
  int64_t heavy_window() const { return attn.heavy_window_size().value_or(attn.light_window_size()); }
  colt5::nn::ConditionalRoutedFeedForwardOptions feedforward_options() const;
};

struct TrainConfig {
  // What to learn: the built-in retrieval task when data is empty, else the bytes of that file.
  std::string data;
  double train_frac = 0.90;
  double valid_frac = 0.05;  // the rest is the test split

  int64_t seq_len = 512;
  int64_t batch_size = 16;
  int64_t grad_accum = 1;
  int64_t steps = 600;
  int64_t stop_after = 0;  // 0: run to `steps`; else stop (with a checkpoint) after this step

  double lr = 3e-3;
  double min_lr_ratio = 0.1;
  int64_t warmup = 50;
  double weight_decay = 0.01;
  double beta1 = 0.9;
  double beta2 = 0.99;
  double grad_clip = 1.0;

  int64_t eval_every = 100;
  int64_t eval_batches = 8;  // text: batches of the valid split per evaluation
  int64_t save_every = 200;
  int64_t log_every = 10;
  uint64_t seed = 0;
  std::string device = "cpu";
  bool amp = true;  // bf16 autocast on CUDA

  // Retrieval task.
  int64_t task_keys = 32;
  int64_t task_values = 32;
  int64_t task_filler = 64;
  int64_t task_pairs = 1;
  int64_t task_eval_size = 512;  // held-out sequences, generated from a fixed seed
  double lm_weight = 0.0;        // weight of next-token loss on the other positions
};

bool is_task(const TrainConfig& t);
int64_t task_vocab(const TrainConfig& t);

// Where the pairs of the retrieval task may sit: [0, end). Chosen so that the
// light branch of the last position (causal window w, one window back: at most
// 2w tokens) cannot see any of them.
int64_t task_pair_region(const TrainConfig& t, const ModelConfig& m);

// ------------------------------------------------------------------ settings

using SettingValue = std::variant<bool, int64_t, uint64_t, double, std::string>;

// One setting of a config struct C.
template <typename C>
struct Setting {
  const char* key;    // JSON key in its section ("model" or "train")
  const char* flag;   // command-line flag, e.g. "--seq-len"
  const char* help;   // one line for --help
  bool own_flag;      // false: the program registers the flag itself (--split, --no-amp, --light-only)
  bool resumable;     // may be given with --resume
  bool stored;        // written to config.json
  SettingValue kind;  // the value's type (and the default's type)
  std::function<SettingValue(const C&)> get;
  std::function<void(C&, const SettingValue&)> set;
};

const std::vector<Setting<ModelConfig>>& model_settings();
const std::vector<Setting<TrainConfig>>& train_settings();

// How validate() names a setting: by its flag (settings from the command
// line), or by "section.key" after the file's name (settings from a
// checkpoint's config.json).
struct SettingNames {
  std::string file;  // empty: flags
  std::string operator()(const std::string& section_key) const;
  // The message with the file's name in front when there is one.
  std::string where(const std::string& message) const;
};

// Throws UsageError naming the first setting that cannot work.
void validate(const ModelConfig& m, const SettingNames& names = {});
void validate(const TrainConfig& t, const ModelConfig& m, const SettingNames& names = {});

// ------------------------------------------------------------------ JSON

nlohmann::json to_json(const ModelConfig& m);
nlohmann::json to_json(const TrainConfig& t);

// Every stored key must be present with a value of its type (integers in
// range, numbers finite); an unknown key is an error naming it. Errors are
// UsageError, prefixed with names.file when given. Values are not validated
// here: validate() does that.
ModelConfig model_from_json(const nlohmann::json& j, const SettingNames& names = {});
TrainConfig train_from_json(const nlohmann::json& j, const SettingNames& names = {});

}  // namespace app
}  // namespace colt5
