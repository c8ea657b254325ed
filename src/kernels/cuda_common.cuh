// Helpers shared by the CUDA kernels: warp sums, 16-byte float32 atomic
// additions, eight floats added from memory, the masked sliding window's sums
// over windows, and the grid size of kernels that loop over their work.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace colt5 {
namespace kernels {

// A grid of `want` blocks, at most per_sm per multiprocessor of the current
// device (the kernels loop over what is left), at least one.
inline int64_t grid_blocks(int64_t want, int per_sm) {
  int dev = 0, sms = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("colt5 CUDA: multiprocessor count: ") + cudaGetErrorString(e));
  return std::max<int64_t>(1, std::min<int64_t>(want, int64_t{sms} * per_sm));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// p[0..3] += v (one 16-byte atomic where the device has it).
__device__ __forceinline__ void add4(float* p, float4 v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float4*>(p), v);
#else
  atomicAdd(p, v.x);
  atomicAdd(p + 1, v.y);
  atomicAdd(p + 2, v.z);
  atomicAdd(p + 3, v.w);
#endif
}

// acc[0..7] += src[0..7] (two 16-byte loads; src 16-byte aligned).
__device__ __forceinline__ void add8(float acc[8], const float* src) {
  const float4 x = reinterpret_cast<const float4*>(src)[0], y = reinterpret_cast<const float4*>(src)[1];
  acc[0] += x.x;
  acc[1] += x.y;
  acc[2] += x.z;
  acc[3] += x.w;
  acc[4] += y.x;
  acc[5] += y.y;
  acc[6] += y.z;
  acc[7] += y.w;
}

// acc[e] = the sum over windows u = lo .. hi of sums[b, u, col + e] (float32
// window sums, batch x windows x width), `outside` for each u beyond an end.
__device__ __forceinline__ void sum_windows(const float* __restrict__ sums, int64_t b, int64_t windows, int64_t width,
                                            int64_t col, int64_t lo, int64_t hi, float outside, float acc[8]) {
#pragma unroll
  for (int e = 0; e < 8; ++e) acc[e] = 0.f;
  for (int64_t u = lo; u <= hi; ++u) {
    if (u < 0 || u >= windows) {
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[e] += outside;
      continue;
    }
    add8(acc, sums + (b * windows + u) * width + col);  // col is a multiple of 8, width too
  }
}

}  // namespace kernels
}  // namespace colt5
