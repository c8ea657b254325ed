// Model and training settings of the `colt5` program, with their JSON form
// (saved with every checkpoint) and the checks that reject sizes that cannot work.
#pragma once

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace colt5 {
namespace app {

// Raised for anything the user asked for that cannot work; main() prints the
// message and exits with status 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct ModelConfig {
  int64_t vocab_size = 256;
  int64_t dim = 64;
  int64_t depth = 2;
  int64_t max_seq_len = 512;  // length of the learned position table
  bool light_only = false;    // causal LocalMHA + light feedforward only

  int64_t light_heads = 4;
  int64_t light_dim_head = 16;
  int64_t light_window_size = 64;

  int64_t heavy_heads = 4;
  int64_t heavy_dim_head = 16;
  int64_t heavy_window_size = 0;  // 0: equal to light_window_size
  int64_t num_heavy_tokens_q = 64;
  int64_t num_heavy_tokens_kv = 64;
  int64_t num_routed_kv = 1;

  double light_ff_mult = 0.5;
  double heavy_ff_mult = 4.0;
  int64_t num_heavy_ff_tokens = 64;

  // Router settings. Cosine-similarity routing with eps 1 learns within a few
  // hundred steps; the reference's dot-product routing with eps 0.03 barely
  // moves in thousands (shared/LEARNING.md); both stay selectable.
  bool cosine_sim_routing = true;
  double cosine_sim_scale = 8.0;
  double router_eps = 1.0;
  double router_eps_init = 4.0;
  double router_eps_decay = 0.7;
  int64_t router_n_iters = 20;
  double router_fetch_k_ratio = 9.0 / 8.0;

  int64_t effective_heavy_window() const { return heavy_window_size > 0 ? heavy_window_size : light_window_size; }
};

struct TrainConfig {
  // What to learn: the built-in retrieval task when data is empty, else bytes of that file.
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

inline bool is_task(const TrainConfig& t) { return t.data.empty(); }

inline int64_t task_vocab(const TrainConfig& t) { return t.task_keys + t.task_values + t.task_filler; }

// Where the pairs of the retrieval task may sit: [0, end). Chosen so that the
// light branch of the last position (causal window w, one window back: at most
// 2w tokens) cannot see any of them.
inline int64_t task_pair_region(const TrainConfig& t, const ModelConfig& m) {
  return std::min(t.seq_len / 2, t.seq_len - 1 - 2 * m.light_window_size - 1);
}

inline void require(bool ok, const std::string& message) {
  if (!ok) throw UsageError(message);
}

inline std::string str(int64_t v) { return std::to_string(v); }

inline void validate(const ModelConfig& m) {
  require(m.vocab_size >= 2, "vocabulary size must be at least 2, got " + str(m.vocab_size));
  require(m.dim >= 1, "--dim must be positive, got " + str(m.dim));
  require(m.depth >= 1, "--depth must be positive, got " + str(m.depth));
  require(m.light_heads >= 1 && m.light_dim_head >= 1, "--light-heads and --light-dim-head must be positive");
  require(m.heavy_heads >= 1 && m.heavy_dim_head >= 1, "--heavy-heads and --heavy-dim-head must be positive");
  require(m.light_window_size >= 1, "--window must be positive, got " + str(m.light_window_size));
  require(m.heavy_window_size >= 0, "--heavy-window must be >= 0 (0: same as --window)");
  require(m.num_heavy_tokens_q >= 1, "--heavy-q must be positive");
  require(m.num_heavy_tokens_kv >= 1, "--heavy-kv must be positive");
  require(m.num_routed_kv >= 1, "--routed-kv must be positive");
  require(m.heavy_heads % m.num_routed_kv == 0,
          "--heavy-heads (" + str(m.heavy_heads) + ") must be divisible by --routed-kv (" + str(m.num_routed_kv) + ")");
  require(m.num_heavy_ff_tokens >= 1, "--heavy-ff-tokens must be positive");
  require(m.light_ff_mult > 0 && m.heavy_ff_mult > 0, "feedforward multipliers must be positive");
  require(m.router_eps > 0, "--router-eps must be positive");
  require(m.router_eps_decay > 0 && m.router_eps_decay <= 1, "--router-eps-decay must be in (0, 1]");
  require(m.router_n_iters >= 1, "--router-iters must be positive");
  require(m.router_fetch_k_ratio >= 1, "--router-fetch-k-ratio must be >= 1");
  require(m.max_seq_len >= 2, "maximum sequence length must be at least 2");
}

inline void validate(const TrainConfig& t, const ModelConfig& m) {
  validate(m);
  require(t.seq_len >= 2, "--seq-len must be at least 2, got " + str(t.seq_len));
  require(t.seq_len <= m.max_seq_len,
          "--seq-len " + str(t.seq_len) + " exceeds the model's position table (" + str(m.max_seq_len) + ")");
  require(t.seq_len > m.light_window_size, "--seq-len " + str(t.seq_len) +
                                               " must be longer than the light window (--window " +
                                               str(m.light_window_size) + ")");
  if (!m.light_only)
    require(t.seq_len > m.effective_heavy_window(),
            "--seq-len " + str(t.seq_len) + " must be longer than the heavy window (" +
                str(m.effective_heavy_window()) + "): no window would have an earlier window to attend to");
  require(t.batch_size >= 1, "--batch must be positive");
  require(t.grad_accum >= 1, "--grad-accum must be positive");
  require(t.steps >= 1, "--steps must be positive");
  require(t.stop_after >= 0, "--stop-after must be >= 0");
  require(t.lr > 0, "--lr must be positive");
  require(t.min_lr_ratio >= 0 && t.min_lr_ratio <= 1, "--min-lr-ratio must be in [0, 1]");
  require(t.warmup >= 0, "--warmup must be >= 0");
  require(t.weight_decay >= 0, "--weight-decay must be >= 0");
  require(t.grad_clip >= 0, "--clip must be >= 0 (0 disables clipping)");
  require(t.eval_every >= 1 && t.save_every >= 1 && t.log_every >= 1,
          "--eval-every, --save-every and --log-every must be positive");
  require(t.eval_batches >= 1, "--eval-batches must be positive");
  require(t.device == "cpu" || t.device == "cuda", "--device must be cpu or cuda, got '" + t.device + "'");
  if (is_task(t)) {
    require(t.task_keys >= 1 && t.task_values >= 2 && t.task_filler >= 1,
            "--task-keys, --task-filler must be positive and --task-values at least 2");
    require(t.task_pairs >= 1 && t.task_pairs <= t.task_keys,
            "--task-pairs must be between 1 and --task-keys (" + str(t.task_keys) + ")");
    require(m.vocab_size == task_vocab(t),
            "model vocabulary (" + str(m.vocab_size) + ") differs from the task's (" + str(task_vocab(t)) + ")");
    require(t.task_eval_size >= 1, "--task-eval-size must be positive");
    require(t.lm_weight >= 0, "--lm-weight must be >= 0");
    int64_t region = task_pair_region(t, m);
    require(region >= 2 * t.task_pairs,
            "--seq-len " + str(t.seq_len) + " is too short for the retrieval task with --window " +
                str(m.light_window_size) + ": the " + str(t.task_pairs) +
                " pair(s) must sit more than two light windows before the query; use at least --seq-len " +
                str(2 * m.light_window_size + 2 + 2 * t.task_pairs + 1));
  } else {
    require(m.vocab_size == 256, "a byte-level text model needs vocabulary 256, got " + str(m.vocab_size));
    require(t.train_frac > 0 && t.valid_frac > 0 && t.train_frac + t.valid_frac < 1,
            "--split fractions must be positive and leave room for a test split");
  }
}

// ------------------------------------------------------------------ JSON

inline nlohmann::json to_json(const ModelConfig& m) {
  return {{"vocab_size", m.vocab_size},
          {"dim", m.dim},
          {"depth", m.depth},
          {"max_seq_len", m.max_seq_len},
          {"light_only", m.light_only},
          {"light_heads", m.light_heads},
          {"light_dim_head", m.light_dim_head},
          {"light_window_size", m.light_window_size},
          {"heavy_heads", m.heavy_heads},
          {"heavy_dim_head", m.heavy_dim_head},
          {"heavy_window_size", m.heavy_window_size},
          {"num_heavy_tokens_q", m.num_heavy_tokens_q},
          {"num_heavy_tokens_kv", m.num_heavy_tokens_kv},
          {"num_routed_kv", m.num_routed_kv},
          {"light_ff_mult", m.light_ff_mult},
          {"heavy_ff_mult", m.heavy_ff_mult},
          {"num_heavy_ff_tokens", m.num_heavy_ff_tokens},
          {"cosine_sim_routing", m.cosine_sim_routing},
          {"cosine_sim_scale", m.cosine_sim_scale},
          {"router_eps", m.router_eps},
          {"router_eps_init", m.router_eps_init},
          {"router_eps_decay", m.router_eps_decay},
          {"router_n_iters", m.router_n_iters},
          {"router_fetch_k_ratio", m.router_fetch_k_ratio}};
}

template <typename T>
void read_key(const nlohmann::json& j, const char* key, T& out) {
  if (j.contains(key)) out = j.at(key).get<T>();
}

inline ModelConfig model_from_json(const nlohmann::json& j) {
  ModelConfig m;
  read_key(j, "vocab_size", m.vocab_size);
  read_key(j, "dim", m.dim);
  read_key(j, "depth", m.depth);
  read_key(j, "max_seq_len", m.max_seq_len);
  read_key(j, "light_only", m.light_only);
  read_key(j, "light_heads", m.light_heads);
  read_key(j, "light_dim_head", m.light_dim_head);
  read_key(j, "light_window_size", m.light_window_size);
  read_key(j, "heavy_heads", m.heavy_heads);
  read_key(j, "heavy_dim_head", m.heavy_dim_head);
  read_key(j, "heavy_window_size", m.heavy_window_size);
  read_key(j, "num_heavy_tokens_q", m.num_heavy_tokens_q);
  read_key(j, "num_heavy_tokens_kv", m.num_heavy_tokens_kv);
  read_key(j, "num_routed_kv", m.num_routed_kv);
  read_key(j, "light_ff_mult", m.light_ff_mult);
  read_key(j, "heavy_ff_mult", m.heavy_ff_mult);
  read_key(j, "num_heavy_ff_tokens", m.num_heavy_ff_tokens);
  read_key(j, "cosine_sim_routing", m.cosine_sim_routing);
  read_key(j, "cosine_sim_scale", m.cosine_sim_scale);
  read_key(j, "router_eps", m.router_eps);
  read_key(j, "router_eps_init", m.router_eps_init);
  read_key(j, "router_eps_decay", m.router_eps_decay);
  read_key(j, "router_n_iters", m.router_n_iters);
  read_key(j, "router_fetch_k_ratio", m.router_fetch_k_ratio);
  return m;
}

inline nlohmann::json to_json(const TrainConfig& t) {
  return {{"data", t.data},
          {"train_frac", t.train_frac},
          {"valid_frac", t.valid_frac},
          {"seq_len", t.seq_len},
          {"batch_size", t.batch_size},
          {"grad_accum", t.grad_accum},
          {"steps", t.steps},
          {"lr", t.lr},
          {"min_lr_ratio", t.min_lr_ratio},
          {"warmup", t.warmup},
          {"weight_decay", t.weight_decay},
          {"beta1", t.beta1},
          {"beta2", t.beta2},
          {"grad_clip", t.grad_clip},
          {"eval_every", t.eval_every},
          {"eval_batches", t.eval_batches},
          {"save_every", t.save_every},
          {"log_every", t.log_every},
          {"seed", t.seed},
          {"device", t.device},
          {"amp", t.amp},
          {"task_keys", t.task_keys},
          {"task_values", t.task_values},
          {"task_filler", t.task_filler},
          {"task_pairs", t.task_pairs},
          {"task_eval_size", t.task_eval_size},
          {"lm_weight", t.lm_weight}};
}

inline TrainConfig train_from_json(const nlohmann::json& j) {
  TrainConfig t;
  read_key(j, "data", t.data);
  read_key(j, "train_frac", t.train_frac);
  read_key(j, "valid_frac", t.valid_frac);
  read_key(j, "seq_len", t.seq_len);
  read_key(j, "batch_size", t.batch_size);
  read_key(j, "grad_accum", t.grad_accum);
  read_key(j, "steps", t.steps);
  read_key(j, "lr", t.lr);
  read_key(j, "min_lr_ratio", t.min_lr_ratio);
  read_key(j, "warmup", t.warmup);
  read_key(j, "weight_decay", t.weight_decay);
  read_key(j, "beta1", t.beta1);
  read_key(j, "beta2", t.beta2);
  read_key(j, "grad_clip", t.grad_clip);
  read_key(j, "eval_every", t.eval_every);
  read_key(j, "eval_batches", t.eval_batches);
  read_key(j, "save_every", t.save_every);
  read_key(j, "log_every", t.log_every);
  read_key(j, "seed", t.seed);
  read_key(j, "device", t.device);
  read_key(j, "amp", t.amp);
  read_key(j, "task_keys", t.task_keys);
  read_key(j, "task_values", t.task_values);
  read_key(j, "task_filler", t.task_filler);
  read_key(j, "task_pairs", t.task_pairs);
  read_key(j, "task_eval_size", t.task_eval_size);
  read_key(j, "lm_weight", t.lm_weight);
  return t;
}

}  // namespace app
}  // namespace colt5
