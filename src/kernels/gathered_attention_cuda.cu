// Attention over gathered keys/values on CUDA, forward and backward, reading
// the keys/values by index from a table of projected rows instead of from a
// materialized gather. Each group g (a routed set: one window's route) has n
// queries per head and attends over 1 + m keys: the route's null key/value,
// then the table rows rows[g, 0..m), whose values (and, when asked, keys) are
// scaled by the routing scores and whose masked entries take no part. The
// table row of one route holds, per head, the key then the value (2 * DH).
//
// One block of 128 threads per (group, head, tile of 32 queries); keys in
// tiles of 32, loaded in 16-byte pieces one tile ahead of the math; online
// softmax in float32. float16/bfloat16 run the matrix products on tensor
// cores (WMMA, float32 accumulation); float32 on CUDA cores. The backward
// recomputes the probabilities from the saved log-sum-exp and adds the
// key/value gradients into a float32 table gradient with atomics (a table row
// is shared by every group that routed it).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels/coor_descent.h"
#include "kernels/cuda_common.cuh"
#include "kernels/cuda_convert.cuh"

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

template <typename T, int DH>
void launch(const GatheredAttentionParams& p, bool backward, cudaStream_t st) {
  const int64_t qtiles = (p.n + QT - 1) / QT;
  const dim3 grid(static_cast<unsigned>(p.groups * qtiles), static_cast<unsigned>(p.heads));
  if constexpr (sizeof(T) == 2) {  // float16 / bfloat16: tensor cores
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
    case 16: return launch<T, 16>(p, backward, st);
    case 32: return launch<T, 32>(p, backward, st);
    case 64: return launch<T, 64>(p, backward, st);
    case 128: return launch<T, 128>(p, backward, st);
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
    case RowDtype::f32: return launch_dh<float>(p, backward, st);
    case RowDtype::f16: return launch_dh<__half>(p, backward, st);
    case RowDtype::bf16: return launch_dh<__nv_bfloat16>(p, backward, st);
  }
}

}  // namespace

bool gathered_attention_supports(int64_t dim_head) {
  return dim_head == 16 || dim_head == 32 || dim_head == 64 || dim_head == 128;
}

void gathered_attention_forward_cuda(const GatheredAttentionParams& p, void* stream) { run(p, false, stream); }

void gathered_attention_backward_cuda(const GatheredAttentionParams& p, void* stream) { run(p, true, stream); }

}  // namespace kernels
}  // namespace colt5
