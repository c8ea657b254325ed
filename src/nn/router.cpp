#include "colt5/nn/router.h"

#include <ATen/record_function.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "colt5/coor_descent.h"
#include "kernels/coor_descent.h"
#include "ops/row_dtype.h"
#include "nn/norm_route_grad.h"
#include "nn/route_views.h"
#include "ops/as_type.h"

#ifdef COLT5_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace colt5 {
namespace nn {

namespace {

torch::Tensor l2norm(const torch::Tensor& t) {
  return torch::nn::functional::normalize(t, torch::nn::functional::NormalizeFuncOptions().dim(-1));
}

// Positions in x's rows [b, n, ...] flattened: indices [b, ...] + row * n.
torch::Tensor flat_positions(const torch::Tensor& indices, int64_t n) {
  const int64_t b = indices.size(0);
  std::vector<int64_t> view(indices.dim(), 1);
  view[0] = b;
  return (indices + torch::arange(0, b * n, n, indices.options()).view(view)).reshape({-1});
}

// rows[b, i, d] = x[b, indices[b, i...], d] for indices of shape [b, ...];
// flat: flat_positions(indices, x.size(1)), when already computed.
torch::Tensor gather_rows(const torch::Tensor& x, const torch::Tensor& indices, torch::Tensor flat = {}) {
  const int64_t b = x.size(0), n = x.size(1);
  if (!flat.defined()) flat = flat_positions(indices, n);
  std::vector<int64_t> out_shape = indices.sizes().vec();
  if (x.dim() == 3) {
    out_shape.push_back(x.size(2));
    return x.reshape({b * n, x.size(2)}).index_select(0, flat).view(out_shape);
  }
  return x.reshape({b * n}).index_select(0, flat).view(out_shape);
}

}  // namespace

CoordinateDescentRouterImpl::CoordinateDescentRouterImpl(const CoordinateDescentRouterOptions& options_)
    : options(options_) {
  reset();
}

void CoordinateDescentRouterImpl::reset() {
  const auto& o = options;
  TORCH_CHECK(o.dim() > 0, "CoordinateDescentRouter: dim must be positive, got ", o.dim());
  TORCH_CHECK(o.n_iters() >= 1, "CoordinateDescentRouter: n_iters must be at least 1, got ", o.n_iters());
  TORCH_CHECK(o.fetch_k_ratio() >= 1.0, "CoordinateDescentRouter: fetch_k_ratio must be >= 1, got ", o.fetch_k_ratio());
  TORCH_CHECK(o.eps() > 0, "CoordinateDescentRouter: eps must be positive, got ", o.eps());
  TORCH_CHECK(o.eps_decay() > 0 && o.eps_decay() <= 1, "CoordinateDescentRouter: eps_decay must be in (0, 1], got ",
              o.eps_decay());
  TORCH_CHECK(!o.eps_init() || *o.eps_init() > 0, "CoordinateDescentRouter: eps_init must be positive, got ",
              o.eps_init() ? *o.eps_init() : 0.0);
  TORCH_CHECK(o.num_routing_tokens() >= 1, "CoordinateDescentRouter: num_routing_tokens must be at least 1, got ",
              o.num_routing_tokens());
  TORCH_CHECK(!o.route_block_size() || *o.route_block_size() >= 1,
              "CoordinateDescentRouter: route_block_size must be positive, got ",
              o.route_block_size() ? *o.route_block_size() : 0);
  TORCH_CHECK(o.checkpoint_segments() >= 0, "CoordinateDescentRouter: checkpoint_segments must be >= 0, got ",
              o.checkpoint_segments());
  if (!o.learned_routing_tokens()) {
    routing_token = register_parameter("routing_token", torch::randn({o.num_routing_tokens(), o.dim()}));
  } else {
    routing_token = torch::Tensor();
  }
}

namespace {

using RouterOptions = CoordinateDescentRouterOptions;

// The gradients of the rows gathered from x for the heavy branch, handed to
// the routing scores' backward, which adds them into its own gradient of x:
// autograd would otherwise write a zero gradient of x's size with the rows in
// it and add that to the rest (two passes over x's size in float32).
struct RowGradSink : torch::CustomClassHolder {
  struct Part {
    torch::Tensor flat;   // positions in x's rows
    torch::Tensor grads;  // their rows' gradients
    bool distinct;        // no position twice
  };
  std::vector<Part> parts;
};
using RowGradSinkPtr = c10::intrusive_ptr<RowGradSink>;

RowGradSinkPtr sink_of(torch::autograd::AutogradContext* ctx) {
  return c10::static_intrusive_pointer_cast<RowGradSink>(ctx->saved_data["sink"].toCapsule());
}

// rows = x_alias[flat] (x_alias: the routing scores' alias of x, [N, d]); the
// backward leaves the rows' gradients in the sink and gives x_alias none. The
// routing scores' node runs after this one (it waits for every consumer of
// its outputs), so it finds them there. segments: the sizes of consecutive
// runs of flat that each hold distinct positions (empty: flat may repeat).
class GatherRowsFunction : public torch::autograd::Function<GatherRowsFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x_alias,
                               const torch::Tensor& flat, RowGradSinkPtr sink, std::vector<int64_t> segments) {
    ctx->save_for_backward({flat});
    ctx->saved_data["sink"] = c10::IValue::make_capsule(sink);
    ctx->saved_data["segments"] = segments;
    return x_alias.index_select(0, flat);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    if (grads[0].defined()) {
      const torch::Tensor flat = ctx->get_saved_variables()[0];
      const std::vector<int64_t> segments = ctx->saved_data["segments"].toIntVector();
      auto& parts = sink_of(ctx)->parts;
      if (segments.empty()) {
        parts.push_back({flat, grads[0], false});
      } else {
        int64_t first = 0;
        for (int64_t size : segments) {
          parts.push_back({flat.narrow(0, first, size), grads[0].narrow(0, first, size), true});
          first += size;
        }
      }
    }
    return {torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

// x's rows as the routing scores give them back (an alias of x through their
// node, [N, d]) and the sink for the gradients of rows gathered from it;
// undefined where the scores did not come from the routing-scores kernel.
struct GatherSource {
  torch::Tensor x_rows;
  RowGradSinkPtr sink;
};

// x_rows[flat] viewed as shape + [d], its gradient left in the sink;
// distinct: no position of flat repeats.
torch::Tensor gather_via_sink(const GatherSource& src, const torch::Tensor& flat, std::vector<int64_t> shape,
                              bool distinct) {
  shape.push_back(src.x_rows.size(1));
  std::vector<int64_t> segments;
  if (distinct) segments.push_back(flat.size(0));
  return GatherRowsFunction::apply(src.x_rows, flat, src.sink, segments).view(shape);
}

#ifdef COLT5_WITH_CUDA
// x [N, d] (CUDA float32/float16/bfloat16, contiguous) against tokens [r, d]:
// (x . tokens^T [N, r], |x| [N, 1]), both float32, from one read of x by the
// routing-scores kernel, and x itself (an alias through this node, for
// GatherRowsFunction); the backward is one kernel (two matrix products where
// it does not apply), plus the gathered rows' gradients from the sink.
class RoutingDotFunction : public torch::autograd::Function<RoutingDotFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                                                const torch::Tensor& tokens, RowGradSinkPtr sink) {
    // Unused outputs (the alias, whose gathers leave their gradients in the
    // sink; the norms with dot-product routing) get no zero gradient.
    ctx->set_materialize_grads(false);
    ctx->saved_data["sink"] = c10::IValue::make_capsule(sink);
    const int64_t n = x.size(0), d = x.size(1), r = tokens.size(0);
    torch::Tensor t32 = as_type(tokens, torch::kFloat).contiguous();
    auto f32 = x.options().dtype(torch::kFloat);
    torch::Tensor dots = torch::empty({n, r}, f32), norms = torch::empty({n, 1}, f32);
    const kernels::RowDtype dtype = row_dtype(x.scalar_type());
    c10::cuda::CUDAGuard guard(x.device());
    kernels::row_dot_norm_cuda(x.data_ptr(), dtype, t32.data_ptr<float>(), n, d, r, dots.data_ptr<float>(),
                               norms.data_ptr<float>(), at::cuda::getCurrentCUDAStream().stream());
    ctx->save_for_backward({x, t32, norms});
    ctx->saved_data["tokens_dtype"] = static_cast<int64_t>(tokens.scalar_type());
    // x as a fused norm passed it on: x's gradient is left to the norm's kernel.
    if (NormRouteGradPtr h = norm_route_grad_of(x)) ctx->saved_data["norm_route"] = c10::IValue::make_capsule(h);
    return {dots, norms, x};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    RowGradSinkPtr sink = sink_of(ctx);
    if (ctx->saved_data.count("norm_route")) {
      auto h = c10::static_intrusive_pointer_cast<NormRouteGrad>(ctx->saved_data["norm_route"].toCapsule());
      if (auto out = hand_to_norm(ctx, grads, *sink, *h)) return *out;
    }
    auto [gx, gt, passed_added] = scores_backward(ctx, grads, sink->parts);
    const torch::Tensor x = ctx->get_saved_variables()[0];
    const bool passed = grads[2].defined() && !passed_added;
    if (ctx->needs_input_grad(0) && (passed || !sink->parts.empty())) {
      if (!gx.defined()) gx = torch::zeros_like(x);
      if (passed) gx.add_(grads[2]);
      for (const auto& part : sink->parts) gx.index_add_(0, part.flat, as_type(part.grads, gx.scalar_type()));
    }
    sink->parts.clear();
    return {gx, gt, torch::Tensor()};
  }

  // The backward kernel's parameters for x [N, d], the float32 tokens and
  // the row norms (no gradients or outputs yet).
  static kernels::RowDotBackwardParams kernel_params(const torch::Tensor& x, const torch::Tensor& t32,
                                                     const torch::Tensor& norms) {
    kernels::RowDotBackwardParams p;
    p.x = x.data_ptr();
    p.dtype = row_dtype(x.scalar_type());
    p.tokens = t32.data_ptr<float>();
    p.norms = norms.data_ptr<float>();
    p.rows = x.size(0);
    p.d = x.size(1);
    p.r = t32.size(0);
    return p;
  }

  // The tokens' gradient in their dtype from the kernel's per-block partial
  // sums (zeros for no rows).
  static at::ScalarType tokens_dtype(torch::autograd::AutogradContext* ctx) {
    return static_cast<at::ScalarType>(ctx->saved_data["tokens_dtype"].toInt());
  }
  static torch::Tensor tokens_grad(torch::autograd::AutogradContext* ctx, const torch::Tensor& partial) {
    return as_type(partial.sum(0), tokens_dtype(ctx));
  }

  // A gradient as float32 and contiguous (undefined stays undefined).
  static torch::Tensor float_grad(const torch::Tensor& g) {
    return g.defined() ? as_type(g, torch::kFloat).contiguous() : torch::Tensor();
  }

  // Whether a gathered part's gradients can be added by each row's slot
  // (distinct positions, rows of x's width, int64 positions, n in int32).
  static bool slot_part_fits(const RowGradSink::Part& part, int64_t n, int64_t d) {
    return part.distinct && part.grads.dim() == 2 && part.grads.size(1) == d &&
           part.flat.scalar_type() == torch::kLong && n <= std::numeric_limits<int32_t>::max();
  }

  // (each of x's n rows' place in the part, -1 for none; the part's rows in
  // x's dtype, 16-byte aligned).
  static std::pair<torch::Tensor, torch::Tensor> slot_part(const RowGradSink::Part& part, const torch::Tensor& x,
                                                           cudaStream_t st) {
    const int64_t n = x.size(0);
    torch::Tensor rows = as_type(part.grads, x.scalar_type()).contiguous();
    if (reinterpret_cast<uintptr_t>(rows.data_ptr()) % 16 != 0) rows = rows.clone();
    torch::Tensor flat = part.flat.contiguous();
    torch::Tensor slot = torch::empty({n}, x.options().dtype(torch::kInt));
    kernels::row_slot_map_cuda(flat.data_ptr<int64_t>(), flat.numel(), slot.data_ptr<int32_t>(), n, st);
    return {slot, rows};
  }

  // Where x came from a fused norm (NormRouteGrad): the scores' terms of x's
  // gradient, the alias's gradient and the gathered rows' (up to two parts of
  // distinct positions) left for the norm's kernel to add as it writes x's
  // gradient; x gets none here. The tokens' gradient from one read of x
  // (the scores' backward kernel writing no gradient of x). nullopt where the
  // hand-over does not apply (the kernel path below runs).
  static c10::optional<torch::autograd::variable_list> hand_to_norm(torch::autograd::AutogradContext* ctx,
                                                                    const torch::autograd::variable_list& grads,
                                                                    RowGradSink& sink, NormRouteGrad& h) {
    // One set of terms per norm: a second router on the same x (separate
    // routers) returns its part of x's gradient as usual.
    if (!ctx->needs_input_grad(0) || (h.pending && h.task == current_backward_pass())) return c10::nullopt;
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor x = saved[0], t32 = saved[1], norms = saved[2];
    const int64_t n = x.size(0), d = x.size(1), r = t32.size(0);
    if (!kernels::row_dot_norm_backward_supports(x.data_ptr(), row_dtype(x.scalar_type()), d, r) ||
        sink.parts.size() > 2 || d > kernels::kRmsNormMaxRouteWidth)
      return c10::nullopt;
    for (const auto& part : sink.parts)
      if (!slot_part_fits(part, n, d)) return c10::nullopt;
    c10::cuda::CUDAGuard guard(x.device());
    const cudaStream_t st = at::cuda::getCurrentCUDAStream().stream();
    torch::Tensor gd = float_grad(grads[0]), gn = float_grad(grads[1]);
    torch::Tensor gt;
    if (ctx->needs_input_grad(1) && gd.defined()) {
      kernels::RowDotBackwardParams p = kernel_params(x, t32, norms);
      p.grad_dots = gd.data_ptr<float>();
      torch::Tensor partial = torch::empty({kernels::row_dot_norm_backward_partials(n), r, d}, t32.options());
      p.grad_tokens_partial = partial.data_ptr<float>();
      kernels::row_dot_norm_backward_cuda(p, st);
      gt = tokens_grad(ctx, partial);
    }
    h.clear();
    h.task = current_backward_pass();
    h.r = gd.defined() ? r : 0;
    h.tokens = t32;
    h.grad_dots = gd;
    if (gn.defined()) {
      h.grad_norms = gn.view({n});
      h.norms = norms.view({n});
    }
    if (grads[2].defined()) h.passed = as_type(grads[2], x.scalar_type()).contiguous();
    int used = 0;
    for (const auto& part : sink.parts) {
      std::tie(h.slot[used], h.slot_rows[used]) = slot_part(part, x, st);
      ++used;
    }
    sink.parts.clear();
    h.pending = true;
    return torch::autograd::variable_list{torch::Tensor(), gt, torch::Tensor()};
  }

  // (x's gradient, the tokens' gradient, whether x's gradient includes that of
  // the alias, grads[2], added by the kernel). The kernel also adds up to two
  // of the gathered rows' parts of distinct positions (by a map of each row's
  // place in them); those leave `parts`.
  static std::tuple<torch::Tensor, torch::Tensor, bool> scores_backward(torch::autograd::AutogradContext* ctx,
                                                                        const torch::autograd::variable_list& grads,
                                                                        std::vector<RowGradSink::Part>& parts) {
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor &x = saved[0], &t32 = saved[1], &norms = saved[2];
    const torch::Tensor &g_dots = grads[0], &g_norms = grads[1];
    const int64_t n = x.size(0), d = x.size(1), r = t32.size(0);
    if (kernels::row_dot_norm_backward_supports(x.data_ptr(), row_dtype(x.scalar_type()), d, r)) {
      // One kernel: x read once, grad x written once, the tokens' gradient as
      // per-block partial sums.
      c10::cuda::CUDAGuard guard(x.device());
      kernels::RowDotBackwardParams p = kernel_params(x, t32, norms);
      torch::Tensor gd = float_grad(g_dots), gn = float_grad(g_norms);
      if (gd.defined()) p.grad_dots = gd.data_ptr<float>();
      if (gn.defined()) p.grad_norms = gn.data_ptr<float>();
      torch::Tensor gx, partial, passed;
      std::vector<torch::Tensor> slot_keep;
      if (ctx->needs_input_grad(0) && (gd.defined() || gn.defined())) {
        gx = torch::empty_like(x);
        p.grad_x = gx.data_ptr();
        // x's gradient from its uses past this node, added as gx is written.
        if (grads[2].defined()) {
          passed = as_type(grads[2], x.scalar_type()).contiguous();
          if (reinterpret_cast<uintptr_t>(passed.data_ptr()) % 16 == 0)
            p.grad_x_add = passed.data_ptr();
          else
            passed = torch::Tensor();
        }
        // Gathered rows' gradients, added by each row's slot.
        int used = 0;
        for (auto it = parts.begin(); it != parts.end() && used < 2;) {
          if (!slot_part_fits(*it, n, d)) {
            ++it;
            continue;
          }
          auto [slot, rows] = slot_part(*it, x, at::cuda::getCurrentCUDAStream().stream());
          p.slot[used] = slot.data_ptr<int32_t>();
          p.slot_rows[used] = rows.data_ptr();
          slot_keep.push_back(slot);
          slot_keep.push_back(rows);
          ++used;
          it = parts.erase(it);
        }
      }
      if (ctx->needs_input_grad(1) && gd.defined()) {
        partial = torch::empty({kernels::row_dot_norm_backward_partials(n), r, d}, t32.options());
        p.grad_tokens_partial = partial.data_ptr<float>();
      }
      if (p.grad_x || p.grad_tokens_partial) {
        kernels::row_dot_norm_backward_cuda(p, at::cuda::getCurrentCUDAStream().stream());
      }
      torch::Tensor gt;
      if (partial.defined()) gt = tokens_grad(ctx, partial);
      return {gx, gt, passed.defined()};
    }
    torch::Tensor x32 = as_type(x, torch::kFloat);
    torch::Tensor gx, gt;
    if (g_dots.defined()) {
      if (ctx->needs_input_grad(0)) gx = torch::matmul(g_dots, t32);
      if (ctx->needs_input_grad(1)) gt = as_type(torch::matmul(g_dots.t(), x32), tokens_dtype(ctx));
    }
    if (g_norms.defined() && ctx->needs_input_grad(0)) {
      // d|x|/dx = x / |x| (zero at x = 0).
      torch::Tensor coef = torch::where(norms > 0, g_norms / norms, torch::zeros_like(norms));
      gx = gx.defined() ? gx + coef * x32 : coef * x32;
    }
    if (gx.defined()) gx = as_type(gx, x.scalar_type());
    return {gx, gt, false};
  }
};

#endif

// Whether the routing-scores kernel takes x [N, d] and tokens [r, d].
bool routing_dot_applies(const torch::Tensor& x, const torch::Tensor& tokens) {
#ifdef COLT5_WITH_CUDA
  const auto t = x.scalar_type();
  return x.is_cuda() && (t == torch::kFloat || t == torch::kHalf || t == torch::kBFloat16) && tokens.dim() == 2 &&
         tokens.size(0) >= 1 && tokens.size(0) <= 4 && tokens.size(0) * x.size(-1) <= kernels::kRowDotMaxTokenFloats &&
         tokens.device() == x.device();
#else
  return false;
#endif
}

void check_router_input(const RouterOptions& o, const torch::Tensor& x, int64_t num_tokens, const torch::Tensor& mask) {
  TORCH_CHECK(x.defined() && x.dim() == 3, "CoordinateDescentRouter: x must be (b, n, dim), got ",
              x.defined() ? x.sizes() : c10::IntArrayRef{});
  TORCH_CHECK(x.is_floating_point(), "CoordinateDescentRouter: x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(x.size(2) == o.dim(), "CoordinateDescentRouter: x has width ", x.size(2), " but the router's dim is ",
              o.dim());
  TORCH_CHECK(num_tokens >= 1, "CoordinateDescentRouter: num_tokens must be at least 1, got ", num_tokens);
  if (!mask.defined()) return;
  TORCH_CHECK(mask.scalar_type() == torch::kBool, "CoordinateDescentRouter: mask must be bool, got ",
              mask.scalar_type());
  TORCH_CHECK((mask.dim() == 2 || mask.dim() == 3) && mask.size(0) == x.size(0) && mask.size(-1) == x.size(1),
              "CoordinateDescentRouter: mask must be (b, n) = (", x.size(0), ", ", x.size(1),
              ") (or (b, views, n)), got ", mask.sizes());
  TORCH_CHECK(mask.dim() == 2 || !o.route_block_size(),
              "CoordinateDescentRouter: a mask of several views cannot be combined with route_block_size");
  TORCH_CHECK(mask.device() == x.device(), "CoordinateDescentRouter: mask is on ", mask.device(), " but x is on ",
              x.device());
}

// The routing tokens: the router's own ([r, d]) or the caller's ([b, r, d]).
torch::Tensor routing_tokens_of(const RouterOptions& o, const torch::Tensor& own, const torch::Tensor& given,
                                const torch::Tensor& x) {
  const int64_t r = o.num_routing_tokens();
  torch::Tensor tokens;
  if (o.learned_routing_tokens()) {
    TORCH_CHECK(given.defined(), "CoordinateDescentRouter: routing_tokens are required with learned_routing_tokens");
    tokens = given.dim() == 2 ? given.unsqueeze(1) : given;
    TORCH_CHECK(tokens.dim() == 3 && tokens.size(0) == x.size(0) && tokens.size(1) == r && tokens.size(2) == o.dim(),
                "CoordinateDescentRouter: routing_tokens must be (b, dim) or (b, num_routing_tokens, dim) = (",
                x.size(0), ", ", r, ", ", o.dim(), "), got ", given.sizes());
  } else {
    TORCH_CHECK(!given.defined(),
                "CoordinateDescentRouter: routing_tokens given but the router has its own (learned_routing_tokens is "
                "false)");
    tokens = own;
  }
  TORCH_CHECK(tokens.scalar_type() == x.scalar_type(), "CoordinateDescentRouter: x is ", x.scalar_type(),
              " but the routing tokens are ", tokens.scalar_type());
  TORCH_CHECK(tokens.device() == x.device(), "CoordinateDescentRouter: x is on ", x.device(),
              " but the routing tokens are on ", tokens.device());
  return tokens;
}

// n <= num_tokens: every token is routed with score 1.
RouterOutput route_all(const torch::Tensor& x, const torch::Tensor& mask, int64_t r, int64_t views,
                       bool has_route_dim) {
  const int64_t b = x.size(0), n = x.size(1), d = x.size(2), b_out = b * views;
  RouterOutput out;
  torch::Tensor xv = views == 1 ? x : x.unsqueeze(1).expand({b, views, n, d}).reshape({b_out, n, d});
  torch::Tensor mv = mask.defined() ? mask.reshape({b_out, n}) : mask;
  if (has_route_dim) {
    out.scores = torch::ones({b_out, r, n}, x.options());
    out.routed_tokens = xv.unsqueeze(1).expand({b_out, r, n, d});
    if (mv.defined()) out.routed_mask = mv.unsqueeze(1).expand({b_out, r, n});
  } else {
    out.scores = torch::ones({b_out, n}, x.options());
    out.routed_tokens = xv;
    out.routed_mask = mv;
  }
  return out;
}

// The routing scores of each row (and block) against each routing token, in
// float32 at least: [rows, r, len].
torch::Tensor routing_scores(const RouterOptions& o, const torch::Tensor& xs, const torch::Tensor& toks,
                             GatherSource* gather = nullptr) {
  RECORD_USER_SCOPE("colt5::routing_scores");
  torch::Tensor s;
  if (routing_dot_applies(xs, toks)) {
#ifdef COLT5_WITH_CUDA
    // On CUDA: one read of x by the routing-scores kernel, float32 scores. For
    // cosine routing the tokens are normalized in float32 and each row's dot
    // product is divided by the row's norm from the same read.
    const int64_t rows = xs.size(0), len = xs.size(1), d = xs.size(2), r = o.num_routing_tokens();
    torch::Tensor t = o.cosine_sim_routing() ? l2norm(as_type(toks, torch::kFloat)) * o.cosine_sim_scale() : toks;
    auto sink = c10::make_intrusive<RowGradSink>();
    auto out = RoutingDotFunction::apply(xs.reshape({rows * len, d}).contiguous(), t, sink);
    torch::Tensor dots = out[0];
    if (o.cosine_sim_routing()) dots = dots / out[1].clamp_min(1e-12);
    s = dots.view({rows, len, r}).transpose(1, 2);
    if (gather) *gather = {out[2], sink};
#endif
  } else if (o.cosine_sim_routing()) {
    // normalize(x) . normalize(t) * scale, computed as (x . normalize(t) * scale) / max(|x|, 1e-12): x is
    // read for its norms and for the product, never written out normalized (for a million memories of
    // 512 floats that copy alone is 2 GiB written and read again).
    torch::Tensor tn = l2norm(toks) * o.cosine_sim_scale();
    torch::Tensor norms = xs.norm(2, -1, /*keepdim=*/true).clamp_min(1e-12);  // (rows, len, 1)
    s = toks.dim() == 2 ? (torch::matmul(xs, tn.t()) / norms).transpose(1, 2)
                        : torch::matmul(tn, xs.transpose(1, 2)) / norms.transpose(1, 2);
  } else {
    s = toks.dim() == 2 ? torch::matmul(xs, toks.t()).transpose(1, 2) : torch::matmul(toks, xs.transpose(1, 2));
  }
  // Routing math (coordinate descent, the top-k and its tie-break) in float32 at least.
  if (s.scalar_type() == torch::kHalf || s.scalar_type() == torch::kBFloat16) s = s.to(torch::kFloat32);
  return s;
}

// Scores [rows, r, len] and mask as flat rows [rows * views * r, len] (one
// copy per view of a viewed mask [rows, views, len]; the scores are the same
// in every view).
std::pair<torch::Tensor, torch::Tensor> flat_rows(const torch::Tensor& s, const torch::Tensor& ms, int64_t views) {
  const int64_t rows = s.size(0), r = s.size(1), len = s.size(2);
  torch::Tensor mflat;
  if (views > 1 || (ms.defined() && ms.dim() == 3)) {
    return {s.unsqueeze(1).expand({rows, views, r, len}).reshape({rows * views * r, len}),
            ms.unsqueeze(2).expand({rows, views, r, len}).reshape({rows * views * r, len})};
  }
  if (ms.defined()) mflat = ms.reshape({rows, len}).unsqueeze(1).expand({rows, r, len}).reshape({rows * r, len});
  return {s.reshape({rows * r, len}), mflat};
}

}  // namespace

namespace {

// forward(), with the views of a viewed mask optionally routed in groups over
// the prefixes they need (route_prefix_views).
RouterOutput route_impl(CoordinateDescentRouterImpl& self, const torch::Tensor& x, int64_t num_tokens,
                        const torch::Tensor& mask, bool random_route, const torch::Tensor& routing_tokens,
                        bool keep_one_route_dim, bool gather_tokens, const std::vector<int64_t>* view_lengths,
                        int64_t groups, const torch::Tensor& scores_in = {},
                        const CoordinateDescentRouterOptions* options_in = nullptr) {
  RECORD_USER_SCOPE("colt5::router");
  const auto& o = options_in ? *options_in : self.options;
  check_router_input(o, x, num_tokens, mask);
  const torch::Tensor tokens = routing_tokens_of(o, self.routing_token, routing_tokens, x);
  const int64_t r = o.num_routing_tokens();
  const int64_t b = x.size(0), n = x.size(1), d = x.size(2);
  const bool has_route_dim = keep_one_route_dim || r != 1;
  // A [batch, views, seq] mask routes each row once per view: output row
  // i * views + v routes row i of x under mask[i, v].
  const bool viewed = mask.defined() && mask.dim() == 3;
  const int64_t views = viewed ? mask.size(1) : 1;
  const int64_t b_out = b * views;
  if (n <= num_tokens) return route_all(x, mask, r, views, has_route_dim);

  // Optionally route an even share from each whole block of the sequence.
  torch::Tensor xs = x, ms = mask, toks = tokens;
  int64_t num_blocks = 1, len = n, k = num_tokens;
  if (o.route_block_size()) {
    const int64_t w = *o.route_block_size();
    num_blocks = n / w;
    TORCH_CHECK(num_blocks >= 1, "CoordinateDescentRouter: the sequence (", n, ") is shorter than route_block_size (",
                w, ")");
    k = (num_tokens + num_blocks - 1) / num_blocks;
    TORCH_CHECK(k <= w, "CoordinateDescentRouter: routing ", num_tokens, " tokens from ", num_blocks, " blocks needs ",
                k, " per block, more than route_block_size (", w, ")");
    xs = x.narrow(1, 0, num_blocks * w).reshape({b * num_blocks, w, d});
    if (mask.defined()) ms = mask.narrow(1, 0, num_blocks * w).reshape({b * num_blocks, w});
    if (toks.dim() == 3) toks = toks.repeat_interleave(num_blocks, 0);
    len = w;
  }
  // [b * num_blocks, r, len]; given by route_pair for a whole-sequence router.
  // Blocked rows are not x's rows in x's order: no gathers from their alias.
  GatherSource gather;
  const torch::Tensor s_rows =
      scores_in.defined() ? scores_in : routing_scores(o, xs, toks, o.route_block_size() ? nullptr : &gather);

  const double effective_k = std::min(static_cast<double>(k) * o.fetch_k_ratio(), static_cast<double>(len));
  auto cd = CoorDescentOptions()
                .n_iters(o.n_iters())
                .eps(o.eps())
                .eps_init(o.eps_init())
                .eps_decay(o.eps_decay())
                .checkpoint_segments(o.checkpoint_segments());
  // Flat rows of scores and mask -> the indices of the k routed and their
  // scores; picked_mask: the mask at those indices, when the straight-through
  // scores needed it (the routed mask, for one route block and no views).
  torch::Tensor picked_mask;
  auto route_rows = [&](const torch::Tensor& s, const torch::Tensor& mflat) -> std::pair<torch::Tensor, torch::Tensor> {
    RECORD_USER_SCOPE("colt5::route_rows");
    torch::Tensor scores = coor_descent(s, effective_k, cd, mflat);
    if (random_route) {
      scores = torch::randn_like(scores);
      if (mflat.defined()) scores = scores.masked_fill(~mflat, -std::numeric_limits<double>::max());
    }
    // Saturated scores tie; the raw routing score breaks the tie (then position).
    torch::Tensor idx = topk_indices(scores.detach(), k, s.detach(), mflat);
    torch::Tensor sel = scores.gather(-1, idx);
    if (o.straight_through()) {
      // 1 in value, the soft score's gradient; 0 at masked positions. (rsub:
      // LibTorch's scalar - tensor is three kernels.)
      sel = sel + torch::rsub(sel, 1.0).detach();
      if (mflat.defined()) {
        picked_mask = mflat.gather(-1, idx);
        sel = sel.masked_fill(picked_mask.logical_not(), 0.0);
      }
    }
    return {idx, sel};
  };

  // Views whose masks are prefixes, in groups over the prefix each group
  // needs: at least enough positions that coordinate descent's k and the
  // top-k's are those of the whole (masked positions take no part).
  const int64_t min_len = std::max<int64_t>(k + 1, static_cast<int64_t>(std::ceil(effective_k)));
  const bool grouped = view_lengths && groups > 1 && viewed && views >= 2 && !o.route_block_size() &&
                       static_cast<int64_t>(view_lengths->size()) == views && len > min_len;
  torch::Tensor indices, selected;
  if (!grouped) {
    auto [s, mflat] = flat_rows(s_rows, ms, views);
    std::tie(indices, selected) = route_rows(s, mflat);
  } else {
    groups = std::min(groups, views);
    std::vector<torch::Tensor> idx_parts, sel_parts;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t v0 = views * g / groups, v1 = views * (g + 1) / groups;
      const int64_t len_g = std::min(len, std::max(min_len, (*view_lengths)[v1 - 1]));
      auto [s, mflat] = flat_rows(s_rows.narrow(2, 0, len_g), ms.narrow(1, v0, v1 - v0).narrow(2, 0, len_g), v1 - v0);
      auto [idx, sel] = route_rows(s, mflat);
      // Rows are (batch row, view, route): each group's views in their place.
      idx_parts.push_back(idx.view({b, (v1 - v0) * r, k}));
      sel_parts.push_back(sel.view({b, (v1 - v0) * r, k}));
    }
    indices = torch::cat(idx_parts, 1).view({b_out * r, k});
    selected = torch::cat(sel_parts, 1).view({b_out * r, k});
  }

  // [rows * r, k] -> [b, (r,) num_blocks * k], with whole-sequence indices.
  indices = indices.view({b_out, num_blocks, r, k});
  selected = selected.view({b_out, num_blocks, r, k});
  if (num_blocks > 1 || o.route_block_size()) {
    auto offsets = torch::arange(num_blocks, indices.options()).mul_(*o.route_block_size());
    indices = indices + offsets.view({1, num_blocks, 1, 1});
  }
  indices = indices.permute({0, 2, 1, 3}).reshape({b_out, r, num_blocks * k});
  selected = selected.permute({0, 2, 1, 3}).reshape({b_out, r, num_blocks * k});
  if (!has_route_dim) {
    indices = indices.squeeze(1);
    selected = selected.squeeze(1);
  }

  // Gather from the whole sequence of each batch row.
  RouterOutput out;
  out.indices = indices;
  out.scores = as_type(selected, x.scalar_type());
  if (gather.x_rows.defined()) out.x_passed = gather.x_rows.view(x.sizes());
  if (!viewed) {
    // One flat index for the tokens and the mask.
    if (mask.defined() && picked_mask.defined() && num_blocks == 1 && !o.route_block_size())
      out.routed_mask = picked_mask.view(indices.sizes());
    const bool gather_mask = mask.defined() && !out.routed_mask.defined();
    torch::Tensor flat = gather_tokens || gather_mask ? flat_positions(indices, n) : torch::Tensor();
    if (gather_tokens)
      out.routed_tokens = gather.x_rows.defined() ? gather_via_sink(gather, flat, indices.sizes().vec(),
                                                                    /*distinct=*/!has_route_dim || r == 1)
                                                  : gather_rows(x, indices, flat);
    if (gather_mask) out.routed_mask = gather_rows(mask, indices, flat);
  } else {
    std::vector<int64_t> shape = indices.sizes().vec();
    shape.push_back(d);
    if (gather_tokens) out.routed_tokens = gather_rows(x, indices.reshape({b, -1})).view(shape);
    out.routed_mask = gather_rows(mask.reshape({b_out, n}), indices);
  }
  return out;
}

}  // namespace

RouterOutput CoordinateDescentRouterImpl::forward(const torch::Tensor& x, int64_t num_tokens, const torch::Tensor& mask,
                                                  bool random_route, const torch::Tensor& routing_tokens,
                                                  bool keep_one_route_dim, bool gather_tokens) {
  return route_impl(*this, x, num_tokens, mask, random_route, routing_tokens, keep_one_route_dim, gather_tokens,
                    nullptr, 1);
}

RouterOutput route_prefix_views(CoordinateDescentRouterImpl& router, const torch::Tensor& x, int64_t num_tokens,
                                const torch::Tensor& mask, const std::vector<int64_t>& lengths, int64_t groups,
                                bool random_route, bool keep_one_route_dim, bool gather_tokens) {
  TORCH_CHECK(groups >= 1, "route_prefix_views: groups must be positive, got ", groups);
  return route_impl(router, x, num_tokens, mask, random_route, {}, keep_one_route_dim, gather_tokens, &lengths, groups);
}

std::pair<RouterOutput, RouterOutput> route_pair(CoordinateDescentRouterImpl& q_router,
                                                 CoordinateDescentRouterImpl& kv_router, const torch::Tensor& x,
                                                 int64_t num_q, int64_t num_kv, const torch::Tensor& mask,
                                                 bool random_route, bool joint_scores) {
  auto separately = [&] {
    return std::make_pair(q_router.forward(x, num_q, mask, random_route),
                          kv_router.forward(x, num_kv, mask, random_route));
  };
#ifdef COLT5_WITH_CUDA
  const auto &oq = q_router.options, &okv = kv_router.options;
  const bool joint = joint_scores && x.defined() && x.dim() == 3 && !oq.learned_routing_tokens() &&
                     !okv.learned_routing_tokens() && !oq.route_block_size() && !okv.route_block_size() &&
                     (!mask.defined() || mask.dim() == 2) && num_q >= 1 && num_kv >= 1 && x.size(1) > num_q &&
                     x.size(1) > num_kv && q_router.routing_token.defined() && kv_router.routing_token.defined() &&
                     oq.num_routing_tokens() + okv.num_routing_tokens() <= 4 && x.size(2) == oq.dim() &&
                     x.size(2) == okv.dim() && routing_dot_applies(x, q_router.routing_token) &&
                     routing_dot_applies(x, kv_router.routing_token) &&
                     (oq.num_routing_tokens() + okv.num_routing_tokens()) * x.size(2) <= kernels::kRowDotMaxTokenFloats;
  if (!joint) return separately();
  check_router_input(oq, x, num_q, mask);
  check_router_input(okv, x, num_kv, mask);
  (void)routing_tokens_of(oq, q_router.routing_token, {}, x);
  (void)routing_tokens_of(okv, kv_router.routing_token, {}, x);
  // Both routers' scores from one read of x: their (normalized) tokens side
  // by side in one call of the routing-scores kernel, so the backward writes
  // one gradient of x instead of two to be added.
  torch::Tensor scores[2], x_rows;
  auto sink = c10::make_intrusive<RowGradSink>();
  {
    RECORD_USER_SCOPE("colt5::routing_scores");
    auto tokens_of = [&](const RouterOptions& o, const torch::Tensor& t) {
      return o.cosine_sim_routing() ? l2norm(as_type(t, torch::kFloat)) * o.cosine_sim_scale()
                                    : as_type(t, torch::kFloat);
    };
    const int64_t b = x.size(0), n = x.size(1), d = x.size(2), rq = oq.num_routing_tokens();
    torch::Tensor t = torch::cat({tokens_of(oq, q_router.routing_token), tokens_of(okv, kv_router.routing_token)}, 0);
    auto out = RoutingDotFunction::apply(x.reshape({b * n, d}).contiguous(), t, sink);
    x_rows = out[2];
    const RouterOptions* opts[2] = {&oq, &okv};
    const int64_t first[2] = {0, rq}, count[2] = {rq, okv.num_routing_tokens()};
    for (int i = 0; i < 2; ++i) {
      torch::Tensor dots = out[0].narrow(1, first[i], count[i]);
      if (opts[i]->cosine_sim_routing()) dots = dots / out[1].clamp_min(1e-12);
      scores[i] = dots.view({b, n, count[i]}).transpose(1, 2);
    }
  }
  RouterOutput q, kv;
  const bool same_descent =
      num_q == num_kv && oq.n_iters() == okv.n_iters() && oq.fetch_k_ratio() == okv.fetch_k_ratio() &&
      oq.eps() == okv.eps() && oq.eps_decay() == okv.eps_decay() && oq.eps_init() == okv.eps_init() &&
      oq.checkpoint_segments() == okv.checkpoint_segments() && oq.straight_through() == okv.straight_through();
  if (same_descent) {
    // The same k and schedule: both routers' rows through one coordinate
    // descent and one top-k (each row's routing is its own; one launch for
    // the rows of both), then split by route.
    const int64_t rq = oq.num_routing_tokens(), rkv = okv.num_routing_tokens();
    CoordinateDescentRouterOptions both = oq;
    both.num_routing_tokens(rq + rkv);
    RouterOutput all = route_impl(q_router, x, num_q, mask, random_route, {}, /*keep_one_route_dim=*/true,
                                  /*gather_tokens=*/false, nullptr, 1, torch::cat({scores[0], scores[1]}, 1), &both);
    auto part = [&](const torch::Tensor& t, int64_t first, int64_t count) {
      if (!t.defined()) return t;
      torch::Tensor p = t.narrow(1, first, count);
      return (count == 1 ? p.squeeze(1) : p).contiguous();
    };
    q.indices = part(all.indices, 0, rq);
    q.scores = part(all.scores, 0, rq);
    q.routed_mask = part(all.routed_mask, 0, rq);
    kv.indices = part(all.indices, rq, rkv);
    kv.scores = part(all.scores, rq, rkv);
    kv.routed_mask = part(all.routed_mask, rq, rkv);
  } else {
    q = route_impl(q_router, x, num_q, mask, random_route, {}, false, /*gather_tokens=*/false, nullptr, 1, scores[0]);
    kv =
        route_impl(kv_router, x, num_kv, mask, random_route, {}, false, /*gather_tokens=*/false, nullptr, 1, scores[1]);
  }
  // Both routers' rows in one gather (one gradient of x in the backward).
  const int64_t n = x.size(1);
  torch::Tensor fq = flat_positions(q.indices, n), fkv = flat_positions(kv.indices, n);
  // Each router's rows are distinct positions (one routing token each).
  std::vector<int64_t> segments;
  if (q.indices.dim() == 2 && kv.indices.dim() == 2) segments = {fq.size(0), fkv.size(0)};
  torch::Tensor rows = GatherRowsFunction::apply(x_rows, torch::cat({fq, fkv}), sink, segments);
  std::vector<int64_t> q_shape = q.indices.sizes().vec(), kv_shape = kv.indices.sizes().vec();
  q_shape.push_back(x.size(2));
  kv_shape.push_back(x.size(2));
  q.x_passed = x_rows.view(x.sizes());
  q.routed_tokens = rows.narrow(0, 0, fq.size(0)).view(q_shape);
  kv.routed_tokens = rows.narrow(0, fq.size(0), fkv.size(0)).view(kv_shape);
  return {q, kv};
#else
  return separately();
#endif
}

c10::optional<std::pair<RouterOutput, RouterOutput>> route_queries_of_context(
    CoordinateDescentRouterImpl& q_router, CoordinateDescentRouterImpl& kv_router, const torch::Tensor& queries,
    int64_t num_q, const torch::Tensor& query_mask, const torch::Tensor& context, int64_t num_kv,
    const torch::Tensor& context_mask, const std::vector<int64_t>& lengths, int64_t groups, bool random_route,
    bool keep_one_route_dim, bool gather_tokens) {
#ifdef COLT5_WITH_CUDA
  const auto &oq = q_router.options, &okv = kv_router.options;
  if (!queries.defined() || !context.defined() || queries.dim() != 3 || context.dim() != 3) return c10::nullopt;
  const int64_t d = context.size(2), rq = oq.num_routing_tokens(), rkv = okv.num_routing_tokens();
  // The queries must be the context's own elements in its order (a view).
  const bool same_rows = queries.is_contiguous() && context.is_contiguous() && queries.size(2) == d &&
                         queries.numel() == context.numel() && queries.data_ptr() == context.data_ptr() &&
                         queries.scalar_type() == context.scalar_type() && queries.device() == context.device();
  const bool joint = same_rows && !oq.learned_routing_tokens() && !okv.learned_routing_tokens() &&
                     !oq.route_block_size() && !okv.route_block_size() && q_router.routing_token.defined() &&
                     kv_router.routing_token.defined() && num_q >= 1 && num_kv >= 1 && queries.size(1) > num_q &&
                     context.size(1) > num_kv && d == oq.dim() && d == okv.dim() && rq + rkv <= 4 &&
                     (rq + rkv) * d <= kernels::kRowDotMaxTokenFloats &&
                     routing_dot_applies(context, q_router.routing_token) &&
                     routing_dot_applies(context, kv_router.routing_token) && groups >= 1;
  if (!joint) return c10::nullopt;
  check_router_input(oq, queries, num_q, query_mask);
  check_router_input(okv, context, num_kv, context_mask);
  (void)routing_tokens_of(oq, q_router.routing_token, {}, queries);
  (void)routing_tokens_of(okv, kv_router.routing_token, {}, context);
  // Both routers' scores from one read of the sequence: their (normalized)
  // tokens side by side in one call of the routing-scores kernel; the
  // backward writes the sequence's gradient once, with the gradients of the
  // queries' gathered rows and of the context's later uses added in it.
  torch::Tensor scores[2], x_rows;
  auto sink = c10::make_intrusive<RowGradSink>();
  {
    RECORD_USER_SCOPE("colt5::routing_scores");
    auto tokens_of = [&](const RouterOptions& o, const torch::Tensor& t) {
      return o.cosine_sim_routing() ? l2norm(as_type(t, torch::kFloat)) * o.cosine_sim_scale()
                                    : as_type(t, torch::kFloat);
    };
    torch::Tensor t = torch::cat({tokens_of(oq, q_router.routing_token), tokens_of(okv, kv_router.routing_token)}, 0);
    auto out = RoutingDotFunction::apply(context.reshape({-1, d}), t, sink);
    x_rows = out[2];
    const RouterOptions* opts[2] = {&oq, &okv};
    const torch::Tensor* of[2] = {&queries, &context};
    const int64_t first[2] = {0, rq}, count[2] = {rq, rkv};
    for (int i = 0; i < 2; ++i) {
      torch::Tensor dots = out[0].narrow(1, first[i], count[i]);
      if (opts[i]->cosine_sim_routing()) dots = dots / out[1].clamp_min(1e-12);
      scores[i] = dots.view({of[i]->size(0), of[i]->size(1), count[i]}).transpose(1, 2);
    }
  }
  RouterOutput q = route_impl(q_router, x_rows.view(queries.sizes()), num_q, query_mask, random_route, {},
                              /*keep_one_route_dim=*/false, /*gather_tokens=*/false, nullptr, 1, scores[0]);
  RouterOutput kv = route_impl(kv_router, x_rows.view(context.sizes()), num_kv, context_mask, random_route, {},
                               keep_one_route_dim, gather_tokens, &lengths, groups, scores[1]);
  // The queries' routed rows from the scores' alias (their gradients added in
  // its backward kernel).
  std::vector<int64_t> shape = q.indices.sizes().vec();
  q.routed_tokens = gather_via_sink({x_rows, sink}, flat_positions(q.indices, queries.size(1)), std::move(shape),
                                    /*distinct=*/q.indices.dim() == 2);
  q.x_passed = x_rows.view(queries.sizes());
  kv.x_passed = x_rows.view(context.sizes());
  return std::make_pair(q, kv);
#else
  (void)q_router, (void)kv_router, (void)queries, (void)num_q, (void)query_mask, (void)context, (void)num_kv;
  (void)context_mask, (void)lengths, (void)groups, (void)random_route, (void)keep_one_route_dim, (void)gather_tokens;
  return c10::nullopt;
#endif
}

torch::Tensor CoordinateDescentRouterImpl::route_back(const torch::Tensor& src, const torch::Tensor& routed_tokens,
                                                      const torch::Tensor& indices) const {
  RECORD_USER_SCOPE("colt5::route_back");
  TORCH_CHECK(src.defined() && src.dim() == 3, "route_back: src must be (b, n, dim)");
  TORCH_CHECK(indices.defined() && indices.dim() == 2 && indices.size(0) == src.size(0) &&
                  indices.scalar_type() == torch::kLong,
              "route_back: indices must be int64 (b, k) with b ", src.size(0), ", got ",
              indices.defined() ? indices.sizes() : c10::IntArrayRef{});
  TORCH_CHECK(routed_tokens.defined() && routed_tokens.dim() == 3 && routed_tokens.size(0) == src.size(0) &&
                  routed_tokens.size(1) == indices.size(1) && routed_tokens.size(2) == src.size(2),
              "route_back: routed_tokens must be (b, k, dim) = (", src.size(0), ", ", indices.size(1), ", ",
              src.size(2), "), got ", routed_tokens.defined() ? routed_tokens.sizes() : c10::IntArrayRef{});
  TORCH_CHECK(routed_tokens.scalar_type() == src.scalar_type(), "route_back: routed_tokens are ",
              routed_tokens.scalar_type(), " but src is ", src.scalar_type());
  auto idx = indices.unsqueeze(-1).expand({indices.size(0), indices.size(1), src.size(2)});
  return src.scatter(1, idx, routed_tokens);
}

RouterKwargs CoordinateDescentRouterOptions::kwargs() const {
  RouterKwargs to;
  const auto& from = *this;
  COLT5_ROUTER_KWARGS_OPTIONS(COLT5_COPY_OPTION)
  return to;
}

CoordinateDescentRouterOptions& CoordinateDescentRouterOptions::kwargs(const RouterKwargs& from) {
  auto& to = *this;
  COLT5_ROUTER_KWARGS_OPTIONS(COLT5_COPY_OPTION)
  return *this;
}

void CoordinateDescentRouterImpl::pretty_print(std::ostream& stream) const {
  print_module(stream, "CoordinateDescentRouter", "dim=" + std::to_string(options.dim()), options,
               CoordinateDescentRouterOptions(options.dim()));
}

}  // namespace nn
}  // namespace colt5
