// RMSNorm and LayerNorm on CUDA, forward and backward, one warp per row with
// the row in registers: the forward reads x once and writes y and the row's
// statistics; the backward reads x, dy and the statistics once, writes dx and,
// per block, its share of the gamma (and beta) gradient (its warps' shares
// added in shared memory; the blocks' shares summed afterwards, in a fixed
// order).
// The composite it replaces launches six kernels forward and ten backward and
// keeps a normalized copy of x for the backward; this keeps one float per row.
//   y = x * f * gamma, f = scale / max(|x|, eps)
//   dx = f * (dxhat - xhat * <dxhat, xhat> / scale^2) with xhat = x * f and
//   dxhat = dy * gamma (dx = f * dxhat where |x| <= eps: f is constant there)
//   dgamma = sum over rows of dy * xhat
// LayerNorm: xhat = (x - mean) * rstd, rstd = 1 / sqrt(var + eps), y = xhat *
// gamma + beta; dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),
// dbeta = sum over rows of dy.
// The backward adds an optional second gradient of x (dx_add) as it writes dx:
// where x also flows past the norm (a residual), its gradient from there
// joins the norm's in the same pass instead of in an addition of its own; and
// likewise the gradient of routing scores taken from x as the norm passed it
// on (RmsNormParams::route_*: the tokens times the scores' gradients, and
// gathered rows' gradients), which the routing scores' node leaves to it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "kernels/coor_descent.h"
#include "kernels/cuda_common.cuh"
#include "kernels/cuda_convert.cuh"

namespace colt5 {
namespace kernels {
namespace {

constexpr int kWarps = 8;  // rows in flight per block

// V consecutive elements of a row as float32 (V = 1, or 4: one 16-byte
// load of float32, one 8-byte load of a 16-bit type), and back.
template <typename T, int V>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, float (&o)[V]) {
  if constexpr (V == 1) {
    o[0] = to_float<T>(*p);
  } else if constexpr (sizeof(T) == 4) {
    static_assert(V == 4, "vectors of 4");
    const float4 v = *reinterpret_cast<const float4*>(p);
    o[0] = v.x, o[1] = v.y, o[2] = v.z, o[3] = v.w;
  } else {
    static_assert(V == 4 && sizeof(T) == 2, "vectors of 4 16-bit elements");
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    const T* t = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int e = 0; e < 4; ++e) o[e] = to_float<T>(t[e]);
  }
}

template <typename T, int V>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const float (&v)[V]) {
  if constexpr (V == 1) {
    *p = from_float<T>(v[0]);
  } else if constexpr (sizeof(T) == 4) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
    uint2 u;
    T* t = reinterpret_cast<T*>(&u);
#pragma unroll
    for (int e = 0; e < 4; ++e) t[e] = from_float<T>(v[e]);
    *reinterpret_cast<uint2*>(p) = u;
  }
}

// A lane's elements: J pieces of V consecutive columns, piece j at column
// (lane + 32 j) V; d is a multiple of V, so a piece is all in the row or all
// past its end. LN: layer normalization (y = (x - mean) * rstd * gamma + beta;
// stats = rstd, means), else RMSNorm (stats = |x|).
template <int V>
__device__ __forceinline__ int piece_col(int lane, int j) {
  return (lane + 32 * j) * V;
}

template <typename TX, typename TG, typename TY, int J, int V, bool LN>
__global__ void __launch_bounds__(kWarps * 32)
    norm_forward_kernel(const TX* __restrict__ x, const TG* __restrict__ gamma, const TG* __restrict__ beta,
                        TY* __restrict__ y, float* __restrict__ stats, float* __restrict__ means, int64_t rows, int d,
                        float scale, float eps) {
  const int lane = threadIdx.x & 31;
  float g[J][V], bt[J][V];
#pragma unroll
  for (int j = 0; j < J; ++j) {
    const int c = piece_col<V>(lane, j);
#pragma unroll
    for (int e = 0; e < V; ++e) g[j][e] = bt[j][e] = 0.f;
    if (c < d) {
      load_vec<TG, V>(gamma + c, g[j]);
      if (LN) load_vec<TG, V>(beta + c, bt[j]);
    }
  }
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); row < rows; row += stride) {
    const TX* xr = x + row * d;
    float v[J][V];
#pragma unroll
    for (int j = 0; j < J; ++j) {
      const int c = piece_col<V>(lane, j);
      if (c < d) {
        load_vec<TX, V>(xr + c, v[j]);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) v[j][e] = 0.f;
      }
    }
    float shift = 0.f, f;
    if (LN) {
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < J; ++j)
#pragma unroll
        for (int e = 0; e < V; ++e) sum += v[j][e];
      shift = warp_sum(sum) / d;
      float ss = 0.f;
#pragma unroll
      for (int j = 0; j < J; ++j) {
        const bool in = piece_col<V>(lane, j) < d;
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const float t = in ? v[j][e] - shift : 0.f;
          ss += t * t;
        }
      }
      f = rsqrtf(warp_sum(ss) / d + eps);
      if (lane == 0) {
        stats[row] = f;
        means[row] = shift;
      }
    } else {
      float ss = 0.f;
#pragma unroll
      for (int j = 0; j < J; ++j)
#pragma unroll
        for (int e = 0; e < V; ++e) ss += v[j][e] * v[j][e];
      const float n = sqrtf(warp_sum(ss));
      if (lane == 0) stats[row] = n;
      f = scale / fmaxf(n, eps);
    }
    TY* yr = y + row * d;
#pragma unroll
    for (int j = 0; j < J; ++j) {
      const int c = piece_col<V>(lane, j);
      if (c >= d) continue;
      float out[V];
#pragma unroll
      for (int e = 0; e < V; ++e) out[e] = LN ? (v[j][e] - shift) * f * g[j][e] + bt[j][e] : v[j][e] * f * g[j][e];
      store_vec<TY, V>(yr + c, out);
    }
  }
}

// The per-column sums of every warp's acc into out[0, d), through red (d
// floats of shared memory), warp 0 first; every thread of the block calls it.
template <int J, int V>
__device__ __forceinline__ void block_sum(const float (&acc)[J][V], float* red, float* __restrict__ out, int d,
                                          int lane) {
  const int w = threadIdx.x >> 5;
  for (int step = 0; step < kWarps; ++step) {
    if (w == step) {
#pragma unroll
      for (int j = 0; j < J; ++j) {
        const int c = piece_col<V>(lane, j);
        if (c >= d) continue;
#pragma unroll
        for (int e = 0; e < V; ++e) red[c + e] = (step == 0 ? 0.f : red[c + e]) + acc[j][e];
      }
    }
    __syncthreads();
  }
  for (int c = threadIdx.x; c < d; c += kWarps * 32) out[c] = red[c];
}

// The routing scores' share of x's gradient (RmsNormParams::route_*).
template <typename TX>
struct RouteGrad {
  int r = 0;
  const float* tokens = nullptr;
  const float* grad_dots = nullptr;
  const float* grad_norms = nullptr;
  const float* norms = nullptr;
  const int32_t* slot[2] = {nullptr, nullptr};
  const TX* slot_rows[2] = {nullptr, nullptr};
  __host__ __device__ bool any() const { return r > 0 || grad_norms || slot[0] || slot[1]; }
};

template <typename TX, typename TG, typename TY, int J, int V, bool LN>
__global__ void __launch_bounds__(kWarps * 32, J * V <= 16 ? 2 : 1)
    norm_backward_kernel(const TX* __restrict__ x, const TG* __restrict__ gamma, const TY* __restrict__ dy,
                         const float* __restrict__ stats, const float* __restrict__ means,
                         const TX* __restrict__ dx_add, TX* __restrict__ dx, float* __restrict__ dgamma_partial,
                         float* __restrict__ dbeta_partial, int64_t rows, int d, float scale, float eps,
                         RouteGrad<TX> rg) {
  // The routing scores' terms for rows up to kRmsNormMaxRouteWidth wide (the
  // wider kernels are left as they were: their registers are full).
  const bool route = J * V <= kRmsNormMaxRouteWidth / 32 && rg.any();
  const int lane = threadIdx.x & 31;
  float g[J][V], acc[J][V], acc_b[J][V];
#pragma unroll
  for (int j = 0; j < J; ++j) {
    const int c = piece_col<V>(lane, j);
#pragma unroll
    for (int e = 0; e < V; ++e) g[j][e] = acc[j][e] = acc_b[j][e] = 0.f;
    if (c < d) load_vec<TG, V>(gamma + c, g[j]);
  }
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  const float inv_scale2 = 1.f / (scale * scale);
  for (int64_t row = warp; row < rows; row += stride) {
    float f, shift = 0.f;
    bool live = true;
    if (LN) {
      f = stats[row];
      shift = means[row];
    } else {
      const float n = stats[row];
      f = scale / fmaxf(n, eps);
      live = n > eps;
    }
    const TX* xr = x + row * d;
    const TY* dyr = dy + row * d;
    float xh[J][V], dxh[J][V];
    float dot = 0.f, sum = 0.f;
#pragma unroll
    for (int j = 0; j < J; ++j) {
      const int c = piece_col<V>(lane, j);
      float xv[V], gv[V];
      if (c < d) {
        load_vec<TX, V>(xr + c, xv);
        load_vec<TY, V>(dyr + c, gv);
      }
#pragma unroll
      for (int e = 0; e < V; ++e) {
        if (c >= d) xv[e] = gv[e] = 0.f;
        xh[j][e] = c < d ? (xv[e] - shift) * f : 0.f;
        dxh[j][e] = gv[e] * g[j][e];
        acc[j][e] += gv[e] * xh[j][e];
        if (LN) acc_b[j][e] += gv[e];
        dot += dxh[j][e] * xh[j][e];
        sum += dxh[j][e];
      }
    }
    float mean_dxh = 0.f;
    if (LN) {
      dot = warp_sum(dot) / d;
      mean_dxh = warp_sum(sum) / d;
    } else {
      dot = live ? warp_sum(dot) * inv_scale2 : 0.f;
    }
    // The routing scores' terms of this row (RouteGrad).
    float gd[4] = {0.f, 0.f, 0.f, 0.f}, coef = 0.f;
    int32_t s0 = -1, s1 = -1;
    if (route) {
#pragma unroll
      for (int q = 0; q < 4; ++q)
        if (q < rg.r) gd[q] = rg.grad_dots[row * rg.r + q];
      if (rg.grad_norms) {
        const float nr = rg.norms[row];
        coef = nr > 0.f ? rg.grad_norms[row] / nr : 0.f;
      }
      if (rg.slot[0]) s0 = rg.slot[0][row];
      if (rg.slot[1]) s1 = rg.slot[1][row];
    }
    TX* dxr = dx + row * d;
#pragma unroll
    for (int j = 0; j < J; ++j) {
      const int c = piece_col<V>(lane, j);
      if (c >= d) continue;
      float out[V], add[V] = {};
      if (dx_add) load_vec<TX, V>(dx_add + row * d + c, add);
      if (route) {
        float t[V];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          if (q >= rg.r) break;
          load_vec<float, V>(rg.tokens + q * d + c, t);
#pragma unroll
          for (int e = 0; e < V; ++e) add[e] += gd[q] * t[e];
        }
        if (coef != 0.f) {
          load_vec<TX, V>(xr + c, t);
#pragma unroll
          for (int e = 0; e < V; ++e) add[e] += coef * t[e];
        }
        if (s0 >= 0) {
          load_vec<TX, V>(rg.slot_rows[0] + static_cast<int64_t>(s0) * d + c, t);
#pragma unroll
          for (int e = 0; e < V; ++e) add[e] += t[e];
        }
        if (s1 >= 0) {
          load_vec<TX, V>(rg.slot_rows[1] + static_cast<int64_t>(s1) * d + c, t);
#pragma unroll
          for (int e = 0; e < V; ++e) add[e] += t[e];
        }
      }
#pragma unroll
      for (int e = 0; e < V; ++e) out[e] = f * (dxh[j][e] - mean_dxh - xh[j][e] * dot) + add[e];
      store_vec<TX, V>(dxr + c, out);
    }
  }
  // The block's share of the gamma (and beta) gradient: its warps' sums
  // added in shared memory in warp order, one row of partials per block.
  extern __shared__ float red[];
  if (dgamma_partial) block_sum<J, V>(acc, red, dgamma_partial + static_cast<int64_t>(blockIdx.x) * d, d, lane);
  if (LN && dbeta_partial) {
    __syncthreads();  // red is reused
    block_sum<J, V>(acc_b, red, dbeta_partial + static_cast<int64_t>(blockIdx.x) * d, d, lane);
  }
}

int sm_count() {
  static int n = [] {
    int dev = 0, count = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, dev);
    return count > 0 ? count : 1;
  }();
  return n;
}

int blocks_for(int64_t rows) {
  const int64_t need = (rows + kWarps - 1) / kWarps;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(need, 4LL * sm_count())));
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("RMSNorm CUDA kernel (") + what + "): " + cudaGetErrorString(e));
}

template <typename TX>
RouteGrad<TX> route_grad(const RmsNormParams& p) {
  RouteGrad<TX> rg;
  rg.r = p.route_grad_dots ? p.route_r : 0;
  rg.tokens = p.route_tokens;
  rg.grad_dots = p.route_grad_dots;
  rg.grad_norms = p.route_grad_norms;
  rg.norms = p.route_norms;
  for (int i = 0; i < 2; ++i) {
    rg.slot[i] = p.route_slot[i];
    rg.slot_rows[i] = static_cast<const TX*>(p.route_slot_rows[i]);
  }
  return rg;
}

template <typename TX, typename TG, typename TY, int J, int V, bool LN>
void launch(const RmsNormParams& p, bool backward, cudaStream_t s) {
  const int blocks = blocks_for(p.rows);
  const int d = static_cast<int>(p.d);
  if (!backward) {
    norm_forward_kernel<TX, TG, TY, J, V, LN><<<blocks, kWarps * 32, 0, s>>>(
        static_cast<const TX*>(p.x), static_cast<const TG*>(p.gamma), static_cast<const TG*>(p.beta),
        static_cast<TY*>(p.y), p.norms, p.means, p.rows, d, p.scale, p.eps);
  } else {
    norm_backward_kernel<TX, TG, TY, J, V, LN><<<blocks, kWarps * 32, d * sizeof(float), s>>>(
        static_cast<const TX*>(p.x), static_cast<const TG*>(p.gamma), static_cast<const TY*>(p.grad_y),
        const_cast<const float*>(p.norms), const_cast<const float*>(p.means), static_cast<const TX*>(p.grad_x_add),
        static_cast<TX*>(p.grad_x), p.grad_gamma_partial, p.grad_beta_partial, p.rows, d, p.scale, p.eps,
        route_grad<TX>(p));
  }
  check(cudaGetLastError(), backward ? "backward" : "forward");
}

// Whether every row of every array the kernel reads or writes starts at a
// boundary of V elements (rows of a multiple of V, aligned base pointers).
bool vectors_fit(const RmsNormParams& p, bool backward, int x_size, int g_size, int y_size) {
  constexpr int V = 4;
  auto aligned = [](const void* ptr, int bytes) {
    return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes) == 0;
  };
  if (p.d % V != 0) return false;
  bool ok = aligned(p.x, V * x_size) && aligned(p.gamma, V * g_size) && aligned(p.beta, V * g_size);
  if (backward)
    ok = ok && aligned(p.grad_y, V * y_size) && aligned(p.grad_x, V * x_size) && aligned(p.grad_x_add, V * x_size) &&
         aligned(p.route_tokens, V * 4) && aligned(p.route_slot_rows[0], V * x_size) &&
         aligned(p.route_slot_rows[1], V * x_size);
  else
    ok = ok && aligned(p.y, V * y_size);
  return ok;
}

// The kernel for d: J pieces of V columns per lane, J V covering the widths
// up to 128, 256, 512, 1024 and 2048.
template <typename TX, typename TG, typename TY, int V, bool LN>
void by_width_in(const RmsNormParams& p, bool backward, cudaStream_t s) {
  if (p.d <= 128)
    launch<TX, TG, TY, 4 / V, V, LN>(p, backward, s);
  else if (p.d <= 256)
    launch<TX, TG, TY, 8 / V, V, LN>(p, backward, s);
  else if (p.d <= 512)
    launch<TX, TG, TY, 16 / V, V, LN>(p, backward, s);
  else if (p.d <= 1024)
    launch<TX, TG, TY, 32 / V, V, LN>(p, backward, s);
  else
    launch<TX, TG, TY, 64 / V, V, LN>(p, backward, s);
}

template <typename TX, typename TG, typename TY, bool LN>
void by_width_as(const RmsNormParams& p, bool backward, cudaStream_t s) {
  if (vectors_fit(p, backward, sizeof(TX), sizeof(TG), sizeof(TY)))
    by_width_in<TX, TG, TY, 4, LN>(p, backward, s);  // runs of 4 consecutive columns
  else
    by_width_in<TX, TG, TY, 1, LN>(p, backward, s);
}

template <typename TX, typename TG, typename TY>
void by_width(const RmsNormParams& p, bool backward, cudaStream_t s) {
  if (p.layer_norm)
    by_width_as<TX, TG, TY, true>(p, backward, s);
  else
    by_width_as<TX, TG, TY, false>(p, backward, s);
}

// Gamma float32: y float32 (the promoted type), or 16-bit from float32
// arithmetic (an autocast region's dtype): any 16-bit type for float32 x,
// x's own type for 16-bit x (rms_norm_supports).
template <typename TX>
void float_gamma(const RmsNormParams& p, bool backward, cudaStream_t s) {
  if (p.y_dtype == RowDtype::f32) return by_width<TX, float, float>(p, backward, s);
  if constexpr (std::is_same<TX, float>::value) {
    if (p.y_dtype == RowDtype::bf16) return by_width<float, float, __nv_bfloat16>(p, backward, s);
    return by_width<float, float, __half>(p, backward, s);
  } else {
    return by_width<TX, float, TX>(p, backward, s);
  }
}

void run(const RmsNormParams& p, bool backward, void* stream) {
  if (p.rows == 0) return;
  if (!rms_norm_supports(p.d, p.x_dtype, p.gamma_dtype, p.y_dtype))
    throw std::invalid_argument("RMSNorm CUDA kernel: unsupported width or dtypes");
  const bool route = (p.route_r > 0 && p.route_grad_dots) || p.route_grad_norms || p.route_slot[0] || p.route_slot[1];
  if (route && (p.d > kRmsNormMaxRouteWidth || p.route_r < 0 || p.route_r > 4 ||
                (p.route_r > 0 && p.route_grad_dots && !p.route_tokens) || (p.route_grad_norms && !p.route_norms)))
    throw std::invalid_argument(
        "RMSNorm CUDA kernel: the routing scores' gradient takes rows up to 1024 wide and at most 4 tokens");
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p.x_dtype) {
    case RowDtype::f32:
      return float_gamma<float>(p, backward, s);
    case RowDtype::f16:
      if (p.gamma_dtype == RowDtype::f32) return float_gamma<__half>(p, backward, s);
      return by_width<__half, __half, __half>(p, backward, s);
    case RowDtype::bf16:
      if (p.gamma_dtype == RowDtype::f32) return float_gamma<__nv_bfloat16>(p, backward, s);
      return by_width<__nv_bfloat16, __nv_bfloat16, __nv_bfloat16>(p, backward, s);
  }
}

}  // namespace

RowDtype rms_norm_promoted(RowDtype x, RowDtype gamma) { return gamma == RowDtype::f32 ? gamma : x; }

bool rms_norm_supports(int64_t d, RowDtype x, RowDtype gamma, RowDtype y) {
  if (d < 1 || d > kRmsNormMaxWidth || (gamma != RowDtype::f32 && gamma != x)) return false;
  // y: the promoted type, or 16-bit from float32 arithmetic with x float32 or of y's type.
  return y == rms_norm_promoted(x, gamma) ||
         (gamma == RowDtype::f32 && y != RowDtype::f32 && (x == RowDtype::f32 || x == y));
}

int64_t rms_norm_partials(int64_t rows) { return rows == 0 ? 0 : static_cast<int64_t>(blocks_for(rows)); }

void rms_norm_forward_cuda(const RmsNormParams& p, void* stream) { run(p, false, stream); }

void rms_norm_backward_cuda(const RmsNormParams& p, void* stream) { run(p, true, stream); }

}  // namespace kernels
}  // namespace colt5
