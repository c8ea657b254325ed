#include "program/train.h"

#include <torch/torch.h>
#include <torch/version.h>
#include <ATen/autocast_mode.h>
#ifdef COLT5_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <exception>
#include <sstream>

#include "colt5/cuda_graph.h"
#include "colt5/compat.h"
#include "program/plot.h"

namespace colt5 {
namespace app {

// ------------------------------------------------------------------ pieces

namespace {

bool cuda_autocast_enabled() { return compat::autocast_enabled(at::kCUDA); }
at::ScalarType cuda_autocast_dtype() { return compat::autocast_dtype(at::kCUDA); }
void set_cuda_autocast(bool enabled, at::ScalarType dtype) { compat::set_autocast(at::kCUDA, enabled, dtype); }

const char* kMetricsHeader = "step,lr,train_loss,valid_loss,valid_bpc,valid_accuracy,tokens_per_s,elapsed_s";

std::string csv_field(double v) { return std::isfinite(v) ? fmt(v, "%.6g") : ""; }

void write_plot(const std::string& path, const std::vector<MetricsRow>& rows, bool task) {
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

// Loss of one batch (mean cross-entropy in nats) and, for the task, the count
// of correctly predicted values.
struct BatchLoss {
  torch::Tensor loss;
  int64_t correct = 0;
  int64_t count = 0;
};

BatchLoss batch_loss(LanguageModel& model, const Batch& batch, bool task, double lm_weight, bool want_correct) {
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

}  // namespace

AutocastGuard::AutocastGuard(bool on) : on_(on) {
  if (!on_) return;
  prev_enabled_ = cuda_autocast_enabled();
  prev_dtype_ = cuda_autocast_dtype();
  set_cuda_autocast(true, at::kBFloat16);
  at::autocast::increment_nesting();
}

AutocastGuard::~AutocastGuard() {
  if (!on_) return;
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  set_cuda_autocast(prev_enabled_, prev_dtype_);
}

torch::Device parse_device(const std::string& name) {
  if (name == "cpu") return torch::kCPU;
  if (name == "cuda") {
    if (!torch::cuda::is_available()) throw UsageError("--device cuda: no CUDA device is available to this LibTorch");
    return torch::Device(torch::kCUDA, 0);
  }
  throw UsageError("--device must be cpu or cuda, got '" + name + "'");
}

std::string device_description(const torch::Device& d) {
  std::ostringstream o;
  if (d.is_cuda())
    o << "cuda:" << static_cast<int>(d.index()) << " (" << static_cast<int>(torch::cuda::device_count()) << " visible)";
  else
    o << "cpu (" << at::get_num_threads() << " threads)";
  return o.str();
}

double learning_rate(const TrainConfig& t, int64_t step) {
  if (t.warmup > 0 && step <= t.warmup) return t.lr * static_cast<double>(step) / static_cast<double>(t.warmup);
  const double span = static_cast<double>(std::max<int64_t>(1, t.steps - t.warmup));
  const double progress = std::min(1.0, static_cast<double>(step - t.warmup) / span);
  const double min_lr = t.lr * t.min_lr_ratio;
  return min_lr + (t.lr - min_lr) * 0.5 * (1.0 + std::cos(M_PI * progress));
}

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  long s = static_cast<long>(seconds + 0.5);
  char buf[32];
  if (s >= 3600)
    std::snprintf(buf, sizeof buf, "%ld:%02ld:%02ld", s / 3600, (s / 60) % 60, s % 60);
  else
    std::snprintf(buf, sizeof buf, "%ld:%02ld", s / 60, s % 60);
  return buf;
}

Workload::Workload(const TrainConfig& t, const ModelConfig& m, int64_t max_text_bytes) : t_(t) {
  if (app::is_task(t))
    task_ = std::make_unique<RetrievalTask>(t, m);
  else
    text_ = std::make_unique<TextData>(t, max_text_bytes);
}

Batch Workload::train_batch(int64_t step, int64_t micro) const {
  Batch b = task_ ? task_->train_batch(t_.seed, step, micro) : text_->train_batch(t_.seed, step, micro);
  if (world_ > 1) {
    const int64_t rows = b.tokens.size(0) / world_;
    b.tokens = b.tokens.narrow(0, rank_ * rows, rows);
    b.targets = b.targets.narrow(0, rank_ * rows, rows);
  }
  return b;
}

EvalResult evaluate(LanguageModel& model, const Workload& w, const TrainConfig& t, const std::string& split,
                    int64_t count, const torch::Device& device, int rank, int world) {
  torch::NoGradGuard no_grad;
  const bool was_training = model->is_training();
  model->eval();
  AutocastGuard autocast(device.is_cuda() && t.amp);
  EvalResult r;
  double loss_sum = 0;
  int64_t correct = 0, n = 0, index = 0;
  auto run = [&](const Batch& b) {
    if (index++ % world != rank) return;
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
    r.accuracy = n > 0 ? static_cast<double>(correct) / static_cast<double>(n) : NAN;
  } else {
    for (const auto& b : w.text()->eval_batches(split, count)) run(b);
  }
  r.loss = n > 0 ? loss_sum / static_cast<double>(n) : NAN;
  r.bpc = r.loss / std::log(2.0);
  r.count = n;
  if (was_training) model->train();
  return r;
}

// ------------------------------------------------------------------ metrics

std::string to_csv(const MetricsRow& r) {
  return std::to_string(r.step) + "," + csv_field(r.lr) + "," + csv_field(r.train_loss) + "," +
         csv_field(r.valid_loss) + "," + csv_field(r.valid_bpc) + "," + csv_field(r.valid_accuracy) + "," +
         csv_field(r.tokens_per_s) + "," + csv_field(r.elapsed_s);
}

std::vector<MetricsRow> read_metrics(const std::string& path) {
  std::vector<MetricsRow> rows;
  if (!path_exists(path)) return rows;
  std::stringstream in(read_text(path, kMaxMetricsBytes, "metrics file"));
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
      // A line cut short by a kill: skipped.
    }
  }
  return rows;
}

// ------------------------------------------------------------------ trainer

void check_cuda_graph(const TrainConfig& t, const TrainOptions& o) {
  if (!o.cuda_graph) return;
  if (t.device != "cuda")
    throw UsageError("--cuda-graph replays the training step from a CUDA graph: it needs --device cuda");
#ifndef COLT5_WITH_CUDA
  throw UsageError("--cuda-graph needs colt5 built with CUDA");
#endif
  if (t.grad_accum != 1)
    throw UsageError("--cuda-graph captures one micro-batch's forward and backward: use --grad-accum 1 (got " +
                     std::to_string(t.grad_accum) + "), with a larger --batch if it fits");
  if (o.dist.nproc > 1 || o.dist.world_size > 1 || o.dist.explicit_group)
    throw UsageError("--cuda-graph runs in one process: the data-parallel all-reduce runs during the backward, "
                     "which a graph cannot hold");
}

// One training step's forward and backward, captured once in a CUDA graph and
// replayed: the batch is copied into fixed input tensors, the replay writes the
// loss and every parameter's gradient into fixed tensors (the parameters'
// .grad(), which must not be reset between steps), the optimizer steps eagerly.
struct Trainer::GraphedStep {
  torch::Tensor tokens, targets, loss;  // loss: defined once the step is captured
  std::unique_ptr<colt5::CapturedStep> graph;
};

Trainer::Trainer(ModelConfig m, TrainConfig t, TrainOptions o) : m_(std::move(m)), t_(std::move(t)), o_(std::move(o)) {}

Trainer::~Trainer() {
  // After a failure the process group's threads may still wait on a lost
  // peer: the group is left to the process's exit rather than joined here.
  if (std::uncaught_exceptions() > 0 && group_) (void)group_.release();
}

double Trainer::since_start() const { return std::chrono::duration<double>(Clock::now() - t0_).count(); }

void Trainer::setup() {
  if (!o_.resume.empty()) {
    CheckpointInfo info = read_checkpoint_info(o_.resume);
    resume_ckpt_ = info.dir;
    start_step_ = info.step;
    prior_elapsed_ = info.state.elapsed_s;
    run_id_ = info.state.run_id;
  } else {
    run_id_ = new_run_id();
  }
  if (is_task(t_)) m_.vocab_size = task_vocab(t_);
  m_.max_seq_len = std::max(m_.max_seq_len, t_.seq_len);
  validate(t_, m_);
  check_cuda_graph(t_, o_);
  device_ = parse_device(t_.device);
  const int world = static_cast<int>(std::max<int64_t>(1, o_.dist.world_size));
  if (world > 1 || o_.dist.explicit_group) {
    if (t_.batch_size % world != 0)
      throw UsageError("--batch " + std::to_string(t_.batch_size) + " (the global batch) is not divisible by the " +
                       std::to_string(world) + " processes; use a multiple of " + std::to_string(world));
    device_ = process_device(device_, o_.dist);
    group_ = ProcessGroup::join(o_.dist, device_);
    if (group_->rank() != 0) o_.quiet = true;
  }
  // Before anything is built: a run that cannot fit fails now, with the estimate.
  check_memory_fits(m_, t_.batch_size / world, t_.seq_len, true, device_.is_cuda() && t_.amp, device_,
                    "training (" + std::to_string(t_.batch_size / world) + " sequences per process and step)");
  work_ = std::make_unique<Workload>(t_, m_, o_.max_text_bytes);
  if (group_) work_->shard(group_->rank(), group_->world_size());
  // Stored as an absolute path, so evaluating from another folder finds it.
  if (!is_task(t_)) t_.data = absolute_path(t_.data);

  torch::manual_seed(t_.seed);
  model_ = LanguageModel(m_);
  model_->to(device_);
  model_->train();
  opt_ = make_optimizer(*model_, t_);
  if (!resume_ckpt_.empty()) {
    load_model_weights(*model_, resume_ckpt_ + "/model.safetensors");
    check_model_runs(*model_, resume_ckpt_ + "/model.safetensors");
    load_optimizer(resume_ckpt_ + "/optimizer.safetensors", *model_, *opt_, start_step_);
  }
  for (const auto& p : model_->parameters())
    if (p.requires_grad()) params_.push_back(p);
  if (o_.cuda_graph) graphed_ = std::make_unique<GraphedStep>();
  last_saved_ = start_step_;
  end_step_ = t_.stop_after > 0 ? std::min(t_.stop_after, t_.steps) : t_.steps;
  tokens_per_step_ = t_.batch_size * t_.seq_len * t_.grad_accum;  // global: --batch is the global batch
  if (!group_) {
    open_run_dir();
    return;
  }
  // Every process starts from rank 0's weights; rank 0 alone writes the run directory.
  std::vector<torch::Tensor> state = model_->parameters();
  for (const auto& b : model_->buffers()) state.push_back(b);
  group_->broadcast(state);
  group_->attach_gradients(params_);
  std::exception_ptr failure;
  if (is_rank0()) {
    try {
      open_run_dir();
    } catch (...) {
      failure = std::current_exception();
    }
  }
  const bool ok = group_->all(!failure);
  if (failure) std::rethrow_exception(failure);
  if (!ok)
    throw std::runtime_error("rank " + std::to_string(group_->rank()) +
                             ": rank 0 could not open the run directory (see its message)");
}

void Trainer::open_run_dir() {
  make_dirs(o_.out_dir);
  lock_ = std::make_unique<RunLock>(o_.out_dir);
  const auto existing = list_checkpoints(o_.out_dir);
  if (!existing.empty()) {
    if (start_step_ == 0)
      throw UsageError("run directory '" + o_.out_dir + "' already holds checkpoints (newest " + existing.back() +
                       "); continue with --resume " + o_.out_dir + " or choose another --out");
    const std::string other = run_id_of(o_.out_dir);
    if (other != run_id_)
      throw UsageError("run directory '" + o_.out_dir + "' holds the checkpoints of another run (run id " + other +
                       ", newest " + existing.back() + "); '" + resume_ckpt_ + "' is of run " + run_id_ +
                       "; choose another --out");
    const int64_t newest = checkpoint_step(existing.back().substr(existing.back().find_last_of('/') + 1));
    if (newest > start_step_)
      throw UsageError("run directory '" + o_.out_dir + "' holds a newer checkpoint of this run (" + existing.back() +
                       ") than the one resumed (step " + std::to_string(start_step_) +
                       "); resume from the newest or choose another --out");
  }
  metrics_path_ = o_.out_dir + "/metrics.csv";
  plot_path_ = o_.out_dir + "/loss.svg";
  if (start_step_ > 0) {
    // The rows up to the checkpoint, from this directory or (a new --out) from the checkpoint's run.
    const std::string source = existing.empty() ? parent_dir(resume_ckpt_) + "/metrics.csv" : metrics_path_;
    for (const auto& r : read_metrics(source))
      if (r.step <= start_step_) rows_.push_back(r);
  }
  std::ostringstream csv;
  csv << kMetricsHeader << "\n";
  for (const auto& r : rows_) csv << to_csv(r) << "\n";
  write_file_atomic(metrics_path_, csv.str());
  metrics_.open(metrics_path_, std::ios::app);
}

void Trainer::print_header(std::ostream& os) const {
  if (o_.quiet) return;
  os << "colt5 train: " << (work_->is_task() ? "retrieval task" : "text '" + t_.data + "'") << ", "
     << arch_name(m_.arch) << " model, " << count_parameters(*model_.ptr()) << " parameters, device "
     << device_description(device_) << "\n";
  if (work_->is_task())
    os << "  task: " << t_.seq_len << " tokens, " << t_.task_pairs << " key/value pair(s) in positions [0, "
       << task_pair_region(t_, m_) << "), query at " << t_.seq_len - 1 << "; light window "
       << m_.attn.light_window_size() << " (reaches back at most " << 2 * m_.attn.light_window_size() << "); chance "
       << fmt(1.0 / static_cast<double>(t_.task_values), "%.3f") << "\n";
  else
    os << "  splits: train " << work_->text()->size("train") << ", valid " << work_->text()->size("valid") << ", test "
       << work_->text()->size("test") << " bytes\n";
  if (group_)
    os << "  data-parallel: " << group_->world_size() << (group_->world_size() == 1 ? " process (" : " processes (")
       << group_->backend() << "), "
       << t_.batch_size / group_->world_size() << " of the " << t_.batch_size << " sequences of a batch each\n";
  if (start_step_ > 0) os << "  resumed from " << resume_ckpt_ << " at step " << start_step_ << "\n";
  os.flush();
}

double Trainer::train_step(int64_t step) {
  const double lr = learning_rate(t_, step);
  for (auto& g : opt_->param_groups()) static_cast<torch::optim::AdamWOptions&>(g.options()).lr(lr);
  double step_loss = 0;
  if (graphed_) {
    step_loss = graphed_step(step);
  } else {
    opt_->zero_grad();
    for (int64_t micro = 0; micro < t_.grad_accum; ++micro) {
      Batch b = work_->train_batch(step, micro);
      Batch d{b.tokens.to(device_), b.targets.to(device_)};
      torch::Tensor loss;
      {
        AutocastGuard autocast(device_.is_cuda() && t_.amp);
        loss = batch_loss(model_, d, work_->is_task(), t_.lm_weight, false).loss / static_cast<double>(t_.grad_accum);
      }
      // The last backward of the step all-reduces the gradient buckets as they fill.
      if (group_ && micro + 1 == t_.grad_accum) group_->arm_gradients(loss);
      loss.backward();
      step_loss += loss.item<double>();
    }
  }
  // Averaged gradients and loss: every process makes the same update.
  if (group_) step_loss = group_->finish_gradients(step_loss);
  if (!std::isfinite(step_loss))
    throw std::runtime_error("training diverged: loss is " + fmt(step_loss) + " at step " + std::to_string(step) +
                             "; try a lower --lr");
  if (t_.grad_clip > 0) torch::nn::utils::clip_grad_norm_(model_->parameters(), t_.grad_clip);
  opt_->step();
  return step_loss;
}

double Trainer::graphed_step(int64_t step) {
#ifdef COLT5_WITH_CUDA
  GraphedStep& g = *graphed_;
  Batch b = work_->train_batch(step, 0);
  auto compute = [&] {
    AutocastGuard autocast(t_.amp);
    return batch_loss(model_, Batch{g.tokens, g.targets}, work_->is_task(), t_.lm_weight, false).loss;
  };
  if (!g.loss.defined()) {
    g.tokens = b.tokens.to(device_);
    g.targets = b.targets.to(device_);
    // Warm-up on the capturing stream (lazy initializations stay out of the
    // graph), then the capture, with the gradients unset: the backward
    // allocates them in the graph's memory and every replay rewrites them.
    c10::cuda::CUDAGuard on_device(device_);
    torch::Tensor loss;
    auto unset_grads = [&] {
      for (auto& p : params_) p.mutable_grad() = torch::Tensor();
    };
    g.graph = std::make_unique<colt5::CapturedStep>(
        [&] {
          loss = compute();
          loss.backward();
        },
        2, unset_grads);
    g.loss = loss;  // the captured run's: every replay rewrites it
  } else {
    if (b.tokens.sizes() != g.tokens.sizes() || b.targets.sizes() != g.targets.sizes())
      throw std::runtime_error("--cuda-graph: batch of step " + std::to_string(step) + " has another shape than the "
                               "captured one");
    g.tokens.copy_(b.tokens);
    g.targets.copy_(b.targets);
  }
  g.graph->replay();
  return g.loss.item<double>();
#else
  (void)step;
  throw UsageError("--cuda-graph needs colt5 built with CUDA");
#endif
}

void Trainer::report_step(std::ostream& os, int64_t step, double step_loss, double lr) {
  loss_acc_ += step_loss;
  ++loss_n_;
  tokens_since_log_ += tokens_per_step_;
  const bool last = step == end_step_;
  const bool do_eval = step % t_.eval_every == 0 || last;
  const bool do_log = step % t_.log_every == 0 || last || do_eval;
  const double elapsed = since_start();
  const double left = elapsed / static_cast<double>(step - start_step_) * static_cast<double>(end_step_ - step);
  if (do_log) {
    const double dt = std::chrono::duration<double>(Clock::now() - last_log_).count();
    if (dt > 0) tok_rate_ = static_cast<double>(tokens_since_log_) / dt;
  }
  if (o_.interactive && !o_.quiet) {
    const int width = 24;
    const int filled = static_cast<int>(width * static_cast<double>(step) / static_cast<double>(t_.steps));
    std::string bar(static_cast<size_t>(std::max(0, std::min(width, filled))), '#');
    bar.resize(width, '.');
    const double live_rate = static_cast<double>((step - start_step_) * tokens_per_step_) / std::max(elapsed, 1e-9);
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
  row.elapsed_s = prior_elapsed_ + elapsed;
  if (do_log) {
    row.train_loss = loss_acc_ / static_cast<double>(loss_n_);
    row.tokens_per_s = tok_rate_;
    if (!o_.interactive && !o_.quiet) {
      char buf[200];
      std::snprintf(buf, sizeof buf, "step %lld/%lld  loss %.4f  lr %.2e  %.0f tok/s  elapsed %s  left %s",
                    static_cast<long long>(step), static_cast<long long>(t_.steps), row.train_loss, lr, tok_rate_,
                    format_duration(elapsed).c_str(), format_duration(left).c_str());
      os << buf << "\n";
      os.flush();
    }
    loss_acc_ = 0;
    loss_n_ = 0;
    tokens_since_log_ = 0;
    last_log_ = Clock::now();
  }
  if (do_eval) evaluate_now(os, step, row);
  if (do_log || do_eval) {
    rows_.push_back(row);
    if (metrics_.is_open()) {
      metrics_ << to_csv(row) << "\n";
      metrics_.flush();
    }
  }
}

void Trainer::evaluate_now(std::ostream& os, int64_t step, MetricsRow& row) {
  EvalResult ev = group_ ? evaluate(model_, *work_, t_, "valid", t_.eval_batches * t_.batch_size, device_,
                                    group_->rank(), group_->world_size())
                         : evaluate(model_, *work_, t_, "valid", t_.eval_batches * t_.batch_size, device_);
  if (group_) {
    // Each process evaluated its share of the batches: the sums over all of them.
    const double n = static_cast<double>(ev.count);
    const auto s =
        group_->sum({ev.count > 0 ? ev.loss * n : 0.0, ev.count > 0 && work_->is_task() ? ev.accuracy * n : 0.0, n});
    ev.count = static_cast<int64_t>(s[2]);
    ev.loss = s[0] / s[2];
    ev.bpc = ev.loss / std::log(2.0);
    if (work_->is_task()) ev.accuracy = s[1] / s[2];
  }
  if (first_eval_) result_.first_valid = ev;
  first_eval_ = false;
  result_.last_valid = ev;
  row.valid_loss = ev.loss;
  if (work_->is_task())
    row.valid_accuracy = ev.accuracy;
  else
    row.valid_bpc = ev.bpc;
  if (!o_.quiet) {
    if (o_.interactive) os << "\r\033[K";
    char buf[200];
    if (work_->is_task())
      std::snprintf(buf, sizeof buf, "eval step %lld: valid loss %.4f  accuracy %.3f (%lld held-out sequences)",
                    static_cast<long long>(step), ev.loss, ev.accuracy, static_cast<long long>(ev.count));
    else
      std::snprintf(buf, sizeof buf, "eval step %lld: valid loss %.4f  bits/char %.4f", static_cast<long long>(step),
                    ev.loss, ev.bpc);
    os << buf << "\n";
    os.flush();
  }
  // The eval pass does not count towards the training rate.
  last_log_ = Clock::now();
}

void Trainer::save(int64_t step) {
  last_saved_ = step;
  if (!is_rank0()) return;
  CheckpointState state;
  state.step = step;
  state.run_id = run_id_;
  state.seed = t_.seed;
  state.tokens_seen = step * tokens_per_step_;
  state.elapsed_s = prior_elapsed_ + since_start();
  result_.checkpoint = save_checkpoint(o_.out_dir, *model_, opt_.get(), m_, t_, state, o_.keep_checkpoints);
  write_plot(plot_path_, rows_, work_->is_task());
}

void Trainer::print_summary(std::ostream& os) const {
  if (o_.quiet) return;
  if (end_step_ <= start_step_) {
    os << "nothing to do: the checkpoint is at step " << start_step_ << ", --steps is " << t_.steps << "\n";
    return;
  }
  os << "done: " << result_.step - start_step_ << " steps in " << format_duration(result_.seconds) << "; ";
  if (work_->is_task())
    os << "valid accuracy " << fmt(result_.last_valid.accuracy, "%.3f");
  else
    os << "valid loss " << fmt(result_.last_valid.loss, "%.4f") << ", bits/char "
       << fmt(result_.last_valid.bpc, "%.4f");
  os << "\n  checkpoint " << result_.checkpoint << "\n  metrics " << metrics_path_ << "\n  plot " << plot_path_ << "\n";
}

TrainResult Trainer::run(std::ostream& os) {
  setup();
  print_header(os);
  result_.run_dir = o_.out_dir;
  result_.step = start_step_;
  t0_ = last_log_ = Clock::now();
  try {
    for (int64_t step = start_step_ + 1; step <= end_step_; ++step) {
      const double lr = learning_rate(t_, step);
      const double loss = train_step(step);
      result_.step = step;
      report_step(os, step, loss, lr);
      if (step % t_.save_every == 0 || step == end_step_) save(step);
    }
  } catch (const DistributedError& e) {
    throw DistributedError(std::string(e.what()) + "; " +
                           (last_saved_ > 0
                                ? "the newest checkpoint is " + o_.out_dir + "/" + checkpoint_name(last_saved_) +
                                      " (continue with --resume " + o_.out_dir + ")"
                                : std::string("no checkpoint was written")));
  }
  result_.seconds = since_start();
  print_summary(os);
  return result_;
}

std::unique_ptr<torch::optim::AdamW> make_optimizer(torch::nn::Module& model, const TrainConfig& t) {
  std::vector<torch::Tensor> decay, no_decay;
  for (const auto& p : model.named_parameters()) {
    if (!p.value().requires_grad()) continue;
    const bool is_matrix = p.value().dim() == 2 && p.key().size() > 7 && p.key().rfind(".weight") == p.key().size() - 7;
    (is_matrix ? decay : no_decay).push_back(p.value());
  }
  auto base = torch::optim::AdamWOptions(t.lr).betas({t.beta1, t.beta2}).weight_decay(t.weight_decay);
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(decay, std::make_unique<torch::optim::AdamWOptions>(base));
  groups.emplace_back(no_decay,
                      std::make_unique<torch::optim::AdamWOptions>(torch::optim::AdamWOptions(base).weight_decay(0.0)));
  return std::make_unique<torch::optim::AdamW>(groups, base);
}

LoadedModel load_model(const std::string& ckpt, const std::string& device_name) {
  LoadedModel lm;
  lm.info = read_checkpoint_info(ckpt);
  lm.device = parse_device(device_name);
  lm.model = LanguageModel(lm.info.model);
  load_model_weights(*lm.model, lm.info.dir + "/model.safetensors");
  lm.model->to(lm.device);
  lm.model->eval();
  check_model_runs(*lm.model, lm.info.dir + "/model.safetensors");
  return lm;
}

}  // namespace app
}  // namespace colt5
