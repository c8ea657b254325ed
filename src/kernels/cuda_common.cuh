// Device helpers shared by the CUDA kernels: warp sums, 16-byte float32
// atomic additions, the masked sliding window's sums over windows.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace colt5 {
namespace kernels {

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
    // Two 16-byte loads (col is a multiple of 8, width too).
    const float4* s = reinterpret_cast<const float4*>(sums + (b * windows + u) * width + col);
    const float4 x = s[0], y = s[1];
    acc[0] += x.x;
    acc[1] += x.y;
    acc[2] += x.z;
    acc[3] += x.w;
    acc[4] += y.x;
    acc[5] += y.y;
    acc[6] += y.z;
    acc[7] += y.w;
  }
}

}  // namespace kernels
}  // namespace colt5
