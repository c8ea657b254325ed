// The GPU time of a step by colt5 scope and by kernel, from LibTorch's Kineto
// profiler (CUPTI): every kernel, copy and fill the step runs on the GPU is
// put in the innermost colt5 scope (RECORD_USER_SCOPE "colt5::...") whose
// host code launched it; a kernel of the backward goes to the scope of the
// forward operator its autograd node came from ("bwd colt5::..."), found by
// the autograd sequence number. Kernel times are the GPU's own (no launch
// overhead); their sum against the step's wall time shows how busy the GPU was.
// The longest launch sites name the operator that launched each kernel and
// the autograd node being evaluated (a backward, or the engine summing the
// gradients of a tensor used more than once).
// Used by bench_modules_cuda (LibTorch 2 with CUDA only).
#pragma once

#include <torch/csrc/autograd/profiler_kineto.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace colt5_bench {

struct HostEvent {
  uint64_t start, end, thread;
  int64_t seq;
  std::string name;
};

// The innermost event of `events` (one thread's, any order) that contains `t`
// and satisfies `wanted`; nullptr if none.
inline const HostEvent* innermost(const std::vector<const HostEvent*>& events, uint64_t t,
                                  const std::function<bool(const HostEvent&)>& wanted) {
  const HostEvent* best = nullptr;
  for (const HostEvent* e : events) {
    if (e->start > t || e->end < t || !wanted(*e)) continue;
    if (!best || e->start >= best->start) best = e;
  }
  return best;
}

inline bool starts_with(const std::string& s, const char* prefix) { return s.rfind(prefix, 0) == 0; }

// COLT5_PROFILE_TOP=N where set (N kernels and 2N launch sites listed: every
// site of a short step with a large N), else `fallback`; anything but a
// positive integer is an error.
inline int profile_top(int fallback) {
  const char* env = std::getenv("COLT5_PROFILE_TOP");
  if (!env) return fallback;
  char* end = nullptr;
  const long n = std::strtol(env, &end, 10);
  if (end == env || *end != '\0' || n < 1 || n > 100000)
    throw std::invalid_argument(std::string("COLT5_PROFILE_TOP must be a positive integer, got '") + env + "'");
  return static_cast<int>(n);
}

// Runs `step` twice to warm up, then `runs` times under the profiler, and
// prints the GPU time per scope and the `top` longest kernels (per step).
inline void kernel_profile(const char* title, const std::function<void()>& step, int runs = 3, int top = 15) {
  namespace prof = torch::autograd::profiler;
  using torch::profiler::impl::ActivityType;
  using torch::profiler::impl::ProfilerConfig;
  using torch::profiler::impl::ProfilerState;
  top = profile_top(top);
  for (int i = 0; i < 2; ++i) step();
  torch::cuda::synchronize();
  const std::set<ActivityType> activities = {ActivityType::CPU, ActivityType::CUDA};
  const ProfilerConfig config(ProfilerState::KINETO);
  prof::prepareProfiler(config, activities);
  prof::enableProfiler(config, activities);
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < runs; ++i) step();
  torch::cuda::synchronize();
  const double wall_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / runs;
  const auto result = prof::disableProfiler();

  std::vector<HostEvent> host;
  std::unordered_map<uint64_t, size_t> by_correlation;
  struct Device {
    std::string name;
    uint64_t linked, ns;
  };
  std::vector<Device> device;
  for (const auto& e : result->events()) {
    if (e.deviceType() == c10::DeviceType::CPU) {
      if (e.correlationId()) by_correlation[e.correlationId()] = host.size();
      host.push_back({e.startNs(), e.endNs(), e.startThreadId(), e.sequenceNr(), e.name()});
    } else if (e.deviceType() == c10::DeviceType::CUDA) {
      // Kineto also reports each user scope's span on the GPU's timeline (a
      // GPU user annotation, named like the scope): not a kernel.
      const std::string name = e.name();
      if (e.activityType() == 2 /* GPU user annotation */ ||
          (starts_with(name, "colt5::") && name.find('(') == std::string::npos))
        continue;
      device.push_back({name, e.linkedCorrelationId(), e.durationNs()});
    }
  }
  std::map<uint64_t, std::vector<const HostEvent*>> by_thread;
  for (const auto& e : host) by_thread[e.thread].push_back(&e);
  auto scope_of = [&](const HostEvent& e) -> std::string {
    const HostEvent* s = innermost(by_thread[e.thread], e.start, [](const HostEvent& h) {
      return starts_with(h.name, "colt5::");
    });
    return s ? s->name : std::string();
  };
  // Forward operators by autograd sequence number -> their scope.
  std::unordered_map<int64_t, std::string> forward_scope;
  for (const auto& e : host)
    if (e.seq >= 0 && !starts_with(e.name, "autograd::") && e.name.find("Backward") == std::string::npos) {
      std::string s = scope_of(e);
      if (!s.empty()) forward_scope.emplace(e.seq, s);
    }
  std::map<std::string, std::pair<double, int>> scopes;  // ms, kernels
  std::map<std::string, std::pair<double, int>> kernels;
  // Launch sites: scope | autograd node being evaluated | operator | kernel.
  std::map<std::string, std::pair<double, int>> sites;
  const std::string evaluate = "autograd::engine::evaluate_function: ";
  double gpu_ms = 0;
  for (const auto& d : device) {
    const double ms = d.ns / 1e6;
    gpu_ms += ms;
    std::string scope = "(not linked to a host operator)";
    auto it = by_correlation.find(d.linked);
    if (it != by_correlation.end()) {
      const HostEvent& op = host[it->second];
      scope = scope_of(op);
      if (scope.empty()) {
        // A backward node: the innermost host event containing the launch with
        // a sequence number (the node), mapped to its forward operator's scope.
        const HostEvent* node = innermost(by_thread[op.thread], op.start, [](const HostEvent& h) {
          return h.seq >= 0 && (h.name.find("Backward") != std::string::npos || starts_with(h.name, "autograd::") ||
                                starts_with(h.name, "CppNode"));
        });
        if (node) {
          auto f = forward_scope.find(node->seq);
          scope = "bwd " + (f != forward_scope.end() ? f->second : std::string("(outside colt5 scopes)"));
        } else {
          scope = "(outside colt5 scopes)";
        }
      }
    }
    scopes[scope].first += ms;
    scopes[scope].second += 1;
    std::string site = scope + " | ";
    if (it != by_correlation.end()) {
      const HostEvent& op = host[it->second];
      const HostEvent* node = innermost(by_thread[op.thread], op.start,
                                        [&](const HostEvent& h) { return starts_with(h.name, evaluate.c_str()); });
      site += (node ? node->name.substr(evaluate.size()) : std::string("-")) + " | " + op.name;
    }
    site += " | " + d.name.substr(0, 48);
    sites[site].first += ms;
    sites[site].second += 1;
    std::string k = d.name.size() > 90 ? d.name.substr(0, 87) + "..." : d.name;
    kernels[k].first += ms;
    kernels[k].second += 1;
  }
  std::printf("\n%s: GPU time by colt5 scope (Kineto, per step, mean of %d): step %.3f ms wall, kernels %.3f ms "
              "(GPU busy %.0f%%)\n",
              title, runs, wall_ms, gpu_ms / runs, 100.0 * gpu_ms / runs / wall_ms);
  std::vector<std::pair<double, std::string>> order;
  for (const auto& [s, v] : scopes) order.push_back({v.first, s});
  std::sort(order.rbegin(), order.rend());
  std::printf("  %-44s %9s %7s %8s\n", "scope (innermost)", "GPU ms", "share", "kernels");
  for (const auto& [ms, s] : order)
    std::printf("  %-44s %9.3f %6.1f%% %8.1f\n", s.c_str(), ms / runs, 100.0 * ms / gpu_ms,
                scopes[s].second / double(runs));
  order.clear();
  for (const auto& [k, v] : kernels) order.push_back({v.first, k});
  std::sort(order.rbegin(), order.rend());
  std::printf("  longest kernels (GPU ms per step, launches per step):\n");
  for (int i = 0; i < top && i < static_cast<int>(order.size()); ++i)
    std::printf("  %8.3f %6.1f  %s\n", order[i].first / runs, kernels[order[i].second].second / double(runs),
                order[i].second.c_str());
  order.clear();
  for (const auto& [k, v] : sites) order.push_back({v.first, k});
  std::sort(order.rbegin(), order.rend());
  std::printf("  longest launch sites (GPU ms per step, launches per step; scope | autograd node | operator | kernel):\n");
  for (int i = 0; i < 2 * top && i < static_cast<int>(order.size()); ++i)
    std::printf("  %8.3f %6.1f  %s\n", order[i].first / runs, sites[order[i].second].second / double(runs),
                order[i].second.c_str());
  // LibTorch's generic elementwise kernel runs where an operand is strided (or
  // its types mixed): many small launches that a layout change can remove.
  int shown = 0;
  for (const auto& [ms, site] : order) {
    if (site.find("| void at::native::elementwise_kernel<") == std::string::npos) continue;
    if (shown++ == 0) std::printf("  generic (strided) elementwise kernels by launch site:\n");
    if (shown > 2 * top) break;
    std::printf("  %8.3f %6.1f  %s\n", ms / runs, sites[site].second / double(runs), site.c_str());
  }
}

}  // namespace colt5_bench
