// CUDA coordinate descent (soft top-k), forward and backward, and the hard
// top-k with the deterministic tie-break.
//
// A row is handled by a "row group" of threads that caches its scores in
// registers across all iterations; every iteration is one sum reduction over
// the group (the shift `top` is known before the pass, so there is no max
// pass). Three shapes of group, chosen by the row length:
//   - a warp per row (short rows), several rows per block;
//   - one block per row, or a thread-block cluster of up to 16 blocks per row
//     whose block sums meet through distributed shared memory (medium and
//     long rows);
//   - several blocks per row with a grid-wide reduction through global memory
//     and an atomic-counter barrier, in a cooperative launch (rows too long
//     for a cluster, e.g. 2^20 entries).
// Every thread of a row group ends each reduction with the bit-identical sum
// (fixed-order partial sums, then a butterfly whose steps are commutative),
// so all blocks of a row follow the same iterates. Masked entries are cached
// as -inf: min(-inf, cap) stays -inf and its exponential is exactly 0.
// Entries beyond the register cache (rows longer than the group's capacity)
// are streamed from global memory on each pass.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cub/block/block_scan.cuh>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_segmented_sort.cuh>

#include <algorithm>
#include <type_traits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <vector>
#include <stdexcept>
#include <string>

#include "kernels/coor_descent.h"
#include "kernels/coor_descent_cuda_common.cuh"

namespace colt5 {
namespace kernels {
namespace cd_cuda {

namespace cg = cooperative_groups;

// ---------------------------------------------------------------- groups

// The reduction of a row group: returns the group-wide value in every thread.
struct WarpGroup {
  int lane;
  template <class Op, typename T>
  __device__ __forceinline__ T reduce(T x) {
    return warp_reduce<Op>(x);
  }
  __device__ __forceinline__ void sync() { __syncwarp(); }
};

enum Mode { kBlock = 0, kCluster = 1, kGrid = 2 };

template <int MODE>
struct BlockGroup {
  using T = double;
  T* red;  // shared [2][32]: per-warp partials, double-buffered
  T* cl;   // shared [2]: this block's sum, read by the cluster
  int par = 0, cpar = 0;
  int lane, warp, nwarps;
  int nblk, rank;               // blocks per row and this block's rank among them
  T* partials = nullptr;        // grid: [2][nblk] of this row
  unsigned* counter = nullptr;  // grid: arrivals of this row
  unsigned target = 0;

  template <class Op>
  __device__ __forceinline__ T reduce(T x) {
    x = warp_reduce<Op>(x);
    if (lane == 0) red[par * 32 + warp] = x;
    __syncthreads();
    T b = lane < nwarps ? red[par * 32 + lane] : Op::template id<T>();
    par ^= 1;
    b = warp_reduce<Op>(b);
    if (MODE == kBlock) return b;
    if (MODE == kCluster) {
      cg::cluster_group cluster = cg::this_cluster();
      if (threadIdx.x == 0) cl[cpar] = b;
      cluster.sync();
      T y = Op::template id<T>();
      if (lane < nblk) y = *cluster.map_shared_rank(&cl[cpar], lane);
      cpar ^= 1;
      return warp_reduce<Op>(y);
    }
    // Grid: publish the block sum, arrive, wait for the row's other blocks.
    T* slot = partials + cpar * nblk;
    if (threadIdx.x == 0) {
      slot[rank] = b;
      __threadfence();
      atomicAdd(counter, 1u);
      target += static_cast<unsigned>(nblk);
      while (ld_acquire_gpu(counter) < target) {
      }
      __threadfence();
    }
    __syncthreads();
    T y = Op::template id<T>();
    for (int i = lane; i < nblk; i += 32) y = Op::apply(y, __ldcg(slot + i));
    cpar ^= 1;
    return warp_reduce<Op>(y);
  }
  __device__ __forceinline__ void sync() { __syncthreads(); }
};

// The part of a row one thread owns: indices beg + j*stride + lane < end.
struct Seg {
  int64_t beg, end;
  int stride, lane;
  __device__ __forceinline__ int64_t at(int j) const { return beg + static_cast<int64_t>(j) * stride + lane; }
};

// eps_t for t = 1..n+1 into eps[1..n+1], the same double arithmetic as eps_at.
__device__ __forceinline__ void fill_eps(double* eps, int64_t n_iters, double eps_init, double e_min, double decay,
                                         int tid, int nthreads) {
  if (tid == 0) {
    double e = fmax(eps_init, e_min);
    eps[0] = e;
    for (int64_t t = 1; t <= n_iters + 1; ++t) {
      eps[t] = e;
      e = fmax(e * decay, e_min);
    }
  }
}

__host__ __device__ __forceinline__ int64_t segment_start(int64_t n_iters, int64_t c, int64_t j) {
  const int64_t base = n_iters / c, extra = n_iters % c;
  return 1 + j * base + (j < extra ? j : extra);
}

// Loads the thread's cached scores (masked and out-of-range: -inf); returns
// the local max and unmasked count.
// 1 for a finite score, NaN for NaN or ±inf: the row's unmasked count becomes
// NaN when it holds a non-finite score, and the row's output is NaN (the
// documented propagation on CUDA, where checking would cost a host sync).
template <typename T>
__device__ __forceinline__ T finite_or_nan(T x) {
  return isfinite(x) ? T(1) : T(NAN);
}

template <typename T, int VPT>
__device__ __forceinline__ void load_row(const T* s, const uint8_t* m, const Seg& sg, T (&v)[VPT], T& mx, T& cnt) {
  mx = neg_inf<T>();
  cnt = T(0);
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int64_t i = sg.at(j);
    T x = neg_inf<T>();
    if (i < sg.end && (m == nullptr || m[i])) {
      x = s[i];
      cnt += finite_or_nan(x);
    }
    v[j] = x;
    mx = x > mx ? x : mx;
  }
  for (int64_t i = sg.at(VPT); i < sg.end; i += sg.stride) {
    if (m == nullptr || m[i]) {
      const T x = s[i];
      cnt += finite_or_nan(x);
      mx = x > mx ? x : mx;
    }
  }
}

template <typename T>
__device__ __forceinline__ T load_one(const T* s, const uint8_t* m, int64_t i) {
  return (m == nullptr || m[i]) ? s[i] : neg_inf<T>();
}

// sum over the thread's entries of ex((min(x, cap) - top) * sc).
template <typename T, int VPT>
__device__ __forceinline__ T local_sum_exp(const T (&v)[VPT], const T* s, const uint8_t* m, const Seg& sg, T cap, T top,
                                           T sc) {
  T acc0 = T(0), acc1 = T(0);
#pragma unroll
  for (int j = 0; j < VPT; j += 2) {
    acc0 += Fm<T>::ex((fmin_(v[j], cap) - top) * sc);
    if (j + 1 < VPT) acc1 += Fm<T>::ex((fmin_(v[j + 1], cap) - top) * sc);
  }
  for (int64_t i = sg.at(VPT); i < sg.end; i += sg.stride)
    acc0 += Fm<T>::ex((fmin_(load_one(s, m, i), cap) - top) * sc);
  return acc0 + acc1;
}

// One iteration t >= 2 from a_{t-1}: returns a_t (identical in every thread).
template <typename T, int VPT, class G>
__device__ __forceinline__ double iterate(G& g, const T (&v)[VPT], const T* s, const uint8_t* m, const Seg& sg, T smax,
                                          double logk, double a_prev, double eps_t) {
  const T cap = static_cast<T>(-a_prev);
  const T top = fmin_(smax, cap);
  const double inv = 1.0 / eps_t;
  const T sc = static_cast<T>(inv * Fm<T>::kScale);
  const T local = local_sum_exp<T, VPT>(v, s, m, sg, cap, top, sc);
  const double sum = g.template reduce<SumOp>(static_cast<double>(local));
  const double lse = static_cast<double>(top) / eps_t + log(sum);
  return eps_t * (logk - lse);
}

__device__ __forceinline__ double first_iterate(double logk, double count, double eps_1) {
  return eps_1 * (logk - log(count));
}

// The output exponent: min(s + a, 0) / eps in double, then in T (as the CPU).
template <typename T>
__device__ __forceinline__ T out_exp(T x, double a, double sc_f) {
  return Fm<T>::ex(static_cast<T>(fmin(static_cast<double>(x) + a, 0.0) * sc_f));
}

// ---------------------------------------------------------------- forward

template <typename T, int VPT, class G>
__device__ void forward_row(const CoorDescentParams<T>& p, int64_t row, const Seg& sg, G& g, bool leader,
                            const double* eps) {
  const int64_t cols = p.cols;
  const T* s = p.s + row * cols;
  const uint8_t* m = p.mask ? p.mask + row * cols : nullptr;
  T* y = p.y + row * cols;
  const int64_t per_row = p.checkpoint_segments == 0 ? p.n_iters : p.checkpoint_segments;
  double* saved = p.saved ? p.saved + row * per_row : nullptr;

  T v[VPT];
  T mx, cnt;
  load_row<T, VPT>(s, m, sg, v, mx, cnt);
  const T smax = static_cast<T>(g.template reduce<MaxOp>(static_cast<double>(mx)));
  const double count = g.template reduce<SumOp>(static_cast<double>(cnt));
  if (leader && p.row_stats) {
    p.row_stats[2 * row] = count == count ? static_cast<double>(smax) : static_cast<double>(NAN);
    p.row_stats[2 * row + 1] = count;
  }
  if (count != count) {  // a non-finite unmasked score: NaN throughout the row
    for (int64_t i = sg.at(0); i < sg.end; i += sg.stride) y[i] = T(NAN);
    if (leader && saved)
      for (int64_t j = 0; j < per_row; ++j) saved[j] = NAN;
    return;
  }
  if (count == 0.0) {
    for (int64_t i = sg.at(0); i < sg.end; i += sg.stride) y[i] = T(0);
    if (leader && saved)
      for (int64_t j = 0; j < per_row; ++j) saved[j] = 0.0;
    return;
  }
  const double logk = log(static_cast<double>(p.k[row]));
  const int64_t T_ = p.n_iters, C = p.checkpoint_segments;
  int64_t next_j = 0;
  int64_t next_start = C > 0 ? segment_start(T_, C, 0) : -1;
  double a = 0.0;
  for (int64_t t = 1; t <= T_; ++t) {
    if (t == next_start) {
      if (leader && saved) saved[next_j] = a;
      ++next_j;
      next_start = next_j < C ? segment_start(T_, C, next_j) : -1;
    }
    a = t == 1 ? first_iterate(logk, count, eps[1]) : iterate<T, VPT>(g, v, s, m, sg, smax, logk, a, eps[t]);
    if (C == 0 && leader && saved) saved[t - 1] = a;
  }
  const double sc = Fm<T>::kScale / eps[T_ + 1];
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int64_t i = sg.at(j);
    if (i < sg.end) y[i] = out_exp(v[j], a, sc);
  }
  for (int64_t i = sg.at(VPT); i < sg.end; i += sg.stride) y[i] = out_exp(load_one(s, m, i), a, sc);
}

// ---------------------------------------------------------------- backward

template <typename T, int VPT, class G>
__device__ void backward_row(const CoorDescentBackwardParams<T>& bp, int64_t row, const Seg& sg, G& g,
                             bool block_leader, bool row_leader, const double* eps, double* its) {
  const CoorDescentParams<T>& p = bp.fwd;
  const int64_t cols = p.cols;
  const T* s = p.s + row * cols;
  const uint8_t* m = p.mask ? p.mask + row * cols : nullptr;
  const T* gy = bp.grad_y + row * cols;
  T* ds_out = bp.grad_s + row * cols;
  const int64_t T_ = p.n_iters, C = p.checkpoint_segments;
  const int64_t per_row = C == 0 ? T_ : C;
  const double* saved = p.saved + row * per_row;
  const T smax = static_cast<T>(p.row_stats[2 * row]);
  const double count = p.row_stats[2 * row + 1];

  if (count == 0.0 || count != count) {  // fully masked: zeros; non-finite scores: NaN
    const T fill = count == 0.0 ? T(0) : T(NAN);
    for (int64_t i = sg.at(0); i < sg.end; i += sg.stride) ds_out[i] = fill;
    if (row_leader && bp.grad_k) bp.grad_k[row] = fill;
    return;
  }
  T v[VPT];
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int64_t i = sg.at(j);
    v[j] = i < sg.end ? load_one(s, m, i) : neg_inf<T>();
  }
  const double logk = log(static_cast<double>(p.k[row]));
  // Every iterate a_0..a_T into its[] (the group's shared copy).
  if (C == 0) {
    if (block_leader) {
      its[0] = 0.0;
      for (int64_t t = 1; t <= T_; ++t) its[t] = saved[t - 1];
    }
  } else {
    if (block_leader) its[0] = 0.0;
    for (int64_t j = 0; j < C; ++j) {
      const int64_t t0 = segment_start(T_, C, j), t1 = segment_start(T_, C, j + 1) - 1;
      double a = saved[j];
      for (int64_t t = t0; t <= t1; ++t) {
        a = t == 1 ? first_iterate(logk, count, eps[1]) : iterate<T, VPT>(g, v, s, m, sg, smax, logk, a, eps[t]);
        if (block_leader) its[t] = a;
      }
    }
  }
  g.sync();

  // Output and the last iteration's relu.
  T ds[VPT];
  const double aT = its[T_];
  const T aTt = static_cast<T>(aT);
  const double inv_f = 1.0 / eps[T_ + 1];
  const double sc_f = inv_f * Fm<T>::kScale;
  const T invf = static_cast<T>(inv_f);
  T acc = T(0);
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int64_t i = sg.at(j);
    T d = T(0);
    if (i < sg.end && v[j] > neg_inf<T>()) {
      const T yv = out_exp(v[j], aT, sc_f);
      const T du = gy[i] * yv * invf;
      d = (v[j] + aTt > T(0)) ? T(0) : du;
    }
    ds[j] = d;
    acc += d;
  }
  for (int64_t i = sg.at(VPT); i < sg.end; i += sg.stride) {
    const T x = load_one(s, m, i);
    T d = T(0);
    if (x > neg_inf<T>()) {
      const T yv = out_exp(x, aT, sc_f);
      d = (x + aTt > T(0)) ? T(0) : gy[i] * yv * invf;
    }
    ds_out[i] = d;
    acc += d;
  }
  double da = g.template reduce<SumOp>(static_cast<double>(acc));
  double dlogk = da * eps[T_];
  double c = da;
  for (int64_t t = T_ - 1; t >= 1; --t) {
    const T a_t = static_cast<T>(its[t]);
    const double inv_n = 1.0 / eps[t + 1];
    const double lse_n = logk - its[t + 1] / eps[t + 1];
    const T cap = -a_t;
    const T top = fmin_(smax, cap);
    // p_i = exp(min(s_i, cap)/eps - lse) = ex((min(s_i, cap) - top) * sc) * w
    const double w = exp(static_cast<double>(top) / eps[t + 1] - lse_n);
    const T sc = static_cast<T>(inv_n * Fm<T>::kScale);
    const T cw = static_cast<T>(-c * w);
    T acc0 = T(0), acc1 = T(0);
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const T gv = cw * Fm<T>::ex((fmin_(v[j], cap) - top) * sc);
      const bool active = v[j] + a_t > T(0);
      ds[j] += active ? T(0) : gv;
      if (j & 1)
        acc1 += active ? -gv : T(0);
      else
        acc0 += active ? -gv : T(0);
    }
    for (int64_t i = sg.at(VPT); i < sg.end; i += sg.stride) {
      const T x = load_one(s, m, i);
      const T gv = cw * Fm<T>::ex((fmin_(x, cap) - top) * sc);
      const bool active = x + a_t > T(0);
      ds_out[i] += active ? T(0) : gv;
      acc0 += active ? -gv : T(0);
    }
    da = g.template reduce<SumOp>(static_cast<double>(acc0 + acc1));
    dlogk += da * eps[t];
    c = da;
  }
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int64_t i = sg.at(j);
    if (i < sg.end) ds_out[i] = ds[j];
  }
  if (row_leader && bp.grad_k) bp.grad_k[row] = static_cast<T>(dlogk / static_cast<double>(p.k[row]));
}

// ---------------------------------------------------------------- kernels

struct GridWork {
  int nblk;         // blocks per row
  int64_t ngroups;  // row groups in the grid (grid mode: rows are strided)
  void* partials;   // grid mode: rows x 2 x nblk doubles
  unsigned* counters;
};

constexpr int kWarpBlock = 256;  // threads of a warp-per-row block

// Dynamic shared memory: eps[n_iters + 2] doubles, then its[] per group.
__host__ __device__ inline size_t its_offset(int64_t n_iters) {
  return static_cast<size_t>(n_iters + 2) * sizeof(double);
}

template <typename T, int VPT>
__global__ void __launch_bounds__(kWarpBlock) forward_warp_kernel(CoorDescentParams<T> p, GridWork) {
  extern __shared__ double dyn[];
  double* eps = dyn;
  fill_eps(eps, p.n_iters, p.eps_init, p.eps, p.eps_decay, threadIdx.x, blockDim.x);
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kWarpBlock / 32) + (threadIdx.x >> 5);
  if (row >= p.rows) return;
  WarpGroup g{lane};
  const Seg sg{0, p.cols, 32, lane};
  forward_row<T, VPT>(p, row, sg, g, lane == 0, eps);
}

template <typename T, int VPT>
__global__ void __launch_bounds__(kWarpBlock) backward_warp_kernel(CoorDescentBackwardParams<T> bp, GridWork) {
  extern __shared__ double dyn[];
  double* eps = dyn;
  const int64_t T_ = bp.fwd.n_iters;
  fill_eps(eps, T_, bp.fwd.eps_init, bp.fwd.eps, bp.fwd.eps_decay, threadIdx.x, blockDim.x);
  __syncthreads();
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  double* its = dyn + (T_ + 2) + w * (T_ + 1);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kWarpBlock / 32) + w;
  if (row >= bp.fwd.rows) return;
  WarpGroup g{lane};
  const Seg sg{0, bp.fwd.cols, 32, lane};
  backward_row<T, VPT>(bp, row, sg, g, lane == 0, lane == 0, eps, its);
}

template <int MODE>
__device__ __forceinline__ BlockGroup<MODE> make_group(double* red, double* cl, int nblk, int rank) {
  BlockGroup<MODE> g;
  g.red = red;
  g.cl = cl;
  g.lane = threadIdx.x & 31;
  g.warp = threadIdx.x >> 5;
  g.nwarps = (blockDim.x + 31) >> 5;
  g.nblk = nblk;
  g.rank = rank;
  return g;
}

template <typename T>
__device__ __forceinline__ Seg block_seg(int64_t cols, int nblk, int rank) {
  int64_t seg = (cols + nblk - 1) / nblk;
  seg = (seg + 31) / 32 * 32;
  const int64_t beg = std::min<int64_t>(cols, seg * rank);
  const int64_t end = std::min<int64_t>(cols, beg + seg);
  return Seg{beg, end, static_cast<int>(blockDim.x), static_cast<int>(threadIdx.x)};
}

template <typename T, int NT, int VPT, int MODE>
__global__ void __launch_bounds__(NT) forward_block_kernel(CoorDescentParams<T> p, GridWork gw) {
  extern __shared__ double dyn[];
  __shared__ double red[64];
  __shared__ double cl[2];
  double* eps = dyn;
  fill_eps(eps, p.n_iters, p.eps_init, p.eps, p.eps_decay, threadIdx.x, blockDim.x);
  __syncthreads();
  const int nblk = gw.nblk;
  const int rank = MODE == kBlock ? 0 : static_cast<int>(blockIdx.x % nblk);
  const int64_t group = MODE == kBlock ? blockIdx.x : blockIdx.x / nblk;
  auto g = make_group<MODE>(red, cl, nblk, rank);
  const Seg sg = block_seg<T>(p.cols, nblk, rank);
  const bool leader = rank == 0 && threadIdx.x == 0;
  if (MODE == kGrid) {
    for (int64_t row = group; row < p.rows; row += gw.ngroups) {
      g.partials = static_cast<double*>(gw.partials) + row * 2 * nblk;
      g.counter = gw.counters + row;
      g.target = 0;
      forward_row<T, VPT>(p, row, sg, g, leader, eps);
    }
  } else {
    forward_row<T, VPT>(p, group, sg, g, leader, eps);
    // Peers may still read this block's shared memory.
    if (MODE == kCluster) cg::this_cluster().sync();
  }
}

template <typename T, int NT, int VPT, int MODE>
__global__ void __launch_bounds__(NT) backward_block_kernel(CoorDescentBackwardParams<T> bp, GridWork gw) {
  extern __shared__ double dyn[];
  __shared__ double red[64];
  __shared__ double cl[2];
  double* eps = dyn;
  const int64_t T_ = bp.fwd.n_iters;
  fill_eps(eps, T_, bp.fwd.eps_init, bp.fwd.eps, bp.fwd.eps_decay, threadIdx.x, blockDim.x);
  __syncthreads();
  double* its = dyn + (T_ + 2);
  const int nblk = gw.nblk;
  const int rank = MODE == kBlock ? 0 : static_cast<int>(blockIdx.x % nblk);
  const int64_t group = MODE == kBlock ? blockIdx.x : blockIdx.x / nblk;
  auto g = make_group<MODE>(red, cl, nblk, rank);
  const Seg sg = block_seg<T>(bp.fwd.cols, nblk, rank);
  // Each block keeps its own copy of the iterates (identical in all blocks).
  const bool block_leader = threadIdx.x == 0;
  if (MODE == kGrid) {
    for (int64_t row = group; row < bp.fwd.rows; row += gw.ngroups) {
      g.partials = static_cast<double*>(gw.partials) + row * 2 * nblk;
      g.counter = gw.counters + row;
      g.target = 0;
      backward_row<T, VPT>(bp, row, sg, g, block_leader, block_leader && rank == 0, eps, its);
      __syncthreads();  // its[] is rewritten by the next row
    }
  } else {
    backward_row<T, VPT>(bp, group, sg, g, block_leader, block_leader && rank == 0, eps, its);
    if (MODE == kCluster) cg::this_cluster().sync();
  }
}

}  // namespace cd_cuda
}  // namespace kernels
}  // namespace colt5

// ================================================================ host side

namespace colt5 {
namespace kernels {
namespace cd_cuda {
namespace {

void check(cudaError_t e, const char* what, int line) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("colt5 CUDA coor_descent: ") + what + " (line " + std::to_string(line) +
                             "): " + cudaGetErrorString(e));
}
#define CD_CHECK(x) check((x), #x, __LINE__)

int num_sms() {
  int dev = 0;
  CD_CHECK(cudaGetDevice(&dev));
  int v = 0;
  CD_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev));
  return v;
}

template <typename T>
struct Cfg {
  static constexpr int kNT = 512;                        // threads of a block-per-row block
  static constexpr int kVPT = sizeof(T) == 4 ? 16 : 8;   // cached entries per thread
  static constexpr int kWVPT = sizeof(T) == 4 ? 16 : 8;  // cached entries per lane (warp per row)
};

// The largest thread-block cluster (16 needs the non-portable size attribute
// beyond the portable 8).
constexpr int64_t kMaxCluster = 16;
constexpr int64_t kMaxPortableCluster = 8;
// auto: a cluster grows only while each of its blocks keeps at least this many
// entries of the row (below that, the cluster barrier costs more than the
// shorter pass saves).
constexpr int64_t kMinColsPerClusterBlock = 2048;

template <typename Arg>
struct KernelSet {
  void (*warp)(Arg, GridWork);
  void (*block)(Arg, GridWork);
  void (*cluster)(Arg, GridWork);
  void (*grid)(Arg, GridWork);
};

// Dynamic shared memory a kernel gets without raising its limit.
constexpr size_t kDefaultSmemLimit = 48 * 1024;

template <typename... Args>
void allow_smem(void (*fn)(Args...), size_t smem) {
  if (smem > kDefaultSmemLimit)
    CD_CHECK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
}

// How many clusters of C blocks of the kernel fit on the device at once
// (0: none), cached per kernel, size and shared memory.
template <typename Arg>
int active_clusters(void (*fn)(Arg, GridWork), int C, int nt, size_t smem) {
  struct Entry {
    const void* fn;
    int dev, C;
    size_t smem;
    int n;
  };
  static std::mutex mu;
  static std::vector<Entry> cache;
  int dev = 0;
  CD_CHECK(cudaGetDevice(&dev));
  {
    std::lock_guard<std::mutex> lock(mu);
    for (const Entry& e : cache)
      if (e.fn == reinterpret_cast<const void*>(fn) && e.dev == dev && e.C == C && e.smem == smem) return e.n;
  }
  allow_smem(fn, smem);
  if (C > kMaxPortableCluster) CD_CHECK(cudaFuncSetAttribute(fn, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(C));
  cfg.blockDim = dim3(nt);
  cfg.dynamicSmemBytes = smem;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(C);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  int n = 0;
  if (cudaOccupancyMaxActiveClusters(&n, fn, &cfg) != cudaSuccess) {
    (void)cudaGetLastError();
    n = 0;
  }
  std::lock_guard<std::mutex> lock(mu);
  cache.push_back({reinterpret_cast<const void*>(fn), dev, C, smem, n});
  return n;
}

// Launches one of the kernels: the one named by `launch`, or for kAuto the
// cheapest for the row length.
template <typename T, typename Arg>
void launch_rows(const KernelSet<Arg>& ks, const Arg& arg, const RowLaunch& launch, int64_t rows, int64_t cols,
                 int64_t n_iters, bool with_its, cudaStream_t st) {
  if (rows == 0) return;
  constexpr int NT = Cfg<T>::kNT, VPT = Cfg<T>::kVPT, WVPT = Cfg<T>::kWVPT;
  const int sms = num_sms();
  const size_t eps_bytes = its_offset(n_iters);
  const size_t its_bytes = with_its ? static_cast<size_t>(n_iters + 1) * sizeof(double) : 0;
  const RowKernel kind = launch.kernel;
  GridWork gw{1, 1, nullptr, nullptr};
  if (kind == RowKernel::kWarp || (kind == RowKernel::kAuto && cols <= 32 * WVPT)) {
    const size_t smem = eps_bytes + its_bytes * (kWarpBlock / 32);
    allow_smem(ks.warp, smem);
    const int64_t blocks = (rows + kWarpBlock / 32 - 1) / (kWarpBlock / 32);
    ks.warp<<<static_cast<unsigned>(blocks), kWarpBlock, smem, st>>>(arg, gw);
    CD_CHECK(cudaGetLastError());
    return;
  }
  const size_t smem = eps_bytes + its_bytes;
  const int64_t cap = static_cast<int64_t>(NT) * VPT;  // entries a block caches in registers
  const int64_t cmin = (cols + cap - 1) / cap;         // the fewest blocks that cache the row
  const int64_t forced_blocks = launch.blocks_per_row > 0 ? launch.blocks_per_row : std::max<int64_t>(2, cmin);

  auto run_block = [&] {
    allow_smem(ks.block, smem);
    ks.block<<<static_cast<unsigned>(rows), NT, smem, st>>>(arg, gw);
    CD_CHECK(cudaGetLastError());
  };
  auto run_cluster = [&](int64_t C) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(static_cast<unsigned>(rows * C));
    cfg.blockDim = dim3(NT);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = st;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = static_cast<unsigned>(C);
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    gw.nblk = static_cast<int>(C);
    CD_CHECK(cudaLaunchKernelEx(&cfg, ks.cluster, arg, gw));
  };
  // Several blocks per row, all resident (cooperative launch), rows strided.
  auto run_grid = [&](int64_t nblk) {
    allow_smem(ks.grid, smem);
    int per_sm = 0;
    CD_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, ks.grid, NT, smem));
    const int64_t capacity = static_cast<int64_t>(std::max(per_sm, 1)) * sms;
    if (kind == RowKernel::kGrid && nblk > capacity)
      throw std::invalid_argument("colt5 CUDA coor_descent: the grid kernel cannot hold " + std::to_string(nblk) +
                                  " resident blocks per row (capacity " + std::to_string(capacity) + ")");
    gw.nblk = static_cast<int>(std::min<int64_t>(nblk, capacity));
    gw.ngroups = std::max<int64_t>(1, std::min<int64_t>(rows, capacity / gw.nblk));
    const size_t part_bytes = static_cast<size_t>(rows) * 2 * gw.nblk * sizeof(double);
    const size_t cnt_bytes = static_cast<size_t>(rows) * sizeof(unsigned);
    char* ws = nullptr;
    CD_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&ws), part_bytes + cnt_bytes + 16, st));
    gw.partials = ws;
    gw.counters = reinterpret_cast<unsigned*>(ws + (part_bytes + 15) / 16 * 16);
    CD_CHECK(cudaMemsetAsync(gw.counters, 0, cnt_bytes, st));
    Arg a = arg;
    void* args[] = {&a, &gw};
    const cudaError_t e = cudaLaunchCooperativeKernel(
        reinterpret_cast<void*>(ks.grid), dim3(static_cast<unsigned>(gw.ngroups * gw.nblk)), dim3(NT), args, smem, st);
    (void)cudaFreeAsync(ws, st);
    CD_CHECK(e);
  };

  switch (kind) {
    case RowKernel::kBlock:
      run_block();
      return;
    case RowKernel::kCluster:
      if (forced_blocks > kMaxCluster)
        throw std::invalid_argument("colt5 CUDA coor_descent: a cluster holds at most " + std::to_string(kMaxCluster) +
                                    " blocks, asked for " + std::to_string(forced_blocks));
      if (active_clusters(ks.cluster, static_cast<int>(forced_blocks), NT, smem) < 1)
        throw std::invalid_argument("colt5 CUDA coor_descent: no cluster of " + std::to_string(forced_blocks) +
                                    " blocks fits on this device");
      run_cluster(forced_blocks);
      return;
    case RowKernel::kGrid:
      run_grid(forced_blocks);
      return;
    default:
      break;
  }
  if (cmin <= kMaxCluster) {
    // The fewest blocks that cache the row: a cluster barrier costs more than
    // the shorter pass saves (64 x 4096 on an H200: 24 us one block per row,
    // 37 us with clusters of 2). launch.max_cluster > 1 lets clusters grow
    // while all rows still run in one wave.
    const int64_t cap_c = std::max<int64_t>(1, std::min<int64_t>(kMaxCluster, launch.max_cluster));
    int64_t C = cmin;
    for (int64_t c2 = cmin * 2; c2 <= cap_c && cols / c2 >= kMinColsPerClusterBlock && rows * c2 <= sms; c2 *= 2)
      if (active_clusters(ks.cluster, static_cast<int>(c2), NT, smem) >= rows) C = c2;
    if (C == 1) {
      run_block();
      return;
    }
    if (active_clusters(ks.cluster, static_cast<int>(C), NT, smem) >= 1) {
      run_cluster(C);
      return;
    }
    (void)cudaGetLastError();  // no cluster of this size fits: use the grid kernel
  }
  run_grid(cmin);
}

template <typename T>
KernelSet<CoorDescentParams<T>> forward_kernels() {
  constexpr int NT = Cfg<T>::kNT, VPT = Cfg<T>::kVPT, WVPT = Cfg<T>::kWVPT;
  return {forward_warp_kernel<T, WVPT>, forward_block_kernel<T, NT, VPT, kBlock>,
          forward_block_kernel<T, NT, VPT, kCluster>, forward_block_kernel<T, NT, VPT, kGrid>};
}

template <typename T>
KernelSet<CoorDescentBackwardParams<T>> backward_kernels() {
  constexpr int NT = Cfg<T>::kNT, VPT = Cfg<T>::kVPT, WVPT = Cfg<T>::kWVPT;
  return {backward_warp_kernel<T, WVPT>, backward_block_kernel<T, NT, VPT, kBlock>,
          backward_block_kernel<T, NT, VPT, kCluster>, backward_block_kernel<T, NT, VPT, kGrid>};
}

// ---------------------------------------------------------------- top-k

// Keys whose ascending order is the descending order of x (+0 and -0 equal).
template <typename T>
struct KeyOf;
template <>
struct KeyOf<float> {
  using U = uint32_t;
  static __device__ __forceinline__ U desc(float x) {
    if (x == 0.0f) x = 0.0f;
    const U b = __float_as_uint(x);
    const U ord = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
    return ~ord;
  }
};
template <>
struct KeyOf<double> {
  using U = unsigned long long;
  static __device__ __forceinline__ U desc(double x) {
    if (x == 0.0) x = 0.0;
    const U b = static_cast<U>(__double_as_longlong(x));
    const U sign = 0x8000000000000000ull;
    const U ord = (b & sign) ? ~b : (b | sign);
    return ~ord;
  }
};

__global__ void topk_init(int32_t* vals, int64_t* offs, int64_t n, int64_t rows, int64_t cols) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    vals[i] = static_cast<int32_t>(i % cols);
    if (i <= rows) offs[i] = i * cols;
  }
  if (blockIdx.x == 0 && threadIdx.x == 0 && n <= rows) {
    for (int64_t r = n; r <= rows; ++r) offs[r] = r * cols;
  }
}

template <typename T>
__global__ void topk_keys(const T* src, const int32_t* vals, typename KeyOf<T>::U* keys, int64_t n, int64_t cols) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / cols;
    keys[i] = KeyOf<T>::desc(src[row * cols + vals[i]]);
  }
}

__global__ void topk_mask_keys(const uint8_t* mask, const int32_t* vals, uint8_t* keys, int64_t n, int64_t cols) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / cols;
    keys[i] = mask[row * cols + vals[i]] ? uint8_t(0) : uint8_t(1);
  }
}

__global__ void topk_out(const int32_t* vals, int64_t* out, int64_t rows, int64_t cols, int64_t k) {
  const int64_t n = rows * k;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / k, j = i % k;
    out[i] = vals[r * cols + j];
  }
}

// Blocks of 256 threads for a grid-stride loop over n elements, capped (the
// loops stride over the rest).
constexpr int64_t kMaxStrideBlocks = 65535 * 4;
unsigned grid_for(int64_t n) { return static_cast<unsigned>(std::min<int64_t>((n + 255) / 256, kMaxStrideBlocks)); }

// Sorts each row's positions by (mask, score, tiebreak, position) through
// stable segmented sorts on one key at a time, least significant first.
template <typename T>
void topk_chunk(const T* scores, const T* tiebreak, const uint8_t* mask, int64_t rows, int64_t cols, int64_t k,
                int64_t* indices, cudaStream_t st) {
  using U = typename KeyOf<T>::U;
  const int64_t n = rows * cols;
  size_t temp_bytes = 0, b = 0;
  CD_CHECK(cub::DeviceSegmentedSort::StableSortPairs(
      nullptr, b, static_cast<const U*>(nullptr), static_cast<U*>(nullptr), static_cast<const int32_t*>(nullptr),
      static_cast<int32_t*>(nullptr), n, rows, static_cast<const int64_t*>(nullptr),
      static_cast<const int64_t*>(nullptr), st));
  temp_bytes = std::max(temp_bytes, b);
  if (mask) {
    CD_CHECK(cub::DeviceSegmentedSort::StableSortPairs(
        nullptr, b, static_cast<const uint8_t*>(nullptr), static_cast<uint8_t*>(nullptr),
        static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr), n, rows,
        static_cast<const int64_t*>(nullptr), static_cast<const int64_t*>(nullptr), st));
    temp_bytes = std::max(temp_bytes, b);
  }
  auto align = [](size_t x) { return (x + 255) / 256 * 256; };
  const size_t keys_bytes = align(static_cast<size_t>(n) * sizeof(U));
  const size_t vals_bytes = align(static_cast<size_t>(n) * sizeof(int32_t));
  const size_t offs_bytes = align(static_cast<size_t>(rows + 1) * sizeof(int64_t));
  char* ws = nullptr;
  CD_CHECK(
      cudaMallocAsync(reinterpret_cast<void**>(&ws), 2 * keys_bytes + 2 * vals_bytes + offs_bytes + temp_bytes, st));
  U* keys_in = reinterpret_cast<U*>(ws);
  U* keys_out = reinterpret_cast<U*>(ws + keys_bytes);
  int32_t* vals_a = reinterpret_cast<int32_t*>(ws + 2 * keys_bytes);
  int32_t* vals_b = reinterpret_cast<int32_t*>(ws + 2 * keys_bytes + vals_bytes);
  int64_t* offs = reinterpret_cast<int64_t*>(ws + 2 * keys_bytes + 2 * vals_bytes);
  void* temp = ws + 2 * keys_bytes + 2 * vals_bytes + offs_bytes;
  cudaError_t err = cudaSuccess;
  auto step = [&](cudaError_t e) {
    if (err == cudaSuccess) err = e;
  };
  topk_init<<<grid_for(std::max(n, rows + 1)), 256, 0, st>>>(vals_a, offs, n, rows, cols);
  step(cudaGetLastError());
  auto sort_by = [&](const T* src) {
    topk_keys<T><<<grid_for(n), 256, 0, st>>>(src, vals_a, keys_in, n, cols);
    step(cudaGetLastError());
    size_t tb = temp_bytes;
    step(cub::DeviceSegmentedSort::StableSortPairs(temp, tb, keys_in, keys_out, vals_a, vals_b, n, rows, offs, offs + 1,
                                                   st));
    std::swap(vals_a, vals_b);
  };
  if (tiebreak) sort_by(tiebreak);
  sort_by(scores);
  if (mask) {
    uint8_t* mk_in = reinterpret_cast<uint8_t*>(keys_in);
    uint8_t* mk_out = reinterpret_cast<uint8_t*>(keys_out);
    topk_mask_keys<<<grid_for(n), 256, 0, st>>>(mask, vals_a, mk_in, n, cols);
    step(cudaGetLastError());
    size_t tb = temp_bytes;
    step(cub::DeviceSegmentedSort::StableSortPairs(temp, tb, mk_in, mk_out, vals_a, vals_b, n, rows, offs, offs + 1,
                                                   st));
    std::swap(vals_a, vals_b);
  }
  topk_out<<<grid_for(rows * k), 256, 0, st>>>(vals_a, indices, rows, cols, k);
  step(cudaGetLastError());
  (void)cudaFreeAsync(ws, st);
  CD_CHECK(err);
}

// Keys of the device-wide sorts: the row in the high bits, so one sort over all
// rows keeps each row's entries together, in the order of the low key.
__global__ void rowkey_init(int32_t* pos, int64_t n, int64_t cols) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    pos[i] = static_cast<int32_t>(i % cols);
}

// For the element at sorted slot i (row = key >> shift_prev, position pos[i]):
// its row and the descending key of src, with mask above it when given
// (0 = kept, 1 = masked: masked entries sort after every kept one).
__global__ void rowkey_of(const float* src, const uint8_t* mask, const uint64_t* prev_keys, const int32_t* pos,
                          uint64_t* keys, int64_t n, int64_t cols, int shift_prev) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint64_t row = prev_keys ? (prev_keys[i] >> shift_prev) : static_cast<uint64_t>(i / cols);
    const int64_t at = static_cast<int64_t>(row) * cols + pos[i];
    const uint64_t key = KeyOf<float>::desc(src[at]);
    if (mask)
      keys[i] = (row << 33) | (static_cast<uint64_t>(mask[at] ? 0u : 1u) << 32) | key;
    else
      keys[i] = (row << 32) | key;
  }
}

__global__ void rowkey_out(const int32_t* pos, int64_t* out, int64_t rows, int64_t cols, int64_t k) {
  const int64_t n = rows * k;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = pos[(i / k) * cols + i % k];
}

// The same order as topk_chunk through device-wide radix sorts of (row, key)
// pairs: for float scores on long rows, where a segmented sort gives each
// row's sort to one thread block.
void topk_rows_wide(const float* scores, const float* tiebreak, const uint8_t* mask, int64_t rows, int64_t cols,
                    int64_t k, int64_t* indices, cudaStream_t st) {
  const int64_t n = rows * cols;
  int row_bits = 1;
  while ((int64_t(1) << row_bits) < rows) ++row_bits;
  size_t temp_bytes = 0;
  CD_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, static_cast<const uint64_t*>(nullptr),
                                           static_cast<uint64_t*>(nullptr), static_cast<const int32_t*>(nullptr),
                                           static_cast<int32_t*>(nullptr), n, 0, 33 + row_bits, st));
  auto align = [](size_t x) { return (x + 255) / 256 * 256; };
  const size_t keys_bytes = align(static_cast<size_t>(n) * sizeof(uint64_t));
  const size_t vals_bytes = align(static_cast<size_t>(n) * sizeof(int32_t));
  char* ws = nullptr;
  CD_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&ws), 2 * keys_bytes + 2 * vals_bytes + temp_bytes, st));
  uint64_t* keys_in = reinterpret_cast<uint64_t*>(ws);
  uint64_t* keys_out = reinterpret_cast<uint64_t*>(ws + keys_bytes);
  int32_t* pos_a = reinterpret_cast<int32_t*>(ws + 2 * keys_bytes);
  int32_t* pos_b = reinterpret_cast<int32_t*>(ws + 2 * keys_bytes + vals_bytes);
  void* temp = ws + 2 * keys_bytes + 2 * vals_bytes;
  cudaError_t err = cudaSuccess;
  auto step = [&](cudaError_t e) {
    if (err == cudaSuccess) err = e;
  };
  rowkey_init<<<grid_for(n), 256, 0, st>>>(pos_a, n, cols);
  step(cudaGetLastError());
  bool have_prev = false;
  int prev_shift = 32;
  // Least significant first: tiebreak, then (mask, score) in one key; each sort is stable.
  auto sort_by = [&](const float* src, const uint8_t* m) {
    rowkey_of<<<grid_for(n), 256, 0, st>>>(src, m, have_prev ? keys_out : nullptr, pos_a, keys_in, n, cols, prev_shift);
    step(cudaGetLastError());
    const int low_bits = m ? 33 : 32;
    size_t tb = temp_bytes;
    step(cub::DeviceRadixSort::SortPairs(temp, tb, keys_in, keys_out, pos_a, pos_b, n, 0, low_bits + row_bits, st));
    std::swap(pos_a, pos_b);
    have_prev = true;
    prev_shift = low_bits;
  };
  if (tiebreak) sort_by(tiebreak, nullptr);
  sort_by(scores, mask);
  rowkey_out<<<grid_for(rows * k), 256, 0, st>>>(pos_a, indices, rows, cols, k);
  step(cudaGetLastError());
  (void)cudaFreeAsync(ws, st);
  CD_CHECK(err);
}

// Rows at least this long sort device-wide (float): a segmented sort runs
// each long row in one thread block.
constexpr int64_t kWideSortMinCols = 2048;

// Rows up to this long (float) sort in one kernel: a thread block per row, a
// bitonic sort in shared memory of 16-byte entries (128 KiB at 8192).
constexpr int64_t kBitonicMaxCols = 8192;
constexpr int kBitonicThreads = 1024;

// One row's entry, compared as (a, b) ascending: a = (masked, descending score
// key), b = (descending tiebreak key, position), so that the sorted row is in
// the top-k order (kept first, then score, tiebreak and position).
struct RankEntry {
  unsigned long long a, b;
};

__device__ __forceinline__ bool rank_less(const RankEntry& x, const RankEntry& y) {
  return x.a < y.a || (x.a == y.a && x.b < y.b);
}

// The (mask, score) half of an entry's rank: kept before masked, then score
// descending.
__device__ __forceinline__ unsigned long long rank_key(float score, bool kept) {
  return (static_cast<unsigned long long>(!kept) << 32) | KeyOf<float>::desc(score);
}

// Entry i of a row (its scores, tiebreak and mask, the last two optional).
__device__ __forceinline__ RankEntry rank_entry(const float* sr, const float* tr, const uint8_t* mr, int64_t i) {
  const unsigned long long tb = tr ? KeyOf<float>::desc(tr[i]) : 0ull;
  return RankEntry{rank_key(sr[i], !mr || mr[i]), (tb << 32) | static_cast<unsigned long long>(i)};
}

// Sorts n2 (a power of two) entries in shared memory, ascending; every thread
// of the block takes part. Ends with the block synchronized.
__device__ void bitonic_sort_shared(RankEntry* e, int n2) {
  for (int size = 2; size <= n2; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < n2; i += blockDim.x) {
        const int j = i ^ stride;
        if (j > i) {
          const RankEntry x = e[i], y = e[j];
          const bool ascending = (i & size) == 0;
          if (ascending ? rank_less(y, x) : rank_less(x, y)) {
            e[i] = y;
            e[j] = x;
          }
        }
      }
      __syncthreads();
    }
  }
}

// Sorts the n2 entries of e (every thread of the block takes part) and writes
// the first k positions to out.
__device__ void sort_write_first(RankEntry* e, int n2, int64_t k, int64_t* out) {
  bitonic_sort_shared(e, n2);
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) out[i] = static_cast<int64_t>(e[i].b & 0xffffffffull);
}

__global__ void __launch_bounds__(kBitonicThreads)
    topk_bitonic_kernel(const float* scores, const float* tiebreak, const uint8_t* mask, int64_t cols, int64_t k,
                        int n2, int64_t* indices) {
  extern __shared__ unsigned long long bitonic_smem[];
  RankEntry* e = reinterpret_cast<RankEntry*>(bitonic_smem);
  const int64_t row = blockIdx.x;
  const float* sr = scores + row * cols;
  const float* tr = tiebreak ? tiebreak + row * cols : nullptr;
  const uint8_t* mr = mask ? mask + row * cols : nullptr;
  for (int i = threadIdx.x; i < n2; i += blockDim.x)  // padding after every real entry
    e[i] = i < cols ? rank_entry(sr, tr, mr, i) : RankEntry{~0ull, ~0ull};
  __syncthreads();
  sort_write_first(e, n2, k, indices + row * k);
}

using RowTopkKernel = void (*)(const float*, const float*, const uint8_t*, int64_t, int64_t, int, int64_t*);

// One block per row of `Kernel` (topk_bitonic_kernel, topk_select_kernel<>),
// with n2 entries of shared memory (at most kBitonicMaxCols).
template <RowTopkKernel Kernel>
void launch_row_topk(int threads, int n2, const float* scores, const float* tiebreak, const uint8_t* mask, int64_t rows,
                     int64_t cols, int64_t k, int64_t* indices, cudaStream_t st) {
  const size_t smem = static_cast<size_t>(n2) * sizeof(RankEntry);
  allow_smem(Kernel, smem);
  for (int64_t r0 = 0; r0 < rows; r0 += 65535 * 1024) {  // grid x is far larger; one launch in practice
    const int64_t nr = std::min<int64_t>(rows - r0, 65535 * 1024);
    Kernel<<<static_cast<unsigned>(nr), threads, smem, st>>>(
        scores + r0 * cols, tiebreak ? tiebreak + r0 * cols : nullptr, mask ? mask + r0 * cols : nullptr, cols, k, n2,
        indices + r0 * k);
    CD_CHECK(cudaGetLastError());
  }
}

int pow2_at_least(int64_t n) {
  int n2 = 1;
  while (n2 < n) n2 <<= 1;
  return n2;
}

void topk_bitonic(const float* scores, const float* tiebreak, const uint8_t* mask, int64_t rows, int64_t cols,
                  int64_t k, int64_t* indices, cudaStream_t st) {
  const int n2 = pow2_at_least(cols);
  const int threads = static_cast<int>(std::min<int64_t>(kBitonicThreads, std::max(32, n2 / 2)));
  launch_row_topk<topk_bitonic_kernel>(threads, n2, scores, tiebreak, mask, rows, cols, k, indices, st);
}

// Top-k by selection, for k well below the row length: a block per row finds
// the key of the k-th entry eleven bits at a time (a histogram of the next
// digit of the (mask, score) key, then of the tiebreak's key, over the entries
// that share the digits found so far), stopping as soon as the entries sharing
// them are exactly as many as are still needed. It then collects the k entries
// (exact ties of the whole key by position) and sorts them in shared memory.
// The same order as the sorts.
constexpr int kSelectThreads = 1024;
constexpr int64_t kSelectMaxK = kBitonicMaxCols;  // its k entries sort in shared memory
constexpr int kSelectUnroll = 8;
constexpr int kSelectBins = 2048;  // 11-bit digits, two bins a thread
static_assert(kSelectBins == 2 * kSelectThreads, "the bucket scan gives each thread two bins");

// Digit `step` of the selection: 33 bits of (mask, score) as 11 + 11 + 11,
// then 32 of the tiebreak as 11 + 11 + 10 (six passes at most, where 8-bit
// digits take nine: rows whose scores tie, as saturated routing scores do, run
// every pass). Narrow: 8-bit digits (8 + 8 + 8 + 8 + 1, then 8 + 8 + 8 + 8),
// kept for comparison (COLT5_TOPK_DIGIT_BITS=8).
struct SelectDigit {
  bool on_tiebreak;
  int shift;
  unsigned mask;
};
template <bool Narrow>
__device__ __forceinline__ SelectDigit select_digit(int step) {
  if constexpr (Narrow) {
    if (step < 5) return {false, step < 4 ? 25 - 8 * step : 0, step < 4 ? 0xffu : 1u};
    return {true, 24 - 8 * (step - 5), 0xffu};
  } else {
    if (step < 3) return {false, 22 - 11 * step, 0x7ffu};
    const int t = step - 3;
    return {true, t < 2 ? 21 - 11 * t : 0, t < 2 ? 0x7ffu : 0x3ffu};
  }
}

// Whether the selection takes 8-bit digits (COLT5_TOPK_DIGIT_BITS=8; read
// once per process).
bool select_narrow_digits() {
  static const bool on = [] {
    const char* v = std::getenv("COLT5_TOPK_DIGIT_BITS");
    return v && std::string(v) == "8";
  }();
  return on;
}

// The selection of one row (or, Chunked, of one chunk of a row: the
// chunk's k entries, positions in the whole row, unsorted into `cand`, padded
// with entries after every real one where the chunk is shorter than k).
template <bool Chunked, bool Narrow>
__device__ __forceinline__ void topk_select_row(const float* scores, const float* tiebreak, const uint8_t* mask,
                                                int64_t row_cols, int64_t k_in, int n2, int64_t* indices,
                                                int64_t chunks, int64_t chunk_len, RankEntry* cand) {
  using BlockScan = cub::BlockScan<int, kSelectThreads>;
  extern __shared__ unsigned long long select_smem[];
  RankEntry* e = reinterpret_cast<RankEntry*>(select_smem);
  __shared__ typename BlockScan::TempStorage scan_tmp;
  __shared__ int hist[kSelectBins];
  // Digits found so far: the bits of the (mask, score) key under ma are pa, of
  // the tiebreak's key under mt are pt; need = entries still wanted among them.
  __shared__ unsigned long long s_pa, s_ma;
  __shared__ unsigned s_pt, s_mt;
  __shared__ int s_need, s_stop, s_count;
  const int64_t row = Chunked ? blockIdx.x / chunks : blockIdx.x;
  const int64_t first = Chunked ? (blockIdx.x % chunks) * chunk_len : 0;
  const int64_t cols = Chunked ? (row_cols - first < chunk_len ? row_cols - first : chunk_len) : row_cols;
  const int64_t k = k_in < cols ? k_in : cols;
  const float* sr = scores + row * row_cols + first;
  const float* tr = tiebreak ? tiebreak + row * row_cols + first : nullptr;
  const uint8_t* mr = mask ? mask + row * row_cols + first : nullptr;
  RankEntry* dst = Chunked ? cand + blockIdx.x * k_in : e;
  const int tid = threadIdx.x, lane = tid & 31;
  if (tid == 0) {
    s_pa = s_ma = 0;
    s_pt = s_mt = 0;
    s_need = static_cast<int>(k);
    s_stop = 0;
    s_count = 0;
  }
  const int steps = Narrow ? (tr ? 9 : 5) : (tr ? 6 : 3);
  for (int step = 0; step < steps; ++step) {
    __syncthreads();
    if (s_stop) break;
    const SelectDigit dg = select_digit<Narrow>(step);
    const bool on_t = dg.on_tiebreak;
    const unsigned long long pa = s_pa, ma = s_ma;
    const unsigned pt = s_pt, mt = s_mt;
    const int need = s_need;
    hist[2 * tid] = 0;
    hist[2 * tid + 1] = 0;
    __syncthreads();
    for (int64_t base = 0; base < cols; base += static_cast<int64_t>(kSelectThreads) * kSelectUnroll) {
      float sv[kSelectUnroll], tv[kSelectUnroll];
      bool kept[kSelectUnroll];
#pragma unroll
      for (int u = 0; u < kSelectUnroll; ++u) {
        const int64_t i = base + u * kSelectThreads + tid;
        sv[u] = 0.0f;
        tv[u] = 0.0f;
        kept[u] = true;
        if (i < cols) {
          sv[u] = sr[i];
          if (mr) kept[u] = mr[i] != 0;
          if (on_t) tv[u] = tr[i];
        }
      }
#pragma unroll
      for (int u = 0; u < kSelectUnroll; ++u) {
        const int64_t i = base + u * kSelectThreads + tid;
        unsigned dig = 0xffffffffu;  // not counted
        if (i < cols) {
          const unsigned long long a = rank_key(sv[u], kept[u]);
          if ((a & ma) == pa) {
            if (!on_t) {
              dig = static_cast<unsigned>(a >> dg.shift) & dg.mask;
            } else {
              const unsigned t = KeyOf<float>::desc(tv[u]);
              if ((t & mt) == pt) dig = (t >> dg.shift) & dg.mask;
            }
          }
        }
        // The lanes sharing the first counted lane's digit (all of them where
        // the row's scores tie) count with one shared-memory atomic; the
        // others with one each.
        const unsigned counted = __ballot_sync(0xffffffffu, dig != 0xffffffffu);
        if (counted != 0u) {
          const int leader = __ffs(counted) - 1;
          const unsigned lead_dig = __shfl_sync(0xffffffffu, dig, leader);
          const unsigned same = __ballot_sync(0xffffffffu, dig == lead_dig);
          if (lane == leader)
            atomicAdd(&hist[lead_dig], __popc(same));
          else if (dig != 0xffffffffu && dig != lead_dig)
            atomicAdd(&hist[dig], 1);
        }
      }
    }
    __syncthreads();
    // The bucket of the need-th entry: a scan of the bins two a thread.
    {
      const int h0 = hist[2 * tid], h1 = hist[2 * tid + 1];
      int before = 0;
      BlockScan(scan_tmp).ExclusiveSum(h0 + h1, before);
      if (before < need && need <= before + h0 + h1) {  // exactly one thread
        const bool low = need <= before + h0;
        const unsigned d = 2u * static_cast<unsigned>(tid) + (low ? 0u : 1u);
        const int still = need - (low ? before : before + h0);
        if (!on_t) {
          s_pa = pa | (static_cast<unsigned long long>(d) << dg.shift);
          s_ma = ma | (static_cast<unsigned long long>(dg.mask) << dg.shift);
        } else {
          s_pt = pt | (d << dg.shift);
          s_mt = mt | (dg.mask << dg.shift);
        }
        s_need = still;
        if ((low ? h0 : h1) == still) s_stop = 1;
      }
    }
  }
  __syncthreads();
  // Entries before the found digits are all taken; those sharing them are all
  // taken when they are exactly as many as needed, else (exact ties of the
  // whole key) the first `need` by position.
  const bool by_position = !s_stop;
  const unsigned long long pa = s_pa, ma = s_ma;
  const unsigned pt = s_pt, mt = s_mt;
  const int need = s_need;
  int group_seen = 0;
  // kSelectUnroll loads in flight a thread, then the entries in position
  // order (the ties' scan below counts them in that order).
  for (int64_t base = 0; base < cols; base += static_cast<int64_t>(kSelectThreads) * kSelectUnroll) {
    unsigned long long key[kSelectUnroll];
#pragma unroll
    for (int u = 0; u < kSelectUnroll; ++u) {
      const int64_t i = base + u * kSelectThreads + tid;
      key[u] = i < cols ? rank_key(sr[i], !mr || mr[i]) : ~0ull;
    }
#pragma unroll
    for (int u = 0; u < kSelectUnroll; ++u) {
      const int64_t i = base + u * kSelectThreads + tid;
      int cls = 2;  // 0 before, 1 sharing the digits, 2 after
      RankEntry v{0ull, 0ull};
      if (i < cols) {
        const unsigned long long am = key[u] & ma;
        if (am <= pa) {  // the tiebreak is read only here
          const unsigned long long tb = tr ? KeyOf<float>::desc(tr[i]) : 0ull;
          v = RankEntry{key[u], (tb << 32) | static_cast<unsigned long long>(i)};
          const unsigned tm = static_cast<unsigned>(tb) & mt;
          cls = am < pa ? 0 : (tm < pt ? 0 : (tm == pt ? 1 : 2));
        }
      }
      bool take = cls == 0 || (cls == 1 && !by_position);
      if (by_position) {
        int rank = 0, total = 0;
        BlockScan(scan_tmp).ExclusiveSum(cls == 1 ? 1 : 0, rank, total);
        if (cls == 1 && group_seen + rank < need) take = true;
        group_seen += total;
        __syncthreads();  // scan_tmp is reused
      }
      if (Chunked) v.b += static_cast<unsigned long long>(first);  // the position in the whole row
      if (take) dst[atomicAdd(&s_count, 1)] = v;
    }
  }
  if (Chunked) {
    for (int64_t i = k + tid; i < k_in; i += blockDim.x) dst[i] = RankEntry{~0ull, ~0ull};
    return;
  }
  __syncthreads();
  for (int i = static_cast<int>(k) + tid; i < n2; i += blockDim.x) e[i] = RankEntry{~0ull, ~0ull};
  __syncthreads();
  sort_write_first(e, n2, k, indices + row * k_in);
}

template <bool Narrow>
__global__ void __launch_bounds__(kSelectThreads)
    topk_select_kernel(const float* scores, const float* tiebreak, const uint8_t* mask, int64_t cols, int64_t k, int n2,
                       int64_t* indices) {
  topk_select_row<false, Narrow>(scores, tiebreak, mask, cols, k, n2, indices, 1, cols, nullptr);
}

// Top-k of a few long rows: the selection of each chunk of a row (a block per
// chunk, `chunks` per row), then a bitonic sort per row of its chunks' k
// candidates each in shared memory. A row's k first entries are among its
// chunks' k first (the order is total), so the result is the selection's.
constexpr int64_t kChunkedMaxCandidates = 4096;  // 64 KiB of entries per row

template <bool Narrow>
__global__ void __launch_bounds__(kSelectThreads)
    topk_chunk_select_kernel(const float* scores, const float* tiebreak, const uint8_t* mask, int64_t cols, int64_t k,
                             int64_t chunks, int64_t chunk_len, RankEntry* cand) {
  topk_select_row<true, Narrow>(scores, tiebreak, mask, cols, k, 0, nullptr, chunks, chunk_len, cand);
}

__global__ void __launch_bounds__(kBitonicThreads)
    topk_candidates_kernel(const RankEntry* cand, int64_t per_row, int64_t k, int n2, int64_t* indices) {
  extern __shared__ unsigned long long cand_smem[];
  RankEntry* e = reinterpret_cast<RankEntry*>(cand_smem);
  const int64_t row = blockIdx.x;
  for (int i = threadIdx.x; i < n2; i += blockDim.x)
    e[i] = i < per_row ? cand[row * per_row + i] : RankEntry{~0ull, ~0ull};
  __syncthreads();
  sort_write_first(e, n2, k, indices + row * k);
}

void topk_select(const float* scores, const float* tiebreak, const uint8_t* mask, int64_t rows, int64_t cols, int64_t k,
                 int64_t* indices, cudaStream_t st) {
  if (select_narrow_digits())
    launch_row_topk<topk_select_kernel<true>>(kSelectThreads, pow2_at_least(k), scores, tiebreak, mask, rows, cols, k,
                                              indices, st);
  else
    launch_row_topk<topk_select_kernel<false>>(kSelectThreads, pow2_at_least(k), scores, tiebreak, mask, rows, cols, k,
                                               indices, st);
}

// Chunks per row for the chunked selection: a power of two from 4 with every
// chunk at least 4k and 2048 long, all chunks' candidates in shared memory and
// about two blocks per multiprocessor at most; 0 where fewer than 4 fit.
int64_t topk_chunks(int64_t rows, int64_t cols, int64_t k) {
  int64_t c = 0;
  for (int64_t t = 4; t * k <= kChunkedMaxCandidates && cols / t >= std::max<int64_t>(4 * k, 2048) && rows * t <= 264;
       t *= 2)
    c = t;
  return c;
}

void topk_chunked(const float* scores, const float* tiebreak, const uint8_t* mask, int64_t rows, int64_t cols,
                  int64_t k, int64_t chunks, int64_t* indices, cudaStream_t st) {
  const int64_t chunk_len = (cols + chunks - 1) / chunks, per_row = chunks * k;
  RankEntry* c = nullptr;
  CD_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&c), static_cast<size_t>(rows * per_row) * sizeof(RankEntry), st));
  if (select_narrow_digits())
    topk_chunk_select_kernel<true><<<static_cast<unsigned>(rows * chunks), kSelectThreads, 0, st>>>(
        scores, tiebreak, mask, cols, k, chunks, chunk_len, c);
  else
    topk_chunk_select_kernel<false><<<static_cast<unsigned>(rows * chunks), kSelectThreads, 0, st>>>(
        scores, tiebreak, mask, cols, k, chunks, chunk_len, c);
  cudaError_t err = cudaGetLastError();
  const int n2 = pow2_at_least(per_row);
  const size_t smem = static_cast<size_t>(n2) * sizeof(RankEntry);
  allow_smem(topk_candidates_kernel, smem);
  topk_candidates_kernel<<<static_cast<unsigned>(rows), kBitonicThreads, smem, st>>>(c, per_row, k, n2, indices);
  if (err == cudaSuccess) err = cudaGetLastError();
  (void)cudaFreeAsync(c, st);
  CD_CHECK(err);
}

template <typename T>
bool topk_wide(const T*, const T*, const uint8_t*, int64_t, int64_t, int64_t, int64_t*, cudaStream_t) {
  return false;
}
template <>
bool topk_wide<float>(const float* scores, const float* tiebreak, const uint8_t* mask, int64_t rows, int64_t cols,
                      int64_t k, int64_t* indices, cudaStream_t st) {
  if (cols < kWideSortMinCols || rows >= (int64_t(1) << 31)) return false;
  topk_rows_wide(scores, tiebreak, mask, rows, cols, k, indices, st);
  return true;
}

}  // namespace
}  // namespace cd_cuda

template <typename T>
void coor_descent_forward_cuda(const CoorDescentParams<T>& p, void* stream) {
  cd_cuda::launch_rows<T>(cd_cuda::forward_kernels<T>(), p, p.launch, p.rows, p.cols, p.n_iters, false,
                          static_cast<cudaStream_t>(stream));
}

template <typename T>
void coor_descent_backward_cuda(const CoorDescentBackwardParams<T>& p, void* stream) {
  cd_cuda::launch_rows<T>(cd_cuda::backward_kernels<T>(), p, p.fwd.launch, p.fwd.rows, p.fwd.cols, p.fwd.n_iters, true,
                          static_cast<cudaStream_t>(stream));
}

template <typename T>
void topk_tiebreak_cuda(const T* scores, const T* tiebreak, const uint8_t* mask, int64_t rows, int64_t cols, int64_t k,
                        int64_t* indices, void* stream, TopkCudaPath path) {
  if (rows == 0 || k == 0) return;
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  if constexpr (std::is_same_v<T, float>) {
    // Positions travel in 32 bits.
    const bool can_select = k <= cd_cuda::kSelectMaxK && cols < (int64_t(1) << 31);
    // A block per row: a few very long rows leave the GPU idle, where the
    // device-wide sorts are faster (2 rows of 262144: 0.58 against 0.27 ms).
    const bool select_pays = cols <= 65536 || rows >= 8;
    // Where the selection would run on rows longer than 65536, its chunked
    // form fills the GPU (16 rows of 131072, k 128, on an H100: 0.13 against
    // 0.29 ms); on shorter rows the second pass costs more than it saves (2
    // rows of 32768, k 1024: 0.15 against 0.10), and on 2 rows of 262144 the
    // sorts stay ahead (0.24 against 0.27).
    const int64_t chunks = can_select ? cd_cuda::topk_chunks(rows, cols, k) : 0;
    if (chunks > 0 &&
        (path == TopkCudaPath::chunked || (path == TopkCudaPath::automatic && cols > 65536 && select_pays))) {
      cd_cuda::topk_chunked(scores, tiebreak, mask, rows, cols, k, chunks, indices, st);
      return;
    }
    if (path == TopkCudaPath::chunked) path = TopkCudaPath::select;
    if (can_select && (path == TopkCudaPath::select || (path == TopkCudaPath::automatic && select_pays))) {
      cd_cuda::topk_select(scores, tiebreak, mask, rows, cols, k, indices, st);
      return;
    }
    if (path != TopkCudaPath::sorts && cols <= cd_cuda::kBitonicMaxCols) {
      cd_cuda::topk_bitonic(scores, tiebreak, mask, rows, cols, k, indices, st);
      return;
    }
  }
  // Device-wide sorts of all rows at once: at most 2^26 entries per sort.
  const int64_t wide_chunk = std::max<int64_t>(1, (int64_t(1) << 26) / cols);
  if (cols >= cd_cuda::kWideSortMinCols) {
    bool done = true;
    for (int64_t r0 = 0; r0 < rows && done; r0 += wide_chunk) {
      const int64_t nr = std::min(wide_chunk, rows - r0);
      done = cd_cuda::topk_wide<T>(scores + r0 * cols, tiebreak ? tiebreak + r0 * cols : nullptr,
                                   mask ? mask + r0 * cols : nullptr, nr, cols, k, indices + r0 * k, st);
    }
    if (done) return;
  }
  // Rows per sort: at most 2^26 entries, which bounds the sort's workspace
  // and keeps its item count far inside 32 bits.
  constexpr int64_t kMaxSortEntries = int64_t(1) << 26;
  // At most 256 rows per sort: above a few hundred segments the segmented sort
  // partitions them and copies the partition sizes to the host (a stream
  // synchronization, which also breaks CUDA-graph capture).
  constexpr int64_t kMaxSortRows = 256;
  const int64_t chunk = std::max<int64_t>(1, std::min(kMaxSortRows, kMaxSortEntries / cols));
  for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
    const int64_t nr = std::min(chunk, rows - r0);
    cd_cuda::topk_chunk<T>(scores + r0 * cols, tiebreak ? tiebreak + r0 * cols : nullptr,
                           mask ? mask + r0 * cols : nullptr, nr, cols, k, indices + r0 * k, st);
  }
}

template void coor_descent_forward_cuda<float>(const CoorDescentParams<float>&, void*);
template void coor_descent_forward_cuda<double>(const CoorDescentParams<double>&, void*);
template void coor_descent_backward_cuda<float>(const CoorDescentBackwardParams<float>&, void*);
template void coor_descent_backward_cuda<double>(const CoorDescentBackwardParams<double>&, void*);
template void topk_tiebreak_cuda<float>(const float*, const float*, const uint8_t*, int64_t, int64_t, int64_t, int64_t*,
                                        void*, TopkCudaPath);
template void topk_tiebreak_cuda<double>(const double*, const double*, const uint8_t*, int64_t, int64_t, int64_t,
                                         int64_t*, void*, TopkCudaPath);

}  // namespace kernels
}  // namespace colt5
