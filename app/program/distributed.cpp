// c10d process groups for data-parallel training, and the local launcher of
// `colt5 train --nproc N` (distributed.h).
#include "program/distributed.h"

// app/CMakeLists.txt defines COLT5_WITH_DISTRIBUTED (and COLT5_WITH_NCCL) for
// this file when the LibTorch found has c10d with Gloo; c10d's headers need
// the macros of its backends (PyTorch's CMake package defines them too).
#ifdef COLT5_WITH_DISTRIBUTED
#ifndef USE_C10D_GLOO
#define USE_C10D_GLOO
#endif
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/autograd/functions/accumulate_grad.h>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef COLT5_WITH_NCCL
#ifndef USE_C10D_NCCL
#define USE_C10D_NCCL
#endif
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif
#endif
#include <torch/cuda.h>
#include <torch/torch.h>
#ifdef COLT5_WITH_CUDA
#include <c10/cuda/CUDAFunctions.h>
#endif

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <unordered_set>

#include "program/commands.h"
#include "program/error.h"

namespace colt5 {
namespace app {

namespace {

// A non-negative integer from the environment; -1 when unset.
int64_t env_int(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return -1;
  errno = 0;
  char* end = nullptr;
  const long long x = std::strtoll(v, &end, 10);
  if (errno != 0 || *end != '\0' || x < 0)
    throw UsageError(std::string("environment variable ") + name + " must be a non-negative integer, got '" + v + "'");
  return x;
}

std::string message_of(const std::exception& e) {
  if (const auto* c = dynamic_cast<const c10::Error*>(&e)) return c->what_without_backtrace();
  return e.what();
}

}  // namespace

DistOptions resolve_dist_options(DistOptions o) {
  o.launched = std::getenv("COLT5_LAUNCHED") != nullptr;
  const bool explicit_group = o.rank >= 0 || o.world_size >= 0;
  if (o.nproc < 1) throw UsageError("--nproc must be at least 1, got " + std::to_string(o.nproc));
  if (o.launched) {
    o.nproc = 1;  // this process is one of the workers
  } else if (o.nproc > 1) {
    if (explicit_group)
      throw UsageError("--nproc starts its own workers; it cannot be combined with --rank or --world-size");
    if (env_int("WORLD_SIZE") > 1)
      throw UsageError("--nproc cannot be used under a launcher that sets WORLD_SIZE (" +
                       std::string(std::getenv("WORLD_SIZE")) + "); give one or the other");
  }
  if (o.rank < 0) o.rank = env_int("RANK");
  if (o.world_size < 0) o.world_size = env_int("WORLD_SIZE");
  o.explicit_group = (o.launched || o.rank >= 0 || o.world_size >= 0) && distributed_available();
  if (o.world_size < 0) o.world_size = o.nproc > 1 ? o.nproc : 1;
  if (o.rank < 0) o.rank = 0;
  if (o.world_size < 1) throw UsageError("--world-size must be at least 1, got " + std::to_string(o.world_size));
  if (o.rank >= o.world_size)
    throw UsageError("--rank " + std::to_string(o.rank) + " is not below --world-size " + std::to_string(o.world_size));
  if (o.local_rank < 0) o.local_rank = env_int("LOCAL_RANK");
  if (o.master_addr.empty()) {
    const char* a = std::getenv("MASTER_ADDR");
    o.master_addr = a != nullptr && *a != '\0' ? a : "127.0.0.1";
  }
  if (o.master_port < 0) o.master_port = env_int("MASTER_PORT");
  if (o.master_port < 0) o.master_port = 29500;
  if (o.master_port < 1 || o.master_port > 65535)
    throw UsageError("--master-port must be in 1..65535, got " + std::to_string(o.master_port));
  if (!std::isfinite(o.timeout_s) || o.timeout_s <= 0 || o.timeout_s > 7 * 24 * 3600.0)
    throw UsageError("--dist-timeout must be a positive number of seconds (at most a week), got " +
                     std::to_string(o.timeout_s));
  if ((o.world_size > 1 || o.nproc > 1) && !distributed_available())
    throw UsageError(
        "this colt5 was built against a LibTorch without c10d and Gloo (LibTorch >= 2.0 with Gloo and Gloo's "
        "headers are needed); it trains in one process only (--nproc 1, --world-size 1)");
  return o;
}

#ifdef COLT5_WITH_DISTRIBUTED
bool distributed_available() { return true; }
#else
bool distributed_available() { return false; }
#endif

#ifdef COLT5_WITH_NCCL
bool nccl_available() { return true; }
#else
bool nccl_available() { return false; }
#endif

torch::Device process_device(const torch::Device& requested, const DistOptions& o) {
  if (!requested.is_cuda() || o.world_size <= 1) return requested;
  const int64_t count = static_cast<int64_t>(torch::cuda::device_count());
  const int64_t index = o.local_rank >= 0 ? o.local_rank : o.rank % std::max<int64_t>(1, count);
  if (index >= count)
    throw UsageError("rank " + std::to_string(o.rank) + " wants GPU " + std::to_string(index) + " but " +
                     std::to_string(count) + " are visible; start at most one process per GPU");
#ifdef COLT5_WITH_CUDA
  c10::cuda::set_device(static_cast<c10::DeviceIndex>(index));
#endif
  return torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(index));
}

// ------------------------------------------------------------------ process group

#ifdef COLT5_WITH_DISTRIBUTED

// Buckets of gradients, filled by the parameters' hooks during the backward.
struct GradientBuckets {
  struct Bucket {
    std::vector<int64_t> members;  // parameter indices
    std::vector<int64_t> offsets;  // of each member in `flat`
    torch::Tensor flat;
    int64_t pending = 0;  // members still to fill in this round
    bool started = false;
  };
  std::vector<torch::Tensor> params;
  std::vector<int64_t> bucket_of;  // parameter index -> bucket
  std::vector<int64_t> slot_of;    // parameter index -> position in its bucket
  std::vector<char> filled;        // parameter index -> filled in this round
  std::vector<Bucket> buckets;
  std::vector<std::pair<torch::Tensor, unsigned>> hooks;
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  size_t next_start = 0;  // buckets start in index order
  int64_t started_in_backward = 0;
  bool armed = false;
  std::mutex mutex;
};


struct ProcessGroup::Impl {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  torch::Device device = torch::kCPU;
  int rank = 0, world = 1;
  std::string name;
  double timeout_s = 0;
  int64_t round = 0;

  // Waits for every work item; a failure is a DistributedError naming `what`.
  void wait(std::vector<c10::intrusive_ptr<c10d::Work>>& works, const std::string& what) {
    try {
      for (auto& w : works) w->wait();
    } catch (const std::exception& e) {
      throw DistributedError("rank " + std::to_string(rank) + ": the " + what +
                             " failed: another process is gone or did not answer within --dist-timeout " +
                             format_seconds() + " (" + name + ": " + message_of(e) + ")");
    }
  }
  std::string format_seconds() const {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%gs", timeout_s);
    return buf;
  }
  c10::intrusive_ptr<c10d::Work> allreduce(torch::Tensor t) {
    std::vector<at::Tensor> v{std::move(t)};
    return backend->allreduce(v);
  }

  std::unique_ptr<GradientBuckets> grads;
  // Starts every complete bucket from the next in index order (the caller
  // holds grads->mutex).
  void start_ready_buckets();
  ~Impl();
};

ProcessGroup::ProcessGroup(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ProcessGroup::~ProcessGroup() = default;

void ProcessGroup::Impl::start_ready_buckets() {
  while (grads->next_start < grads->buckets.size() && grads->buckets[grads->next_start].pending == 0) {
    auto& bk = grads->buckets[grads->next_start++];
    bk.started = true;
    grads->works.push_back(allreduce(bk.flat));
  }
}

ProcessGroup::Impl::~Impl() {
  if (!grads) return;
  for (auto& [p, h] : grads->hooks) p.remove_hook(h);
}

int ProcessGroup::rank() const { return impl_->rank; }
int ProcessGroup::world_size() const { return impl_->world; }
const char* ProcessGroup::backend() const { return impl_->device.is_cuda() ? "nccl" : "gloo"; }

std::unique_ptr<ProcessGroup> ProcessGroup::join(const DistOptions& o, const torch::Device& device) {
  auto impl = std::make_unique<Impl>();
  impl->rank = static_cast<int>(o.rank);
  impl->world = static_cast<int>(o.world_size);
  impl->device = device;
  impl->timeout_s = o.timeout_s;
  impl->name = device.is_cuda() ? "nccl" : "gloo";
  // A peer that dies closes its sockets; a write to one must come back as an
  // error (which the collective reports), not end this process by SIGPIPE.
  ::signal(SIGPIPE, SIG_IGN);
  const auto timeout = std::chrono::milliseconds(static_cast<int64_t>(o.timeout_s * 1000.0));
  const std::string where = o.master_addr + ":" + std::to_string(o.master_port);
  try {
    c10d::TCPStoreOptions so;
    so.port = static_cast<uint16_t>(o.master_port);
    so.isServer = o.rank == 0;
    so.numWorkers = static_cast<size_t>(o.world_size);
    so.waitWorkers = true;
    so.timeout = timeout;
    impl->store = c10::make_intrusive<c10d::TCPStore>(o.master_addr, so);
  } catch (const std::exception& e) {
    throw DistributedError("rank " + std::to_string(o.rank) + ": rendezvous at " + where + " failed: " +
                           (o.rank == 0 ? "could not serve it, or not all " + std::to_string(o.world_size) +
                                              " processes arrived within --dist-timeout " + impl->format_seconds()
                                        : "rank 0 was not reachable, or not all processes arrived, within "
                                          "--dist-timeout " +
                                              impl->format_seconds()) +
                           " (" + message_of(e) + ")");
  }
  try {
    if (device.is_cuda()) {
#ifdef COLT5_WITH_NCCL
      auto opts = c10d::ProcessGroupNCCL::Options::create();
      opts->timeout = timeout;
      impl->backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(impl->store, impl->rank, impl->world, opts);
#else
      throw UsageError("--device cuda with several processes needs NCCL, and this colt5 was built without it");
#endif
    } else {
      auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
      // GLOO_SOCKET_IFNAME picks the network interface; on one machine the loopback is used.
      const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
      const bool local = o.master_addr == "localhost" || o.master_addr.rfind("127.", 0) == 0;
      if (ifname != nullptr && *ifname != '\0')
        opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
      else if (local)
        opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
      else
        opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      impl->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(impl->store, impl->rank, impl->world, opts);
    }
  } catch (const UsageError&) {
    throw;
  } catch (const std::exception& e) {
    throw DistributedError("rank " + std::to_string(o.rank) + ": could not connect the " + impl->name +
                           " process group of " + std::to_string(o.world_size) + " processes (rendezvous " + where +
                           ") within --dist-timeout " + impl->format_seconds() + ": " + message_of(e));
  }
  return std::unique_ptr<ProcessGroup>(new ProcessGroup(std::move(impl)));
}

namespace {

torch::Tensor member_view(GradientBuckets::Bucket& bk, const torch::Tensor& p, size_t slot) {
  return bk.flat.narrow(0, bk.offsets[slot], p.numel()).view(p.sizes());
}

}  // namespace

void ProcessGroup::attach_gradients(const std::vector<torch::Tensor>& params) {
  if (impl_->grads) throw std::logic_error("ProcessGroup::attach_gradients called twice");
  auto gb = std::make_unique<GradientBuckets>();
  GradientBuckets& G = *gb;
  G.params = params;
  const int64_t n = static_cast<int64_t>(params.size());
  G.bucket_of.assign(static_cast<size_t>(n), -1);
  G.slot_of.assign(static_cast<size_t>(n), -1);
  G.filled.assign(static_cast<size_t>(n), 0);
  int64_t bytes = 0, numel = 0;
  for (int64_t i = n - 1; i >= 0; --i) {
    const torch::Tensor& p = params[static_cast<size_t>(i)];
    const int64_t b = p.numel() * static_cast<int64_t>(p.element_size());
    if (G.buckets.empty() || bytes + b > bucket_bytes ||
        params[static_cast<size_t>(G.buckets.back().members.front())].scalar_type() != p.scalar_type()) {
      if (!G.buckets.empty())
        G.buckets.back().flat = torch::zeros({numel}, params[static_cast<size_t>(G.buckets.back().members.front())]
                                                          .options()
                                                          .requires_grad(false));
      G.buckets.emplace_back();
      bytes = 0;
      numel = 0;
    }
    auto& bk = G.buckets.back();
    G.bucket_of[static_cast<size_t>(i)] = static_cast<int64_t>(G.buckets.size()) - 1;
    G.slot_of[static_cast<size_t>(i)] = static_cast<int64_t>(bk.members.size());
    bk.members.push_back(i);
    bk.offsets.push_back(numel);
    bytes += b;
    numel += p.numel();
  }
  if (!G.buckets.empty())
    G.buckets.back().flat =
        torch::zeros({numel}, params[static_cast<size_t>(G.buckets.back().members.front())].options().requires_grad(false));

  Impl* impl = impl_.get();
  for (int64_t i = 0; i < n; ++i) {
    torch::Tensor p = params[static_cast<size_t>(i)];
    const unsigned h = p.register_hook([impl, i](const torch::Tensor& grad) {
      GradientBuckets& g = *impl->grads;
      std::lock_guard<std::mutex> lock(g.mutex);
      if (!g.armed || g.filled[static_cast<size_t>(i)]) return;
      const torch::Tensor& param = g.params[static_cast<size_t>(i)];
      auto& bk = g.buckets[static_cast<size_t>(g.bucket_of[static_cast<size_t>(i)])];
      torch::NoGradGuard no_grad;
      torch::Tensor dst = member_view(bk, param, static_cast<size_t>(g.slot_of[static_cast<size_t>(i)]));
      // The hook sees this backward's gradient before it is added to what
      // earlier micro-batches left in .grad; the bucket gets the sum.
      if (param.grad().defined())
        torch::add_out(dst, param.grad(), grad);
      else
        dst.copy_(grad);
      g.filled[static_cast<size_t>(i)] = 1;
      if (--bk.pending == 0) impl->start_ready_buckets();
    });
    G.hooks.emplace_back(p, h);
  }
  impl_->grads = std::move(gb);
}

namespace {

// The leaves whose gradients the backward of `loss` accumulates.
std::unordered_set<const c10::TensorImpl*> reached_leaves(const torch::Tensor& loss) {
  std::unordered_set<const c10::TensorImpl*> leaves;
  if (!loss.defined()) return leaves;
  if (!loss.grad_fn()) {
    if (loss.requires_grad()) leaves.insert(loss.unsafeGetTensorImpl());
    return leaves;
  }
  std::unordered_set<const torch::autograd::Node*> seen;
  std::vector<torch::autograd::Node*> stack{loss.grad_fn().get()};
  seen.insert(stack.back());
  while (!stack.empty()) {
    torch::autograd::Node* node = stack.back();
    stack.pop_back();
    if (auto* acc = dynamic_cast<torch::autograd::AccumulateGrad*>(node)) {
      leaves.insert(acc->variable.unsafeGetTensorImpl());
      continue;
    }
    for (const auto& edge : node->next_edges()) {
      torch::autograd::Node* next = edge.function.get();
      if (next != nullptr && seen.insert(next).second) stack.push_back(next);
    }
  }
  return leaves;
}

}  // namespace

void ProcessGroup::arm_gradients(const torch::Tensor& loss) {
  GradientBuckets& G = *impl_->grads;
  const auto reached = reached_leaves(loss);
  std::lock_guard<std::mutex> lock(G.mutex);
  std::fill(G.filled.begin(), G.filled.end(), 0);
  torch::NoGradGuard no_grad;
  for (auto& bk : G.buckets) {
    bk.pending = static_cast<int64_t>(bk.members.size());
    bk.started = false;
    // A parameter the backward will not reach: what earlier micro-batches
    // left in .grad (or zeros) goes in now.
    for (size_t s = 0; s < bk.members.size(); ++s) {
      const torch::Tensor& p = G.params[static_cast<size_t>(bk.members[s])];
      if (reached.count(p.unsafeGetTensorImpl()) != 0) continue;
      torch::Tensor dst = member_view(bk, p, s);
      if (p.grad().defined())
        dst.copy_(p.grad());
      else
        dst.zero_();
      --bk.pending;
    }
  }
  G.works.clear();
  G.next_start = 0;
  G.armed = true;
}

double ProcessGroup::finish_gradients(double value) {
  Impl& g = *impl_;
  GradientBuckets& G = *g.grads;
  ++g.round;
  torch::NoGradGuard no_grad;
  const int64_t n = static_cast<int64_t>(G.params.size());
  torch::Tensor header = torch::zeros({1 + n}, torch::TensorOptions().dtype(torch::kDouble));
  {
    std::lock_guard<std::mutex> lock(G.mutex);
    if (!G.armed) throw std::logic_error("ProcessGroup::finish_gradients without arm_gradients");
    G.armed = false;
    G.started_in_backward = static_cast<int64_t>(G.next_start);
    // Header: the value, then 1 for each parameter with a gradient here.
    auto h = header.accessor<double, 1>();
    h[0] = value;
    for (int64_t i = 0; i < n; ++i)
      h[1 + i] = G.filled[static_cast<size_t>(i)] || G.params[static_cast<size_t>(i)].grad().defined() ? 1.0 : 0.0;
    // The buckets the backward did not complete, from .grad or zeros.
    for (auto& bk : G.buckets) {
      if (bk.started || bk.pending == 0) continue;
      for (size_t s = 0; s < bk.members.size(); ++s) {
        const int64_t i = bk.members[s];
        if (G.filled[static_cast<size_t>(i)]) continue;
        const torch::Tensor& p = G.params[static_cast<size_t>(i)];
        torch::Tensor dst = member_view(bk, p, s);
        if (p.grad().defined())
          dst.copy_(p.grad());
        else
          dst.zero_();
      }
      bk.pending = 0;
    }
    g.start_ready_buckets();
  }
  header = header.to(g.device);
  G.works.push_back(g.allreduce(header));
  g.wait(G.works, "gradient all-reduce");
  G.works.clear();

  header = header.to(torch::kCPU);
  auto hs = header.accessor<double, 1>();
  const double world = static_cast<double>(g.world);
  for (auto& bk : G.buckets) {
    bk.flat.div_(world);
    for (size_t s = 0; s < bk.members.size(); ++s) {
      const int64_t i = bk.members[s];
      const torch::Tensor& p = G.params[static_cast<size_t>(i)];
      torch::Tensor avg = member_view(bk, p, s);
      if (hs[1 + i] == 0)
        p.mutable_grad() = torch::Tensor();
      else if (p.grad().defined())
        p.mutable_grad().copy_(avg);
      else
        p.mutable_grad() = avg.clone();
    }
  }
  return hs[0] / world;
}

int64_t ProcessGroup::gradient_buckets() const {
  return impl_->grads ? static_cast<int64_t>(impl_->grads->buckets.size()) : 0;
}
int64_t ProcessGroup::buckets_started_in_backward() const {
  return impl_->grads ? impl_->grads->started_in_backward : 0;
}

double ProcessGroup::average_gradients(const std::vector<torch::Tensor>& params, double value) {
  if (!impl_->grads) attach_gradients(params);
  arm_gradients(torch::Tensor());
  return finish_gradients(value);
}

std::vector<double> ProcessGroup::sum(const std::vector<double>& values) {
  torch::Tensor t = torch::tensor(values, torch::TensorOptions().dtype(torch::kDouble)).to(impl_->device);
  std::vector<c10::intrusive_ptr<c10d::Work>> works{impl_->allreduce(t)};
  impl_->wait(works, "all-reduce");
  t = t.to(torch::kCPU).contiguous();
  return std::vector<double>(t.data_ptr<double>(), t.data_ptr<double>() + t.numel());
}

bool ProcessGroup::all(bool ok) { return sum({ok ? 0.0 : 1.0})[0] == 0.0; }

void ProcessGroup::broadcast(const std::vector<torch::Tensor>& tensors) {
  torch::NoGradGuard no_grad;
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  std::vector<std::vector<at::Tensor>> holders;
  holders.reserve(tensors.size());
  for (const auto& t : tensors) {
    holders.push_back({t.detach()});
    works.push_back(impl_->backend->broadcast(holders.back()));
  }
  impl_->wait(works, "broadcast of rank 0's weights");
}

#else  // !COLT5_WITH_DISTRIBUTED

struct ProcessGroup::Impl {};
ProcessGroup::ProcessGroup(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ProcessGroup::~ProcessGroup() = default;
int ProcessGroup::rank() const { return 0; }
int ProcessGroup::world_size() const { return 1; }
const char* ProcessGroup::backend() const { return "none"; }
std::unique_ptr<ProcessGroup> ProcessGroup::join(const DistOptions&, const torch::Device&) {
  throw UsageError("this colt5 was built without the distributed engine (c10d with Gloo)");
}
void ProcessGroup::attach_gradients(const std::vector<torch::Tensor>&) {}
void ProcessGroup::arm_gradients(const torch::Tensor&) {}
double ProcessGroup::finish_gradients(double value) { return value; }
int64_t ProcessGroup::gradient_buckets() const { return 0; }
int64_t ProcessGroup::buckets_started_in_backward() const { return 0; }
double ProcessGroup::average_gradients(const std::vector<torch::Tensor>&, double value) { return value; }
std::vector<double> ProcessGroup::sum(const std::vector<double>& values) { return values; }
bool ProcessGroup::all(bool ok) { return ok; }
void ProcessGroup::broadcast(const std::vector<torch::Tensor>&) {}

#endif

// ------------------------------------------------------------------ launcher

int free_local_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) throw std::runtime_error(std::string("cannot open a socket: ") + std::strerror(errno));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof addr;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    const int err = errno;
    ::close(fd);
    throw std::runtime_error(std::string("cannot find a free port on 127.0.0.1: ") + std::strerror(err));
  }
  ::close(fd);
  return ntohs(addr.sin_port);
}

namespace {

volatile sig_atomic_t g_forward_signal = 0;
void on_signal(int sig) { g_forward_signal = sig; }

std::string describe_status(int status) {
  if (WIFEXITED(status)) return "exited with status " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status))
    return "was killed by signal " + std::to_string(WTERMSIG(status)) + " (" + ::strsignal(WTERMSIG(status)) + ")";
  return "ended with wait status " + std::to_string(status);
}

}  // namespace

int launch_local_workers(int64_t nproc, const std::vector<std::string>& args, double timeout_s) {
  const int port = free_local_port();
  // Each worker gets its share of the cores unless the user chose.
  const std::string threads = std::to_string(std::max<int64_t>(1, available_cores() / nproc));
  std::vector<char*> argv;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);

  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  struct sigaction old_int {
  }, old_term{};
  ::sigaction(SIGINT, &sa, &old_int);
  ::sigaction(SIGTERM, &sa, &old_term);
  g_forward_signal = 0;
  std::fflush(stdout);
  std::fflush(stderr);

  const pid_t launcher = ::getpid();
  std::vector<pid_t> pids;
  for (int64_t r = 0; r < nproc; ++r) {
    const pid_t pid = ::fork();
    if (pid < 0) {
      for (pid_t p : pids) ::kill(p, SIGTERM);
      for (pid_t p : pids) ::waitpid(p, nullptr, 0);
      throw std::runtime_error(std::string("cannot start worker processes: ") + std::strerror(errno));
    }
    if (pid == 0) {
      ::signal(SIGINT, SIG_DFL);
      ::signal(SIGTERM, SIG_DFL);
      // A worker ends with its launcher.
      ::prctl(PR_SET_PDEATHSIG, SIGTERM);
      if (::getppid() != launcher) ::_exit(1);
      ::setenv("COLT5_LAUNCHED", "1", 1);
      ::setenv("RANK", std::to_string(r).c_str(), 1);
      ::setenv("LOCAL_RANK", std::to_string(r).c_str(), 1);
      ::setenv("WORLD_SIZE", std::to_string(nproc).c_str(), 1);
      ::setenv("LOCAL_WORLD_SIZE", std::to_string(nproc).c_str(), 1);
      ::setenv("MASTER_ADDR", "127.0.0.1", 1);
      ::setenv("MASTER_PORT", std::to_string(port).c_str(), 1);
      ::setenv("OMP_NUM_THREADS", threads.c_str(), 0);
      ::execv("/proc/self/exe", argv.data());
      std::fprintf(stderr, "colt5: error: cannot start worker %lld: %s\n", static_cast<long long>(r),
                   std::strerror(errno));
      ::_exit(127);
    }
    pids.push_back(pid);
  }

  using Clock = std::chrono::steady_clock;
  std::vector<bool> alive(pids.size(), true);
  size_t running = pids.size();
  int result = 0;
  bool failed = false, terminated = false, killed = false;
  Clock::time_point term_at{}, kill_at{};
  auto signal_all = [&](int sig) {
    for (size_t i = 0; i < pids.size(); ++i)
      if (alive[i]) ::kill(pids[i], sig);
  };
  while (running > 0) {
    for (size_t i = 0; i < pids.size(); ++i) {
      if (!alive[i]) continue;
      int status = 0;
      const pid_t p = ::waitpid(pids[i], &status, WNOHANG);
      if (p == 0 || (p < 0 && errno == EINTR)) continue;
      alive[i] = false;
      --running;
      if (p < 0) continue;
      const bool ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
      if (!ok && !failed && g_forward_signal == 0) {
        failed = true;
        result = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        std::fflush(stdout);
        std::fprintf(stderr, "colt5: worker rank %zu (pid %d) %s; the others stop when they notice (at most %gs)\n", i,
                     static_cast<int>(p), describe_status(status).c_str(), timeout_s);
        term_at = Clock::now() + std::chrono::milliseconds(static_cast<int64_t>((timeout_s + 10) * 1000));
      }
    }
    if (g_forward_signal != 0) {
      const int sig = g_forward_signal;
      g_forward_signal = 0;
      if (result == 0) result = 128 + sig;
      failed = true;
      signal_all(sig);
      term_at = Clock::now() + std::chrono::seconds(10);
    }
    const auto now = Clock::now();
    if (failed && !terminated && now >= term_at) {
      std::fprintf(stderr, "colt5: stopping the %zu worker(s) still running\n", running);
      signal_all(SIGTERM);
      terminated = true;
      kill_at = now + std::chrono::seconds(5);
    }
    if (terminated && !killed && now >= kill_at) {
      signal_all(SIGKILL);
      killed = true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ::sigaction(SIGINT, &old_int, nullptr);
  ::sigaction(SIGTERM, &old_term, nullptr);
  return result;
}

}  // namespace app
}  // namespace colt5
