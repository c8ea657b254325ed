// The command line of the `colt5` program (CLI11). Model and training flags
// come from the settings tables of config.cpp.
#include <CLI/CLI.hpp>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <sched.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <limits>
#include <sstream>
#include <thread>

#include "program/checkpoint.h"
#include "program/commands.h"
#include "program/distributed.h"
#include "program/train.h"

namespace colt5 {
namespace app {

namespace {

const char* kTrainHelp =
    "Train a decoder model of routed autoregressive attention + routed feedforward blocks.\n"
    "Without --data: the built-in retrieval task (key/value pairs far before a final query key;\n"
    "the model predicts that key's value; scored by accuracy on held-out sequences).\n"
    "With --data FILE: a byte-level language model of the file (loss and bits per character).\n"
    "--light-only removes the heavy branches for an A/B run at the same widths.";

// Integers are parsed whole and in range: no silent saturation or wrap-around.
template <typename T>
CLI::Validator exact_integer() {
  return CLI::Validator(
      [](std::string& s) -> std::string {
        if (s.empty()) return "empty value";
        errno = 0;
        char* end = nullptr;
        if (std::is_unsigned<T>::value) {
          if (s.find('-') != std::string::npos) return "must be a non-negative integer, got '" + s + "'";
          std::strtoull(s.c_str(), &end, 10);
        } else {
          const long long v = std::strtoll(s.c_str(), &end, 10);
          if (errno == 0 && (v < std::numeric_limits<T>::min() || v > std::numeric_limits<T>::max())) errno = ERANGE;
        }
        if (end == s.c_str() || *end != '\0') return "must be an integer, got '" + s + "'";
        if (errno == ERANGE) return "integer out of range: '" + s + "'";
        return "";
      },
      "");
}

std::string to_string(const SettingValue& v) {
  return std::visit(
      [](const auto& x) -> std::string {
        using X = std::decay_t<decltype(x)>;
        if constexpr (std::is_same<X, bool>::value) {
          return x ? "true" : "false";
        } else if constexpr (std::is_same<X, std::string>::value) {
          return x;
        } else if constexpr (std::is_same<X, double>::value) {
          std::ostringstream os;
          os << x;
          return os.str();
        } else {
          return std::to_string(x);
        }
      },
      v);
}

// Adds a flag for each setting of the table with its own flag; returns the options by setting index.
template <typename C>
std::vector<std::pair<size_t, CLI::Option*>> add_settings(CLI::App* app, C& cfg, const std::vector<Setting<C>>& table,
                                                          const char* group) {
  std::vector<std::pair<size_t, CLI::Option*>> out;
  for (size_t i = 0; i < table.size(); ++i) {
    const Setting<C>& s = table[i];
    if (!s.own_flag) continue;
    CLI::Option* o = std::visit(
        [&](const auto& kind) -> CLI::Option* {
          using X = std::decay_t<decltype(kind)>;
          auto set = [&cfg, &s](const X& v) { s.set(cfg, SettingValue(v)); };
          CLI::Option* opt = app->add_option_function<X>(s.flag, set, s.help);
          if constexpr (std::is_same<X, int64_t>::value || std::is_same<X, uint64_t>::value)
            opt->check(exact_integer<X>());
          return opt;
        },
        s.kind);
    o->default_str(to_string(s.get(cfg)))->group(group);
    out.emplace_back(i, o);
  }
  return out;
}

void add_threads(CLI::App* app, int64_t& threads) {
  app->add_option("--threads", threads,
                  "CPU threads for LibTorch (0: its default; at most the available cores); on a busy machine 1 can be "
                  "much faster than spinning threads")
      ->check(exact_integer<int64_t>());
}

// --tf32: float32 matrix products and convolutions on CUDA in TF32 (LibTorch's
// global switches, off by default); nothing changes on the CPU or under bf16 autocast.
void add_tf32(CLI::App* cmd, bool& tf32) {
  cmd->add_flag("--tf32", tf32,
                "CUDA, float32 (--no-amp): matrix products in TF32 (faster, ~1e-3 relative precision); off by default");
}

void set_tf32(bool tf32) {
  at::globalContext().setAllowTF32CuBLAS(tf32);
  at::globalContext().setAllowTF32CuDNN(tf32);
}

void check_threads(int64_t threads) {
  const int cores = available_cores();
  if (threads < 0) throw UsageError("--threads must be >= 0, got " + std::to_string(threads));
  if (threads > cores)
    throw UsageError("--threads " + std::to_string(threads) + " is more than the " + std::to_string(cores) +
                     " cores this process may use");
}

void set_threads(int64_t threads) {
  check_threads(threads);
  if (threads > 0) at::set_num_threads(static_cast<int>(threads));
}

}  // namespace

int available_cores() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (::sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

namespace {

// Each subcommand: its flags (bound to its members, so it must not move once added) and its run.
struct TrainCommand {
  CLI::App* cmd = nullptr;
  ModelConfig m;
  TrainConfig t;
  TrainOptions o;
  std::string split_arg, progress = "auto";
  bool tf32 = false;
  CLI::Option *light_only = nullptr, *dense = nullptr, *split = nullptr, *no_amp = nullptr;
  std::vector<std::pair<size_t, CLI::Option*>> model_flags, train_flags;
  std::vector<std::string> args;  // the command line, for the workers of --nproc

  void add(CLI::App& app, int64_t& threads) {
    cmd = app.add_subcommand("train", kTrainHelp);
    add_threads(cmd, threads);
    model_flags = add_settings(cmd, m, model_settings(), "Model");
    light_only =
        cmd->add_flag("--light-only", "no heavy branches: causal LocalMHA + light feedforward only")->group("Model");
    dense =
        cmd->add_flag("--dense", "full causal attention + full-width feedforward at the heavy widths")->group("Model");
    light_only->excludes(dense);
    train_flags = add_settings(cmd, t, train_settings(), "Training");
    for (auto& [i, opt] : train_flags)
      if (train_settings()[i].key == std::string("device")) opt->check(CLI::IsMember({"cpu", "cuda"}));
    split = cmd->add_option("--split", split_arg, "train,valid fractions of --data (the rest is test)")
                ->default_str("0.9,0.05")
                ->group("Training");
    no_amp = cmd->add_flag("--no-amp", "CUDA: train in float32 instead of bf16 autocast")->group("Training");
    add_tf32(cmd, tf32);
    cmd->add_option("--out", o.out_dir, "run directory: checkpoints, metrics.csv, loss.svg")
        ->capture_default_str()
        ->group("Run");
    cmd->add_option("--resume", o.resume, "continue from a checkpoint (or the newest one of a run directory)")
        ->group("Run");
    cmd->add_flag("--cuda-graph", o.cuda_graph,
                  "CUDA: capture the step's forward and backward once in a CUDA graph and replay it (no host launch "
                  "overhead; one process, --grad-accum 1)")
        ->group("Run");
    cmd->add_option("--progress", progress, "live progress bar: auto (when stdout is a terminal), always, never")
        ->capture_default_str()
        ->check(CLI::IsMember({"auto", "always", "never"}))
        ->group("Run");
    const auto integer = exact_integer<int64_t>();
    cmd->add_option("--nproc", o.dist.nproc,
                    "data-parallel: start N worker processes on this machine (--batch stays the global batch)")
        ->capture_default_str()
        ->check(integer)
        ->group("Distributed");
    cmd->add_option("--rank", o.dist.rank, "this process's rank, 0..world-size-1 (default: $RANK, else 0)")
        ->check(integer)
        ->group("Distributed");
    cmd->add_option("--world-size", o.dist.world_size, "processes in the run (default: $WORLD_SIZE, else 1)")
        ->check(integer)
        ->group("Distributed");
    cmd->add_option("--master-addr", o.dist.master_addr, "host of rank 0 (default: $MASTER_ADDR, else 127.0.0.1)")
        ->group("Distributed");
    cmd->add_option("--master-port", o.dist.master_port,
                    "rendezvous port on rank 0 (default: $MASTER_PORT, else 29500)")
        ->check(integer)
        ->group("Distributed");
    cmd->add_option("--dist-timeout", o.dist.timeout_s,
                    "seconds to wait for the other processes (rendezvous, each all-reduce) before failing")
        ->capture_default_str()
        ->group("Distributed");
  }

  // On --resume, the flags that may not be given with it (the model and
  // training settings come from the checkpoint).
  void check_resume_flags() const {
    std::vector<CLI::Option*> fixed{light_only, dense, split, no_amp};
    for (auto& [i, opt] : model_flags) fixed.push_back(opt);
    for (auto& [i, opt] : train_flags)
      if (!train_settings()[i].resumable) fixed.push_back(opt);
    for (CLI::Option* opt : fixed)
      if (opt->count() > 0)
        throw UsageError(opt->get_name() +
                         " cannot change on --resume: model and training settings come from the checkpoint "
                         "(only --steps, --stop-after, --device, --data, --eval-every, --save-every, --log-every, "
                         "--out and the distributed flags may be given)");
  }

  // On --resume: the checkpoint's settings, with the resumable flags that were given.
  void settings_from_checkpoint() {
    CheckpointInfo info = read_checkpoint_info(o.resume);
    TrainConfig rt = info.train;
    for (auto& [i, opt] : train_flags) {
      const auto& s = train_settings()[i];
      if (opt->count() > 0 || !s.stored) s.set(rt, s.get(t));
    }
    if (cmd->get_option("--out")->count() == 0) o.out_dir = parent_dir(info.dir);
    m = info.model;
    t = rt;
  }

  // Everything the command line decides; check_only stops before reading a
  // checkpoint and checks the settings instead.
  void prepare(bool check_only) {
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
    if (light_only->count() > 0) m.arch = Arch::light_only;
    if (dense->count() > 0) m.arch = Arch::dense;
    if (!o.resume.empty()) {
      check_resume_flags();
      if (!check_only) settings_from_checkpoint();
    } else if (!t.data.empty()) {
      m.vocab_size = 256;
    }
    o.interactive = progress == "always" || (progress == "auto" && ::isatty(STDOUT_FILENO) == 1);
    o.dist = resolve_dist_options(o.dist);
    if (!check_only || o.resume.empty()) check_cuda_graph(t, o);
    if (o.dist.nproc > 1 && t.batch_size % o.dist.nproc != 0)
      throw UsageError("--batch " + std::to_string(t.batch_size) + " (the global batch) is not divisible by --nproc " +
                       std::to_string(o.dist.nproc) + "; use a multiple of " + std::to_string(o.dist.nproc));
    if (check_only && o.resume.empty()) {
      ModelConfig mm = m;
      TrainConfig tt = t;
      if (is_task(tt)) mm.vocab_size = task_vocab(tt);
      mm.max_seq_len = std::max(mm.max_seq_len, tt.seq_len);
      validate(tt, mm);
    }
  }

  int run() {
    prepare(false);
    set_tf32(tf32);
    if (o.dist.nproc > 1) return launch_local_workers(o.dist.nproc, args, o.dist.timeout_s);
    Trainer(m, t, o).run(std::cout);
    return 0;
  }
};

struct EvalCommand {
  CLI::App* cmd = nullptr;
  std::string ckpt, split = "valid", device = "cpu", data;

  void add(CLI::App& app, int64_t& threads) {
    cmd = app.add_subcommand("eval", "Evaluate a checkpoint: loss and bits per character (text) or accuracy (task).");
    add_threads(cmd, threads);
    cmd->add_option("--ckpt", ckpt, "checkpoint directory, or a run directory (its newest checkpoint)")->required();
    cmd->add_option("--split", split, "valid or test")->capture_default_str()->check(CLI::IsMember({"valid", "test"}));
    cmd->add_option("--device", device, "cpu or cuda")->capture_default_str()->check(CLI::IsMember({"cpu", "cuda"}));
    cmd->add_option("--data", data, "text file, if it moved since training");
  }
  int run() { return run_eval(ckpt, split, device, data); }
  void check() const {}  // CLI11 checked every flag
};

struct SampleCommand {
  CLI::App* cmd = nullptr;
  std::string ckpt;
  SampleOptions so;
  bool no_echo = false;

  void add(CLI::App& app, int64_t& threads) {
    cmd = app.add_subcommand("sample", "Stream bytes generated by a byte-level checkpoint, starting from --prompt.");
    add_threads(cmd, threads);
    cmd->add_option("--ckpt", ckpt, "checkpoint directory, or a run directory (its newest checkpoint)")->required();
    cmd->add_option("--prompt", so.prompt, "text to continue")->required();
    cmd->add_option("--temperature", so.temperature, "softmax temperature (0: greedy)")->capture_default_str();
    cmd->add_option("--top-k", so.top_k, "sample among the k likeliest bytes (0: all)")
        ->capture_default_str()
        ->check(exact_integer<int64_t>());
    cmd->add_option("--length", so.length, "bytes to generate")->capture_default_str()->check(exact_integer<int64_t>());
    cmd->add_option("--seed", so.seed, "sampling seed")->capture_default_str()->check(exact_integer<uint64_t>());
    cmd->add_option("--device", so.device, "cpu or cuda")->capture_default_str()->check(CLI::IsMember({"cpu", "cuda"}));
    cmd->add_flag("--no-echo", no_echo, "do not print the prompt first");
  }
  int run() {
    so.echo = !no_echo;
    return run_sample(ckpt, so);
  }
  void check() const { check_sample_options(so); }
};

struct BenchCommand {
  CLI::App* cmd = nullptr;
  ModelConfig m;
  BenchOptions bo;
  bool no_amp = false, tf32 = false;

  void add(CLI::App& app, int64_t& threads) {
    cmd = app.add_subcommand("bench",
                             "Time forward and forward+backward of the model at the given sizes: routed vs light-only "
                             "(and dense with --dense), same run.");
    add_threads(cmd, threads);
    add_settings(cmd, m, model_settings(), "Model");
    const auto integer = exact_integer<int64_t>();
    cmd->add_option("--batch", bo.batch, "sequences per batch")->capture_default_str()->check(integer);
    cmd->add_option("--seq-len", bo.seq_len, "tokens per sequence")->capture_default_str()->check(integer);
    cmd->add_option("--iters", bo.iters, "timed iterations (median reported)")->capture_default_str()->check(integer);
    cmd->add_option("--warmup-iters", bo.warmup, "untimed iterations first")->capture_default_str()->check(integer);
    cmd->add_option("--device", bo.device, "cpu or cuda")->capture_default_str()->check(CLI::IsMember({"cpu", "cuda"}));
    cmd->add_flag("--no-amp", no_amp, "CUDA: float32 instead of bf16 autocast");
    add_tf32(cmd, tf32);
    cmd->add_flag("--dense", bo.dense, "also time a dense model: full causal attention, full-width feedforward");
    cmd->add_flag("--cuda-graph", bo.cuda_graph,
                  "CUDA: also time the training step captured once in a CUDA graph and replayed (no host launch "
                  "overhead)");
  }
  int run() {
    bo.amp = !no_amp;
    set_tf32(tf32);
    return run_bench(m, bo);
  }
  void check() const { check_bench_options(m, bo); }
};

int report(int status, const char* message) {
  std::fflush(stdout);
  std::fprintf(stderr, "colt5: error: %s\n", message);
  return status;
}

}  // namespace

int run_cli(int argc, const char* const* argv, const std::function<int(const std::string&)>& golden,
            bool check_only) {
  CLI::App app{"colt5: CoLT5 conditionally routed attention and feedforward — train, evaluate, sample, benchmark"};
  app.require_subcommand(1);
  app.footer("Run `colt5 SUBCOMMAND --help` for its flags; docs/program.md has examples.");
  int64_t threads = 0;
  add_threads(&app, threads);
  TrainCommand train;
  EvalCommand eval;
  SampleCommand sample;
  BenchCommand bench;
  train.add(app, threads);
  train.args.assign(argv, argv + argc);
  eval.add(app, threads);
  sample.add(app, threads);
  bench.add(app, threads);
  std::string golden_dir;
  auto* golden_cmd =
      app.add_subcommand("golden", "Check the modules against the reference's float64 golden cases in DIR.");
  golden_cmd->add_option("DIR", golden_dir, "directory of *.safetensors golden cases")
      ->required()
      ->check(CLI::ExistingDirectory);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    if (check_only) {
      check_threads(threads);
      if (train.cmd->parsed()) train.prepare(true);
      if (sample.cmd->parsed()) sample.check();
      if (bench.cmd->parsed()) bench.check();
      return 0;
    }
    set_threads(threads);
    if (train.cmd->parsed()) return train.run();
    if (eval.cmd->parsed()) return eval.run();
    if (sample.cmd->parsed()) return sample.run();
    if (bench.cmd->parsed()) return bench.run();
    if (golden_cmd->parsed()) return golden(golden_dir);
  } catch (const UsageError& e) {
    return report(2, e.what());
  } catch (const c10::Error& e) {
    return report(1, e.what_without_backtrace());
  } catch (const std::exception& e) {
    return report(1, e.what());
  }
  return 0;
}

}  // namespace app
}  // namespace colt5
