// Training and evaluation of the `colt5` program's model: AdamW with linear
// warm-up then cosine decay, gradient clipping and accumulation, bf16
// autocast on CUDA, periodic validation, metrics CSV, SVG plot, atomic
// checkpoints and exact resumption.
#pragma once

#include <torch/torch.h>
#include <ATen/autocast_mode.h>

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <limits>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "checkpoint.h"
#include "config.h"
#include "data.h"
#include "model.h"
#include "plot.h"

namespace colt5 {
namespace app {

// bf16 autocast for CUDA for the lifetime of the guard (no-op when off).
class AutocastGuard {
 public:
  explicit AutocastGuard(bool on) : on_(on) {
    if (!on_) return;
    prev_enabled_ = compat::autocast_enabled(at::kCUDA);
    prev_dtype_ = compat::autocast_dtype(at::kCUDA);
    compat::set_autocast(at::kCUDA, true, at::kBFloat16);
    at::autocast::increment_nesting();
  }
  ~AutocastGuard() {
    if (!on_) return;
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    compat::set_autocast(at::kCUDA, prev_enabled_, prev_dtype_);
  }
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;

 private:
  bool on_;
  bool prev_enabled_ = false;
  at::ScalarType prev_dtype_ = at::kBFloat16;
};

inline torch::Device parse_device(const std::string& name) {
  if (name == "cpu") return torch::kCPU;
  if (name == "cuda") {
    if (!torch::cuda::is_available()) throw UsageError("--device cuda: no CUDA device is available to this LibTorch");
    return torch::Device(torch::kCUDA, 0);
  }
  throw UsageError("--device must be cpu or cuda, got '" + name + "'");
}

inline std::string device_description(const torch::Device& d) {
  if (d.is_cuda()) {
    std::ostringstream o;
    o << "cuda:" << static_cast<int>(d.index()) << " (" << static_cast<int>(torch::cuda::device_count()) << " visible)";
    return o.str();
  }
  std::ostringstream o;
  o << "cpu (" << at::get_num_threads() << " threads)";
  return o.str();
}

inline double learning_rate(const TrainConfig& t, int64_t step) {
  if (t.warmup > 0 && step <= t.warmup) return t.lr * static_cast<double>(step) / static_cast<double>(t.warmup);
  const double span = static_cast<double>(std::max<int64_t>(1, t.steps - t.warmup));
  const double progress = std::min(1.0, static_cast<double>(step - t.warmup) / span);
  const double min_lr = t.lr * t.min_lr_ratio;
  return min_lr + (t.lr - min_lr) * 0.5 * (1.0 + std::cos(M_PI * progress));
}

inline std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  long s = static_cast<long>(seconds + 0.5);
  char buf[32];
  if (s >= 3600)
    std::snprintf(buf, sizeof buf, "%ld:%02ld:%02ld", s / 3600, (s / 60) % 60, s % 60);
  else
    std::snprintf(buf, sizeof buf, "%ld:%02ld", s / 60, s % 60);
  return buf;
}

// What the model learns from: the retrieval task or a text file.
class Workload {
 public:
  Workload(const TrainConfig& t, const ModelConfig& m, int64_t max_text_bytes = 0) : t_(t) {
    if (app::is_task(t))
      task_ = std::make_unique<RetrievalTask>(t, m);
    else
      text_ = std::make_unique<TextData>(t, max_text_bytes);
  }
  bool is_task() const { return task_ != nullptr; }
  Batch train_batch(int64_t step, int64_t micro) const {
    return task_ ? task_->train_batch(t_.seed, step, micro) : text_->train_batch(t_.seed, step, micro);
  }
  const RetrievalTask* task() const { return task_.get(); }
  const TextData* text() const { return text_.get(); }

 private:
  TrainConfig t_;
  std::unique_ptr<RetrievalTask> task_;
  std::unique_ptr<TextData> text_;
};

// Loss of one batch (mean cross-entropy in nats) and, for the task, the count
// of correctly predicted values.
struct BatchLoss {
  torch::Tensor loss;
  int64_t correct = 0;
  int64_t count = 0;
};

inline BatchLoss batch_loss(LanguageModel& model, const Batch& batch, bool task, double lm_weight, bool want_correct) {
  BatchLoss out;
  if (task) {
    const int64_t n = batch.tokens.size(1);
    torch::Tensor h = model->hidden(batch.tokens);
    torch::Tensor last = model->logits(h.select(1, n - 1)).to(torch::kFloat);
    out.loss = torch::nn::functional::cross_entropy(last, batch.targets);
    if (lm_weight > 0) {
      torch::Tensor lm = model->logits(h.narrow(1, 0, n - 1)).to(torch::kFloat);
      out.loss =
          out.loss + lm_weight * torch::nn::functional::cross_entropy(lm.reshape({-1, lm.size(-1)}),
                                                                      batch.tokens.narrow(1, 1, n - 1).reshape({-1}));
    }
    if (want_correct) out.correct = last.argmax(-1).eq(batch.targets).sum().item<int64_t>();
    out.count = batch.targets.size(0);
  } else {
    torch::Tensor logits = model->forward(batch.tokens).to(torch::kFloat);
    out.loss = torch::nn::functional::cross_entropy(logits.reshape({-1, logits.size(-1)}), batch.targets.reshape({-1}));
    out.count = batch.targets.numel();
  }
  return out;
}

struct EvalResult {
  double loss = std::numeric_limits<double>::quiet_NaN();
  double bpc = std::numeric_limits<double>::quiet_NaN();       // text: bits per byte
  double accuracy = std::numeric_limits<double>::quiet_NaN();  // task: fraction of values right
  int64_t count = 0;                                           // sequences (task) or predicted bytes (text)
};

// count: text windows to use (<= 0: the whole split); ignored for the task.
inline EvalResult evaluate(LanguageModel& model, const Workload& w, const TrainConfig& t, const std::string& split,
                           int64_t count, const torch::Device& device) {
  torch::NoGradGuard no_grad;
  const bool was_training = model->is_training();
  model->eval();
  AutocastGuard autocast(device.is_cuda() && t.amp);
  EvalResult r;
  double loss_sum = 0;
  int64_t correct = 0, n = 0;
  auto run = [&](const Batch& b) {
    Batch d{b.tokens.to(device), b.targets.to(device)};
    BatchLoss bl = batch_loss(model, d, w.is_task(), 0.0, true);
    loss_sum += bl.loss.item<double>() * static_cast<double>(bl.count);
    correct += bl.correct;
    n += bl.count;
  };
  if (w.is_task()) {
    Batch all = w.task()->eval_set(split);
    for (int64_t i = 0; i < all.tokens.size(0); i += t.batch_size) {
      const int64_t len = std::min(t.batch_size, all.tokens.size(0) - i);
      run(Batch{all.tokens.narrow(0, i, len), all.targets.narrow(0, i, len)});
    }
    r.accuracy = static_cast<double>(correct) / static_cast<double>(n);
  } else {
    for (const auto& b : w.text()->eval_batches(split, count)) run(b);
  }
  r.loss = loss_sum / static_cast<double>(n);
  r.bpc = r.loss / std::log(2.0);
  r.count = n;
  if (was_training) model->train();
  return r;
}

// One row of metrics.csv; NaN fields are written empty.
struct MetricsRow {
  int64_t step = 0;
  double lr = NAN, train_loss = NAN, valid_loss = NAN, valid_bpc = NAN, valid_accuracy = NAN, tokens_per_s = NAN,
         elapsed_s = NAN;
};

inline const char* kMetricsHeader = "step,lr,train_loss,valid_loss,valid_bpc,valid_accuracy,tokens_per_s,elapsed_s";

inline std::string csv_field(double v) { return std::isfinite(v) ? fmt(v, "%.6g") : ""; }

inline std::string to_csv(const MetricsRow& r) {
  return std::to_string(r.step) + "," + csv_field(r.lr) + "," + csv_field(r.train_loss) + "," +
         csv_field(r.valid_loss) + "," + csv_field(r.valid_bpc) + "," + csv_field(r.valid_accuracy) + "," +
         csv_field(r.tokens_per_s) + "," + csv_field(r.elapsed_s);
}

inline std::vector<MetricsRow> read_metrics(const std::string& path) {
  std::vector<MetricsRow> rows;
  std::ifstream in(path);
  std::string line;
  if (!std::getline(in, line)) return rows;
  while (std::getline(in, line)) {
    std::vector<std::string> f;
    std::stringstream ss(line);
    std::string cell;
    while (std::getline(ss, cell, ',')) f.push_back(cell);
    while (f.size() < 8) f.emplace_back();
    auto num = [](const std::string& s) { return s.empty() ? NAN : std::stod(s); };
    try {
      MetricsRow r;
      r.step = std::stoll(f[0]);
      r.lr = num(f[1]);
      r.train_loss = num(f[2]);
      r.valid_loss = num(f[3]);
      r.valid_bpc = num(f[4]);
      r.valid_accuracy = num(f[5]);
      r.tokens_per_s = num(f[6]);
      r.elapsed_s = num(f[7]);
      rows.push_back(r);
    } catch (const std::exception&) {
      // A line cut short by a kill: ignored.
    }
  }
  return rows;
}

inline void write_plot(const std::string& path, const std::vector<MetricsRow>& rows, bool task) {
  Series train{"train loss", "#1f77b4", {}}, valid{"valid loss", "#d62728", {}},
      acc{"valid accuracy", "#2ca02c", {}, true};
  for (const auto& r : rows) {
    if (std::isfinite(r.train_loss)) train.points.emplace_back(r.step, r.train_loss);
    if (std::isfinite(r.valid_loss)) valid.points.emplace_back(r.step, r.valid_loss);
    if (std::isfinite(r.valid_accuracy)) acc.points.emplace_back(r.step, r.valid_accuracy);
  }
  std::vector<Series> s{train, valid};
  if (task) s.push_back(acc);
  write_file_atomic(path, render_svg(task ? "colt5: retrieval task" : "colt5: byte-level language model", s));
}

struct TrainOptions {
  std::string out_dir = "colt5-run";
  std::string resume;          // checkpoint or run directory; empty: start fresh
  bool interactive = false;    // live progress bar instead of log lines
  bool quiet = false;          // no output at all (tests)
  int64_t max_text_bytes = 0;  // > 0: use only the first bytes of --data (tests)
  int keep_checkpoints = 2;
};

struct TrainResult {
  int64_t step = 0;
  EvalResult first_valid;  // at the first evaluation of this run
  EvalResult last_valid;
  std::string checkpoint;
  std::string run_dir;
  double seconds = 0;
};

class Trainer {
 public:
  Trainer(ModelConfig m, TrainConfig t, TrainOptions o) : m_(std::move(m)), t_(std::move(t)), o_(std::move(o)) {}

  TrainResult run(std::ostream& os = std::cout) {
    int64_t start_step = 0;
    nlohmann::json resumed_state = nlohmann::json::object();
    std::string resume_ckpt;
    if (!o_.resume.empty()) {
      CheckpointInfo info = read_checkpoint_info(o_.resume);
      resume_ckpt = info.dir;
      start_step = info.step;
      resumed_state = info.state;
    }
    if (is_task(t_)) m_.vocab_size = task_vocab(t_);
    m_.max_seq_len = std::max(m_.max_seq_len, t_.seq_len);
    validate(t_, m_);
    const torch::Device device = parse_device(t_.device);
    Workload work(t_, m_, o_.max_text_bytes);

    torch::manual_seed(t_.seed);
    LanguageModel model(m_);
    model->to(device);
    model->train();

    std::vector<torch::Tensor> decay, no_decay;
    for (const auto& p : model->named_parameters()) {
      if (!p.value().requires_grad()) continue;
      const bool is_matrix =
          p.value().dim() == 2 && p.key().size() > 7 && p.key().rfind(".weight") == p.key().size() - 7;
      (is_matrix ? decay : no_decay).push_back(p.value());
    }
    auto base = torch::optim::AdamWOptions(t_.lr).betas({t_.beta1, t_.beta2}).weight_decay(t_.weight_decay);
    std::vector<torch::optim::OptimizerParamGroup> groups;
    groups.emplace_back(decay, std::make_unique<torch::optim::AdamWOptions>(base));
    groups.emplace_back(
        no_decay, std::make_unique<torch::optim::AdamWOptions>(torch::optim::AdamWOptions(base).weight_decay(0.0)));
    torch::optim::AdamW opt(groups, base);

    if (!resume_ckpt.empty()) {
      load_model_tensors(*model, resume_ckpt + "/model.safetensors");
      load_optimizer(resume_ckpt + "/optimizer.safetensors", *model, opt);
    }

    if (start_step == 0 && is_directory(o_.out_dir) && !list_checkpoints(o_.out_dir).empty())
      throw UsageError("run directory '" + o_.out_dir + "' already holds checkpoints (newest " +
                       list_checkpoints(o_.out_dir).back() + "); continue with --resume " + o_.out_dir +
                       " or choose another --out");
    make_dirs(o_.out_dir);
    const std::string metrics_path = o_.out_dir + "/metrics.csv", plot_path = o_.out_dir + "/loss.svg";
    std::vector<MetricsRow> rows;
    if (start_step > 0) {
      for (const auto& r : read_metrics(metrics_path))
        if (r.step <= start_step) rows.push_back(r);
    }
    {
      std::ostringstream csv;
      csv << kMetricsHeader << "\n";
      for (const auto& r : rows) csv << to_csv(r) << "\n";
      write_file_atomic(metrics_path, csv.str());
    }
    std::ofstream metrics(metrics_path, std::ios::app);

    const int64_t end_step = t_.stop_after > 0 ? std::min(t_.stop_after, t_.steps) : t_.steps;
    const double prior_elapsed = resumed_state.value("elapsed_s", 0.0);
    const int64_t tokens_per_step = t_.batch_size * t_.seq_len * t_.grad_accum;

    if (!o_.quiet) {
      os << "colt5 train: " << (work.is_task() ? "retrieval task" : "text '" + t_.data + "'") << ", "
         << (m_.light_only ? "light-only" : "routed") << " model, " << count_parameters(*model)
         << " parameters, device " << device_description(device) << "\n";
      if (work.is_task())
        os << "  task: " << t_.seq_len << " tokens, " << t_.task_pairs << " key/value pair(s) in positions [0, "
           << task_pair_region(t_, m_) << "), query at " << t_.seq_len - 1 << "; light window " << m_.light_window_size
           << " (reaches back at most " << 2 * m_.light_window_size << "); chance "
           << fmt(1.0 / static_cast<double>(t_.task_values), "%.3f") << "\n";
      else
        os << "  splits: train " << work.text()->size("train") << ", valid " << work.text()->size("valid") << ", test "
           << work.text()->size("test") << " bytes\n";
      if (start_step > 0) os << "  resumed from " << resume_ckpt << " at step " << start_step << "\n";
      os.flush();
    }

    TrainResult result;
    result.run_dir = o_.out_dir;
    result.step = start_step;
    const auto t0 = std::chrono::steady_clock::now();
    auto since = [](std::chrono::steady_clock::time_point a) {
      return std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count();
    };
    auto last_log = t0;
    double loss_acc = 0;
    int64_t loss_n = 0, tokens_since_log = 0;
    bool first_eval = true;
    std::vector<torch::Tensor> params = model->parameters();
    double tok_rate = NAN;

    for (int64_t step = start_step + 1; step <= end_step; ++step) {
      const double lr = learning_rate(t_, step);
      for (auto& g : opt.param_groups()) static_cast<torch::optim::AdamWOptions&>(g.options()).lr(lr);
      opt.zero_grad();
      double step_loss = 0;
      for (int64_t micro = 0; micro < t_.grad_accum; ++micro) {
        Batch b = work.train_batch(step, micro);
        Batch d{b.tokens.to(device), b.targets.to(device)};
        torch::Tensor loss;
        {
          AutocastGuard autocast(device.is_cuda() && t_.amp);
          loss = batch_loss(model, d, work.is_task(), t_.lm_weight, false).loss / static_cast<double>(t_.grad_accum);
        }
        loss.backward();
        step_loss += loss.item<double>();
      }
      if (!std::isfinite(step_loss))
        throw std::runtime_error("training diverged: loss is " + fmt(step_loss) + " at step " + std::to_string(step) +
                                 "; try a lower --lr");
      if (t_.grad_clip > 0) torch::nn::utils::clip_grad_norm_(params, t_.grad_clip);
      opt.step();
      result.step = step;
      loss_acc += step_loss;
      ++loss_n;
      tokens_since_log += tokens_per_step;

      const bool last = step == end_step;
      const bool do_eval = step % t_.eval_every == 0 || last;
      const bool do_log = step % t_.log_every == 0 || last || do_eval;
      const double elapsed = since(t0);
      const double left = elapsed / static_cast<double>(step - start_step) * static_cast<double>(end_step - step);
      if (do_log || o_.interactive) {
        const double dt = since(last_log);
        if (do_log && dt > 0) tok_rate = static_cast<double>(tokens_since_log) / dt;
      }
      if (o_.interactive && !o_.quiet) {
        const int width = 24;
        const int filled = static_cast<int>(width * static_cast<double>(step) / static_cast<double>(t_.steps));
        std::string bar(static_cast<size_t>(filled), '#');
        bar.resize(width, '.');
        const double live_rate = static_cast<double>((step - start_step) * tokens_per_step) / std::max(elapsed, 1e-9);
        char buf[200];
        std::snprintf(buf, sizeof buf, "\r\033[K[%s] step %lld/%lld  loss %.4f  %.0f tok/s  %s left", bar.c_str(),
                      static_cast<long long>(step), static_cast<long long>(t_.steps), step_loss, live_rate,
                      format_duration(left).c_str());
        os << buf;
        os.flush();
      }
      MetricsRow row;
      row.step = step;
      row.lr = lr;
      row.elapsed_s = prior_elapsed + elapsed;
      if (do_log) {
        row.train_loss = loss_acc / static_cast<double>(loss_n);
        row.tokens_per_s = tok_rate;
        if (!o_.interactive && !o_.quiet) {
          char buf[200];
          std::snprintf(buf, sizeof buf, "step %lld/%lld  loss %.4f  lr %.2e  %.0f tok/s  elapsed %s  left %s",
                        static_cast<long long>(step), static_cast<long long>(t_.steps), row.train_loss, lr, tok_rate,
                        format_duration(elapsed).c_str(), format_duration(left).c_str());
          os << buf << "\n";
          os.flush();
        }
        loss_acc = 0;
        loss_n = 0;
        tokens_since_log = 0;
        last_log = std::chrono::steady_clock::now();
      }
      if (do_eval) {
        EvalResult ev = evaluate(model, work, t_, "valid", t_.eval_batches * t_.batch_size, device);
        if (first_eval) result.first_valid = ev;
        first_eval = false;
        result.last_valid = ev;
        row.valid_loss = ev.loss;
        if (work.is_task())
          row.valid_accuracy = ev.accuracy;
        else
          row.valid_bpc = ev.bpc;
        if (!o_.quiet) {
          if (o_.interactive) os << "\r\033[K";
          char buf[200];
          if (work.is_task())
            std::snprintf(buf, sizeof buf, "eval step %lld: valid loss %.4f  accuracy %.3f (%lld held-out sequences)",
                          static_cast<long long>(step), ev.loss, ev.accuracy, static_cast<long long>(ev.count));
          else
            std::snprintf(buf, sizeof buf, "eval step %lld: valid loss %.4f  bits/char %.4f",
                          static_cast<long long>(step), ev.loss, ev.bpc);
          os << buf << "\n";
          os.flush();
        }
        // The eval pass does not count towards the training rate.
        last_log = std::chrono::steady_clock::now();
      }
      if (do_log || do_eval) {
        rows.push_back(row);
        metrics << to_csv(row) << "\n";
        metrics.flush();
      }
      if (step % t_.save_every == 0 || last) {
        nlohmann::json state{{"seed", t_.seed},
                             {"data_position", step},
                             {"tokens_seen", step * tokens_per_step},
                             {"elapsed_s", prior_elapsed + since(t0)}};
        result.checkpoint = save_checkpoint(o_.out_dir, step, *model, &opt, m_, t_, state, o_.keep_checkpoints);
        write_plot(plot_path, rows, work.is_task());
      }
    }
    if (end_step <= start_step && !o_.quiet)
      os << "nothing to do: the checkpoint is at step " << start_step << ", --steps is " << t_.steps << "\n";
    result.seconds = since(t0);
    if (!o_.quiet && result.step > start_step) {
      os << "done: " << result.step - start_step << " steps in " << format_duration(result.seconds) << "; ";
      if (work.is_task())
        os << "valid accuracy " << fmt(result.last_valid.accuracy, "%.3f");
      else
        os << "valid loss " << fmt(result.last_valid.loss, "%.4f") << ", bits/char "
           << fmt(result.last_valid.bpc, "%.4f");
      os << "\n  checkpoint " << result.checkpoint << "\n  metrics " << metrics_path << "\n  plot " << plot_path
         << "\n";
    }
    return result;
  }

 private:
  ModelConfig m_;
  TrainConfig t_;
  TrainOptions o_;
};

// A model loaded from a checkpoint, ready for eval or sampling.
struct LoadedModel {
  CheckpointInfo info;
  LanguageModel model{nullptr};
  torch::Device device = torch::kCPU;
};

inline LoadedModel load_model(const std::string& ckpt, const std::string& device_name) {
  LoadedModel lm;
  lm.info = read_checkpoint_info(ckpt);
  validate(lm.info.model);
  lm.device = parse_device(device_name);
  lm.model = LanguageModel(lm.info.model);
  load_model_tensors(*lm.model, lm.info.dir + "/model.safetensors");
  lm.model->to(lm.device);
  lm.model->eval();
  return lm;
}

}  // namespace app
}  // namespace colt5
