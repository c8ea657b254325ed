// Device helpers of the CUDA coordinate-descent kernels: exponentials,
// reductions, memory-order primitives.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace colt5 {
namespace kernels {
namespace cd_cuda {

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return -__builtin_huge_val();
}
template <>
__device__ __forceinline__ float neg_inf<float>() {
  return -__builtin_huge_valf();
}

__device__ __forceinline__ float fmin_(float a, float b) { return fminf(a, b); }
__device__ __forceinline__ double fmin_(double a, double b) { return fmin(a, b); }

// ex(z) = exp(z / kScale): float uses the hardware base-2 exponential on
// arguments pre-scaled by log2(e) (relative error about 2^-22, independent of
// the fast-math flag); double uses the accurate exp.
template <typename T>
struct Fm;
template <>
struct Fm<float> {
  static constexpr double kScale = 1.4426950408889634073599;  // log2(e)
  static __device__ __forceinline__ float ex(float z) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(z));
    return r;
  }
};
template <>
struct Fm<double> {
  static constexpr double kScale = 1.0;
  static __device__ __forceinline__ double ex(double z) { return exp(z); }
};

struct SumOp {
  template <typename T>
  static __device__ __forceinline__ T id() {
    return T(0);
  }
  template <typename T>
  static __device__ __forceinline__ T apply(T a, T b) {
    return a + b;
  }
};
struct MaxOp {
  template <typename T>
  static __device__ __forceinline__ T id() {
    return neg_inf<T>();
  }
  template <typename T>
  static __device__ __forceinline__ T apply(T a, T b) {
    // Equal values (+0 and -0) combine commutatively, so every lane agrees.
    return a > b ? a : (b > a ? b : a + b);
  }
};

// Butterfly over the warp: every lane ends with the bit-identical result
// (each step adds the same two numbers in both partner lanes).
template <class Op, typename T>
__device__ __forceinline__ T warp_reduce(T x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = Op::apply(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

__device__ __forceinline__ unsigned ld_acquire_gpu(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

}  // namespace cd_cuda
}  // namespace kernels
}  // namespace colt5
