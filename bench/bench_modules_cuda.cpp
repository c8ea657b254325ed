// The routed modules on one GPU, each against dense fused attention of the
// same shape timed in the same run (median of CUDA events, peak allocated
// memory):
//   - the transformer block (README config: 512 wide, 1024 heavy tokens) from
//     2 x 8192 to 2 x 262144 tokens in bf16 autocast, and 2 x 32768 in float32
//     with TF32 matrix products off (LibTorch's default) and on;
//   - the autoregressive attention (2 x 8192 and 2 x 32768) against dense causal
//     attention; cross attention (1024 queries over 1,048,576 memories); image
//     attention (1 x 32 x 256 x 256);
//   - a per-phase profile of the block and of the autoregressive module (each
//     phase run alone on the shapes the module gives it, forward+backward),
//     and whether a training step makes any host-device synchronization.
// Every module's bf16 output is checked against its float32 output on the same
// input before it is timed.
// The block and the autoregressive module are also timed as a training step
// replayed from a CUDA graph (no host launch overhead).
// Flags: --quick (8k and 32k only), --no-profile, --only block|autoregressive|cross|topk|image|fp32
// (fp32: the block's float32 rows alone),
// --kernels (only the GPU time of each module's training step by colt5 scope
// and by kernel, from LibTorch's Kineto profiler: kernel_profile.h).
#include <torch/torch.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "colt5/coor_descent.h"
#include "colt5/cuda_graph.h"
#include "colt5/nn/conditional.h"
#include "colt5/compat.h"
#include "colt5/nn/image.h"
#include "kernels/coor_descent.h"
#include "nn/attention_core.h"
#include "nn/route_views.h"
#ifdef COLT5_WITH_CUDA
#include "kernel_profile.h"
#ifdef COLT5_BENCH_PROGRAM
#include "program/config.h"
#include "program/model.h"
#include "program/train.h"
#endif
#endif

#ifdef COLT5_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime.h>
#endif

#ifndef COLT5_WITH_CUDA
int main() {
  std::printf("bench_modules_cuda: built without CUDA\n");
  return 0;
}
#else

namespace {

using namespace colt5::nn;

struct Measure {
  double ms;
  double peak_gib;
};

Measure time_cuda(const std::function<void()>& f, int reps = 10) {
  f();
  f();
  torch::cuda::synchronize();
  c10::cuda::CUDACachingAllocator::resetPeakStats(0);
  std::vector<double> t;
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  for (int i = 0; i < reps; ++i) {
    cudaEventRecord(a, at::cuda::getCurrentCUDAStream());
    f();
    cudaEventRecord(b, at::cuda::getCurrentCUDAStream());
    cudaEventSynchronize(b);
    float ms = 0;
    cudaEventElapsedTime(&ms, a, b);
    t.push_back(ms);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(t.begin(), t.end());
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(0);
  return {t[t.size() / 2], static_cast<double>(stats.allocated_bytes[0].peak) / (1024.0 * 1024 * 1024)};
}

// a and b in alternation, three rounds of time_cuda each: the median of the
// rounds' medians, so that drifting clocks or host load hit both alike.
std::pair<Measure, Measure> alternate(const std::function<void()>& a, const std::function<void()>& b) {
  std::vector<double> ta, tb;
  Measure ma{}, mb{};
  for (int round = 0; round < 3; ++round) {
    ma = time_cuda(a);
    ta.push_back(ma.ms);
    mb = time_cuda(b);
    tb.push_back(mb.ms);
  }
  std::sort(ta.begin(), ta.end());
  std::sort(tb.begin(), tb.end());
  ma.ms = ta[1];
  mb.ms = tb[1];
  return {ma, mb};
}

// The step captured once in a CUDA graph and replayed: the GPU's time without
// the host's launch overhead (shapes are static, the step makes no host sync).
Measure time_graph(const std::function<void()>& step) {
  Measure m;
  {
    colt5::CapturedStep graph(step);
    m = time_cuda([&] { graph.replay(); });
  }
  // A graph's private memory pool, released with the graph, stays cached for
  // that pool alone: hand it back, or dozens of captures in one process
  // (the block's default/replaced pairs) fill an 80 GB card.
  torch::cuda::synchronize();
  c10::cuda::CUDACachingAllocator::emptyCache();
  return m;
}

class Autocast {
 public:
  explicit Autocast(bool on) : on_(on) {
    if (on_) colt5::compat::set_autocast(at::kCUDA, true, at::kBFloat16);
  }
  ~Autocast() {
    if (!on_) return;
    at::autocast::clear_cache();
    colt5::compat::set_autocast(at::kCUDA, false, at::kBFloat16);
  }

 private:
  bool on_;
};

// ||a - b|| / ||b||, and whether a is finite.
double rel_norm(const torch::Tensor& a, const torch::Tensor& b) {
  torch::Tensor x = a.detach().to(torch::kFloat), y = b.detach().to(torch::kFloat);
  if (!torch::isfinite(x).all().item<bool>()) return 1e30;
  return ((x - y).norm() / y.norm().clamp_min(1e-12)).item<double>();
}

// bf16 autocast output against the float32 output of the same module and
// input: routing flips near the top-k boundary change a few tokens entirely,
// so the bound is in norm. Exits on a mismatch.
double check_bf16(const char* what, const std::function<torch::Tensor()>& fwd, double tol = 0.05) {
  torch::NoGradGuard ng;
  torch::Tensor ref = fwd();
  torch::Tensor got;
  {
    Autocast ac(true);
    got = fwd();
  }
  const double e = rel_norm(got, ref);
  if (!(e < tol)) {
    std::fprintf(stderr, "%s: bf16 output differs from float32 by %.3g in norm\n", what, e);
    std::exit(1);
  }
  return e;
}

// Whether one call of f makes a host-device synchronization LibTorch knows of
// (.item(), a device-to-host copy, a stream synchronization).
std::string host_syncs(const std::function<void()>& f) {
  std::string r = "none";
  c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_ERROR);
  try {
    f();
  } catch (const std::exception& e) {
    r = std::string("yes: ") + std::string(e.what()).substr(0, 120);
    for (char& c : r)
      if (c == '\n') c = ' ';
  }
  c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_DISABLED);
  torch::cuda::synchronize();
  return r;
}

void header() {
  std::printf("%-46s %-8s %9s %8s %10s %8s  %s\n", "work", "pass", "ms", "peak GiB", "dense ms", "÷dense", "note");
}

void row(const std::string& work, const char* pass, const Measure& m, double dense_ms, const std::string& note) {
  char d[32] = "-", r[32] = "-";
  if (dense_ms > 0) {
    std::snprintf(d, sizeof d, "%.2f", dense_ms);
    std::snprintf(r, sizeof r, "%.2fx", m.ms / dense_ms);
  }
  std::printf("%-46s %-8s %9.2f %8.2f %10s %8s  %s\n", work.c_str(), pass, m.ms, m.peak_gib, d, r, note.c_str());
  std::fflush(stdout);
}

// Dense fused attention (SDPA), bf16, b x h x n x 64 queries over m keys.
double dense_ms(int64_t b, int64_t h, int64_t n, int64_t m, bool causal, bool backward, int reps = 10) {
  auto o = torch::TensorOptions(torch::kCUDA).dtype(torch::kBFloat16);
  torch::Tensor q = torch::randn({b, h, n, 64}, o).requires_grad_(backward);
  torch::Tensor k = torch::randn({b, h, m, 64}, o).requires_grad_(backward);
  torch::Tensor v = torch::randn({b, h, m, 64}, o).requires_grad_(backward);
  torch::Tensor g = torch::randn({b, h, n, 64}, o);
  return time_cuda(
             [&] {
               if (backward) {
                 for (torch::Tensor* t : {&q, &k, &v}) t->mutable_grad().reset();
                 at::scaled_dot_product_attention(q, k, v, {}, 0.0, causal).backward(g);
               } else {
                 torch::NoGradGuard ng;
                 at::scaled_dot_product_attention(q, k, v, {}, 0.0, causal);
               }
             },
             reps)
      .ms;
}

// ------------------------------------------------------------------ profile

struct Phase {
  std::string name;
  double fwd, fwdbwd;
};

// Forward and forward+backward of one phase alone (autocast bf16); `f` returns
// the phase's output, whose backward takes a fixed random gradient.
Phase phase(const std::string& name, const std::function<torch::Tensor()>& f) {
  torch::Tensor out;
  {
    torch::NoGradGuard ng;
    Autocast ac(true);
    out = f();
  }
  torch::Tensor g = torch::randn_like(out);
  const double fwd = time_cuda([&] {
                       torch::NoGradGuard ng;
                       Autocast ac(true);
                       f();
                     }).ms;
  const double fb = time_cuda([&] {
                      torch::Tensor y;
                      {
                        Autocast ac(true);
                        y = f();
                      }
                      if (y.requires_grad()) y.backward(g.to(y.scalar_type()));
                    }).ms;
  return {name, fwd, fb};
}

void print_profile(const char* title, const std::vector<Phase>& phases, double total_fwd, double total_fb) {
  std::printf("\n%s (bf16 autocast; each phase alone, median ms; share of the whole module's time)\n", title);
  std::printf("  %-44s %9s %7s %9s %7s\n", "phase", "fwd", "share", "fwd+bwd", "share");
  double sf = 0, sb = 0;
  for (const Phase& p : phases) {
    std::printf("  %-44s %9.3f %6.1f%% %9.3f %6.1f%%\n", p.name.c_str(), p.fwd, 100 * p.fwd / total_fwd, p.fwdbwd,
                100 * p.fwdbwd / total_fb);
    if (p.name[0] == ' ') continue;  // a part of the phase above
    sf += p.fwd;
    sb += p.fwdbwd;
  }
  std::printf("  %-44s %9.3f %6.1f%% %9.3f %6.1f%%\n", "rest (glue, launch gaps, overlap)", total_fwd - sf,
              100 * (total_fwd - sf) / total_fwd, total_fb - sb, 100 * (total_fb - sb) / total_fb);
  std::printf("  %-44s %9.3f %6.1f%% %9.3f %6.1f%%\n", "whole module", total_fwd, 100.0, total_fb, 100.0);
  std::fflush(stdout);
}

// Router phases of one router on x: scores (matmul), coordinate descent, top-k.
void router_phases(std::vector<Phase>& out, const std::string& who, CoordinateDescentRouterImpl& r,
                   const torch::Tensor& x, int64_t k, const torch::Tensor& mask) {
  const auto& o = r.options;
  const int64_t rows = x.size(0) * o.num_routing_tokens(), n = x.size(1);
  torch::Tensor xs = x.detach().requires_grad_(true);
  out.push_back(phase(who + " routing scores (x . token)",
                      [&] { return torch::matmul(xs, r.routing_token.t()).transpose(1, 2).to(torch::kFloat); }));
  torch::Tensor s = torch::randn({rows, n}, x.options().dtype(torch::kFloat)).requires_grad_(true);
  const double kk = std::min(static_cast<double>(k) * o.fetch_k_ratio(), static_cast<double>(n));
  auto cd =
      colt5::CoorDescentOptions().n_iters(o.n_iters()).eps(o.eps()).eps_init(o.eps_init()).eps_decay(o.eps_decay());
  torch::Tensor m = mask.defined() ? mask.repeat({o.num_routing_tokens(), 1}) : torch::Tensor();
  out.push_back(phase(who + " coordinate descent", [&] { return colt5::coor_descent(s, kk, cd, m); }));
  torch::Tensor sc = torch::rand({rows, n}, x.options().dtype(torch::kFloat));
  out.push_back(
      phase(who + " top-k (tie-break)", [&] { return colt5::topk_indices(sc, k, s.detach(), m).to(torch::kFloat); }));
  out.push_back(phase(who + " whole router (with gathers)", [&] {
    RouterOutput ro = r.forward(xs, k, mask);
    return ro.routed_tokens * ro.scores.unsqueeze(-1).to(ro.routed_tokens.scalar_type());
  }));
}

// q, k and v as a LocalMHA makes them from x (bf16 autocast), each
// (b, heads, n, dim_head), contiguous, leaves that take gradients.
std::array<torch::Tensor, 3> local_qkv(LocalMHAImpl& la, const torch::Tensor& x) {
  const int64_t b = x.size(0), n = x.size(1), h = la.options.heads(), dh = la.options.dim_head();
  torch::Tensor qkv;
  {
    Autocast ac(true);
    torch::NoGradGuard ng;
    qkv = la.to_qkv->forward(la.norm->forward(x));
  }
  auto parts = qkv.chunk(3, -1);
  auto split = [&](const torch::Tensor& t) {
    return t.reshape({b, n, h, dh}).transpose(1, 2).contiguous().requires_grad_(true);
  };
  return {split(parts[0]), split(parts[1]), split(parts[2])};
}

// The parts of a LocalMHA on x (xs: x as a leaf that takes gradients): norm +
// qkv projection, the windowed core once per (name, key mask) of `cores`, and
// the output projection.
void local_mha_phases(std::vector<Phase>& ph, LocalMHAImpl& la, const torch::Tensor& x, const torch::Tensor& xs,
                      const std::vector<std::pair<std::string, torch::Tensor> >& cores) {
  const int64_t b = x.size(0), n = x.size(1), h = la.options.heads(), dh = la.options.dim_head();
  ph.push_back(phase("  of which: norm + qkv projection", [&] { return la.to_qkv->forward(la.norm->forward(xs)); }));
  const std::array<torch::Tensor, 3> qkv = local_qkv(la, x);
  const torch::Tensor &q = qkv[0], &k = qkv[1], &v = qkv[2];
  for (const auto& [name, mask] : cores) ph.push_back(phase(name, [&] { return la.attn_fn->forward(q, k, v, mask); }));
  torch::Tensor o = torch::randn({b, n, h * dh}, x.options()).requires_grad_(true);
  ph.push_back(phase("  of which: output projection", [&] { return la.to_out->forward(o); }));
}

// The block's local attention core (with and without the padding mask) and
// dense attention of the same length under each SDPA backend alone: LibTorch
// picks one by priority; this shows what each would cost (fwd+bwd, bf16).
void sdpa_backends(LocalMHAImpl& la, const torch::Tensor& x, const torch::Tensor& mask) {
  auto& ctx = at::globalContext();
  const bool f0 = ctx.userEnabledFlashSDP(), e0 = ctx.userEnabledMemEfficientSDP(), c0 = ctx.userEnabledCuDNNSDP(),
             m0 = ctx.userEnabledMathSDP(), a0 = ctx.userEnabledFA3SDP();
  std::printf("\nSDPA backends alone (fwd+bwd median ms; priority order");
  for (auto b : ctx.sDPPriorityOrder()) std::printf(" %d", static_cast<int>(b));
  std::printf(", 0 math 1 flash 2 memory-efficient 3 cuDNN; n/a: the backend refused the input)\n");
  const std::array<torch::Tensor, 3> qkv = local_qkv(la, x);
  const torch::Tensor &q = qkv[0], &k = qkv[1], &v = qkv[2];
  torch::Tensor g = torch::randn_like(q);
  struct Work {
    const char* name;
    std::function<torch::Tensor()> f;
  };
  const Work works[] = {{"local core, padding mask", [&] { return la.attn_fn->forward(q, k, v, mask); }},
                        {"local core, no mask", [&] { return la.attn_fn->forward(q, k, v, {}); }},
                        {"dense attention, same length", [&] { return at::scaled_dot_product_attention(q, k, v); }}};
  struct Cfg {
    const char* name;
    bool flash, eff, cudnn, math, fa3;
  };
  const Cfg cfgs[] = {{"default", f0, e0, c0, m0, a0},
                      {"flash only", true, false, false, false, false},
                      {"flash only, FA3 asked for", true, false, false, false, true},
                      {"memory-efficient only", false, true, false, false, false},
                      {"cuDNN only", false, false, true, false, false}};
  std::printf("  %-28s", "backends");
  for (const Work& w : works) std::printf(" %30s", w.name);
  std::printf("\n");
  auto set = [&](const Cfg& c) {
    ctx.setSDPUseFlash(c.flash);
    ctx.setSDPUseMemEfficient(c.eff);
    ctx.setSDPUseCuDNN(c.cudnn);
    ctx.setSDPUseMath(c.math);
    try {
      ctx.setSDPUseFA3(c.fa3);
    } catch (const std::exception&) {
    }
  };
  for (const Cfg& c : cfgs) {
    std::printf("  %-28s", c.name);
    set(c);
    for (const Work& w : works) {
      try {
        const double ms = time_cuda([&] {
                            torch::Tensor y;
                            {
                              Autocast ac(true);
                              y = w.f();
                            }
                            y.backward(g.to(y.scalar_type()));
                          }).ms;
        std::printf(" %30.3f", ms);
      } catch (const std::exception&) {
        std::printf(" %30s", "n/a");
      }
    }
    std::printf("\n");
  }
  set(cfgs[0]);
  std::fflush(stdout);
}

void profile_block(ConditionalRoutedTransformerBlockImpl& block, const torch::Tensor& x, const torch::Tensor& mask,
                   double total_fwd, double total_fb) {
  auto& attn = *block.conditional_attn;
  auto& ff = *block.conditional_ff;
  const int64_t kq = attn.options.num_heavy_tokens_q(), kkv = attn.options.num_heavy_tokens_kv();
  const int64_t kff = ff.options.num_heavy_tokens();
  torch::Tensor xs = x.detach().requires_grad_(true);
  std::vector<Phase> ph;
  ph.push_back(phase("light attention (local, blocked windows)", [&] { return attn.light_attn->forward(xs, mask); }));
  local_mha_phases(ph, *attn.light_attn, x, xs,
                   {{"  of which: windowed attention core", mask}, {"  (core without the padding mask)", {}}});
  ph.push_back(phase("light feedforward", [&] { return ff.light_ff->forward(xs); }));
  // The routers' parts, on the q router (the kv and feedforward routers are alike).
  std::vector<Phase> rq;
  router_phases(rq, "attn q router:", *attn.q_router, x, kq, mask);
  for (auto& p : rq) ph.push_back(p);
  ph.back().name = "attn q router: rest (gathers)";
  ph.back().fwd -= rq[0].fwd + rq[1].fwd + rq[2].fwd;
  ph.back().fwdbwd -= rq[0].fwdbwd + rq[1].fwdbwd + rq[2].fwdbwd;
  ph.push_back(phase("attn kv router (whole)", [&] {
    RouterOutput ro = attn.kv_router->forward(xs, kkv, mask);
    return ro.routed_tokens * ro.scores.unsqueeze(-1).to(ro.routed_tokens.scalar_type());
  }));
  ph.push_back(phase("ff router (whole)", [&] {
    RouterOutput ro = ff.router->forward(xs, kff, mask);
    return ro.routed_tokens * ro.scores.unsqueeze(-1).to(ro.routed_tokens.scalar_type());
  }));
  RouterOutput q, kv, r;
  {
    torch::NoGradGuard ng;
    q = attn.q_router->forward(x, kq, mask);
    kv = attn.kv_router->forward(x, kkv, mask);
    r = ff.router->forward(x, kff, mask);
  }
  torch::Tensor qt = q.routed_tokens.detach().requires_grad_(true);
  torch::Tensor kvt = kv.routed_tokens.detach().requires_grad_(true);
  torch::Tensor ft = r.routed_tokens.detach().requires_grad_(true);
  ph.push_back(phase("heavy attention (norm, projections, attention)",
                     [&] { return attn.heavy_attn->forward(qt, kvt, kv.routed_mask, kv.scores); }));
  {
    const int64_t b = x.size(0), h = attn.heavy_attn->options.heads(), dh = attn.heavy_attn->options.dim_head();
    auto bf = x.options().dtype(torch::kBFloat16);
    torch::Tensor q4 = torch::randn({b, h, kq, dh}, bf).requires_grad_(true);
    torch::Tensor k4 = torch::randn({b, h, kkv + 1, dh}, bf).requires_grad_(true);
    torch::Tensor v4 = torch::randn({b, h, kkv + 1, dh}, bf).requires_grad_(true);
    torch::Tensor m4 = torch::ones({b, 1, 1, kkv + 1}, x.options().dtype(torch::kBool));
    ph.push_back(phase("  of which: fused attention with key mask", [&] { return attend(q4, k4, v4, m4); }));
    ph.push_back(phase("  (fused attention without mask)", [&] { return attend(q4, k4, v4); }));
  }
  ph.push_back(phase("heavy feedforward", [&] { return ff.heavy_ff->forward(ft); }));
  torch::Tensor base = torch::randn_like(x).requires_grad_(true);
  torch::Tensor upd = torch::randn({x.size(0), kq, x.size(2)}, x.options()).requires_grad_(true);
  ph.push_back(phase("route back (scatter, x2 in the block)", [&] {
    auto idx = q.indices.unsqueeze(-1).expand({x.size(0), kq, x.size(2)});
    return base.scatter(1, idx, upd);
  }));
  print_profile("profile: block 2x32768x512", ph, total_fwd, total_fb);
}

// Top-k indices of float rows by one path of topk_tiebreak_cuda (as floats,
// for the phase timer).
torch::Tensor topk_by(const torch::Tensor& s, const torch::Tensor& t, const torch::Tensor& msk, int64_t k,
                      colt5::kernels::TopkCudaPath path) {
  torch::Tensor idx = torch::empty({s.size(0), k}, s.options().dtype(torch::kLong));
  colt5::kernels::topk_tiebreak_cuda<float>(s.data_ptr<float>(), t.data_ptr<float>(),
                                            msk.defined() ? msk.data_ptr<uint8_t>() : nullptr, s.size(0), s.size(1), k,
                                            idx.data_ptr<int64_t>(), at::cuda::getCurrentCUDAStream().stream(), path);
  return idx.to(torch::kFloat);
}

void profile_autoregressive(ConditionalRoutedAutoregressiveAttentionImpl& m, const torch::Tensor& x, double total_fwd,
                            double total_fb) {
  const int64_t b = x.size(0), seq = x.size(1), d = x.size(2);
  const int64_t w = m.options.heavy_window_size().value_or(m.options.light_window_size());
  const int64_t windows = (seq + w - 1) / w, padded = windows * w, rows = b * (windows - 1);
  const int64_t kq = m.options.num_heavy_tokens_q(), kkv = m.options.num_heavy_tokens_kv();
  torch::Tensor xs = x.detach().requires_grad_(true);
  std::vector<Phase> ph;
  ph.push_back(phase("light attention (local causal)", [&] { return m.light_attn->forward(xs); }));
  // The windowed core without a mask (the flash kernel's sliding window) and
  // with an all-true key mask (the masked path).
  local_mha_phases(ph, *m.light_attn, x, xs,
                   {{"  of which: windowed core (sliding window)", {}},
                    {"  (core with an all-true key mask)", torch::ones({b, seq}, x.options().dtype(torch::kBool))}});
  torch::Tensor xp = padded == seq ? xs : torch::constant_pad_nd(xs, {0, 0, 0, padded - seq}, 0.0);
  torch::Tensor q = xp.view({b, windows, w, d}).narrow(1, 1, windows - 1).reshape({rows, w, d});
  auto bo = torch::TensorOptions().dtype(torch::kBool).device(x.device());
  torch::Tensor kv_mask = torch::ones({windows, windows}, bo)
                              .tril(-1)
                              .narrow(0, 1, windows - 1)
                              .repeat_interleave(w, 1)
                              .unsqueeze(0)
                              .expand({b, windows - 1, padded});
  ph.push_back(phase("q router (per window)", [&] {
    RouterOutput ro = m.q_router->forward(q, kq);
    return ro.routed_tokens * ro.scores.unsqueeze(-1).to(ro.routed_tokens.scalar_type());
  }));
  ph.push_back(phase("kv router (earlier windows, one view each)", [&] {
    RouterOutput ro = m.kv_router->forward(xp, kkv, kv_mask, false, {}, true, false);
    return ro.scores;
  }));
  {
    std::vector<int64_t> view_lengths;
    for (int64_t v = 1; v < windows; ++v) view_lengths.push_back(v * w);
    for (int64_t groups : {2, 4, 8}) {
      ph.push_back(phase("  (the same in " + std::to_string(groups) + " groups over their prefixes)", [&, view_lengths,
                                                                                                       groups] {
        return colt5::nn::route_prefix_views(*m.kv_router, xp, kkv, kv_mask, view_lengths, groups, false, true, false)
            .scores;
      }));
    }
  }
  // The kv router's top-k on rows of its shape (one row per window, route and
  // batch row; random scores, the windows' prefix mask): one kernel per row
  // against the radix sorts it replaced, and the q router's short rows.
  {
    const int64_t routes = m.kv_router->options.num_routing_tokens(), kv_rows = rows * routes;
    auto fo = x.options().dtype(torch::kFloat);
    torch::Tensor sc = torch::rand({kv_rows, padded}, fo), tb = torch::randn({kv_rows, padded}, fo);
    torch::Tensor pm =
        kv_mask.reshape({rows, 1, padded}).expand({rows, routes, padded}).reshape({kv_rows, padded}).contiguous();
    torch::Tensor qs = torch::rand({rows, w}, fo), qt = torch::randn({rows, w}, fo);
    using colt5::kernels::TopkCudaPath;
    torch::Tensor pm8 = pm.view(torch::kByte);
    ph.push_back(phase("kv router top-k: selection", [&] { return topk_by(sc, tb, pm8, kkv, TopkCudaPath::select); }));
    ph.push_back(phase("  (the same by a bitonic sort per row)",
                       [&] { return topk_by(sc, tb, pm8, kkv, TopkCudaPath::bitonic); }));
    ph.push_back(phase("  (the same by radix sorts)", [&] { return topk_by(sc, tb, pm8, kkv, TopkCudaPath::sorts); }));
    ph.push_back(phase("q router top-k: selection", [&] { return topk_by(qs, qt, {}, kq, TopkCudaPath::select); }));
    ph.push_back(phase("  (the same by a bitonic sort per row)",
                       [&] { return topk_by(qs, qt, {}, kq, TopkCudaPath::bitonic); }));
    ph.push_back(
        phase("  (the same by segmented sorts)", [&] { return topk_by(qs, qt, {}, kq, TopkCudaPath::sorts); }));
  }
  RouterOutput rq, rkv;
  {
    torch::NoGradGuard ng;
    rq = m.q_router->forward(q, kq);
    rkv = m.kv_router->forward(xp, kkv, kv_mask, false, {}, true, false);
  }
  auto& a = *m.heavy_attn;
  const int64_t h = a.options.heads(), dh = a.options.dim_head();
  const int64_t r = rkv.indices.size(1), views = windows - 1;
  ph.push_back(phase("heavy keys/values: norm + projection, once", [&] { return project_keys_values(a, xp); }));
  torch::Tensor proj;
  {
    Autocast ac(true);
    torch::NoGradGuard ng;
    proj = project_keys_values(a, xp.detach());
  }
  proj = proj.detach().reshape({b * padded * r, h / r * 2 * dh}).requires_grad_(true);
  auto io = rkv.indices.options();
  torch::Tensor row_start = (torch::arange(b, io) * padded).view({b, 1}).expand({b, views}).reshape({rows, 1, 1});
  torch::Tensor flat = ((row_start + rkv.indices) * r + torch::arange(r, io).view({1, r, 1})).reshape({-1});
  torch::Tensor kv5 = proj.detach().index_select(0, flat).reshape({rows, r, kkv, h / r, 2 * dh}).requires_grad_(true);
  torch::Tensor qt = rq.routed_tokens.detach().requires_grad_(true);
  torch::Tensor scores = rkv.scores.reshape({rows, r, 1, kkv, 1}).to(kv5.scalar_type());
  torch::Tensor table_rows = (row_start + rkv.indices) * r + torch::arange(r, io).view({1, r, 1});
  ph.push_back(phase("heavy: queries + attention by index (the module's)", [&] {
    return attend_gathered(a, qt, project_queries(a, a.norm->forward(qt), {}), proj, table_rows, rkv.routed_mask,
                           rkv.scores);
  }));
  ph.push_back(phase("  (queries + gathered copy + fused attention)", [&] {
    return attend_gathered(a, qt, project_queries(a, a.norm->forward(qt), {}), proj, table_rows, rkv.routed_mask,
                           rkv.scores, /*index_kernel=*/false);
  }));
  ph.push_back(phase("  (the gather of projected rows alone)", [&] { return proj.index_select(0, flat); }));
  ph.push_back(phase("  (queries + attention on a separate gather)", [&] {
    return attend_projected(a, qt, project_queries(a, a.norm->forward(qt), {}), kv5.permute({0, 1, 3, 2, 4}),
                            rkv.routed_mask, scores, {});
  }));
  print_profile("profile: autoregressive 2x8192x512", ph, total_fwd, total_fb);
}

ConditionalRoutedTransformerBlockOptions readme_block() {
  return ConditionalRoutedTransformerBlockOptions(512, 1024, 1024, 1024)
      .light_dim_head(64)
      .light_heads(8)
      .light_window_size(128)
      .heavy_dim_head(64)
      .heavy_heads(8);
}

ConditionalRoutedAutoregressiveAttentionOptions readme_autoregressive() {
  return ConditionalRoutedAutoregressiveAttentionOptions(512, 32, 1024)
      .light_dim_head(64)
      .light_heads(8)
      .light_window_size(128)
      .heavy_window_size(128)
      .heavy_dim_head(64)
      .heavy_heads(8)
      .num_routed_kv(2);
}

ConditionalRoutedCrossAttentionOptions readme_cross() {
  return ConditionalRoutedCrossAttentionOptions(512, 512, 1024)
      .dim_head(64)
      .heads(8)
      .kv_routing_tokens(2)
      .route_block_size(131072);
}

ConditionalRoutedImageAttentionOptions readme_image() {
  return ConditionalRoutedImageAttentionOptions(32, 1024, 1024)
      .light_dim_head(64)
      .light_heads(8)
      .light_window_size(32)
      .heavy_dim_head(64)
      .heavy_heads(8)
      .channel_first(true);
}

// The tensors whose gradients a training step makes: the module's parameters
// and the input.
std::vector<torch::Tensor> leaves(const torch::nn::Module& m, const torch::Tensor& x) {
  std::vector<torch::Tensor> l = m.parameters();
  l.push_back(x);
  return l;
}

// A training step: the forward under autocast (bf16 when amp), then the
// backward from a fixed random gradient of the output's shape (contiguous, as
// a next layer or a loss hands back, and as the dense baseline gets; the sum's
// gradient would be one value expanded over the output, which sends every
// consumer down its strided paths). The leaves' gradients are unset first, as
// after an optimizer's zero_grad() (LibTorch's default, set_to_none), so the
// step writes them rather than adding to the last step's.
std::function<void()> train_step(std::function<torch::Tensor()> fwd, bool amp, std::vector<torch::Tensor> leaves) {
  auto grad = std::make_shared<torch::Tensor>();
  return [fwd = std::move(fwd), amp, leaves = std::move(leaves), grad] {
    for (const torch::Tensor& t : leaves) t.mutable_grad().reset();
    torch::Tensor out;
    {
      Autocast ac(amp);
      out = fwd();
    }
    // Made on the first (eager) call, before any graph capture.
    if (!grad->defined() || grad->sizes() != out.sizes() || grad->scalar_type() != out.scalar_type())
      *grad = torch::randn_like(out);
    out.backward(*grad);
  };
}

// --kernels: each module's training step (bf16 autocast, README configs; the
// block at 32k also in float32, TF32 off and on) under the Kineto profiler, by
// colt5 scope and by kernel.
#ifdef COLT5_BENCH_PROGRAM
// The language models of `colt5 bench` at the configuration of scripts/gpu.sh
// (8 x 8192 tokens, dim 512, depth 2, window 128, heavy q 32 / kv 1024, 8
// heads of 64 on both branches; the program's other defaults), routed and
// light-only, their training step as the program times it.
void profile_language_models() {
  const torch::Device dev(torch::kCUDA, 0);
  colt5::app::ModelConfig m;
  m.depth = 2;
  m.max_seq_len = 8192;
  m.attn.dim(512).light_window_size(128).num_heavy_tokens_q(32).num_heavy_tokens_kv(1024);
  m.attn.light_heads(8).heavy_heads(8).light_dim_head(64).heavy_dim_head(64);
  for (colt5::app::Arch arch : {colt5::app::Arch::routed, colt5::app::Arch::light_only}) {
    m.arch = arch;
    torch::manual_seed(0);
    colt5::app::LanguageModel model(m);
    model->to(dev);
    torch::Tensor tokens = torch::randint(0, m.vocab_size, {8, 8192}, torch::kLong).to(dev);
    colt5_bench::kernel_profile(
        (std::string("colt5 bench's ") + colt5::app::arch_name(arch) + " model, 8x8192, fwd+bwd").c_str(), [&] {
          torch::Tensor loss;
          {
            colt5::app::AutocastGuard ac(true);
            loss = model->forward(tokens).to(torch::kFloat).logsumexp(-1).mean();
          }
          loss.backward();
          model->zero_grad();
        });
  }
}
#endif

int kernel_profiles(const std::function<bool(const char*)>& want, const std::string& only) {
  const torch::Device dev(torch::kCUDA, 0);
  auto f32 = torch::TensorOptions(dev);
  if (only == "lm") {
#ifdef COLT5_BENCH_PROGRAM
    profile_language_models();
#else
    std::printf("bench_modules_cuda: built without the program (COLT5_BUILD_APPS=OFF): no --only lm\n");
#endif
    return 0;
  }
  if (want("block")) {
    torch::manual_seed(1);
    ConditionalRoutedTransformerBlock block(readme_block());
    block->to(dev);
    for (int64_t n : {8192, 32768}) {
      torch::Tensor x = torch::randn({2, n, 512}, f32).requires_grad_(true);
      torch::Tensor mask = torch::ones({2, n}, f32.dtype(torch::kBool));
      colt5_bench::kernel_profile(("block 2x" + std::to_string(n) + "x512, all-true mask, fwd+bwd").c_str(),
                                  train_step([&] { return block->forward(x, mask); }, true, leaves(*block, x)));
      // bf16 with the light attention on the band kernels.
      auto& mha = block->conditional_attn->light_attn->options;
      mha.band_attention(true);
      colt5_bench::kernel_profile(("block 2x" + std::to_string(n) + "x512, band kernels, fwd+bwd").c_str(),
                                  train_step([&] { return block->forward(x, mask); }, true, leaves(*block, x)));
      mha.band_attention(c10::nullopt);
      // The mask as a score bias through 8 more head dimensions (the flash
      // kernel's path).
      mha.window_tile_kernels(false);
      colt5_bench::kernel_profile(("block 2x" + std::to_string(n) + "x512, mask as score bias, fwd+bwd").c_str(),
                                  train_step([&] { return block->forward(x, mask); }, true, leaves(*block, x)));
      mha.window_tile_kernels(true);
      if (n == 32768) {
        colt5_bench::kernel_profile("block 2x32768x512, no mask, fwd+bwd",
                                    train_step([&] { return block->forward(x); }, true, leaves(*block, x)));
        // float32 (no autocast), TF32 matrix products off and on; the light
        // attention on the windowed path and on the band kernels.
        for (bool tf32 : {false, true}) {
          at::globalContext().setAllowTF32CuBLAS(tf32);
          at::globalContext().setAllowTF32CuDNN(tf32);
          for (bool band : {false, true}) {
            mha.band_attention(band);
            colt5_bench::kernel_profile((std::string("block 2x32768x512, fp32, TF32 ") + (tf32 ? "on" : "off") +
                                         (band ? ", band kernels (default)" : ", windowed") + ", fwd+bwd")
                                            .c_str(),
                                        train_step([&] { return block->forward(x, mask); }, false, leaves(*block, x)));
          }
          mha.band_attention(c10::nullopt);
        }
        at::globalContext().setAllowTF32CuBLAS(false);
        at::globalContext().setAllowTF32CuDNN(true);
      }
    }
  }
  if (want("autoregressive")) {
    torch::manual_seed(2);
    ConditionalRoutedAutoregressiveAttention attn(readme_autoregressive());
    attn->to(dev);
    for (int64_t n : {8192, 32768}) {
      torch::Tensor x = torch::randn({2, n, 512}, f32).requires_grad_(true);
      colt5_bench::kernel_profile(("autoregressive 2x" + std::to_string(n) + "x512, fwd+bwd").c_str(),
                                  train_step([&] { return attn->forward(x); }, true, leaves(*attn, x)));
    }
  }
  if (want("cross")) {
    torch::manual_seed(3);
    ConditionalRoutedCrossAttention attn(readme_cross());
    attn->to(dev);
    torch::Tensor tokens = torch::randn({1, 1024, 512}, f32);
    torch::Tensor memories = torch::randn({1, 1048576, 512}, f32);
    colt5_bench::kernel_profile("cross 1x1024 over 1048576, fp32, fwd", [&] {
      torch::NoGradGuard g;
      attn->forward(tokens, memories);
    });
  }
  if (want("image")) {
    torch::manual_seed(4);
    ConditionalRoutedImageAttention attn(readme_image());
    attn->to(dev);
    torch::Tensor fmap = torch::randn({1, 32, 256, 256}, f32).requires_grad_(true);
    colt5_bench::kernel_profile("image 1x32x256x256, fwd+bwd",
                                train_step([&] { return attn->forward(fmap); }, true, leaves(*attn, fmap)));
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false, profile = true, kernels = false;
  std::string only;
  const char* usage =
      "usage: bench_modules_cuda [--quick] [--no-profile] [--kernels] [--only "
      "block|autoregressive|cross|topk|image|fp32|lm]\n"
      "  --kernels --only lm: the kernel profile of colt5 bench's routed and light-only models\n"
      "  COLT5_PROFILE_TOP=N (with --kernels): list the N longest kernels and 2N longest launch sites\n";
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--help") || !std::strcmp(argv[i], "-h")) {
      std::fputs(usage, stdout);
      return 0;
    }
    if (!std::strcmp(argv[i], "--quick")) {
      quick = true;
    } else if (!std::strcmp(argv[i], "--kernels")) {
      kernels = true;
    } else if (!std::strcmp(argv[i], "--no-profile")) {
      profile = false;
    } else if (!std::strcmp(argv[i], "--only") && i + 1 < argc &&
               (!std::strcmp(argv[i + 1], "block") || !std::strcmp(argv[i + 1], "autoregressive") ||
                !std::strcmp(argv[i + 1], "cross") || !std::strcmp(argv[i + 1], "topk") ||
                !std::strcmp(argv[i + 1], "image") || !std::strcmp(argv[i + 1], "fp32") ||
                !std::strcmp(argv[i + 1], "lm"))) {
      only = argv[++i];
    } else {
      std::fprintf(stderr, "bench_modules_cuda: unknown argument %s\n%s", argv[i], usage);
      return 2;
    }
  }
  if (kernels) {
    try {
      colt5_bench::profile_top(15);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "bench_modules_cuda: %s\n", e.what());
      return 2;
    }
  }
  // --only fp32: the block's float32 rows alone.
  auto want = [&](const char* section) {
    return only.empty() || only == section || (only == "fp32" && !std::strcmp(section, "block"));
  };
  if (!torch::cuda::is_available()) {
    std::printf("bench_modules_cuda: no CUDA device\n");
    return 0;
  }
  torch::manual_seed(0);
  const torch::Device dev(torch::kCUDA, 0);
  auto f32 = torch::TensorOptions(dev);
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  std::printf(
      "device: %s; LibTorch %s; median of CUDA-event timings; peak = allocated GiB during the timed runs;\n"
      "dense = fused attention (SDPA, bf16, 8 heads of 64) of the same shape in this run; ÷dense = colt5 / dense\n\n",
      prop.name, TORCH_VERSION);
  if (kernels) return kernel_profiles(want, only);
  header();

  // ------------------------------------------------------------ block
  if (want("block")) {
    torch::manual_seed(1);
    ConditionalRoutedTransformerBlock block(readme_block());
    block->to(dev);
    std::vector<int64_t> lengths = {8192, 32768, 131072, 262144};
    if (quick) lengths = {8192, 32768};
    if (only == "fp32") lengths.clear();
    double per_token_8k = 0;
    for (int64_t n : lengths) {
      torch::Tensor x = torch::randn({2, n, 512}, f32);
      torch::Tensor mask = torch::ones({2, n}, f32.dtype(torch::kBool));
      const std::string name = "block 2x" + std::to_string(n) + "x512, bf16 autocast";
      const double err = check_bf16(name.c_str(), [&] { return block->forward(x, mask); });
      char note[96];
      std::snprintf(note, sizeof note, "bf16 vs fp32 %.1e", err);
      torch::Tensor xg = x.detach().requires_grad_(true);
      auto step = train_step([&] { return block->forward(xg, mask); }, true, leaves(*block, xg));
      const double dn = n <= 131072 ? dense_ms(2, 8, n, n, false, true, n > 32768 ? 3 : 10) : -1;
      if (n == 32768) {
        const Measure f = time_cuda([&] {
          torch::NoGradGuard g;
          Autocast ac(true);
          block->forward(x, mask);
        });
        row(name, "fwd", f, dense_ms(2, 8, n, n, false, false), note);
      }
      const Measure fb = time_cuda(step, n > 32768 ? 5 : 10);
      if (n == 8192) per_token_8k = fb.ms / n;
      char note2[160];
      std::snprintf(note2, sizeof note2, "%s; per token %.2fx of 8k", note, fb.ms / n / per_token_8k);
      row(name, "fwd+bwd", fb, dn, note2);
      if (n <= 32768) {
        // Without a padding mask the light branch's windows need no mask at all.
        auto unmasked = train_step([&] { return block->forward(xg); }, true, leaves(*block, xg));
        row(name + ", no mask", "fwd+bwd", time_cuda(unmasked), dn, "no padding mask");
      }
      if (n <= 32768) {
        // Each default against the path it replaced, same run, measured in
        // alternation (three rounds; the median of the rounds' medians).
        auto& la = block->conditional_attn->light_attn->attn_fn->options;
        auto for_norms = [&](const std::function<void(RMSNormOptions&)>& set) {
          for (const auto& m : block->modules())
            if (auto* r = dynamic_cast<RMSNormImpl*>(m.get())) set(r->options);
        };
        auto with = [&](std::function<void()> set) {
          return [set = std::move(set), &step] {
            set();
            step();
          };
        };
        auto& mha = block->conditional_attn->light_attn->options;
        // The settings as built, put back after each pair.
        const bool sliding_built = la.sliding_window(), fused_built = mha.fused_norm(), packed_built = mha.packed_qkv(),
                   tiles_built = mha.window_tile_kernels();
        const auto band_built = mha.band_attention();
        auto& attn_opts = block->conditional_attn->options;
        const bool joint_built = attn_opts.joint_routing();
        std::vector<RMSNormOptions> norms_built;
        for_norms([&](RMSNormOptions& o) { norms_built.push_back(o); });
        auto restore = [&] {
          la.sliding_window(sliding_built);
          mha.fused_norm(fused_built);
          mha.packed_qkv(packed_built);
          mha.window_tile_kernels(tiles_built);
          mha.band_attention(band_built);
          attn_opts.joint_routing(joint_built);
          size_t i = 0;
          for_norms([&](RMSNormOptions& o) { o = norms_built[i++]; });
        };
        auto pair = [&](const std::string& what_a, const std::string& note_a, const std::function<void()>& a,
                        const std::string& what_b, const std::string& note_b, const std::function<void()>& b) {
          const auto [ma, mb] = alternate(a, b);
          row(name + ", " + what_a, "fwd+bwd", ma, dn, note_a.c_str());
          row(name + ", " + what_b, "fwd+bwd", mb, dn, note_b.c_str());
          // From CUDA graphs: the GPU's time alone (about 2 % run to run,
          // against 10-25 % for the eager steps).
          row(name + ", " + what_a, "graph", time_graph(a), dn, "");
          row(name + ", " + what_b, "graph", time_graph(b), dn, "");
          restore();
        };
        pair("sliding-window local attn", "flash sliding window", with([&] { la.sliding_window(true); }),
             "windowed local attn", "exact windows as masked windows", with([&] { la.sliding_window(false); }));
        // The exact windows on colt5's band kernels or the flash kernel's
        // sliding window (the bf16 default).
        pair("band kernels", "exact windows on colt5's band kernels", with([&] { mha.band_attention(true); }),
             "flash sliding window", "the default", with([&] { mha.band_attention(false); }));
        // The exact windows with the key mask on the register-tile kernels
        // both ways (the default), or on the flash kernel with the mask as a
        // score bias through 8 more head dimensions (packed into a wider buffer).
        pair("window tiles", "register-tile kernels forward and backward, the mask per score",
             with([&] { mha.window_tile_kernels(true); }), "mask as score bias",
             "flash with the mask in 8 more head dims", with([&] { mha.window_tile_kernels(false); }));
        // The masked sliding window from the packed projection (colt5's kernels
        // each way) or from q, k, v views (LibTorch's concatenations and copies).
        pair("packed q/k/v", "masked sliding window from the packed projection", with([&] {
               mha.window_tile_kernels(false);
               mha.packed_qkv(true);
             }),
             "q/k/v views", "masked sliding window from q, k, v views", with([&] { mha.packed_qkv(false); }));
        // The query and key/value routers' scores in one read of x and their rows
        // in one gather, or each router on its own.
        pair("joint routing", "q and kv routers: one scores kernel, one gather",
             with([&] { attn_opts.joint_routing(true); }), "separate routers", "each router scores and gathers x",
             with([&] { attn_opts.joint_routing(false); }));
        pair("RMSNorm kernel", "RMSNorm on its CUDA kernels",
             with([&] { for_norms([](RMSNormOptions& o) { o.cuda_kernel(true); }); }), "RMSNorm composite",
             "RMSNorm as LibTorch operators",
             with([&] { for_norms([](RMSNormOptions& o) { o.cuda_kernel(false); }); }));
        // The light attention's LayerNorm on colt5's kernel (bf16 out) or the LayerNorm module.
        pair("LayerNorm kernel", "light attention's norm on colt5's kernel, bf16 out",
             with([&] { mha.fused_norm(true); }), "LayerNorm module", "torch::nn::LayerNorm, fp32 out then cast",
             with([&] { mha.fused_norm(false); }));
        // The projections' norms in bf16 (autocast_output, where set as built) or float32 then cast.
        auto norms_cast = [&](bool on) {
          size_t i = 0;
          for_norms([&](RMSNormOptions& o) { o.autocast_output(on && norms_built[i++].autocast_output()); });
        };
        pair("norms out in bf16", "projections' norms write bf16", with([&] { norms_cast(true); }), "norms out in fp32",
             "norms write fp32, the projections cast", with([&] { norms_cast(false); }));
        // The block's sums: residual_forward (one pass, routed rows in place)
        // against forward(x) + x with the heavy output written out.
        auto earlier_sums = train_step(
            [&] {
              torch::Tensor h = block->conditional_attn->forward(xg, mask) + xg;
              return block->conditional_ff->forward(h, mask) + h;
            },
            true, leaves(*block, xg));
        pair("residual_forward", "light + heavy + x in one pass", step, "forward + x",
             "heavy output written out, then added", earlier_sums);
      }
      if (n <= 32768) row(name, "graph", time_graph(step), dn, "fwd+bwd replayed from a CUDA graph");
      if (n == 32768) {
        std::printf("  host syncs in a training step: %s\n", host_syncs(step).c_str());
        if (profile) {
          const double tf = time_cuda([&] {
                              torch::NoGradGuard g;
                              Autocast ac(true);
                              block->forward(x, mask);
                            }).ms;
          profile_block(*block, x, mask, tf, fb.ms);
          sdpa_backends(*block->conditional_attn->light_attn, x, mask);
          header();
        }
      }
    }
    // float32, TF32 matrix products off (LibTorch's default) and on.
    torch::Tensor x = torch::randn({2, 32768, 512}, f32).requires_grad_(true);
    torch::Tensor mask = torch::ones({2, 32768}, f32.dtype(torch::kBool));
    // The light attention on the windowed path (memory-efficient kernel over
    // look-around windows) and on the band kernels (the float32 default).
    auto& mha = block->conditional_attn->light_attn->options;
    for (bool tf32 : {false, true}) {
      at::globalContext().setAllowTF32CuBLAS(tf32);
      at::globalContext().setAllowTF32CuDNN(tf32);
      auto step = train_step([&] { return block->forward(x, mask); }, false, leaves(*block, x));
      const std::string name = std::string("block 2x32768x512, fp32, TF32 ") + (tf32 ? "on" : "off");
      const auto [windowed, band] = alternate(
          [&] {
            mha.band_attention(false);
            step();
          },
          [&] {
            mha.band_attention(true);
            step();
          });
      row(name + ", windowed", "fwd+bwd", windowed, -1, "light attention on the windowed path");
      row(name + ", band kernels", "fwd+bwd", band, -1, "light attention on the band kernels (the default)");
      mha.band_attention(false);
      row(name + ", windowed", "graph", time_graph(step), -1, "replayed from a CUDA graph");
      mha.band_attention(true);
      row(name + ", band kernels", "graph", time_graph(step), -1, "replayed from a CUDA graph");
      mha.band_attention(c10::nullopt);
    }
    at::globalContext().setAllowTF32CuBLAS(false);
    at::globalContext().setAllowTF32CuDNN(true);
  }

  // --------------------------------------------------- autoregressive
  if (want("autoregressive")) {
    torch::manual_seed(2);
    ConditionalRoutedAutoregressiveAttention attn(readme_autoregressive());
    attn->to(dev);
    std::vector<int64_t> lengths = {8192, 32768};
    for (int64_t n : lengths) {
      torch::Tensor x = torch::randn({2, n, 512}, f32);
      const std::string name = "autoregressive 2x" + std::to_string(n) + "x512, bf16";
      const double err = check_bf16(name.c_str(), [&] { return attn->forward(x); });
      char note[64];
      std::snprintf(note, sizeof note, "bf16 vs fp32 %.1e; dense causal", err);
      torch::Tensor xg = x.detach().requires_grad_(true);
      auto step = train_step([&] { return attn->forward(xg); }, true, leaves(*attn, xg));
      const Measure fb = time_cuda(step);
      const double dn = dense_ms(2, 8, n, n, true, true);
      row(name, "fwd+bwd", fb, dn, note);
      row(name, "graph", time_graph(step), dn, "fwd+bwd replayed from a CUDA graph");
      {
        // The light branch's causal windows as two flash calls on views of the
        // projection (LocalMHAOptions::split_causal_windows) or as look-around
        // windows (q, k, v copies, keys unfolded), in alternation and from graphs.
        auto& mha = attn->light_attn->options;
        const c10::optional<bool> built = mha.split_causal_windows();
        auto with = [&](bool on) {
          return [&mha, &step, on] {
            mha.split_causal_windows(on);
            step();
          };
        };
        const auto [ma, mb] = alternate(with(true), with(false));
        row(name + ", windows from the projection", "fwd+bwd", ma, dn, "two flash calls on views, one merge kernel");
        row(name + ", look-around windows", "fwd+bwd", mb, dn, "q/k/v copies, keys unfolded");
        row(name + ", windows from the projection", "graph", time_graph(with(true)), dn, "");
        row(name + ", look-around windows", "graph", time_graph(with(false)), dn, "");
        mha.split_causal_windows(built);
      }
      double diff = 0;
      {
        // The kv router's windows all over the whole sequence (kv_route_groups
        // 1) against the default groups over their prefixes: the same routing
        // (a flip at the top-k boundary from summation order aside).
        torch::NoGradGuard g;
        Autocast ac(true);
        const torch::Tensor grouped = attn->forward(x);
        attn->kv_route_groups = 1;
        diff = rel_norm(attn->forward(x), grouped);
        attn->kv_route_groups = 0;
        if (!(diff < 0.1)) {
          std::fprintf(stderr, "%s: kv routed in groups differs from whole by %.3g\n", name.c_str(), diff);
          return 1;
        }
      }
      if (n == 8192) {
        row("autoregressive 2x8192x512, fp32", "fwd+bwd",
            time_cuda(train_step([&] { return attn->forward(xg); }, false, leaves(*attn, xg))), -1, "");
        std::printf("  host syncs in a training step: %s\n", host_syncs(step).c_str());
        if (profile) {
          const double tf = time_cuda([&] {
                              torch::NoGradGuard g;
                              Autocast ac(true);
                              attn->forward(x);
                            }).ms;
          profile_autoregressive(*attn, x, tf, fb.ms);
          header();
        }
      }
      // The kv router's windows in 1 (the whole sequence), 2, 4 and 8 groups
      // over their prefixes, eager and from a graph (last: the graphs' memory
      // pools can stay allocated and raise the peaks measured after them).
      for (int64_t groups : {1, 2, 4, 8}) {
        attn->kv_route_groups = groups;
        char note_g[96];
        if (groups == 1)
          std::snprintf(note_g, sizeof note_g, "kv_route_groups 1 (whole sequence); vs default %.1e", diff);
        else
          std::snprintf(note_g, sizeof note_g, "kv_route_groups %lld", static_cast<long long>(groups));
        const std::string name_g = name + ", kv in " + std::to_string(groups) + " group" + (groups > 1 ? "s" : "");
        row(name_g, "fwd+bwd", time_cuda(step), dn, note_g);
        row(name_g, "graph", time_graph(step), dn, "");
      }
      attn->kv_route_groups = 0;
    }
  }

  // ---------------------------------------------------------- cross
  if (want("cross")) {
    torch::manual_seed(3);
    ConditionalRoutedCrossAttention attn(readme_cross());
    attn->to(dev);
    torch::Tensor tokens = torch::randn({1, 1024, 512}, f32);
    torch::Tensor memories = torch::randn({1, 1048576, 512}, f32);
    // bf16 routing scores over a million memories tie at the top-k boundary in
    // bf16 (8-bit mantissa), so some routed memories differ from float32's.
    const double err = check_bf16(
        "cross", [&] { return attn->forward(tokens, memories); }, 0.15);
    const double dn = dense_ms(1, 8, 1024, 1048576, false, false, 5);
    for (bool amp : {false, true}) {
      char note[64];
      std::snprintf(note, sizeof note, "bf16 vs fp32 %.1e", err);
      row(std::string("cross 1x1024 over 1048576, ") + (amp ? "bf16" : "fp32"), "fwd", time_cuda([&] {
            torch::NoGradGuard g;
            Autocast ac(amp);
            attn->forward(tokens, memories);
          }),
          dn, note);
    }
  }

  // ------------------------------------------------ top-k by path
  // The routers' top-k on the modules' shapes, by each path of
  // topk_tiebreak_cuda (automatic is the selection where k <= 8192); each
  // checked against the radix sorts before it is timed.
  if (want("topk")) {
    using colt5::kernels::TopkCudaPath;
    // saturated: about 47 % of the scores exactly 1 (what coordinate descent
    // gives the block's routers at their initial routing token: the tiebreak
    // then orders most of the row).
    struct Shape {
      const char* what;
      int64_t rows, cols, k;
      bool masked, saturated = false;
    };
    const Shape shapes[] = {{"block router 2x8192", 2, 8192, 1024, false},
                            {"block router 2x8192, saturated", 2, 8192, 1024, false, true},
                            {"block router 2x32768", 2, 32768, 1024, false},
                            {"block router 2x32768, saturated", 2, 32768, 1024, false, true},
                            {"block routers 4x32768 (joint), saturated", 4, 32768, 1024, false, true},
                            {"block routers 4x32768 (joint)", 4, 32768, 1024, false},
                            {"block router 2x262144", 2, 262144, 1024, false},
                            {"image routers 2x65536 (joint)", 2, 65536, 1024, false},
                            {"autoregr. kv 252x8192 (8k)", 252, 8192, 1024, true},
                            {"autoregr. kv 1020x32768 (32k)", 1020, 32768, 1024, true},
                            {"cross router 16x131072", 16, 131072, 128, false}};
    for (const Shape& sh : shapes) {
      torch::Tensor sc = torch::rand({sh.rows, sh.cols}, f32), tb = torch::randn({sh.rows, sh.cols}, f32);
      if (sh.saturated) sc = torch::where(torch::rand_like(sc) < 0.47, torch::ones_like(sc), sc * 0.5);
      torch::Tensor m8;
      if (sh.masked) m8 = (torch::rand({sh.rows, sh.cols}, f32) < 0.5).contiguous().view(torch::kByte);
      const torch::Tensor want_idx = topk_by(sc, tb, m8, sh.k, TopkCudaPath::sorts);
      for (TopkCudaPath path :
           {TopkCudaPath::select, TopkCudaPath::chunked, TopkCudaPath::bitonic, TopkCudaPath::sorts}) {
        if (path == TopkCudaPath::bitonic && sh.cols > 8192) continue;
        if (path == TopkCudaPath::chunked && sh.rows > 32) continue;  // it is the selection there
        if (!torch::equal(topk_by(sc, tb, m8, sh.k, path), want_idx)) {
          std::fprintf(stderr, "top-k %s: path %d differs from the radix sorts\n", sh.what, static_cast<int>(path));
          return 1;
        }
        const char* pname = path == TopkCudaPath::select    ? "select"
                            : path == TopkCudaPath::chunked ? "chunked"
                            : path == TopkCudaPath::bitonic ? "bitonic"
                                                            : "sorts";
        row(std::string("  top-k ") + sh.what + ", k " + std::to_string(sh.k) + ": " + pname, "fwd",
            time_cuda([&] { topk_by(sc, tb, m8, sh.k, path); }), -1, "");
      }
    }
  }

  // ---------------------------------------------------------- image
  if (want("image")) {
    torch::manual_seed(4);
    ConditionalRoutedImageAttention attn(readme_image());
    attn->to(dev);
    torch::Tensor fmap = torch::randn({1, 32, 256, 256}, f32);
    const double err = check_bf16("image", [&] { return attn->forward(fmap); });
    char note[64];
    std::snprintf(note, sizeof note, "bf16 vs fp32 %.1e", err);
    const double dn_f = dense_ms(1, 8, 65536, 65536, false, false);
    const double dn_b = dense_ms(1, 8, 65536, 65536, false, true);
    for (bool amp : {false, true}) {
      const std::string name = std::string("image 1x32x256x256, ") + (amp ? "bf16" : "fp32");
      row(name, "fwd", time_cuda([&] {
            torch::NoGradGuard g;
            Autocast ac(amp);
            attn->forward(fmap);
          }),
          dn_f, note);
      torch::Tensor xg = fmap.detach().requires_grad_(true);
      auto step = train_step([&] { return attn->forward(xg); }, amp, leaves(*attn, xg));
      row(name, "fwd+bwd", time_cuda(step), dn_b, note);
      if (amp) {
        const std::string syncs = host_syncs(step);
        std::printf("  host syncs in a training step: %s\n", syncs.c_str());
        if (syncs == "none") row(name, "graph", time_graph(step), dn_b, "fwd+bwd replayed from a CUDA graph");
        // The routers one by one, as before joint routing (same run).
        attn->options.joint_routing(false);
        row(name + ", separate routers", "fwd", time_cuda([&] {
              torch::NoGradGuard g;
              Autocast ac(true);
              attn->forward(fmap);
            }),
            dn_f, note);
        row(name + ", separate routers", "fwd+bwd",
            time_cuda(train_step([&] { return attn->forward(xg); }, amp, leaves(*attn, xg))), dn_b, note);
        attn->options.joint_routing(true);
      }
    }
  }
  return 0;
}
#endif
