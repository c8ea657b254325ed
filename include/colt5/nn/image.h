// Conditionally routed attention over image feature maps, and the Simple ViT
// built from it.
#pragma once

#include <torch/nn/modules/common.h>
#include <torch/nn/modules/container/any_value.h>

#include <torch/expanding_array.h>
#include <torch/nn.h>

#include <cstdint>

#include "colt5/nn/attention.h"
#include "colt5/nn/conditional.h"
#include "colt5/nn/router.h"

namespace colt5 {
namespace nn {

// ---------------------------------------------------------------- image attention

struct ConditionalRoutedImageAttentionOptions {
  ConditionalRoutedImageAttentionOptions(int64_t dim, int64_t num_heavy_tokens_q, int64_t num_heavy_tokens_kv)
      : dim_(dim), num_heavy_tokens_q_(num_heavy_tokens_q), num_heavy_tokens_kv_(num_heavy_tokens_kv) {}
  /// Channels of the feature map.
  TORCH_ARG(int64_t, dim);
  /// Queries routed from the whole feature map.
  TORCH_ARG(int64_t, num_heavy_tokens_q);
  /// Keys/values routed from the whole feature map.
  TORCH_ARG(int64_t, num_heavy_tokens_kv);
  // light_window_size: height and width of the square windows of the light
  // self attention; must divide the feature map's height and width.
  // clang-format off
#define COLT5_IMAGE_ATTN_MODULE_OPTIONS(X)                                                             \
  COLT5_ROUTED_ATTN_OPTIONS(X)                                                                         \
  COLT5_ROUTING_MODULE_OPTIONS(X)                                                                      \
  X(bool, channel_first, false, "inputs (b, dim, h, w) instead of (b, h, w, dim); the output keeps the layout")
  // clang-format on
  COLT5_IMAGE_ATTN_MODULE_OPTIONS(COLT5_DECLARE_OPTION)
  COLT5_OPTIONS_VISITOR(COLT5_IMAGE_ATTN_MODULE_OPTIONS)
  /// On CUDA, the query and key/value routers score the map's tokens in one
  /// read and route them through one coordinate descent and one top-k where
  /// their settings allow, as ConditionalRoutedAttentionOptions::joint_routing
  /// (false: each router on its own; the same routing). Not a model setting:
  /// not saved with the options.
  TORCH_ARG(bool, joint_routing) = true;
};

// Light branch: SelfAttention (RMSNorm prenorm) inside each w x w window.
// Heavy branch: queries and key/values routed over all h * w tokens of the
// map (the reference routes inside each light window, which fails whenever a
// window holds no more tokens than num_heavy_tokens). Parameter names as the
// reference: light_attn.*, null_q_token, q_router.routing_token,
// kv_router.routing_token, heavy_attn.*.
class ConditionalRoutedImageAttentionImpl : public torch::nn::Cloneable<ConditionalRoutedImageAttentionImpl> {
 public:
  explicit ConditionalRoutedImageAttentionImpl(const ConditionalRoutedImageAttentionOptions& options);
  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  // x: (b, h, w, dim), or (b, dim, h, w) with channel_first.
  // mask: bool (b, h, w) or (b, h * w), true = a real position; masked
  // positions are neither routed as keys/values nor (when possible) as queries.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& mask = {},
                        c10::optional<int64_t> num_heavy_tokens_q = c10::nullopt,
                        c10::optional<int64_t> num_heavy_tokens_kv = c10::nullopt);

 protected:
  FORWARD_HAS_DEFAULT_ARGS({1, torch::nn::AnyValue(torch::Tensor())},
                           {2, torch::nn::AnyValue(c10::optional<int64_t>())},
                           {3, torch::nn::AnyValue(c10::optional<int64_t>())})

 public:
  ConditionalRoutedImageAttentionOptions options;
  SelfAttention light_attn{nullptr};
  torch::Tensor null_q_token;  // (dim); undefined without use_null_q_tokens
  CoordinateDescentRouter q_router{nullptr};
  CoordinateDescentRouter kv_router{nullptr};
  Attention heavy_attn{nullptr};
};
TORCH_MODULE(ConditionalRoutedImageAttention);

// ---------------------------------------------------------------- ViT

// 2-D sine-cosine position embedding of a (b, h, w, dim) patch grid: (h, w, dim)
// in the dtype and on the device of patches. dim must be a multiple of 4 and
// at least 8.
torch::Tensor posemb_sincos_2d(const torch::Tensor& patches, double temperature = 10000.0);

struct ConditionalRoutedViTOptions {
  ConditionalRoutedViTOptions(torch::ExpandingArray<2> image_size, torch::ExpandingArray<2> patch_size,
                              int64_t num_classes, int64_t dim, int64_t depth)
      : image_size_(image_size), patch_size_(patch_size), num_classes_(num_classes), dim_(dim), depth_(depth) {}
  /// Image height and width.
  TORCH_ARG(torch::ExpandingArray<2>, image_size);
  /// Patch height and width; must divide the image size.
  TORCH_ARG(torch::ExpandingArray<2>, patch_size);
  /// Outputs of the classification head.
  TORCH_ARG(int64_t, num_classes);
  /// Width of the tokens.
  TORCH_ARG(int64_t, dim);
  /// Layers of [image attention, routed feedforward].
  TORCH_ARG(int64_t, depth);
  // Required, as in the reference (which has no defaults for them): 0 means
  // "not set" and is rejected.
  // clang-format off
#define COLT5_VIT_OPTIONS(X)                                                                                   \
  X(int64_t, attn_num_heavy_tokens_q, 0, "queries routed per image (required)")                              \
  X(int64_t, attn_num_heavy_tokens_kv, 0, "keys/values routed per image (required)")                         \
  X(int64_t, attn_heavy_dim_head, 0, "width of a heavy attention head (required)")                           \
  X(int64_t, attn_heavy_heads, 0, "heavy attention heads (required)")                                        \
  X(int64_t, attn_light_dim_head, 0, "width of a light attention head (required)")                           \
  X(int64_t, attn_light_heads, 0, "light attention heads (required)")                                        \
  X(int64_t, attn_light_window_size, 0, "side of the light attention windows, in patches (required)")        \
  X(int64_t, ff_num_heavy_tokens, 0, "patches routed to the heavy feedforward (required)")                   \
  X(double, ff_heavy_mult, 0, "hidden width of the heavy feedforward, times dim (required)")                 \
  X(double, ff_light_mult, 0, "hidden width of the light feedforward, times dim (required)")                 \
  X(int64_t, channels, 3, "image channels")                                                                  \
  X(bool, router_straight_through, true, "selected scores are 1 in value but keep the soft gradient")        \
  X(::colt5::nn::RouterKwargs, router_kwargs, {},                                                            \
    "options of every router but eps, which is default_coor_descent_eps (as the reference does)")           \
  X(bool, router_use_triton, false, "accepted for compatibility; the fused kernels are always used")        \
  X(bool, flash_attn, true, "accepted for compatibility; fused attention is used where it applies")         \
  X(int64_t, attn_num_routed_kv, 1, "sets of routed key/values in the image attention")                      \
  X(double, default_coor_descent_eps, 1.0, "the routers' eps")
  // clang-format on
  COLT5_VIT_OPTIONS(COLT5_DECLARE_OPTION)
  COLT5_OPTIONS_VISITOR(COLT5_VIT_OPTIONS)
};

// The ViT's stack of layers: `layers`, a list of [image attention, routed
// feedforward] pairs. x: (b, h, w, dim) -> same shape.
class ConditionalRoutedViTTransformerImpl : public torch::nn::Cloneable<ConditionalRoutedViTTransformerImpl> {
 public:
  explicit ConditionalRoutedViTTransformerImpl(const ConditionalRoutedViTOptions& options);
  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  torch::Tensor forward(const torch::Tensor& x);

  ConditionalRoutedViTOptions options;
  torch::nn::ModuleList layers{nullptr};
};
TORCH_MODULE(ConditionalRoutedViTTransformer);

// Patch embedding (LayerNorm, Linear, LayerNorm) plus 2-D sin-cos positions;
// per layer x = image_attn(x) + x, x = routed_ff(x) + x; mean pool, LayerNorm,
// Linear head. Parameter names as the reference: to_patch_embedding.{1,2,3}.*,
// transformer.layers.<i>.0.* (image attention), transformer.layers.<i>.1.*
// (routed feedforward), linear_head.{1,2}.*.
class ConditionalRoutedViTImpl : public torch::nn::Cloneable<ConditionalRoutedViTImpl> {
 public:
  explicit ConditionalRoutedViTImpl(const ConditionalRoutedViTOptions& options);
  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  // img: (b, channels, image_h, image_w) -> logits (b, num_classes).
  torch::Tensor forward(const torch::Tensor& img);

  ConditionalRoutedViTOptions options;
  torch::nn::Sequential to_patch_embedding{nullptr};
  ConditionalRoutedViTTransformer transformer{nullptr};
  torch::nn::Sequential linear_head{nullptr};
};
TORCH_MODULE(ConditionalRoutedViT);

}  // namespace nn
}  // namespace colt5
