// Attention over gathered keys/values on CUDA, forward and backward, reading
// the keys/values by index from a table of projected rows instead of from a
// materialized gather. Each group g (a routed set: one window's route) has n
// queries per head and attends over 1 + m keys: the route's null key/value,
// then the table rows rows[g, 0..m), whose values (and, when asked, keys) are
// scaled by the routing scores and whose masked entries take no part. The
// table row of one route holds, per head, the key then the value (2 * DH).
//
// float16/bfloat16 with head widths 32, 64 and 128 run the register-tile
// kernels (mma.sync on fragments held in registers; see their section). The
// others: one block of 128 threads per (group, head, tile of 32 queries); keys
// in tiles of 32, loaded in 16-byte pieces one tile ahead of the math; online
// softmax in float32; 16-bit types on tensor cores (WMMA, float32
// accumulation), float32 on CUDA cores. Every backward recomputes the
// probabilities from the saved log-sum-exp and adds the key/value gradients
// into a float32 table gradient with atomics (a table row is shared by every
// group that routed it).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "kernels/coor_descent.h"
#include "kernels/cuda_common.cuh"
#include "kernels/cuda_convert.cuh"
#include "kernels/mma_common.cuh"

namespace colt5 {
namespace kernels {
namespace {

constexpr int kThreads = 128;
constexpr int QT = 32;  // queries per block
constexpr int KT = 32;  // keys per tile

__device__ __forceinline__ float dot4(float4 a, float4 b) { return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w; }

// Shared-memory row stride in floats: a multiple of 4 (float4 rows) that shifts
// consecutive rows by 4 banks.
template <int DH>
constexpr int stride() {
  return DH + 4;
}

// Per-key facts of one tile, staged by the first KT threads: whether the key
// takes part, its score and its table row (-1: the null key).
struct KeyTile {
  float sc[KT];
  int valid[KT];
  int64_t row[KT];
};

struct KeyFacts {
  int valid = 0;
  float sc = 1.f;
  int64_t row = -1;
};

// The facts of key j0 + threadIdx.x (threads below KT).
__device__ __forceinline__ KeyFacts fetch_facts(const GatheredAttentionParams& p, int64_t g, int64_t j0) {
  KeyFacts f;
  const int64_t j = j0 + threadIdx.x;
  f.valid = j <= p.m;
  if (f.valid && j > 0) {
    const int64_t e = g * p.m + (j - 1);
    if (p.mask) f.valid = p.mask[e];
    if (p.scores) f.sc = p.scores[e];
    f.row = p.rows[e];
  }
  return f;
}

__device__ __forceinline__ void put_facts(KeyTile& kt, const KeyFacts& f) {
  kt.valid[threadIdx.x] = f.valid;
  kt.sc[threadIdx.x] = f.sc;
  kt.row[threadIdx.x] = f.row;
}

// One tile's keys and values (one head's 2 * DH elements per key) in 16-byte
// pieces: issue() starts every load of the tile into registers, store()
// writes them to shared memory as float32 (raw, not scaled; zero for keys that
// take no part), so the loads of the next tile overlap this tile's math.
template <typename T, int DH>
struct TileLoader {
  static constexpr int VEC = 16 / sizeof(T);       // elements per piece
  static constexpr int VPR = 2 * DH / VEC;         // pieces per key
  static constexpr int PER = KT * VPR / kThreads;  // pieces per thread
  static_assert(KT * VPR % kThreads == 0, "a tile must split evenly over the threads");
  uint4 buf[PER];

  __device__ __forceinline__ void issue(const KeyTile& kt, const GatheredAttentionParams& p, int64_t h) {
    const uint4* table = static_cast<const uint4*>(p.table);
    const int64_t width = p.heads * VPR;
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      const int v = threadIdx.x + i * kThreads, kj = v / VPR, c = v % VPR;
      const int64_t row = kt.row[kj];
      buf[i] = (kt.valid[kj] && row >= 0) ? __ldg(table + row * width + h * VPR + c) : make_uint4(0, 0, 0, 0);
    }
  }

  // The tile as T (16-bit types), rows of LD elements: pieces copied as they are.
  template <int LD>
  __device__ __forceinline__ void store_raw(const KeyTile& kt, const GatheredAttentionParams& p, int64_t r, int64_t h,
                                            T* Kb, T* Vb) const {
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      const int v = threadIdx.x + i * kThreads, kj = v / VPR, col = (v % VPR) * VEC;
      T* dst = col < DH ? Kb + kj * LD + col : Vb + kj * LD + (col - DH);
      if (kt.valid[kj] && kt.row[kj] < 0) {
        const float* src = p.null_kv + (r * p.heads + h) * 2 * DH + col;
#pragma unroll
        for (int e = 0; e < VEC; ++e) dst[e] = from_float<T>(src[e]);
      } else {
        *reinterpret_cast<uint4*>(dst) = buf[i];
      }
    }
  }

  __device__ __forceinline__ void store(const KeyTile& kt, const GatheredAttentionParams& p, int64_t r, int64_t h,
                                        float* Ks, float* Vs) const {
    constexpr int S = stride<DH>();
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      const int v = threadIdx.x + i * kThreads, kj = v / VPR, col = (v % VPR) * VEC;
      float* dst = col < DH ? Ks + kj * S + col : Vs + kj * S + (col - DH);
      if (kt.valid[kj] && kt.row[kj] < 0) {  // the route's null key/value (float32)
        const float* src = p.null_kv + (r * p.heads + h) * 2 * DH + col;
#pragma unroll
        for (int e = 0; e < VEC; ++e) dst[e] = src[e];
      } else {
        const T* e8 = reinterpret_cast<const T*>(&buf[i]);
#pragma unroll
        for (int e = 0; e < VEC; ++e) dst[e] = to_float<T>(e8[e]);
      }
    }
  }
};

// The key-tile pipeline shared by the kernels: before the loop, tile 0 is in
// shared memory and the facts of tile 1 are staged; each step issues the loads
// of tile t + 1 and the facts of tile t + 2, runs the math of tile t, then
// stores what it loaded. store(loader, facts) writes a loaded tile.
template <typename T, int DH, typename Store, typename Body>
__device__ __forceinline__ void key_tiles(const GatheredAttentionParams& p, int64_t g, int64_t h, KeyTile* kt,
                                          Store&& store, Body&& body) {
  const int64_t tiles = (p.m + KT) / KT;  // keys 0..m: the null key, then m rows
  TileLoader<T, DH> ld;
  if (threadIdx.x < KT) put_facts(kt[0], fetch_facts(p, g, 0));
  __syncthreads();
  ld.issue(kt[0], p, h);
  if (threadIdx.x < KT && tiles > 1) put_facts(kt[1], fetch_facts(p, g, KT));
  store(ld, kt[0]);
  __syncthreads();
  for (int64_t t = 0; t < tiles; ++t) {
    const int cur = t & 1, nxt = cur ^ 1;
    const bool more = t + 1 < tiles, facts_more = t + 2 < tiles;
    if (more) ld.issue(kt[nxt], p, h);
    KeyFacts f;
    if (threadIdx.x < KT && facts_more) f = fetch_facts(p, g, (t + 2) * KT);
    body(kt[cur], t * KT);
    __syncthreads();
    if (more) store(ld, kt[nxt]);
    if (threadIdx.x < KT && facts_more) put_facts(kt[cur], f);
    __syncthreads();
  }
}

// Keys/values as float32 rows of stride<DH>() (the CUDA-core kernels).
template <typename T, int DH, typename Body>
__device__ __forceinline__ void for_each_key_tile(const GatheredAttentionParams& p, int64_t g, int64_t r, int64_t h,
                                                  KeyTile* kt, float* Ks, float* Vs, Body&& body) {
  key_tiles<T, DH>(
      p, g, h, kt, [&](const TileLoader<T, DH>& ld, const KeyTile& k) { ld.store(k, p, r, h, Ks, Vs); }, body);
}

template <typename T, int DH>
__global__ void __launch_bounds__(kThreads) gathered_attention_fwd(GatheredAttentionParams p) {
  constexpr int S = stride<DH>();
  constexpr int C = DH / 16;  // float4 chunks per thread: chunk sub + 4 * i
  extern __shared__ float4 smem4[];
  float* Qs = reinterpret_cast<float*>(smem4);
  float* Ks = Qs + QT * S;
  float* Vs = Ks + KT * S;
  float* Ps = Vs + KT * S;  // [QT][KT + 1]
  KeyTile* kt = reinterpret_cast<KeyTile*>(Ps + QT * (KT + 1));

  const int64_t qtiles = (p.n + QT - 1) / QT;
  const int64_t g = blockIdx.x / qtiles, q0 = (blockIdx.x % qtiles) * QT;
  const int64_t h = blockIdx.y, r = g % p.routes;
  const int tid = threadIdx.x, qi = tid >> 2, sub = tid & 3;
  const int64_t qbase = (g * p.heads + h) * p.n;

  const T* q = static_cast<const T*>(p.q);
  for (int e = tid; e < QT * DH; e += kThreads) {
    const int i = e / DH, d = e % DH;
    Qs[i * S + d] = q0 + i < p.n ? to_float<T>(q[(qbase + q0 + i) * DH + d]) * p.scale : 0.f;
  }

  float m_i = -INFINITY, l_i = 0.f;
  float4 acc[C];
#pragma unroll
  for (int i = 0; i < C; ++i) acc[i] = make_float4(0.f, 0.f, 0.f, 0.f);
  const float4* Q4 = reinterpret_cast<const float4*>(Qs + qi * S);

  for_each_key_tile<T, DH>(p, g, r, h, kt, Ks, Vs, [&](const KeyTile& k, int64_t) {
    float s[KT / 4];
    float mx = -INFINITY;
#pragma unroll
    for (int c = 0; c < KT / 4; ++c) {
      const int kj = sub + 4 * c;
      const float4* K4 = reinterpret_cast<const float4*>(Ks + kj * S);
      float dot = 0.f;
#pragma unroll
      for (int d = 0; d < DH / 4; ++d) dot += dot4(Q4[d], K4[d]);
      if (p.keys_scaled) dot *= k.sc[kj];
      s[c] = k.valid[kj] ? dot : -INFINITY;
      mx = fmaxf(mx, s[c]);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    // The null key is in the first tile and always takes part, so m_new is finite.
    const float m_new = fmaxf(m_i, mx);
    const float corr = __expf(m_i - m_new);
    float psum = 0.f;
#pragma unroll
    for (int c = 0; c < KT / 4; ++c) {
      const int kj = sub + 4 * c;
      const float pv = __expf(s[c] - m_new);
      psum += pv;
      Ps[qi * (KT + 1) + kj] = pv * k.sc[kj];  // the values are scaled by the score
    }
    psum += __shfl_xor_sync(0xffffffffu, psum, 1);
    psum += __shfl_xor_sync(0xffffffffu, psum, 2);
    l_i = l_i * corr + psum;
    m_i = m_new;
#pragma unroll
    for (int i = 0; i < C; ++i) {
      acc[i].x *= corr;
      acc[i].y *= corr;
      acc[i].z *= corr;
      acc[i].w *= corr;
    }
    __syncwarp();
#pragma unroll 4
    for (int kj = 0; kj < KT; ++kj) {
      const float pv = Ps[qi * (KT + 1) + kj];
      const float4* V4 = reinterpret_cast<const float4*>(Vs + kj * S);
#pragma unroll
      for (int i = 0; i < C; ++i) {
        const float4 v = V4[sub + 4 * i];
        acc[i].x += pv * v.x;
        acc[i].y += pv * v.y;
        acc[i].z += pv * v.z;
        acc[i].w += pv * v.w;
      }
    }
  });

  if (q0 + qi < p.n) {
    T* out = static_cast<T*>(p.out) + (qbase + q0 + qi) * DH;
    const float inv = 1.f / l_i;
#pragma unroll
    for (int i = 0; i < C; ++i) {
      const int d = 4 * (sub + 4 * i);
      out[d] = from_float<T>(acc[i].x * inv);
      out[d + 1] = from_float<T>(acc[i].y * inv);
      out[d + 2] = from_float<T>(acc[i].z * inv);
      out[d + 3] = from_float<T>(acc[i].w * inv);
    }
    if (sub == 0) p.lse[qbase + q0 + qi] = m_i + logf(l_i);
  }
}

template <typename T, int DH>
__global__ void __launch_bounds__(kThreads) gathered_attention_bwd(GatheredAttentionParams p) {
  constexpr int S = stride<DH>();
  constexpr int C = DH / 16;
  extern __shared__ float4 smem4[];
  float* Qs = reinterpret_cast<float*>(smem4);  // scaled queries
  float* Gs = Qs + QT * S;                      // output gradients
  float* Ks = Gs + QT * S;
  float* Vs = Ks + KT * S;
  float* Ps = Vs + KT * S;         // [QT][KT + 1] probabilities
  float* Ds = Ps + QT * (KT + 1);  // [QT][KT + 1] logit gradients
  KeyTile* kt = reinterpret_cast<KeyTile*>(Ds + QT * (KT + 1));

  const int64_t qtiles = (p.n + QT - 1) / QT;
  const int64_t g = blockIdx.x / qtiles, q0 = (blockIdx.x % qtiles) * QT;
  const int64_t h = blockIdx.y, r = g % p.routes;
  const int tid = threadIdx.x, qi = tid >> 2, sub = tid & 3;
  const int64_t qbase = (g * p.heads + h) * p.n;
  const bool qvalid = q0 + qi < p.n;

  const T* q = static_cast<const T*>(p.q);
  const T* go = static_cast<const T*>(p.grad_out);
  for (int e = tid; e < QT * DH; e += kThreads) {
    const int i = e / DH, d = e % DH;
    const bool in = q0 + i < p.n;
    Qs[i * S + d] = in ? to_float<T>(q[(qbase + q0 + i) * DH + d]) * p.scale : 0.f;
    Gs[i * S + d] = in ? to_float<T>(go[(qbase + q0 + i) * DH + d]) : 0.f;
  }
  __syncthreads();
  // D = rowsum(dO * O) and the log-sum-exp of this thread's query.
  float Dq = 0.f, lse = 0.f;
  if (qvalid) {
    const T* o = static_cast<const T*>(p.out) + (qbase + q0 + qi) * DH;
#pragma unroll
    for (int i = 0; i < C; ++i) {
      const int d = 4 * (sub + 4 * i);
#pragma unroll
      for (int e = 0; e < 4; ++e) Dq += Gs[qi * S + d + e] * to_float<T>(o[d + e]);
    }
    lse = p.lse[qbase + q0 + qi];
  }
  Dq += __shfl_xor_sync(0xffffffffu, Dq, 1);
  Dq += __shfl_xor_sync(0xffffffffu, Dq, 2);

  float4 dq[C];
#pragma unroll
  for (int i = 0; i < C; ++i) dq[i] = make_float4(0.f, 0.f, 0.f, 0.f);
  const float4* Q4 = reinterpret_cast<const float4*>(Qs + qi * S);
  const float4* G4 = reinterpret_cast<const float4*>(Gs + qi * S);
  const int64_t width = p.heads * 2 * DH;
  const int kk = tid >> 2;  // this thread's key in the key-side sums

  for_each_key_tile<T, DH>(p, g, r, h, kt, Ks, Vs, [&](const KeyTile& k, int64_t j0) {
#pragma unroll
    for (int c = 0; c < KT / 4; ++c) {
      const int kj = sub + 4 * c;
      const float4* K4 = reinterpret_cast<const float4*>(Ks + kj * S);
      const float4* V4 = reinterpret_cast<const float4*>(Vs + kj * S);
      float qk = 0.f, gv = 0.f;
#pragma unroll
      for (int d = 0; d < DH / 4; ++d) {
        qk += dot4(Q4[d], K4[d]);
        gv += dot4(G4[d], V4[d]);
      }
      const float sk = p.keys_scaled ? k.sc[kj] : 1.f;
      const float pr = (qvalid && k.valid[kj]) ? __expf(qk * sk - lse) : 0.f;
      Ps[qi * (KT + 1) + kj] = pr;
      Ds[qi * (KT + 1) + kj] = pr * (gv * k.sc[kj] - Dq);
    }
    __syncthreads();
    // dq += sum_j dS * k'_j (k' = score * k when the keys are scaled).
#pragma unroll 4
    for (int kj = 0; kj < KT; ++kj) {
      const float w = Ds[qi * (KT + 1) + kj] * (p.keys_scaled ? k.sc[kj] : 1.f);
      const float4* K4 = reinterpret_cast<const float4*>(Ks + kj * S);
#pragma unroll
      for (int i = 0; i < C; ++i) {
        const float4 kv = K4[sub + 4 * i];
        dq[i].x += w * kv.x;
        dq[i].y += w * kv.y;
        dq[i].z += w * kv.z;
        dq[i].w += w * kv.w;
      }
    }
    // Key side: the gradients of the key and value as used (v' = score * v,
    // k' = score * k or k), summed over this block's queries.
    float4 gvp[C], gkp[C];
#pragma unroll
    for (int i = 0; i < C; ++i) {
      gvp[i] = make_float4(0.f, 0.f, 0.f, 0.f);
      gkp[i] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll 4
    for (int i2 = 0; i2 < QT; ++i2) {
      const float pr = Ps[i2 * (KT + 1) + kk], ds = Ds[i2 * (KT + 1) + kk];
      const float4* Gq = reinterpret_cast<const float4*>(Gs + i2 * S);
      const float4* Qq = reinterpret_cast<const float4*>(Qs + i2 * S);
#pragma unroll
      for (int i = 0; i < C; ++i) {
        const float4 gg = Gq[sub + 4 * i], qq = Qq[sub + 4 * i];
        gvp[i].x += pr * gg.x;
        gvp[i].y += pr * gg.y;
        gvp[i].z += pr * gg.z;
        gvp[i].w += pr * gg.w;
        gkp[i].x += ds * qq.x;
        gkp[i].y += ds * qq.y;
        gkp[i].z += ds * qq.z;
        gkp[i].w += ds * qq.w;
      }
    }
    const int64_t j = j0 + kk;
    const float sc = k.sc[kk];
    const float sk = p.keys_scaled ? sc : 1.f;
    float dsc = 0.f;
    const float4* K4 = reinterpret_cast<const float4*>(Ks + kk * S);
    const float4* V4 = reinterpret_cast<const float4*>(Vs + kk * S);
#pragma unroll
    for (int i = 0; i < C; ++i) {
      dsc += dot4(gvp[i], V4[sub + 4 * i]);
      if (p.keys_scaled) dsc += dot4(gkp[i], K4[sub + 4 * i]);
    }
    dsc += __shfl_xor_sync(0xffffffffu, dsc, 1);
    dsc += __shfl_xor_sync(0xffffffffu, dsc, 2);
    if (k.valid[kk]) {
      if (sub == 0 && j > 0 && p.grad_scores) atomicAdd(p.grad_scores + g * p.m + (j - 1), dsc);
      const int64_t row = k.row[kk];
      float* dst = row < 0 ? p.grad_null + r * width + h * 2 * DH : p.grad_table + row * width + h * 2 * DH;
#pragma unroll
      for (int i = 0; i < C; ++i) {
        const int d = 4 * (sub + 4 * i);
        add4(dst + d, make_float4(sk * gkp[i].x, sk * gkp[i].y, sk * gkp[i].z, sk * gkp[i].w));
        add4(dst + DH + d, make_float4(sc * gvp[i].x, sc * gvp[i].y, sc * gvp[i].z, sc * gvp[i].w));
      }
    }
  });

  if (qvalid) {
    float* out = p.grad_q + (qbase + q0 + qi) * DH;
#pragma unroll
    for (int i = 0; i < C; ++i) {
      const int d = 4 * (sub + 4 * i);
      out[d] = dq[i].x * p.scale;
      out[d + 1] = dq[i].y * p.scale;
      out[d + 2] = dq[i].z * p.scale;
      out[d + 3] = dq[i].w * p.scale;
    }
  }
}

// ------------------------------------------------ tensor-core kernels (16-bit)
//
// The same attention for float16/bfloat16 with the matrix products on tensor
// cores (WMMA 16x16x16, float32 accumulation): queries, keys, values and the
// probabilities in T, logits, outputs and gradients in float32. Four warps
// share each product's 16x16 tiles; the softmax and the per-key sums are done
// by threads on shared memory.

namespace wmma = nvcuda::wmma;

// Shared-memory arrays at 128-byte boundaries (WMMA needs 32-byte aligned tiles).
template <typename U>
__device__ __forceinline__ U* carve(char*& at, int count) {
  U* out = reinterpret_cast<U*>(at);
  at += (static_cast<size_t>(count) * sizeof(U) + 127) / 128 * 128;
  return out;
}
template <typename U>
constexpr size_t carved(int count) {
  return (static_cast<size_t>(count) * sizeof(U) + 127) / 128 * 128;
}

template <int DH>
struct TcLayout {
  static constexpr int LH = DH + 8;  // 16-bit rows of a head width
  static constexpr int LK = KT + 8;  // 16-bit rows of a key tile
  static constexpr int LS = KT + 4;  // float rows of a key tile
  static constexpr int LO = DH + 4;  // float rows of a head width
};

using FragAcc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
template <typename T, typename Layout>
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, Layout>;
template <typename T, typename Layout>
using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, Layout>;

// c (+)= A B over `steps` 16-wide steps; a(ks) and b(ks) give each step's tiles.
template <typename T, typename LA, typename LB, typename PA, typename PB>
__device__ __forceinline__ void mma_steps(FragAcc& c, int steps, PA&& a, int lda, PB&& b, int ldb) {
  FragA<T, LA> fa;
  FragB<T, LB> fb;
  for (int ks = 0; ks < steps; ++ks) {
    wmma::load_matrix_sync(fa, a(ks), lda);
    wmma::load_matrix_sync(fb, b(ks), ldb);
    wmma::mma_sync(c, fa, fb, c);
  }
}

template <typename T, int DH>
constexpr size_t fwd_tc_smem() {
  using L = TcLayout<DH>;
  return carved<T>(QT * L::LH) + 2 * carved<T>(KT * L::LH) + carved<float>(QT * L::LS) + carved<T>(QT * L::LK) +
         carved<float>(QT * L::LO) + carved<KeyTile>(2);
}

template <typename T, int DH>
__global__ void __launch_bounds__(kThreads) gathered_attention_fwd_tc(GatheredAttentionParams p) {
  using L = TcLayout<DH>;
  constexpr int LH = L::LH, LK = L::LK, LS = L::LS, LO = L::LO;
  extern __shared__ float4 smem4[];
  char* at = reinterpret_cast<char*>(smem4);
  T* Qb = carve<T>(at, QT * LH);
  T* Kb = carve<T>(at, KT * LH);
  T* Vb = carve<T>(at, KT * LH);
  float* Sf = carve<float>(at, QT * LS);
  T* Pb = carve<T>(at, QT * LK);
  float* Of = carve<float>(at, QT * LO);
  KeyTile* kt = carve<KeyTile>(at, 2);

  const int64_t qtiles = (p.n + QT - 1) / QT;
  const int64_t g = blockIdx.x / qtiles, q0 = (blockIdx.x % qtiles) * QT;
  const int64_t h = blockIdx.y, r = g % p.routes;
  const int tid = threadIdx.x, qi = tid >> 2, sub = tid & 3, warp = tid >> 5;
  const int64_t qbase = (g * p.heads + h) * p.n;

  const T* q = static_cast<const T*>(p.q);
  for (int e = tid; e < QT * DH; e += kThreads) {
    const int i = e / DH, d = e % DH;
    Qb[i * LH + d] = q0 + i < p.n ? q[(qbase + q0 + i) * DH + d] : from_float<T>(0.f);
  }
  for (int e = tid; e < QT * LO; e += kThreads) Of[e] = 0.f;

  float m_i = -INFINITY, l_i = 0.f;
  key_tiles<T, DH>(
      p, g, h, kt,
      [&](const TileLoader<T, DH>& ld, const KeyTile& k) { ld.template store_raw<LH>(k, p, r, h, Kb, Vb); },
      [&](const KeyTile& k, int64_t) {
        {  // S = Q K^T: warp w takes the 16x16 tile (w / 2, w % 2)
          const int tr = warp >> 1, tc = warp & 1;
          FragAcc c;
          wmma::fill_fragment(c, 0.f);
          mma_steps<T, wmma::row_major, wmma::col_major>(
              c, DH / 16, [&](int ks) { return Qb + tr * 16 * LH + ks * 16; }, LH,
              [&](int ks) { return Kb + tc * 16 * LH + ks * 16; }, LH);
          wmma::store_matrix_sync(Sf + tr * 16 * LS + tc * 16, c, LS, wmma::mem_row_major);
        }
        __syncthreads();
        float s[KT / 4];
        float mx = -INFINITY;
#pragma unroll
        for (int c = 0; c < KT / 4; ++c) {
          const int kj = sub * (KT / 4) + c;
          const float v = Sf[qi * LS + kj] * p.scale * (p.keys_scaled ? k.sc[kj] : 1.f);
          s[c] = k.valid[kj] ? v : -INFINITY;
          mx = fmaxf(mx, s[c]);
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m_i, mx);  // finite: the null key is in the first tile
        const float corr = __expf(m_i - m_new);
        float psum = 0.f;
#pragma unroll
        for (int c = 0; c < KT / 4; ++c) {
          const int kj = sub * (KT / 4) + c;
          const float pv = __expf(s[c] - m_new);
          psum += pv;
          Pb[qi * LK + kj] = from_float<T>(pv * k.sc[kj]);  // the values are scaled by the score
        }
        psum += __shfl_xor_sync(0xffffffffu, psum, 1);
        psum += __shfl_xor_sync(0xffffffffu, psum, 2);
        l_i = l_i * corr + psum;
        m_i = m_new;
        for (int d = sub * (DH / 4); d < (sub + 1) * (DH / 4); ++d) Of[qi * LO + d] *= corr;
        __syncthreads();
        // O += P V: 2 x DH/16 output tiles over the warps.
        for (int t = warp; t < 2 * (DH / 16); t += 4) {
          const int tr = t / (DH / 16), tc = t % (DH / 16);
          FragAcc c;
          wmma::load_matrix_sync(c, Of + tr * 16 * LO + tc * 16, LO, wmma::mem_row_major);
          mma_steps<T, wmma::row_major, wmma::row_major>(
              c, KT / 16, [&](int ks) { return Pb + tr * 16 * LK + ks * 16; }, LK,
              [&](int ks) { return Vb + ks * 16 * LH + tc * 16; }, LH);
          wmma::store_matrix_sync(Of + tr * 16 * LO + tc * 16, c, LO, wmma::mem_row_major);
        }
      });

  if (q0 + qi < p.n) {
    T* out = static_cast<T*>(p.out) + (qbase + q0 + qi) * DH;
    const float inv = 1.f / l_i;
    for (int d = sub * (DH / 4); d < (sub + 1) * (DH / 4); ++d) out[d] = from_float<T>(Of[qi * LO + d] * inv);
    if (sub == 0) p.lse[qbase + q0 + qi] = m_i + logf(l_i);
  }
}

template <typename T, int DH>
constexpr size_t bwd_tc_smem() {
  using L = TcLayout<DH>;
  return 2 * carved<T>(QT * L::LH) + 2 * carved<T>(KT * L::LH) + 2 * carved<float>(QT * L::LS) +
         3 * carved<T>(QT * L::LK) + carved<float>(QT * L::LO) + 2 * carved<float>(KT * L::LO) + carved<KeyTile>(2);
}

template <typename T, int DH>
__global__ void __launch_bounds__(kThreads) gathered_attention_bwd_tc(GatheredAttentionParams p) {
  using L = TcLayout<DH>;
  constexpr int LH = L::LH, LK = L::LK, LS = L::LS, LO = L::LO;
  constexpr int NT = DH / 16;  // 16-wide tiles across a head
  extern __shared__ float4 smem4[];
  char* at = reinterpret_cast<char*>(smem4);
  T* Qb = carve<T>(at, QT * LH);  // queries (unscaled)
  T* Gb = carve<T>(at, QT * LH);  // output gradients
  T* Kb = carve<T>(at, KT * LH);
  T* Vb = carve<T>(at, KT * LH);
  float* Sf = carve<float>(at, QT * LS);  // Q K^T
  float* Df = carve<float>(at, QT * LS);  // dO V^T
  T* Pb = carve<T>(at, QT * LK);          // probabilities
  T* Db = carve<T>(at, QT * LK);          // logit gradients
  T* Dkb = carve<T>(at, QT * LK);         // logit gradients times the key scores
  float* dQf = carve<float>(at, QT * LO);
  float* GVf = carve<float>(at, KT * LO);  // P^T dO
  float* DKf = carve<float>(at, KT * LO);  // dS^T Q
  KeyTile* kt = carve<KeyTile>(at, 2);

  const int64_t qtiles = (p.n + QT - 1) / QT;
  const int64_t g = blockIdx.x / qtiles, q0 = (blockIdx.x % qtiles) * QT;
  const int64_t h = blockIdx.y, r = g % p.routes;
  const int tid = threadIdx.x, qi = tid >> 2, sub = tid & 3, warp = tid >> 5;
  const int64_t qbase = (g * p.heads + h) * p.n;
  const bool qvalid = q0 + qi < p.n;

  const T* q = static_cast<const T*>(p.q);
  const T* go = static_cast<const T*>(p.grad_out);
  for (int e = tid; e < QT * DH; e += kThreads) {
    const int i = e / DH, d = e % DH;
    const bool in = q0 + i < p.n;
    Qb[i * LH + d] = in ? q[(qbase + q0 + i) * DH + d] : from_float<T>(0.f);
    Gb[i * LH + d] = in ? go[(qbase + q0 + i) * DH + d] : from_float<T>(0.f);
  }
  for (int e = tid; e < QT * LO; e += kThreads) dQf[e] = 0.f;
  float Dq = 0.f, lse = 0.f;
  if (qvalid) {
    const T* o = static_cast<const T*>(p.out) + (qbase + q0 + qi) * DH;
    const T* gr = go + (qbase + q0 + qi) * DH;
    for (int d = sub * (DH / 4); d < (sub + 1) * (DH / 4); ++d) Dq += to_float<T>(gr[d]) * to_float<T>(o[d]);
    lse = p.lse[qbase + q0 + qi];
  }
  Dq += __shfl_xor_sync(0xffffffffu, Dq, 1);
  Dq += __shfl_xor_sync(0xffffffffu, Dq, 2);
  const int64_t width = p.heads * 2 * DH;
  const int kk = tid >> 2;  // this thread's key in the per-key sums

  key_tiles<T, DH>(
      p, g, h, kt,
      [&](const TileLoader<T, DH>& ld, const KeyTile& k) { ld.template store_raw<LH>(k, p, r, h, Kb, Vb); },
      [&](const KeyTile& k, int64_t j0) {
        // S = Q K^T and dP = dO V^T: 8 tiles of 16x16, two per warp.
        for (int t = warp; t < 8; t += 4) {
          const bool dp = t >= 4;
          const int tr = (t & 3) >> 1, tc = t & 1;
          const T* A = dp ? Gb : Qb;
          const T* B = dp ? Vb : Kb;
          FragAcc c;
          wmma::fill_fragment(c, 0.f);
          mma_steps<T, wmma::row_major, wmma::col_major>(
              c, DH / 16, [&](int ks) { return A + tr * 16 * LH + ks * 16; }, LH,
              [&](int ks) { return B + tc * 16 * LH + ks * 16; }, LH);
          wmma::store_matrix_sync((dp ? Df : Sf) + tr * 16 * LS + tc * 16, c, LS, wmma::mem_row_major);
        }
        __syncthreads();
#pragma unroll
        for (int c = 0; c < KT / 4; ++c) {
          const int kj = sub * (KT / 4) + c;
          const float sk = p.keys_scaled ? k.sc[kj] : 1.f;
          const float pr = (qvalid && k.valid[kj]) ? __expf(Sf[qi * LS + kj] * p.scale * sk - lse) : 0.f;
          const float ds = pr * (Df[qi * LS + kj] * k.sc[kj] - Dq);
          Pb[qi * LK + kj] = from_float<T>(pr);
          Db[qi * LK + kj] = from_float<T>(ds);
          Dkb[qi * LK + kj] = from_float<T>(ds * sk);
        }
        __syncthreads();
        // dQ += (dS * sk) K; P^T dO; dS^T Q: 6 x NT tiles over the warps.
        for (int t = warp; t < 6 * NT; t += 4) {
          const int kind = t / (2 * NT), rem = t % (2 * NT), tr = rem / NT, tc = rem % NT;
          FragAcc c;
          if (kind == 0) {
            wmma::load_matrix_sync(c, dQf + tr * 16 * LO + tc * 16, LO, wmma::mem_row_major);
            mma_steps<T, wmma::row_major, wmma::row_major>(
                c, KT / 16, [&](int ks) { return Dkb + tr * 16 * LK + ks * 16; }, LK,
                [&](int ks) { return Kb + ks * 16 * LH + tc * 16; }, LH);
            wmma::store_matrix_sync(dQf + tr * 16 * LO + tc * 16, c, LO, wmma::mem_row_major);
          } else {
            // rows of keys: A = (P or dS)^T read column-major from the [query][key] tile.
            const T* A = kind == 1 ? Pb : Db;
            const T* B = kind == 1 ? Gb : Qb;
            wmma::fill_fragment(c, 0.f);
            mma_steps<T, wmma::col_major, wmma::row_major>(
                c, QT / 16, [&](int ks) { return A + ks * 16 * LK + tr * 16; }, LK,
                [&](int ks) { return B + ks * 16 * LH + tc * 16; }, LH);
            wmma::store_matrix_sync((kind == 1 ? GVf : DKf) + tr * 16 * LO + tc * 16, c, LO, wmma::mem_row_major);
          }
        }
        __syncthreads();
        // Per key: dv = sc * P^T dO, dk = sk * scale * dS^T Q, and the score's gradient.
        const int64_t j = j0 + kk;
        const float sc = k.sc[kk];
        const float sk = p.keys_scaled ? sc : 1.f;
        float dsc = 0.f;
        const bool valid = k.valid[kk];
        const int64_t row = k.row[kk];
        float* dst = row < 0 ? p.grad_null + r * width + h * 2 * DH : p.grad_table + row * width + h * 2 * DH;
        // The key's four threads take interleaved 16-byte pieces, so each
        // atomic instruction of a warp covers 64 contiguous bytes of a row
        // (two 32-byte sectors) rather than four pieces 64 bytes apart.
        for (int d = sub * 4; d < DH; d += 16) {
          float gv[4], gk[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            gv[e] = GVf[kk * LO + d + e];
            gk[e] = DKf[kk * LO + d + e] * p.scale;
            dsc += gv[e] * to_float<T>(Vb[kk * LH + d + e]);
            if (p.keys_scaled) dsc += gk[e] * to_float<T>(Kb[kk * LH + d + e]);
          }
          if (valid) {
            add4(dst + d, make_float4(sk * gk[0], sk * gk[1], sk * gk[2], sk * gk[3]));
            add4(dst + DH + d, make_float4(sc * gv[0], sc * gv[1], sc * gv[2], sc * gv[3]));
          }
        }
        dsc += __shfl_xor_sync(0xffffffffu, dsc, 1);
        dsc += __shfl_xor_sync(0xffffffffu, dsc, 2);
        if (valid && sub == 0 && j > 0 && p.grad_scores) atomicAdd(p.grad_scores + g * p.m + (j - 1), dsc);
      });

  if (qvalid) {
    float* out = p.grad_q + (qbase + q0 + qi) * DH;
    for (int d = sub * (DH / 4); d < (sub + 1) * (DH / 4); ++d) out[d] = dQf[qi * LO + d] * p.scale;
  }
}

// ------------------------------------------ register-tile kernels (16-bit)
//
// The same attention for float16/bfloat16 with the scores, probabilities and
// accumulators in registers: each warp runs mma.sync m16n8k16 on 16 rows
// (queries forward, keys backward), its operands read from shared memory with
// ldmatrix, the probabilities handed from the scores' accumulator fragments to
// the next product's operand fragments without a round trip through shared
// memory. Keys and values arrive in tiles of 64 by cp.async, the next tile
// loading while the warps work on this one. The forward keeps a running
// maximum and sum (base 2); the backward takes a whole route's queries (up to
// 32) per block and loops over its key tiles, each warp owning 16 keys: their
// gradients go to the float32 table gradient with 8-byte atomics, the query
// gradient stays in registers across the tiles. Head widths 32, 64 and 128.
namespace mma_path {

constexpr int KT = 64;        // keys per tile
constexpr int QN = 32;        // queries per block
constexpr int kFwdWarps = 2;  // 16 queries each
constexpr int kBwdWarps = 4;  // 16 keys of each tile each
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <int DH>
constexpr bool supported() {
  return DH == 32 || DH == 64 || DH == 128;
}

// Per-key facts of a tile: whether the key takes part, its score, and the
// factor on its logits (the softmax scale in base 2, times the score when keys
// are scaled).
struct Facts {
  float kf[KT];
  float sc[KT];
  int valid[KT];
};

using namespace mma16;

// Two float32 atomic additions at p (8-byte aligned), one instruction on sm_90.
__device__ __forceinline__ void add2(float* p, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(p), make_float2(a, b));
#else
  atomicAdd(p, a);
  atomicAdd(p + 1, b);
#endif
}

template <int DH>
constexpr int ld() {
  return DH + 8;  // 16-bit row stride: rows 16 bytes apart in banks, ldmatrix without conflicts
}

// Keys j0 .. j0 + KT - 1 of group g, head h into Ks/Vs (rows of ld<DH>()):
// table rows by cp.async, the route's null key/value converted, zeros for
// keys that take no part (their probabilities are zero, their values must
// not be NaN); the facts of each key beside them. Warp w loads keys
// w * KT / NW ..: each lane reads one key's facts, the warp's lanes take
// their keys' 16-byte pieces in turn with the facts passed by shuffles.
template <typename T, int DH, int NW>
__device__ __forceinline__ void load_tile(const GatheredAttentionParams& p, int64_t g, int64_t h, int64_t r, int64_t j0,
                                          T* Ks, T* Vs, Facts& f, float kmul) {
  constexpr int VEC = 16 / sizeof(T);  // elements per 16-byte piece
  constexpr int PPK = 2 * DH / VEC;    // pieces per key (key, then value)
  constexpr int KPW = KT / NW;         // keys per warp
  constexpr int LD = ld<DH>();
  static_assert(KPW <= 32 && (KPW * PPK) % 32 == 0, "a warp's keys must split evenly over its lanes");
  const int lane = threadIdx.x & 31, k0 = (threadIdx.x >> 5) * KPW;
  const int64_t width = p.heads * 2 * DH;
  const T* table = static_cast<const T*>(p.table);
  int valid = 0;
  long long row = -1;
  if (lane < KPW) {
    const int64_t j = j0 + k0 + lane;
    float sc = 1.f;
    valid = j <= p.m;
    if (valid && j > 0) {
      const int64_t e = g * p.m + (j - 1);
      if (p.mask) valid = p.mask[e];
      if (p.scores) sc = p.scores[e];
      row = p.rows[e];
    }
    f.valid[k0 + lane] = valid;
    f.sc[k0 + lane] = sc;
    f.kf[k0 + lane] = kmul * (p.keys_scaled ? sc : 1.f);
  }
#pragma unroll 4
  for (int c = lane; c < KPW * PPK; c += 32) {
    const int kl = c / PPK, col = (c % PPK) * VEC;
    const int v = __shfl_sync(0xffffffffu, valid, kl);
    const long long rw = __shfl_sync(0xffffffffu, row, kl);
    T* dst = col < DH ? Ks + (k0 + kl) * LD + col : Vs + (k0 + kl) * LD + (col - DH);
    if (v && rw >= 0) {
      cp_async16(dst, table + rw * width + h * 2 * DH + col);
    } else if (v) {  // the route's null key/value (float32)
      const float* src = p.null_kv + (r * p.heads + h) * 2 * DH + col;
#pragma unroll
      for (int e = 0; e < VEC; ++e) dst[e] = from_float<T>(src[e]);
    } else {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
    }
  }
}

template <typename T, int DH>
constexpr size_t fwd_smem() {
  return static_cast<size_t>(QN + 4 * KT) * ld<DH>() * sizeof(T) + 2 * sizeof(Facts);
}

template <typename T, int DH>
__global__ void __launch_bounds__(kFwdWarps * 32) gathered_fwd_mma(GatheredAttentionParams p) {
  constexpr int NT = kFwdWarps * 32, LD = ld<DH>(), KS = DH / 16, DT = DH / 8;
  extern __shared__ float4 smem4[];
  T* Qs = reinterpret_cast<T*>(smem4);
  T* Kb = Qs + QN * LD;      // 2 buffers of KT rows
  T* Vb = Kb + 2 * KT * LD;  // 2 buffers of KT rows
  Facts* F = reinterpret_cast<Facts*>(Vb + 2 * KT * LD);

  const int64_t qtiles = (p.n + QN - 1) / QN;
  const int64_t g = blockIdx.x / qtiles, q0 = (blockIdx.x % qtiles) * QN;
  const int64_t h = blockIdx.y, r = g % p.routes;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t qbase = (g * p.heads + h) * p.n;
  const float kmul = p.scale * kLog2e;

  const T* q = static_cast<const T*>(p.q);
  for (int c = tid; c < QN * DH / 8; c += NT) {
    const int i = c / (DH / 8), col = (c % (DH / 8)) * 8;
    if (q0 + i < p.n)
      cp_async16(Qs + i * LD + col, q + (qbase + q0 + i) * DH + col);
    else
      *reinterpret_cast<uint4*>(Qs + i * LD + col) = make_uint4(0, 0, 0, 0);
  }
  const int64_t tiles = (p.m + KT) / KT;  // keys 0..m: the null key, then m rows
  load_tile<T, DH, NT / 32>(p, g, h, r, 0, Kb, Vb, F[0], kmul);
  cp_commit();
  cp_wait<0>();
  __syncthreads();

  unsigned qa[KS][4];
  load_a(qa, Qs + 16 * warp * LD, LD, lane);

  float o[DT][4];
#pragma unroll
  for (int d = 0; d < DT; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
  float mrow[2] = {-INFINITY, -INFINITY}, lrow[2] = {0.f, 0.f};
  const int t4 = lane & 3;

  for (int64_t t = 0; t < tiles; ++t) {
    const int cur = static_cast<int>(t & 1);
    if (t + 1 < tiles)
      load_tile<T, DH, NT / 32>(p, g, h, r, (t + 1) * KT, Kb + (cur ^ 1) * KT * LD, Vb + (cur ^ 1) * KT * LD,
                                F[cur ^ 1], kmul);
    cp_commit();
    cp_wait<1>();
    __syncthreads();
    const T* Ks = Kb + cur * KT * LD;
    const T* Vs = Vb + cur * KT * LD;
    const Facts& f = F[cur];

    float s[KT / 8][4];
    times_rows_t(s, qa, Ks, LD, lane);
    // Logits in base 2, the running maximum of rows lane / 4 and lane / 4 + 8.
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < KT / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int kk = 8 * nt + 2 * t4 + (e & 1);
        const float v = f.valid[kk] ? s[nt][e] * f.kf[kk] : -INFINITY;
        s[nt][e] = v;
        mx[e >> 1] = fmaxf(mx[e >> 1], v);
      }
    }
    float corr[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
      const float m_new = fmaxf(mrow[i], mx[i]);  // finite: the null key is in the first tile
      corr[i] = exp2f(mrow[i] - m_new);
      mrow[i] = m_new;
      lrow[i] *= corr[i];
    }
#pragma unroll
    for (int nt = 0; nt < KT / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int kk = 8 * nt + 2 * t4 + (e & 1);
        const float pv = exp2f(s[nt][e] - mrow[e >> 1]);
        lrow[e >> 1] += pv;
        s[nt][e] = pv * f.sc[kk];  // the values are scaled by the score
      }
    }
#pragma unroll
    for (int d = 0; d < DT; ++d) {
      o[d][0] *= corr[0];
      o[d][1] *= corr[0];
      o[d][2] *= corr[1];
      o[d][3] *= corr[1];
    }
    // O += P V over the tile's keys, 16 at a time.
    add_times_rows(o, s, Vs, LD, lane);
    __syncthreads();  // the tile's buffers are refilled two steps on
  }

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    lrow[i] += __shfl_xor_sync(0xffffffffu, lrow[i], 1);
    lrow[i] += __shfl_xor_sync(0xffffffffu, lrow[i], 2);
  }
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t qi = q0 + 16 * warp + (lane >> 2) + 8 * i;
    if (qi >= p.n) continue;
    const float inv = 1.f / lrow[i];
    T* row = out + (qbase + qi) * DH;
#pragma unroll
    for (int d = 0; d < DT; ++d) {
      const unsigned v = pack2<T>(o[d][2 * i] * inv, o[d][2 * i + 1] * inv);
      *reinterpret_cast<unsigned*>(row + 8 * d + 2 * t4) = v;
    }
    if (t4 == 0) p.lse[qbase + qi] = mrow[i] * kLn2 + logf(lrow[i]);
  }
}

template <typename T, int DH>
constexpr size_t bwd_smem() {
  return static_cast<size_t>(2 * QN + 4 * KT) * ld<DH>() * sizeof(T) + static_cast<size_t>(KT) * (QN + 8) * sizeof(T) +
         2 * sizeof(Facts) + 2 * QN * sizeof(float);
}

template <typename T, int DH>
__global__ void __launch_bounds__(kBwdWarps * 32) gathered_bwd_mma(GatheredAttentionParams p) {
  constexpr int NT = kBwdWarps * 32, LD = ld<DH>(), LDQ = QN + 8, KS = DH / 16, DT = DH / 8;
  constexpr int QT8 = QN / 8;  // 8-query tiles of a key row
  constexpr int DQ = DH / 2;   // the query gradient's columns per warp
  extern __shared__ float4 smem4[];
  T* Qs = reinterpret_cast<T*>(smem4);
  T* Gs = Qs + QN * LD;  // output gradients
  T* Kb = Gs + QN * LD;  // 2 buffers of KT rows
  T* Vb = Kb + 2 * KT * LD;
  T* Ds = Vb + 2 * KT * LD;  // the tile's logit gradients times the key scores, [key][query]
  Facts* F = reinterpret_cast<Facts*>(Ds + KT * LDQ);
  float* lse2 = reinterpret_cast<float*>(F + 2);  // base-2 log-sum-exp (+inf past n)
  float* Dq = lse2 + QN;                          // dO . O

  const int64_t g = blockIdx.x, h = blockIdx.y, r = g % p.routes;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, t4 = lane & 3;
  const int64_t qbase = (g * p.heads + h) * p.n;
  const float kmul = p.scale * kLog2e;

  const T* q = static_cast<const T*>(p.q);
  const T* go = static_cast<const T*>(p.grad_out);
  for (int c = tid; c < 2 * QN * DH / 8; c += NT) {
    const int which = c / (QN * DH / 8), rem = c % (QN * DH / 8);
    const int i = rem / (DH / 8), col = (rem % (DH / 8)) * 8;
    T* dst = (which ? Gs : Qs) + i * LD + col;
    if (i < p.n)
      cp_async16(dst, (which ? go : q) + (qbase + i) * DH + col);
    else
      *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
  }
  {  // four threads per query: dO . O and the log-sum-exp
    const int i = tid >> 2, sub = tid & 3;
    float d = 0.f;
    if (i < p.n) {
      const T* o = static_cast<const T*>(p.out) + (qbase + i) * DH;
      const T* gr = go + (qbase + i) * DH;
      for (int k = sub * (DH / 4); k < (sub + 1) * (DH / 4); ++k) d += to_float<T>(gr[k]) * to_float<T>(o[k]);
    }
    d += __shfl_xor_sync(0xffffffffu, d, 1);
    d += __shfl_xor_sync(0xffffffffu, d, 2);
    if (sub == 0 && i < QN) {
      Dq[i] = d;
      lse2[i] = i < p.n ? p.lse[qbase + i] * kLog2e : INFINITY;
    }
  }
  const int64_t tiles = (p.m + KT) / KT;
  load_tile<T, DH, NT / 32>(p, g, h, r, 0, Kb, Vb, F[0], kmul);
  cp_commit();

  const int64_t width = p.heads * 2 * DH;
  const int kw = 16 * warp;                                // this warp's keys in each tile
  const int mq = 16 * (warp & 1), dq0 = (warp >> 1) * DQ;  // this warp's block of the query gradient
  float dq[DQ / 8][4];
#pragma unroll
  for (int d = 0; d < DQ / 8; ++d) dq[d][0] = dq[d][1] = dq[d][2] = dq[d][3] = 0.f;

  for (int64_t t = 0; t < tiles; ++t) {
    const int cur = static_cast<int>(t & 1);
    if (t + 1 < tiles)
      load_tile<T, DH, NT / 32>(p, g, h, r, (t + 1) * KT, Kb + (cur ^ 1) * KT * LD, Vb + (cur ^ 1) * KT * LD,
                                F[cur ^ 1], kmul);
    cp_commit();
    cp_wait<1>();
    __syncthreads();
    const T* Ks = Kb + cur * KT * LD;
    const T* Vs = Vb + cur * KT * LD;
    const Facts& f = F[cur];

    // S^T = K Q^T and dP^T = V dO^T for the warp's 16 keys (rows) and every query.
    float st[QT8][4], dp[QT8][4];
#pragma unroll
    for (int nt = 0; nt < QT8; ++nt) {
      st[nt][0] = st[nt][1] = st[nt][2] = st[nt][3] = 0.f;
      dp[nt][0] = dp[nt][1] = dp[nt][2] = dp[nt][3] = 0.f;
    }
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      unsigned ka[4], va[4];
      const int arow = (kw + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + 16 * ks + (lane >> 4) * 8;
      ldsm4(ka, Ks + arow);
      ldsm4(va, Vs + arow);
#pragma unroll
      for (int np = 0; np < QN / 16; ++np) {
        const int brow = (16 * np + (lane & 7) + ((lane >> 4) << 3)) * LD + 16 * ks + ((lane >> 3) & 1) * 8;
        unsigned b[4];
        ldsm4(b, Qs + brow);
        mma<T>(st[2 * np], ka, b[0], b[1]);
        mma<T>(st[2 * np + 1], ka, b[2], b[3]);
        ldsm4(b, Gs + brow);
        mma<T>(dp[2 * np], va, b[0], b[1]);
        mma<T>(dp[2 * np + 1], va, b[2], b[3]);
      }
    }
    // Probabilities, logit gradients and the score's gradient, key rows
    // kw + lane / 4 (i = 0) and kw + lane / 4 + 8 (i = 1).
    float dsc[2] = {0.f, 0.f};
    int kk2[2];
    bool valid2[2];
    float sc2[2], sk2[2], kf2[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      kk2[i] = kw + (lane >> 2) + 8 * i;
      valid2[i] = f.valid[kk2[i]];
      sc2[i] = f.sc[kk2[i]];
      sk2[i] = p.keys_scaled ? sc2[i] : 1.f;
      kf2[i] = f.kf[kk2[i]];
    }
#pragma unroll
    for (int nt = 0; nt < QT8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = e >> 1, qc = 8 * nt + 2 * t4 + (e & 1);
        const float pr = valid2[i] ? exp2f(st[nt][e] * kf2[i] - lse2[qc]) : 0.f;
        const float ds = pr * (dp[nt][e] * sc2[i] - Dq[qc]);
        dsc[i] += pr * dp[nt][e] + (p.keys_scaled ? ds * st[nt][e] * p.scale : 0.f);
        st[nt][e] = pr * sc2[i];  // for v's gradient
        dp[nt][e] = ds * sk2[i];  // for k's and q's
      }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      dsc[i] += __shfl_xor_sync(0xffffffffu, dsc[i], 1);
      dsc[i] += __shfl_xor_sync(0xffffffffu, dsc[i], 2);
      const int64_t j = t * KT + kk2[i];
      if (t4 == 0 && valid2[i] && j > 0 && p.grad_scores) atomicAdd(p.grad_scores + g * p.m + (j - 1), dsc[i]);
    }
    // The logit gradients, transposed through shared memory for q's gradient.
#pragma unroll
    for (int nt = 0; nt < QT8; ++nt) {
#pragma unroll
      for (int i = 0; i < 2; ++i)
        *reinterpret_cast<unsigned*>(Ds + kk2[i] * LDQ + 8 * nt + 2 * t4) = pack2<T>(dp[nt][2 * i], dp[nt][2 * i + 1]);
    }
    // dV = (P * sc)^T-rows times dO, then dK = (dS * sk) times Q, for the
    // warp's 16 keys; each added into the key's table row (or the null row).
    float* dst[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int64_t j = t * KT + kk2[i];
      int64_t row = -1;
      if (valid2[i] && j > 0) row = p.rows[g * p.m + (j - 1)];
      dst[i] = row < 0 ? p.grad_null + r * width + h * 2 * DH : p.grad_table + row * width + h * 2 * DH;
    }
#pragma unroll
    for (int pass = 0; pass < 2; ++pass) {  // 0: values, 1: keys
      float acc[DT][4];
#pragma unroll
      for (int d = 0; d < DT; ++d) acc[d][0] = acc[d][1] = acc[d][2] = acc[d][3] = 0.f;
      add_times_rows(acc, pass == 0 ? st : dp, pass == 0 ? Gs : Qs, LD, lane);
      const float mul = pass == 0 ? 1.f : p.scale;
      const int off = pass == 0 ? DH : 0;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        if (!valid2[i]) continue;
#pragma unroll
        for (int d = 0; d < DT; ++d) add2(dst[i] + off + 8 * d + 2 * t4, acc[d][2 * i] * mul, acc[d][2 * i + 1] * mul);
      }
    }
    __syncthreads();  // the logit gradients are in Ds
                      // dQ += dS^T-columns times K: the warp's 16 queries and DH / 2 columns.
#pragma unroll
    for (int kq = 0; kq < KT / 16; ++kq) {
      unsigned a[4];
      ldsm4_t(a, Ds + (16 * kq + (lane & 7) + (lane >> 4) * 8) * LDQ + mq + ((lane >> 3) & 1) * 8);
#pragma unroll
      for (int c = 0; c < DQ / 16; ++c) {
        unsigned b[4];
        ldsm4_t(b, Ks + (16 * kq + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + dq0 + 16 * c + (lane >> 4) * 8);
        mma<T>(dq[2 * c], a, b[0], b[1]);
        mma<T>(dq[2 * c + 1], a, b[2], b[3]);
      }
    }
    __syncthreads();  // Ds and the tile's buffers are rewritten next
  }

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t qi = mq + (lane >> 2) + 8 * i;
    if (qi >= p.n) continue;
    float* out = p.grad_q + (qbase + qi) * DH + dq0;
#pragma unroll
    for (int d = 0; d < DQ / 8; ++d)
      *reinterpret_cast<float2*>(out + 8 * d + 2 * t4) =
          make_float2(dq[d][2 * i] * p.scale, dq[d][2 * i + 1] * p.scale);
  }
}

// ------------------------------------------------ backward in pairs of groups
// Two groups A and B whose key sets overlap (consecutive windows): one block
// walks A's keys, then B's keys that A does not hold. For each key tile both
// groups' 32 queries take their turn; the key's and value's gradients of the
// two are summed in registers and added to the table once.
constexpr int PQ = 2 * QN;  // queries of a pair

struct PairFacts {
  float kf[2][KT];
  float sc[2][KT];
  int valid[2][KT];
  long long gs[2][KT];  // the group's score entry, -1: none (the null key)
  long long row[KT];    // table row; -1: the null row; -2: nothing loaded
};

template <typename T, int DH, int NW>
__device__ __forceinline__ void load_pair_tile(const GatheredAttentionParams& p, int64_t pr, int64_t ga, int64_t gb,
                                               int64_t h, int64_t t, int64_t tiles_a, T* Ks, T* Vs, PairFacts& f,
                                               float kmul) {
  constexpr int VEC = 16 / sizeof(T);
  constexpr int PPK = 2 * DH / VEC;
  constexpr int KPW = KT / NW;
  constexpr int LD = ld<DH>();
  static_assert(KPW <= 32 && (KPW * PPK) % 32 == 0, "a warp's keys must split evenly over its lanes");
  const int lane = threadIdx.x & 31, k0 = (threadIdx.x >> 5) * KPW;
  const int64_t width = p.heads * 2 * DH;
  const T* table = static_cast<const T*>(p.table);
  long long row = -2;
  if (lane < KPW) {
    const int kk = k0 + lane;
    int va = 0, vb = 0;
    float sa = 1.f, sb = 1.f;
    long long ia = -1, ib = -1;
    if (t < tiles_a) {
      const int64_t j = t * KT + kk;
      if (j == 0) {  // the null key, shared by both
        va = 1;
        vb = gb >= 0;
        row = -1;
      } else if (j <= p.m) {
        const int64_t e = ga * p.m + (j - 1);
        va = p.mask ? static_cast<int>(p.mask[e]) : 1;
        if (va) {
          if (p.scores) sa = p.scores[e];
          ia = e;
          row = p.rows[e];
          const int s = gb >= 0 ? p.pair_slot[pr * p.m + (j - 1)] : -1;
          if (s >= 0) {
            const int64_t eb = gb * p.m + s;
            vb = 1;
            if (p.scores) sb = p.scores[eb];
            ib = eb;
          }
        }
      }
    } else {
      const int64_t e = (t - tiles_a) * KT + kk;
      if (gb >= 0 && e < p.pair_extra_count[pr]) {
        const int64_t eb = gb * p.m + p.pair_extra[pr * p.m + e];
        vb = 1;
        if (p.scores) sb = p.scores[eb];
        ib = eb;
        row = p.rows[eb];
      }
    }
    f.valid[0][kk] = va;
    f.valid[1][kk] = vb;
    f.sc[0][kk] = sa;
    f.sc[1][kk] = sb;
    f.kf[0][kk] = kmul * (p.keys_scaled ? sa : 1.f);
    f.kf[1][kk] = kmul * (p.keys_scaled ? sb : 1.f);
    f.gs[0][kk] = ia;
    f.gs[1][kk] = ib;
    f.row[kk] = row;
  }
#pragma unroll 4
  for (int c = lane; c < KPW * PPK; c += 32) {
    const int kl = c / PPK, col = (c % PPK) * VEC;
    const long long rw = __shfl_sync(0xffffffffu, row, kl);
    T* dst = col < DH ? Ks + (k0 + kl) * LD + col : Vs + (k0 + kl) * LD + (col - DH);
    if (rw >= 0) {
      cp_async16(dst, table + rw * width + h * 2 * DH + col);
    } else if (rw == -1) {  // the null key/value of the (one) route
      const float* src = p.null_kv + h * 2 * DH + col;
#pragma unroll
      for (int e = 0; e < VEC; ++e) dst[e] = from_float<T>(src[e]);
    } else {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
    }
  }
}

template <typename T, int DH>
constexpr size_t pair_bwd_smem() {
  return static_cast<size_t>(2 * PQ + 4 * KT) * ld<DH>() * sizeof(T) + static_cast<size_t>(KT) * (PQ + 8) * sizeof(T) +
         2 * sizeof(PairFacts) + 2 * PQ * sizeof(float);
}

template <typename T, int DH>
__global__ void __launch_bounds__(kBwdWarps * 32) gathered_bwd_pair_mma(GatheredAttentionParams p) {
  constexpr int NT = kBwdWarps * 32, LD = ld<DH>(), LDQ = PQ + 8, KS = DH / 16, DT = DH / 8;
  constexpr int QT8 = QN / 8;  // 8-query tiles of one group's key row
  static_assert(NT == 2 * PQ, "two threads per query of a pair");
  extern __shared__ float4 smem4[];
  T* Qs = reinterpret_cast<T*>(smem4);  // A's queries, then B's
  T* Gs = Qs + PQ * LD;                 // their output gradients
  T* Kb = Gs + PQ * LD;                 // 2 buffers of KT rows
  T* Vb = Kb + 2 * KT * LD;
  T* Ds = Vb + 2 * KT * LD;  // logit gradients times the key scores, [key][query of the pair]
  PairFacts* F = reinterpret_cast<PairFacts*>(Ds + KT * LDQ);
  float* lse2 = reinterpret_cast<float*>(F + 2);
  float* Dq = lse2 + PQ;

  const int64_t pr = blockIdx.x, h = blockIdx.y;
  const int64_t ga = p.pair_a[pr], gb = p.pair_b[pr];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, t4 = lane & 3;
  const float kmul = p.scale * kLog2e;
  auto qrow = [&](int i) -> int64_t {  // query i of the pair: its row, or -1
    const int64_t g = i < QN ? ga : gb;
    const int qi = i % QN;
    return g >= 0 && qi < p.n ? (g * p.heads + h) * p.n + qi : -1;
  };

  const T* q = static_cast<const T*>(p.q);
  const T* go = static_cast<const T*>(p.grad_out);
  for (int c = tid; c < 2 * PQ * DH / 8; c += NT) {
    const int which = c / (PQ * DH / 8), rem = c % (PQ * DH / 8);
    const int i = rem / (DH / 8), col = (rem % (DH / 8)) * 8;
    T* dst = (which ? Gs : Qs) + i * LD + col;
    const int64_t qr = qrow(i);
    if (qr >= 0)
      cp_async16(dst, (which ? go : q) + qr * DH + col);
    else
      *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
  }
  {  // two threads per query: dO . O and the log-sum-exp
    const int i = tid >> 1, sub = tid & 1;
    const int64_t qr = qrow(i);
    float d = 0.f;
    if (qr >= 0) {
      const T* o = static_cast<const T*>(p.out) + qr * DH;
      const T* gr = go + qr * DH;
      for (int k = sub * (DH / 2); k < (sub + 1) * (DH / 2); ++k) d += to_float<T>(gr[k]) * to_float<T>(o[k]);
    }
    d += __shfl_xor_sync(0xffffffffu, d, 1);
    if (sub == 0) {
      Dq[i] = d;
      lse2[i] = qr >= 0 ? p.lse[qr] * kLog2e : INFINITY;
    }
  }
  const int64_t tiles_a = (p.m + KT) / KT;
  const int64_t extra = gb >= 0 ? p.pair_extra_count[pr] : 0;
  const int64_t tiles = tiles_a + (extra + KT - 1) / KT;
  load_pair_tile<T, DH, NT / 32>(p, pr, ga, gb, h, 0, tiles_a, Kb, Vb, F[0], kmul);
  cp_commit();

  const int64_t width = p.heads * 2 * DH;
  const int kw = 16 * warp;  // this warp's keys in each tile
  const int mq = 16 * warp;  // this warp's queries of the pair for q's gradient (every column)
  float dq[DT][4];
#pragma unroll
  for (int d = 0; d < DT; ++d) dq[d][0] = dq[d][1] = dq[d][2] = dq[d][3] = 0.f;

  for (int64_t t = 0; t < tiles; ++t) {
    const int cur = static_cast<int>(t & 1);
    if (t + 1 < tiles)
      load_pair_tile<T, DH, NT / 32>(p, pr, ga, gb, h, t + 1, tiles_a, Kb + (cur ^ 1) * KT * LD,
                                     Vb + (cur ^ 1) * KT * LD, F[cur ^ 1], kmul);
    cp_commit();
    cp_wait<1>();
    __syncthreads();
    const T* Ks = Kb + cur * KT * LD;
    const T* Vs = Vb + cur * KT * LD;
    const PairFacts& f = F[cur];
    int kk2[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) kk2[i] = kw + (lane >> 2) + 8 * i;

    float accv[DT][4], acck[DT][4];
#pragma unroll
    for (int d = 0; d < DT; ++d) {
      accv[d][0] = accv[d][1] = accv[d][2] = accv[d][3] = 0.f;
      acck[d][0] = acck[d][1] = acck[d][2] = acck[d][3] = 0.f;
    }
#pragma unroll
    for (int w = 0; w < 2; ++w) {
      const T* Qw = Qs + w * QN * LD;
      const T* Gw = Gs + w * QN * LD;
      // S^T = K Q^T and dP^T = V dO^T for the warp's 16 keys and the group's queries.
      float st[QT8][4], dp[QT8][4];
#pragma unroll
      for (int nt = 0; nt < QT8; ++nt) {
        st[nt][0] = st[nt][1] = st[nt][2] = st[nt][3] = 0.f;
        dp[nt][0] = dp[nt][1] = dp[nt][2] = dp[nt][3] = 0.f;
      }
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        unsigned ka[4], va[4];
        const int arow = (kw + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + 16 * ks + (lane >> 4) * 8;
        ldsm4(ka, Ks + arow);
        ldsm4(va, Vs + arow);
#pragma unroll
        for (int np = 0; np < QN / 16; ++np) {
          const int brow = (16 * np + (lane & 7) + ((lane >> 4) << 3)) * LD + 16 * ks + ((lane >> 3) & 1) * 8;
          unsigned b[4];
          ldsm4(b, Qw + brow);
          mma<T>(st[2 * np], ka, b[0], b[1]);
          mma<T>(st[2 * np + 1], ka, b[2], b[3]);
          ldsm4(b, Gw + brow);
          mma<T>(dp[2 * np], va, b[0], b[1]);
          mma<T>(dp[2 * np + 1], va, b[2], b[3]);
        }
      }
      float dsc[2] = {0.f, 0.f};
      bool valid2[2];
      float sc2[2], sk2[2], kf2[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        valid2[i] = f.valid[w][kk2[i]];
        sc2[i] = f.sc[w][kk2[i]];
        sk2[i] = p.keys_scaled ? sc2[i] : 1.f;
        kf2[i] = f.kf[w][kk2[i]];
      }
#pragma unroll
      for (int nt = 0; nt < QT8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = e >> 1, qc = w * QN + 8 * nt + 2 * t4 + (e & 1);
          const float pr_ = valid2[i] ? exp2f(st[nt][e] * kf2[i] - lse2[qc]) : 0.f;
          const float ds = pr_ * (dp[nt][e] * sc2[i] - Dq[qc]);
          dsc[i] += pr_ * dp[nt][e] + (p.keys_scaled ? ds * st[nt][e] * p.scale : 0.f);
          st[nt][e] = pr_ * sc2[i];
          dp[nt][e] = ds * sk2[i];
        }
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        dsc[i] += __shfl_xor_sync(0xffffffffu, dsc[i], 1);
        dsc[i] += __shfl_xor_sync(0xffffffffu, dsc[i], 2);
        const long long e = f.gs[w][kk2[i]];
        if (t4 == 0 && valid2[i] && e >= 0 && p.grad_scores) atomicAdd(p.grad_scores + e, dsc[i]);
      }
#pragma unroll
      for (int nt = 0; nt < QT8; ++nt) {
#pragma unroll
        for (int i = 0; i < 2; ++i)
          *reinterpret_cast<unsigned*>(Ds + kk2[i] * LDQ + w * QN + 8 * nt + 2 * t4) =
              pack2<T>(dp[nt][2 * i], dp[nt][2 * i + 1]);
      }
      // dV += (P * sc)^T-rows times dO, dK += (dS * sk) times Q, this group's share.
#pragma unroll
      for (int kq = 0; kq < QN / 16; ++kq) {
        unsigned av[4], ak[4];
        acc_to_a<T>(av, st[2 * kq], st[2 * kq + 1]);
        acc_to_a<T>(ak, dp[2 * kq], dp[2 * kq + 1]);
#pragma unroll
        for (int c = 0; c < DH / 16; ++c) {
          const int boff = (16 * kq + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + 16 * c + (lane >> 4) * 8;
          unsigned b[4];
          ldsm4_t(b, Gw + boff);
          mma<T>(accv[2 * c], av, b[0], b[1]);
          mma<T>(accv[2 * c + 1], av, b[2], b[3]);
          ldsm4_t(b, Qw + boff);
          mma<T>(acck[2 * c], ak, b[0], b[1]);
          mma<T>(acck[2 * c + 1], ak, b[2], b[3]);
        }
      }
    }
    // One addition per key for both groups.
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      if (!f.valid[0][kk2[i]] && !f.valid[1][kk2[i]]) continue;
      const long long row = f.row[kk2[i]];
      float* dst = row < 0 ? p.grad_null + h * 2 * DH : p.grad_table + row * width + h * 2 * DH;
#pragma unroll
      for (int d = 0; d < DT; ++d) {
        add2(dst + DH + 8 * d + 2 * t4, accv[d][2 * i], accv[d][2 * i + 1]);
        add2(dst + 8 * d + 2 * t4, acck[d][2 * i] * p.scale, acck[d][2 * i + 1] * p.scale);
      }
    }
    __syncthreads();  // the logit gradients are in Ds
                      // dQ += dS^T-columns times K: the warp's 16 queries of the pair, every column.
#pragma unroll
    for (int kq = 0; kq < KT / 16; ++kq) {
      unsigned a[4];
      ldsm4_t(a, Ds + (16 * kq + (lane & 7) + (lane >> 4) * 8) * LDQ + mq + ((lane >> 3) & 1) * 8);
#pragma unroll
      for (int c = 0; c < DH / 16; ++c) {
        unsigned b[4];
        ldsm4_t(b, Ks + (16 * kq + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + 16 * c + (lane >> 4) * 8);
        mma<T>(dq[2 * c], a, b[0], b[1]);
        mma<T>(dq[2 * c + 1], a, b[2], b[3]);
      }
    }
    __syncthreads();  // Ds and the tile's buffers are rewritten next
  }

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t qr = qrow(mq + (lane >> 2) + 8 * i);
    if (qr < 0) continue;
    float* out = p.grad_q + qr * DH;
#pragma unroll
    for (int d = 0; d < DT; ++d)
      *reinterpret_cast<float2*>(out + 8 * d + 2 * t4) =
          make_float2(dq[d][2 * i] * p.scale, dq[d][2 * i + 1] * p.scale);
  }
}

}  // namespace mma_path
#undef COLT5_MMA_ASM

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("colt5 CUDA gathered attention: ") + what + ": " + cudaGetErrorString(e));
}

template <int DH>
constexpr size_t fwd_smem() {
  return (QT + 2 * KT) * stride<DH>() * sizeof(float) + QT * (KT + 1) * sizeof(float) + 2 * sizeof(KeyTile);
}
template <int DH>
constexpr size_t bwd_smem() {
  return (2 * QT + 2 * KT) * stride<DH>() * sizeof(float) + 2 * QT * (KT + 1) * sizeof(float) + 2 * sizeof(KeyTile);
}

template <typename K>
void allow_smem(K kernel, size_t smem) {
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
        "cudaFuncSetAttribute");
}

// Whether the register-tile kernels take this call: a device of compute
// capability 8.0 or above, 16-byte aligned rows, and (backward) at most QN
// queries per route. COLT5_GATHERED_WMMA=1 in the environment keeps the WMMA
// kernels (read once per process; for comparisons).
bool mma_path_applies(const GatheredAttentionParams& p, bool backward) {
  static const bool wmma_only = [] {
    const char* v = std::getenv("COLT5_GATHERED_WMMA");
    return v && v[0] == '1';
  }();
  if (wmma_only || (backward && p.n > mma_path::QN)) return false;
  auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  if (!aligned(p.q) || !aligned(p.table) || (backward && !aligned(p.grad_out))) return false;
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess)
    return false;
  return major >= 8;
}

template <typename T, int DH>
void launch(const GatheredAttentionParams& p, bool backward, cudaStream_t st) {
  const int64_t qtiles = (p.n + QT - 1) / QT;
  const dim3 grid(static_cast<unsigned>(p.groups * qtiles), static_cast<unsigned>(p.heads));
  if constexpr (sizeof(T) == 2) {  // float16 / bfloat16: tensor cores
    if constexpr (mma_path::supported<DH>()) {
      if (mma_path_applies(p, backward)) {
        if (!backward) {
          constexpr size_t smem = mma_path::fwd_smem<T, DH>();
          static const bool once = (allow_smem(mma_path::gathered_fwd_mma<T, DH>, smem), true);
          (void)once;
          const dim3 g(static_cast<unsigned>(p.groups * ((p.n + mma_path::QN - 1) / mma_path::QN)),
                       static_cast<unsigned>(p.heads));
          mma_path::gathered_fwd_mma<T, DH><<<g, mma_path::kFwdWarps * 32, smem, st>>>(p);
        } else if (p.pairs > 0) {
          if constexpr (DH <= 64) {
            constexpr size_t smem = mma_path::pair_bwd_smem<T, DH>();
            static const bool once = (allow_smem(mma_path::gathered_bwd_pair_mma<T, DH>, smem), true);
            (void)once;
            const dim3 g(static_cast<unsigned>(p.pairs), static_cast<unsigned>(p.heads));
            mma_path::gathered_bwd_pair_mma<T, DH><<<g, mma_path::kBwdWarps * 32, smem, st>>>(p);
          } else {
            throw std::runtime_error("colt5 CUDA gathered attention: pairs need head width <= 64");
          }
        } else {
          constexpr size_t smem = mma_path::bwd_smem<T, DH>();
          static const bool once = (allow_smem(mma_path::gathered_bwd_mma<T, DH>, smem), true);
          (void)once;
          const dim3 g(static_cast<unsigned>(p.groups), static_cast<unsigned>(p.heads));
          mma_path::gathered_bwd_mma<T, DH><<<g, mma_path::kBwdWarps * 32, smem, st>>>(p);
        }
        check(cudaGetLastError(), backward ? "backward launch" : "forward launch");
        return;
      }
    }
    if (!backward) {
      constexpr size_t smem = fwd_tc_smem<T, DH>();
      static const bool once = (allow_smem(gathered_attention_fwd_tc<T, DH>, smem), true);
      (void)once;
      gathered_attention_fwd_tc<T, DH><<<grid, kThreads, smem, st>>>(p);
    } else {
      constexpr size_t smem = bwd_tc_smem<T, DH>();
      static const bool once = (allow_smem(gathered_attention_bwd_tc<T, DH>, smem), true);
      (void)once;
      gathered_attention_bwd_tc<T, DH><<<grid, kThreads, smem, st>>>(p);
    }
  } else if (!backward) {  // float32: CUDA cores
    constexpr size_t smem = fwd_smem<DH>();
    static const bool once = (allow_smem(gathered_attention_fwd<T, DH>, smem), true);
    (void)once;
    gathered_attention_fwd<T, DH><<<grid, kThreads, smem, st>>>(p);
  } else {  // float32 backward
    constexpr size_t smem = bwd_smem<DH>();
    static const bool once = (allow_smem(gathered_attention_bwd<T, DH>, smem), true);
    (void)once;
    gathered_attention_bwd<T, DH><<<grid, kThreads, smem, st>>>(p);
  }
  check(cudaGetLastError(), backward ? "backward launch" : "forward launch");
}

template <typename T>
void launch_dh(const GatheredAttentionParams& p, bool backward, cudaStream_t st) {
  switch (p.dim_head) {
    case 16:
      return launch<T, 16>(p, backward, st);
    case 32:
      return launch<T, 32>(p, backward, st);
    case 64:
      return launch<T, 64>(p, backward, st);
    case 128:
      return launch<T, 128>(p, backward, st);
    default:
      throw std::runtime_error("colt5 CUDA gathered attention: head width " + std::to_string(p.dim_head) +
                               " is not 16, 32, 64 or 128");
  }
}

void run(const GatheredAttentionParams& p, bool backward, void* stream) {
  if (p.groups == 0 || p.n == 0) return;
  if (p.groups * ((p.n + QT - 1) / QT) > 0x7fffffff || p.heads > 65535)
    throw std::runtime_error("colt5 CUDA gathered attention: too many groups or heads for one launch");
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case RowDtype::f32:
      return launch_dh<float>(p, backward, st);
    case RowDtype::f16:
      return launch_dh<__half>(p, backward, st);
    case RowDtype::bf16:
      return launch_dh<__nv_bfloat16>(p, backward, st);
  }
}

}  // namespace

bool gathered_attention_pairs_supported(int64_t dim_head) { return dim_head == 32 || dim_head == 64; }

bool gathered_attention_supports(int64_t dim_head) {
  return dim_head == 16 || dim_head == 32 || dim_head == 64 || dim_head == 128;
}

void gathered_attention_forward_cuda(const GatheredAttentionParams& p, void* stream) { run(p, false, stream); }

void gathered_attention_backward_cuda(const GatheredAttentionParams& p, void* stream) { run(p, true, stream); }

}  // namespace kernels
}  // namespace colt5
