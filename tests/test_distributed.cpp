// Data-parallel training of the `colt5` program (app/program/distributed.h):
// processes of the built program on 127.0.0.1 with Gloo. Two processes equal
// one with the same global batch; a resumed two-process run equals an
// uninterrupted one; a killed, stopped or missing peer ends the others with
// an error within --dist-timeout and leaves the last checkpoint intact.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "colt5/safetensors.h"
#include "program/checkpoint.h"
#include "program/distributed.h"
#include "program/files.h"
#include "program/train.h"
#include "support/app_fixtures.h"

using namespace colt5::app;

namespace {

const std::string kCli = std::string(COLT5_BINARY_DIR) + "/app/colt5";

std::string temp_dir(const std::string& name) { return colt5::app_testing::fresh_temp_dir("test_dist_tmp", name); }

std::string slurp(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// A running `colt5` process whose stdout and stderr go to files.
struct Proc {
  pid_t pid = -1;
  std::string out, err;
  std::string stdout_text() const { return slurp(out); }
  std::string stderr_text() const { return slurp(err); }
};

Proc start(const std::vector<std::string>& args, const std::string& log_prefix) {
  Proc p;
  p.out = log_prefix + ".out";
  p.err = log_prefix + ".err";
  std::vector<std::string> full{kCli};
  full.insert(full.end(), args.begin(), args.end());
  p.pid = ::fork();
  if (p.pid == 0) {
    const int out = ::open(p.out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    const int err = ::open(p.err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (out < 0 || err < 0) ::_exit(126);
    ::dup2(out, 1);
    ::dup2(err, 2);
    for (const char* v : {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "COLT5_LAUNCHED"})
      ::unsetenv(v);
    std::vector<char*> argv;
    for (auto& a : full) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    ::execv(kCli.c_str(), argv.data());
    ::_exit(127);
  }
  return p;
}

struct Exit {
  int status = -1;  // wait status
  double seconds = 0;
  bool timed_out = false;
  int code() const { return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status); }
};

// Waits at most limit_s for the process; a process still running then is killed (timed_out).
Exit wait_for(const Proc& p, double limit_s) {
  Exit e;
  const auto t0 = std::chrono::steady_clock::now();
  while (true) {
    const pid_t r = ::waitpid(p.pid, &e.status, WNOHANG);
    e.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (r == p.pid) return e;
    if (e.seconds > limit_s) {
      e.timed_out = true;
      ::kill(p.pid, SIGKILL);
      ::waitpid(p.pid, &e.status, 0);
      return e;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

Exit run(const std::vector<std::string>& args, const std::string& log_prefix, double limit_s = 240) {
  return wait_for(start(args, log_prefix), limit_s);
}

// A tiny routed model on the retrieval task; `extra` (flag, value, ...) adds or overrides flags.
std::vector<std::string> tiny_args(const std::string& out, const std::vector<std::string>& extra = {}) {
  std::vector<std::pair<std::string, std::string>> flags{{"--threads", "1"},
                                                         {"--progress", "never"},
                                                         {"--out", out},
                                                         {"--dim", "32"},
                                                         {"--depth", "1"},
                                                         {"--light-heads", "2"},
                                                         {"--light-dim-head", "16"},
                                                         {"--heavy-heads", "2"},
                                                         {"--heavy-dim-head", "16"},
                                                         {"--window", "16"},
                                                         {"--heavy-q", "8"},
                                                         {"--heavy-kv", "16"},
                                                         {"--heavy-ff-tokens", "8"},
                                                         {"--seq-len", "96"},
                                                         {"--batch", "4"},
                                                         {"--warmup", "2"},
                                                         {"--eval-every", "3"},
                                                         {"--save-every", "3"},
                                                         {"--log-every", "1"},
                                                         {"--task-keys", "8"},
                                                         {"--task-values", "8"},
                                                         {"--task-filler", "16"},
                                                         {"--task-pairs", "2"},
                                                         {"--task-eval-size", "16"},
                                                         {"--lm-weight", "0.1"},
                                                         {"--seed", "7"}};
  for (size_t i = 0; i + 1 < extra.size(); i += 2) {
    bool replaced = false;
    for (auto& f : flags)
      if (f.first == extra[i]) {
        f.second = extra[i + 1];
        replaced = true;
      }
    if (!replaced) flags.emplace_back(extra[i], extra[i + 1]);
  }
  std::vector<std::string> a{"train"};
  for (const auto& f : flags) {
    a.push_back(f.first);
    a.push_back(f.second);
  }
  return a;
}

std::string describe(const Exit& e, const Proc& p) {
  return "exit " + std::to_string(e.code()) + (e.timed_out ? " (timed out)" : "") + " after " +
         std::to_string(e.seconds) + "s\nstdout:\n" + p.stdout_text() + "\nstderr:\n" + p.stderr_text();
}

// Largest absolute difference between the weights of two checkpoints, and whether they differ from `base`.
double max_weight_difference(const std::string& a_ckpt, const std::string& b_ckpt) {
  auto a = colt5::load_safetensors(a_ckpt + "/model.safetensors");
  auto b = colt5::load_safetensors(b_ckpt + "/model.safetensors");
  EXPECT_EQ(a.tensors.size(), b.tensors.size());
  double worst = 0;
  for (const auto& kv : a.tensors)
    worst =
        std::max(worst, (kv.second.to(torch::kDouble) - b.at(kv.first).to(torch::kDouble)).abs().max().item<double>());
  return worst;
}

void require_cli() {
  ASSERT_TRUE(path_exists(kCli)) << "the colt5 program is not built at " << kCli
                                 << " (build the colt5-cli target with the tests)";
}

// The pids of a process's children (the workers of a launcher).
std::vector<pid_t> children_of(pid_t pid) {
  std::vector<pid_t> out;
  std::ifstream in("/proc/" + std::to_string(pid) + "/task/" + std::to_string(pid) + "/children");
  pid_t c;
  while (in >> c) out.push_back(c);
  return out;
}

bool wait_until(const std::function<bool()>& cond, double limit_s) {
  const auto t0 = std::chrono::steady_clock::now();
  while (std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() < limit_s) {
    if (cond()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return cond();
}

// A build without the distributed engine (Debian's LibTorch 1.13) refuses
// several processes with an error saying why, before anything is written.
void expect_refused() {
  const std::string dir = temp_dir("refused");
  Proc p = start(tiny_args(dir + "/run", {"--nproc", "2"}), dir + "/log");
  Exit e = wait_for(p, 120);
  EXPECT_EQ(e.code(), 2) << describe(e, p);
  EXPECT_NE(p.stderr_text().find("built against a LibTorch without c10d and Gloo"), std::string::npos)
      << p.stderr_text();
  EXPECT_FALSE(path_exists(dir + "/run"));
  remove_tree(dir);
}

}  // namespace

// Each test below checks the data-parallel runs where the build has the
// engine, and that several processes are refused where it has not.
#define COLT5_REQUIRE_ENGINE()                             \
  do {                                                     \
    require_cli();                                         \
    if (::testing::Test::HasFatalFailure()) return;        \
    if (!distributed_available()) return expect_refused(); \
  } while (0)

// The launcher's environment (as torchrun sets it) places the process; a
// build without the engine refuses a world of several processes by name.
TEST(Distributed, SettingsComeFromTheLauncherEnvironment) {
  struct Env {
    std::vector<std::string> names;
    ~Env() {
      for (const auto& n : names) ::unsetenv(n.c_str());
    }
    void set(const std::string& n, const std::string& v) {
      ::setenv(n.c_str(), v.c_str(), 1);
      names.push_back(n);
    }
  } env;
  env.set("RANK", "3");
  env.set("WORLD_SIZE", "4");
  env.set("LOCAL_RANK", "1");
  env.set("MASTER_ADDR", "10.1.2.3");
  env.set("MASTER_PORT", "1234");
  if (!distributed_available()) {
    try {
      resolve_dist_options(DistOptions());
      FAIL() << "a world of 4 was accepted without the distributed engine";
    } catch (const UsageError& e) {
      EXPECT_NE(std::string(e.what()).find("without c10d and Gloo"), std::string::npos) << e.what();
    }
    return;
  }
  DistOptions o = resolve_dist_options(DistOptions());
  EXPECT_EQ(o.rank, 3);
  EXPECT_EQ(o.world_size, 4);
  EXPECT_EQ(o.local_rank, 1);
  EXPECT_EQ(o.master_addr, "10.1.2.3");
  EXPECT_EQ(o.master_port, 1234);
  EXPECT_FALSE(o.launched);
  // Flags win over the environment.
  DistOptions f;
  f.rank = 0;
  f.master_port = 4321;
  o = resolve_dist_options(f);
  EXPECT_EQ(o.rank, 0);
  EXPECT_EQ(o.master_port, 4321);
  // --nproc under a launcher that already made a world, and a malformed variable, are errors.
  DistOptions n;
  n.nproc = 2;
  EXPECT_THROW(resolve_dist_options(n), UsageError);
  env.set("RANK", "two");
  try {
    resolve_dist_options(DistOptions());
    FAIL() << "RANK=two was accepted";
  } catch (const UsageError& e) {
    EXPECT_NE(std::string(e.what()).find("RANK must be a non-negative integer, got 'two'"), std::string::npos)
        << e.what();
  }
}

TEST(Distributed, BadSettingsAreClearErrors) {
  COLT5_REQUIRE_ENGINE();
  const std::string dir = temp_dir("bad");
  struct Case {
    std::vector<std::string> extra;
    std::string message;
  };
  const std::vector<Case> cases{
      {{"--nproc", "3"}, "--batch 4 (the global batch) is not divisible by --nproc 3"},
      {{"--nproc", "2", "--rank", "0"}, "cannot be combined with --rank"},
      {{"--rank", "2", "--world-size", "2"}, "--rank 2 is not below --world-size 2"},
      {{"--nproc", "0"}, "--nproc must be at least 1"},
      {{"--world-size", "2", "--master-port", "70000"}, "--master-port must be in 1..65535"},
      {{"--world-size", "2", "--dist-timeout", "0"}, "--dist-timeout must be a positive number"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    Proc p = start(tiny_args(dir + "/run", cases[i].extra), dir + "/log" + std::to_string(i));
    Exit e = wait_for(p, 60);
    EXPECT_EQ(e.code(), 2) << describe(e, p);
    EXPECT_NE(p.stderr_text().find(cases[i].message), std::string::npos) << p.stderr_text();
  }
  EXPECT_FALSE(path_exists(dir + "/run/metrics.csv"));
  remove_tree(dir);
}

TEST(Distributed, TwoProcessesEqualOneWithTheSameGlobalBatch) {
  COLT5_REQUIRE_ENGINE();
  const std::string dir = temp_dir("equal");
  // Gradient accumulation and gradient clipping take part too.
  const std::vector<std::string> common{"--steps", "6", "--grad-accum", "2", "--clip", "0.5"};
  auto one_args = tiny_args(dir + "/one", common);
  Proc one = start(one_args, dir + "/one");
  Exit e1 = wait_for(one, 240);
  ASSERT_EQ(e1.code(), 0) << describe(e1, one);
  auto two_args = tiny_args(dir + "/two", common);
  two_args.insert(two_args.end(), {"--nproc", "2"});
  Proc two = start(two_args, dir + "/two");
  Exit e2 = wait_for(two, 240);
  ASSERT_EQ(e2.code(), 0) << describe(e2, two);
  EXPECT_NE(two.stdout_text().find("data-parallel: 2 processes (gloo), 2 of the 4 sequences"), std::string::npos)
      << two.stdout_text();

  CheckpointInfo a = read_checkpoint_info(dir + "/one"), b = read_checkpoint_info(dir + "/two");
  ASSERT_EQ(a.step, 6);
  ASSERT_EQ(b.step, 6);
  EXPECT_EQ(b.train.batch_size, 4);  // the global batch is what the checkpoint records
  const double diff = max_weight_difference(a.dir, b.dir);
  EXPECT_LT(diff, 5e-5) << "the two-process run's weights differ from the one-process run's";
  // The comparison is not vacuous: training moved the weights well beyond that.
  Proc init = start(tiny_args(dir + "/init", {"--steps", "6", "--stop-after", "1", "--lr", "1e-12", "--warmup", "0"}),
                    dir + "/init");
  Exit e0 = wait_for(init, 240);
  ASSERT_EQ(e0.code(), 0) << describe(e0, init);
  EXPECT_GT(max_weight_difference(a.dir, read_checkpoint_info(dir + "/init").dir), 1e-3);
  // The losses and the held-out accuracy agree too; rank 0 alone wrote the metrics (one row per step).
  auto ra = read_metrics(dir + "/one/metrics.csv"), rb = read_metrics(dir + "/two/metrics.csv");
  ASSERT_EQ(ra.size(), 6u);
  ASSERT_EQ(rb.size(), 6u);
  for (size_t i = 0; i < ra.size(); ++i) {
    EXPECT_EQ(ra[i].step, rb[i].step);
    EXPECT_NEAR(ra[i].train_loss, rb[i].train_loss, 1e-5 * std::abs(ra[i].train_loss)) << "step " << ra[i].step;
  }
  EXPECT_NEAR(ra.back().valid_loss, rb.back().valid_loss, 1e-4);
  EXPECT_DOUBLE_EQ(ra.back().valid_accuracy, rb.back().valid_accuracy);
  EXPECT_TRUE(path_exists(dir + "/two/loss.svg"));
  remove_tree(dir);
}

TEST(Distributed, ResumedTwoProcessRunEqualsUninterruptedAndAnyWorldSizeResumes) {
  COLT5_REQUIRE_ENGINE();
  const std::string dir = temp_dir("resume");
  auto with = [&](const std::string& out, std::vector<std::string> extra) { return tiny_args(out, extra); };
  Exit e;
  Proc straight = start(with(dir + "/straight", {"--steps", "6", "--nproc", "2"}), dir + "/straight");
  e = wait_for(straight, 240);
  ASSERT_EQ(e.code(), 0) << describe(e, straight);
  Proc half = start(with(dir + "/half", {"--steps", "6", "--stop-after", "3", "--nproc", "2"}), dir + "/half");
  e = wait_for(half, 240);
  ASSERT_EQ(e.code(), 0) << describe(e, half);
  const CheckpointInfo at3 = read_checkpoint_info(dir + "/half");
  ASSERT_EQ(at3.step, 3);
  // Resumed on two processes, and (from the same checkpoint, into another directory) on one.
  Proc rest = start({"train", "--threads", "1", "--progress", "never", "--resume", dir + "/half", "--nproc", "2"},
                    dir + "/rest");
  e = wait_for(rest, 240);
  ASSERT_EQ(e.code(), 0) << describe(e, rest);
  EXPECT_NE(rest.stdout_text().find("resumed from"), std::string::npos) << rest.stdout_text();
  Proc single = start({"train", "--threads", "1", "--progress", "never", "--resume", at3.dir, "--out", dir + "/single"},
                      dir + "/single");
  e = wait_for(single, 240);
  ASSERT_EQ(e.code(), 0) << describe(e, single);

  CheckpointInfo s = read_checkpoint_info(dir + "/straight"), r = read_checkpoint_info(dir + "/half"),
                 one = read_checkpoint_info(dir + "/single");
  ASSERT_EQ(s.step, 6);
  ASSERT_EQ(r.step, 6);
  ASSERT_EQ(one.step, 6);
  auto a = colt5::load_safetensors(s.dir + "/model.safetensors");
  auto b = colt5::load_safetensors(r.dir + "/model.safetensors");
  ASSERT_EQ(a.tensors.size(), b.tensors.size());
  for (const auto& kv : a.tensors) EXPECT_TRUE(torch::equal(kv.second, b.at(kv.first))) << kv.first;
  auto oa = colt5::load_safetensors(s.dir + "/optimizer.safetensors");
  auto ob = colt5::load_safetensors(r.dir + "/optimizer.safetensors");
  for (const auto& kv : oa.tensors) EXPECT_TRUE(torch::equal(kv.second, ob.at(kv.first))) << kv.first;
  EXPECT_LT(max_weight_difference(s.dir, one.dir), 5e-5);
  auto rows = read_metrics(dir + "/half/metrics.csv");
  ASSERT_EQ(rows.size(), 6u);
  for (size_t i = 0; i < rows.size(); ++i) EXPECT_EQ(rows[i].step, static_cast<int64_t>(i + 1));
  remove_tree(dir);
}

// Whether process pid ignores signal sig, from the SigIgn mask of
// /proc/pid/status (hexadecimal, bit sig - 1).
static bool ignores_signal(pid_t pid, int sig) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("SigIgn:", 0) != 0) continue;
    const unsigned long long mask = std::stoull(line.substr(7), nullptr, 16);
    return ((mask >> (sig - 1)) & 1ull) != 0;
  }
  ADD_FAILURE() << "no SigIgn line in /proc/" << pid << "/status";
  return false;
}

TEST(Distributed, KilledWorkerEndsTheOtherWithinTheTimeoutAndTheCheckpointSurvives) {
  COLT5_REQUIRE_ENGINE();
  const std::string dir = temp_dir("killed");
  const std::string port = std::to_string(free_local_port());
  const double timeout = 20;
  auto args = [&](int rank) {
    return tiny_args(dir + "/run",
                     {"--steps", "100000", "--save-every", "2", "--eval-every", "1000", "--rank", std::to_string(rank),
                      "--world-size", "2", "--master-port", port, "--dist-timeout", "20"});
  };
  Proc r0 = start(args(0), dir + "/rank0");
  Proc r1 = start(args(1), dir + "/rank1");
  ASSERT_TRUE(wait_until([&] { return !list_checkpoints(dir + "/run").empty(); }, 120))
      << "no checkpoint within 120 s\n"
      << r0.stderr_text() << r1.stderr_text();
  // A write to the dead peer's socket must come back as an error, not end
  // rank 0 by SIGPIPE: the joined process ignores the signal (/proc's SigIgn
  // mask, bit SIGPIPE - 1).
  EXPECT_TRUE(ignores_signal(r0.pid, SIGPIPE)) << "rank 0 does not ignore SIGPIPE";
  ASSERT_EQ(::kill(r1.pid, SIGKILL), 0);
  Exit e1 = wait_for(r1, 30);
  EXPECT_TRUE(WIFSIGNALED(e1.status));
  Exit e0 = wait_for(r0, timeout + 15);
  EXPECT_FALSE(e0.timed_out) << "rank 0 still ran " << e0.seconds << " s after its peer was killed";
  EXPECT_EQ(e0.code(), 1) << describe(e0, r0);
  EXPECT_LT(e0.seconds, timeout + 5);
  const std::string err = r0.stderr_text();
  EXPECT_NE(err.find("colt5: error: rank 0: the "), std::string::npos) << err;
  EXPECT_NE(err.find("another process is gone or did not answer"), std::string::npos) << err;
  EXPECT_NE(err.find("continue with --resume " + dir + "/run"), std::string::npos) << err;
  // The newest checkpoint is complete and loads; training can continue from it.
  CheckpointInfo info = read_checkpoint_info(dir + "/run");
  EXPECT_GE(info.step, 2);
  EXPECT_NE(err.find("newest checkpoint is " + dir + "/run/" + checkpoint_name(info.step)), std::string::npos) << err;
  remove_tree(dir);
}

TEST(Distributed, StoppedWorkerTimesOutAndAMissingPeerFailsTheRendezvous) {
  COLT5_REQUIRE_ENGINE();
  const std::string dir = temp_dir("stopped");
  const std::string port = std::to_string(free_local_port());
  auto args = [&](int rank) {
    return tiny_args(dir + "/run",
                     {"--steps", "100000", "--save-every", "2", "--eval-every", "1000", "--rank", std::to_string(rank),
                      "--world-size", "2", "--master-port", port, "--dist-timeout", "4"});
  };
  Proc r0 = start(args(0), dir + "/rank0");
  Proc r1 = start(args(1), dir + "/rank1");
  ASSERT_TRUE(wait_until([&] { return !list_checkpoints(dir + "/run").empty(); }, 120)) << r0.stderr_text();
  // A hung peer: its connections stay open, so only the timeout can tell.
  ASSERT_EQ(::kill(r1.pid, SIGSTOP), 0);
  Exit e0 = wait_for(r0, 30);
  ::kill(r1.pid, SIGKILL);
  wait_for(r1, 30);
  EXPECT_FALSE(e0.timed_out) << describe(e0, r0);
  EXPECT_EQ(e0.code(), 1) << describe(e0, r0);
  EXPECT_LT(e0.seconds, 4 + 10) << describe(e0, r0);
  EXPECT_NE(r0.stderr_text().find("did not answer within --dist-timeout 4s"), std::string::npos) << r0.stderr_text();
  EXPECT_GE(read_checkpoint_info(dir + "/run").step, 2);

  // A peer that never comes: rank 1 alone fails the rendezvous within the timeout.
  Proc lone = start(tiny_args(dir + "/lone", {"--rank", "1", "--world-size", "2", "--master-port",
                                              std::to_string(free_local_port()), "--dist-timeout", "3"}),
                    dir + "/lone");
  Exit el = wait_for(lone, 60);
  EXPECT_EQ(el.code(), 1) << describe(el, lone);
  // (from the program's start: loading LibTorch on a busy machine takes part of it)
  EXPECT_LT(el.seconds, 3 + 20) << describe(el, lone);
  EXPECT_NE(lone.stderr_text().find("rank 1: rendezvous at 127.0.0.1:"), std::string::npos) << lone.stderr_text();
  remove_tree(dir);
}

TEST(Distributed, LauncherReportsAKilledWorkerAndStopsTheRest) {
  COLT5_REQUIRE_ENGINE();
  const std::string dir = temp_dir("launcher");
  Proc l = start(tiny_args(dir + "/run", {"--steps", "100000", "--save-every", "2", "--eval-every", "1000", "--nproc",
                                          "2", "--dist-timeout", "20"}),
                 dir + "/launcher");
  ASSERT_TRUE(wait_until([&] { return !list_checkpoints(dir + "/run").empty(); }, 120)) << l.stderr_text();
  std::vector<pid_t> workers = children_of(l.pid);
  ASSERT_EQ(workers.size(), 2u);
  // Which child is rank 1 does not matter: kill the second one started.
  ASSERT_EQ(::kill(workers[1], SIGKILL), 0);
  Exit e = wait_for(l, 40);
  EXPECT_FALSE(e.timed_out) << describe(e, l);
  EXPECT_NE(e.code(), 0) << describe(e, l);
  const std::string err = l.stderr_text();
  EXPECT_NE(err.find("was killed by signal 9"), std::string::npos) << err;
  EXPECT_NE(err.find("another process is gone or did not answer"), std::string::npos) << err;
  for (pid_t w : workers) EXPECT_NE(::kill(w, 0), 0) << "worker " << w << " is still running";
  EXPECT_GE(read_checkpoint_info(dir + "/run").step, 2);
  remove_tree(dir);
}

// The gradient buckets are all-reduced while the backward runs: with small
// buckets, most start before the backward ends, and the averaged gradients of
// a world of one equal the plain ones exactly, with accumulation over two
// backwards, a parameter without a gradient and one used twice.
TEST(Distributed, GradientBucketsStartDuringTheBackwardAndAverageExactly) {
  COLT5_REQUIRE_ENGINE();
  DistOptions o;
  o.rank = 0;
  o.world_size = 1;
  o.master_port = free_local_port();
  o.timeout_s = 30;
  o = resolve_dist_options(o);
  EXPECT_TRUE(o.explicit_group);
  auto group = ProcessGroup::join(o, torch::kCPU);
  ASSERT_EQ(group->world_size(), 1);
  group->bucket_bytes = 64 * 64 * 4;  // one 64x64 float matrix per bucket

  torch::manual_seed(3);
  std::vector<torch::Tensor> params;
  for (int i = 0; i < 8; ++i) params.push_back(torch::randn({64, 64}).requires_grad_(true));
  torch::Tensor unused = torch::randn({5}).requires_grad_(true);
  params.push_back(unused);
  auto loss_of = [&](const torch::Tensor& x) {
    torch::Tensor h = x;
    for (int i = 0; i < 8; ++i) h = torch::tanh(torch::matmul(h, params[static_cast<size_t>(i)]));
    return (h * h).sum() + params[0].sum();  // params[0] takes part twice
  };
  torch::Tensor x1 = torch::randn({16, 64}), x2 = torch::randn({16, 64});

  // Reference gradients: two accumulated backwards, no group.
  loss_of(x1).backward();
  loss_of(x2).backward();
  std::vector<torch::Tensor> expected;
  for (int i = 0; i < 8; ++i) expected.push_back(params[static_cast<size_t>(i)].grad().clone());
  for (auto& p : params) p.mutable_grad() = torch::Tensor();

  group->attach_gradients(params);
  EXPECT_EQ(group->gradient_buckets(), 9);  // 8 matrices, and the 5-vector alone (a matrix does not fit beside it)
  for (int round = 0; round < 2; ++round) {
    for (auto& p : params) p.mutable_grad() = torch::Tensor();
    loss_of(x1).backward();  // an earlier micro-batch: not armed, nothing starts
    torch::Tensor loss = loss_of(x2);
    group->arm_gradients(loss);
    loss.backward();
    const double mean = group->finish_gradients(2.5);
    EXPECT_DOUBLE_EQ(mean, 2.5);
    // Every bucket started inside the backward: the matrices' as the backward
    // reached them, the unused parameter's (first in order) at once.
    EXPECT_EQ(group->buckets_started_in_backward(), 9);
    for (int i = 0; i < 8; ++i)
      EXPECT_TRUE(torch::equal(params[static_cast<size_t>(i)].grad(), expected[static_cast<size_t>(i)])) << i;
    EXPECT_FALSE(unused.grad().defined());
  }
}

// `--world-size 1` (or a launcher's WORLD_SIZE=1) joins a process group of one
// and trains exactly as a plain run does.
TEST(Distributed, AWorldOfOneJoinsAGroupAndEqualsAPlainRun) {
  COLT5_REQUIRE_ENGINE();
  const std::string dir = temp_dir("one");
  const std::vector<std::string> common{"--steps", "3", "--grad-accum", "2"};
  Proc plain = start(tiny_args(dir + "/plain", common), dir + "/plain");
  Exit e1 = wait_for(plain, 240);
  ASSERT_EQ(e1.code(), 0) << describe(e1, plain);
  auto args = tiny_args(dir + "/group", common);
  args.insert(args.end(), {"--world-size", "1", "--rank", "0", "--master-port", std::to_string(free_local_port())});
  Proc group = start(args, dir + "/group");
  Exit e2 = wait_for(group, 240);
  ASSERT_EQ(e2.code(), 0) << describe(e2, group);
  EXPECT_NE(group.stdout_text().find("data-parallel: 1 process (gloo)"), std::string::npos) << group.stdout_text();
  EXPECT_EQ(max_weight_difference(read_checkpoint_info(dir + "/plain").dir, read_checkpoint_info(dir + "/group").dir),
            0.0);
  remove_tree(dir);
}
