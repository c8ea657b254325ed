// Routing scores on CUDA: each row of x against a few routing tokens, and the
// row's Euclidean norm, in one read of x (a warp per row, the tokens in shared
// memory, float32 accumulation). A matrix product with one or two columns
// wastes most of a GEMM tile and, under autocast, first writes a bf16 copy of
// x; this reads x once at the memory's speed.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels/coor_descent.h"
#include "kernels/cuda_common.cuh"
#include "kernels/cuda_convert.cuh"

namespace colt5 {
namespace kernels {
namespace {

constexpr int kWarps = 8;  // warps (rows in flight) per block

// dots[row * R + q] = x[row] . t[q], norms[row] = |x[row]|. VEC: rows read in
// 16-byte pieces (d * sizeof(T) a multiple of 16, x 16-byte aligned).
template <typename T, int R, bool VEC>
__global__ void __launch_bounds__(kWarps * 32)
    row_dot_norm_kernel(const T* __restrict__ x, const float* __restrict__ t, int64_t rows, int64_t d,
                        float* __restrict__ dots, float* __restrict__ norms) {
  extern __shared__ float4 smem[];
  float* ts = reinterpret_cast<float*>(smem);
  for (int64_t i = threadIdx.x; i < R * d; i += blockDim.x) ts[i] = t[i];
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); row < rows; row += stride) {
    const T* xr = x + row * d;
    float acc[R];
#pragma unroll
    for (int q = 0; q < R; ++q) acc[q] = 0.f;
    float ss = 0.f;
    if (VEC) {
      constexpr int E = 16 / sizeof(T);  // elements per 16-byte piece
      const int64_t pieces = d / E;
      const uint4* xv = reinterpret_cast<const uint4*>(xr);
      const float4* t4 = reinterpret_cast<const float4*>(ts);
      const int64_t d4 = d / 4;
#pragma unroll 2
      for (int64_t c = lane; c < pieces; c += 32) {
        const uint4 raw = __ldg(xv + c);
        const T* e = reinterpret_cast<const T*>(&raw);
        float v[E];
#pragma unroll
        for (int j = 0; j < E; ++j) {
          v[j] = to_float<T>(e[j]);
          ss += v[j] * v[j];
        }
#pragma unroll
        for (int q = 0; q < R; ++q) {
#pragma unroll
          for (int j4 = 0; j4 < E / 4; ++j4) {
            const float4 tv = t4[q * d4 + c * (E / 4) + j4];
            acc[q] += v[4 * j4] * tv.x + v[4 * j4 + 1] * tv.y + v[4 * j4 + 2] * tv.z + v[4 * j4 + 3] * tv.w;
          }
        }
      }
    } else {
      for (int64_t c = lane; c < d; c += 32) {
        const float v = to_float<T>(xr[c]);
        ss += v * v;
#pragma unroll
        for (int q = 0; q < R; ++q) acc[q] += v * ts[q * d + c];
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      ss += __shfl_xor_sync(0xffffffffu, ss, off);
#pragma unroll
      for (int q = 0; q < R; ++q) acc[q] += __shfl_xor_sync(0xffffffffu, acc[q], off);
    }
    if (lane == 0) {
#pragma unroll
      for (int q = 0; q < R; ++q) dots[row * R + q] = acc[q];
      norms[row] = sqrtf(ss);
    }
  }
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("colt5 CUDA routing scores: ") + what + ": " + cudaGetErrorString(e));
}

template <typename T, int R>
void launch(const T* x, const float* t, int64_t rows, int64_t d, float* dots, float* norms, cudaStream_t st) {
  const auto blocks = static_cast<unsigned>(grid_blocks((rows + kWarps - 1) / kWarps, 8));
  const size_t smem = static_cast<size_t>(R) * static_cast<size_t>(d) * sizeof(float);
  const bool vec = (d * static_cast<int64_t>(sizeof(T))) % 16 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  if (vec)
    row_dot_norm_kernel<T, R, true><<<blocks, kWarps * 32, smem, st>>>(x, t, rows, d, dots, norms);
  else
    row_dot_norm_kernel<T, R, false><<<blocks, kWarps * 32, smem, st>>>(x, t, rows, d, dots, norms);
  check(cudaGetLastError(), "row_dot_norm_kernel launch");
}

template <typename T>
void launch_r(const T* x, const float* t, int64_t rows, int64_t d, int64_t r, float* dots, float* norms,
              cudaStream_t st) {
  switch (r) {
    case 1:
      return launch<T, 1>(x, t, rows, d, dots, norms, st);
    case 2:
      return launch<T, 2>(x, t, rows, d, dots, norms, st);
    case 3:
      return launch<T, 3>(x, t, rows, d, dots, norms, st);
    case 4:
      return launch<T, 4>(x, t, rows, d, dots, norms, st);
    default:
      throw std::runtime_error("colt5 CUDA routing scores: at most 4 routing tokens, got " + std::to_string(r));
  }
}

// The backward of the routing scores, one read of x: gx[row] = sum_q
// g_dots[row, q] * t[q] + coef * x[row] with coef = g_norms[row] / norms[row]
// (0 where the norm is 0; no term where g_dots or g_norms is null), and
// gt_partial[block, q, :] = the block's rows' sum of g_dots[row, q] * x[row].
// A block works on one row at a time, each thread on G 16-byte pieces of it,
// the tokens' matching pieces and the partial sums in registers.
template <typename T, int R, int G>
__global__ void row_dot_norm_backward_kernel(const T* __restrict__ x, const float* __restrict__ t,
                                             const float* __restrict__ g_dots, const float* __restrict__ g_norms,
                                             const float* __restrict__ norms, int64_t rows, int64_t d,
                                             const T* __restrict__ gx_add, T* __restrict__ gx,
                                             float* __restrict__ gt_partial, const int32_t* __restrict__ slot0,
                                             const T* __restrict__ rows0, const int32_t* __restrict__ slot1,
                                             const T* __restrict__ rows1) {
  constexpr int E = 16 / sizeof(T);
  const int64_t pieces = d / E;
  float tv[G][R][E], acc[G][R][E];
#pragma unroll
  for (int k = 0; k < G; ++k) {
    const int64_t p = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
#pragma unroll
    for (int q = 0; q < R; ++q)
#pragma unroll
      for (int e = 0; e < E; ++e) {
        tv[k][q][e] = p < pieces ? t[q * d + p * E + e] : 0.f;
        acc[k][q][e] = 0.f;
      }
  }
#pragma unroll 2
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    float gd[R];
#pragma unroll
    for (int q = 0; q < R; ++q) gd[q] = g_dots ? g_dots[row * R + q] : 0.f;
    const int32_t s0 = slot0 ? slot0[row] : -1, s1 = slot1 ? slot1[row] : -1;
    float coef = 0.f;
    if (g_norms) {
      const float nr = norms[row];
      coef = nr > 0.f ? g_norms[row] / nr : 0.f;
    }
#pragma unroll
    for (int k = 0; k < G; ++k) {
      const int64_t p = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
      if (p >= pieces) continue;
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(x + row * d) + p);
      const T* xe = reinterpret_cast<const T*>(&raw);
      uint4 out_raw, add_raw = make_uint4(0, 0, 0, 0), g0_raw = make_uint4(0, 0, 0, 0), g1_raw = g0_raw;
      if (gx && gx_add) add_raw = __ldg(reinterpret_cast<const uint4*>(gx_add + row * d) + p);
      if (gx && s0 >= 0) g0_raw = __ldg(reinterpret_cast<const uint4*>(rows0 + s0 * d) + p);
      if (gx && s1 >= 0) g1_raw = __ldg(reinterpret_cast<const uint4*>(rows1 + s1 * d) + p);
      T* oe = reinterpret_cast<T*>(&out_raw);
      const T* ae = reinterpret_cast<const T*>(&add_raw);
      const T* g0e = reinterpret_cast<const T*>(&g0_raw);
      const T* g1e = reinterpret_cast<const T*>(&g1_raw);
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const float v = to_float<T>(xe[e]);
        // Zero bits are 0 in every type: absent additions add nothing.
        float o = coef * v + to_float<T>(ae[e]) + to_float<T>(g0e[e]) + to_float<T>(g1e[e]);
#pragma unroll
        for (int q = 0; q < R; ++q) {
          o += gd[q] * tv[k][q][e];
          acc[k][q][e] += gd[q] * v;
        }
        oe[e] = from_float<T>(o);
      }
      if (gx) reinterpret_cast<uint4*>(gx + row * d)[p] = out_raw;
    }
  }
  if (!gt_partial) return;
#pragma unroll
  for (int k = 0; k < G; ++k) {
    const int64_t p = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
    if (p >= pieces) continue;
#pragma unroll
    for (int q = 0; q < R; ++q)
#pragma unroll
      for (int e = 0; e < E; ++e) gt_partial[(blockIdx.x * R + q) * d + p * E + e] = acc[k][q][e];
  }
}

int64_t backward_blocks(int64_t rows) { return grid_blocks(rows, 8); }

template <typename T, int R>
void launch_backward(const RowDotBackwardParams& p, cudaStream_t st) {
  constexpr int E = 16 / sizeof(T);
  const int64_t pieces = p.d / E;
  const int64_t blocks = backward_blocks(p.rows);
  const auto* x = static_cast<const T*>(p.x);
  auto* gx = static_cast<T*>(p.grad_x);
  const auto* gx_add = static_cast<const T*>(p.grad_x_add);
  const auto* rows0 = static_cast<const T*>(p.slot_rows[0]);
  const auto* rows1 = static_cast<const T*>(p.slot_rows[1]);
  if (pieces <= 1024) {
    const int threads = static_cast<int>((pieces + 31) / 32 * 32);
    row_dot_norm_backward_kernel<T, R, 1><<<static_cast<unsigned>(blocks), threads, 0, st>>>(
        x, p.tokens, p.grad_dots, p.grad_norms, p.norms, p.rows, p.d, gx_add, gx, p.grad_tokens_partial, p.slot[0],
        rows0, p.slot[1], rows1);
  } else {
    const int threads = static_cast<int>(((pieces + 1) / 2 + 31) / 32 * 32);
    row_dot_norm_backward_kernel<T, R, 2><<<static_cast<unsigned>(blocks), threads, 0, st>>>(
        x, p.tokens, p.grad_dots, p.grad_norms, p.norms, p.rows, p.d, gx_add, gx, p.grad_tokens_partial, p.slot[0],
        rows0, p.slot[1], rows1);
  }
  check(cudaGetLastError(), "row_dot_norm_backward_kernel launch");
}

template <typename T>
void launch_backward_r(const RowDotBackwardParams& p, cudaStream_t st) {
  switch (p.r) {
    case 1:
      return launch_backward<T, 1>(p, st);
    case 2:
      return launch_backward<T, 2>(p, st);
    case 3:
      return launch_backward<T, 3>(p, st);
    case 4:
      return launch_backward<T, 4>(p, st);
    default:
      throw std::runtime_error("colt5 CUDA routing scores: at most 4 routing tokens, got " + std::to_string(p.r));
  }
}

}  // namespace

bool row_dot_norm_backward_supports(const void* x, RowDtype dtype, int64_t d, int64_t r) {
  const int64_t size = dtype == RowDtype::f32 ? 4 : 2;
  return r >= 1 && r <= 4 && d >= 1 && (d * size) % 16 == 0 && (d * size) / 16 <= 2048 &&
         reinterpret_cast<uintptr_t>(x) % 16 == 0;
}

int64_t row_dot_norm_backward_partials(int64_t rows) { return rows == 0 ? 0 : backward_blocks(rows); }

void row_dot_norm_backward_cuda(const RowDotBackwardParams& p, void* stream) {
  if (p.rows == 0) return;
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case RowDtype::f32:
      return launch_backward_r<float>(p, st);
    case RowDtype::f16:
      return launch_backward_r<__half>(p, st);
    case RowDtype::bf16:
      return launch_backward_r<__nv_bfloat16>(p, st);
  }
}

void row_dot_norm_cuda(const void* x, RowDtype dtype, const float* tokens, int64_t rows, int64_t d, int64_t r,
                       float* dots, float* norms, void* stream) {
  if (rows == 0) return;
  if (r * d > kRowDotMaxTokenFloats)
    throw std::runtime_error("colt5 CUDA routing scores: routing tokens of " + std::to_string(r * d) +
                             " floats exceed the shared-memory limit");
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case RowDtype::f32:
      return launch_r(static_cast<const float*>(x), tokens, rows, d, r, dots, norms, st);
    case RowDtype::f16:
      return launch_r(static_cast<const __half*>(x), tokens, rows, d, r, dots, norms, st);
    case RowDtype::bf16:
      return launch_r(static_cast<const __nv_bfloat16*>(x), tokens, rows, d, r, dots, norms, st);
  }
}

// ------------------------------------------------------------ routed rows

namespace {

__global__ void row_slot_map_kernel(const int64_t* __restrict__ flat, int64_t count, int32_t* __restrict__ slot,
                                    int64_t n) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < count;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = flat[j];
    if (row >= 0 && row < n) slot[row] = static_cast<int32_t>(j);
  }
}

constexpr int kScatterWarps = 8;

// One warp per row: rows [0, batch * k) are the routed rows, the next
// batch * lead the lead rows.
template <typename TO, typename TS>
__global__ void __launch_bounds__(kScatterWarps * 32)
    scatter_rows_forward_kernel(TO* __restrict__ out, const TS* __restrict__ src, const int64_t* __restrict__ indices,
                                const float* __restrict__ scale, const float* __restrict__ bias, int64_t batch,
                                int64_t k, int64_t n, int64_t d, int64_t lead) {
  const int lane = threadIdx.x & 31;
  const int64_t routed = batch * k, total = routed + batch * lead;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kScatterWarps;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kScatterWarps + (threadIdx.x >> 5); row < total;
       row += stride) {
    if (row < routed) {
      const int64_t b = row / k;
      TO* o = out + (b * n + indices[row]) * d;
      const TS* sr = src + row * d;
      const float sc = scale ? scale[row] : 1.f;
      for (int64_t c = lane; c < d; c += 32) {
        const float v = to_float<TO>(o[c]) + (sc * to_float<TS>(sr[c]) - (bias ? bias[c] : 0.f));
        o[c] = from_float<TO>(v);
      }
    } else {
      const int64_t r = row - routed, b = r / lead;
      TO* o = out + (b * n + r % lead) * d;
      for (int64_t c = lane; c < d; c += 32) o[c] = from_float<TO>(to_float<TO>(o[c]) - bias[c]);
    }
  }
}

template <typename TO, typename TS>
__global__ void __launch_bounds__(kScatterWarps * 32)
    scatter_rows_backward_kernel(const TO* __restrict__ g, const TS* __restrict__ src,
                                 const int64_t* __restrict__ indices, const float* __restrict__ scale, int64_t batch,
                                 int64_t k, int64_t n, int64_t d, int64_t lead, TS* __restrict__ grad_src,
                                 float* __restrict__ grad_scale, float* __restrict__ grad_bias) {
  extern __shared__ float bias_acc[];
  if (grad_bias) {
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) bias_acc[c] = 0.f;
    __syncthreads();
  }
  const int lane = threadIdx.x & 31;
  const int64_t routed = batch * k, total = routed + (grad_bias ? batch * lead : 0);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kScatterWarps;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kScatterWarps + (threadIdx.x >> 5); row < total;
       row += stride) {
    if (row < routed) {
      const int64_t b = row / k;
      const TO* gr = g + (b * n + indices[row]) * d;
      const TS* sr = src + row * d;
      const float sc = scale ? scale[row] : 1.f;
      float dot = 0.f;
      for (int64_t c = lane; c < d; c += 32) {
        const float gv = to_float<TO>(gr[c]);
        if (grad_src) grad_src[row * d + c] = from_float<TS>(sc * gv);
        if (grad_scale) dot += gv * to_float<TS>(sr[c]);
        if (grad_bias) atomicAdd(&bias_acc[c], -gv);
      }
      if (grad_scale) {
        dot = warp_sum(dot);
        if (lane == 0) grad_scale[row] = dot;
      }
    } else {
      const int64_t r = row - routed, b = r / lead;
      const TO* gr = g + (b * n + r % lead) * d;
      for (int64_t c = lane; c < d; c += 32) atomicAdd(&bias_acc[c], -to_float<TO>(gr[c]));
    }
  }
  if (grad_bias) {
    __syncthreads();
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) atomicAdd(&grad_bias[c], bias_acc[c]);
  }
}

template <typename TO, typename TS>
void scatter_rows_launch(const ScatterRowsParams& p, bool backward, cudaStream_t st) {
  const int64_t rows = p.batch * p.k + ((backward ? p.grad_bias != nullptr : p.bias != nullptr) ? p.batch * p.lead : 0);
  if (rows == 0) return;
  const auto blocks = static_cast<unsigned>(grid_blocks((rows + kScatterWarps - 1) / kScatterWarps, 4));
  if (!backward) {
    scatter_rows_forward_kernel<TO, TS>
        <<<blocks, kScatterWarps * 32, 0, st>>>(static_cast<TO*>(p.out), static_cast<const TS*>(p.src), p.indices,
                                                p.scale, p.bias, p.batch, p.k, p.n, p.d, p.bias ? p.lead : 0);
    check(cudaGetLastError(), "scatter_rows_forward_kernel launch");
  } else {
    const size_t smem = p.grad_bias ? static_cast<size_t>(p.d) * sizeof(float) : 0;
    scatter_rows_backward_kernel<TO, TS><<<blocks, kScatterWarps * 32, smem, st>>>(
        static_cast<const TO*>(p.grad_out), static_cast<const TS*>(p.src), p.indices, p.scale, p.batch, p.k, p.n, p.d,
        p.lead, static_cast<TS*>(p.grad_src), p.grad_scale, p.grad_bias);
    check(cudaGetLastError(), "scatter_rows_backward_kernel launch");
  }
}

template <typename TO>
void scatter_rows_src(const ScatterRowsParams& p, bool backward, cudaStream_t st) {
  switch (p.src_dtype) {
    case RowDtype::f32:
      return scatter_rows_launch<TO, float>(p, backward, st);
    case RowDtype::f16:
      return scatter_rows_launch<TO, __half>(p, backward, st);
    case RowDtype::bf16:
      return scatter_rows_launch<TO, __nv_bfloat16>(p, backward, st);
  }
}

void scatter_rows(const ScatterRowsParams& p, bool backward, void* stream) {
  if (p.d > kScatterRowsMaxD)
    throw std::runtime_error("colt5 CUDA routed rows: width " + std::to_string(p.d) + " exceeds " +
                             std::to_string(kScatterRowsMaxD));
  if (p.lead > p.n) throw std::runtime_error("colt5 CUDA routed rows: lead rows exceed the length");
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (p.out_dtype) {
    case RowDtype::f32:
      return scatter_rows_src<float>(p, backward, st);
    case RowDtype::f16:
      return scatter_rows_src<__half>(p, backward, st);
    case RowDtype::bf16:
      return scatter_rows_src<__nv_bfloat16>(p, backward, st);
  }
}

}  // namespace

void row_slot_map_cuda(const int64_t* flat, int64_t count, int32_t* slot, int64_t n, void* stream) {
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  check(cudaMemsetAsync(slot, 0xff, static_cast<size_t>(n) * sizeof(int32_t), st), "cudaMemsetAsync");
  if (count == 0) return;
  const auto blocks = static_cast<unsigned>(std::min<int64_t>((count + 255) / 256, 4096));
  row_slot_map_kernel<<<blocks, 256, 0, st>>>(flat, count, slot, n);
  check(cudaGetLastError(), "row_slot_map_kernel launch");
}

namespace {

template <typename T, bool VEC>
__global__ void add_float_half_kernel(const float* __restrict__ a, const T* __restrict__ b, float* __restrict__ out,
                                      int64_t count) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (VEC) {
    for (int64_t i = first; i < count / 8; i += stride) {
      const float4 a0 = reinterpret_cast<const float4*>(a)[2 * i], a1 = reinterpret_cast<const float4*>(a)[2 * i + 1];
      union {
        uint4 raw;
        T e[8];
      } bv;
      bv.raw = reinterpret_cast<const uint4*>(b)[i];
      reinterpret_cast<float4*>(out)[2 * i] = make_float4(a0.x + to_float(bv.e[0]), a0.y + to_float(bv.e[1]),
                                                          a0.z + to_float(bv.e[2]), a0.w + to_float(bv.e[3]));
      reinterpret_cast<float4*>(out)[2 * i + 1] = make_float4(a1.x + to_float(bv.e[4]), a1.y + to_float(bv.e[5]),
                                                              a1.z + to_float(bv.e[6]), a1.w + to_float(bv.e[7]));
    }
    for (int64_t i = count / 8 * 8 + first; i < count; i += stride) out[i] = a[i] + to_float(b[i]);
  } else {
    for (int64_t i = first; i < count; i += stride) out[i] = a[i] + to_float(b[i]);
  }
}

template <typename T>
void add_float_half_launch(const float* a, const T* b, float* out, int64_t count, cudaStream_t st) {
  const bool vec =
      (reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b) | reinterpret_cast<uintptr_t>(out)) % 16 == 0;
  const int64_t items = vec ? std::max<int64_t>(count / 8, 1) : count;
  const auto blocks = static_cast<unsigned>(std::min<int64_t>((items + 255) / 256, 65536));
  if (vec)
    add_float_half_kernel<T, true><<<blocks, 256, 0, st>>>(a, b, out, count);
  else
    add_float_half_kernel<T, false><<<blocks, 256, 0, st>>>(a, b, out, count);
  check(cudaGetLastError(), "add_float_half_kernel launch");
}

}  // namespace

void add_float_half_cuda(const float* a, const void* b, RowDtype b_dtype, float* out, int64_t count, void* stream) {
  if (count == 0) return;
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (b_dtype == RowDtype::bf16)
    add_float_half_launch(a, static_cast<const __nv_bfloat16*>(b), out, count, st);
  else if (b_dtype == RowDtype::f16)
    add_float_half_launch(a, static_cast<const __half*>(b), out, count, st);
  else
    throw std::runtime_error("colt5 CUDA add_float_half: b must be float16 or bfloat16");
}

void scatter_rows_forward_cuda(const ScatterRowsParams& p, void* stream) { scatter_rows(p, false, stream); }
void scatter_rows_backward_cuda(const ScatterRowsParams& p, void* stream) { scatter_rows(p, true, stream); }

}  // namespace kernels
}  // namespace colt5
