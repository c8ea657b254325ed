// Training and evaluation of the `colt5` program's model: AdamW with linear
// warm-up then cosine decay, gradient clipping and accumulation, bf16
// autocast on CUDA, periodic validation, metrics CSV, SVG plot, atomic
// checkpoints and exact resumption, one process per run directory.
#pragma once

#include <torch/optim/adamw.h>
#include <torch/types.h>

#include <chrono>
#include <fstream>
#include <iostream>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "program/checkpoint.h"
#include "program/config.h"
#include "program/data.h"
#include "program/distributed.h"
#include "program/files.h"
#include "program/model.h"

namespace colt5 {
namespace app {

// bf16 autocast on CUDA for the lifetime of the guard (no-op when off).
class AutocastGuard {
 public:
  explicit AutocastGuard(bool on);
  ~AutocastGuard();
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;

 private:
  bool on_;
  bool prev_enabled_ = false;
  at::ScalarType prev_dtype_ = at::kBFloat16;
};

torch::Device parse_device(const std::string& name);
std::string device_description(const torch::Device& d);
double learning_rate(const TrainConfig& t, int64_t step);
std::string format_duration(double seconds);

// What the model learns from: the retrieval task or a text file.
class Workload {
 public:
  Workload(const TrainConfig& t, const ModelConfig& m, int64_t max_text_bytes = 0);
  bool is_task() const { return task_ != nullptr; }
  // This process's rows of the global batch of (step, micro).
  Batch train_batch(int64_t step, int64_t micro) const;
  // Data-parallel runs: process `rank` of `world` takes the rank-th of `world` equal row blocks.
  void shard(int rank, int world) {
    rank_ = rank;
    world_ = world;
  }
  const RetrievalTask* task() const { return task_.get(); }
  const TextData* text() const { return text_.get(); }

 private:
  TrainConfig t_;
  std::unique_ptr<RetrievalTask> task_;
  std::unique_ptr<TextData> text_;
  int rank_ = 0, world_ = 1;
};

struct EvalResult {
  double loss = std::numeric_limits<double>::quiet_NaN();
  double bpc = std::numeric_limits<double>::quiet_NaN();       // text: bits per byte
  double accuracy = std::numeric_limits<double>::quiet_NaN();  // task: fraction of values right
  int64_t count = 0;                                           // sequences (task) or predicted bytes (text)
};

// count: text windows to use (<= 0: the whole split); ignored for the task.
// rank/world: only every world-th batch, from the rank-th (data-parallel runs sum the results).
EvalResult evaluate(LanguageModel& model, const Workload& w, const TrainConfig& t, const std::string& split,
                    int64_t count, const torch::Device& device, int rank = 0, int world = 1);

// One row of metrics.csv; NaN fields are written empty.
struct MetricsRow {
  int64_t step = 0;
  double lr = NAN, train_loss = NAN, valid_loss = NAN, valid_bpc = NAN, valid_accuracy = NAN, tokens_per_s = NAN,
         elapsed_s = NAN;
};
std::string to_csv(const MetricsRow& r);
// Rows of a metrics file; a line cut short by a kill is skipped. A missing file gives none.
std::vector<MetricsRow> read_metrics(const std::string& path);

struct TrainOptions {
  std::string out_dir = "colt5-run";
  std::string resume;          // checkpoint or run directory; empty: start fresh
  bool interactive = false;    // live progress bar instead of log lines
  bool quiet = false;          // no output at all (tests)
  int64_t max_text_bytes = 0;  // > 0: use only the first bytes of --data (tests)
  int keep_checkpoints = 2;
  DistOptions dist;  // world_size > 1: one process of a data-parallel run (resolve_dist_options)
  bool cuda_graph = false;  // CUDA: replay each step's forward and backward from one captured CUDA graph
};

// The settings --cuda-graph needs (UsageError otherwise): CUDA, one micro-batch
// per step, one process.
void check_cuda_graph(const TrainConfig& t, const TrainOptions& o);

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
  // With o.resume, m and t are the checkpoint's settings (with the resumable ones possibly changed).
  Trainer(ModelConfig m, TrainConfig t, TrainOptions o);
  ~Trainer();
  TrainResult run(std::ostream& os = std::cout);

 private:
  using Clock = std::chrono::steady_clock;
  void setup();         // settings, checkpoint, lock, model, optimizer, metrics: everything checked first
  void open_run_dir();  // lock, refuse another run's directory, metrics.csv
  void print_header(std::ostream& os) const;
  double train_step(int64_t step);  // one optimizer step; returns its loss
  double graphed_step(int64_t step);  // --cuda-graph: the step's forward and backward from the graph
  void report_step(std::ostream& os, int64_t step, double step_loss, double lr);
  void evaluate_now(std::ostream& os, int64_t step, MetricsRow& row);
  void save(int64_t step);
  void print_summary(std::ostream& os) const;
  double since_start() const;
  bool is_rank0() const { return !group_ || group_->rank() == 0; }

  ModelConfig m_;
  TrainConfig t_;
  TrainOptions o_;
  torch::Device device_ = torch::kCPU;
  std::unique_ptr<Workload> work_;
  LanguageModel model_{nullptr};
  std::unique_ptr<torch::optim::AdamW> opt_;
  std::unique_ptr<RunLock> lock_;
  std::unique_ptr<ProcessGroup> group_;  // data-parallel runs
  struct GraphedStep;
  std::unique_ptr<GraphedStep> graphed_;  // --cuda-graph
  std::vector<torch::Tensor> params_;
  int64_t last_saved_ = 0;
  std::string resume_ckpt_, run_id_, metrics_path_, plot_path_;
  int64_t start_step_ = 0, end_step_ = 0, tokens_per_step_ = 0;
  double prior_elapsed_ = 0;
  std::vector<MetricsRow> rows_;
  std::ofstream metrics_;
  TrainResult result_;
  // Progress of the current log interval.
  Clock::time_point t0_, last_log_;
  double loss_acc_ = 0, tok_rate_ = NAN;
  int64_t loss_n_ = 0, tokens_since_log_ = 0;
  bool first_eval_ = true;
};

// A model loaded from a checkpoint (fully checked), ready for eval or sampling.
struct LoadedModel {
  CheckpointInfo info;
  LanguageModel model{nullptr};
  torch::Device device = torch::kCPU;
};
LoadedModel load_model(const std::string& ckpt, const std::string& device_name);

// AdamW over the model's trainable parameters, with --weight-decay on the
// matrices (`*.weight` of rank 2) and none on the rest: two parameter groups.
std::unique_ptr<torch::optim::AdamW> make_optimizer(torch::nn::Module& model, const TrainConfig& t);

}  // namespace app
}  // namespace colt5
