#include "colt5/nn/image.h"

#include <cmath>

#include "nn/heavy_branch.h"
#include "nn/linear.h"

namespace colt5 {
namespace nn {
namespace {

// (b, H, W, d) -> (b * H/ws * W/ws, ws * ws, d): each ws x ws window as a sequence.
torch::Tensor to_windows(const torch::Tensor& x, int64_t ws) {
  const int64_t b = x.size(0), H = x.size(1), W = x.size(2), d = x.size(3);
  return x.reshape({b, H / ws, ws, W / ws, ws, d}).permute({0, 1, 3, 2, 4, 5}).reshape({-1, ws * ws, d});
}

torch::Tensor from_windows(const torch::Tensor& w, int64_t b, int64_t H, int64_t W, int64_t ws) {
  const int64_t d = w.size(-1);
  return w.reshape({b, H / ws, W / ws, ws, ws, d}).permute({0, 1, 3, 2, 4, 5}).reshape({b, H, W, d});
}

}  // namespace

// ---------------------------------------------------------------- image attention

ConditionalRoutedImageAttentionImpl::ConditionalRoutedImageAttentionImpl(
    const ConditionalRoutedImageAttentionOptions& options_)
    : options(options_) {
  reset();
}

void ConditionalRoutedImageAttentionImpl::reset() {
  const auto& o = options;
  const char* m = "ConditionalRoutedImageAttention";
  check_routed_attention_options(m, o, /*rotary=*/false);
  TORCH_CHECK(o.light_window_size() >= 1, m, ": light_window_size must be positive, got ", o.light_window_size());
  light_attn = register_module("light_attn", SelfAttention(SelfAttentionOptions(o.dim())
                                                               .dim_head(o.light_dim_head())
                                                               .heads(o.light_heads())
                                                               .prenorm(true)
                                                               .use_flash(true)));
  register_heavy_branch(*this, o);
}

void ConditionalRoutedImageAttentionImpl::pretty_print(std::ostream& stream) const {
  const auto& o = options;
  print_module(stream, "ConditionalRoutedImageAttention",
               "dim=" + std::to_string(o.dim()) + ", num_heavy_tokens_q=" + std::to_string(o.num_heavy_tokens_q()) +
                   ", num_heavy_tokens_kv=" + std::to_string(o.num_heavy_tokens_kv()),
               o, ConditionalRoutedImageAttentionOptions(o.dim(), o.num_heavy_tokens_q(), o.num_heavy_tokens_kv()));
}

torch::Tensor ConditionalRoutedImageAttentionImpl::forward(const torch::Tensor& x_in, const torch::Tensor& mask_in,
                                                           c10::optional<int64_t> num_heavy_tokens_q,
                                                           c10::optional<int64_t> num_heavy_tokens_kv) {
  const char* m = "ConditionalRoutedImageAttention";
  const int64_t dim = options.dim(), ws = options.light_window_size();
  TORCH_CHECK(x_in.defined(), m, ": x is undefined");
  TORCH_CHECK(x_in.is_floating_point(), m, ": x must be floating point, got ", x_in.scalar_type());
  TORCH_CHECK(x_in.dim() == 4, m, ": x must be a 4-D feature map ",
              options.channel_first() ? "(b, dim, height, width)" : "(b, height, width, dim)", ", got ", x_in.sizes());
  auto x = options.channel_first() ? x_in.permute({0, 2, 3, 1}) : x_in;
  TORCH_CHECK(x.size(3) == dim, m, ": x has ", x.size(3), " channels but the module's dim is ", dim,
              options.channel_first() ? " (channel_first: channels are dimension 1)"
                                      : " (channels last: channels are dimension 3)");
  const int64_t b = x.size(0), H = x.size(1), W = x.size(2);
  TORCH_CHECK(H % ws == 0 && W % ws == 0, m, ": the feature map's height and width (", H, " x ", W,
              ") must be multiples of light_window_size ", ws);
  TORCH_CHECK(heavy_attn->to_q->weight.scalar_type() == x.scalar_type(), m, ": input is ", x.scalar_type(),
              " but the module's parameters are ", heavy_attn->to_q->weight.scalar_type());
  TORCH_CHECK(heavy_attn->to_q->weight.device() == x.device(), m, ": input is on ", x.device(),
              " but the module is on ", heavy_attn->to_q->weight.device());
  const int64_t kq = num_heavy_tokens_q.value_or(options.num_heavy_tokens_q());
  const int64_t kkv = num_heavy_tokens_kv.value_or(options.num_heavy_tokens_kv());
  TORCH_CHECK(kq >= 1, m, ": num_heavy_tokens_q must be at least 1, got ", kq);
  TORCH_CHECK(kkv >= 1, m, ": num_heavy_tokens_kv must be at least 1, got ", kkv);

  torch::Tensor mask;
  if (mask_in.defined()) {
    TORCH_CHECK(mask_in.scalar_type() == torch::kBool, m, ": mask must be bool, got ", mask_in.scalar_type());
    TORCH_CHECK((mask_in.dim() == 3 && mask_in.size(0) == b && mask_in.size(1) == H && mask_in.size(2) == W) ||
                    (mask_in.dim() == 2 && mask_in.size(0) == b && mask_in.size(1) == H * W),
                m, ": mask must be (", b, ", ", H, ", ", W, ") or (", b, ", ", H * W, "), got ", mask_in.sizes());
    TORCH_CHECK(mask_in.device() == x.device(), m, ": mask is on ", mask_in.device(), " but x is on ", x.device());
    mask = mask_in.reshape({b, H * W});
  }

  // light: full attention inside each window
  auto light_out = from_windows(light_attn(to_windows(x, ws)), b, H, W, ws);

  // heavy: routed over every position of the map; the light output and the
  // heavy one summed in one pass, the routed rows added in place
  auto tokens = x.reshape({b, H * W, dim});
  HeavyBranchInputs in;
  in.queries = in.context = tokens;
  in.query_mask = in.context_mask = mask;
  in.num_q = kq;
  in.num_kv = kkv;
  in.multiply_queries_by_score = options.multiply_queries_by_score();
  in.joint_routing = options.joint_routing();
  in.plus_a = light_out.reshape({b, H * W, dim});
  auto out = heavy_routed_attention(*q_router, *kv_router, *heavy_attn, null_q_token, in).reshape({b, H, W, dim});
  return options.channel_first() ? out.permute({0, 3, 1, 2}) : out;
}

// ---------------------------------------------------------------- ViT

torch::Tensor posemb_sincos_2d(const torch::Tensor& patches, double temperature) {
  TORCH_CHECK(patches.defined() && patches.dim() == 4, "posemb_sincos_2d: patches must be (b, h, w, dim), got ",
              patches.defined() ? patches.sizes() : c10::IntArrayRef{});
  const int64_t h = patches.size(1), w = patches.size(2), dim = patches.size(3);
  TORCH_CHECK(dim % 4 == 0 && dim >= 8,
              "posemb_sincos_2d: the feature dimension must be a multiple of 4 and at least 8, got ", dim);
  const auto dev = patches.device();
  const auto f32 = torch::TensorOptions().dtype(torch::kFloat).device(dev);
  // float32 as the reference computes it, converted at the end.
  auto ys = torch::arange(h, f32).view({h, 1}).expand({h, w}).reshape({-1, 1});
  auto xs = torch::arange(w, f32).view({1, w}).expand({h, w}).reshape({-1, 1});
  auto omega = torch::arange(dim / 4, f32) / static_cast<double>(dim / 4 - 1);
  omega = 1.0 / torch::pow(temperature, omega);
  auto y = ys * omega.unsqueeze(0);
  auto x = xs * omega.unsqueeze(0);
  auto pe = torch::cat({x.sin(), x.cos(), y.sin(), y.cos()}, 1);
  return pe.to(patches.scalar_type()).view({h, w, dim});
}

namespace {

void check_vit_options(const ConditionalRoutedViTOptions& o) {
  const char* m = "ConditionalRoutedViT";
  const auto img = *o.image_size();
  const auto patch = *o.patch_size();
  TORCH_CHECK(img[0] > 0 && img[1] > 0 && patch[0] > 0 && patch[1] > 0, m,
              ": image_size and patch_size must be positive, got ", o.image_size(), " and ", o.patch_size());
  TORCH_CHECK(img[0] % patch[0] == 0 && img[1] % patch[1] == 0, m, ": image dimensions ", o.image_size(),
              " must be divisible by the patch size ", o.patch_size());
  TORCH_CHECK(o.num_classes() > 0, m, ": num_classes must be positive, got ", o.num_classes());
  TORCH_CHECK(o.dim() > 0, m, ": dim must be positive, got ", o.dim());
  TORCH_CHECK(o.depth() >= 0, m, ": depth must be non-negative, got ", o.depth());
  TORCH_CHECK(o.channels() > 0, m, ": channels must be positive, got ", o.channels());
  auto required = [&](const char* name, double v) {
    TORCH_CHECK(v > 0, m, ": ", name, " must be set to a positive value, got ", v);
  };
  required("attn_num_heavy_tokens_q", static_cast<double>(o.attn_num_heavy_tokens_q()));
  required("attn_num_heavy_tokens_kv", static_cast<double>(o.attn_num_heavy_tokens_kv()));
  required("attn_heavy_dim_head", static_cast<double>(o.attn_heavy_dim_head()));
  required("attn_heavy_heads", static_cast<double>(o.attn_heavy_heads()));
  required("attn_light_dim_head", static_cast<double>(o.attn_light_dim_head()));
  required("attn_light_heads", static_cast<double>(o.attn_light_heads()));
  required("attn_light_window_size", static_cast<double>(o.attn_light_window_size()));
  required("ff_num_heavy_tokens", static_cast<double>(o.ff_num_heavy_tokens()));
  required("ff_heavy_mult", o.ff_heavy_mult());
  required("ff_light_mult", o.ff_light_mult());
}

}  // namespace

ConditionalRoutedViTTransformerImpl::ConditionalRoutedViTTransformerImpl(const ConditionalRoutedViTOptions& options_)
    : options(options_) {
  reset();
}

void ConditionalRoutedViTTransformerImpl::reset() {
  const auto& o = options;
  check_vit_options(o);
  RouterKwargs kwargs = o.router_kwargs();
  kwargs.eps(o.default_coor_descent_eps());
  layers = register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < o.depth(); ++i) {
    auto attn = ConditionalRoutedImageAttention(
        ConditionalRoutedImageAttentionOptions(o.dim(), o.attn_num_heavy_tokens_q(), o.attn_num_heavy_tokens_kv())
            .num_routed_kv(o.attn_num_routed_kv())
            .light_dim_head(o.attn_light_dim_head())
            .light_heads(o.attn_light_heads())
            .light_window_size(o.attn_light_window_size())
            .heavy_dim_head(o.attn_heavy_dim_head())
            .heavy_heads(o.attn_heavy_heads())
            .router_straight_through(o.router_straight_through())
            .router_kwargs(kwargs)
            .use_triton(o.router_use_triton())
            .use_flash_attn(o.flash_attn())
            .channel_first(false)
            .use_null_q_tokens(true));
    auto ff = ConditionalRoutedFeedForward(ConditionalRoutedFeedForwardOptions(o.dim(), o.ff_num_heavy_tokens())
                                               .light_ff_mult(o.ff_light_mult())
                                               .heavy_ff_mult(o.ff_heavy_mult())
                                               .router_straight_through(o.router_straight_through())
                                               .router_kwargs(kwargs)
                                               .use_triton(o.router_use_triton()));
    layers->push_back(torch::nn::ModuleList(attn, ff));
  }
}

void ConditionalRoutedViTTransformerImpl::pretty_print(std::ostream& stream) const {
  stream << "colt5::nn::ConditionalRoutedViTTransformer(dim=" << options.dim() << ", depth=" << options.depth() << ")";
}

torch::Tensor ConditionalRoutedViTTransformerImpl::forward(const torch::Tensor& x_in) {
  TORCH_CHECK(x_in.defined() && x_in.dim() == 4 && x_in.size(3) == options.dim(),
              "ConditionalRoutedViT: the transformer takes (b, h, w, ", options.dim(), "), got ",
              x_in.defined() ? x_in.sizes() : c10::IntArrayRef{});
  auto x = x_in;
  const auto shape = x.sizes().vec();
  for (const auto& layer : *layers) {
    auto pair = std::dynamic_pointer_cast<torch::nn::ModuleListImpl>(layer);
    auto attn = pair->ptr<ConditionalRoutedImageAttentionImpl>(0);
    auto ff = pair->ptr<ConditionalRoutedFeedForwardImpl>(1);
    x = attn->forward(x) + x;
    auto flat = x.reshape({shape[0], shape[1] * shape[2], shape[3]});
    x = (ff->forward(flat) + flat).reshape(shape);
  }
  return x;
}

ConditionalRoutedViTImpl::ConditionalRoutedViTImpl(const ConditionalRoutedViTOptions& options_) : options(options_) {
  reset();
}

void ConditionalRoutedViTImpl::reset() {
  const auto& o = options;
  check_vit_options(o);
  const int64_t p1 = (*o.patch_size())[0], p2 = (*o.patch_size())[1], c = o.channels();
  const int64_t patch_dim = c * p1 * p2;
  // b c (h p1) (w p2) -> b h w (p1 p2 c)
  auto rearrange = torch::nn::Functional([p1, p2, c](const torch::Tensor& img) {
    const int64_t b = img.size(0), h = img.size(2) / p1, w = img.size(3) / p2;
    return img.reshape({b, c, h, p1, w, p2}).permute({0, 2, 4, 3, 5, 1}).reshape({b, h, w, p1 * p2 * c});
  });
  to_patch_embedding =
      register_module("to_patch_embedding",
                      torch::nn::Sequential(rearrange, torch::nn::LayerNorm(torch::nn::LayerNormOptions({patch_dim})),
                                            torch::nn::Linear(patch_dim, o.dim()),
                                            torch::nn::LayerNorm(torch::nn::LayerNormOptions({o.dim()}))));
  transformer = register_module("transformer", ConditionalRoutedViTTransformer(o));
  // b h w c -> b c (mean)
  auto pool = torch::nn::Functional([](const torch::Tensor& x) { return x.mean({1, 2}); });
  linear_head = register_module(
      "linear_head", torch::nn::Sequential(pool, torch::nn::LayerNorm(torch::nn::LayerNormOptions({o.dim()})),
                                           torch::nn::Linear(o.dim(), o.num_classes())));
}

void ConditionalRoutedViTImpl::pretty_print(std::ostream& stream) const {
  stream << "colt5::nn::ConditionalRoutedViT(image_size=" << options.image_size()
         << ", patch_size=" << options.patch_size() << ", num_classes=" << options.num_classes()
         << ", dim=" << options.dim() << ", depth=" << options.depth() << ")";
}

torch::Tensor ConditionalRoutedViTImpl::forward(const torch::Tensor& img) {
  const char* m = "ConditionalRoutedViT";
  TORCH_CHECK(img.defined(), m, ": img is undefined");
  TORCH_CHECK(img.is_floating_point(), m, ": img must be floating point, got ", img.scalar_type());
  const auto patch = *options.patch_size();
  TORCH_CHECK(img.dim() == 4 && img.size(1) == options.channels(), m, ": img must be (b, ", options.channels(),
              ", height, width), got ", img.sizes());
  TORCH_CHECK(img.size(2) % patch[0] == 0 && img.size(3) % patch[1] == 0, m, ": image height and width (", img.size(2),
              " x ", img.size(3), ") must be divisible by the patch size ", options.patch_size());
  // The patch embedding's steps one by one: its Linear through nn::linear,
  // which adds the bias inside the matrix product (see FeedForward).
  auto& embed = *to_patch_embedding;
  torch::Tensor x = embed.ptr<torch::nn::FunctionalImpl>(0)->forward(img);
  x = embed.ptr<torch::nn::LayerNormImpl>(1)->forward(x);
  const auto patch_proj = embed.ptr<torch::nn::LinearImpl>(2);
  x = linear(x, patch_proj->weight, patch_proj->bias);
  x = embed.ptr<torch::nn::LayerNormImpl>(3)->forward(x);
  x = x + posemb_sincos_2d(x);
  x = transformer->forward(x);
  return linear_head->forward(x);
}

}  // namespace nn
}  // namespace colt5
