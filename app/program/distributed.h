// Data-parallel training of the `colt5` program on LibTorch's distributed
// engine (c10d): a TCPStore rendezvous, then a Gloo process group for CPU
// tensors or an NCCL one for CUDA tensors (one GPU per process).
//
// Every process holds the whole model and optimizer. Each trains on its rows
// of the global batch; the gradients are averaged over the processes by
// all-reduces of flat buckets before the optimizer step, so every process
// makes the same update and the result equals a one-process run with the
// same global batch up to float rounding.
//
// The distributed code is compiled when the LibTorch found has c10d with Gloo
// (app/CMakeLists.txt checks it); without it a world of more than one process
// is an error saying so.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace colt5 {
namespace app {

// Where this process stands in a distributed run. Unset fields (-1, empty)
// come from the environment a launcher sets (RANK, WORLD_SIZE, LOCAL_RANK,
// MASTER_ADDR, MASTER_PORT, as torchrun sets them), else the defaults: one
// process, 127.0.0.1:29500.
struct DistOptions {
  int64_t nproc = 1;         // --nproc: local worker processes to start
  int64_t rank = -1;         // --rank
  int64_t world_size = -1;   // --world-size
  int64_t local_rank = -1;   // LOCAL_RANK: the GPU index on its machine (default: rank modulo the GPUs)
  std::string master_addr;   // --master-addr: the host of rank 0
  int64_t master_port = -1;  // --master-port: its TCPStore port
  double timeout_s = 300;    // --dist-timeout: rendezvous and every collective
  bool launched = false;     // started by `--nproc` (COLT5_LAUNCHED is set)
  bool explicit_group = false;  // --rank, --world-size or RANK/WORLD_SIZE given: join a group even of one
};

// Fills the unset fields from the environment and checks everything
// (UsageError naming the flag or variable).
DistOptions resolve_dist_options(DistOptions o);

// Whether this build has the distributed engine (Gloo; NCCL with CUDA).
bool distributed_available();
bool nccl_available();

// A collective failed: a peer died, hung past the timeout or cannot be reached.
struct DistributedError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A joined process group.
class ProcessGroup {
 public:
  // Rendezvous at master_addr:master_port (rank 0 serves the TCPStore) and
  // the process group of the device's kind. Throws DistributedError when the
  // others do not arrive within the timeout.
  static std::unique_ptr<ProcessGroup> join(const DistOptions& o, const torch::Device& device);
  ~ProcessGroup();

  int rank() const;
  int world_size() const;
  const char* backend() const;  // "gloo" or "nccl"

  // Gradient averaging overlapped with the backward, as DistributedDataParallel
  // does it. attach_gradients() groups `params` into flat buckets of at most
  // bucket_bytes (reverse parameter order: the order in which the backward
  // finishes them) and hooks each parameter. arm_gradients() before the last
  // backward of a step: as that backward produces a parameter's gradient (plus
  // what earlier micro-batches accumulated), it is copied into its bucket, and
  // a bucket whose gradients are all there is all-reduced at once, while the
  // backward goes on. The parameters `loss`'s graph does not reach get no
  // gradient from it: they count as zeros from the start, so their buckets do
  // not wait for them. Buckets start in index order on every process, so the
  // collectives match. finish_gradients() starts the buckets the backward did
  // not complete (parameters without a gradient count as zeros), waits, and
  // writes the averages into the gradients. A parameter without a gradient on
  // every process keeps none; one with a gradient on some gets the average
  // with zeros for the others. Returns the mean of `value` over the processes
  // (the step's loss), reduced in the same round.
  void attach_gradients(const std::vector<torch::Tensor>& params);
  void arm_gradients(const torch::Tensor& loss);
  double finish_gradients(double value);

  // The buckets of attach_gradients(), and how many of them the last
  // finish_gradients() found already started during the backward.
  int64_t gradient_buckets() const;
  int64_t buckets_started_in_backward() const;

  // Both in one call, after the backward (no overlap).
  double average_gradients(const std::vector<torch::Tensor>& params, double value);

  // Element-wise sums over the processes (float64).
  std::vector<double> sum(const std::vector<double>& values);
  // Whether every process passed true.
  bool all(bool ok);
  // Copies rank 0's values into `tensors` on every process.
  void broadcast(const std::vector<torch::Tensor>& tensors);

  int64_t bucket_bytes = int64_t{25} << 20;  // read by attach_gradients()

 private:
  struct Impl;
  explicit ProcessGroup(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// The local device of this process: cuda:local_rank for CUDA runs.
torch::Device process_device(const torch::Device& requested, const DistOptions& o);

// `colt5 train --nproc N`: starts N copies of this program with `args` (its
// command line) and the environment of ranks 0..N-1 on 127.0.0.1 and a free
// port, and waits for them. When a worker fails, the others are given
// timeout_s to end on their own, then stopped. Returns the exit status: 0
// when every worker succeeded, else the first failing worker's status.
int launch_local_workers(int64_t nproc, const std::vector<std::string>& args, double timeout_s);

// A TCP port of 127.0.0.1 that was free a moment ago.
int free_local_port();

}  // namespace app
}  // namespace colt5
