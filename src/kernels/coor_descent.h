// Coordinate descent (soft top-k) kernels over raw row-major buffers.
//
// Torch-free: this header and its CPU implementation compile with a plain C++17
// compiler; the CUDA twin (coor_descent_cuda.cu) compiles with nvcc alone.
//
// Algorithm, per row of scores s over its unmasked entries U (n = |U|):
//   a_0 = 0, b_0 = -s, eps_1 = max(eps_init, eps), eps_{t+1} = max(eps_t * decay, eps)
//   for t = 1..T:  L_t = logsumexp_U((s + b_{t-1}) / eps_t)
//                  a_t = eps_t (log k - L_t)
//                  b_t = -relu(s + a_t)
//   y = exp((s + a_T + b_T) / eps_{T+1}),   0 on masked entries.
// Since s + b_t = min(s, -a_t), every b_t is a function of the scalar a_t, so
// the whole state of a row is one number per iteration: the forward keeps the
// iterates a_t (all of them, or those at checkpoint-segment starts) and the
// backward recomputes what it needs exactly, without any vector state.
#pragma once

#include <cstdint>

namespace colt5 {
namespace kernels {

// How the CUDA kernels spread a row over threads. kAuto picks by row length;
// the others force one variant (every variant handles any row length: entries
// beyond its register cache are streamed from memory), so tests can check each
// against the CPU kernels and benchmarks can time each.
enum class RowKernel : int32_t {
  kAuto = 0,
  kWarp = 1,     // one warp per row, several rows per block
  kBlock = 2,    // one block per row
  kCluster = 3,  // a thread-block cluster per row, sums through distributed shared memory
  kGrid = 4,     // several blocks per row, a grid-wide barrier (cooperative launch)
};

struct RowLaunch {
  RowKernel kernel = RowKernel::kAuto;
  // kCluster / kGrid: blocks per row; 0 = the fewest that cache the row, at least 2.
  int32_t blocks_per_row = 0;
  // kAuto: the largest cluster it may use for a row when all rows still run in
  // one wave (1: one block per row up to the register cache).
  int32_t max_cluster = 1;
};

template <typename acc_t>
struct CoorDescentParams {
  int64_t rows = 0;
  int64_t cols = 0;
  const acc_t* s = nullptr;       // rows x cols, contiguous
  const uint8_t* mask = nullptr;  // rows x cols (1 = keep) or nullptr for none
  const acc_t* k = nullptr;       // rows values of k (> 0)
  int64_t n_iters = 20;
  double eps = 0.1;
  double eps_init = 0.1;  // already max(eps_init, eps)
  double eps_decay = 1.0;
  // Number of checkpoint segments: 0 keeps every iterate a_t (rows x n_iters);
  // c >= 1 keeps only the first iterate of each of c segments (rows x c) and
  // the backward recomputes each segment from its start.
  int64_t checkpoint_segments = 0;
  RowLaunch launch;  // CUDA only

  // Forward outputs. The per-row scalars are kept in float64 whatever acc_t:
  // the outputs are exp((s + a) / eps) with eps as small as 0.03, so a float
  // rounding of a would cost float32 outputs and gradients about 1e-4 relative.
  acc_t* y = nullptr;           // rows x cols
  double* saved = nullptr;      // rows x saved_per_row(): kept iterates a_t
  double* row_stats = nullptr;  // rows x 2: max of unmasked s, unmasked count
};

// Number of scalars kept per row by the forward for the backward.
inline int64_t saved_per_row(int64_t n_iters, int64_t checkpoint_segments) {
  return checkpoint_segments == 0 ? n_iters : checkpoint_segments;
}

// The epsilon used by iteration t (1-based) and, for t = n_iters + 1, the
// final one used for the output.
double eps_at(double eps_init, double eps, double eps_decay, int64_t t);

template <typename acc_t>
struct CoorDescentBackwardParams {
  CoorDescentParams<acc_t> fwd;   // the forward's inputs and saved state
  const acc_t* grad_y = nullptr;  // rows x cols
  acc_t* grad_s = nullptr;        // rows x cols (written)
  acc_t* grad_k = nullptr;        // rows (written) or nullptr when not needed
};

// CPU kernels: process rows [row_begin, row_end). Callers spread row ranges
// over threads.
template <typename acc_t>
void coor_descent_forward_cpu(const CoorDescentParams<acc_t>& p, int64_t row_begin, int64_t row_end);

template <typename acc_t>
void coor_descent_backward_cpu(const CoorDescentBackwardParams<acc_t>& p, int64_t row_begin, int64_t row_end);

// Hard top-k with a total order: larger score first, then larger tiebreak,
// then smaller position. Masked entries (mask 0) come after every unmasked one
// (in the same order among themselves). Writes k indices per row, in order.
template <typename acc_t>
void topk_tiebreak_cpu(const acc_t* scores, const acc_t* tiebreak, const uint8_t* mask, int64_t rows, int64_t cols,
                       int64_t k, int64_t* indices, int64_t row_begin, int64_t row_end);

#ifdef COLT5_WITH_CUDA
// CUDA kernels on the given stream (cudaStream_t passed as void*). Buffers are
// device pointers; the same layout and semantics as the CPU kernels.
template <typename acc_t>
void coor_descent_forward_cuda(const CoorDescentParams<acc_t>& p, void* stream);
template <typename acc_t>
void coor_descent_backward_cuda(const CoorDescentBackwardParams<acc_t>& p, void* stream);
// How topk_tiebreak_cuda orders float rows (double rows always take the sorts).
enum class TopkCudaPath {
  // The selection where it applies (k <= 8192) and pays (rows up to 65536, or
  // 8 rows or more), else the sorts. Measured on an H200 (bench_modules_cuda,
  // top-k by path): 252 rows of 8192, k 1024: 0.10 ms (bitonic 0.35, sorts
  // 0.64); 1020 rows of 32768: 0.81 (sorts 6.3); 2 rows of 8192: 0.05
  // (bitonic 0.18); 16 rows of 131072, k 128: 0.29 (sorts 0.59); but 2 rows
  // of 262144: 0.58 (sorts 0.27). Where the selection would run on rows
  // longer than 65536, its chunked form (16 rows of 131072: 0.13 ms on an
  // H100).
  automatic,
  // One kernel per row: a radix selection of the k-th key, then a bitonic sort
  // of the k entries in shared memory (k <= 8192; otherwise the sorts).
  select,
  // One kernel per row: a bitonic sort of the whole row in shared memory (rows
  // up to 8192; otherwise the sorts).
  bitonic,
  // cub's segmented or device-wide radix sorts.
  sorts,
  // The selection over chunks of each row (a block per chunk, so that a few
  // long rows fill the GPU), then a sort of the chunks' candidates per row in
  // shared memory: where 4 chunks or more of at least 4k and 2048 entries fit
  // (k * chunks <= 4096); otherwise the selection. Automatic takes it where
  // it would take the selection on rows longer than 65536.
  chunked,
};
// The k first entries of each row in the order: kept before masked, score
// descending, tiebreak descending, position ascending. Every path gives the
// same indices.
template <typename acc_t>
void topk_tiebreak_cuda(const acc_t* scores, const acc_t* tiebreak, const uint8_t* mask, int64_t rows, int64_t cols,
                        int64_t k, int64_t* indices, void* stream, TopkCudaPath path = TopkCudaPath::automatic);

// Routing scores (routing_cuda.cu): for each of `rows` contiguous rows of x
// (d elements of `dtype`), dots[row * r + q] = x[row] . tokens[q] and
// norms[row] = |x[row]|, float32 accumulation, one read of x. tokens: r x d
// float32 with r <= 4 and r * d <= kRowDotMaxTokenFloats.
enum class RowDtype { f32, f16, bf16 };
constexpr int64_t kRowDotMaxTokenFloats = 12288;
void row_dot_norm_cuda(const void* x, RowDtype dtype, const float* tokens, int64_t rows, int64_t d, int64_t r,
                       float* dots, float* norms, void* stream);
// Its backward in one read of x: grad_x[row] = sum_q grad_dots[row, q] *
// tokens[q] + grad_norms[row] / norms[row] * x[row] (0 where the norm is 0; a
// null grad_dots or grad_norms adds nothing; grad_x null: not written), in x's
// dtype; grad_tokens_partial (null: not written): row_dot_norm_backward_partials
// (rows) blocks of r x d float32 partial sums of the tokens' gradient, to be
// summed over the blocks. Needs d * element size a multiple of 16 (at most
// 32 KiB) and x 16-byte aligned (row_dot_norm_backward_supports).
struct RowDotBackwardParams {
  const void* x = nullptr;
  RowDtype dtype = RowDtype::f32;
  const float* tokens = nullptr;
  const float* grad_dots = nullptr;
  const float* grad_norms = nullptr;
  const float* norms = nullptr;
  void* grad_x = nullptr;
  // Optional, x's dtype and layout, 16-byte aligned: added to grad_x (the
  // gradient of x where it also flows past the scores, as a residual).
  const void* grad_x_add = nullptr;
  float* grad_tokens_partial = nullptr;
  int64_t rows = 0, d = 0, r = 1;
  // Optional, up to two sets of gathered rows' gradients added to grad_x:
  // slot[i][row] is -1 or the row's place in rows[i] (x's dtype, contiguous
  // [*, d], 16-byte aligned); each row of x is in a set at most once.
  const int32_t* slot[2] = {nullptr, nullptr};
  const void* slot_rows[2] = {nullptr, nullptr};
};
bool row_dot_norm_backward_supports(const void* x, RowDtype dtype, int64_t d, int64_t r);
int64_t row_dot_norm_backward_partials(int64_t rows);
void row_dot_norm_backward_cuda(const RowDotBackwardParams& p, void* stream);

// slot[flat[j]] = j for j < count (slot: n int32, set to -1 first): the
// place of each row of x among rows gathered from it at distinct positions.
void row_slot_map_cuda(const int64_t* flat, int64_t count, int32_t* slot, int64_t n, void* stream);

// Routed rows added into a sum in place (routing_cuda.cu): for batch row b and
// routed row j, out[b, indices[b, j]] += scale[b, j] * src[b, j] - bias, and
// out[b, p] -= bias for p < lead (the indices of a batch row distinct and at
// least `lead`). out [batch, n, d] and src [batch, k, d] contiguous, each
// float32, float16 or bfloat16; scale float32 [batch * k] and bias float32 [d]
// optional. The backward, given grad_out (out's dtype and layout), writes
// grad_src[b, j] = scale * grad_out[b, indices[b, j]] (src's dtype),
// grad_scale[b * k + j] = grad_out[b, indices[b, j]] . src[b, j] (float32) and
// adds minus the sum of grad_out over the routed and lead rows into the zeroed
// float32 grad_bias (each optional). d <= kScatterRowsMaxD.
constexpr int64_t kScatterRowsMaxD = 8192;
struct ScatterRowsParams {
  void* out = nullptr;
  RowDtype out_dtype = RowDtype::f32;
  const void* src = nullptr;
  RowDtype src_dtype = RowDtype::f32;
  const int64_t* indices = nullptr;
  const float* scale = nullptr;
  const float* bias = nullptr;
  int64_t batch = 0, k = 0, n = 0, d = 0, lead = 0;
  const void* grad_out = nullptr;
  void* grad_src = nullptr;
  float* grad_scale = nullptr;
  float* grad_bias = nullptr;
};
void scatter_rows_forward_cuda(const ScatterRowsParams& p, void* stream);
void scatter_rows_backward_cuda(const ScatterRowsParams& p, void* stream);
// out = a + b (count elements each; a and out float32, b float16/bfloat16),
// 8 elements a thread where all three are 16-byte aligned.
void add_float_half_cuda(const float* a, const void* b, RowDtype b_dtype, float* out, int64_t count, void* stream);

// Attention over keys/values read by index from a table of projected rows
// (gathered_attention_cuda.cu). Group g (= batch row * routes + route) has
// `n` queries per head, q [groups, heads, n, dim_head], and attends over its
// route's null key/value (null_kv [routes, heads * 2 * dim_head], float32)
// followed by the table rows rows[g, 0..m) of table [*, heads * 2 * dim_head]
// (per head: the key, then the value). scores [groups, m] (float32, optional)
// scale the values, and the keys when keys_scaled; mask [groups, m]
// (optional) leaves keys out. q, table, out and grad_out share `dtype`; the
// forward writes out [groups, heads, n, dim_head] and lse [groups, heads, n]
// (float32, in units of the scaled logits); the backward adds into the
// zeroed float32 grad_table, grad_null and grad_scores (optional) and writes
// grad_q (float32, like q). float16/bfloat16 take tensor cores for the matrix
// products (float32 accumulation), float32 the CUDA cores.
struct GatheredAttentionParams {
  const void* q = nullptr;
  const void* table = nullptr;
  const int64_t* rows = nullptr;
  const float* null_kv = nullptr;
  const float* scores = nullptr;
  const bool* mask = nullptr;
  void* out = nullptr;
  float* lse = nullptr;
  const void* grad_out = nullptr;
  float* grad_q = nullptr;
  float* grad_table = nullptr;
  float* grad_null = nullptr;
  float* grad_scores = nullptr;
  int64_t groups = 0, heads = 0, n = 0, m = 0, routes = 1, dim_head = 0;
  float scale = 1.f;
  bool keys_scaled = false;
  RowDtype dtype = RowDtype::f32;
  // Backward in pairs of groups that share most of their keys (consecutive
  // windows of the autoregressive module; one route): pair i is groups
  // pair_a[i] and pair_b[i] (-1: none); pair_slot[i, j] the slot of A's key
  // j in B's set (-1: not there, or A's key masked); pair_extra[i, 0 ..
  // pair_extra_count[i]) B's slots whose keys A does not hold. Each shared
  // key's gradients are summed over both groups before one atomic addition.
  // pairs = 0: every group on its own.
  int64_t pairs = 0;
  const int* pair_a = nullptr;
  const int* pair_b = nullptr;
  const int* pair_slot = nullptr;
  const int* pair_extra = nullptr;
  const int* pair_extra_count = nullptr;
};
// Whether gathered_attention_backward_cuda takes pairs at this head width.
bool gathered_attention_pairs_supported(int64_t dim_head);
bool gathered_attention_supports(int64_t dim_head);
void gathered_attention_forward_cuda(const GatheredAttentionParams& p, void* stream);
void gathered_attention_backward_cuda(const GatheredAttentionParams& p, void* stream);

// The masked sliding window's packing around the flash kernel
// (sliding_window_cuda.cu; float16/bfloat16, d a multiple of 8, d + 8 <= 256;
// the window sums and seen flags also for float32):
// seen[b, t] whether query t sees a visible key; the packed projection
// qkv (batch, n, 3, heads, d) into wide (3, batch, n, heads, d + 8), the 8
// more dimensions carrying the key mask as a score bias (q: 1, k: 0 or
// -hidden_bias); float32 window sums (batch, windows, heads * d) of rows
// row_stride elements apart, of every row or (seen given) of the blind rows;
// the kernel's output (batch, n, heads, d + 8) into y (batch, n, heads * d),
// blind queries taking their look-around's mean from the window sums of v;
// the output gradient into the kernel's layout (zero for blind queries); the
// kernel's gradients into dqkv (batch, n, 3, heads, d), v's with the blind
// queries' share from the window sums of their gradients.
struct SlidingMaskParams {
  int64_t batch = 0, n = 0, heads = 0, d = 0;
  int64_t ws = 1, back = 0, fwd = 0;
  bool causal = false;
  float hidden_bias = 30000.f;
  RowDtype dtype = RowDtype::bf16;
};
bool sliding_mask_supports(int64_t d, RowDtype dtype);
void sliding_seen_cuda(const SlidingMaskParams& p, const bool* mask, bool* seen, void* stream);
void sliding_pack_qkv_cuda(const SlidingMaskParams& p, const void* qkv, const bool* mask, void* wide, void* stream);
void sliding_window_sums_cuda(const SlidingMaskParams& p, const void* src, int64_t row_stride, const bool* seen,
                              float* sums, void* stream);
void sliding_unpack_out_cuda(const SlidingMaskParams& p, const void* out8, const bool* seen, const float* sums, void* y,
                             void* stream);
void sliding_pack_grad_cuda(const SlidingMaskParams& p, const void* gy, const bool* seen, void* g8, void* stream);
void sliding_unpack_grads_cuda(const SlidingMaskParams& p, const void* dq8, const void* dk8, const void* dv8,
                               const float* blind_sums, void* dqkv, void* stream);

// Exact sliding-window attention from the packed projection
// (band_attention_cuda.cu; float32, float16, bfloat16; d 32 or 64; 64 +
// ws * (back + fwd) keys at most 256): query t sees the keys t - ws * back ..
// t + ws * fwd (.. t when causal) in the sequence that the mask (batch, n;
// null: every key) keeps. qkv (batch, n, 3, heads, d); the forward writes y
// (batch, n, heads * d) and lse (batch, heads, n; +inf for a query that sees
// no key: it takes its look-around's mean from v_sums, the float32 window
// sums of v as sliding_window_sums_cuda gives them); the backward takes
// y_in, gy and lse, writes q's part of dqkv (batch, n, 3, heads, d), adds k's
// and v's into dkv (batch, n, 2, heads, d; float32, zeroed by the caller;
// dkv_row = 2 * heads * d), then casts them into dqkv, v's with the blind
// queries' share (blind_sums: window sums of gy over the blind rows; null
// where there is no mask). Float32 may add k's and v's into dqkv itself:
// dkv = its k part (dqkv zeroed), dkv_row = 3 * heads * d.
// Float32 products in TF32 where tf32, else as three TF32 products (float32
// accuracy).
struct BandAttentionParams {
  const void* qkv = nullptr;
  const bool* mask = nullptr;
  const float* v_sums = nullptr;
  void* y = nullptr;
  float* lse = nullptr;
  const void* y_in = nullptr;
  const void* gy = nullptr;
  void* dqkv = nullptr;
  float* dkv = nullptr;
  int64_t dkv_row = 0;  // elements from one row of dkv to the next
  const float* blind_sums = nullptr;
  int64_t batch = 0, n = 0, heads = 0, d = 0, ws = 1, back = 0, fwd = 0;
  bool causal = false, tf32 = false;
  float scale = 1.f;
  RowDtype dtype = RowDtype::f32;
};
bool band_attention_supports(int64_t d, int64_t ws, int64_t back, int64_t fwd, bool causal, RowDtype dtype,
                             int64_t batch, int64_t heads, int device);
void band_attention_forward_cuda(const BandAttentionParams& p, void* stream);
void band_attention_backward_cuda(const BandAttentionParams& p, void* stream);
// Exact windows with a key mask in float16/bfloat16 (LocalMHA, heads of 32 or
// 64) on register tiles (mma.sync), forward and backward, the mask applied per
// score; p.mask null: no mask.
//   list: flags (batch, blocks_per_row) = whether a block of 64 queries has a
//     hidden key in its band (only such a block can hold a blind query).
//   forward (p.mask, p.qkv; p.y (batch, n, heads * d), p.lse = the
//     log-sum-exps (batch, heads, n), +inf for a blind query, p.v_sums
//     (batch, windows, heads * d) float32 scratch): v's window sums where a
//     listed block needs them, then every block's output and log-sum-exp.
//   backward (p as the forward's plus gy, y_in, dqkv (batch, n, 3 * heads *
//     d), blind_sums (batch, windows, heads * d) float32 scratch; wflags
//     (batch, windows) and dots (batch, heads, n) float32 scratch): dots =
//     sum(gy * y) per query, then dqkv, every row written once (q's by blocks
//     of 64 queries, k's and v's by blocks of 64 keys), v's with the blind
//     queries' share.
void window_tile_list_cuda(const BandAttentionParams& p, uint8_t* flags, void* stream);
void window_tile_forward_cuda(const BandAttentionParams& p, const uint8_t* flags, void* stream);
void window_tile_backward_cuda(const BandAttentionParams& p, const uint8_t* flags, uint8_t* wflags, float* dots,
                               void* stream);

// Causal windows of one look-back around two flash calls (sliding_window_cuda.cu;
// float16/bfloat16, d a multiple of 8 up to 256, n a multiple of ws; the
// params' mask fields unused): A, every window of the flattened (batch * n)
// rows over its own keys, causal; B, window g over window g - 1 for g >= 1.
// The merge writes y (batch, n, heads, d) from A's and B's outputs and
// log-sum-exps ((windows, heads, ws) float32, B's one window fewer and one
// window on), the joint log-sum-exp `lse` and `lse_b` for B's backward (+inf
// where a window's partner is in another sequence: no share). The gradients'
// kernel adds A's and B's (rows of heads * d; B's q rows one window on) into
// dqkv (batch, n, 3, heads, d).
bool causal_windows_supports(int64_t d, RowDtype dtype);
void causal_windows_merge_cuda(const SlidingMaskParams& p, const void* oa, const void* ob, const float* lse_a,
                               const float* lse_b_in, void* y, float* lse, float* lse_b, void* stream);
void causal_windows_grads_cuda(const SlidingMaskParams& p, const void* dqa, const void* dka, const void* dva,
                               const void* dqb, const void* dkb, const void* dvb, void* dqkv, void* stream);

// RMSNorm rows of x [rows, d] (rms_norm_cuda.cu): y = x * f * gamma with
// f = scale / max(|x|, eps); the forward writes y (in y_dtype: the promoted
// type rms_norm_promoted(x, gamma), or float16/bfloat16 where gamma is
// float32 and x is float32 or of that type, as an autocast region's next
// matrix product would cast it) and norms[rows] = |x| (float32); the backward
// reads them with grad_y (y's type), writes grad_x (x's type) and, when
// grad_gamma_partial is set, rms_norm_partials(rows) rows of d float32 partial
// sums of the gamma gradient (to be summed over the rows). Needs
// d <= kRmsNormMaxWidth and gamma float32 or of x's type. With layer_norm:
// y = (x - mean) * rstd * gamma + beta, rstd = 1 / sqrt(var + eps) (biased
// variance, as LayerNorm), norms[rows] = rstd and means[rows] = mean; the
// backward also writes grad_beta_partial (same layout) when set; beta has
// gamma's type.
constexpr int64_t kRmsNormMaxWidth = 2048;
struct RmsNormParams {
  const void* x = nullptr;
  const void* gamma = nullptr;
  void* y = nullptr;
  float* norms = nullptr;
  const void* grad_y = nullptr;
  void* grad_x = nullptr;
  // Optional, x's dtype, rows of d: added to grad_x (the gradient of x where
  // it also flows past the norm, as a residual).
  const void* grad_x_add = nullptr;
  float* grad_gamma_partial = nullptr;
  bool layer_norm = false;
  const void* beta = nullptr;
  float* means = nullptr;
  float* grad_beta_partial = nullptr;
  int64_t rows = 0, d = 0;
  float scale = 1.f, eps = 1e-12f;
  RowDtype x_dtype = RowDtype::f32, gamma_dtype = RowDtype::f32, y_dtype = RowDtype::f32;
  // Optional (backward): the gradient of routing scores taken from x as this
  // norm passed it on (row_dot_norm_cuda), added as grad_x is written:
  // sum over q < route_r of route_grad_dots[row, q] * route_tokens[q]
  // (float32, [rows, route_r] and [route_r, d], route_r <= 4), plus
  // route_grad_norms[row] / route_norms[row] * x[row] (0 where the norm is
  // 0), plus up to two gathered rows' gradients: row route_slot[i][row] (-1:
  // none) of route_slot_rows[i] (x's dtype, rows of d).
  int route_r = 0;
  const float* route_tokens = nullptr;
  const float* route_grad_dots = nullptr;
  const float* route_grad_norms = nullptr;
  const float* route_norms = nullptr;
  const int32_t* route_slot[2] = {nullptr, nullptr};
  const void* route_slot_rows[2] = {nullptr, nullptr};
};
// The widest rows whose backward takes the routing scores' terms (route_*).
constexpr int64_t kRmsNormMaxRouteWidth = 1024;
RowDtype rms_norm_promoted(RowDtype x, RowDtype gamma);
bool rms_norm_supports(int64_t d, RowDtype x, RowDtype gamma, RowDtype y);
int64_t rms_norm_partials(int64_t rows);
void rms_norm_forward_cuda(const RmsNormParams& p, void* stream);
void rms_norm_backward_cuda(const RmsNormParams& p, void* stream);
#endif

}  // namespace kernels
}  // namespace colt5
