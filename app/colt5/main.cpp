// The `colt5` program: train, eval, sample, bench, golden.
#include <CLI/CLI.hpp>
#include <torch/torch.h>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <limits>
#include <sstream>
#include <random>
#include <string>
#include <vector>

#include "support/golden.h"

#include "checkpoint.h"
#include "config.h"
#include "model.h"
#include "train.h"

using namespace colt5::app;

namespace {

const char* kTrainHelp =
    "Train a decoder model of routed autoregressive attention + routed feedforward blocks.\n"
    "Without --data: the built-in retrieval task (key/value pairs far before a final query key;\n"
    "the model predicts that key's value; scored by accuracy on held-out sequences).\n"
    "With --data FILE: a byte-level language model of the file (loss and bits per character).\n"
    "--light-only removes the heavy branches for an A/B run at the same widths.";

struct ModelFlags {
  std::vector<CLI::Option*> options;
};

ModelFlags add_model_flags(CLI::App* app, ModelConfig& m) {
  ModelFlags f;
  auto add = [&](const char* name, auto& var, const char* help) {
    f.options.push_back(app->add_option(name, var, help)->capture_default_str()->group("Model"));
  };
  add("--dim", m.dim, "model width");
  add("--depth", m.depth, "number of blocks");
  add("--window", m.light_window_size, "light branch: causal local attention window");
  add("--light-heads", m.light_heads, "light attention heads");
  add("--light-dim-head", m.light_dim_head, "light attention head size");
  add("--heavy-heads", m.heavy_heads, "heavy attention heads");
  add("--heavy-dim-head", m.heavy_dim_head, "heavy attention head size");
  add("--heavy-window", m.heavy_window_size, "heavy routing window (0: same as --window)");
  add("--heavy-q", m.num_heavy_tokens_q, "queries routed to heavy attention per heavy window");
  add("--heavy-kv", m.num_heavy_tokens_kv, "keys/values routed from the earlier windows");
  add("--routed-kv", m.num_routed_kv, "sets of routed keys/values (heavy heads split across them)");
  add("--light-ff-mult", m.light_ff_mult, "light feedforward hidden size / dim");
  add("--heavy-ff-mult", m.heavy_ff_mult, "heavy feedforward hidden size / dim");
  add("--heavy-ff-tokens", m.num_heavy_ff_tokens, "tokens per heavy window routed to the heavy feedforward");
  add("--router-cosine", m.cosine_sim_routing,
      "cosine-similarity routing scores (false: dot product, the reference default)");
  add("--router-cosine-scale", m.cosine_sim_scale, "scale of the cosine-similarity scores");
  add("--router-eps", m.router_eps, "final coordinate-descent epsilon (reference default 0.03)");
  add("--router-eps-init", m.router_eps_init, "starting epsilon of eps-scaling");
  add("--router-eps-decay", m.router_eps_decay, "epsilon decay per iteration");
  add("--router-iters", m.router_n_iters, "coordinate-descent iterations");
  add("--router-fetch-k-ratio", m.router_fetch_k_ratio, "coordinate descent runs with k times this");
  f.options.push_back(
      app->add_flag("--light-only", m.light_only, "no heavy branches: causal LocalMHA + light feedforward only")
          ->group("Model"));
  return f;
}

bool stdout_is_terminal() { return ::isatty(STDOUT_FILENO) == 1; }

// ------------------------------------------------------------------ sample

int run_sample(const std::string& ckpt, const std::string& prompt, double temperature, int64_t top_k, int64_t length,
               uint64_t seed, const std::string& device, bool echo) {
  if (length < 0) throw UsageError("--length must be >= 0");
  if (temperature < 0) throw UsageError("--temperature must be >= 0 (0: greedy)");
  if (top_k < 0) throw UsageError("--top-k must be >= 0 (0: no limit)");
  LoadedModel lm = load_model(ckpt, device);
  if (is_task(lm.info.train) || lm.info.model.vocab_size != 256)
    throw UsageError("'" + lm.info.dir +
                     "' is a retrieval-task model; sample needs a byte-level text model (train --data FILE)");
  if (prompt.empty()) throw UsageError("--prompt must not be empty");
  std::vector<int64_t> tokens;
  for (unsigned char c : prompt) tokens.push_back(c);
  if (echo) {
    std::fwrite(prompt.data(), 1, prompt.size(), stdout);
    std::fflush(stdout);
  }
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  torch::NoGradGuard no_grad;
  AutocastGuard autocast(lm.device.is_cuda() && lm.info.train.amp);
  const int64_t ctx_len = lm.info.model.max_seq_len;
  for (int64_t i = 0; i < length; ++i) {
    const int64_t start = std::max<int64_t>(0, static_cast<int64_t>(tokens.size()) - ctx_len);
    torch::Tensor ctx = torch::tensor(std::vector<int64_t>(tokens.begin() + start, tokens.end()), torch::kLong)
                            .unsqueeze(0)
                            .to(lm.device);
    torch::Tensor h = lm.model->hidden(ctx);
    torch::Tensor logits = lm.model->logits(h.select(1, h.size(1) - 1))[0].to(torch::kCPU, torch::kDouble);
    int64_t next;
    if (temperature == 0) {
      next = logits.argmax().item<int64_t>();
    } else {
      logits = logits / temperature;
      if (top_k > 0 && top_k < logits.size(0)) {
        double kth = std::get<0>(logits.topk(top_k)).min().item<double>();
        logits = logits.masked_fill(logits < kth, -std::numeric_limits<double>::infinity());
      }
      torch::Tensor probs = torch::softmax(logits, 0);
      auto p = probs.accessor<double, 1>();
      double u = uniform(rng), acc = 0;
      next = probs.size(0) - 1;
      for (int64_t j = 0; j < probs.size(0); ++j) {
        acc += p[j];
        if (u < acc) {
          next = j;
          break;
        }
      }
    }
    tokens.push_back(next);
    const char c = static_cast<char>(next);
    std::fwrite(&c, 1, 1, stdout);
    std::fflush(stdout);
  }
  std::fputc('\n', stdout);
  return 0;
}

// -------------------------------------------------------------------- eval

int run_eval(const std::string& ckpt, const std::string& split, const std::string& device, const std::string& data) {
  LoadedModel lm = load_model(ckpt, device);
  TrainConfig t = lm.info.train;
  if (!data.empty()) t.data = data;
  t.device = device;
  Workload work(t, lm.info.model);
  const auto t0 = std::chrono::steady_clock::now();
  EvalResult r = evaluate(lm.model, work, t, split, 0, lm.device);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("checkpoint %s (step %lld, %s model)\n", lm.info.dir.c_str(), static_cast<long long>(lm.info.step),
              lm.info.model.light_only ? "light-only" : "routed");
  if (work.is_task())
    std::printf("%s: accuracy %.4f, loss %.4f on %lld held-out sequences (chance %.4f) [%.1fs]\n", split.c_str(),
                r.accuracy, r.loss, static_cast<long long>(r.count), 1.0 / static_cast<double>(t.task_values), secs);
  else
    std::printf("%s: loss %.4f nats, %.4f bits per character over %lld bytes [%.1fs]\n", split.c_str(), r.loss, r.bpc,
                static_cast<long long>(r.count), secs);
  return 0;
}

// ------------------------------------------------------------------- bench

double time_ms(const std::function<void()>& fn, int iters, bool cuda) {
  std::vector<double> ms;
  for (int i = 0; i < iters; ++i) {
    if (cuda) torch::cuda::synchronize();
    auto t0 = std::chrono::steady_clock::now();
    fn();
    if (cuda) torch::cuda::synchronize();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

int run_bench(ModelConfig m, int64_t batch, int64_t seq_len, int iters, int warmup, const std::string& device_name,
              bool amp) {
  if (batch < 1 || seq_len < 2 || iters < 1 || warmup < 0)
    throw UsageError("--batch >= 1, --seq-len >= 2, --iters >= 1 and --warmup-iters >= 0 are required");
  m.max_seq_len = std::max(m.max_seq_len, seq_len);
  TrainConfig t;
  t.data = "bench";  // not the task: any vocabulary
  t.seq_len = seq_len;
  t.device = device_name;
  validate(t, m);
  const torch::Device device = parse_device(device_name);
  const bool cuda = device.is_cuda();
  std::printf(
      "colt5 bench on %s: batch %lld x %lld tokens, dim %lld, depth %lld, window %lld, heavy q %lld / kv %lld, "
      "median of %d (after %d warm-up)%s\n",
      device_description(device).c_str(), static_cast<long long>(batch), static_cast<long long>(seq_len),
      static_cast<long long>(m.dim), static_cast<long long>(m.depth), static_cast<long long>(m.light_window_size),
      static_cast<long long>(m.num_heavy_tokens_q), static_cast<long long>(m.num_heavy_tokens_kv), iters, warmup,
      cuda && amp ? ", bf16 autocast" : "");
  std::printf("%-11s %12s %12s %14s %16s\n", "model", "parameters", "forward ms", "fwd+bwd ms", "train tokens/s");
  double fwd[2], both[2];
  for (int v = 0; v < 2; ++v) {
    ModelConfig mv = m;
    mv.light_only = v == 1;
    torch::manual_seed(0);
    LanguageModel model(mv);
    model->to(device);
    torch::Tensor tokens = torch::randint(0, mv.vocab_size, {batch, seq_len}, torch::kLong).to(device);
    auto forward = [&] {
      torch::NoGradGuard no_grad;
      AutocastGuard ac(cuda && amp);
      model->forward(tokens);
    };
    auto train_step = [&] {
      torch::Tensor loss;
      {
        AutocastGuard ac(cuda && amp);
        loss = model->forward(tokens).to(torch::kFloat).logsumexp(-1).mean();
      }
      loss.backward();
      model->zero_grad();
    };
    for (int i = 0; i < warmup; ++i) {
      forward();
      train_step();
    }
    fwd[v] = time_ms(forward, iters, cuda);
    both[v] = time_ms(train_step, iters, cuda);
    std::printf("%-11s %12lld %12.2f %14.2f %16.0f\n", v == 0 ? "routed" : "light-only",
                static_cast<long long>(count_parameters(*model)), fwd[v], both[v],
                static_cast<double>(batch * seq_len) / (both[v] / 1000.0));
  }
  std::printf("routed / light-only time: forward %.2fx, forward+backward %.2fx\n", fwd[0] / fwd[1], both[0] / both[1]);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  // LibTorch's OpenMP threads spin while waiting for work by default. On a
  // machine whose cores are also busy with other processes, spinning threads
  // take the cores from each other and training runs several times slower.
  // The wait policy is read once when the OpenMP runtime loads, so it is set
  // here and the program starts itself again; OMP_WAIT_POLICY=active restores
  // spinning.
  if (std::getenv("OMP_WAIT_POLICY") == nullptr && ::setenv("OMP_WAIT_POLICY", "passive", 1) == 0)
    ::execv("/proc/self/exe", argv);
  CLI::App app{"colt5: CoLT5 conditionally routed attention and feedforward — train, evaluate, sample, benchmark"};
  app.require_subcommand(1);
  int threads = 0;
  app.add_option(
         "--threads", threads,
         "CPU threads for LibTorch (0: its default); on a busy machine 1 can be much faster than spinning threads")
      ->check(CLI::NonNegativeNumber);
  app.footer("Run `colt5 SUBCOMMAND --help` for its flags; docs/program.md has examples.");

  // ---- train
  ModelConfig m;
  TrainConfig t;
  TrainOptions topts;
  std::string split_arg;
  std::string progress = "auto";
  auto* train = app.add_subcommand("train", kTrainHelp);
  ModelFlags mflags = add_model_flags(train, m);
  std::vector<CLI::Option*> fixed_on_resume = mflags.options;
  auto addt = [&](const char* name, auto& var, const char* help, bool resumable = false) {
    CLI::Option* o = train->add_option(name, var, help)->capture_default_str()->group("Training");
    if (!resumable) fixed_on_resume.push_back(o);
    return o;
  };
  addt("--data", t.data, "text file for a byte-level model (default: the built-in retrieval task)", true);
  addt("--split", split_arg, "train,valid fractions of --data (the rest is test), e.g. 0.9,0.05");
  addt("--seq-len", t.seq_len, "tokens per training sequence");
  addt("--batch", t.batch_size, "sequences per micro-batch");
  addt("--grad-accum", t.grad_accum, "micro-batches per optimizer step");
  addt("--steps", t.steps, "optimizer steps in total (the learning-rate schedule spans them)", true);
  addt("--stop-after", t.stop_after, "stop (with a checkpoint) after this step; 0: run all --steps", true);
  addt("--lr", t.lr, "peak learning rate (AdamW)");
  addt("--min-lr-ratio", t.min_lr_ratio, "cosine decay ends at lr times this");
  addt("--warmup", t.warmup, "linear warm-up steps");
  addt("--weight-decay", t.weight_decay, "AdamW weight decay of weight matrices");
  addt("--clip", t.grad_clip, "gradient-norm clipping (0: off)");
  addt("--eval-every", t.eval_every, "validate every N steps (and at the end)", true);
  addt("--eval-batches", t.eval_batches, "text: validation batches per evaluation");
  addt("--save-every", t.save_every, "checkpoint every N steps (and at the end)", true);
  addt("--log-every", t.log_every, "log line / metrics row every N steps", true);
  addt("--seed", t.seed, "seed of initialization and training batches");
  addt("--device", t.device, "cpu or cuda", true)->check(CLI::IsMember({"cpu", "cuda"}));
  CLI::Option* no_amp =
      train->add_flag("--no-amp", "CUDA: train in float32 instead of bf16 autocast")->group("Training");
  fixed_on_resume.push_back(no_amp);
  addt("--task-keys", t.task_keys, "task: number of distinct keys");
  addt("--task-values", t.task_values, "task: number of distinct values (chance = 1 / this)");
  addt("--task-filler", t.task_filler, "task: number of filler tokens");
  addt("--task-pairs", t.task_pairs, "task: key/value pairs per sequence");
  addt("--task-eval-size", t.task_eval_size, "task: held-out sequences per evaluation");
  addt("--lm-weight", t.lm_weight, "task: weight of next-token loss on the other positions");
  train->add_option("--out", topts.out_dir, "run directory: checkpoints, metrics.csv, loss.svg")
      ->capture_default_str()
      ->group("Run");
  train->add_option("--resume", topts.resume, "continue from a checkpoint (or the newest one of a run directory)")
      ->group("Run");
  train->add_option("--progress", progress, "live progress bar: auto (when stdout is a terminal), always, never")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "always", "never"}))
      ->group("Run");

  // ---- eval
  std::string ckpt, eval_split = "valid", eval_device = "cpu", eval_data;
  auto* eval =
      app.add_subcommand("eval", "Evaluate a checkpoint: loss and bits per character (text) or accuracy (task).");
  eval->add_option("--ckpt", ckpt, "checkpoint directory, or a run directory (its newest checkpoint)")->required();
  eval->add_option("--split", eval_split, "valid or test")
      ->capture_default_str()
      ->check(CLI::IsMember({"valid", "test"}));
  eval->add_option("--device", eval_device, "cpu or cuda")
      ->capture_default_str()
      ->check(CLI::IsMember({"cpu", "cuda"}));
  eval->add_option("--data", eval_data, "text file, if it moved since training");

  // ---- sample
  std::string prompt, sample_device = "cpu";
  double temperature = 0.8;
  int64_t top_k = 40, length = 200;
  uint64_t sample_seed = 0;
  bool no_echo = false;
  auto* sample =
      app.add_subcommand("sample", "Stream bytes generated by a byte-level checkpoint, starting from --prompt.");
  sample->add_option("--ckpt", ckpt, "checkpoint directory, or a run directory (its newest checkpoint)")->required();
  sample->add_option("--prompt", prompt, "text to continue")->required();
  sample->add_option("--temperature", temperature, "softmax temperature (0: greedy)")->capture_default_str();
  sample->add_option("--top-k", top_k, "sample among the k likeliest bytes (0: all)")->capture_default_str();
  sample->add_option("--length", length, "bytes to generate")->capture_default_str();
  sample->add_option("--seed", sample_seed, "sampling seed")->capture_default_str();
  sample->add_option("--device", sample_device, "cpu or cuda")
      ->capture_default_str()
      ->check(CLI::IsMember({"cpu", "cuda"}));
  sample->add_flag("--no-echo", no_echo, "do not print the prompt first");

  // ---- bench
  ModelConfig bm;
  bm.vocab_size = 256;
  int64_t bench_batch = 4, bench_len = 1024;
  int bench_iters = 5, bench_warmup = 1;
  std::string bench_device = "cpu";
  bool bench_no_amp = false;
  auto* bench = app.add_subcommand(
      "bench", "Time forward and forward+backward of the model at the given sizes: routed vs light-only, same run.");
  add_model_flags(bench, bm);
  bench->add_option("--batch", bench_batch, "sequences per batch")->capture_default_str();
  bench->add_option("--seq-len", bench_len, "tokens per sequence")->capture_default_str();
  bench->add_option("--iters", bench_iters, "timed iterations (median reported)")->capture_default_str();
  bench->add_option("--warmup-iters", bench_warmup, "untimed iterations first")->capture_default_str();
  bench->add_option("--device", bench_device, "cpu or cuda")
      ->capture_default_str()
      ->check(CLI::IsMember({"cpu", "cuda"}));
  bench->add_flag("--no-amp", bench_no_amp, "CUDA: float32 instead of bf16 autocast");

  // ---- golden
  std::string golden_dir;
  auto* golden = app.add_subcommand("golden", "Check the modules against the reference's float64 golden cases in DIR.");
  golden->add_option("DIR", golden_dir, "directory of *.safetensors golden cases")
      ->required()
      ->check(CLI::ExistingDirectory);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }

  try {
    if (threads > 0) at::set_num_threads(threads);
    if (train->parsed()) {
      if (!split_arg.empty()) {
        double a = 0, b = 0;
        char comma = 0;
        std::istringstream ss(split_arg);
        if (!(ss >> a >> comma >> b) || comma != ',' || !ss.eof())
          throw UsageError("--split must be two fractions 'train,valid', e.g. 0.9,0.05; got '" + split_arg + "'");
        t.train_frac = a;
        t.valid_frac = b;
      }
      t.amp = no_amp->count() == 0;
      if (!topts.resume.empty()) {
        for (CLI::Option* o : fixed_on_resume)
          if (o->count() > 0)
            throw UsageError(o->get_name() +
                             " cannot change on --resume: model and training settings come from the checkpoint "
                             "(only --steps, --stop-after, --device, --data, --eval-every, --save-every, --log-every, "
                             "--out may be given)");
        CheckpointInfo info = read_checkpoint_info(topts.resume);
        ModelConfig rm = info.model;
        TrainConfig rt = info.train;
        auto given = [&](const char* name) { return train->get_option(name)->count() > 0; };
        if (given("--steps")) rt.steps = t.steps;
        rt.stop_after = t.stop_after;
        if (given("--device")) rt.device = t.device;
        if (given("--data")) rt.data = t.data;
        if (given("--eval-every")) rt.eval_every = t.eval_every;
        if (given("--save-every")) rt.save_every = t.save_every;
        if (given("--log-every")) rt.log_every = t.log_every;
        if (train->get_option("--out")->count() == 0) topts.out_dir = parent_dir(info.dir);
        m = rm;
        t = rt;
      } else if (!t.data.empty()) {
        m.vocab_size = 256;
      }
      topts.interactive = progress == "always" || (progress == "auto" && stdout_is_terminal());
      Trainer trainer(m, t, topts);
      trainer.run(std::cout);
      return 0;
    }
    if (eval->parsed()) return run_eval(ckpt, eval_split, eval_device, eval_data);
    if (sample->parsed())
      return run_sample(ckpt, prompt, temperature, top_k, length, sample_seed, sample_device, !no_echo);
    if (bench->parsed())
      return run_bench(bm, bench_batch, bench_len, bench_iters, bench_warmup, bench_device, !bench_no_amp);
    if (golden->parsed()) return colt5::golden::main_for_dir(golden_dir);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "colt5: error: %s\n", e.what());
    return 2;
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "colt5: error: %s\n", e.what_without_backtrace());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "colt5: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
