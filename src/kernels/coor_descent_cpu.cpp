// CPU coordinate descent: one pass over the row per iteration, forward and
// backward, with a branch-free float exponential the compiler vectorizes.
#include "kernels/coor_descent.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(COLT5_NO_CLONES)
// An AVX2 clone next to the baseline one, chosen by CPU features at load time.
#define COLT5_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define COLT5_VECTOR_CLONES
#endif
// Inlined into each clone, so the loops vectorize for the clone's target.
#if defined(__GNUC__)
#define COLT5_ALWAYS_INLINE __attribute__((always_inline))
#else
#define COLT5_ALWAYS_INLINE
#endif
#define COLT5_INLINE inline COLT5_ALWAYS_INLINE

namespace colt5 {
namespace kernels {

double eps_at(double eps_init, double eps, double eps_decay, int64_t t) {
  double e = std::max(eps_init, eps);
  for (int64_t i = 1; i < t; ++i) e = std::max(e * eps_decay, eps);
  return e;
}

namespace {

// Vectors of 8 floats (GCC vector extensions): one AVX register in the AVX2
// clone, two SSE registers in the baseline one.
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef uint8_t u8x8 __attribute__((vector_size(8)));
typedef double f64x8 __attribute__((vector_size(64)));

inline int32_t to_int(float x) { return static_cast<int32_t>(x); }
inline i32x8 to_int(f32x8 x) { return __builtin_convertvector(x, i32x8); }

// exp(x) for x <= 0 in float (a float or a vector of them), relative error
// about 2e-7; x is clamped to [-87, 0] (exp(-87) = 1.6e-38, negligible against
// the 1 of the largest entry). Masked entries are computed too and discarded:
// theirs may be positive or NaN, which the upper clamp (NaN goes to 0) keeps
// out of the integer exponent arithmetic below.
template <typename V>
COLT5_INLINE V exp_nonpos(V x) {
  x = x < -87.0f ? V{} - 87.0f : x;
  x = x < 0.0f ? x : V{};
  const V t = x * 1.44269504088896341f;
  // Round to nearest through the float mantissa (valid for |t| < 2^22).
  const V n = (t + 12582912.0f) - 12582912.0f;
  V r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  using I = decltype(to_int(n));
  const I bits = __builtin_bit_cast(I, p) + to_int(n) * (1 << 23);
  return __builtin_bit_cast(V, bits);
}

template <>
COLT5_INLINE double exp_nonpos(double x) {
  return std::exp(x);
}

template <typename T>
struct RowView {
  const T* s;
  const uint8_t* m;  // nullptr: all kept
  int64_t n;
  bool keep(int64_t i) const { return m == nullptr || m[i] != 0; }
};

// Packs: the element type of the vector loops. A loop body is written once,
// generic over its pack; the wide pack runs the bulk, the scalar one the tail.
template <typename T>
struct ScalarPack {
  using V = T;
  using M = bool;
  static constexpr int W = 1;
  static V load(const T* p) { return *p; }
  static void store(T* p, V v) { *p = v; }
  static M mask(const uint8_t* m) { return *m != 0; }
  static M all() { return true; }
  static double total(V v) { return static_cast<double>(v); }
  static T hmax(V v) { return v; }
  // min(s + a, 0) * inv_eps computed in double.
  static V shifted(V s, double a, double inv_eps) {
    return static_cast<T>(std::min(static_cast<double>(s) + a, 0.0) * inv_eps);
  }
};

struct FloatPack {
  using V = f32x8;
  using M = i32x8;
  static constexpr int W = 8;
  static V load(const float* p) {
    V v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
  }
  static void store(float* p, V v) { __builtin_memcpy(p, &v, sizeof v); }
  static M mask(const uint8_t* m) {
    u8x8 b;
    __builtin_memcpy(&b, m, sizeof b);
    return __builtin_convertvector(b, i32x8) != 0;
  }
  static M all() { return M{} == 0; }
  static double total(V v) {
    float s = 0;
    for (int j = 0; j < W; ++j) s += v[j];
    return s;
  }
  static float hmax(V v) {
    float s = v[0];
    for (int j = 1; j < W; ++j) s = v[j] > s ? v[j] : s;
    return s;
  }
  static V shifted(V s, double a, double inv_eps) {
    f64x8 d = __builtin_convertvector(s, f64x8) + a;
    d = d < 0.0 ? d : f64x8{};
    return __builtin_convertvector(d * inv_eps, f32x8);
  }
};

template <typename T>
struct Wide {
  using type = ScalarPack<T>;
};
template <>
struct Wide<float> {
  using type = FloatPack;
};

template <typename V>
COLT5_INLINE V vmin(V a, V b) {
  return a < b ? a : b;
}

template <typename P, typename kMasked>
COLT5_INLINE typename P::M mask_at(const uint8_t* m, int64_t i) {
  if constexpr (kMasked::value)
    return P::mask(m + i);
  else
    return P::all();
}

// sum over i in [0, n) of body(Pack, i) (a pack of values starting at i):
// sums run in T within chunks of 512 (two accumulators) and in double across
// them, so float32 accuracy does not degrade with the row length.
template <typename T, typename F>
COLT5_INLINE double pack_sum(int64_t n, F&& body) {
  using P = typename Wide<T>::type;
  using S = ScalarPack<T>;
  constexpr int64_t kChunk = 512;  // a multiple of 2 * P::W
  const int64_t bulk = n - n % (2 * P::W);
  double total = 0;
  int64_t i = 0;
  while (i < bulk) {
    const int64_t end = std::min(bulk, i + kChunk);
    typename P::V acc0{}, acc1{};
    for (; i < end; i += 2 * P::W) {
      acc0 += body(P{}, i);
      acc1 += body(P{}, i + P::W);
    }
    total += P::total(acc0 + acc1);
  }
  for (; i < n; ++i) total += S::total(body(S{}, i));
  return total;
}

// sum over unmasked i of exp((min(s_i, cap) - top) * inv_eps), top = min(smax, cap).
template <typename T, typename kMasked>
COLT5_VECTOR_CLONES double sum_exp_capped(const T* s, const uint8_t* m, int64_t n, T cap, T top, T inv_eps) {
  return pack_sum<T>(n, [&](auto pk, int64_t i) COLT5_ALWAYS_INLINE {
    using P = decltype(pk);
    using V = typename P::V;
    const V e = exp_nonpos((vmin(P::load(s + i), V{} + cap) - top) * inv_eps);
    return mask_at<P, kMasked>(m, i) ? e : V{};
  });
}

// body(Pack, i) for each pack of the row, the tail one by one.
template <typename T, typename F>
COLT5_INLINE void pack_for(int64_t n, F&& body) {
  using P = typename Wide<T>::type;
  int64_t i = 0;
  for (; i + P::W <= n; i += P::W) body(P{}, i);
  for (; i < n; ++i) body(ScalarPack<T>{}, i);
}

// y_i = exp(min(s_i + a, 0) / eps_final), 0 where masked; s_i + a in double.
template <typename T, typename kMasked>
COLT5_VECTOR_CLONES void write_output(const T* s, const uint8_t* m, int64_t n, double a, double inv_eps, T* y) {
  pack_for<T>(n, [&](auto pk, int64_t i) COLT5_ALWAYS_INLINE {
    using P = decltype(pk);
    using V = typename P::V;
    const V e = exp_nonpos(P::shifted(P::load(s + i), a, inv_eps));
    P::store(y + i, mask_at<P, kMasked>(m, i) ? e : V{});
  });
}

// Max of the unmasked scores, their count, and whether they are all finite.
template <typename T, typename kMasked>
COLT5_VECTOR_CLONES void row_stats(const T* s, const uint8_t* m, int64_t n, T& smax, int64_t& count, bool& finite) {
  using P = typename Wide<T>::type;
  typename P::V mx = typename P::V{} - std::numeric_limits<T>::infinity();
  T mx_tail = -std::numeric_limits<T>::infinity();
  // s * 0 is NaN exactly for infinite and NaN s; the sum carries it.
  const double poison = pack_sum<T>(n, [&](auto pk, int64_t i) COLT5_ALWAYS_INLINE {
    using Q = decltype(pk);
    using V = typename Q::V;
    const V v = Q::load(s + i);
    const auto keep = mask_at<Q, kMasked>(m, i);
    const V neg_inf = V{} - std::numeric_limits<T>::infinity();
    if constexpr (std::is_same_v<Q, P>) {
      const V cand = keep ? v : neg_inf;
      mx = cand > mx ? cand : mx;
    } else {
      const T cand = keep ? v : -std::numeric_limits<T>::infinity();
      mx_tail = cand > mx_tail ? cand : mx_tail;
    }
    return keep ? v * T(0) : V{};
  });
  smax = std::max(P::hmax(mx), mx_tail);
  finite = !std::isnan(poison);
  int64_t c = n;
  if constexpr (kMasked::value) {
    c = 0;
    for (int64_t i = 0; i < n; ++i) c += m[i] != 0;
  }
  count = c;
}

// Backward of the output and of the last b_T = -relu(s + a_T):
//   du = gy * y / eps_f;  ds = du - [s + a_T > 0] du;  returns sum(ds) (= da_T).
template <typename T, typename kMasked>
COLT5_VECTOR_CLONES double backward_last(const T* s, const uint8_t* m, int64_t n, const T* y, const T* gy, T a,
                                         T inv_eps_f, T* ds) {
  return pack_sum<T>(n, [&](auto pk, int64_t i) COLT5_ALWAYS_INLINE {
    using P = decltype(pk);
    using V = typename P::V;
    const V du = P::load(gy + i) * P::load(y + i) * inv_eps_f;
    const V v = (P::load(s + i) + a > T(0)) ? V{} : du;
    const V kept = mask_at<P, kMasked>(m, i) ? v : V{};
    P::store(ds + i, kept);
    return kept;
  });
}

// Backward through iteration t+1's softmax and iteration t's relu:
//   p_i = exp((min(s_i, -a_t) - top) / eps_{t+1} - shift)   (softmax of iteration t+1,
//         shift = L_{t+1} - top / eps_{t+1})
//   g_i = -c p_i  (= grad of b_t);  ds_i += g_i - [s_i + a_t > 0] g_i
//   returns sum of -[s_i + a_t > 0] g_i  (= da_t).
template <typename T, typename kMasked>
COLT5_VECTOR_CLONES double backward_step(const T* s, const uint8_t* m, int64_t n, T a_t, T top, T inv_eps_next, T shift,
                                         T c, T* ds) {
  const T cap = -a_t;
  return pack_sum<T>(n, [&](auto pk, int64_t i) COLT5_ALWAYS_INLINE {
    using P = decltype(pk);
    using V = typename P::V;
    const V sv = P::load(s + i);
    const V p = exp_nonpos((vmin(sv, V{} + cap) - top) * inv_eps_next - shift);
    const V g = mask_at<P, kMasked>(m, i) ? p * -c : V{};
    const V dv = (sv + a_t > T(0)) ? -g : V{};
    P::store(ds + i, P::load(ds + i) + g + dv);
    return dv;
  });
}

// Calls the masked or unmasked form of a vector loop.
#define COLT5_MASKED_CALL(m, fn, ...) ((m) ? fn<T, std::true_type>(__VA_ARGS__) : fn<T, std::false_type>(__VA_ARGS__))

template <typename T>
RowView<T> row_view(const CoorDescentParams<T>& p, int64_t row) {
  return RowView<T>{p.s + row * p.cols, p.mask ? p.mask + row * p.cols : nullptr, p.cols};
}

// The per-row scalars of the iteration, in double.
template <typename T>
struct RowState {
  RowView<T> r;
  T smax;
  int64_t count;
  double logk;
};

// One coordinate-descent iteration from a_{t-1} at eps_t; returns a_t. The
// first iteration (b_0 = -s) sees z = 0 everywhere: L_1 = log n.
template <typename T>
double iterate(const RowState<T>& st, double a_prev, bool first, double eps_t) {
  if (first) return eps_t * (st.logk - std::log(static_cast<double>(st.count)));
  const T cap = static_cast<T>(-a_prev);
  const T top = std::min(st.smax, cap);
  const double sum =
      COLT5_MASKED_CALL(st.r.m, sum_exp_capped, st.r.s, st.r.m, st.r.n, cap, top, static_cast<T>(1.0 / eps_t));
  const double lse = static_cast<double>(top) / eps_t + std::log(sum);
  return eps_t * (st.logk - lse);
}

// Runs iterations [t0, t1] (1-based, inclusive) from a_{t0-1}, writing a_t
// into out[t - t0] when out is given. Returns the last iterate.
template <typename T>
double run_iterations(const CoorDescentParams<T>& p, const RowState<T>& st, double a_prev, int64_t t0, int64_t t1,
                      double* out) {
  double e = eps_at(p.eps_init, p.eps, p.eps_decay, t0);
  double a = a_prev;
  for (int64_t t = t0; t <= t1; ++t) {
    a = iterate(st, a, t == 1, e);
    if (out) out[t - t0] = a;
    e = std::max(e * p.eps_decay, p.eps);
  }
  return a;
}

// Segment j of c covers iterations [start(j), start(j+1) - 1], the first
// (T mod c) segments one longer.
inline int64_t segment_start(int64_t n_iters, int64_t c, int64_t j) {
  const int64_t base = n_iters / c, extra = n_iters % c;
  return 1 + j * base + std::min(j, extra);
}

}  // namespace

template <typename T>
void coor_descent_forward_cpu(const CoorDescentParams<T>& p, int64_t row_begin, int64_t row_end) {
  const int64_t per_row = saved_per_row(p.n_iters, p.checkpoint_segments);
  const double inv_eps_f = 1.0 / eps_at(p.eps_init, p.eps, p.eps_decay, p.n_iters + 1);
  std::vector<double> scratch;
  for (int64_t row = row_begin; row < row_end; ++row) {
    RowState<T> st{row_view(p, row), T(0), 0, 0.0};
    T* y = p.y + row * p.cols;
    double* saved = p.saved ? p.saved + row * per_row : nullptr;
    bool finite = true;
    COLT5_MASKED_CALL(st.r.m, row_stats, st.r.s, st.r.m, st.r.n, st.smax, st.count, finite);
    if (p.row_stats) {
      // A non-finite unmasked score marks the row with a NaN maximum (callers report it).
      p.row_stats[2 * row] = finite ? static_cast<double>(st.smax) : std::numeric_limits<double>::quiet_NaN();
      p.row_stats[2 * row + 1] = static_cast<double>(st.count);
    }
    if (!finite) {
      std::fill(y, y + p.cols, std::numeric_limits<T>::quiet_NaN());
      if (saved) std::fill(saved, saved + per_row, 0.0);
      continue;
    }
    if (st.count == 0) {
      std::fill(y, y + p.cols, T(0));
      if (saved) std::fill(saved, saved + per_row, 0.0);
      continue;
    }
    st.logk = std::log(static_cast<double>(p.k[row]));
    double a;
    if (p.checkpoint_segments == 0) {
      if (!saved) {
        scratch.resize(static_cast<size_t>(p.n_iters));
        saved = scratch.data();
      }
      a = run_iterations(p, st, 0.0, 1, p.n_iters, saved);
    } else {
      a = 0.0;
      for (int64_t j = 0; j < p.checkpoint_segments; ++j) {
        const int64_t t0 = segment_start(p.n_iters, p.checkpoint_segments, j);
        const int64_t t1 = segment_start(p.n_iters, p.checkpoint_segments, j + 1) - 1;
        if (saved) saved[j] = a;  // the iterate the segment starts from
        a = run_iterations(p, st, a, t0, t1, nullptr);
      }
    }
    COLT5_MASKED_CALL(st.r.m, write_output, st.r.s, st.r.m, st.r.n, a, inv_eps_f, y);
  }
}

template <typename T>
void coor_descent_backward_cpu(const CoorDescentBackwardParams<T>& bp, int64_t row_begin, int64_t row_end) {
  const CoorDescentParams<T>& p = bp.fwd;
  const int64_t T_ = p.n_iters;
  const int64_t per_row = saved_per_row(p.n_iters, p.checkpoint_segments);
  std::vector<double> eps(static_cast<size_t>(T_ + 2));
  for (int64_t t = 1; t <= T_ + 1; ++t) eps[t] = eps_at(p.eps_init, p.eps, p.eps_decay, t);
  std::vector<double> iterates(static_cast<size_t>(T_ + 1));  // iterates[t] = a_t
  for (int64_t row = row_begin; row < row_end; ++row) {
    RowState<T> st{row_view(p, row), static_cast<T>(p.row_stats[2 * row]),
                   static_cast<int64_t>(p.row_stats[2 * row + 1]), 0.0};
    T* ds = bp.grad_s + row * p.cols;
    if (st.count == 0) {
      std::fill(ds, ds + p.cols, T(0));
      if (bp.grad_k) bp.grad_k[row] = 0;
      continue;
    }
    st.logk = std::log(static_cast<double>(p.k[row]));
    const double* saved = p.saved + row * per_row;
    iterates[0] = 0;
    if (p.checkpoint_segments == 0) {
      std::copy(saved, saved + T_, iterates.begin() + 1);
    } else {
      for (int64_t j = 0; j < p.checkpoint_segments; ++j) {
        const int64_t t0 = segment_start(T_, p.checkpoint_segments, j);
        const int64_t t1 = segment_start(T_, p.checkpoint_segments, j + 1) - 1;
        run_iterations(p, st, saved[j], t0, t1, iterates.data() + t0);
      }
    }
    const T* y = p.y + row * p.cols;
    const T* gy = bp.grad_y + row * p.cols;
    // da_T = sum(du) - sum(h du): the output reads a_T directly and through b_T.
    double da = COLT5_MASKED_CALL(st.r.m, backward_last, st.r.s, st.r.m, st.r.n, y, gy, static_cast<T>(iterates[T_]),
                                  static_cast<T>(1.0 / eps[T_ + 1]), ds);
    double dlogk = da * eps[T_];
    for (int64_t t = T_ - 1; t >= 1; --t) {
      const double a_t = iterates[t];
      // L_{t+1} = logk - a_{t+1} / eps_{t+1}, split as top / eps_{t+1} + shift.
      const T top = std::min(st.smax, static_cast<T>(-a_t));
      const double shift = st.logk - iterates[t + 1] / eps[t + 1] - static_cast<double>(top) / eps[t + 1];
      da = COLT5_MASKED_CALL(st.r.m, backward_step, st.r.s, st.r.m, st.r.n, static_cast<T>(a_t), top,
                             static_cast<T>(1.0 / eps[t + 1]), static_cast<T>(shift), static_cast<T>(da), ds);
      dlogk += da * eps[t];
    }
    // Iteration 1's softmax is uniform and b_0 = -s: their contributions cancel.
    if (bp.grad_k) bp.grad_k[row] = static_cast<T>(dlogk / static_cast<double>(p.k[row]));
  }
}

template <typename T>
void topk_tiebreak_cpu(const T* scores, const T* tiebreak, const uint8_t* mask, int64_t rows, int64_t cols, int64_t k,
                       int64_t* indices, int64_t row_begin, int64_t row_end) {
  (void)rows;
  std::vector<int64_t> order(static_cast<size_t>(cols));
  for (int64_t row = row_begin; row < row_end; ++row) {
    const T* sc = scores + row * cols;
    const T* tb = tiebreak ? tiebreak + row * cols : nullptr;
    const uint8_t* m = mask ? mask + row * cols : nullptr;
    std::iota(order.begin(), order.end(), int64_t(0));
    auto before = [&](int64_t i, int64_t j) {
      const bool ki = m == nullptr || m[i], kj = m == nullptr || m[j];
      if (ki != kj) return ki;
      if (sc[i] != sc[j]) return sc[i] > sc[j];
      if (tb && tb[i] != tb[j]) return tb[i] > tb[j];
      return i < j;
    };
    // The k first (a strict total order: position breaks every tie), then
    // their order: linear on average, where a partial sort's heap costs
    // O(n log k) with a large constant.
    if (k < cols) std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), before);
    std::sort(order.begin(), order.begin() + k, before);
    std::copy(order.begin(), order.begin() + k, indices + row * k);
  }
}

template void coor_descent_forward_cpu<float>(const CoorDescentParams<float>&, int64_t, int64_t);
template void coor_descent_forward_cpu<double>(const CoorDescentParams<double>&, int64_t, int64_t);
template void coor_descent_backward_cpu<float>(const CoorDescentBackwardParams<float>&, int64_t, int64_t);
template void coor_descent_backward_cpu<double>(const CoorDescentBackwardParams<double>&, int64_t, int64_t);
template void topk_tiebreak_cpu<float>(const float*, const float*, const uint8_t*, int64_t, int64_t, int64_t, int64_t*,
                                       int64_t, int64_t);
template void topk_tiebreak_cpu<double>(const double*, const double*, const uint8_t*, int64_t, int64_t, int64_t,
                                        int64_t*, int64_t, int64_t);

}  // namespace kernels
}  // namespace colt5
