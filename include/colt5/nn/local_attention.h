// Windowed local attention, as local-attention 1.10.0's LocalAttention and
// LocalMHA (the light attention branch of CoLT5).
#pragma once

#include <torch/nn/modules/common.h>
#include <torch/nn/modules/container/any_value.h>

#include <c10/util/Optional.h>
#include <torch/nn.h>

#include <cstdint>
#include <memory>
#include <utility>

namespace colt5 {
namespace nn {

// ---------------------------------------------------------------- sinusoidal (rotary) embedding

struct SinusoidalEmbeddingsOptions {
  /* implicit */ SinusoidalEmbeddingsOptions(int64_t dim) : dim_(dim) {}
  /// Width of the tokens.
  TORCH_ARG(int64_t, dim);
  /// xpos length scale base; required with use_xpos.
  TORCH_ARG(c10::optional<double>, scale_base) = c10::nullopt;
  /// xpos length extrapolation scaling.
  TORCH_ARG(bool, use_xpos) = false;
  /// Base of the rotary frequencies.
  TORCH_ARG(double, theta) = 10000.0;
};

// Buffer `inv_freq` (float32 values). The xpos per-frequency scale is derived
// from dim on the fly, as the reference does not save it.
class SinusoidalEmbeddingsImpl : public torch::nn::Cloneable<SinusoidalEmbeddingsImpl> {
 public:
  explicit SinusoidalEmbeddingsImpl(const SinusoidalEmbeddingsOptions& options);

  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  // For a sequence of seq_len positions: (freqs (seq_len, dim), xpos scale
  // (seq_len, dim)); the scale is undefined without xpos.
  std::pair<torch::Tensor, torch::Tensor> forward(int64_t seq_len);

  SinusoidalEmbeddingsOptions options;
  torch::Tensor inv_freq;
};
TORCH_MODULE(SinusoidalEmbeddings);

// ---------------------------------------------------------------- LocalAttention

struct LocalAttentionOptions {
  /* implicit */ LocalAttentionOptions(int64_t window_size) : window_size_(window_size) {}
  /// Tokens per local window.
  TORCH_ARG(int64_t, window_size);
  /// Each token sees only itself and earlier tokens.
  TORCH_ARG(bool, causal) = false;
  /// Windows before its own that a window attends to.
  TORCH_ARG(int64_t, look_backward) = 1;
  /// nullopt: 0 when causal, else 1.
  TORCH_ARG(c10::optional<int64_t>, look_forward) = c10::nullopt;
  /// Head dimension; needed for the rotary embedding.
  TORCH_ARG(c10::optional<int64_t>, dim) = c10::nullopt;
  // Pad the sequence with zeros to a multiple of window_size (padded keys are
  /// not masked unless a key padding mask is given, as in the reference).
  TORCH_ARG(bool, autopad) = false;
  /// Mask keys farther than the window size (not whole neighbouring windows).
  TORCH_ARG(bool, exact_windowsize) = false;
  /// Query scale; nullopt: dim_head^-0.5.
  TORCH_ARG(c10::optional<double>, scale) = c10::nullopt;
  /// Rotary position embedding inside the windows.
  TORCH_ARG(bool, use_rotary_pos_emb) = true;
  /// xpos length extrapolation scaling.
  TORCH_ARG(bool, use_xpos) = false;
  /// nullopt: window_size / 2.
  TORCH_ARG(c10::optional<int64_t>, xpos_scale_base) = c10::nullopt;
  /// On CUDA in bf16/fp16, exact windows (causal or not, with or without a key
  /// mask) run as the flash kernel's sliding window instead of the windowed
  /// path with an additive mask (the same results; false: the windowed path,
  /// for comparison; causal exact windows without a key mask take the
  /// sliding window either way).
  TORCH_ARG(bool, sliding_window) = true;
};

// Child `rel_pos` (buffer rel_pos.inv_freq) when use_rotary_pos_emb and dim is given.
namespace detail {
struct LocalWindowMasks;
}

class LocalAttentionImpl : public torch::nn::Cloneable<LocalAttentionImpl> {
 public:
  explicit LocalAttentionImpl(const LocalAttentionOptions& options);

  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  int64_t look_forward() const;

  // q, k, v: (..., n, d) with the same leading shape; n a multiple of
  // window_size unless autopad. mask: bool (b, n) key padding mask, true =
  // keep; b must divide the product of the leading dimensions (heads are
  // folded after batch). Returns (..., n, d).
  // Paths (same results): float64 computes the reference's arithmetic; other
  // dtypes use fused attention. Without a mask or rotary embedding no mask is
  // built at all: non-causal windows attend over views of contiguous key
  // ranges; on CUDA in bf16/fp16, causal windows use the flash kernel's
  // lower-right causal limit and exact windows its sliding window (a key
  // mask enters as a score bias through 8 more head dimensions; heads up to
  // 248; options.sliding_window off: exact non-causal or masked windows take
  // the windowed path).
  torch::Tensor forward(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                        const torch::Tensor& mask = {});

 protected:
  FORWARD_HAS_DEFAULT_ARGS({3, torch::nn::AnyValue(torch::Tensor())})

 public:
  LocalAttentionOptions options;
  SinusoidalEmbeddings rel_pos{nullptr};

 private:
  // The masks that depend only on the sequence length (a few kilobytes),
  // kept from the last call; each module (and each clone) has its own.
  std::shared_ptr<detail::LocalWindowMasks> window_masks_;
};
TORCH_MODULE(LocalAttention);

// ---------------------------------------------------------------- LocalMHA

struct LocalMHAOptions {
  LocalMHAOptions(int64_t dim, int64_t window_size) : dim_(dim), window_size_(window_size) {}
  /// Width of the tokens.
  TORCH_ARG(int64_t, dim);
  /// Tokens per local window.
  TORCH_ARG(int64_t, window_size);
  /// Width of an attention head.
  TORCH_ARG(int64_t, dim_head) = 64;
  /// Attention heads.
  TORCH_ARG(int64_t, heads) = 8;
  /// Each token sees only itself and earlier tokens.
  TORCH_ARG(bool, causal) = false;
  /// LayerNorm (norm.weight, norm.bias) before the projection.
  TORCH_ARG(bool, prenorm) = false;
  /// Windows before its own that a window attends to.
  TORCH_ARG(int64_t, look_backward) = 1;
  /// nullopt: 0 when causal, else 1.
  TORCH_ARG(c10::optional<int64_t>, look_forward) = c10::nullopt;
  /// Mask keys farther than the window size (not whole neighbouring windows).
  TORCH_ARG(bool, exact_windowsize) = true;
  /// Rotary position embedding inside the windows.
  TORCH_ARG(bool, use_rotary_pos_emb) = true;
  /// xpos length extrapolation scaling.
  TORCH_ARG(bool, use_xpos) = false;
  /// xpos scale base; nullopt means the window size times 2.
  TORCH_ARG(c10::optional<int64_t>, xpos_scale_base) = c10::nullopt;
  /// The prenorm (a torch::nn::LayerNorm's parameters) through colt5::nn::layer_norm:
  /// on CUDA one kernel each way, and under autocast its output in the autocast
  /// dtype, as the projection it feeds would cast it (false: the LayerNorm module's own).
  TORCH_ARG(bool, fused_norm) = true;
  /// With a key mask, on CUDA in float16/bfloat16, where the attention takes the
  /// flash kernel's sliding window (exact windows, no rotary embedding, heads a
  /// multiple of 8 up to 248): q, k and v go from the projection to the kernel,
  /// and their gradients back into the projection's gradient, in one kernel
  /// each way (false: LocalAttention's path over q, k and v views; the same
  /// outputs).
  TORCH_ARG(bool, packed_qkv) = true;
  /// Exact windows (with a key mask, or without one where the length is a
  /// multiple of the window; no rotary embedding; packed_qkv) on CUDA on
  /// colt5's band kernels (float32, float16, bfloat16): each block of 64
  /// queries attends over its band of keys in one pass on the tensor cores,
  /// straight from the projection (no packing, look-around or copies); heads
  /// of 32 or 64, 64 + window_size * (look_backward + look_forward) at most
  /// 256 keys. Float32 products in TF32 where LibTorch allows TF32 matrix
  /// products (at::globalContext().allowTF32CuBLAS() at the forward), else at
  /// float32 accuracy (three TF32 products each). The same attention as the
  /// other paths (the windowed path in float32, the flash kernel's sliding
  /// window in float16/bfloat16). Unset (the default): on where the
  /// projection is float32 (faster than the windowed path), off for
  /// float16/bfloat16 (the flash kernel's sliding window is faster); true or
  /// false forces it on or off.
  TORCH_ARG(c10::optional<bool>, band_attention) = c10::nullopt;
  /// Exact windows in float16/bfloat16 (the cases of packed_qkv, the band
  /// kernels off, heads of 32 or 64 and bands the band kernels take; with a
  /// key mask, or without one where the length is a multiple of the window)
  /// on colt5's register-tile kernels (mma.sync), forward and backward,
  /// straight from the projection and into its gradient, the mask applied per
  /// score: blocks of 64 queries over their band of keys (the output, q's
  /// gradient) and blocks of 64 keys over the queries that see them (k's and
  /// v's gradients), every gradient row written once. The same attention.
  /// false: the flash kernel's sliding window, the mask entering it as a
  /// score bias through 8 more head dimensions (packed_qkv's kernels);
  /// without a mask the flash kernel's sliding window both ways.
  TORCH_ARG(bool, window_tile_kernels) = true;
  /// Without a mask, causal windows of one look-back (not exact, no rotary
  /// embedding, the length a multiple of the window) as two flash calls on
  /// views of the projection, merged by their log-sum-exps, their gradients
  /// summed into the projection's gradient: no copies of q, k and v, no
  /// unfolded keys. On CUDA in float16/bfloat16 (heads a multiple of 8 up to
  /// 256) the merge and the sum are one kernel each; on the CPU (LibTorch 2.x,
  /// any floating type) LibTorch's CPU flash kernel with tensor operations.
  /// The same attention either way. nullopt (the default): on CUDA, where it
  /// is faster (the autoregressive module's step at 2 x 32768 on an H100:
  /// 13.6 against 15.2 ms); on the CPU where gradients are recorded (the
  /// light branch's forward+backward at 1 x 8192 on 2 cores: 303 against
  /// 348 ms), not for a forward alone (92 against 88 ms there); true:
  /// always; false: the look-around windows everywhere.
  TORCH_ARG(c10::optional<bool>, split_causal_windows) = c10::nullopt;
};

// Parameters: norm.weight, norm.bias (prenorm), to_qkv.weight, to_out.weight,
// and buffer attn_fn.rel_pos.inv_freq with use_rotary_pos_emb. Sequences of
// any length (padded internally to a multiple of the window).
class LocalMHAImpl : public torch::nn::Cloneable<LocalMHAImpl> {
 public:
  LocalMHAImpl(int64_t dim, int64_t window_size) : LocalMHAImpl(LocalMHAOptions(dim, window_size)) {}
  explicit LocalMHAImpl(const LocalMHAOptions& options);

  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  // x: (b, n, dim); mask: optional bool (b, n), true = keep. Returns (b, n, dim).
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& mask = {});
  // forward(x, mask) + out_bias (dim,) at every position, the bias added by the
  // output projection's matrix product (no separate pass over the output).
  // With x_passed: x passed on through the prenorm's node (see
  // RMSNorm::forward_passing; x itself without a prenorm or its kernel), for
  // x's other uses downstream.
  torch::Tensor forward_with_output_bias(const torch::Tensor& x, const torch::Tensor& mask,
                                         const torch::Tensor& out_bias, torch::Tensor* x_passed = nullptr);

 protected:
  FORWARD_HAS_DEFAULT_ARGS({1, torch::nn::AnyValue(torch::Tensor())})

 public:
  LocalMHAOptions options;
  torch::nn::LayerNorm norm{nullptr};
  torch::nn::Linear to_qkv{nullptr};
  LocalAttention attn_fn{nullptr};
  torch::nn::Linear to_out{nullptr};
};
TORCH_MODULE(LocalMHA);

}  // namespace nn
}  // namespace colt5
