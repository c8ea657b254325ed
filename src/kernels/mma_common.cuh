// Helpers for 16-bit tensor-core kernels on register tiles (sm_80 and up):
// cp.async copies, ldmatrix loads, mma.sync m16n8k16 with float32
// accumulation, accumulator fragments turned into operand fragments, and the
// two products of an attention tile on 16 query rows (q k^T, then p v).
// Used by the gathered attention's and the band attention's kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace colt5 {
namespace kernels {
namespace mma16 {

// The helpers need sm_80 (mma.sync on 16-bit types, cp.async); below it the
// host never launches these kernels (mma_path_applies) and they trap.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define COLT5_MMA_ASM(...) __trap()
#else
#define COLT5_MMA_ASM(...) asm volatile(__VA_ARGS__)
#endif

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  COLT5_MMA_ASM("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)), "l"(src));
}
__device__ __forceinline__ void cp_commit() { COLT5_MMA_ASM("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_wait() {
  COLT5_MMA_ASM("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldsm4(unsigned (&r)[4], const void* p) {
  COLT5_MMA_ASM("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm4_t(unsigned (&r)[4], const void* p) {
  COLT5_MMA_ASM("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                : "r"(smem_addr(p)));
}

// c += a b for one m16n8k16 tile (a: 4 registers, b: 2), float32 accumulation.
template <typename T>
__device__ __forceinline__ void mma(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1);
template <>
__device__ __forceinline__ void mma<__nv_bfloat16>(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  COLT5_MMA_ASM(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma<__half>(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  COLT5_MMA_ASM(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as a pair of T in one register, the first in the low half.
template <typename T>
__device__ __forceinline__ unsigned pack2(float lo, float hi);
template <>
__device__ __forceinline__ unsigned pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&v);
}
template <>
__device__ __forceinline__ unsigned pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&v);
}

// The operand fragment of a 16 x 16 slice of accumulator tiles c0 (columns
// 0..7) and c1 (columns 8..15), rows as they are.
template <typename T>
__device__ __forceinline__ void acc_to_a(unsigned (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = pack2<T>(c0[0], c0[1]);
  a[1] = pack2<T>(c0[2], c0[3]);
  a[2] = pack2<T>(c1[0], c1[1]);
  a[3] = pack2<T>(c1[2], c1[3]);
}

// The operand fragments of 16 rows (`rows`, ld elements apart) over KS k
// steps of 16 columns.
template <int KS, typename T>
__device__ __forceinline__ void load_a(unsigned (&a)[KS][4], const T* rows, int ld, int lane) {
#pragma unroll
  for (int ks = 0; ks < KS; ++ks)
    ldsm4(a[ks], rows + ((lane & 7) + ((lane >> 3) & 1) * 8) * ld + 16 * ks + (lane >> 4) * 8);
}

// s = a (16 rows, KS k steps) times rows 0 .. 8 * NT - 1 of `keys`
// (row-major, ld elements apart) transposed: NT accumulator tiles of 8 keys.
template <typename T, int KS, int NT>
__device__ __forceinline__ void times_rows_t(float (&s)[NT][4], const unsigned (&a)[KS][4], const T* keys, int ld,
                                             int lane) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
  for (int np = 0; np < NT / 2; ++np) {
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      unsigned b[4];
      ldsm4(b, keys + (16 * np + (lane & 7) + ((lane >> 4) << 3)) * ld + 16 * ks + ((lane >> 3) & 1) * 8);
      mma<T>(s[2 * np], a[ks], b[0], b[1]);
      mma<T>(s[2 * np + 1], a[ks], b[2], b[3]);
    }
  }
}

// o += the probabilities in s (16 rows, NT accumulator tiles of 8 keys) times
// rows 0 .. 8 * NT - 1 of `values` (row-major, ld elements apart): OT
// accumulator tiles of 8 columns.
template <typename T, int NT, int OT>
__device__ __forceinline__ void add_times_rows(float (&o)[OT][4], const float (&s)[NT][4], const T* values, int ld,
                                               int lane) {
#pragma unroll
  for (int kq = 0; kq < NT / 2; ++kq) {
    unsigned a[4];
    acc_to_a<T>(a, s[2 * kq], s[2 * kq + 1]);
#pragma unroll
    for (int c = 0; c < OT / 2; ++c) {
      unsigned b[4];
      ldsm4_t(b, values + (16 * kq + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + 16 * c + (lane >> 4) * 8);
      mma<T>(o[2 * c], a, b[0], b[1]);
      mma<T>(o[2 * c + 1], a, b[2], b[3]);
    }
  }
}

}  // namespace mma16
}  // namespace kernels
}  // namespace colt5
