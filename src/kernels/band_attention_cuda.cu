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

// The block's place: from its grid position, or in repair mode its share of
// the listed blocks (every head of each), taken in turn. Calls body(band) for
// each, with a barrier after every one (they share the shared memory).
template <typename Body>
__device__ __forceinline__ void for_each_band(const BandAttentionParams& p, Body&& body) {
  if (!p.items) {
    body(band_at(p, blockIdx.z, blockIdx.y, static_cast<int64_t>(blockIdx.x) * BQ));
    return;
  }
  const int64_t per_row = ceil_div(p.n, BQ), total = static_cast<int64_t>(*p.item_count) * p.heads;
  for (int64_t i = blockIdx.x; i < total; i += gridDim.x) {
    const int64_t item = p.items[i / p.heads];
    body(band_at(p, item / per_row, i % p.heads, (item % per_row) * BQ));
    __syncthreads();
  }
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
  for_each_band(p, [&](const Band& g) { band_forward_body<T, D, SPLIT>(p, kt_max, g, smem); });
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
  for_each_band(p, [&](const Band& g) { band_backward_body<T, D, SPLIT>(p, kt_max, g, smem); });
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

// Repair mode's kernels (band_repair_*).

// Whether block qb of row b (queries qb * 64 ..) lies in the repair list.
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
// hidden key of the sequence.
__global__ void repair_list_kernel(BandAttentionParams p, uint8_t* flags, int32_t* items, int32_t* count) {
  const int64_t per_row = ceil_div(p.n, BQ);
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= p.batch * per_row) return;
  const Band g = band_at(p, i / per_row, 0, (i % per_row) * BQ);
  const bool* m = p.mask + g.b * p.n + g.k_lo;
  bool hidden = false;
  for (int c = 0; c < g.nk && !hidden; ++c) hidden = !m[c];
  flags[i] = hidden;
  if (hidden) items[atomicAdd(count, 1)] = static_cast<int32_t>(i);
}

// sums[b, u] (float32, heads * d) for window u: forward, the sum of v over its
// rows, where a blind query may need it (a listed block in windows u - fwd ..
// u + back), else left unwritten; backward, the sum of gy over its blind rows
// (in listed blocks, the band's log-sum-exp +inf), zeros where the window has
// no listed block, and wflags[b, u] = whether it has. One block per (b, u).
template <typename T, bool BACKWARD>
__global__ void repair_window_sums_kernel(BandAttentionParams p, const uint8_t* __restrict__ flags,
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

// Zeros over the rows of every listed block's band in dkv (float32, dkv_row
// per row), a block per listed block in turn.
__global__ void repair_zero_kernel(BandAttentionParams p) {
  const int64_t per_row = ceil_div(p.n, BQ), count = *p.item_count;
  for (int64_t i = blockIdx.x; i < count; i += gridDim.x) {
    const int64_t item = p.items[i];
    const Band g = band_at(p, item / per_row, 0, (item % per_row) * BQ);
    const int64_t quads = p.dkv_row / 4;
    float4* base = reinterpret_cast<float4*>(p.dkv + (g.b * p.n + g.k_lo) * p.dkv_row);
    for (int64_t j = threadIdx.x; j < g.nk * quads; j += blockDim.x) base[j] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
}

// dqkv (batch, n, 3, heads, d) from the flash kernel's dq, dk, dv (batch, n,
// heads, d): q's where the query's block is not listed (a listed block's
// kernel wrote it), k's and v's plus dkv's sums where the key lies in a listed
// block's band, v's plus the blind queries' share where a window of its
// look-around has a listed block. A block takes kCombineRows rows: what
// applies to each row first (shared memory), then 8 elements a thread.
constexpr int kCombineRows = 4;

template <typename T>
__global__ void __launch_bounds__(256)
    repair_combine_kernel(BandAttentionParams p, const uint8_t* __restrict__ flags, const uint8_t* __restrict__ wflags,
                          const T* __restrict__ dq, const T* __restrict__ dk, const T* __restrict__ dv) {
  __shared__ unsigned char row_facts[kCombineRows];  // bit 0: q listed, 1: in a listed band, 2: blind share
  const int64_t rows = p.batch * p.n, row0 = static_cast<int64_t>(blockIdx.x) * kCombineRows;
  const int64_t per_row = ceil_div(p.n, BQ), windows = ceil_div(p.n, p.ws);
  if (threadIdx.x < kCombineRows && row0 + threadIdx.x < rows) {
    const int64_t row = row0 + threadIdx.x, b = row / p.n, t = row % p.n;
    unsigned char f = listed(flags, per_row, b, t / BQ) ? 1 : 0;
    // Listed blocks whose band holds key t: qb * 64 - reach_back <= t < qb *
    // 64 + 64 + reach_fwd.
    const int64_t reach_back = p.ws * p.back, reach_fwd = p.causal ? 0 : p.ws * p.fwd;
    int64_t qb_lo = (t - reach_fwd - BQ) / BQ, qb_hi = (t + reach_back) / BQ;
    qb_lo = qb_lo < 0 ? 0 : qb_lo;
    qb_hi = qb_hi < per_row - 1 ? qb_hi : per_row - 1;
    for (int64_t qb = qb_lo; qb <= qb_hi; ++qb) {
      if (!listed(flags, per_row, b, qb)) continue;
      const Band g = band_at(p, b, 0, qb * BQ);
      if (t >= g.k_lo && t < g.k_lo + g.nk) {
        f |= 2;
        break;
      }
    }
    const int64_t w = t / p.ws;
    for (int64_t u = w - p.fwd; u <= w + p.back; ++u)
      if (u >= 0 && u < windows && wflags[b * windows + u]) f |= 4;
    row_facts[threadIdx.x] = f;
  }
  __syncthreads();
  const int width = static_cast<int>(p.heads * p.d), chunks = width / 8, per = 3 * chunks;
  const float span = static_cast<float>((p.back + p.fwd + 1) * p.ws);
  for (int j = threadIdx.x; j < kCombineRows * per; j += blockDim.x) {
    const int r = j / per, rest = j % per, part = rest / chunks, col = (rest % chunks) * 8;
    const int64_t row = row0 + r;
    if (row >= rows) break;
    const unsigned char f = row_facts[r];
    T* dst = static_cast<T*>(p.dqkv) + (row * 3 + part) * width + col;
    const int64_t at = row * width + col;
    if (part == 0) {
      if (!(f & 1)) *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(dq + at);
      continue;
    }
    union {
      uint4 raw;
      T e[8];
    } in;
    in.raw = *reinterpret_cast<const uint4*>((part == 1 ? dk : dv) + at);
    const bool share = part == 2 && (f & 4);
    if (!(f & 2) && !share) {
      *reinterpret_cast<uint4*>(dst) = in.raw;
      continue;
    }
    float v[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = to_float(in.e[e]);
    if (f & 2) add8(v, p.dkv + row * p.dkv_row + (part - 1) * width + col);
    if (share) {
      const int64_t b = row / p.n, w = (row % p.n) / p.ws;
      float acc[8];
      sum_windows(p.blind_sums, b, windows, width, col, w - p.fwd, w + p.back, 0.f, acc);
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] += acc[e] / span;
    }
    store8(dst, v);
  }
}

// The forward of repair mode on register tiles (16-bit types, heads of 32 or
// 64): every block of 64 queries of one (sequence, head), 4 warps of 16
// queries each, the band's keys and values in shared memory (cp.async), the
// scores in mma.sync accumulators, a running maximum and sum over tiles of 64
// keys (base 2), the probabilities handed to the values' product as operand
// fragments. Writes y, the log-sum-exp (+inf for a blind query, which takes
// its look-around's mean from v_sums) and the flash kernel's log-sum-exp for
// its backward: the same, or +inf in a listed block.
constexpr int kMmaWarps = BQ / 16;
constexpr int kKeyTile = 64;

template <int D>
constexpr int mma_ld() {
  return D + 8;  // 16-bit rows 16 bytes apart in banks: ldmatrix without conflicts
}

__host__ __device__ inline int key_rows(int kt_max) { return (kt_max + kKeyTile - 1) / kKeyTile * kKeyTile; }

template <typename T, int D>
size_t mma_forward_smem(int kt_max) {
  return static_cast<size_t>(BQ + 2 * key_rows(kt_max)) * mma_ld<D>() * sizeof(T) + key_rows(kt_max);
}

template <typename T, int D>
__global__ void __launch_bounds__(kMmaWarps * 32)
    band_forward_mma_kernel(BandAttentionParams p, const uint8_t* __restrict__ flags, int kt_max) {
  using namespace mma16;
  constexpr int NT = kMmaWarps * 32, LD = mma_ld<D>(), KS = D / 16, DT = D / 8;
  extern __shared__ float4 smem4[];
  T* Qs = reinterpret_cast<T*>(smem4);
  T* Ks = Qs + BQ * LD;
  T* Vs = Ks + key_rows(kt_max) * LD;
  unsigned char* key_ok = reinterpret_cast<unsigned char*>(Vs + key_rows(kt_max) * LD);

  const Band g = band_at(p, blockIdx.z, blockIdx.y, static_cast<int64_t>(blockIdx.x) * BQ);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, t4 = lane & 3;
  const int64_t n = p.n, width = p.heads * D;
  const int q_valid = static_cast<int>(n - g.q0 < BQ ? n - g.q0 : BQ);
  const int tiles = (g.nk + kKeyTile - 1) / kKeyTile, rows = tiles * kKeyTile;

  const T* qkv = static_cast<const T*>(p.qkv);
  auto load = [&](T* dst, int part, int64_t first, int valid, int count) {
    for (int i = tid; i < count * (D / 8); i += NT) {
      const int r = i / (D / 8), c = (i % (D / 8)) * 8;
      if (r < valid)
        cp_async16(dst + r * LD + c, qkv + (g.b * n + first + r) * 3 * width + (part * p.heads + g.h) * D + c);
      else
        *reinterpret_cast<uint4*>(dst + r * LD + c) = make_uint4(0, 0, 0, 0);
    }
  };
  load(Qs, 0, g.q0, q_valid, BQ);
  load(Ks, 1, g.k_lo, g.nk, rows);
  load(Vs, 2, g.k_lo, g.nk, rows);
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
  const int64_t windows = ceil_div(n, p.ws), per_row = ceil_div(n, BQ);
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
    if (t4 == 0) {
      const float lse = blind ? INFINITY : mrow[i] * kLn2 + logf(lrow[i]);
      const int64_t at = (g.b * p.heads + g.h) * n + qi;
      p.lse[at] = lse;
      p.flash_lse[at] = flags[g.b * per_row + qi / BQ] ? INFINITY : lse;
    }
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
  // Repair mode: as many blocks as are resident at once (two per
  // multiprocessor), each taking listed blocks in turn.
  const dim3 grid = p.items ? dim3(static_cast<unsigned>(grid_blocks(ceil_div(p.n, BQ) * p.heads * p.batch, 2)))
                            : dim3(static_cast<unsigned>(ceil_div(p.n, BQ)), static_cast<unsigned>(p.heads),
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

void band_repair_list_cuda(const BandAttentionParams& p, uint8_t* flags, int32_t* items, int32_t* count, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  // An error here is left for the caller's launch check.
  (void)cudaMemsetAsync(count, 0, sizeof(int32_t), s);
  const int64_t blocks = p.batch * ceil_div(p.n, BQ);
  if (blocks == 0) return;
  if (!p.mask) {  // nothing hidden: nothing listed
    (void)cudaMemsetAsync(flags, 0, static_cast<size_t>(blocks), s);
    return;
  }
  repair_list_kernel<<<static_cast<unsigned>(ceil_div(blocks, 256)), 256, 0, s>>>(p, flags, items, count);
}

namespace {

template <typename T>
void repair_sums(const BandAttentionParams& p, const uint8_t* flags, bool backward, uint8_t* wflags, cudaStream_t s) {
  const int64_t blocks = p.batch * ceil_div(p.n, p.ws), width = p.heads * p.d;
  const int threads = width >= 512 ? 512 : static_cast<int>((width + 31) / 32 * 32);
  if (backward)
    repair_window_sums_kernel<T, true><<<static_cast<unsigned>(blocks), threads, 0, s>>>(
        p, flags, static_cast<const T*>(p.gy), width, const_cast<float*>(p.blind_sums), wflags);
  else
    repair_window_sums_kernel<T, false><<<static_cast<unsigned>(blocks), threads, 0, s>>>(
        p, flags, static_cast<const T*>(p.qkv) + 2 * width, 3 * width, const_cast<float*>(p.v_sums), nullptr);
}

template <typename T>
void repair_backward_typed(const BandAttentionParams& p, const uint8_t* flags, uint8_t* wflags, const void* dq,
                           const void* dk, const void* dv, cudaStream_t s) {
  repair_sums<T>(p, flags, true, wflags, s);
  repair_zero_kernel<<<static_cast<unsigned>(grid_blocks(p.batch * ceil_div(p.n, BQ), 4)), 256, 0, s>>>(p);
  launch_typed<T>(p, true, s);
  repair_combine_kernel<T><<<static_cast<unsigned>(ceil_div(p.batch * p.n, kCombineRows)), 256, 0, s>>>(
      p, flags, wflags, static_cast<const T*>(dq), static_cast<const T*>(dk), static_cast<const T*>(dv));
}

}  // namespace

namespace {

template <typename T, int D>
void repair_forward_typed(const BandAttentionParams& p, const uint8_t* flags, cudaStream_t s) {
  static std::atomic<size_t> allowed{48 * 1024};
  repair_sums<T>(p, flags, false, nullptr, s);
  const int kt_max = keys_max(p);
  const size_t bytes = mma_forward_smem<T, D>(kt_max);
  allow_smem(band_forward_mma_kernel<T, D>, bytes, allowed);
  const dim3 grid(static_cast<unsigned>(ceil_div(p.n, BQ)), static_cast<unsigned>(p.heads),
                  static_cast<unsigned>(p.batch));
  band_forward_mma_kernel<T, D><<<grid, kMmaWarps * 32, bytes, s>>>(p, flags, kt_max);
}

template <typename T>
void repair_forward_width(const BandAttentionParams& p, const uint8_t* flags, cudaStream_t s) {
  if (p.d == 32)
    repair_forward_typed<T, 32>(p, flags, s);
  else
    repair_forward_typed<T, 64>(p, flags, s);
}

}  // namespace

void band_repair_forward_cuda(const BandAttentionParams& p, const uint8_t* flags, void* stream) {
  if (p.batch * p.n == 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  if (p.dtype == RowDtype::bf16)
    repair_forward_width<__nv_bfloat16>(p, flags, s);
  else if (p.dtype == RowDtype::f16)
    repair_forward_width<__half>(p, flags, s);
}

void band_repair_backward_cuda(const BandAttentionParams& p, const uint8_t* flags, uint8_t* wflags, const void* dq,
                               const void* dk, const void* dv, void* stream) {
  if (p.batch * p.n == 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  if (p.dtype == RowDtype::bf16)
    repair_backward_typed<__nv_bfloat16>(p, flags, wflags, dq, dk, dv, s);
  else if (p.dtype == RowDtype::f16)
    repair_backward_typed<__half>(p, flags, wflags, dq, dk, dv, s);
}

}  // namespace kernels
}  // namespace colt5
