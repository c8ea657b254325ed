#include "program/commands.h"

#include <torch/torch.h>
#ifdef COLT5_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include <malloc.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>
#include <random>
#include <vector>

#include "colt5/cuda_graph.h"
#include "program/train.h"

namespace colt5 {
namespace app {

// -------------------------------------------------------------------- eval

int run_eval(const std::string& ckpt, const std::string& split, const std::string& device, const std::string& data) {
  LoadedModel lm = load_model(ckpt, device);
  TrainConfig t = lm.info.train;
  if (!data.empty()) {
    if (is_task(t))
      throw UsageError("'" + lm.info.dir + "' is a retrieval-task checkpoint; --data applies to text checkpoints");
    t.data = data;
  }
  t.device = device;
  validate(t, lm.info.model);
  Workload work(t, lm.info.model);
  const auto t0 = std::chrono::steady_clock::now();
  EvalResult r = evaluate(lm.model, work, t, split, 0, lm.device);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("checkpoint %s (step %lld, %s model)\n", lm.info.dir.c_str(), static_cast<long long>(lm.info.step),
              arch_name(lm.info.model.arch));
  if (work.is_task())
    std::printf("%s: accuracy %.4f, loss %.4f on %lld held-out sequences (chance %.4f) [%.1fs]\n", split.c_str(),
                r.accuracy, r.loss, static_cast<long long>(r.count), 1.0 / static_cast<double>(t.task_values), secs);
  else
    std::printf("%s: loss %.4f nats, %.4f bits per character over %lld bytes [%.1fs]\n", split.c_str(), r.loss, r.bpc,
                static_cast<long long>(r.count), secs);
  return 0;
}

// ------------------------------------------------------------------ sample

namespace {

// The next byte from the last position's logits: greedy at temperature 0,
// else a draw from softmax(logits / temperature) over the top_k likeliest.
int64_t next_byte(torch::Tensor logits, double temperature, int64_t top_k, std::mt19937_64& rng) {
  if (!torch::isfinite(logits).all().item<bool>())
    throw std::runtime_error("the model produced non-finite logits; its checkpoint cannot be used for sampling");
  if (temperature == 0) return logits.argmax().item<int64_t>();
  // Shifted by the maximum first, so a tiny temperature gives -inf for the others, never NaN.
  logits = (logits - logits.max()) / temperature;
  if (top_k > 0 && top_k < logits.size(0)) {
    const double kth = std::get<0>(logits.topk(top_k)).min().item<double>();
    logits = logits.masked_fill(logits < kth, -std::numeric_limits<double>::infinity());
  }
  torch::Tensor probs = torch::softmax(logits, 0);
  auto p = probs.accessor<double, 1>();
  const double u = std::uniform_real_distribution<double>(0.0, 1.0)(rng);
  double acc = 0;
  int64_t last_positive = 0;
  for (int64_t j = 0; j < probs.size(0); ++j) {
    if (p[j] > 0) last_positive = j;
    acc += p[j];
    if (u < acc) return j;
  }
  return last_positive;
}

}  // namespace

void check_sample_options(const SampleOptions& o) {
  if (o.length < 0) throw UsageError("--length must be >= 0");
  if (!std::isfinite(o.temperature) || o.temperature < 0)
    throw UsageError("--temperature must be a finite number >= 0 (0: greedy)");
  if (o.top_k < 0) throw UsageError("--top-k must be >= 0 (0: no limit)");
  if (o.prompt.empty()) throw UsageError("--prompt must not be empty");
}

int run_sample(const std::string& ckpt, const SampleOptions& o) {
  check_sample_options(o);
  LoadedModel lm = load_model(ckpt, o.device);
  if (is_task(lm.info.train) || lm.info.model.vocab_size != 256)
    throw UsageError("'" + lm.info.dir +
                     "' is a retrieval-task model; sample needs a byte-level text model (train --data FILE)");
  std::vector<int64_t> tokens;
  for (unsigned char c : o.prompt) tokens.push_back(c);
  if (o.echo) {
    std::fwrite(o.prompt.data(), 1, o.prompt.size(), stdout);
    std::fflush(stdout);
  }
  std::mt19937_64 rng(o.seed);
  torch::NoGradGuard no_grad;
  AutocastGuard autocast(lm.device.is_cuda() && lm.info.train.amp);
  const int64_t ctx_len = lm.info.model.max_seq_len;
  for (int64_t i = 0; i < o.length; ++i) {
    const int64_t start = std::max<int64_t>(0, static_cast<int64_t>(tokens.size()) - ctx_len);
    torch::Tensor ctx = torch::tensor(std::vector<int64_t>(tokens.begin() + start, tokens.end()), torch::kLong)
                            .unsqueeze(0)
                            .to(lm.device);
    torch::Tensor h = lm.model->hidden(ctx);
    torch::Tensor logits = lm.model->logits(h.select(1, h.size(1) - 1))[0].to(torch::kCPU, torch::kDouble);
    const int64_t next = next_byte(logits, o.temperature, o.top_k, rng);
    tokens.push_back(next);
    const char c = static_cast<char>(next);
    std::fwrite(&c, 1, 1, stdout);
    std::fflush(stdout);
  }
  std::fputc('\n', stdout);
  return 0;
}

// ------------------------------------------------------------------- bench

namespace {

double time_ms(const std::function<void()>& fn, int64_t iters, bool cuda) {
  std::vector<double> ms;
  for (int64_t i = 0; i < iters; ++i) {
    if (cuda) torch::cuda::synchronize();
    auto t0 = std::chrono::steady_clock::now();
    fn();
    if (cuda) torch::cuda::synchronize();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

// Peak memory of what runs between reset_peak_memory and peak_memory_mib: on
// CUDA the caching allocator's peak of allocated bytes; on the CPU the rise of
// the process's peak resident set (VmHWM, reset through /proc/self/clear_refs)
// over its resident set at the reset, after returning freed heap memory to the
// system.
double status_mib(const char* field) {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind(field, 0) == 0) return std::stod(line.substr(std::strlen(field))) / 1024.0;
  return NAN;
}

double cpu_baseline_mib = 0;

bool reset_peak_memory(bool cuda) {
#ifdef COLT5_WITH_CUDA
  if (cuda) {
    c10::cuda::CUDACachingAllocator::resetPeakStats(0);
    return true;
  }
#endif
  if (cuda) return false;
  ::malloc_trim(0);
  std::ofstream clear("/proc/self/clear_refs");
  clear << "5";
  clear.flush();
  cpu_baseline_mib = status_mib("VmRSS:");
  return static_cast<bool>(clear);
}

double peak_memory_mib(bool cuda) {
#ifdef COLT5_WITH_CUDA
  if (cuda)
    return static_cast<double>(c10::cuda::CUDACachingAllocator::getDeviceStats(0).allocated_bytes[0].peak) /
           (1024.0 * 1024.0);
#endif
  if (cuda) return NAN;
  return status_mib("VmHWM:") - cpu_baseline_mib;
}

// The training step captured once in a CUDA graph (after two warm-up steps on
// the capturing stream) and replayed: its median time without the host's
// launch overhead. The step must make no host synchronization.
double time_graph_ms(const std::function<void()>& step, int64_t iters) {
#ifdef COLT5_WITH_CUDA
  colt5::CapturedStep graph(step);
  graph.replay();  // the first replay uploads the graph
  return time_ms([&] { graph.replay(); }, iters, true);
#else
  (void)step;
  (void)iters;
  throw UsageError("--cuda-graph needs colt5 built with CUDA");
#endif
}

}  // namespace

void check_bench_options(const ModelConfig& model, const BenchOptions& o) {
  if (o.batch < 1 || o.seq_len < 2 || o.iters < 1 || o.warmup < 0)
    throw UsageError("--batch >= 1, --seq-len >= 2, --iters >= 1 and --warmup-iters >= 0 are required");
  if (o.cuda_graph && o.device != "cuda")
    throw UsageError("--cuda-graph replays the training step from a CUDA graph: it needs --device cuda");
  ModelConfig m = model;
  m.max_seq_len = std::max(m.max_seq_len, o.seq_len);
  TrainConfig t;
  t.data = "bench";  // not the task: any vocabulary
  t.seq_len = o.seq_len;
  t.batch_size = o.batch;
  t.device = o.device;
  validate(t, m);
}

int run_bench(ModelConfig m, const BenchOptions& o) {
  check_bench_options(m, o);
  m.max_seq_len = std::max(m.max_seq_len, o.seq_len);
  const torch::Device device = parse_device(o.device);
  const bool cuda = device.is_cuda();
  const auto& a = m.attn;
  std::printf(
      "colt5 bench on %s: batch %lld x %lld tokens, dim %lld, depth %lld, window %lld, heavy q %lld / kv %lld, "
      "median of %lld (after %lld warm-up)%s\n",
      device_description(device).c_str(), static_cast<long long>(o.batch), static_cast<long long>(o.seq_len),
      static_cast<long long>(m.dim()), static_cast<long long>(m.depth), static_cast<long long>(a.light_window_size()),
      static_cast<long long>(a.num_heavy_tokens_q()), static_cast<long long>(a.num_heavy_tokens_kv()),
      static_cast<long long>(o.iters), static_cast<long long>(o.warmup),
      !cuda ? "" : o.amp ? ", bf16 autocast" : at::globalContext().allowTF32CuBLAS() ? ", float32 with TF32" : ", float32 (TF32 off)");
  std::printf("%-11s %12s %12s %14s %16s %12s%s\n", "model", "parameters", "forward ms", "fwd+bwd ms", "train tokens/s",
              "peak MiB", o.cuda_graph ? "   graph fwd+bwd ms   graph tokens/s" : "");
  std::vector<Arch> archs{Arch::routed, Arch::light_only};
  if (o.dense) archs.push_back(Arch::dense);
  std::vector<double> fwd, both, graphed;
  bool peak_exact = true;
  for (Arch arch : archs) {
    ModelConfig mv = m;
    mv.arch = arch;
    check_memory_fits(mv, o.batch, o.seq_len, true, cuda && o.amp, device,
                      std::string("colt5 bench's ") + arch_name(arch) + " model");
    torch::manual_seed(0);
    LanguageModel model(mv);
    model->to(device);
    torch::Tensor tokens = torch::randint(0, mv.vocab_size, {o.batch, o.seq_len}, torch::kLong).to(device);
    auto forward = [&] {
      torch::NoGradGuard no_grad;
      AutocastGuard ac(cuda && o.amp);
      model->forward(tokens);
    };
    auto train_step = [&] {
      torch::Tensor loss;
      {
        AutocastGuard ac(cuda && o.amp);
        loss = model->forward(tokens).to(torch::kFloat).logsumexp(-1).mean();
      }
      loss.backward();
      model->zero_grad();
    };
    peak_exact = reset_peak_memory(cuda) && peak_exact;
    for (int64_t i = 0; i < o.warmup; ++i) {
      forward();
      train_step();
    }
    fwd.push_back(time_ms(forward, o.iters, cuda));
    both.push_back(time_ms(train_step, o.iters, cuda));
    // Peak memory of the eager steps; the graph keeps its own pool.
    const double peak = peak_memory_mib(cuda);
    const double step_tokens = static_cast<double>(o.batch * o.seq_len);
    std::string graph_cols;
    if (o.cuda_graph) {
      graphed.push_back(time_graph_ms(train_step, o.iters));
      char buf[64];
      std::snprintf(buf, sizeof buf, " %20.2f %16.0f", graphed.back(), step_tokens / (graphed.back() / 1000.0));
      graph_cols = buf;
    }
    std::printf("%-11s %12lld %12.2f %14.2f %16.0f %12.1f%s\n", arch_name(arch),
                static_cast<long long>(count_parameters(*model)), fwd.back(), both.back(),
                step_tokens / (both.back() / 1000.0), peak, graph_cols.c_str());
  }
  std::printf("routed / light-only time: forward %.2fx, forward+backward %.2fx", fwd[0] / fwd[1], both[0] / both[1]);
  if (o.cuda_graph) std::printf(", forward+backward from a graph %.2fx", graphed[0] / graphed[1]);
  std::printf("\n");
  if (o.dense) {
    std::printf("routed / dense time: forward %.2fx, forward+backward %.2fx", fwd[0] / fwd[2], both[0] / both[2]);
    if (o.cuda_graph) std::printf(", forward+backward from a graph %.2fx", graphed[0] / graphed[2]);
    std::printf("\n");
  }
  const char* peak = cuda         ? "CUDA caching allocator, peak allocated bytes while that model ran"
                     : peak_exact ? "rise of the process's peak resident set over its resident set before that model"
                                  : "could not be measured (/proc/self/clear_refs is not writable)";
  std::printf("peak MiB: %s\n", peak);
  return 0;
}

}  // namespace app
}  // namespace colt5
