#include "program/config.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <set>

namespace colt5 {
namespace app {

namespace nn = colt5::nn;

const char* arch_name(Arch a) {
  switch (a) {
    case Arch::routed:
      return "routed";
    case Arch::light_only:
      return "light-only";
    case Arch::dense:
      return "dense";
  }
  return "?";
}

nn::RouterKwargs default_router() { return nn::RouterKwargs().cosine_sim_routing(true).eps(1.0); }

ModelConfig::ModelConfig()
    : attn(nn::ConditionalRoutedAutoregressiveAttentionOptions(/*dim=*/64, /*num_heavy_tokens_q=*/64,
                                                               /*num_heavy_tokens_kv=*/64)
               .light_heads(4)
               .light_dim_head(16)
               .light_window_size(64)
               .heavy_heads(4)
               .heavy_dim_head(16)
               .router_kwargs(default_router())
               .use_flash_attn(true)),
      ff(nn::ConditionalRoutedFeedForwardOptions(/*dim=*/64, /*num_heavy_tokens=*/64)
             .light_ff_mult(0.5)
             .heavy_ff_mult(4.0)) {}

nn::ConditionalRoutedFeedForwardOptions ModelConfig::feedforward_options() const {
  return nn::ConditionalRoutedFeedForwardOptions(ff).dim(attn.dim()).router_kwargs(attn.router_kwargs());
}

bool is_task(const TrainConfig& t) { return t.data.empty(); }

int64_t task_vocab(const TrainConfig& t) { return t.task_keys + t.task_values + t.task_filler; }

int64_t task_pair_region(const TrainConfig& t, const ModelConfig& m) {
  return std::min(t.seq_len / 2, t.seq_len - 1 - 2 * m.attn.light_window_size() - 1);
}

// ------------------------------------------------------------------ tables

namespace {

// A setting stored in a member reached by `ref` (a plain member or an option's accessor).
template <typename C, typename T, typename Ref>
Setting<C> field(const char* key, const char* flag, const char* help, Ref ref, bool resumable = false,
                 bool own_flag = true, bool stored = true) {
  return Setting<C>{key,
                    flag,
                    help,
                    own_flag,
                    resumable,
                    stored,
                    SettingValue(T{}),
                    [ref](const C& c) { return SettingValue(static_cast<T>(ref(const_cast<C&>(c)))); },
                    [ref](C& c, const SettingValue& v) { ref(c) = std::get<T>(v); }};
}

#define COLT5_M(T, key, flag, help, expr, ...) \
  field<ModelConfig, T>(                       \
      key, flag, help, [](ModelConfig& c) -> T& { return expr; }, ##__VA_ARGS__)
#define COLT5_T(T, key, flag, help, ...) \
  field<TrainConfig, T>(                 \
      #key, flag, help, [](TrainConfig& c) -> T& { return c.key; }, ##__VA_ARGS__)

}  // namespace

const std::vector<Setting<ModelConfig>>& model_settings() {
  static const std::vector<Setting<ModelConfig>> table = [] {
    std::vector<Setting<ModelConfig>> s{
        COLT5_M(int64_t, "vocab_size", "the vocabulary size", "set by the task, or 256 for text", c.vocab_size, false,
                false),
        COLT5_M(int64_t, "dim", "--dim", "model width", c.attn.dim()),
        COLT5_M(int64_t, "depth", "--depth", "number of blocks", c.depth),
        COLT5_M(int64_t, "max_seq_len", "the position table's length", "set by --seq-len", c.max_seq_len, false, false),
        COLT5_M(int64_t, "light_heads", "--light-heads", "light attention heads", c.attn.light_heads()),
        COLT5_M(int64_t, "light_dim_head", "--light-dim-head", "light attention head size", c.attn.light_dim_head()),
        COLT5_M(int64_t, "light_window_size", "--window", "light branch: causal local attention window",
                c.attn.light_window_size()),
        COLT5_M(int64_t, "heavy_heads", "--heavy-heads", "heavy attention heads", c.attn.heavy_heads()),
        COLT5_M(int64_t, "heavy_dim_head", "--heavy-dim-head", "heavy attention head size", c.attn.heavy_dim_head()),
        COLT5_M(int64_t, "num_heavy_tokens_q", "--heavy-q", "queries routed to heavy attention per heavy window",
                c.attn.num_heavy_tokens_q()),
        COLT5_M(int64_t, "num_heavy_tokens_kv", "--heavy-kv", "keys/values routed from the earlier windows",
                c.attn.num_heavy_tokens_kv()),
        COLT5_M(int64_t, "num_routed_kv", "--routed-kv", "sets of routed keys/values (heavy heads split across them)",
                c.attn.num_routed_kv()),
        COLT5_M(double, "light_ff_mult", "--light-ff-mult", "light feedforward hidden size / dim",
                c.ff.light_ff_mult()),
        COLT5_M(double, "heavy_ff_mult", "--heavy-ff-mult", "heavy feedforward hidden size / dim",
                c.ff.heavy_ff_mult()),
        COLT5_M(int64_t, "num_heavy_ff_tokens", "--heavy-ff-tokens",
                "tokens per heavy window routed to the heavy feedforward", c.ff.num_heavy_tokens()),
        // The router table: every router flag and JSON key comes from these rows.
        COLT5_M(bool, "cosine_sim_routing", "--router-cosine",
                "cosine-similarity routing scores (false: dot product, the reference default)",
                c.attn.router_kwargs().cosine_sim_routing()),
        COLT5_M(double, "cosine_sim_scale", "--router-cosine-scale", "scale of the cosine-similarity scores",
                c.attn.router_kwargs().cosine_sim_scale()),
        COLT5_M(double, "router_eps", "--router-eps", "final coordinate-descent epsilon (reference default 0.03)",
                c.attn.router_kwargs().eps()),
        COLT5_M(double, "router_eps_decay", "--router-eps-decay", "epsilon decay per iteration",
                c.attn.router_kwargs().eps_decay()),
        COLT5_M(int64_t, "router_n_iters", "--router-iters", "coordinate-descent iterations",
                c.attn.router_kwargs().n_iters()),
        COLT5_M(double, "router_fetch_k_ratio", "--router-fetch-k-ratio", "coordinate descent runs with k times this",
                c.attn.router_kwargs().fetch_k_ratio()),
    };
    // Optional values of the options: 0 (heavy window) and a missing eps_init mean "same as".
    s.push_back(
        Setting<ModelConfig>{"heavy_window_size", "--heavy-window", "heavy routing window (0: same as --window)", true,
                             false, true, SettingValue(int64_t{}),
                             [](const ModelConfig& c) { return SettingValue(c.attn.heavy_window_size().value_or(0)); },
                             [](ModelConfig& c, const SettingValue& v) {
                               const int64_t w = std::get<int64_t>(v);
                               c.attn.heavy_window_size(w == 0 ? c10::optional<int64_t>() : c10::optional<int64_t>(w));
                             }});
    s.push_back(Setting<ModelConfig>{
        "router_eps_init", "--router-eps-init", "starting epsilon of eps-scaling", true, false, true,
        SettingValue(double{}),
        [](const ModelConfig& c) {
          const auto& r = c.attn.router_kwargs();
          return SettingValue(r.eps_init().value_or(r.eps()));
        },
        [](ModelConfig& c, const SettingValue& v) { c.attn.router_kwargs().eps_init(std::get<double>(v)); }});
    s.push_back(Setting<ModelConfig>{"arch", "--light-only", "routed, light-only or dense", false, false, true,
                                     SettingValue(std::string{}),
                                     [](const ModelConfig& c) { return SettingValue(std::string(arch_name(c.arch))); },
                                     [](ModelConfig& c, const SettingValue& v) {
                                       const std::string& a = std::get<std::string>(v);
                                       if (a == "routed")
                                         c.arch = Arch::routed;
                                       else if (a == "light-only")
                                         c.arch = Arch::light_only;
                                       else if (a == "dense")
                                         c.arch = Arch::dense;
                                       else
                                         throw UsageError("arch must be routed, light-only or dense, got '" + a + "'");
                                     }});
    return s;
  }();
  return table;
}

const std::vector<Setting<TrainConfig>>& train_settings() {
  static const std::vector<Setting<TrainConfig>> table{
      COLT5_T(std::string, data, "--data", "text file for a byte-level model (default: the built-in retrieval task)",
              true),
      COLT5_T(double, train_frac, "--split", "train fraction of --data", false, false),
      COLT5_T(double, valid_frac, "--split", "valid fraction of --data (the rest is test)", false, false),
      COLT5_T(int64_t, seq_len, "--seq-len", "tokens per training sequence"),
      COLT5_T(int64_t, batch_size, "--batch", "sequences per micro-batch"),
      COLT5_T(int64_t, grad_accum, "--grad-accum", "micro-batches per optimizer step"),
      COLT5_T(int64_t, steps, "--steps", "optimizer steps in total (the learning-rate schedule spans them)", true),
      COLT5_T(int64_t, stop_after, "--stop-after", "stop (with a checkpoint) after this step; 0: run all --steps", true,
              true, false),
      COLT5_T(double, lr, "--lr", "peak learning rate (AdamW)"),
      COLT5_T(double, min_lr_ratio, "--min-lr-ratio", "cosine decay ends at lr times this"),
      COLT5_T(int64_t, warmup, "--warmup", "linear warm-up steps"),
      COLT5_T(double, weight_decay, "--weight-decay", "AdamW weight decay of weight matrices"),
      COLT5_T(double, beta1, "--beta1", "AdamW beta1"),
      COLT5_T(double, beta2, "--beta2", "AdamW beta2"),
      COLT5_T(double, grad_clip, "--clip", "gradient-norm clipping (0: off)"),
      COLT5_T(int64_t, eval_every, "--eval-every", "validate every N steps (and at the end)", true),
      COLT5_T(int64_t, eval_batches, "--eval-batches", "text: validation batches per evaluation"),
      COLT5_T(int64_t, save_every, "--save-every", "checkpoint every N steps (and at the end)", true),
      COLT5_T(int64_t, log_every, "--log-every", "log line / metrics row every N steps", true),
      COLT5_T(uint64_t, seed, "--seed", "seed of initialization and training batches"),
      COLT5_T(std::string, device, "--device", "cpu or cuda", true),
      COLT5_T(bool, amp, "--no-amp", "CUDA: bf16 autocast (--no-amp: float32)", false, false),
      COLT5_T(int64_t, task_keys, "--task-keys", "task: number of distinct keys"),
      COLT5_T(int64_t, task_values, "--task-values", "task: number of distinct values (chance = 1 / this)"),
      COLT5_T(int64_t, task_filler, "--task-filler", "task: number of filler tokens"),
      COLT5_T(int64_t, task_pairs, "--task-pairs", "task: key/value pairs per sequence"),
      COLT5_T(int64_t, task_eval_size, "--task-eval-size", "task: held-out sequences per evaluation"),
      COLT5_T(double, lm_weight, "--lm-weight", "task: weight of next-token loss on the other positions"),
  };
  return table;
}

#undef COLT5_M
#undef COLT5_T

// ------------------------------------------------------------------ names

std::string SettingNames::operator()(const std::string& section_key) const {
  if (!file.empty()) return section_key;
  const auto dot = section_key.find('.');
  const std::string section = section_key.substr(0, dot), key = section_key.substr(dot + 1);
  if (section == "model") {
    for (const auto& s : model_settings())
      if (key == s.key) return s.flag;
  } else {
    for (const auto& s : train_settings())
      if (key == s.key) return s.flag;
  }
  return section_key;
}

std::string SettingNames::where(const std::string& message) const {
  return file.empty() ? message : "'" + file + "': " + message;
}

// ------------------------------------------------------------------ checks

namespace {

std::string str(int64_t v) { return std::to_string(v); }

std::string str(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

class Checker {
 public:
  explicit Checker(const SettingNames& names) : n_(names) {}
  std::string operator()(const char* key) const { return n_(key); }
  void require(bool ok, const std::string& message) const {
    if (!ok) throw UsageError(n_.where(message));
  }
  void at_least(const char* key, int64_t v, int64_t low) const {
    require(v >= low, n_(key) + " must be at least " + str(low) + ", got " + str(v));
  }
  void in_range(const char* key, double v, double low, double high, bool low_open = false) const {
    const bool ok = std::isfinite(v) && (low_open ? v > low : v >= low) && v <= high;
    require(ok, n_(key) + " must be in " + (low_open ? "(" : "[") + str(low) + ", " + str(high) + "], got " + str(v));
  }
  void positive(const char* key, double v) const {
    require(std::isfinite(v) && v > 0, n_(key) + " must be a positive number, got " + str(v));
  }

 private:
  const SettingNames& n_;
};

}  // namespace

void validate(const ModelConfig& m, const SettingNames& names) {
  Checker c(names);
  const auto& a = m.attn;
  const auto& r = a.router_kwargs();
  c.at_least("model.vocab_size", m.vocab_size, 2);
  c.at_least("model.dim", a.dim(), 1);
  c.at_least("model.depth", m.depth, 1);
  c.at_least("model.max_seq_len", m.max_seq_len, 2);
  c.at_least("model.light_heads", a.light_heads(), 1);
  c.at_least("model.light_dim_head", a.light_dim_head(), 1);
  c.at_least("model.heavy_heads", a.heavy_heads(), 1);
  c.at_least("model.heavy_dim_head", a.heavy_dim_head(), 1);
  c.at_least("model.light_window_size", a.light_window_size(), 1);
  c.at_least("model.heavy_window_size", a.heavy_window_size().value_or(0), 0);
  c.at_least("model.num_heavy_tokens_q", a.num_heavy_tokens_q(), 1);
  c.at_least("model.num_heavy_tokens_kv", a.num_heavy_tokens_kv(), 1);
  c.at_least("model.num_routed_kv", a.num_routed_kv(), 1);
  c.require(a.heavy_heads() % a.num_routed_kv() == 0, c("model.heavy_heads") + " (" + str(a.heavy_heads()) +
                                                          ") must be divisible by " + c("model.num_routed_kv") + " (" +
                                                          str(a.num_routed_kv()) + ")");
  c.at_least("model.num_heavy_ff_tokens", m.ff.num_heavy_tokens(), 1);
  c.positive("model.light_ff_mult", m.ff.light_ff_mult());
  c.positive("model.heavy_ff_mult", m.ff.heavy_ff_mult());
  c.positive("model.cosine_sim_scale", r.cosine_sim_scale());
  c.positive("model.router_eps", r.eps());
  c.positive("model.router_eps_init", r.eps_init().value_or(r.eps()));
  c.in_range("model.router_eps_decay", r.eps_decay(), 0, 1, /*low_open=*/true);
  c.at_least("model.router_n_iters", r.n_iters(), 1);
  c.require(std::isfinite(r.fetch_k_ratio()) && r.fetch_k_ratio() >= 1,
            c("model.router_fetch_k_ratio") + " must be >= 1, got " + str(r.fetch_k_ratio()));
  // Widths whose products overflow or cannot be allocated are refused before anything is built.
  const int64_t limit = int64_t{1} << 24;
  for (const char* key : {"model.vocab_size", "model.dim", "model.max_seq_len", "model.light_heads",
                          "model.light_dim_head", "model.heavy_heads", "model.heavy_dim_head"}) {
    const auto dot = std::string(key).find('.') + 1;
    for (const auto& s : model_settings())
      if (std::string(key).substr(dot) == s.key)
        c.require(std::get<int64_t>(s.get(m)) <= limit, c(key) + " must be at most " + str(limit));
  }
  c.require(m.depth <= 4096, c("model.depth") + " must be at most 4096, got " + str(m.depth));
  c.require(r.n_iters() <= 100000, c("model.router_n_iters") + " must be at most 100000");
  c.require(m.ff.light_ff_mult() <= 1024 && m.ff.heavy_ff_mult() <= 1024,
            "feedforward multipliers must be at most 1024");
}

void validate(const TrainConfig& t, const ModelConfig& m, const SettingNames& names) {
  validate(m, names);
  Checker c(names);
  c.at_least("train.seq_len", t.seq_len, 2);
  c.require(t.seq_len <= m.max_seq_len, c("train.seq_len") + " " + str(t.seq_len) +
                                            " exceeds the model's position table (" + c("model.max_seq_len") + " " +
                                            str(m.max_seq_len) + ")");
  c.require(t.seq_len > m.attn.light_window_size(),
            c("train.seq_len") + " " + str(t.seq_len) + " must be longer than the light window (" +
                c("model.light_window_size") + " " + str(m.attn.light_window_size()) + ")");
  if (m.arch == Arch::routed)
    c.require(t.seq_len > m.heavy_window(), c("train.seq_len") + " " + str(t.seq_len) +
                                                " must be longer than the heavy window (" + str(m.heavy_window()) +
                                                "): no window would have an earlier window to attend to");
  c.at_least("train.batch_size", t.batch_size, 1);
  c.at_least("train.grad_accum", t.grad_accum, 1);
  c.at_least("train.steps", t.steps, 1);
  c.at_least("train.stop_after", t.stop_after, 0);
  c.positive("train.lr", t.lr);
  c.in_range("train.min_lr_ratio", t.min_lr_ratio, 0, 1);
  c.at_least("train.warmup", t.warmup, 0);
  c.in_range("train.weight_decay", t.weight_decay, 0, 1e6);
  c.in_range("train.beta1", t.beta1, 0, 1);
  c.in_range("train.beta2", t.beta2, 0, 1);
  c.in_range("train.grad_clip", t.grad_clip, 0, 1e30);
  c.at_least("train.eval_every", t.eval_every, 1);
  c.at_least("train.save_every", t.save_every, 1);
  c.at_least("train.log_every", t.log_every, 1);
  c.at_least("train.eval_batches", t.eval_batches, 1);
  c.require(t.device == "cpu" || t.device == "cuda",
            c("train.device") + " must be cpu or cuda, got '" + t.device + "'");
  // Sizes whose products overflow are refused before anything is allocated.
  const int64_t limit = int64_t{1} << 31;
  c.require(t.seq_len <= limit && t.batch_size <= limit && t.grad_accum <= limit && t.eval_batches <= limit,
            "sequence length, batch, accumulation and evaluation batches must each be at most " + str(limit));
  c.require(t.batch_size * t.seq_len <= (int64_t{1} << 40), c("train.batch_size") + " x " + c("train.seq_len") + " = " +
                                                                str(t.batch_size * t.seq_len) +
                                                                " tokens per micro-batch is more than can fit");
  if (is_task(t)) {
    c.at_least("train.task_keys", t.task_keys, 1);
    c.at_least("train.task_values", t.task_values, 2);
    c.at_least("train.task_filler", t.task_filler, 1);
    c.require(t.task_keys <= limit && t.task_values <= limit && t.task_filler <= limit,
              "task vocabularies must each be at most " + str(limit));
    c.require(t.task_pairs >= 1 && t.task_pairs <= t.task_keys, c("train.task_pairs") + " must be between 1 and " +
                                                                    c("train.task_keys") + " (" + str(t.task_keys) +
                                                                    "), got " + str(t.task_pairs));
    c.require(m.vocab_size == task_vocab(t), c("model.vocab_size") + " (" + str(m.vocab_size) +
                                                 ") differs from the task's (" + str(task_vocab(t)) + ")");
    c.at_least("train.task_eval_size", t.task_eval_size, 1);
    c.require(t.task_eval_size <= limit, c("train.task_eval_size") + " must be at most " + str(limit));
    c.in_range("train.lm_weight", t.lm_weight, 0, 1e6);
    const int64_t region = task_pair_region(t, m);
    c.require(region >= 2 * t.task_pairs,
              c("train.seq_len") + " " + str(t.seq_len) + " is too short for the retrieval task with " +
                  c("model.light_window_size") + " " + str(m.attn.light_window_size()) + ": the " + str(t.task_pairs) +
                  " pair(s) must sit more than two light windows before the query; use at least " + c("train.seq_len") +
                  " " + str(2 * m.attn.light_window_size() + 2 + 2 * t.task_pairs + 1));
  } else {
    c.require(m.vocab_size == 256,
              "a byte-level text model needs " + c("model.vocab_size") + " 256, got " + str(m.vocab_size));
    c.require(std::isfinite(t.train_frac) && std::isfinite(t.valid_frac) && t.train_frac > 0 && t.valid_frac > 0 &&
                  t.train_frac + t.valid_frac < 1,
              c("train.train_frac") + " fractions must be positive and leave room for a test split");
  }
}

// ------------------------------------------------------------------ JSON

namespace {

template <typename C>
nlohmann::json settings_to_json(const C& c, const std::vector<Setting<C>>& table) {
  nlohmann::json j = nlohmann::json::object();
  for (const auto& s : table) {
    if (!s.stored) continue;
    std::visit([&](const auto& v) { j[s.key] = v; }, s.get(c));
  }
  return j;
}

template <typename C>
void settings_from_json(const nlohmann::json& j, const std::vector<Setting<C>>& table, const char* section,
                        const SettingNames& names, C& c, const std::set<std::string>& extra = {}) {
  auto fail = [&](const std::string& message) { throw UsageError(names.where(message)); };
  if (!j.is_object()) fail(std::string("section '") + section + "' must be a JSON object");
  std::set<std::string> known(extra);
  for (const auto& s : table) {
    if (!s.stored) continue;
    known.insert(s.key);
    const std::string name = std::string(section) + "." + s.key;
    if (!j.contains(s.key)) fail("missing setting " + name);
    const nlohmann::json& v = j.at(s.key);
    SettingValue value = s.kind;
    if (std::holds_alternative<bool>(s.kind)) {
      if (!v.is_boolean()) fail(name + " must be true or false, got " + v.dump());
      value = v.get<bool>();
    } else if (std::holds_alternative<int64_t>(s.kind)) {
      if (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        fail(name + " is out of range: " + v.dump());
      if (!v.is_number_integer()) fail(name + " must be an integer, got " + v.dump());
      value = v.get<int64_t>();
    } else if (std::holds_alternative<uint64_t>(s.kind)) {
      if (!v.is_number_unsigned()) fail(name + " must be a non-negative integer, got " + v.dump());
      value = v.get<uint64_t>();
    } else if (std::holds_alternative<double>(s.kind)) {
      if (!v.is_number()) fail(name + " must be a number, got " + v.dump());
      const double d = v.get<double>();
      if (!std::isfinite(d)) fail(name + " must be finite, got " + v.dump());
      value = d;
    } else {
      if (!v.is_string()) fail(name + " must be a string, got " + v.dump());
      value = v.get<std::string>();
    }
    try {
      s.set(c, value);
    } catch (const UsageError& e) {
      fail(name + ": " + e.what());
    }
  }
  for (const auto& item : j.items())
    if (!known.count(item.key())) fail(std::string("unknown setting ") + section + "." + item.key());
}

}  // namespace

nlohmann::json to_json(const ModelConfig& m) { return settings_to_json(m, model_settings()); }

nlohmann::json to_json(const TrainConfig& t) {
  nlohmann::json j = settings_to_json(t, train_settings());
  j["task"] = is_task(t) ? "retrieval" : "text";
  return j;
}

ModelConfig model_from_json(const nlohmann::json& j, const SettingNames& names) {
  ModelConfig m;
  settings_from_json(j, model_settings(), "model", names, m);
  return m;
}

TrainConfig train_from_json(const nlohmann::json& j, const SettingNames& names) {
  TrainConfig t;
  settings_from_json(j, train_settings(), "train", names, t, {"task"});
  const std::string task = j.contains("task") && j.at("task").is_string() ? j.at("task").get<std::string>() : "";
  if (task != "retrieval" && task != "text")
    throw UsageError(names.where("train.task must be \"retrieval\" or \"text\""));
  if ((task == "text") == t.data.empty())
    throw UsageError(names.where(task == "text" ? "train.data is empty but train.task is \"text\""
                                                : "train.data is set but train.task is \"retrieval\""));
  return t;
}

}  // namespace app
}  // namespace colt5
