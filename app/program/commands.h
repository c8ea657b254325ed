// The `colt5` program's subcommands and its command line.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "program/config.h"

namespace colt5 {
namespace app {

int run_eval(const std::string& ckpt, const std::string& split, const std::string& device, const std::string& data);

struct SampleOptions {
  std::string prompt;
  double temperature = 0.8;  // 0: greedy
  int64_t top_k = 40;        // 0: all bytes
  int64_t length = 200;
  uint64_t seed = 0;
  std::string device = "cpu";
  bool echo = true;
};
int run_sample(const std::string& ckpt, const SampleOptions& o);
// UsageError naming the flag when an option is out of range.
void check_sample_options(const SampleOptions& o);

struct BenchOptions {
  int64_t batch = 4;
  int64_t seq_len = 1024;
  int64_t iters = 5;
  int64_t warmup = 1;
  std::string device = "cpu";
  bool amp = true;
  bool dense = false;  // also time a dense model at the same widths
  bool cuda_graph = false;  // CUDA: also time the training step replayed from a CUDA graph
};
int run_bench(ModelConfig m, const BenchOptions& o);
// The checks run_bench makes before building anything (UsageError).
void check_bench_options(const ModelConfig& m, const BenchOptions& o);

// The CPU cores this process may run on.
int available_cores();

// Parses the command line and runs the subcommand; returns the exit status
// (2 for bad usage or bad input, 1 for other failures). `golden` runs the
// golden subcommand over a directory. check_only parses and checks every
// setting the command line decides, then returns 0 without running anything
// or reading any file (the command-line fuzzer's entry).
int run_cli(int argc, const char* const* argv, const std::function<int(const std::string&)>& golden,
            bool check_only = false);

}  // namespace app
}  // namespace colt5
