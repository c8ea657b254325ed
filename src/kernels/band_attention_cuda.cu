// Exact sliding-window attention straight from LocalMHA's packed projection:
// query t sees the keys t - ws * back .. t + ws * fwd (.. t when causal) that
// lie in the sequence and that the key mask keeps. One block takes 64 queries
// of one (sequence, head): their keys are one contiguous band of at most 64 +
// ws * (back + fwd) rows, small enough for the whole score block to stay in
// shared memory, so the softmax is exact in one pass (no running maximum) and
// nothing is packed, padded or copied around the kernel. The products run on
// the tensor cores through WMMA: bfloat16/float16 inputs directly, float32
// inputs in TF32 where LibTorch allows TF32 matrix products and otherwise as
// three TF32 products (a = hi + lo, a b = hi hi + hi lo + lo hi), which keeps
// float32 accuracy; every sum and the softmax in float32.
//
// The forward writes y (batch, n, heads * d) and the log-sum-exp of each
// query's scaled scores (+inf where the query sees no key: it takes its
// look-around's mean instead, from the window sums of v, as the reference's
// softmax over equal scores gives). The backward recomputes the scores, writes
// q's gradient into the projection's gradient and adds k's and v's into a
// float32 buffer with 16-byte atomics (each key belongs to the bands of up to
// back + fwd + 1 blocks); a last kernel casts them into the projection's
// gradient, v's with the blind queries' share.
//
// In float16/bfloat16 (window_tile_*) the same attention runs on register
// tiles (mma.sync with operands from ldmatrix, scores and probabilities in
// accumulators, 4 warps of 16 rows): the forward over blocks of 64 queries
// with a running softmax over tiles of 64 keys; the backward over blocks of
// 64 queries (q's gradient) and blocks of 64 keys (k's and v's), each
// recomputing its scores, so that every gradient row is written once.
#include <cuda_pipeline.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

#include "kernels/coor_descent.h"
#include "kernels/cuda_common.cuh"
#include "kernels/cuda_convert.cuh"
#include "kernels/mma_common.cuh"

namespace colt5 {
namespace kernels {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int BQ = 64;  // queries per block
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxKeys = 256;  // keys per block's band, at most
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// WMMA shapes: 16 x 16 tiles, k steps of 8 (TF32) or 16 (16-bit types).
template <typename T>
struct Mma {
  static constexpr int K = 16;
  using Elem = T;
};
template <>
struct Mma<float> {
  static constexpr int K = 8;
  using Elem = wmma::precision::tf32;
};

template <typename T>
using Acc = wmma::fragment<wmma::accumulator, 16, 16, Mma<T>::K, float>;

// An operand fragment; for float32 with SPLIT also its rounding remainder.
template <typename T, typename Use, typename Layout, bool SPLIT>
struct Operand {
  wmma::fragment<Use, 16, 16, Mma<T>::K, typename Mma<T>::Elem, Layout> hi;
  wmma::fragment<Use, 16, 16, Mma<T>::K, typename Mma<T>::Elem, Layout> lo;

  __device__ __forceinline__ void load(const T* p, unsigned ld) {
    wmma::load_matrix_sync(hi, p, ld);
    if constexpr (std::is_same<T, float>::value) {
#pragma unroll
      for (int i = 0; i < hi.num_elements; ++i) {
        const float x = hi.x[i];
        const float h = wmma::__float_to_tf32(x);
        hi.x[i] = h;
        if constexpr (SPLIT) lo.x[i] = wmma::__float_to_tf32(x - h);
      }
    }
  }
};

template <typename T, typename LA, typename LB, bool SPLIT>
__device__ __forceinline__ void mma(Acc<T>& c, const Operand<T, wmma::matrix_a, LA, SPLIT>& a,
                                    const Operand<T, wmma::matrix_b, LB, SPLIT>& b) {
  if constexpr (SPLIT) {
    wmma::mma_sync(c, a.lo, b.hi, c);
    wmma::mma_sync(c, a.hi, b.lo, c);
  }
  wmma::mma_sync(c, a.hi, b.hi, c);
}

// One 16-row tile of a D-wide operand (q or the output's gradient) held in
// registers, times 16-row tiles of another D-wide operand transposed (keys
// or values): one 16 x 16 tile of scores (or of their gradient).
template <typename T, int D, bool SPLIT>
struct RowTile {
  static constexpr int KS = Mma<T>::K;
  Operand<T, wmma::matrix_a, wmma::row_major, SPLIT> f[D / KS];

  __device__ __forceinline__ void load(const T* rows, unsigned ld) {
#pragma unroll
    for (int s = 0; s < D / KS; ++s) f[s].load(rows + s * KS, ld);
  }

  // c = this tile times rows ct * 16 .. ct * 16 + 15 of `other`, transposed.
  __device__ __forceinline__ void times_t(Acc<T>& c, const T* other, unsigned ld, int ct) const {
    wmma::fill_fragment(c, 0.f);
#pragma unroll
    for (int s = 0; s < D / KS; ++s) {
      Operand<T, wmma::matrix_b, wmma::col_major, SPLIT> b;
      b.load(other + ct * 16 * ld + s * KS, ld);
      mma(c, f[s], b);
    }
  }
};

// o[u] = a 16-row tile of `left` (row-major, `steps` k steps wide) times
// column tiles col0 + u of `right` (row-major): the probabilities (or the
// scores' gradient) times values (or keys).
template <typename T, int TPW, bool SPLIT>
__device__ __forceinline__ void tile_times(Acc<T> (&o)[TPW], const T* left, unsigned ld_l, const T* right,
                                           unsigned ld_r, int steps, int col0) {
  constexpr int KS = Mma<T>::K;
#pragma unroll
  for (int u = 0; u < TPW; ++u) wmma::fill_fragment(o[u], 0.f);
  for (int s = 0; s < steps; ++s) {
    Operand<T, wmma::matrix_a, wmma::row_major, SPLIT> a;
    a.load(left + s * KS, ld_l);
#pragma unroll
    for (int u = 0; u < TPW; ++u) {
      Operand<T, wmma::matrix_b, wmma::row_major, SPLIT> b;
      b.load(right + s * KS * ld_r + (col0 + u) * 16, ld_r);
      mma(o[u], a, b);
    }
  }
}

// The scores' row tile of warp pair `warp / 2` (q in `qf`) against the band's
// key tiles, the pair's two warps taking alternate tiles, into S (float32).
template <typename T, int D, bool SPLIT>
__device__ __forceinline__ void store_scores(const RowTile<T, D, SPLIT>& qf, const T* keys, unsigned ld, float* S,
                                             int ldS, int kt, int warp) {
  for (int ct = warp & 1; ct < kt / 16; ct += 2) {
    Acc<T> c;
    qf.times_t(c, keys, ld, ct);
    wmma::store_matrix_sync(S + (warp >> 1) * 16 * ldS + ct * 16, c, ldS, wmma::mem_row_major);
  }
}

template <typename T>
constexpr int row_pad() {
  return sizeof(T) == 4 ? 4 : 8;
}

// 8 consecutive elements from and to memory (16 bytes for 16-bit types, 32
// for float32); `src` null gives zeros.
template <typename T>
__device__ __forceinline__ void copy8(T* dst, const T* src) {
  constexpr int words = 8 * sizeof(T) / 16;
#pragma unroll
  for (int w = 0; w < words; ++w)
    reinterpret_cast<uint4*>(dst)[w] = src ? reinterpret_cast<const uint4*>(src)[w] : make_uint4(0, 0, 0, 0);
}

template <typename T>
__device__ __forceinline__ void store8(T* dst, const float v[8]) {
  if constexpr (std::is_same<T, float>::value) {
    reinterpret_cast<float4*>(dst)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(dst)[1] = make_float4(v[4], v[5], v[6], v[7]);
  } else {
    union {
      uint4 raw;
      T e[8];
    } out;
#pragma unroll
    for (int e = 0; e < 8; ++e) out.e[e] = from_float<T>(v[e]);
    *reinterpret_cast<uint4*>(dst) = out.raw;
  }
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// One block's place: sequence b, head h, queries q0 .. q0 + 63 and their
// band of keys k_lo .. k_lo + nk - 1, kt = nk rounded up to the tile.
struct Band {
  int64_t b, h, q0, k_lo, reach_back, reach_fwd;
  int nk, kt;
};

__device__ __forceinline__ Band band_at(const BandAttentionParams& p, int64_t b, int64_t h, int64_t q0) {
  Band g;
  g.b = b;
  g.h = h;
  g.q0 = q0;
  g.reach_back = p.ws * p.back;
  g.reach_fwd = p.causal ? 0 : p.ws * p.fwd;
  g.k_lo = g.q0 - g.reach_back > 0 ? g.q0 - g.reach_back : 0;
  const int64_t end = g.q0 + BQ + g.reach_fwd < p.n ? g.q0 + BQ + g.reach_fwd : p.n;
  g.nk = static_cast<int>(end - g.k_lo);
  g.kt = (g.nk + 15) / 16 * 16;
  return g;
}

// The block's place from its grid position (x: block of queries, y: head,
// z: sequence).
__device__ __forceinline__ Band block_band(const BandAttentionParams& p) {
  return band_at(p, blockIdx.z, blockIdx.y, static_cast<int64_t>(blockIdx.x) * BQ);
}

// Rows of q/k/v (part 0/1/2) of the packed projection into shared memory
// (ld elements apart), zeros past `valid` rows up to `rows`: asynchronous
// copies (cp.async), complete after wait_rows() and a barrier.
template <typename T, int D>
__device__ __forceinline__ void load_rows(const BandAttentionParams& p, const Band& g, int part, int64_t first,
                                          int valid, int rows, T* dst, int ld) {
  constexpr int per = 16 / sizeof(T);  // elements per 16-byte copy
  const T* qkv = static_cast<const T*>(p.qkv);
  const int64_t stride = 3 * p.heads * D;
  for (int i = threadIdx.x; i < rows * (D / per); i += kThreads) {
    const int r = i / (D / per), c = (i % (D / per)) * per;
    if (r < valid)
      __pipeline_memcpy_async(dst + r * ld + c, qkv + (g.b * p.n + first + r) * stride + (part * p.heads + g.h) * D + c,
                              16);
    else
      *reinterpret_cast<uint4*>(dst + r * ld + c) = make_uint4(0, 0, 0, 0);
  }
  __pipeline_commit();
}

__device__ __forceinline__ void wait_rows() { __pipeline_wait_prior(0); }

// Whether query t (row r of the block) may see key c of the band.
__device__ __forceinline__ bool visible(const Band& g, const unsigned char* key_ok, int64_t t, int c) {
  const int64_t j = g.k_lo + c;
  return key_ok[c] && j >= t - g.reach_back && j <= t + g.reach_fwd;
}

// Shared memory of the forward: keys then values (kt_max x (D + pad)), the
// scores (64 x (kt_max + 4) float32; q before them, the output after them),
// for 16-bit types the probabilities in that type (64 x (kt_max + 8)), the
// blind flags and the keys' mask.
template <typename T, int D>
size_t forward_smem(int kt_max) {
  constexpr int LDT = D + row_pad<T>();
  size_t bytes = static_cast<size_t>(kt_max) * LDT * sizeof(T) + static_cast<size_t>(BQ) * (kt_max + 4) * 4;
  if (!std::is_same<T, float>::value) bytes += static_cast<size_t>(BQ) * (kt_max + 8) * sizeof(T);
  return bytes + BQ * sizeof(int) + kt_max;
}

template <typename T, int D, bool SPLIT>
__device__ __forceinline__ void band_forward_body(const BandAttentionParams& p, int kt_max, const Band& g,
                                                  unsigned char* smem) {
  constexpr int KS = Mma<T>::K, LDT = D + row_pad<T>();
  const int ldS = kt_max + 4;
  T* kv = reinterpret_cast<T*>(smem);
  float* S = reinterpret_cast<float*>(smem + static_cast<size_t>(kt_max) * LDT * sizeof(T));
  unsigned char* tail = reinterpret_cast<unsigned char*>(S + BQ * ldS);
  T* P = reinterpret_cast<T*>(S);
  int ldP = ldS;
  if constexpr (!std::is_same<T, float>::value) {
    P = reinterpret_cast<T*>(tail);
    ldP = kt_max + 8;
    tail += static_cast<size_t>(BQ) * ldP * sizeof(T);
  }
  int* blind = reinterpret_cast<int*>(tail);
  unsigned char* key_ok = tail + BQ * sizeof(int);
  T* qs = reinterpret_cast<T*>(S);  // q in the scores' place until they are written

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n = p.n;
  const int q_valid = static_cast<int>(n - g.q0 < BQ ? n - g.q0 : BQ);

  load_rows<T, D>(p, g, 0, g.q0, q_valid, BQ, qs, LDT);
  load_rows<T, D>(p, g, 1, g.k_lo, g.nk, g.kt, kv, LDT);
  for (int c = threadIdx.x; c < g.kt; c += kThreads) key_ok[c] = c < g.nk && (!p.mask || p.mask[g.b * n + g.k_lo + c]);
  wait_rows();
  __syncthreads();

  // Scores: warp pairs share a row tile of q (kept in registers).
  const int rt = warp >> 1;
  RowTile<T, D, SPLIT> qf;
  qf.load(qs + rt * 16 * LDT, LDT);
  __syncthreads();
  store_scores(qf, kv, LDT, S, ldS, g.kt, warp);
  __syncthreads();

  // Values in the keys' place (arriving while the softmax of each row runs,
  // 8 rows a warp).
  load_rows<T, D>(p, g, 2, g.k_lo, g.nk, g.kt, kv, LDT);
  const float scale2 = p.scale * kLog2e;
  for (int r = warp * (BQ / kWarps); r < (warp + 1) * (BQ / kWarps); ++r) {
    const int64_t t = g.q0 + r;
    float* srow = S + r * ldS;
    float m = -INFINITY;
    for (int c = lane; c < g.kt; c += 32) {
      const float s = t < n && visible(g, key_ok, t, c) ? srow[c] * scale2 : -INFINITY;
      srow[c] = s;
      m = fmaxf(m, s);
    }
    m = warp_max(m);
    float sum = 0.f;
    for (int c = lane; c < g.kt; c += 32) {
      const float e = m == -INFINITY ? 0.f : exp2f(srow[c] - m);
      srow[c] = e;
      sum += e;
    }
    sum = warp_sum(sum);
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    for (int c = lane; c < g.kt; c += 32) {
      const float pr = srow[c] * inv;
      if constexpr (std::is_same<T, float>::value)
        srow[c] = pr;
      else
        P[r * ldP + c] = from_float<T>(pr);
    }
    if (lane == 0) {
      blind[r] = m == -INFINITY;
      if (t < n) p.lse[(g.b * p.heads + g.h) * n + t] = m == -INFINITY ? INFINITY : (m + log2f(sum)) * kLn2;
    }
  }
  wait_rows();
  __syncthreads();

  // Output tiles: each warp a row tile and D / 32 column tiles.
  constexpr int TPW = D / 32;
  Acc<T> o[TPW];
  tile_times<T, TPW, SPLIT>(o, P + rt * 16 * ldP, ldP, kv, LDT, g.kt / KS, (warp & 1) * TPW);
  __syncthreads();
  constexpr int LDO = D + 4;
  float* stage = S;
#pragma unroll
  for (int u = 0; u < TPW; ++u)
    wmma::store_matrix_sync(stage + rt * 16 * LDO + ((warp & 1) * TPW + u) * 16, o[u], LDO, wmma::mem_row_major);
  __syncthreads();

  T* y = static_cast<T*>(p.y);
  const int64_t width = p.heads * D, windows = ceil_div(n, p.ws);
  const float span = static_cast<float>((p.back + p.fwd + 1) * p.ws);
  for (int i = threadIdx.x; i < q_valid * (D / 8); i += kThreads) {
    const int r = i / (D / 8), c = (i % (D / 8)) * 8;
    const int64_t t = g.q0 + r;
    float v[8];
    if (!blind[r]) {
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] = stage[r * LDO + c + e];
    } else {
      // The look-around's mean: windows w - back .. w + fwd (-1 per slot
      // beyond an end) over the span.
      const int64_t w = t / p.ws;
      sum_windows(p.v_sums, g.b, windows, width, g.h * D + c, w - p.back, w + p.fwd, -static_cast<float>(p.ws), v);
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] /= span;
    }
    store8(y + (g.b * n + t) * width + g.h * D + c, v);
  }
}

template <typename T, int D, bool SPLIT>
__global__ void __launch_bounds__(kThreads, 2) band_forward_kernel(BandAttentionParams p, int kt_max) {
  extern __shared__ __align__(128) unsigned char smem[];
  band_forward_body<T, D, SPLIT>(p, kt_max, block_band(p), smem);
}

// Shared memory of the backward: keys, values (kt_max rows each), q and the
// output's gradient (64 rows each), the probabilities then the scores'
// gradients (64 x (kt_max + 4) float32 for float32; 64 x (kt_max + 8) of the
// 16-bit type, whose probabilities are recomputed tile by tile in float32
// where the scores' gradients need them, so that two blocks fit on an SM),
// one 16 x 16 float32 tile per warp, each query's log-sum-exp (base 2) and
// sum(dy * y), the keys' mask.
template <typename T, int D>
size_t backward_smem(int kt_max) {
  constexpr int LDT = D + row_pad<T>();
  const size_t probs = std::is_same<T, float>::value ? static_cast<size_t>(BQ) * (kt_max + 4) * 4
                                                     : static_cast<size_t>(BQ) * (kt_max + 8) * sizeof(T);
  return (2 * static_cast<size_t>(kt_max) + 2 * BQ) * LDT * sizeof(T) + probs + kWarps * 256 * 4 + 2 * BQ * 4 + kt_max;
}

template <typename T, int D, bool SPLIT>
__device__ __forceinline__ void band_backward_body(const BandAttentionParams& p, int kt_max, const Band& g,
                                                   unsigned char* smem) {
  constexpr bool kF32 = std::is_same<T, float>::value;
  constexpr int KS = Mma<T>::K, LDT = D + row_pad<T>();
  T* ks = reinterpret_cast<T*>(smem);
  T* vs = ks + kt_max * LDT;
  T* qs = vs + kt_max * LDT;
  T* dos = qs + BQ * LDT;
  // The probabilities (float32 for float32: S and P are one array).
  T* P = dos + BQ * LDT;
  const int ldP = kF32 ? kt_max + 4 : kt_max + 8;
  float* S = reinterpret_cast<float*>(P);
  float* scratch = reinterpret_cast<float*>(P + BQ * ldP);
  float* lse2 = scratch + kWarps * 256;
  float* drow = lse2 + BQ;
  unsigned char* key_ok = reinterpret_cast<unsigned char*>(drow + BQ);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n = p.n, width = p.heads * D;
  const int q_valid = static_cast<int>(n - g.q0 < BQ ? n - g.q0 : BQ);
  const T* gy = static_cast<const T*>(p.gy);
  const T* y = static_cast<const T*>(p.y_in);

  load_rows<T, D>(p, g, 0, g.q0, q_valid, BQ, qs, LDT);
  load_rows<T, D>(p, g, 1, g.k_lo, g.nk, g.kt, ks, LDT);
  load_rows<T, D>(p, g, 2, g.k_lo, g.nk, g.kt, vs, LDT);
  for (int c = threadIdx.x; c < g.kt; c += kThreads) key_ok[c] = c < g.nk && (!p.mask || p.mask[g.b * n + g.k_lo + c]);
  // The output's gradient into shared memory and each query's log-sum-exp
  // and sum(dy * y), 8 elements a thread (the D / 8 threads of a row on
  // adjacent lanes); a blind query (+inf) or a row past the end takes no
  // gradient through the attention.
  static_assert(kThreads % (D / 8) == 0 && 32 % (D / 8) == 0, "a row's threads within a warp");
  for (int i = threadIdx.x; i < BQ * (D / 8); i += kThreads) {
    const int r = i / (D / 8), c = (i % (D / 8)) * 8;
    const int64_t t = g.q0 + r;
    const float l = r < q_valid ? p.lse[(g.b * p.heads + g.h) * n + t] : INFINITY;
    const bool live = l != INFINITY;
    const int64_t at = (g.b * n + t) * width + g.h * D + c;
    __align__(32) T gv[8];
    __align__(32) T yv[8];
    copy8(gv, live ? gy + at : nullptr);
    copy8(yv, live ? y + at : nullptr);
    float acc = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc += to_float(gv[e]) * to_float(yv[e]);
#pragma unroll
    for (int o = D / 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    copy8(dos + r * LDT + c, gv);
    if (c == 0) {
      lse2[r] = l * kLog2e;
      drow[r] = acc;
    }
  }
  wait_rows();
  __syncthreads();

  // Scores, as in the forward, and the probabilities from the saved
  // log-sum-exps.
  const int rt = warp >> 1;
  const float scale2 = p.scale * kLog2e;
  // Query row r's probability of band key c from its score s.
  auto prob = [&](int r, int c, float s) {
    const float l = lse2[r];
    return g.q0 + r < n && l != INFINITY && visible(g, key_ok, g.q0 + r, c) ? exp2f(s * scale2 - l) : 0.f;
  };
  float* mine = scratch + warp * 256;
  {
    RowTile<T, D, SPLIT> qf;
    qf.load(qs + rt * 16 * LDT, LDT);
    if constexpr (kF32) {
      store_scores(qf, ks, LDT, S, ldP, g.kt, warp);
    } else {
      // Tile by tile through the warp's float32 tile into the 16-bit array.
      for (int ct = warp & 1; ct < g.kt / 16; ct += 2) {
        Acc<T> c;
        qf.times_t(c, ks, LDT, ct);
        wmma::store_matrix_sync(mine, c, 16, wmma::mem_row_major);
        __syncwarp();
        for (int e = lane; e < 256; e += 32) {
          const int i = rt * 16 + e / 16, col = ct * 16 + e % 16;
          P[i * ldP + col] = from_float<T>(prob(i, col, mine[e]));
        }
        __syncwarp();
      }
    }
  }
  __syncthreads();
  if constexpr (kF32) {
    for (int r = warp * (BQ / kWarps); r < (warp + 1) * (BQ / kWarps); ++r) {
      float* srow = S + r * ldP;
      for (int c = lane; c < g.kt; c += 32) srow[c] = prob(r, c, srow[c]);
    }
    __syncthreads();
  }

  // Rows of a 16 x 16 float32 tile (in `mine`) added to rows of k's (0) or
  // v's (1) gradient: key rows k_lo + kt0 .. + 15 that exist, columns ct0 ..
  // ct0 + 15 of head h.
  auto add_tile = [&](int part, int kt0, int ct0) {
    __syncwarp();
    const int rr = lane >> 1, cc = (lane & 1) * 8;
    if (kt0 + rr < g.nk) {
      float* dst = p.dkv + (g.b * n + g.k_lo + kt0 + rr) * p.dkv_row + part * width + g.h * D + ct0 + cc;
      add4(dst,
           make_float4(mine[rr * 16 + cc], mine[rr * 16 + cc + 1], mine[rr * 16 + cc + 2], mine[rr * 16 + cc + 3]));
      add4(dst + 4,
           make_float4(mine[rr * 16 + cc + 4], mine[rr * 16 + cc + 5], mine[rr * 16 + cc + 6], mine[rr * 16 + cc + 7]));
    }
    __syncwarp();
  };
  constexpr int CT = D / 16;
  // Key-side products: dV = P^T dO and (below) dK = dS^T Q, a warp per key
  // row tile, all D / 16 column tiles.
  auto key_side = [&](const T* right, int part) {
    for (int kt0 = warp * 16; kt0 < g.kt; kt0 += kWarps * 16) {
      Acc<T> acc[CT];
#pragma unroll
      for (int u = 0; u < CT; ++u) wmma::fill_fragment(acc[u], 0.f);
#pragma unroll
      for (int s = 0; s < BQ / KS; ++s) {
        Operand<T, wmma::matrix_a, wmma::col_major, SPLIT> a;
        a.load(P + s * KS * ldP + kt0, ldP);
#pragma unroll
        for (int u = 0; u < CT; ++u) {
          Operand<T, wmma::matrix_b, wmma::row_major, SPLIT> bf;
          bf.load(right + s * KS * LDT + u * 16, LDT);
          mma(acc[u], a, bf);
        }
      }
#pragma unroll
      for (int u = 0; u < CT; ++u) {
        wmma::store_matrix_sync(mine, acc[u], 16, wmma::mem_row_major);
        add_tile(part, kt0, u * 16);
      }
    }
  };
  key_side(dos, 1);
  __syncthreads();

  // dP = dO V^T tile by tile, turned at once into the scores' gradient
  // dS = P (dP - sum(dO * O)) * scale in the probabilities' place (16-bit
  // types: P recomputed in float32 from the score tile).
  {
    RowTile<T, D, SPLIT> df;
    df.load(dos + rt * 16 * LDT, LDT);
    RowTile<T, D, SPLIT> qf;
    if constexpr (!kF32) qf.load(qs + rt * 16 * LDT, LDT);
    for (int ct = warp & 1; ct < g.kt / 16; ct += 2) {
      Acc<T> c;
      df.times_t(c, vs, LDT, ct);
      wmma::store_matrix_sync(mine, c, 16, wmma::mem_row_major);
      __syncwarp();
      if constexpr (kF32) {
        for (int e = lane; e < 256; e += 32) {
          const int i = rt * 16 + e / 16, col = ct * 16 + e % 16;
          S[i * ldP + col] *= (mine[e] - drow[i]) * p.scale;
        }
      } else {
        float dp[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) dp[k] = mine[lane + 32 * k];
        __syncwarp();
        qf.times_t(c, ks, LDT, ct);
        wmma::store_matrix_sync(mine, c, 16, wmma::mem_row_major);
        __syncwarp();
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          const int e = lane + 32 * k, i = rt * 16 + e / 16, col = ct * 16 + e % 16;
          P[i * ldP + col] = from_float<T>(prob(i, col, mine[e]) * (dp[k] - drow[i]) * p.scale);
        }
      }
      __syncwarp();
    }
  }
  __syncthreads();

  // dQ = dS K: a row tile and D / 32 column tiles a warp, written into the
  // projection's gradient.
  {
    constexpr int TPW = D / 32;
    Acc<T> o[TPW];
    tile_times<T, TPW, SPLIT>(o, P + rt * 16 * ldP, ldP, ks, LDT, g.kt / KS, (warp & 1) * TPW);
    T* dqkv = static_cast<T*>(p.dqkv);
#pragma unroll
    for (int u = 0; u < TPW; ++u) {
      wmma::store_matrix_sync(mine, o[u], 16, wmma::mem_row_major);
      __syncwarp();
      const int rr = lane >> 1, cc = (lane & 1) * 8;
      const int r = rt * 16 + rr;
      if (r < q_valid) {
        float v[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = mine[rr * 16 + cc + e];
        store8(dqkv + (g.b * n + g.q0 + r) * 3 * width + g.h * D + ((warp & 1) * TPW + u) * 16 + cc, v);
      }
      __syncwarp();
    }
  }
  key_side(qs, 0);
}

template <typename T, int D, bool SPLIT>
__global__ void __launch_bounds__(kThreads, sizeof(T) == 4 ? 1 : 2)
    band_backward_kernel(BandAttentionParams p, int kt_max) {
  extern __shared__ __align__(128) unsigned char smem[];
  band_backward_body<T, D, SPLIT>(p, kt_max, block_band(p), smem);
}

// dqkv's k and v parts (batch, n, 3, heads, d) from the float32 sums
// (batch, n, 2, heads, d); v's with the blind queries' share, (their
// gradients' sums over windows w - fwd .. w + back) / span. Float32 sums made
// in dqkv itself (DIRECT) take only the share, where it is not zero.
template <typename T, bool DIRECT>
__global__ void band_finish_kernel(BandAttentionParams p) {
  const int64_t chunks = p.d / 8, width = p.heads * p.d, parts = DIRECT ? 1 : 2;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= p.batch * p.n * parts * p.heads * chunks) return;
  const int64_t c = (i % chunks) * 8, h = (i / chunks) % p.heads, part = DIRECT ? 1 : (i / (chunks * p.heads)) % 2,
                row = i / (chunks * p.heads * parts);
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  bool any = false;
  if (part == 1 && p.blind_sums) {
    const int64_t windows = ceil_div(p.n, p.ws), bb = row / p.n, w = (row % p.n) / p.ws;
    const float span = static_cast<float>((p.back + p.fwd + 1) * p.ws);
    sum_windows(p.blind_sums, bb, windows, width, h * p.d + c, w - p.fwd, w + p.back, 0.f, acc);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      acc[e] /= span;
      any = any || acc[e] != 0.f;
    }
  }
  T* dst = static_cast<T*>(p.dqkv) + (row * 3 + part + 1) * width + h * p.d + c;
  if (DIRECT && !any) return;
  const float* src = DIRECT ? reinterpret_cast<const float*>(dst) : p.dkv + (row * 2 + part) * width + h * p.d + c;
  const float4 a = reinterpret_cast<const float4*>(src)[0], b = reinterpret_cast<const float4*>(src)[1];
  float v[8] = {a.x + acc[0], a.y + acc[1], a.z + acc[2], a.w + acc[3],
                b.x + acc[4], b.y + acc[5], b.z + acc[6], b.w + acc[7]};
  store8(dst, v);
}

// The register-tile kernels' helpers (window_tile_*).

// Whether block qb of row b (queries qb * 64 ..) is listed (a hidden key in its band).
__device__ __forceinline__ bool listed(const uint8_t* flags, int64_t per_row, int64_t b, int64_t qb) {
  return flags[b * per_row + qb] != 0;
}

// Whether window u of row b holds a listed block.
__device__ __forceinline__ bool window_listed(const BandAttentionParams& p, const uint8_t* flags, int64_t b,
                                              int64_t u) {
  const int64_t per_row = ceil_div(p.n, BQ), t0 = u * p.ws;
  const int64_t t1 = (u + 1) * p.ws < p.n ? (u + 1) * p.ws : p.n;
  for (int64_t qb = t0 / BQ; qb <= (t1 - 1) / BQ; ++qb)
    if (listed(flags, per_row, b, qb)) return true;
  return false;
}

// One thread per (row, block of 64 queries): listed when its band holds a
// hidden key of the sequence (only a listed block can hold a blind query).
__global__ void tile_list_kernel(BandAttentionParams p, uint8_t* flags) {
  const int64_t per_row = ceil_div(p.n, BQ);
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= p.batch * per_row) return;
  const Band g = band_at(p, i / per_row, 0, (i % per_row) * BQ);
  const bool* m = p.mask + g.b * p.n + g.k_lo;
  bool hidden = false;
  for (int c = 0; c < g.nk && !hidden; ++c) hidden = !m[c];
  flags[i] = hidden;
}

// sums[b, u] (float32, heads * d) for window u: forward, the sum of v over its
// rows, where a blind query may need it (a listed block in windows u - fwd ..
// u + back), else left unwritten; backward, the sum of gy over its blind rows
// (in listed blocks, the band's log-sum-exp +inf), zeros where the window has
// no listed block, and wflags[b, u] = whether it has. One block per (b, u).
template <typename T, bool BACKWARD>
__global__ void blind_window_sums_kernel(BandAttentionParams p, const uint8_t* __restrict__ flags,
                                         const T* __restrict__ src, int64_t row_stride, float* __restrict__ sums,
                                         uint8_t* __restrict__ wflags) {
  const int64_t windows = ceil_div(p.n, p.ws), width = p.heads * p.d, per_row = ceil_div(p.n, BQ);
  const int64_t b = blockIdx.x / windows, u = blockIdx.x % windows;
  bool needed = false;
  if (BACKWARD) {
    needed = window_listed(p, flags, b, u);
    if (threadIdx.x == 0) wflags[blockIdx.x] = needed;
  } else {
    for (int64_t w = u - p.fwd; w <= u + p.back && !needed; ++w)
      needed = w >= 0 && w < windows && window_listed(p, flags, b, w);
    if (!needed) return;
  }
  const int64_t t0 = u * p.ws, t1 = t0 + p.ws < p.n ? t0 + p.ws : p.n;
  for (int64_t col = threadIdx.x; col < width; col += blockDim.x) {
    float acc = 0.f;
    if (needed) {
      for (int64_t t = t0; t < t1; ++t) {
        if (BACKWARD && !(listed(flags, per_row, b, t / BQ) && p.lse[b * p.heads * p.n + t] == INFINITY)) continue;
        acc += to_float(src[(b * p.n + t) * row_stride + col]);
      }
    }
    sums[blockIdx.x * width + col] = acc;
  }
}

// The forward on register tiles (16-bit types, heads of 32 or 64): every
// block of 64 queries of one (sequence, head), 4 warps of 16 queries each, the
// band's keys and values in shared memory (cp.async), the scores in mma.sync
// accumulators, a running maximum and sum over tiles of 64 keys (base 2), the
// probabilities handed to the values' product as operand fragments. Writes y
// and the log-sum-exp (+inf for a blind query, which takes its look-around's
// mean from v_sums).
constexpr int kMmaWarps = BQ / 16;
constexpr int kKeyTile = 64;

template <int D>
constexpr int mma_ld() {
  return D + 8;  // 16-bit rows 16 bytes apart in banks: ldmatrix without conflicts
}

__host__ __device__ inline int key_rows(int kt_max) { return (kt_max + kKeyTile - 1) / kKeyTile * kKeyTile; }

// `count` rows of D elements into shared memory (LD elements apart) by the
// block's NT threads: the first `valid` copied (cp.async) from `src` (row 0's
// first element, rows `stride` elements apart), zeros after.
template <int D, int LD, int NT, typename T>
__device__ __forceinline__ void load_tile_rows(T* dst, const T* src, int64_t stride, int valid, int count) {
  for (int i = threadIdx.x; i < count * (D / 8); i += NT) {
    const int r = i / (D / 8), c = (i % (D / 8)) * 8;
    if (r < valid)
      mma16::cp_async16(dst + r * LD + c, src + r * stride + c);
    else
      *reinterpret_cast<uint4*>(dst + r * LD + c) = make_uint4(0, 0, 0, 0);
  }
}

template <typename T, int D>
size_t mma_forward_smem(int kt_max) {
  return static_cast<size_t>(BQ + 2 * key_rows(kt_max)) * mma_ld<D>() * sizeof(T) + key_rows(kt_max);
}

template <typename T, int D>
__global__ void __launch_bounds__(kMmaWarps * 32) band_forward_mma_kernel(BandAttentionParams p, int kt_max) {
  using namespace mma16;
  constexpr int NT = kMmaWarps * 32, LD = mma_ld<D>(), KS = D / 16, DT = D / 8;
  extern __shared__ float4 smem4[];
  T* Qs = reinterpret_cast<T*>(smem4);
  T* Ks = Qs + BQ * LD;
  T* Vs = Ks + key_rows(kt_max) * LD;
  unsigned char* key_ok = reinterpret_cast<unsigned char*>(Vs + key_rows(kt_max) * LD);

  const Band g = block_band(p);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, t4 = lane & 3;
  const int64_t n = p.n, width = p.heads * D;
  const int q_valid = static_cast<int>(n - g.q0 < BQ ? n - g.q0 : BQ);
  const int tiles = (g.nk + kKeyTile - 1) / kKeyTile, rows = tiles * kKeyTile;

  const T* qkv = static_cast<const T*>(p.qkv);
  // Row t's part (q, k, v: 0, 1, 2) of this head.
  auto part_row = [&](int part, int64_t t) { return qkv + (g.b * n + t) * 3 * width + (part * p.heads + g.h) * D; };
  load_tile_rows<D, LD, NT>(Qs, part_row(0, g.q0), 3 * width, q_valid, BQ);
  load_tile_rows<D, LD, NT>(Ks, part_row(1, g.k_lo), 3 * width, g.nk, rows);
  load_tile_rows<D, LD, NT>(Vs, part_row(2, g.k_lo), 3 * width, g.nk, rows);
  cp_commit();
  for (int c = tid; c < rows; c += NT) key_ok[c] = c < g.nk && (!p.mask || p.mask[g.b * n + g.k_lo + c]);
  cp_wait<0>();
  __syncthreads();

  unsigned qa[KS][4];
  load_a(qa, Qs + 16 * warp * LD, LD, lane);

  float o[DT][4];
#pragma unroll
  for (int d = 0; d < DT; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
  float mrow[2] = {-INFINITY, -INFINITY}, lrow[2] = {0.f, 0.f};
  const float kmul = p.scale * kLog2e;
  const int64_t t_row = g.q0 + 16 * warp + (lane >> 2);  // this lane's rows: t_row and t_row + 8

  for (int t = 0; t < tiles; ++t) {
    const T* Kt = Ks + t * kKeyTile * LD;
    const T* Vt = Vs + t * kKeyTile * LD;
    float s[kKeyTile / 8][4];
    times_rows_t(s, qa, Kt, LD, lane);
    // Logits in base 2 where the key is visible to the query, else -inf.
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < kKeyTile / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int kk = t * kKeyTile + 8 * nt + 2 * t4 + (e & 1);
        const int64_t qi = t_row + 8 * (e >> 1), j = g.k_lo + kk;
        const bool vis = key_ok[kk] && qi < n && j >= qi - g.reach_back && j <= qi + g.reach_fwd;
        const float v = vis ? s[nt][e] * kmul : -INFINITY;
        s[nt][e] = v;
        mx[e >> 1] = fmaxf(mx[e >> 1], v);
      }
    }
    float base[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
      const float m_new = fmaxf(mrow[i], mx[i]);
      base[i] = m_new == -INFINITY ? 0.f : m_new;  // no visible key yet: nothing to rescale
      const float corr = exp2f(mrow[i] - base[i]);
      mrow[i] = m_new;
      lrow[i] *= corr;
#pragma unroll
      for (int d = 0; d < DT; ++d) {
        o[d][2 * i] *= corr;
        o[d][2 * i + 1] *= corr;
      }
    }
#pragma unroll
    for (int nt = 0; nt < kKeyTile / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float pv = exp2f(s[nt][e] - base[e >> 1]);
        lrow[e >> 1] += pv;
        s[nt][e] = pv;
      }
    }
    add_times_rows(o, s, Vt, LD, lane);
  }

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    lrow[i] += __shfl_xor_sync(0xffffffffu, lrow[i], 1);
    lrow[i] += __shfl_xor_sync(0xffffffffu, lrow[i], 2);
  }
  T* y = static_cast<T*>(p.y);
  const int64_t windows = ceil_div(n, p.ws);
  const float span = static_cast<float>((p.back + p.fwd + 1) * p.ws);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t qi = t_row + 8 * i;
    if (qi >= n) continue;
    const bool blind = mrow[i] == -INFINITY;
    T* row = y + (g.b * n + qi) * width + g.h * D;
    if (!blind) {
      const float inv = 1.f / lrow[i];
#pragma unroll
      for (int d = 0; d < DT; ++d)
        *reinterpret_cast<unsigned*>(row + 8 * d + 2 * t4) = pack2<T>(o[d][2 * i] * inv, o[d][2 * i + 1] * inv);
    } else {
      // The look-around's mean: windows w - back .. w + fwd (-1 per slot
      // beyond an end) over the span.
      const int64_t w = qi / p.ws;
#pragma unroll
      for (int d = 0; d < DT; ++d) {
        const int64_t col = g.h * D + 8 * d + 2 * t4;
        float m0 = 0.f, m1 = 0.f;
        for (int64_t u = w - p.back; u <= w + p.fwd; ++u) {
          if (u < 0 || u >= windows) {
            m0 -= static_cast<float>(p.ws);
            m1 -= static_cast<float>(p.ws);
          } else {
            m0 += p.v_sums[(g.b * windows + u) * width + col];
            m1 += p.v_sums[(g.b * windows + u) * width + col + 1];
          }
        }
        *reinterpret_cast<unsigned*>(row + 8 * d + 2 * t4) = pack2<T>(m0 / span, m1 / span);
      }
    }
    if (t4 == 0) p.lse[(g.b * p.heads + g.h) * n + qi] = blind ? INFINITY : mrow[i] * kLn2 + logf(lrow[i]);
  }
}

// The backward on register tiles (16-bit types, heads of 32 or 64), no
// atomics and no float32 buffer: each gradient row is written once, straight
// into the projection's gradient. Two kinds of block alternate along x, both
// 4 warps of 16 rows over one (sequence, head):
//   query block (even x): queries q0 .. q0 + 63 over their band of keys;
//     dq = dS k, where P = exp(s - lse), dP = dO v^T and dS = P (dP - D) *
//     scale with D = sum(dO * O) per query.
//   key block (odd x): keys j0 .. j0 + 63 over the queries that may see them
//     (j0 - reach_fwd .. j0 + 63 + reach_back); the same P and dS transposed
//     (k q^T, v dO^T), dv = P^T dO and dk = dS^T q; where a window of the
//     key's look-around holds blind queries (wflags), v's share of their
//     look-around mean is added from blind_sums.
// The rows a block owns (its 64) sit in shared memory beside the band's (up
// to key_rows(kt_max)), with each query's log-sum-exp (base 2) and D, and the
// keys' mask. The band is taken in tiles of 64: both score products in
// accumulators, P and dS formed in place, then handed to the two (one for a
// query block) products as operand fragments.
// D = sum(dO * O) of every (sequence, head, query) into dots (batch, heads,
// n): a thread per 8 elements, D / 8 adjacent lanes a row's head.
template <typename T, int D>
__global__ void row_dots_kernel(BandAttentionParams p, float* __restrict__ dots) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t total = p.batch * p.n * p.heads * (D / 8), width = p.heads * D;
  float acc = 0.f;
  if (i < total) {  // lanes past the end add zeros (every lane takes part in the shuffles)
    union {
      uint4 raw;
      T e[8];
    } gv, yv;
    gv.raw = *reinterpret_cast<const uint4*>(static_cast<const T*>(p.gy) + i * 8);
    yv.raw = *reinterpret_cast<const uint4*>(static_cast<const T*>(p.y_in) + i * 8);
#pragma unroll
    for (int e = 0; e < 8; ++e) acc += to_float(gv.e[e]) * to_float(yv.e[e]);
  }
#pragma unroll
  for (int o = D / 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (i < total && i % (D / 8) == 0) {
    const int64_t row = i * 8 / width, h = (i * 8 % width) / D;
    dots[((row / p.n) * p.heads + h) * p.n + row % p.n] = acc;
  }
}

template <typename T, int D>
size_t mma_backward_smem(int kt_max) {
  const size_t band = key_rows(kt_max);
  return (2 * BQ + 2 * band) * mma_ld<D>() * sizeof(T) + 2 * band * sizeof(float) + band;
}

template <typename T, int D>
__global__ void __launch_bounds__(kMmaWarps * 32)
    band_backward_mma_kernel(BandAttentionParams p, const uint8_t* __restrict__ wflags, const float* __restrict__ dots,
                             int kt_max) {
  using namespace mma16;
  constexpr int NT = kMmaWarps * 32, LD = mma_ld<D>(), KS = D / 16, DT = D / 8;
  extern __shared__ float4 smem4[];
  const int band_max = key_rows(kt_max);
  T* own0 = reinterpret_cast<T*>(smem4);                          // q (query block) or k (key block)
  T* own1 = own0 + BQ * LD;                                       // dO or v
  T* band0 = own1 + BQ * LD;                                      // k or q
  T* band1 = band0 + band_max * LD;                               // v or dO
  float* lse2 = reinterpret_cast<float*>(band1 + band_max * LD);  // per query
  float* drow = lse2 + band_max;
  unsigned char* key_ok = reinterpret_cast<unsigned char*>(drow + band_max);

  const bool keys = blockIdx.x & 1;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, t4 = lane & 3;
  const int64_t n = p.n, width = p.heads * D, b = blockIdx.z, h = blockIdx.y;
  const int64_t first = static_cast<int64_t>(blockIdx.x >> 1) * BQ;
  const int64_t reach_back = p.ws * p.back, reach_fwd = p.causal ? 0 : p.ws * p.fwd;
  const int own_valid = static_cast<int>(n - first < BQ ? n - first : BQ);
  // The band: keys reach_back before to reach_fwd after the queries, or
  // queries reach_fwd before to reach_back after the keys.
  const int64_t before = keys ? reach_fwd : reach_back, after = keys ? reach_back : reach_fwd;
  const int64_t lo = first - before > 0 ? first - before : 0;
  const int64_t hi = first + BQ + after < n ? first + BQ + after : n;
  const int band_valid = static_cast<int>(hi - lo);
  const int tiles = (band_valid + kKeyTile - 1) / kKeyTile, rows = tiles * kKeyTile;

  const T* qkv = static_cast<const T*>(p.qkv);
  const T* gy = static_cast<const T*>(p.gy);
  // Row t's part (q, k, v: 0, 1, 2) of this head, and its output gradient.
  auto part_row = [&](int part, int64_t t) { return qkv + (b * n + t) * 3 * width + (part * p.heads + h) * D; };
  auto gy_at = [&](int64_t t) { return gy + (b * n + t) * width + h * D; };
  if (!keys) {
    load_tile_rows<D, LD, NT>(own0, part_row(0, first), 3 * width, own_valid, BQ);
    load_tile_rows<D, LD, NT>(own1, gy_at(first), width, own_valid, BQ);
    load_tile_rows<D, LD, NT>(band0, part_row(1, lo), 3 * width, band_valid, rows);
    load_tile_rows<D, LD, NT>(band1, part_row(2, lo), 3 * width, band_valid, rows);
  } else {
    load_tile_rows<D, LD, NT>(own0, part_row(1, first), 3 * width, own_valid, BQ);
    load_tile_rows<D, LD, NT>(own1, part_row(2, first), 3 * width, own_valid, BQ);
    load_tile_rows<D, LD, NT>(band0, part_row(0, lo), 3 * width, band_valid, rows);
    load_tile_rows<D, LD, NT>(band1, gy_at(lo), width, band_valid, rows);
  }
  cp_commit();

  // Each query's log-sum-exp (base 2; +inf past the end or blind: no
  // gradient through the attention) and D (row_dots_kernel).
  const int64_t q_first = keys ? lo : first;
  const int q_rows = keys ? rows : BQ, q_valid = keys ? band_valid : own_valid;
  for (int r = tid; r < q_rows; r += NT) {
    float l = INFINITY, dd = 0.f;
    if (r < q_valid) {
      const int64_t at = (b * p.heads + h) * n + q_first + r;
      l = p.lse[at];
      dd = dots[at];
    }
    lse2[r] = l * kLog2e;
    drow[r] = dd;
  }
  const int64_t k_first = keys ? first : lo;
  const int k_rows = keys ? BQ : rows, k_valid = keys ? own_valid : band_valid;
  for (int c = tid; c < k_rows; c += NT) key_ok[c] = c < k_valid && (!p.mask || p.mask[b * n + k_first + c]);
  cp_wait<0>();
  __syncthreads();

  unsigned a0[KS][4], a1[KS][4];
  load_a(a0, own0 + 16 * warp * LD, LD, lane);
  load_a(a1, own1 + 16 * warp * LD, LD, lane);
  float acc0[DT][4], acc1[DT][4];  // dq, or dk and dv
#pragma unroll
  for (int d = 0; d < DT; ++d)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc0[d][e] = acc1[d][e] = 0.f;
  const float kmul = p.scale * kLog2e;
  const int own_row = 16 * warp + (lane >> 2);  // this lane's rows: own_row and own_row + 8
  // Key row minus query row, from the band's and the block's first rows.
  const int base = static_cast<int>(k_first - q_first), rb = static_cast<int>(reach_back),
            rf = static_cast<int>(reach_fwd);

  for (int t = 0; t < tiles; ++t) {
    const T* B0 = band0 + t * kKeyTile * LD;
    const T* B1 = band1 + t * kKeyTile * LD;
    float s[kKeyTile / 8][4], dp[kKeyTile / 8][4];
    times_rows_t(s, a0, B0, LD, lane);   // q k^T, or k q^T
    times_rows_t(dp, a1, B1, LD, lane);  // dO v^T, or v dO^T
#pragma unroll
    for (int nt = 0; nt < kKeyTile / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = own_row + 8 * (e >> 1), c = t * kKeyTile + 8 * nt + 2 * t4 + (e & 1);
        const int qr = keys ? c : r, kr = keys ? r : c, rel = base + kr - qr;
        // (A query past the end has log-sum-exp +inf: probability 0.)
        const bool vis = key_ok[kr] && rel >= -rb && rel <= rf;
        const float pv = vis ? exp2f(s[nt][e] * kmul - lse2[qr]) : 0.f;
        s[nt][e] = pv;
        dp[nt][e] = pv * (dp[nt][e] - drow[qr]) * p.scale;
      }
    }
    add_times_rows(acc0, dp, B0, LD, lane);           // dq += dS k, or dk += dS^T q
    if (keys) add_times_rows(acc1, s, B1, LD, lane);  // dv += P^T dO
  }

  T* dqkv = static_cast<T*>(p.dqkv);
  const int64_t windows = ceil_div(n, p.ws);
  const float span = static_cast<float>((p.back + p.fwd + 1) * p.ws);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = own_row + 8 * i;
    if (r >= own_valid) continue;
    const int64_t row = b * n + first + r;
    T* dst = dqkv + row * 3 * width + h * D + 2 * t4;
    if (!keys) {
#pragma unroll
      for (int d = 0; d < DT; ++d)
        *reinterpret_cast<unsigned*>(dst + 8 * d) = pack2<T>(acc0[d][2 * i], acc0[d][2 * i + 1]);
      continue;
    }
#pragma unroll
    for (int d = 0; d < DT; ++d)
      *reinterpret_cast<unsigned*>(dst + width + 8 * d) = pack2<T>(acc0[d][2 * i], acc0[d][2 * i + 1]);
    if (wflags) {
      // Blind queries of windows w - fwd .. w + back see this key's window w
      // in their look-around: their gradient's sum over the span.
      const int64_t w = (first + r) / p.ws;
      for (int64_t u = w - p.fwd; u <= w + p.back; ++u) {
        if (u < 0 || u >= windows || !wflags[b * windows + u]) continue;
        const float* sums = p.blind_sums + (b * windows + u) * width + h * D + 2 * t4;
#pragma unroll
        for (int d = 0; d < DT; ++d) {
          acc1[d][2 * i] += sums[8 * d] / span;
          acc1[d][2 * i + 1] += sums[8 * d + 1] / span;
        }
      }
    }
#pragma unroll
    for (int d = 0; d < DT; ++d)
      *reinterpret_cast<unsigned*>(dst + 2 * width + 8 * d) = pack2<T>(acc1[d][2 * i], acc1[d][2 * i + 1]);
  }
}

int keys_max(const BandAttentionParams& p) {
  const int64_t reach = p.ws * p.back + (p.causal ? 0 : p.ws * p.fwd);
  return static_cast<int>((BQ + reach + 15) / 16 * 16);
}

// A kernel's dynamic shared memory limit raised to `bytes` where it is below
// (once per size reached, so that calls inside a CUDA graph capture, after an
// eager call of the same shape, make no attribute calls).
template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes, std::atomic<size_t>& allowed) {
  if (bytes <= allowed.load()) return;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)) == cudaSuccess)
    allowed.store(bytes);
}

template <typename T, int D, bool SPLIT>
void launch(const BandAttentionParams& p, bool backward, cudaStream_t s) {
  static std::atomic<size_t> fwd_allowed{48 * 1024}, bwd_allowed{48 * 1024};
  const int kt_max = keys_max(p);
  const dim3 grid(static_cast<unsigned>(ceil_div(p.n, BQ)), static_cast<unsigned>(p.heads),
                  static_cast<unsigned>(p.batch));
  if (!backward) {
    const size_t bytes = forward_smem<T, D>(kt_max);
    allow_smem(band_forward_kernel<T, D, SPLIT>, bytes, fwd_allowed);
    band_forward_kernel<T, D, SPLIT><<<grid, kThreads, bytes, s>>>(p, kt_max);
  } else {
    const size_t bytes = backward_smem<T, D>(kt_max);
    allow_smem(band_backward_kernel<T, D, SPLIT>, bytes, bwd_allowed);
    band_backward_kernel<T, D, SPLIT><<<grid, kThreads, bytes, s>>>(p, kt_max);
  }
}

template <typename T>
void launch_typed(const BandAttentionParams& p, bool backward, cudaStream_t s) {
  if constexpr (std::is_same<T, float>::value) {
    if (p.tf32) {
      if (p.d == 32) return launch<T, 32, false>(p, backward, s);
      return launch<T, 64, false>(p, backward, s);
    }
    if (p.d == 32) return launch<T, 32, true>(p, backward, s);
    return launch<T, 64, true>(p, backward, s);
  } else {
    if (p.d == 32) return launch<T, 32, false>(p, backward, s);
    return launch<T, 64, false>(p, backward, s);
  }
}

void launch_any(const BandAttentionParams& p, bool backward, cudaStream_t s) {
  if (p.dtype == RowDtype::f32)
    launch_typed<float>(p, backward, s);
  else if (p.dtype == RowDtype::bf16)
    launch_typed<__nv_bfloat16>(p, backward, s);
  else
    launch_typed<__half>(p, backward, s);
}

}  // namespace

bool band_attention_supports(int64_t d, int64_t ws, int64_t back, int64_t fwd, bool causal, RowDtype dtype,
                             int64_t batch, int64_t heads, int device) {
  if (d != 32 && d != 64) return false;
  if (ws < 1 || back < 0 || fwd < 0 || batch < 1 || batch > 65535 || heads < 1 || heads > 65535) return false;
  BandAttentionParams p;
  p.ws = ws;
  p.back = back;
  p.fwd = fwd;
  p.causal = causal;
  if (ws * (back + fwd) > kMaxKeys) return false;
  const int kt_max = keys_max(p);
  if (kt_max > kMaxKeys) return false;
  size_t need = 0;
  if (dtype == RowDtype::f32)
    need = d == 32 ? backward_smem<float, 32>(kt_max) : backward_smem<float, 64>(kt_max);
  else
    need = d == 32 ? backward_smem<__half, 32>(kt_max) : backward_smem<__half, 64>(kt_max);
  int optin = 0;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return need <= static_cast<size_t>(optin);
}

void band_attention_forward_cuda(const BandAttentionParams& p, void* stream) {
  if (p.batch * p.n == 0) return;
  launch_any(p, false, static_cast<cudaStream_t>(stream));
}

void band_attention_backward_cuda(const BandAttentionParams& p, void* stream) {
  if (p.batch * p.n == 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  launch_any(p, true, s);
  const bool direct = p.dkv_row == 3 * p.heads * p.d;
  if (direct && !p.blind_sums) return;
  const int64_t items = p.batch * p.n * (direct ? 1 : 2) * p.heads * (p.d / 8);
  const unsigned blocks = static_cast<unsigned>(ceil_div(items, 256));
  if (direct)
    band_finish_kernel<float, true><<<blocks, 256, 0, s>>>(p);
  else if (p.dtype == RowDtype::f32)
    band_finish_kernel<float, false><<<blocks, 256, 0, s>>>(p);
  else if (p.dtype == RowDtype::bf16)
    band_finish_kernel<__nv_bfloat16, false><<<blocks, 256, 0, s>>>(p);
  else
    band_finish_kernel<__half, false><<<blocks, 256, 0, s>>>(p);
}

void window_tile_list_cuda(const BandAttentionParams& p, uint8_t* flags, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  const int64_t blocks = p.batch * ceil_div(p.n, BQ);
  if (blocks == 0) return;
  if (!p.mask) {  // nothing hidden: nothing listed
    // An error here is left for the caller's launch check.
    (void)cudaMemsetAsync(flags, 0, static_cast<size_t>(blocks), s);
    return;
  }
  tile_list_kernel<<<static_cast<unsigned>(ceil_div(blocks, 256)), 256, 0, s>>>(p, flags);
}

namespace {

template <typename T>
void blind_sums_of(const BandAttentionParams& p, const uint8_t* flags, bool backward, uint8_t* wflags, cudaStream_t s) {
  const int64_t blocks = p.batch * ceil_div(p.n, p.ws), width = p.heads * p.d;
  const int threads = width >= 512 ? 512 : static_cast<int>((width + 31) / 32 * 32);
  if (backward)
    blind_window_sums_kernel<T, true><<<static_cast<unsigned>(blocks), threads, 0, s>>>(
        p, flags, static_cast<const T*>(p.gy), width, const_cast<float*>(p.blind_sums), wflags);
  else
    blind_window_sums_kernel<T, false><<<static_cast<unsigned>(blocks), threads, 0, s>>>(
        p, flags, static_cast<const T*>(p.qkv) + 2 * width, 3 * width, const_cast<float*>(p.v_sums), nullptr);
}

dim3 mma_grid(const BandAttentionParams& p, int kinds) {
  return dim3(static_cast<unsigned>(kinds * ceil_div(p.n, BQ)), static_cast<unsigned>(p.heads),
              static_cast<unsigned>(p.batch));
}

template <typename T, int D>
void tile_forward_typed(const BandAttentionParams& p, const uint8_t* flags, cudaStream_t s) {
  static std::atomic<size_t> allowed{48 * 1024};
  blind_sums_of<T>(p, flags, false, nullptr, s);
  const int kt_max = keys_max(p);
  const size_t bytes = mma_forward_smem<T, D>(kt_max);
  allow_smem(band_forward_mma_kernel<T, D>, bytes, allowed);
  band_forward_mma_kernel<T, D><<<mma_grid(p, 1), kMmaWarps * 32, bytes, s>>>(p, kt_max);
}

template <typename T, int D>
void tile_backward_typed(const BandAttentionParams& p, const uint8_t* flags, uint8_t* wflags, float* dots,
                         cudaStream_t s) {
  static std::atomic<size_t> allowed{48 * 1024};
  // Blind queries exist only under a mask, in listed blocks.
  if (p.mask) blind_sums_of<T>(p, flags, true, wflags, s);
  const int64_t threads = p.batch * p.n * p.heads * (D / 8);
  row_dots_kernel<T, D><<<static_cast<unsigned>(ceil_div(threads, 256)), 256, 0, s>>>(p, dots);
  const int kt_max = keys_max(p);
  const size_t bytes = mma_backward_smem<T, D>(kt_max);
  allow_smem(band_backward_mma_kernel<T, D>, bytes, allowed);
  band_backward_mma_kernel<T, D>
      <<<mma_grid(p, 2), kMmaWarps * 32, bytes, s>>>(p, p.mask ? wflags : nullptr, dots, kt_max);
}

template <typename T>
void tile_width(const BandAttentionParams& p, const uint8_t* flags, uint8_t* wflags, float* dots, bool backward,
                cudaStream_t s) {
  if (backward)
    return p.d == 32 ? tile_backward_typed<T, 32>(p, flags, wflags, dots, s)
                     : tile_backward_typed<T, 64>(p, flags, wflags, dots, s);
  return p.d == 32 ? tile_forward_typed<T, 32>(p, flags, s) : tile_forward_typed<T, 64>(p, flags, s);
}

void tile_any(const BandAttentionParams& p, const uint8_t* flags, uint8_t* wflags, float* dots, bool backward,
              void* stream) {
  if (p.batch * p.n == 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  if (p.dtype == RowDtype::bf16)
    tile_width<__nv_bfloat16>(p, flags, wflags, dots, backward, s);
  else if (p.dtype == RowDtype::f16)
    tile_width<__half>(p, flags, wflags, dots, backward, s);
}

}  // namespace

void window_tile_forward_cuda(const BandAttentionParams& p, const uint8_t* flags, void* stream) {
  tile_any(p, flags, nullptr, nullptr, false, stream);
}

void window_tile_backward_cuda(const BandAttentionParams& p, const uint8_t* flags, uint8_t* wflags, float* dots,
                               void* stream) {
  tile_any(p, flags, wflags, dots, true, stream);
}

}  // namespace kernels
}  // namespace colt5
