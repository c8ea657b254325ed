#include "colt5/nn/local_attention.h"

#include <ATen/record_function.h>
#include <c10/core/InferenceMode.h>

#include <cmath>
#include <limits>
#include <mutex>
#include <vector>

#include "colt5/nn/layers.h"
#include "colt5/compat.h"
#include "nn/checks.h"
#include "nn/linear.h"
#include "nn/masking.h"

#ifdef COLT5_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "ops/row_dtype.h"
#endif

namespace colt5 {
namespace nn {

namespace detail {

// The masks of a LocalAttention that depend only on the sequence length
// (see forward()), and what they were built for.
struct WindowMaskSet {
  int64_t n = -1;
  c10::Device device{c10::kCPU};
  c10::StreamId stream = 0;
  bool inference = false;    // built under c10::InferenceMode (inference tensors, which autograd may not save)
  torch::Tensor pad;         // (1, windows, 1, span) bool: slots outside the sequence
  torch::Tensor limit;       // (1, 1, ws, span) bool: causal or exact-window limits; undefined if none
  torch::Tensor allow;       // !limit
  torch::Tensor fill, zero;  // 0-d, the hidden entries' additive value and 0, in the queries' dtype
};

// The last set built, kept between calls.
struct LocalWindowMasks {
  std::mutex mutex;
  WindowMaskSet set;
};

}  // namespace detail

namespace {

// The stream kernels on `device` go to now (0 on the CPU).
c10::StreamId current_stream_id(const c10::Device& device) {
#ifdef COLT5_WITH_CUDA
  if (device.is_cuda()) return c10::cuda::getCurrentCUDAStream(device.index()).id();
#endif
  (void)device;
  return 0;
}

// Whether the kernels on `device` are being captured into a CUDA graph now.
bool capturing(const c10::Device& device) {
#ifdef COLT5_WITH_CUDA
  if (device.is_cuda()) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(device.index()).stream(), &status));
    return status != cudaStreamCaptureStatusNone;
  }
#endif
  (void)device;
  return false;
}

// x: (B, windows, ...). Each window is joined (along dim 2) with its
// `backward` predecessors and `forward` successors; windows beyond the ends
// are filled with pad_value.
torch::Tensor look_around(const torch::Tensor& x, int64_t backward, int64_t forward, double pad_value) {
  const int64_t windows = x.size(1);
  std::vector<int64_t> pad(2 * (x.dim() - 1), 0);
  pad[pad.size() - 2] = backward;
  pad[pad.size() - 1] = forward;
  auto padded = torch::constant_pad_nd(x, pad, pad_value);
  std::vector<torch::Tensor> parts;
  parts.reserve(backward + forward + 1);
  for (int64_t i = 0; i < backward + forward + 1; ++i) parts.push_back(padded.narrow(1, i, windows));
  return torch::cat(parts, 2);
}

#if COLT5_HAS_SDPA
// The same for (B, windows, ws, d) as a view: the windows of one padded
// sequence unfolded with a stride of one window (no copy; the backward sums
// the overlapping windows' gradients).
torch::Tensor look_around_view(const torch::Tensor& x, int64_t backward, int64_t forward, double pad_value) {
  const int64_t B = x.size(0), windows = x.size(1), ws = x.size(2), d = x.size(3);
  auto padded = torch::constant_pad_nd(x.reshape({B, windows * ws, d}), {0, 0, backward * ws, forward * ws}, pad_value);
  return padded.unfold(1, (backward + forward + 1) * ws, ws).transpose(-1, -2);
}

// Whether the flash kernel (called directly, for its lower-right causal limit
// and sliding window) takes these inputs: CUDA, half precision, head size a
// multiple of 8 up to 256, each row of q, k and v contiguous.
bool flash_supports(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, int64_t d) {
  return q.is_cuda() && (q.scalar_type() == torch::kBFloat16 || q.scalar_type() == torch::kHalf) && d % 8 == 0 &&
         d <= 256 && q.stride(-1) == 1 && k.stride(-1) == 1 && v.stride(-1) == 1;
}

// Windowed attention when nothing is hidden but the look-around's own limits
// (no key mask, no rotary, block-aligned windows): every window attends over
// a contiguous range of the sequence, so no additive mask is built. The
// interior windows take their keys/values as overlapping views of k and v
// (no copy) in one fused call; the first `back` and last `fwd` windows, whose
// look-around runs past an end, attend over the part that exists (the same
// as hiding the padding slots). Causal windows use the lower-right causal
// limit of the fused flash kernel: query i of a window with L keys sees keys
// j <= i + L - ws. q: (B, windows, ws, d), already unscaled; k, v: (B, n, d).
torch::Tensor windows_without_mask(const torch::Tensor& bq, const torch::Tensor& k, const torch::Tensor& v,
                                   int64_t back, int64_t fwd, bool causal, double scale) {
  const int64_t windows = bq.size(1), ws = bq.size(2);
  auto attend = [&](const torch::Tensor& q, const torch::Tensor& kk, const torch::Tensor& vv) {
    if (!causal) return at::scaled_dot_product_attention(q, kk, vv, {}, 0.0, false, scale);
    return std::get<0>(at::_scaled_dot_product_flash_attention(q, kk, vv, 0.0, true, false, scale));
  };
  auto keys_of = [&](const torch::Tensor& t, int64_t w) {  // (B, 1, L, d): window w's existing look-around
    const int64_t lo = std::max<int64_t>(w - back, 0), hi = std::min<int64_t>(w + fwd + 1, windows);
    return t.narrow(1, lo * ws, (hi - lo) * ws).unsqueeze(1);
  };
  const int64_t first = std::min(back, windows), last = std::max(windows - fwd, first);
  std::vector<torch::Tensor> parts;
  for (int64_t w = 0; w < first; ++w) parts.push_back(attend(bq.narrow(1, w, 1), keys_of(k, w), keys_of(v, w)));
  if (last > first) {
    const int64_t span = (back + fwd + 1) * ws;
    auto view = [&](const torch::Tensor& t) {  // (B, last - first, span, d), window j + first over keys from j * ws
      return t.unfold(1, span, ws).transpose(-1, -2);
    };
    parts.push_back(attend(bq.narrow(1, first, last - first), view(k), view(v)));
  }
  for (int64_t w = last; w < windows; ++w) parts.push_back(attend(bq.narrow(1, w, 1), keys_of(k, w), keys_of(v, w)));
  return parts.size() == 1 ? parts[0] : torch::cat(parts, 1);
}

// Exact windows with a key mask on the flash kernel's sliding window. The
// mask enters as a score bias through 8 more head dimensions: q gets a 1 and
// zeros, each key its bias (0 where visible, -kHiddenKey where hidden; times
// the scale that is at least 1875 below every score for heads up to 256) and
// zeros, v zeros; the output's extra dimensions are dropped. A query whose
// window hides every key gets the mean of its look-around's values (the
// reference's softmax over equal values; slots outside the sequence are -1,
// as look_around pads them), put in place after the kernel.
// q, k, v: (rows, n, heads, d) views with the last dimension contiguous;
// key_mask: (rows, n) bool, true = visible; returns (rows, n, heads, d).
constexpr double kHiddenKey = 30000.0;  // finite in float16 and bfloat16

torch::Tensor exact_windows_masked(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                   const torch::Tensor& key_mask, int64_t ws, int64_t back, int64_t fwd, bool causal,
                                   double scale) {
  const int64_t rows = q.size(0), n = q.size(1), heads = q.size(2), d = q.size(3);
  auto o = q.options();
  auto widen = [&](const torch::Tensor& t, const torch::Tensor& first) {
    std::vector<torch::Tensor> parts{t};
    int64_t extra = 8;
    if (first.defined()) {
      parts.push_back(first);
      extra = 7;
    }
    parts.push_back(torch::zeros({1, 1, 1, 1}, o).expand({rows, n, heads, extra}));
    return torch::cat(parts, -1);
  };
  torch::Tensor bias = torch::where(key_mask, torch::zeros({}, o), torch::full({}, -kHiddenKey, o));
  torch::Tensor q8 = widen(q, torch::ones({1, 1, 1, 1}, o).expand({rows, n, heads, 1}));
  torch::Tensor k8 = widen(k, bias.view({rows, n, 1, 1}).expand({rows, n, heads, 1}));
  torch::Tensor v8 = widen(v, torch::Tensor());
  torch::Tensor out = std::get<0>(at::_flash_attention_forward(q8, k8, v8, {}, {}, n, n, 0.0, causal, false, scale,
                                                               ws * back, causal ? 0 : ws * fwd))
                          .narrow(-1, 0, d);
  // Blind queries: no visible key in [t - ws * back, t + ws * fwd] (.. t when
  // causal), counted from a prefix sum of the mask over the padded sequence.
  const int64_t windows = (n + ws - 1) / ws, n_pad = windows * ws, span = (back + fwd + 1) * ws;
  auto lo = key_mask.options().dtype(torch::kLong);
  torch::Tensor counts = torch::constant_pad_nd(key_mask.to(torch::kInt).cumsum(1, torch::kInt), {1, 0}, 0);
  torch::Tensor t = torch::arange(n, lo);
  torch::Tensor hi_idx = (t + (causal ? 0 : ws * fwd) + 1).clamp_max(n), lo_idx = (t - ws * back).clamp_min(0);
  torch::Tensor seen = counts.index_select(1, hi_idx).gt(counts.index_select(1, lo_idx));  // (rows, n)
  // Each window's look-around mean: window sums of the zero-padded v, windows
  // beyond the ends summing to -ws.
  torch::Tensor vp = n_pad == n ? v : torch::constant_pad_nd(v, {0, 0, 0, 0, 0, n_pad - n}, 0);
  torch::Tensor sums = vp.reshape({rows, windows, ws, heads, d}).sum(2, false, torch::kFloat);
  sums = torch::constant_pad_nd(sums, {0, 0, 0, 0, back, fwd}, -static_cast<double>(ws));
  torch::Tensor mean = sums.unfold(1, back + fwd + 1, 1).sum(-1).div_(static_cast<double>(span)).to(q.scalar_type());
  mean = mean.unsqueeze(2).expand({rows, windows, ws, heads, d}).reshape({rows, n_pad, heads, d}).narrow(1, 0, n);
  return torch::where(seen.view({rows, n, 1, 1}), out, mean);
}

#endif

#if COLT5_HAS_SDPA && defined(COLT5_WITH_CUDA)
// exact_windows_masked for LocalMHA's packed projection, its data movement on
// colt5's kernels (sliding_window_cuda.cu): q, k and v go from qkv (b, n,
// 3 * heads * d) into one buffer of heads d + 8 wide (the key mask as the
// score bias) in one kernel, the output comes back as (b, n, heads * d) with
// the blind queries' means in one more, and the backward does the same in
// reverse, writing the projection's gradient (b, n, 3 * heads * d) directly.
// The same flash kernel on the same inputs: the outputs are those of
// exact_windows_masked.
class SlidingMaskedQKVFunction : public torch::autograd::Function<SlidingMaskedQKVFunction> {
 public:
  static kernels::SlidingMaskParams params(int64_t b, int64_t n, at::ScalarType dtype, int64_t heads, int64_t d,
                                           int64_t ws, int64_t back, int64_t fwd, bool causal) {
    kernels::SlidingMaskParams p;
    p.batch = b;
    p.n = n;
    p.heads = heads;
    p.d = d;
    p.ws = ws;
    p.back = back;
    p.fwd = fwd;
    p.causal = causal;
    p.hidden_bias = static_cast<float>(kHiddenKey);
    p.dtype = row_dtype(dtype);
    return p;
  }

  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& qkv_in,
                               const torch::Tensor& mask, int64_t heads, int64_t d, int64_t ws, int64_t back,
                               int64_t fwd, bool causal, double scale) {
    c10::cuda::CUDAGuard guard(qkv_in.device());
    void* stream = c10::cuda::getCurrentCUDAStream().stream();
    torch::Tensor qkv = qkv_in.contiguous(), m = mask.contiguous();
    const auto p = params(qkv.size(0), qkv.size(1), qkv.scalar_type(), heads, d, ws, back, fwd, causal);
    const int64_t b = p.batch, n = p.n, windows = (n + ws - 1) / ws;
    torch::Tensor seen = torch::empty({b, n}, m.options());
    kernels::sliding_seen_cuda(p, m.data_ptr<bool>(), seen.data_ptr<bool>(), stream);
    torch::Tensor wide = torch::empty({3, b, n, heads, d + 8}, qkv.options());
    kernels::sliding_pack_qkv_cuda(p, qkv.data_ptr(), m.data_ptr<bool>(), wide.data_ptr(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    auto flash = at::_flash_attention_forward(wide[0], wide[1], wide[2], {}, {}, n, n, 0.0, causal, false, scale,
                                              ws * back, causal ? 0 : ws * fwd);
    torch::Tensor out8 = std::get<0>(flash);
    torch::Tensor sums = torch::empty({b, windows, heads * d}, qkv.options().dtype(torch::kFloat));
    const auto* v = static_cast<const char*>(qkv.data_ptr()) + 2 * heads * d * qkv.element_size();
    kernels::sliding_window_sums_cuda(p, v, 3 * heads * d, nullptr, sums.data_ptr<float>(), stream);
    torch::Tensor y = torch::empty({b, n, heads * d}, qkv.options());
    kernels::sliding_unpack_out_cuda(p, out8.data_ptr(), seen.data_ptr<bool>(), sums.data_ptr<float>(), y.data_ptr(),
                                     stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    ctx->save_for_backward({wide, out8, std::get<1>(flash), std::get<2>(flash), std::get<3>(flash), seen});
    ctx->saved_data["heads"] = heads;
    ctx->saved_data["d"] = d;
    ctx->saved_data["ws"] = ws;
    ctx->saved_data["back"] = back;
    ctx->saved_data["fwd"] = fwd;
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = scale;
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const torch::Tensor &wide = saved[0], &out8 = saved[1], &lse = saved[2], &rng = saved[3], &unused = saved[4],
                        &seen = saved[5];
    const int64_t heads = ctx->saved_data["heads"].toInt(), d = ctx->saved_data["d"].toInt();
    const int64_t ws = ctx->saved_data["ws"].toInt(), back = ctx->saved_data["back"].toInt(),
                  fwd = ctx->saved_data["fwd"].toInt();
    const bool causal = ctx->saved_data["causal"].toBool();
    const double scale = ctx->saved_data["scale"].toDouble();
    const int64_t b = wide.size(1), n = wide.size(2), windows = (n + ws - 1) / ws;
    c10::cuda::CUDAGuard guard(wide.device());
    void* stream = c10::cuda::getCurrentCUDAStream().stream();
    torch::Tensor gy = grads[0].to(wide.scalar_type()).contiguous();
    const auto p = params(b, n, wide.scalar_type(), heads, d, ws, back, fwd, causal);
    torch::Tensor g8 = torch::empty({b, n, heads, d + 8}, wide.options());
    kernels::sliding_pack_grad_cuda(p, gy.data_ptr(), seen.data_ptr<bool>(), g8.data_ptr(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    auto g = at::_flash_attention_backward(g8, wide[0], wide[1], wide[2], out8, lse, {}, {}, n, n, 0.0, causal, rng,
                                           unused, scale, ws * back, causal ? 0 : ws * fwd);
    torch::Tensor blind = torch::empty({b, windows, heads * d}, wide.options().dtype(torch::kFloat));
    kernels::sliding_window_sums_cuda(p, gy.data_ptr(), heads * d, seen.data_ptr<bool>(), blind.data_ptr<float>(),
                                      stream);
    torch::Tensor dqkv = torch::empty({b, n, 3 * heads * d}, wide.options());
    const torch::Tensor dq = std::get<0>(g).contiguous(), dk = std::get<1>(g).contiguous(),
                        dv = std::get<2>(g).contiguous();
    kernels::sliding_unpack_grads_cuda(p, dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), blind.data_ptr<float>(),
                                       dqkv.data_ptr(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {dqkv,
            torch::Tensor(),
            torch::Tensor(),
            torch::Tensor(),
            torch::Tensor(),
            torch::Tensor(),
            torch::Tensor(),
            torch::Tensor(),
            torch::Tensor()};
  }
};
#endif

#if COLT5_HAS_SDPA && defined(COLT5_WITH_CUDA)
// Exact windows (a key mask or none) straight from LocalMHA's packed
// projection on colt5's band kernels (band_attention_cuda.cu): no packing,
// no look-around and no copies of q, k and v around the kernels; y (b, n,
// heads * d) out, the projection's gradient (b, n, 3 * heads * d) back. A
// query whose window hides every key takes its look-around's mean (the
// window sums of v), as exact_windows_masked does. Float32 products in TF32
// where LibTorch allows TF32 matrix products (at the forward), else at
// float32 accuracy.
class BandAttentionFunction : public torch::autograd::Function<BandAttentionFunction> {
 public:
  static kernels::BandAttentionParams params(int64_t b, int64_t n, at::ScalarType dtype, int64_t heads, int64_t d,
                                             int64_t ws, int64_t back, int64_t fwd, bool causal, double scale,
                                             bool tf32) {
    kernels::BandAttentionParams p;
    p.batch = b;
    p.n = n;
    p.heads = heads;
    p.d = d;
    p.ws = ws;
    p.back = back;
    p.fwd = fwd;
    p.causal = causal;
    p.scale = static_cast<float>(scale);
    p.tf32 = tf32;
    p.dtype = row_dtype(dtype);
    return p;
  }

  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& qkv_in,
                               const torch::Tensor& mask, int64_t heads, int64_t d, int64_t ws, int64_t back,
                               int64_t fwd, bool causal, double scale) {
    c10::cuda::CUDAGuard guard(qkv_in.device());
    void* stream = c10::cuda::getCurrentCUDAStream().stream();
    torch::Tensor qkv = qkv_in.contiguous();
    const bool tf32 = at::globalContext().allowTF32CuBLAS();
    auto p = params(qkv.size(0), qkv.size(1), qkv.scalar_type(), heads, d, ws, back, fwd, causal, scale, tf32);
    torch::Tensor m, sums;
    if (mask.numel() > 0) {  // (b, n); empty: no mask
      const int64_t windows = (p.n + ws - 1) / ws;
      // The window sums of v for the blind queries' means (sliding_window_cuda.cu).
      const auto sp =
          SlidingMaskedQKVFunction::params(p.batch, p.n, qkv.scalar_type(), heads, d, ws, back, fwd, causal);
      m = mask.contiguous();
      p.mask = m.data_ptr<bool>();
      sums = torch::empty({p.batch, windows, heads * d}, qkv.options().dtype(torch::kFloat));
      const auto* v = static_cast<const char*>(qkv.data_ptr()) + 2 * heads * d * qkv.element_size();
      kernels::sliding_window_sums_cuda(sp, v, 3 * heads * d, nullptr, sums.data_ptr<float>(), stream);
      p.v_sums = sums.data_ptr<float>();
    }
    torch::Tensor y = torch::empty({p.batch, p.n, heads * d}, qkv.options());
    torch::Tensor lse = torch::empty({p.batch, heads, p.n}, qkv.options().dtype(torch::kFloat));
    p.qkv = qkv.data_ptr();
    p.y = y.data_ptr();
    p.lse = lse.data_ptr<float>();
    kernels::band_attention_forward_cuda(p, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    ctx->save_for_backward({qkv, y, lse, m});
    ctx->saved_data["heads"] = heads;
    ctx->saved_data["d"] = d;
    ctx->saved_data["ws"] = ws;
    ctx->saved_data["back"] = back;
    ctx->saved_data["fwd"] = fwd;
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["tf32"] = tf32;
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const torch::Tensor &qkv = saved[0], &y = saved[1], &lse = saved[2], &m = saved[3];
    const int64_t heads = ctx->saved_data["heads"].toInt(), d = ctx->saved_data["d"].toInt();
    c10::cuda::CUDAGuard guard(qkv.device());
    void* stream = c10::cuda::getCurrentCUDAStream().stream();
    auto p = params(qkv.size(0), qkv.size(1), qkv.scalar_type(), heads, d, ctx->saved_data["ws"].toInt(),
                    ctx->saved_data["back"].toInt(), ctx->saved_data["fwd"].toInt(), ctx->saved_data["causal"].toBool(),
                    ctx->saved_data["scale"].toDouble(), ctx->saved_data["tf32"].toBool());
    torch::Tensor gy = grads[0].to(qkv.scalar_type()).contiguous();
    torch::Tensor blind;
    if (m.defined()) {
      const auto sp =
          SlidingMaskedQKVFunction::params(p.batch, p.n, qkv.scalar_type(), heads, d, p.ws, p.back, p.fwd, p.causal);
      torch::Tensor seen = torch::empty({p.batch, p.n}, m.options());
      kernels::sliding_seen_cuda(sp, m.data_ptr<bool>(), seen.data_ptr<bool>(), stream);
      blind = torch::empty({p.batch, (p.n + p.ws - 1) / p.ws, heads * d}, qkv.options().dtype(torch::kFloat));
      kernels::sliding_window_sums_cuda(sp, gy.data_ptr(), heads * d, seen.data_ptr<bool>(), blind.data_ptr<float>(),
                                        stream);
      p.mask = m.data_ptr<bool>();
      p.blind_sums = blind.data_ptr<float>();
    }
    // k's and v's gradients summed in float32: in dqkv itself for float32,
    // else in a buffer cast into it afterwards.
    const bool direct = qkv.scalar_type() == torch::kFloat;
    torch::Tensor dqkv = direct ? torch::zeros({p.batch, p.n, 3 * heads * d}, qkv.options())
                                : torch::empty({p.batch, p.n, 3 * heads * d}, qkv.options());
    torch::Tensor dkv;
    if (direct) {
      p.dkv = dqkv.data_ptr<float>() + heads * d;
      p.dkv_row = 3 * heads * d;
    } else {
      dkv = torch::zeros({p.batch, p.n, 2 * heads * d}, qkv.options().dtype(torch::kFloat));
      p.dkv = dkv.data_ptr<float>();
      p.dkv_row = 2 * heads * d;
    }
    p.qkv = qkv.data_ptr();
    p.y_in = y.data_ptr();
    p.gy = gy.data_ptr();
    p.lse = lse.data_ptr<float>();
    p.dqkv = dqkv.data_ptr();
    kernels::band_attention_backward_cuda(p, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    torch::autograd::variable_list out(9);  // none for the mask and the settings
    out[0] = dqkv;
    return out;
  }
};
#endif

#if COLT5_HAS_SDPA && defined(COLT5_WITH_CUDA)
// Exact windows with a key mask for LocalMHA's packed projection in
// float16/bfloat16 (band_attention_cuda.cu, register tiles): the forward and
// the backward straight from the projection and into its gradient, every block
// of 64 rows with the mask applied per score (no packing, no flash call). The
// blocks of 64 queries whose band holds a hidden key are listed once in the
// forward: only they can hold a blind query, whose look-around mean needs v's
// (forward) and the output gradient's (backward) window sums.
class WindowTileFunction : public torch::autograd::Function<WindowTileFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& qkv_in,
                               const torch::Tensor& mask, int64_t heads, int64_t d, int64_t ws, int64_t back,
                               int64_t fwd, bool causal, double scale) {
    c10::cuda::CUDAGuard guard(qkv_in.device());
    void* stream = c10::cuda::getCurrentCUDAStream().stream();
    torch::Tensor qkv = qkv_in.contiguous(), m = mask.contiguous();
    auto p = BandAttentionFunction::params(qkv.size(0), qkv.size(1), qkv.scalar_type(), heads, d, ws, back, fwd, causal,
                                           scale, false);
    // per_row: the band kernels' blocks of 64 queries in a row.
    const int64_t b = p.batch, n = p.n, per_row = (n + 63) / 64, windows = (n + ws - 1) / ws;
    auto on_device = qkv.options();
    torch::Tensor flags = torch::empty({b, per_row}, on_device.dtype(torch::kByte));
    p.mask = m.numel() > 0 ? m.data_ptr<bool>() : nullptr;  // empty: no mask
    kernels::window_tile_list_cuda(p, flags.data_ptr<uint8_t>(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    torch::Tensor out = torch::empty({b, n, heads, d}, qkv.options());
    torch::Tensor lse = torch::empty({b, heads, n}, qkv.options().dtype(torch::kFloat));
    torch::Tensor sums = torch::empty({b, windows, heads * d}, lse.options());
    p.qkv = qkv.data_ptr();
    p.y = out.data_ptr();
    p.lse = lse.data_ptr<float>();
    p.v_sums = sums.data_ptr<float>();
    kernels::window_tile_forward_cuda(p, flags.data_ptr<uint8_t>(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    ctx->save_for_backward({qkv, out, lse, m, flags});
    ctx->saved_data["heads"] = heads;
    ctx->saved_data["d"] = d;
    ctx->saved_data["ws"] = ws;
    ctx->saved_data["back"] = back;
    ctx->saved_data["fwd"] = fwd;
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = scale;
    return out.view({b, n, heads * d});
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor qkv = saved[0], out = saved[1], lse = saved[2], m = saved[3], flags = saved[4];
    const int64_t heads = ctx->saved_data["heads"].toInt(), d = ctx->saved_data["d"].toInt();
    const int64_t ws = ctx->saved_data["ws"].toInt(), back = ctx->saved_data["back"].toInt(),
                  fwd = ctx->saved_data["fwd"].toInt();
    const bool causal = ctx->saved_data["causal"].toBool();
    const double scale = ctx->saved_data["scale"].toDouble();
    c10::cuda::CUDAGuard guard(qkv.device());
    void* stream = c10::cuda::getCurrentCUDAStream().stream();
    auto p = BandAttentionFunction::params(qkv.size(0), qkv.size(1), qkv.scalar_type(), heads, d, ws, back, fwd, causal,
                                           scale, false);
    const int64_t b = p.batch, n = p.n, windows = (n + ws - 1) / ws;
    torch::Tensor gy = grads[0].to(qkv.scalar_type()).contiguous();
    torch::Tensor dqkv = torch::empty({b, n, 3 * heads * d}, qkv.options());
    torch::Tensor blind, wflags;
    p.mask = m.numel() > 0 ? m.data_ptr<bool>() : nullptr;
    if (p.mask) {
      blind = torch::empty({b, windows, heads * d}, lse.options());
      wflags = torch::empty({b, windows}, flags.options());
      p.blind_sums = blind.data_ptr<float>();
    }
    p.qkv = qkv.data_ptr();
    p.y_in = out.data_ptr();
    p.gy = gy.data_ptr();
    p.lse = lse.data_ptr<float>();
    p.dqkv = dqkv.data_ptr();
    torch::Tensor dots = torch::empty({b, heads, n}, lse.options());
    kernels::window_tile_backward_cuda(p, flags.data_ptr<uint8_t>(), p.mask ? wflags.data_ptr<uint8_t>() : nullptr,
                                       dots.data_ptr<float>(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    torch::autograd::variable_list result(9);  // none for the mask and the settings
    result[0] = dqkv;
    return result;
  }
};
#endif

#if COLT5_HAS_SDPA
// Causal windows of one look-back without a mask (the autoregressive light
// branch) straight from LocalMHA's packed projection: query t of window w sees
// window w - 1 whole and window w up to t. Two flash calls over views of qkv
// (no copy): A, every window over its own keys, causal; B, over the flattened
// (batch * n) rows, window g's queries over window g - 1's keys, whole. The
// two are merged by their log-sum-exps (a window whose partner is in another
// sequence, or none, keeps A's alone) into (b, n, heads * d). The backward
// runs each call's flash backward with the merged output and log-sum-exp
// (which makes each the exact gradient of its part; B's excluded pairs get
// +inf and so nothing) and sums them into the projection's gradient. The same
// attention as the look-around windows. On CUDA (float16/bfloat16) the flash
// kernel with the merge and the sum in one kernel each
// (sliding_window_cuda.cu); on the CPU LibTorch's CPU flash kernel (any
// floating type) with both as tensor operations.
class CausalWindowsFunction : public torch::autograd::Function<CausalWindowsFunction> {
 public:
  // q, k, v of qkv (b, n, 3 * heads * d) as (windows, ws, heads, d) views of
  // rows [first, first + windows * ws) of the flattened sequence.
  static torch::Tensor part(const torch::Tensor& qkv, int64_t which, int64_t heads, int64_t d, int64_t ws,
                            int64_t first, int64_t windows) {
    const int64_t rows = qkv.size(0) * qkv.size(1);
    return qkv.view({rows, 3, heads, d}).select(1, which).narrow(0, first, windows * ws).view({windows, ws, heads, d});
  }

  // The same for rows of (b, n, heads * d).
  static torch::Tensor rows_of(const torch::Tensor& t, int64_t heads, int64_t d, int64_t ws, int64_t first,
                               int64_t windows) {
    return t.view({t.size(0) * t.size(1), heads, d}).narrow(0, first, windows * ws).view({windows, ws, heads, d});
  }

  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& qkv_in, int64_t heads,
                               int64_t d, int64_t ws, double scale) {
    torch::Tensor qkv = qkv_in.contiguous();
    const int64_t b = qkv.size(0), n = qkv.size(1), g = b * n / ws;
    auto q = [&](int64_t which, int64_t first, int64_t count) { return part(qkv, which, heads, d, ws, first, count); };
    torch::Tensor y, lse, lse_b;
    std::vector<torch::Tensor> rng;
    if (qkv.is_cuda()) {
#ifdef COLT5_WITH_CUDA
      c10::cuda::CUDAGuard guard(qkv.device());
      auto a =
          at::_flash_attention_forward(q(0, 0, g), q(1, 0, g), q(2, 0, g), {}, {}, ws, ws, 0.0, true, false, scale);
      auto bb = at::_flash_attention_forward(q(0, ws, g - 1), q(1, 0, g - 1), q(2, 0, g - 1), {}, {}, ws, ws, 0.0,
                                             false, false, scale);
      const torch::Tensor oa = std::get<0>(a).contiguous(), ob = std::get<0>(bb).contiguous();
      const torch::Tensor la = std::get<1>(a).contiguous(), lb = std::get<1>(bb).contiguous();
      TORCH_CHECK(
          la.sizes() == torch::IntArrayRef({g, heads, ws}) && lb.sizes() == torch::IntArrayRef({g - 1, heads, ws}),
          "LocalMHA: the flash kernel's log-sum-exp is ", la.sizes(), ", expected (", g, ", ", heads, ", ", ws,
          "); set split_causal_windows(false)");
      y = torch::empty({b, n, heads * d}, qkv.options());
      lse = torch::empty({g, heads, ws}, la.options());
      lse_b = torch::empty({g - 1, heads, ws}, la.options());
      kernels::causal_windows_merge_cuda(
          SlidingMaskedQKVFunction::params(b, n, qkv.scalar_type(), heads, d, ws, 1, 0, true), oa.data_ptr(),
          ob.data_ptr(), la.data_ptr<float>(), lb.data_ptr<float>(), y.data_ptr(), lse.data_ptr<float>(),
          lse_b.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      rng = {std::get<2>(a), std::get<3>(a), std::get<2>(bb), std::get<3>(bb)};
#endif
    } else {
      // LibTorch's CPU flash kernel takes (batch, heads, seq, d).
      auto t = [](const torch::Tensor& v) { return v.transpose(1, 2); };
      auto a = at::_scaled_dot_product_flash_attention_for_cpu(t(q(0, 0, g)), t(q(1, 0, g)), t(q(2, 0, g)), 0.0, true,
                                                               {}, scale);
      auto bb = at::_scaled_dot_product_flash_attention_for_cpu(t(q(0, ws, g - 1)), t(q(1, 0, g - 1)),
                                                                t(q(2, 0, g - 1)), 0.0, false, {}, scale);
      const torch::Tensor &la = std::get<1>(a), &lb = std::get<1>(bb);
      const double inf = std::numeric_limits<double>::infinity();
      // B's log-sum-exp on A's windows (window g - 1's on window g), -inf
      // where a window has no partner.
      torch::Tensor lb_on_a = torch::full({g, heads, ws}, -inf, la.options());
      lb_on_a.narrow(0, 1, g - 1).copy_(lb);
      lb_on_a.view({b, g / b, heads, ws}).select(1, 0).fill_(-inf);
      lse = torch::logaddexp(la, lb_on_a);
      // A's share everywhere, B's (zero where excluded) added on windows 1 ..
      torch::Tensor out = std::get<0>(a) * (la - lse).exp().unsqueeze(-1);
      out.narrow(0, 1, g - 1)
          .addcmul_(std::get<0>(bb), (lb_on_a.narrow(0, 1, g - 1) - lse.narrow(0, 1, g - 1)).exp().unsqueeze(-1));
      y = t(out).to(qkv.scalar_type()).reshape({b, n, heads * d});
      torch::Tensor lse_excl = lse.clone();
      lse_excl.view({b, g / b, heads, ws}).select(1, 0).fill_(inf);
      lse_b = lse_excl.narrow(0, 1, g - 1);
    }
    std::vector<torch::Tensor> saved{qkv, y, lse, lse_b};
    saved.insert(saved.end(), rng.begin(), rng.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["heads"] = heads;
    ctx->saved_data["d"] = d;
    ctx->saved_data["ws"] = ws;
    ctx->saved_data["scale"] = scale;
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const torch::Tensor &qkv = saved[0], &y = saved[1], &lse = saved[2], &lse_b = saved[3];
    const int64_t heads = ctx->saved_data["heads"].toInt(), d = ctx->saved_data["d"].toInt(),
                  ws = ctx->saved_data["ws"].toInt();
    const double scale = ctx->saved_data["scale"].toDouble();
    const int64_t b = qkv.size(0), n = qkv.size(1), g = b * n / ws;
    torch::Tensor gy = grads[0].to(qkv.scalar_type()).contiguous();
    auto q = [&](int64_t which, int64_t first, int64_t count) { return part(qkv, which, heads, d, ws, first, count); };
    auto rows = [&](const torch::Tensor& t, int64_t first, int64_t count) {
      return rows_of(t, heads, d, ws, first, count);
    };
    torch::Tensor dqkv;
    if (qkv.is_cuda()) {
#ifdef COLT5_WITH_CUDA
      c10::cuda::CUDAGuard guard(qkv.device());
      auto ga = at::_flash_attention_backward(rows(gy, 0, g), q(0, 0, g), q(1, 0, g), q(2, 0, g), rows(y, 0, g), lse,
                                              {}, {}, ws, ws, 0.0, true, saved[4], saved[5], scale);
      auto gb = at::_flash_attention_backward(rows(gy, ws, g - 1), q(0, ws, g - 1), q(1, 0, g - 1), q(2, 0, g - 1),
                                              rows(y, ws, g - 1), lse_b, {}, {}, ws, ws, 0.0, false, saved[6], saved[7],
                                              scale);
      const torch::Tensor dqa = std::get<0>(ga).contiguous(), dka = std::get<1>(ga).contiguous(),
                          dva = std::get<2>(ga).contiguous(), dqb = std::get<0>(gb).contiguous(),
                          dkb = std::get<1>(gb).contiguous(), dvb = std::get<2>(gb).contiguous();
      dqkv = torch::empty({b, n, 3 * heads * d}, qkv.options());
      kernels::causal_windows_grads_cuda(
          SlidingMaskedQKVFunction::params(b, n, qkv.scalar_type(), heads, d, ws, 1, 0, true), dqa.data_ptr(),
          dka.data_ptr(), dva.data_ptr(), dqb.data_ptr(), dkb.data_ptr(), dvb.data_ptr(), dqkv.data_ptr(),
          c10::cuda::getCurrentCUDAStream().stream());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
    } else {
      auto t = [](const torch::Tensor& v) { return v.transpose(1, 2); };
      auto ga = at::_scaled_dot_product_flash_attention_for_cpu_backward(
          t(rows(gy, 0, g)), t(q(0, 0, g)), t(q(1, 0, g)), t(q(2, 0, g)), t(rows(y, 0, g)), lse, 0.0, true, {}, scale);
      auto gb = at::_scaled_dot_product_flash_attention_for_cpu_backward(
          t(rows(gy, ws, g - 1)), t(q(0, ws, g - 1)), t(q(1, 0, g - 1)), t(q(2, 0, g - 1)), t(rows(y, ws, g - 1)),
          lse_b, 0.0, false, {}, scale);
      // (windows, heads, ws, d) gradients; B's queries are one window on,
      // its keys and values one window back.
      // A's gradients are this call's own tensors: B's are added to them in place.
      torch::Tensor &dq = std::get<0>(ga), &dk = std::get<1>(ga), &dv = std::get<2>(ga);
      dq.narrow(0, 1, g - 1).add_(std::get<0>(gb));
      dk.narrow(0, 0, g - 1).add_(std::get<1>(gb));
      dv.narrow(0, 0, g - 1).add_(std::get<2>(gb));
      dqkv = torch::stack({t(dq), t(dk), t(dv)}, 2).to(qkv.scalar_type()).reshape({b, n, 3 * heads * d});
    }
    return {dqkv, torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};
#endif

// Zero-pads dimension `dim` of t up to a multiple of `multiple`.
torch::Tensor pad_to_multiple(const torch::Tensor& t, int64_t multiple, int64_t dim, double value) {
  const int64_t len = t.size(dim);
  const int64_t rem = (multiple - len % multiple) % multiple;
  if (rem == 0) return t;
  const int64_t d = dim < 0 ? dim + t.dim() : dim;
  std::vector<int64_t> pad(2 * (t.dim() - d), 0);
  pad[pad.size() - 1] = rem;
  return torch::constant_pad_nd(t, pad, value);
}

}  // namespace

// ---------------------------------------------------------------- SinusoidalEmbeddings

SinusoidalEmbeddingsImpl::SinusoidalEmbeddingsImpl(const SinusoidalEmbeddingsOptions& options_) : options(options_) {
  reset();
}

void SinusoidalEmbeddingsImpl::pretty_print(std::ostream& stream) const {
  stream << "colt5::nn::SinusoidalEmbeddings(dim=" << options.dim() << ", theta=" << options.theta()
         << ", use_xpos=" << (options.use_xpos() ? "true" : "false") << ")";
}

void SinusoidalEmbeddingsImpl::reset() {
  const int64_t dim = options.dim();
  TORCH_CHECK(dim > 0 && dim % 2 == 0, "SinusoidalEmbeddings: dim must be positive and even, got ", dim);
  TORCH_CHECK(!options.use_xpos() || (options.scale_base() && *options.scale_base() > 0),
              "SinusoidalEmbeddings: use_xpos needs a positive scale_base");
  auto exponent = torch::arange(0, dim, 2, torch::kFloat) / static_cast<double>(dim);
  inv_freq = register_buffer("inv_freq", 1.0 / torch::pow(options.theta(), exponent));
}

std::pair<torch::Tensor, torch::Tensor> SinusoidalEmbeddingsImpl::forward(int64_t seq_len) {
  TORCH_CHECK(seq_len >= 0, "SinusoidalEmbeddings: seq_len must be non-negative, got ", seq_len);
  auto t = torch::arange(seq_len, inv_freq.options());
  auto freqs = torch::outer(t, inv_freq);
  freqs = torch::cat({freqs, freqs}, -1);
  if (!options.use_xpos()) return {freqs, torch::Tensor()};
  const int64_t dim = options.dim();
  // Computed in float32 as the reference's (non-saved) buffer, then converted.
  auto base =
      ((torch::arange(0, dim, 2, torch::kLong) + 0.4 * static_cast<double>(dim)) / (1.4 * static_cast<double>(dim)))
          .to(inv_freq.device(), inv_freq.scalar_type());
  auto power = (t - static_cast<double>(seq_len / 2)) / *options.scale_base();
  auto scale = torch::pow(base, power.unsqueeze(-1));
  return {freqs, torch::cat({scale, scale}, -1)};
}

// ---------------------------------------------------------------- LocalAttention

LocalAttentionImpl::LocalAttentionImpl(const LocalAttentionOptions& options_) : options(options_) { reset(); }

int64_t LocalAttentionImpl::look_forward() const { return options.look_forward().value_or(options.causal() ? 0 : 1); }

void LocalAttentionImpl::reset() {
  window_masks_ = std::make_shared<detail::LocalWindowMasks>();
  check_positive("LocalAttention", "window_size", options.window_size());
  TORCH_CHECK(options.look_backward() >= 0, "LocalAttention: look_backward must be non-negative, got ",
              options.look_backward());
  TORCH_CHECK(look_forward() >= 0, "LocalAttention: look_forward must be non-negative, got ", look_forward());
  TORCH_CHECK(!(options.causal() && look_forward() > 0), "LocalAttention: a causal attention cannot look forward (",
              "look_forward = ", look_forward(), ")");
  rel_pos = nullptr;
  if (options.use_rotary_pos_emb() && options.dim()) {
    const int64_t scale_base = options.xpos_scale_base().value_or(options.window_size() / 2);
    rel_pos = register_module("rel_pos", SinusoidalEmbeddings(SinusoidalEmbeddingsOptions(*options.dim())
                                                                  .use_xpos(options.use_xpos())
                                                                  .scale_base(static_cast<double>(scale_base))));
  }
}

void LocalAttentionImpl::pretty_print(std::ostream& stream) const {
  stream << "colt5::nn::LocalAttention(window_size=" << options.window_size() << ", causal=" << options.causal()
         << ", look_backward=" << options.look_backward() << ", look_forward=" << look_forward()
         << ", exact_windowsize=" << options.exact_windowsize() << ")";
}

torch::Tensor LocalAttentionImpl::forward(const torch::Tensor& q_in, const torch::Tensor& k_in,
                                          const torch::Tensor& v_in, const torch::Tensor& mask_in) {
  RECORD_USER_SCOPE("colt5::local_attention");
  TORCH_CHECK(q_in.defined() && k_in.defined() && v_in.defined(), "LocalAttention: q, k and v must be defined");
  TORCH_CHECK(at::isFloatingType(q_in.scalar_type()), "LocalAttention: q must be floating point, got ",
              q_in.scalar_type());
  TORCH_CHECK(q_in.dim() >= 2, "LocalAttention: q must be (..., seq, dim_head), got ", q_in.sizes());
  TORCH_CHECK(q_in.sizes() == k_in.sizes() && q_in.sizes() == v_in.sizes(),
              "LocalAttention: q, k and v must have the same shape, got ", q_in.sizes(), ", ", k_in.sizes(), ", ",
              v_in.sizes());
  TORCH_CHECK(q_in.scalar_type() == k_in.scalar_type() && q_in.scalar_type() == v_in.scalar_type(),
              "LocalAttention: q, k and v must share a dtype");
  const int64_t ws = options.window_size(), back = options.look_backward(), fwd = look_forward();
  const int64_t orig_n = q_in.size(-2), d = q_in.size(-1);
  TORCH_CHECK(orig_n >= 1, "LocalAttention: the sequence is empty");
  TORCH_CHECK(options.autopad() || orig_n % ws == 0, "LocalAttention: sequence length ", orig_n,
              " must be divisible by the window size ", ws, " (or turn on autopad)");

  const int64_t folded_rows = q_in.numel() / (orig_n * d);
  const double scale = options.scale().value_or(std::pow(static_cast<double>(d), -0.5));
  if (mask_in.defined()) {
    TORCH_CHECK(mask_in.scalar_type() == at::kBool, "LocalAttention: mask must be a bool tensor, got ",
                mask_in.scalar_type());
    TORCH_CHECK(mask_in.dim() == 2 && mask_in.size(1) == orig_n, "LocalAttention: mask must be (b, ", orig_n, "), got ",
                mask_in.sizes());
    TORCH_CHECK(mask_in.size(0) > 0 && folded_rows % mask_in.size(0) == 0, "LocalAttention: mask batch ",
                mask_in.size(0), " must divide the ", folded_rows, " folded batch-head rows");
    TORCH_CHECK(mask_in.device() == q_in.device(), "LocalAttention: mask is on ", mask_in.device(), " but q is on ",
                q_in.device());
  }

#if COLT5_HAS_SDPA
  // Exact windows are a sliding window over the sequence: query t sees keys
  // t - window * look_backward .. t + window * look_forward (.. t when causal).
  // The flash kernel's sliding window does that with no look-around and no
  // mask tensor, reading q, k and v in (batch, seq, heads, dim) order: (b, h,
  // n, d) inputs (LocalMHA's layout) with a (b, n) mask or none as transposed
  // views (no copy), other inputs as (rows, n, 1, d) with the mask's rows
  // spread over the heads folded after them. A key mask enters as a score
  // bias (exact_windows_masked).
  const bool sliding =
      options.exact_windowsize() && !rel_pos && flash_supports(q_in, k_in, v_in, d) &&
      (mask_in.defined() ? options.sliding_window() && d + 8 <= 256 : options.sliding_window() || options.causal());
  if (sliding) {
    const bool causal = options.causal();
    const bool by_head = q_in.dim() == 4 && (!mask_in.defined() || mask_in.size(0) == q_in.size(0));
    auto seq_major = [&](const torch::Tensor& t) {
      return by_head ? t.transpose(1, 2) : t.reshape({folded_rows, orig_n, 1, d});
    };
    torch::Tensor out;
    if (mask_in.defined()) {
      torch::Tensor key_mask = mask_in;
      if (!by_head && mask_in.size(0) != folded_rows) {
        const int64_t per = folded_rows / mask_in.size(0);
        key_mask = mask_in.unsqueeze(1).expand({mask_in.size(0), per, orig_n}).reshape({folded_rows, orig_n});
      }
      out = exact_windows_masked(seq_major(q_in), seq_major(k_in), seq_major(v_in), key_mask, ws, back, fwd, causal,
                                 scale);
    } else {
      // Not causal, an autopadded sequence keeps its zero keys/values (they
      // are visible to the last queries, as in the windows); causal, they
      // come after every real query and the sequence is used as it is.
      const int64_t n_pad = causal || !options.autopad() ? orig_n : (orig_n + ws - 1) / ws * ws;
      auto padded = [&](const torch::Tensor& t) {
        torch::Tensor s = seq_major(t);
        return n_pad == orig_n ? s : torch::constant_pad_nd(s, {0, 0, 0, 0, 0, n_pad - orig_n}, 0);
      };
      out = std::get<0>(at::_flash_attention_forward(padded(q_in), padded(k_in), padded(v_in), {}, {}, n_pad, n_pad,
                                                     0.0, causal, false, scale, ws * back, causal ? 0 : ws * fwd));
      if (n_pad != orig_n) out = out.narrow(1, 0, orig_n);
    }
    return by_head ? out.transpose(1, 2) : out.reshape(q_in.sizes());
  }
#endif
  auto q = q_in.reshape({-1, orig_n, d});
  auto k = k_in.reshape({-1, orig_n, d});
  auto v = v_in.reshape({-1, orig_n, d});
  if (options.autopad()) {
    q = pad_to_multiple(q, ws, -2, 0);
    k = pad_to_multiple(k, ws, -2, 0);
    v = pad_to_multiple(v, ws, -2, 0);
  }
  const int64_t B = q.size(0), n = q.size(1), windows = n / ws;

#if COLT5_HAS_SDPA
  const bool fused = q.scalar_type() != torch::kDouble;
#else
  const bool fused = false;
#endif
  // The fused path passes the scale to the attention and takes the windows'
  // keys/values as views; the float64 path is the reference's arithmetic.
  auto bq = q.view({B, windows, ws, d});
  if (!fused) bq = bq * scale;
#if COLT5_HAS_SDPA
  // Nothing to hide but the windows' own limits: no mask at all. Causal windows
  // need the flash kernel's lower-right limit (CUDA, half precision).
  if (fused && !mask_in.defined() && !rel_pos && !options.exact_windowsize() &&
      (!options.causal() || flash_supports(q, k, v, d))) {
    auto out = windows_without_mask(bq, k, v, back, fwd, options.causal(), scale).reshape({B, n, d});
    if (n != orig_n) out = out.narrow(1, 0, orig_n);
    return out.reshape(q_in.sizes());
  }
#endif

  auto around = [&](const torch::Tensor& t) {
#if COLT5_HAS_SDPA
    if (fused) return look_around_view(t.view({B, windows, ws, d}), back, fwd, -1);
#endif
    return look_around(t.view({B, windows, ws, d}), back, fwd, -1);
  };
  auto bk = around(k);
  auto bv = around(v);

  if (rel_pos) {
    auto emb = rel_pos->forward(bk.size(-2));
    const auto& freqs = emb.first;
    auto q_freqs = freqs.narrow(0, freqs.size(0) - ws, ws);
    if (emb.second.defined()) {
      const auto& xscale = emb.second;
      auto inv_scale = xscale.pow(-1);
      auto q_scale = xscale.narrow(0, xscale.size(0) - ws, ws);
      bq = bq * q_freqs.cos() * q_scale + rotate_half(bq) * q_freqs.sin() * q_scale;
      bk = bk * freqs.cos() * inv_scale + rotate_half(bk) * freqs.sin() * inv_scale;
    } else {
      bq = bq * q_freqs.cos() + rotate_half(bq) * q_freqs.sin();
      bk = bk * freqs.cos() + rotate_half(bk) * freqs.sin();
    }
  }

  // What a query may not see regardless of the input, in two small factors:
  // look-around slots outside the sequence (1, windows, 1, span) and the
  // causal or exact-window limits (1, 1, ws, span), which depend only on the
  // query's place in its window and the slot. Kept between calls (per length,
  // device, stream and inference mode); never while a CUDA graph is being
  // captured: a graph would read the kept tensors at every replay, after a
  // later call may have replaced (and freed) them.
  const int64_t span = (back + fwd + 1) * ws;
  detail::WindowMaskSet masks;
  const bool kept = !capturing(q.device());
  std::unique_lock<std::mutex> lock(window_masks_->mutex, std::defer_lock);
  if (kept) {
    lock.lock();
    masks = window_masks_->set;
  }
  const c10::StreamId stream = current_stream_id(q.device());
  const bool inference = c10::InferenceMode::is_enabled();
  if (masks.n != n || masks.device != q.device() || masks.stream != stream || masks.inference != inference) {
    masks = detail::WindowMaskSet();
    auto lo = q.options().dtype(torch::kLong);
    auto p = (torch::arange(windows, lo).view({1, windows, 1, 1}) - back) * ws + torch::arange(span, lo);
    masks.pad = p.lt(0).logical_or_(p.ge(n));
    auto diff = torch::arange(span, lo).view({1, 1, 1, span}) - torch::arange(ws, lo).view({1, 1, ws, 1});
    if (options.causal()) {  // query t = w * ws + i, key p = (w - back) * ws + j: t < p, and p + ws * back < t
      masks.limit = diff.gt(back * ws);
      if (options.exact_windowsize()) masks.limit.logical_or_(diff.lt(0));
    } else if (options.exact_windowsize()) {  // p - ws * fwd > t, and p + ws * back < t
      masks.limit = diff.gt((back + fwd) * ws).logical_or_(diff.lt(0));
    }
    if (masks.limit.defined()) masks.allow = masks.limit.logical_not();
    masks.n = n;
    masks.device = q.device();
    masks.stream = stream;
    masks.inference = inference;
  }
  if (!masks.fill.defined() || masks.fill.scalar_type() != bq.scalar_type()) {
    // Hidden entries take the most negative finite value, as in the reference
    // (a query that sees nothing averages its whole look-around uniformly).
    // In the fused path the value is finite in bf16 too, where autocast may
    // cast it: bf16's most negative value for float32 and bf16, float16's for
    // float16.
    const double fill =
        !fused || bq.scalar_type() == torch::kHalf ? most_negative(bq.scalar_type()) : most_negative(torch::kBFloat16);
    masks.fill = torch::full({}, fill, bq.options());
    masks.zero = torch::zeros({}, bq.options());
  }
  if (kept) {
    window_masks_->set = masks;
    lock.unlock();
  }
  const torch::Tensor &pad_slots = masks.pad, &limits = masks.limit, &allowed = masks.allow, &fill_t = masks.fill;
  [[maybe_unused]] const torch::Tensor& zero_t = masks.zero;  // the fused path's

  // visible (mask rows, windows, ws or 1, span): the slots a query may see;
  // seen: whether it sees any. Without a key mask every query sees its own
  // position.
  torch::Tensor visible, seen;
  int64_t mask_rows = 1;
  if (mask_in.defined()) {
    mask_rows = mask_in.size(0);
    torch::Tensor mask_p = options.autopad() ? pad_to_multiple(mask_in, ws, -1, 0) : mask_in;
    // Each window's look-around of the key mask, slots outside the sequence false.
    torch::Tensor keys = torch::constant_pad_nd(mask_p, {back * ws, fwd * ws}, 0).unfold(1, span, ws).unsqueeze(2);
    visible = allowed.defined() ? keys.logical_and(allowed) : keys;
    seen = visible.any(-1, /*keepdim=*/true);
  }
  const int64_t heads_per_mask = B / mask_rows;
  // (mask rows, ...) -> (B, ...): heads are folded after the batch.
  auto per_row = [&](const torch::Tensor& t) {
    if (heads_per_mask == 1 || t.size(0) == 1) return t;
    std::vector<int64_t> shape = t.sizes().vec();
    shape.insert(shape.begin() + 1, heads_per_mask);
    std::vector<int64_t> folded = t.sizes().vec();
    folded[0] = B;
    return t.unsqueeze(1).expand(shape).reshape(folded);
  };

  torch::Tensor out;
#if COLT5_HAS_SDPA
  if (fused) {
    // Fused attention with an additive mask. A query that sees nothing (the
    // reference's softmax over equal values: a uniform average of the
    // look-around, and no gradient to q or k) sees every key inside the kernel
    // instead: with all hidden, a kernel's backward can give NaN (float16
    // through cuDNN, measured), which no zero upstream gradient cancels. Its
    // average is put in place after.
    torch::Tensor additive;
    if (visible.defined()) {
      additive = per_row(torch::where(visible, zero_t, torch::where(seen, fill_t, zero_t)));
    } else {
      torch::Tensor hidden = limits.defined() ? pad_slots.logical_or(limits) : pad_slots;
      additive = torch::where(hidden, fill_t, zero_t);
    }
    const double sdpa_scale = rel_pos ? 1.0 : scale;
    if (rel_pos) bq = bq * scale;
    out = at::scaled_dot_product_attention(bq, bk, bv, additive, 0.0, false, sdpa_scale);
    if (seen.defined()) {
      // (mask rows, heads, windows, ws, d): blind queries take the mean of their look-around.
      auto by_row = [&](const torch::Tensor& t) { return t.view({mask_rows, heads_per_mask, windows, t.size(2), d}); };
      out = torch::where(seen.unsqueeze(1), by_row(out), by_row(bv.mean(-2, /*keepdim=*/true)));
    }
    out = out.reshape({B, n, d});
  }
#endif
  if (!out.defined()) {
    torch::Tensor hidden = visible.defined()  ? per_row(visible.logical_not())
                           : limits.defined() ? pad_slots.logical_or(limits)
                                              : pad_slots;
    auto sim = torch::matmul(bq, bk.transpose(-1, -2)).masked_fill(hidden, fill_t);
    out = torch::matmul(sim.softmax(-1), bv).reshape({B, n, d});
  }
  if (n != orig_n) out = out.narrow(1, 0, orig_n);
  return out.reshape(q_in.sizes());
}

// ---------------------------------------------------------------- LocalMHA

LocalMHAImpl::LocalMHAImpl(const LocalMHAOptions& options_) : options(options_) { reset(); }

void LocalMHAImpl::reset() {
  check_heads("LocalMHA", options.dim(), options.dim_head(), options.heads());
  const int64_t inner = options.dim_head() * options.heads();
  norm = nullptr;
  if (options.prenorm())
    norm = register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({options.dim()})));
  to_qkv = register_module("to_qkv", torch::nn::Linear(torch::nn::LinearOptions(options.dim(), inner * 3).bias(false)));
  attn_fn = register_module("attn_fn", LocalAttention(LocalAttentionOptions(options.window_size())
                                                          .dim(options.dim_head())
                                                          .causal(options.causal())
                                                          .look_backward(options.look_backward())
                                                          .look_forward(options.look_forward())
                                                          .autopad(true)
                                                          .exact_windowsize(options.exact_windowsize())
                                                          .use_rotary_pos_emb(options.use_rotary_pos_emb())
                                                          .use_xpos(options.use_xpos())
                                                          .xpos_scale_base(options.xpos_scale_base())));
  to_out = register_module("to_out", torch::nn::Linear(torch::nn::LinearOptions(inner, options.dim()).bias(false)));
}

void LocalMHAImpl::pretty_print(std::ostream& stream) const {
  stream << "colt5::nn::LocalMHA(dim=" << options.dim() << ", window_size=" << options.window_size()
         << ", dim_head=" << options.dim_head() << ", heads=" << options.heads() << ", causal=" << options.causal()
         << ", prenorm=" << options.prenorm() << ")";
}

torch::Tensor LocalMHAImpl::forward(const torch::Tensor& x_in, const torch::Tensor& mask) {
  return forward_with_output_bias(x_in, mask, torch::Tensor());
}

torch::Tensor LocalMHAImpl::forward_with_output_bias(const torch::Tensor& x_in, const torch::Tensor& mask,
                                                     const torch::Tensor& out_bias, torch::Tensor* x_passed) {
  RECORD_USER_SCOPE("colt5::local_mha");
  TORCH_CHECK(x_in.defined(), "LocalMHA: x is undefined");
  TORCH_CHECK(at::isFloatingType(x_in.scalar_type()), "LocalMHA: x must be floating point, got ", x_in.scalar_type());
  TORCH_CHECK(x_in.dim() == 3 && x_in.size(2) == options.dim(), "LocalMHA: x must be (b, n, ", options.dim(), "), got ",
              x_in.sizes());
  const int64_t b = x_in.size(0), n = x_in.size(1), h = options.heads(), dh = options.dim_head();
  TORCH_CHECK(n >= 1, "LocalMHA: x has an empty sequence");
  if (mask.defined()) {
    TORCH_CHECK(mask.scalar_type() == at::kBool, "LocalMHA: mask must be a bool tensor, got ", mask.scalar_type());
    TORCH_CHECK(mask.dim() == 2 && mask.size(0) == b && mask.size(1) == n, "LocalMHA: mask must be (", b, ", ", n,
                ") to match x, got ", mask.sizes());
  }
  if (out_bias.defined()) {
    TORCH_CHECK(out_bias.dim() == 1 && out_bias.size(0) == options.dim(), "LocalMHA: out_bias must be (", options.dim(),
                "), got ", out_bias.sizes());
    TORCH_CHECK(out_bias.device() == to_out->weight.device(), "LocalMHA: out_bias is on ", out_bias.device(),
                " but the module is on ", to_out->weight.device());
  }
  // The output projection, with the bias (if any) added by the matrix
  // product's epilogue.
  auto project_out = [&](const torch::Tensor& y) { return linear(y, to_out->weight, out_bias); };
  torch::Tensor x = x_in;
  if (x_passed) *x_passed = x_in;
  if (norm) {
    const auto& o = norm->options;
    x = options.fused_norm() && o.elementwise_affine()
            ? layer_norm(x_in, norm->weight, norm->bias, o.eps(), /*autocast_output=*/true, /*cuda_kernel=*/true,
                         x_passed)
            : norm->forward(x_in);
  }
  torch::Tensor projected = to_qkv->forward(x);
#if COLT5_HAS_SDPA && defined(COLT5_WITH_CUDA)
  {
    // Exact windows straight from the packed projection on colt5's kernels:
    // the band kernels (band_attention; by default in float32), or in 16 bits
    // the register-tile kernels, forward and backward (window_tile_kernels).
    // Without a mask only where the length is whole windows (an autopadded
    // sequence's zero keys are visible without a mask: not these paths' case).
    const auto& ao = attn_fn->options;
    kernels::RowDtype rd;
    if (options.packed_qkv() && projected.is_cuda() && (!mask.defined() || mask.device() == projected.device()) &&
        ao.exact_windowsize() && !attn_fn->rel_pos && (n % ao.window_size() == 0 || (mask.defined() && ao.autopad())) &&
        row_dtype(projected.scalar_type(), rd)) {
      const bool band = options.band_attention().value_or(rd == kernels::RowDtype::f32);
      const bool tiles = !band && rd != kernels::RowDtype::f32 && options.window_tile_kernels() && ao.sliding_window();
      if ((band || tiles) &&
          kernels::band_attention_supports(dh, ao.window_size(), ao.look_backward(), attn_fn->look_forward(),
                                           ao.causal(), rd, b, h, projected.device().index())) {
        RECORD_USER_SCOPE("colt5::local_attention");
        const double scale = ao.scale().value_or(std::pow(static_cast<double>(dh), -0.5));
        // Without a mask an empty one (a custom function's inputs must be defined).
        torch::Tensor m = mask.defined() ? mask : torch::empty({0}, projected.options().dtype(torch::kBool));
        const int64_t ws = ao.window_size(), back = ao.look_backward(), fwd = attn_fn->look_forward();
        torch::Tensor out = band ? BandAttentionFunction::apply(projected, m, h, dh, ws, back, fwd, ao.causal(), scale)
                                 : WindowTileFunction::apply(projected, m, h, dh, ws, back, fwd, ao.causal(), scale);
        return project_out(out);
      }
    }
  }
#endif
#if COLT5_HAS_SDPA && defined(COLT5_WITH_CUDA)
  {
    const auto& ao = attn_fn->options;
    kernels::RowDtype rd;
    if (options.packed_qkv() && mask.defined() && projected.is_cuda() && mask.device() == projected.device() &&
        ao.exact_windowsize() && ao.sliding_window() && !attn_fn->rel_pos &&
        (ao.autopad() || n % ao.window_size() == 0) && row_dtype(projected.scalar_type(), rd) &&
        kernels::sliding_mask_supports(dh, rd)) {
      RECORD_USER_SCOPE("colt5::local_attention");
      const double scale = ao.scale().value_or(std::pow(static_cast<double>(dh), -0.5));
      torch::Tensor out = SlidingMaskedQKVFunction::apply(projected, mask, h, dh, ao.window_size(), ao.look_backward(),
                                                          attn_fn->look_forward(), ao.causal(), scale);
      return project_out(out);
    }
  }
#endif
#if COLT5_HAS_SDPA
  {
    const auto& ao = attn_fn->options;
    bool kernels_take = !projected.is_cuda() && at::isFloatingType(projected.scalar_type());
#ifdef COLT5_WITH_CUDA
    kernels::RowDtype rd;
    if (projected.is_cuda())
      kernels_take = row_dtype(projected.scalar_type(), rd) && kernels::causal_windows_supports(dh, rd);
#endif
    // nullopt: on CUDA; on the CPU only where gradients are recorded (its
    // forward alone is no faster than the look-around windows).
    const bool split_by_default = projected.is_cuda() || projected.requires_grad();
    if (options.split_causal_windows().value_or(split_by_default) && !mask.defined() && kernels_take && ao.causal() &&
        !ao.exact_windowsize() && ao.look_backward() == 1 && attn_fn->look_forward() == 0 && !attn_fn->rel_pos &&
        n % ao.window_size() == 0 && n / ao.window_size() >= 2) {
      RECORD_USER_SCOPE("colt5::local_attention");
      const double scale = ao.scale().value_or(std::pow(static_cast<double>(dh), -0.5));
      return project_out(CausalWindowsFunction::apply(projected, h, dh, ao.window_size(), scale));
    }
  }
#endif
  auto qkv = projected.chunk(3, -1);
  auto split = [&](const torch::Tensor& t) { return t.reshape({b, n, h, dh}).transpose(1, 2); };
  auto out = attn_fn->forward(split(qkv[0]), split(qkv[1]), split(qkv[2]), mask);
  return project_out(out.transpose(1, 2).reshape({b, n, h * dh}));
}

}  // namespace nn
}  // namespace colt5
