// The masked sliding window's data movement around the flash kernel
// (local_attention.cpp, LocalMHA with a key mask): q, k and v from the packed
// projection into one buffer of 8 more head dimensions carrying the key mask as
// a score bias, the output back into the projection's layout with the blind
// queries' look-around means, and the same two ways for the gradients. Each
// kernel moves 16 bytes (8 elements) per thread; head widths are multiples of 8.
// Also the causal windows' merge of two flash calls and their gradients' sum
// (LocalMHA without a mask, causal, one window of look-back).
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/coor_descent.h"
#include "kernels/cuda_common.cuh"
#include "kernels/cuda_convert.cuh"

namespace colt5 {
namespace kernels {
namespace {

constexpr int kThreads = 256;

template <typename T>
union Pack8 {
  uint4 raw;
  T v[8];
};

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

unsigned grid_for(int64_t items) { return static_cast<unsigned>(ceil_div(items, kThreads)); }

// seen[b, t]: some key in [t - ws * back, t + ws * fwd] (.. t when causal)
// inside the sequence is visible.
__global__ void seen_kernel(SlidingMaskParams p, const bool* __restrict__ mask, bool* __restrict__ seen) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= p.batch * p.n) return;
  const int64_t b = i / p.n, t = i % p.n;
  const int64_t lo = t - p.ws * p.back > 0 ? t - p.ws * p.back : 0;
  const int64_t reach = t + (p.causal ? 0 : p.ws * p.fwd);
  const int64_t hi = reach < p.n - 1 ? reach : p.n - 1;
  const bool* row = mask + b * p.n;
  bool any = false;
  for (int64_t j = lo; j <= hi && !any; ++j) any = row[j];
  seen[i] = any;
}

// wide (3, batch, n, heads, d + 8) from qkv (batch, n, 3, heads, d): the first
// d of each head copied; the 8 more are 1 then zeros for q, the key's bias (0
// visible, -hidden hidden) then zeros for k, zeros for v.
template <typename T, typename I>
__global__ void pack_qkv_kernel(SlidingMaskParams p, const T* __restrict__ qkv, const bool* __restrict__ mask,
                                T* __restrict__ wide) {
  const I chunks = static_cast<I>(p.d / 8 + 1), heads = static_cast<I>(p.heads);
  const int64_t rows = p.batch * p.n;
  const I i = static_cast<I>(blockIdx.x) * static_cast<I>(blockDim.x) + static_cast<I>(threadIdx.x);
  if (static_cast<int64_t>(i) >= rows * 3 * p.heads * (p.d / 8 + 1)) return;
  const I c = i % chunks, rest = i / chunks, h = rest % heads, rest2 = rest / heads, part = rest2 % 3, row = rest2 / 3;
  Pack8<T> out;
  if (c < chunks - 1) {
    out.raw = *reinterpret_cast<const uint4*>(qkv + ((static_cast<int64_t>(row) * 3 + part) * p.heads + h) * p.d + c * 8);
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) out.v[e] = from_float<T>(0.f);
    if (part == 0) out.v[0] = from_float<T>(1.f);
    if (part == 1 && !mask[row]) out.v[0] = from_float<T>(-p.hidden_bias);
  }
  *reinterpret_cast<uint4*>(wide + ((part * rows + row) * p.heads + h) * (p.d + 8) + c * 8) = out.raw;
}

// sums[b, w, c] (float32) = the sum over window w's rows t < n of src[b, t, c]
// (rows row_stride elements apart), over every row, or only over the rows whose
// seen flag is false when `seen` is given. One block per (b, w).
template <typename T>
__global__ void window_sums_kernel(SlidingMaskParams p, const T* __restrict__ src, int64_t row_stride,
                                   const bool* __restrict__ seen, float* __restrict__ sums) {
  const int64_t windows = ceil_div(p.n, p.ws), width = p.heads * p.d;
  const int64_t b = blockIdx.x / windows, w = blockIdx.x % windows;
  const int64_t t0 = w * p.ws, t1 = t0 + p.ws < p.n ? t0 + p.ws : p.n;
  for (int64_t col = threadIdx.x; col < width; col += blockDim.x) {
    float acc = 0.f;
    for (int64_t t = t0; t < t1; ++t) {
      if (seen && seen[b * p.n + t]) continue;
      acc += to_float(src[(b * p.n + t) * row_stride + col]);
    }
    sums[blockIdx.x * width + col] = acc;
  }
}

// y (batch, n, heads * d): the flash output's first d of each head where the
// query sees a key; else its window's look-around mean, the window sums of
// windows w - back .. w + fwd (-ws for each beyond an end: slots of value -1)
// over the span.
template <typename T>
__global__ void unpack_out_kernel(SlidingMaskParams p, const T* __restrict__ out8, const bool* __restrict__ seen,
                                  const float* __restrict__ sums, T* __restrict__ y) {
  const int64_t chunks = p.d / 8, rows = p.batch * p.n;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= rows * p.heads * chunks) return;
  const int64_t c = i % chunks, h = (i / chunks) % p.heads, row = i / (chunks * p.heads);
  Pack8<T> out;
  if (seen[row]) {
    out.raw = *reinterpret_cast<const uint4*>(out8 + (row * p.heads + h) * (p.d + 8) + c * 8);
  } else {
    const int64_t windows = ceil_div(p.n, p.ws), b = row / p.n, w = (row % p.n) / p.ws;
    const int64_t width = p.heads * p.d, col = h * p.d + c * 8;
    const float span = static_cast<float>((p.back + p.fwd + 1) * p.ws);
    float acc[8];
    sum_windows(sums, b, windows, width, col, w - p.back, w + p.fwd, -static_cast<float>(p.ws), acc);
#pragma unroll
    for (int e = 0; e < 8; ++e) out.v[e] = from_float<T>(acc[e] / span);
  }
  *reinterpret_cast<uint4*>(y + row * p.heads * p.d + h * p.d + c * 8) = out.raw;
}

// g8 (batch, n, heads, d + 8) from gy (batch, n, heads * d): copied where the
// query sees a key, zero for blind queries (their output is the mean, not the
// kernel's) and in the 8 more dimensions.
template <typename T>
__global__ void pack_grad_kernel(SlidingMaskParams p, const T* __restrict__ gy, const bool* __restrict__ seen,
                                 T* __restrict__ g8) {
  const int64_t chunks = p.d / 8 + 1, rows = p.batch * p.n;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= rows * p.heads * chunks) return;
  const int64_t c = i % chunks, h = (i / chunks) % p.heads, row = i / (chunks * p.heads);
  Pack8<T> out;
  if (c < chunks - 1 && seen[row]) {
    out.raw = *reinterpret_cast<const uint4*>(gy + row * p.heads * p.d + h * p.d + c * 8);
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) out.v[e] = from_float<T>(0.f);
  }
  *reinterpret_cast<uint4*>(g8 + (row * p.heads + h) * (p.d + 8) + c * 8) = out.raw;
}

// dqkv (batch, n, 3, heads, d) from the kernel's gradients (batch, n, heads,
// d + 8): the first d of each head; v also takes the blind queries' share,
// (the blind gradient sums of windows w - fwd .. w + back) / span.
template <typename T, typename I>
__global__ void unpack_grads_kernel(SlidingMaskParams p, const T* __restrict__ dq8, const T* __restrict__ dk8,
                                    const T* __restrict__ dv8, const float* __restrict__ blind_sums,
                                    T* __restrict__ dqkv) {
  const I chunks = static_cast<I>(p.d / 8), heads = static_cast<I>(p.heads);
  const int64_t rows = p.batch * p.n;
  const I i = static_cast<I>(blockIdx.x) * static_cast<I>(blockDim.x) + static_cast<I>(threadIdx.x);
  if (static_cast<int64_t>(i) >= rows * 3 * p.heads * (p.d / 8)) return;
  const I c = i % chunks, rest = i / chunks, h = rest % heads, rest2 = rest / heads, part = rest2 % 3, row = rest2 / 3;
  const T* src = part == 0 ? dq8 : part == 1 ? dk8 : dv8;
  Pack8<T> out;
  out.raw = *reinterpret_cast<const uint4*>(src + (static_cast<int64_t>(row) * p.heads + h) * (p.d + 8) + c * 8);
  if (part == 2) {
    const I n = static_cast<I>(p.n), ws = static_cast<I>(p.ws);
    const int64_t windows = ceil_div(p.n, p.ws), b = row / n, w = (row % n) / ws;
    const int64_t width = p.heads * p.d, col = h * p.d + c * 8;
    const float span = static_cast<float>((p.back + p.fwd + 1) * p.ws);
    float acc[8];
    sum_windows(blind_sums, b, windows, width, col, w - p.fwd, w + p.back, 0.f, acc);
    // Where no blind query reaches, the sums are 0 and the conversion round
    // trip leaves the kernel's gradient as it is.
#pragma unroll
    for (int e = 0; e < 8; ++e) out.v[e] = from_float<T>(to_float(out.v[e]) + acc[e] / span);
  }
  *reinterpret_cast<uint4*>(dqkv + ((static_cast<int64_t>(row) * 3 + part) * p.heads + h) * p.d + c * 8) = out.raw;
}

// Causal windows of one look-back (LocalMHA, the autoregressive light branch)
// as two flash calls over views of the packed projection: A, each window over
// its own keys (causal); B, the flattened (batch * n) rows' window g over
// window g - 1 (no limit), for g = 1 .. batch * windows - 1. A pair whose
// windows belong to different sequences (g the first window of its sequence)
// is excluded: no weight in the output, +inf in B's log-sum-exp so that B's
// backward gives it no gradient.

// y = wa * oa + wb * ob per (row, head) with wa, wb the two calls' shares of
// the softmax (from their log-sum-exps); lse (batch * windows, heads, ws) of
// both together, lse_b (batch * windows - 1, heads, ws) the same for B's rows
// (+inf where excluded).
template <typename T>
__global__ void windows_merge_kernel(SlidingMaskParams p, const T* __restrict__ oa, const T* __restrict__ ob,
                                     const float* __restrict__ lse_a, const float* __restrict__ lse_bin,
                                     T* __restrict__ y, float* __restrict__ lse, float* __restrict__ lse_b) {
  const int64_t chunks = p.d / 8, rows = p.batch * p.n, windows = p.n / p.ws;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= rows * p.heads * chunks) return;
  const int64_t c = i % chunks, h = (i / chunks) % p.heads, row = i / (chunks * p.heads);
  const int64_t g = row / p.ws, r = row % p.ws;
  const int64_t at_a = (g * p.heads + h) * p.ws + r, at_b = at_a - p.heads * p.ws;  // B's window g - 1
  const float la = lse_a[at_a];
  const int64_t off = (row * p.heads + h) * p.d + c * 8;
  Pack8<T> a;
  a.raw = *reinterpret_cast<const uint4*>(oa + off);
  if (g % windows == 0) {  // no partner in this sequence
    if (c == 0) {
      lse[at_a] = la;
      if (g > 0) lse_b[at_b] = INFINITY;
    }
    *reinterpret_cast<uint4*>(y + off) = a.raw;
    return;
  }
  const float lb = lse_bin[at_b], m = fmaxf(la, lb);
  const float ea = __expf(la - m), eb = __expf(lb - m), s = ea + eb;
  const float wa = ea / s, wb = eb / s;
  Pack8<T> b, out;
  b.raw = *reinterpret_cast<const uint4*>(ob + off - p.ws * p.heads * p.d);
#pragma unroll
  for (int e = 0; e < 8; ++e) out.v[e] = from_float<T>(wa * to_float<T>(a.v[e]) + wb * to_float<T>(b.v[e]));
  *reinterpret_cast<uint4*>(y + off) = out.raw;
  if (c == 0) {
    const float l = m + __logf(s);
    lse[at_a] = l;
    lse_b[at_b] = l;
  }
}

// dqkv (batch, n, 3, heads, d) from both calls' gradients (rows of heads * d):
// q's from A's row and B's row - ws (B's queries start one window in), k's and
// v's from A's row and B's same row (B's keys start at row 0 and end one
// window before the last row).
template <typename T>
__global__ void windows_grads_kernel(SlidingMaskParams p, const T* __restrict__ dqa, const T* __restrict__ dka,
                                     const T* __restrict__ dva, const T* __restrict__ dqb, const T* __restrict__ dkb,
                                     const T* __restrict__ dvb, T* __restrict__ dqkv) {
  const int64_t chunks = p.d / 8, rows = p.batch * p.n, width = p.heads * p.d;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= rows * 3 * width / 8) return;
  const int64_t c = i % chunks, h = (i / chunks) % p.heads, part = (i / (chunks * p.heads)) % 3,
                row = i / (chunks * p.heads * 3);
  const int64_t col = h * p.d + c * 8;
  const T* a = part == 0 ? dqa : (part == 1 ? dka : dva);
  const T* b = part == 0 ? dqb : (part == 1 ? dkb : dvb);
  const int64_t brow = part == 0 ? row - p.ws : row;
  Pack8<T> x, out;
  x.raw = *reinterpret_cast<const uint4*>(a + row * width + col);
  float acc[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) acc[e] = to_float<T>(x.v[e]);
  if (brow >= 0 && brow < rows - p.ws) {
    Pack8<T> z;
    z.raw = *reinterpret_cast<const uint4*>(b + brow * width + col);
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] += to_float<T>(z.v[e]);
  }
#pragma unroll
  for (int e = 0; e < 8; ++e) out.v[e] = from_float<T>(acc[e]);
  *reinterpret_cast<uint4*>(dqkv + (row * 3 + part) * width + col) = out.raw;
}

template <template <typename> class Launch, typename... Args>
void dispatch16(RowDtype dtype, Args&&... args) {
  if (dtype == RowDtype::bf16)
    Launch<__nv_bfloat16>::run(args...);
  else
    Launch<__half>::run(args...);
}

template <template <typename> class Launch, typename... Args>
void dispatch_any(RowDtype dtype, Args&&... args) {
  if (dtype == RowDtype::f32)
    Launch<float>::run(args...);
  else
    dispatch16<Launch>(dtype, args...);
}

template <typename T>
struct PackQkv {
  static void run(const SlidingMaskParams& p, const void* qkv, const bool* mask, void* wide, cudaStream_t s) {
    const int64_t items = p.batch * p.n * 3 * p.heads * (p.d / 8 + 1);
    if (items < (int64_t(1) << 31))  // 32-bit index arithmetic
      pack_qkv_kernel<T, uint32_t>
          <<<grid_for(items), kThreads, 0, s>>>(p, static_cast<const T*>(qkv), mask, static_cast<T*>(wide));
    else
      pack_qkv_kernel<T, int64_t>
          <<<grid_for(items), kThreads, 0, s>>>(p, static_cast<const T*>(qkv), mask, static_cast<T*>(wide));
  }
};

template <typename T>
struct WindowSums {
  static void run(const SlidingMaskParams& p, const void* src, int64_t row_stride, const bool* seen, float* sums,
                  cudaStream_t s) {
    const int64_t blocks = p.batch * ceil_div(p.n, p.ws), width = p.heads * p.d;
    const int threads = width >= 512 ? 512 : static_cast<int>((width + 31) / 32 * 32);
    window_sums_kernel<T>
        <<<static_cast<unsigned>(blocks), threads, 0, s>>>(p, static_cast<const T*>(src), row_stride, seen, sums);
  }
};

template <typename T>
struct UnpackOut {
  static void run(const SlidingMaskParams& p, const void* out8, const bool* seen, const float* sums, void* y,
                  cudaStream_t s) {
    const int64_t items = p.batch * p.n * p.heads * (p.d / 8);
    unpack_out_kernel<T>
        <<<grid_for(items), kThreads, 0, s>>>(p, static_cast<const T*>(out8), seen, sums, static_cast<T*>(y));
  }
};

template <typename T>
struct PackGrad {
  static void run(const SlidingMaskParams& p, const void* gy, const bool* seen, void* g8, cudaStream_t s) {
    const int64_t items = p.batch * p.n * p.heads * (p.d / 8 + 1);
    pack_grad_kernel<T><<<grid_for(items), kThreads, 0, s>>>(p, static_cast<const T*>(gy), seen, static_cast<T*>(g8));
  }
};

template <typename T>
struct UnpackGrads {
  static void run(const SlidingMaskParams& p, const void* dq8, const void* dk8, const void* dv8,
                  const float* blind_sums, void* dqkv, cudaStream_t s) {
    const int64_t items = p.batch * p.n * 3 * p.heads * (p.d / 8);
    const T *q = static_cast<const T*>(dq8), *k = static_cast<const T*>(dk8), *v = static_cast<const T*>(dv8);
    if (items < (int64_t(1) << 31))  // 32-bit index arithmetic
      unpack_grads_kernel<T, uint32_t>
          <<<grid_for(items), kThreads, 0, s>>>(p, q, k, v, blind_sums, static_cast<T*>(dqkv));
    else
      unpack_grads_kernel<T, int64_t>
          <<<grid_for(items), kThreads, 0, s>>>(p, q, k, v, blind_sums, static_cast<T*>(dqkv));
  }
};

template <typename T>
struct WindowsMerge {
  static void run(const SlidingMaskParams& p, const void* oa, const void* ob, const float* lse_a, const float* lse_b_in,
                  void* y, float* lse, float* lse_b, cudaStream_t s) {
    const int64_t items = p.batch * p.n * p.heads * (p.d / 8);
    windows_merge_kernel<T><<<grid_for(items), kThreads, 0, s>>>(
        p, static_cast<const T*>(oa), static_cast<const T*>(ob), lse_a, lse_b_in, static_cast<T*>(y), lse, lse_b);
  }
};

template <typename T>
struct WindowsGrads {
  static void run(const SlidingMaskParams& p, const void* dqa, const void* dka, const void* dva, const void* dqb,
                  const void* dkb, const void* dvb, void* dqkv, cudaStream_t s) {
    const int64_t items = p.batch * p.n * 3 * p.heads * (p.d / 8);
    windows_grads_kernel<T><<<grid_for(items), kThreads, 0, s>>>(
        p, static_cast<const T*>(dqa), static_cast<const T*>(dka), static_cast<const T*>(dva),
        static_cast<const T*>(dqb), static_cast<const T*>(dkb), static_cast<const T*>(dvb), static_cast<T*>(dqkv));
  }
};

}  // namespace

bool causal_windows_supports(int64_t d, RowDtype dtype) {
  return (dtype == RowDtype::bf16 || dtype == RowDtype::f16) && d > 0 && d % 8 == 0 && d <= 256;
}

void causal_windows_merge_cuda(const SlidingMaskParams& p, const void* oa, const void* ob, const float* lse_a,
                               const float* lse_b_in, void* y, float* lse, float* lse_b, void* stream) {
  if (p.batch * p.n == 0) return;
  dispatch16<WindowsMerge>(p.dtype, p, oa, ob, lse_a, lse_b_in, y, lse, lse_b, static_cast<cudaStream_t>(stream));
}

void causal_windows_grads_cuda(const SlidingMaskParams& p, const void* dqa, const void* dka, const void* dva,
                               const void* dqb, const void* dkb, const void* dvb, void* dqkv, void* stream) {
  if (p.batch * p.n == 0) return;
  dispatch16<WindowsGrads>(p.dtype, p, dqa, dka, dva, dqb, dkb, dvb, dqkv, static_cast<cudaStream_t>(stream));
}

bool sliding_mask_supports(int64_t d, RowDtype dtype) {
  return (dtype == RowDtype::bf16 || dtype == RowDtype::f16) && d > 0 && d % 8 == 0 && d + 8 <= 256;
}

void sliding_seen_cuda(const SlidingMaskParams& p, const bool* mask, bool* seen, void* stream) {
  if (p.batch * p.n == 0) return;
  seen_kernel<<<grid_for(p.batch * p.n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p, mask, seen);
}

void sliding_pack_qkv_cuda(const SlidingMaskParams& p, const void* qkv, const bool* mask, void* wide, void* stream) {
  if (p.batch * p.n == 0) return;
  dispatch16<PackQkv>(p.dtype, p, qkv, mask, wide, static_cast<cudaStream_t>(stream));
}

void sliding_window_sums_cuda(const SlidingMaskParams& p, const void* src, int64_t row_stride, const bool* seen,
                              float* sums, void* stream) {
  if (p.batch * p.n == 0) return;
  dispatch_any<WindowSums>(p.dtype, p, src, row_stride, seen, sums, static_cast<cudaStream_t>(stream));
}

void sliding_unpack_out_cuda(const SlidingMaskParams& p, const void* out8, const bool* seen, const float* sums, void* y,
                             void* stream) {
  if (p.batch * p.n == 0) return;
  dispatch16<UnpackOut>(p.dtype, p, out8, seen, sums, y, static_cast<cudaStream_t>(stream));
}

void sliding_pack_grad_cuda(const SlidingMaskParams& p, const void* gy, const bool* seen, void* g8, void* stream) {
  if (p.batch * p.n == 0) return;
  dispatch16<PackGrad>(p.dtype, p, gy, seen, g8, static_cast<cudaStream_t>(stream));
}

void sliding_unpack_grads_cuda(const SlidingMaskParams& p, const void* dq8, const void* dk8, const void* dv8,
                               const float* blind_sums, void* dqkv, void* stream) {
  if (p.batch * p.n == 0) return;
  dispatch16<UnpackGrads>(p.dtype, p, dq8, dk8, dv8, blind_sums, dqkv, static_cast<cudaStream_t>(stream));
}

}  // namespace kernels
}  // namespace colt5
