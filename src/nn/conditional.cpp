#include "colt5/nn/conditional.h"

#include <ATen/record_function.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "nn/attention_core.h"
#include "nn/heavy_branch.h"
#include "nn/route_views.h"
#include "ops/as_type.h"
#include "ops/row_dtype.h"

#ifdef COLT5_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "kernels/coor_descent.h"
#endif

namespace colt5 {
namespace nn {

#ifdef COLT5_WITH_CUDA
namespace {

// add_scaled_rows on CUDA: out changed in place (its gradient passes through),
// one kernel each way. scale and bias: float32, or empty when absent.
class ScatterRowsFunction : public torch::autograd::Function<ScatterRowsFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, torch::Tensor out, const torch::Tensor& src,
                               const torch::Tensor& scale, const torch::Tensor& bias, const torch::Tensor& indices,
                               int64_t lead) {
    ctx->mark_dirty({out});
    ctx->save_for_backward({src, scale, indices});
    ctx->saved_data["lead"] = lead;
    ctx->saved_data["n"] = out.size(1);
    ctx->saved_data["out_dtype"] = static_cast<int64_t>(out.scalar_type());
    ctx->saved_data["has_bias"] = bias.numel() > 0;
    c10::cuda::CUDAGuard guard(out.device());
    kernels::ScatterRowsParams p;
    p.out = out.data_ptr();
    p.out_dtype = row_dtype(out.scalar_type());
    p.src = src.data_ptr();
    p.src_dtype = row_dtype(src.scalar_type());
    p.indices = indices.data_ptr<int64_t>();
    p.scale = scale.numel() ? scale.data_ptr<float>() : nullptr;
    p.bias = bias.numel() ? bias.data_ptr<float>() : nullptr;
    p.batch = src.size(0);
    p.k = src.size(1);
    p.n = out.size(1);
    p.d = out.size(2);
    p.lead = lead;
    kernels::scatter_rows_forward_cuda(p, at::cuda::getCurrentCUDAStream().stream());
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    if (!grads[0].defined())
      return {torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor &src = saved[0], &scale = saved[1], &indices = saved[2];
    const auto out_dtype = static_cast<torch::ScalarType>(ctx->saved_data["out_dtype"].toInt());
    torch::Tensor g = as_type(grads[0], out_dtype).contiguous();
    torch::Tensor gsrc, gscale, gbias;
    if (ctx->needs_input_grad(1)) gsrc = torch::empty_like(src);
    if (ctx->needs_input_grad(2) && scale.numel()) gscale = torch::empty(scale.sizes(), scale.options());
    if (ctx->needs_input_grad(3) && ctx->saved_data["has_bias"].toBool())
      gbias = torch::zeros({g.size(2)}, g.options().dtype(torch::kFloat));
    if (gsrc.defined() || gscale.defined() || gbias.defined()) {
      c10::cuda::CUDAGuard guard(g.device());
      kernels::ScatterRowsParams p;
      p.out_dtype = row_dtype(g.scalar_type());
      p.src = src.data_ptr();
      p.src_dtype = row_dtype(src.scalar_type());
      p.indices = indices.data_ptr<int64_t>();
      p.scale = scale.numel() ? scale.data_ptr<float>() : nullptr;
      p.batch = src.size(0);
      p.k = src.size(1);
      p.n = ctx->saved_data["n"].toInt();
      p.d = g.size(2);
      p.lead = ctx->saved_data["lead"].toInt();
      p.grad_out = g.data_ptr();
      p.grad_src = gsrc.defined() ? gsrc.data_ptr() : nullptr;
      p.grad_scale = gscale.defined() ? gscale.data_ptr<float>() : nullptr;
      p.grad_bias = gbias.defined() ? gbias.data_ptr<float>() : nullptr;
      kernels::scatter_rows_backward_cuda(p, at::cuda::getCurrentCUDAStream().stream());
    }
    return {g, gsrc, gscale, gbias, torch::Tensor(), torch::Tensor()};
  }
};

bool scatter_rows_applies(const torch::Tensor& out, const torch::Tensor& src, const torch::Tensor& indices) {
  kernels::RowDtype t;
  return out.is_cuda() && src.is_cuda() && indices.is_cuda() && out.get_device() == src.get_device() &&
         out.is_contiguous() && row_dtype(out.scalar_type(), t) && row_dtype(src.scalar_type(), t) &&
         out.size(2) <= kernels::kScatterRowsMaxD && out.size(1) <= std::numeric_limits<int32_t>::max();
}

}  // namespace
#endif

torch::Tensor add_scaled_rows(torch::Tensor out, const torch::Tensor& indices, const torch::Tensor& src,
                              const torch::Tensor& scale, const torch::Tensor& bias, int64_t lead) {
  TORCH_CHECK(out.defined() && out.dim() == 3, "add_scaled_rows: out must be (b, n, d)");
  const int64_t b = out.size(0), n = out.size(1), d = out.size(2);
  TORCH_CHECK(indices.defined() && indices.dim() == 2 && indices.size(0) == b && indices.scalar_type() == torch::kLong,
              "add_scaled_rows: indices must be int64 (b, k) with b ", b);
  const int64_t k = indices.size(1);
  TORCH_CHECK(src.defined() && src.dim() == 3 && src.size(0) == b && src.size(1) == k && src.size(2) == d,
              "add_scaled_rows: src must be (b, k, d) = (", b, ", ", k, ", ", d, "), got ",
              src.defined() ? src.sizes() : c10::IntArrayRef{});
  TORCH_CHECK(!scale.defined() || (scale.dim() == 2 && scale.size(0) == b && scale.size(1) == k),
              "add_scaled_rows: scale must be (b, k)");
  TORCH_CHECK(!bias.defined() || (bias.numel() == d), "add_scaled_rows: bias must have d = ", d, " elements");
  TORCH_CHECK(lead >= 0 && lead <= n && (lead == 0 || bias.defined()),
              "add_scaled_rows: lead rows need a bias and at most n rows");
#ifdef COLT5_WITH_CUDA
  if (scatter_rows_applies(out, src, indices)) {
    auto f32 = out.options().dtype(torch::kFloat);
    torch::Tensor sc = scale.defined() ? as_type(scale, torch::kFloat).contiguous() : torch::empty({0}, f32);
    torch::Tensor bi = bias.defined() ? as_type(bias.reshape({d}), torch::kFloat).contiguous() : torch::empty({0}, f32);
    return ScatterRowsFunction::apply(out, src.contiguous(), sc, bi, indices.contiguous(), bias.defined() ? lead : 0);
  }
#endif
  // Composite: the scaled rows in the product's type, then out's; minus the
  // bias; the lead rows as rows of minus the bias; one scatter.
  const auto dt = out.scalar_type();
  torch::Tensor rows = as_type(scale.defined() ? src * scale.unsqueeze(-1) : src, dt);
  torch::Tensor idx = indices;
  if (bias.defined()) {
    const torch::Tensor bt = as_type(bias.reshape({1, 1, d}), dt);
    rows = rows - bt;
    if (lead > 0) {
      rows = torch::cat({bt.neg().expand({b, lead, d}), rows}, 1);
      idx = torch::cat({torch::arange(lead, indices.options()).view({1, lead}).expand({b, lead}), indices}, 1);
    }
  }
  return out.scatter_add_(1, idx.unsqueeze(-1).expand({b, idx.size(1), d}), rows);
}

namespace {

void check_tokens(const char* module, const char* name, const torch::Tensor& x, int64_t dim) {
  TORCH_CHECK(x.defined(), module, ": ", name, " is undefined");
  TORCH_CHECK(x.dim() == 3, module, ": ", name, " must be (b, n, dim), got ", x.dim(), " dimensions ", x.sizes());
  TORCH_CHECK(x.is_floating_point(), module, ": ", name, " must be floating point, got ", x.scalar_type());
  TORCH_CHECK(x.size(2) == dim, module, ": ", name, " has width ", x.size(2), " but the module's dim is ", dim);
}

void check_mask(const char* module, const char* name, const torch::Tensor& mask, const torch::Tensor& x,
                const char* x_name) {
  if (!mask.defined()) return;
  TORCH_CHECK(mask.scalar_type() == torch::kBool, module, ": ", name, " must be bool, got ", mask.scalar_type());
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == x.size(0) && mask.size(1) == x.size(1), module, ": ", name,
              " must be (b, n) = (", x.size(0), ", ", x.size(1), ") to match ", x_name, ", got ", mask.sizes());
  TORCH_CHECK(mask.device() == x.device(), module, ": ", name, " is on ", mask.device(), " but ", x_name, " is on ",
              x.device());
}

// The module's parameters must share x's dtype and device.
void check_matches_module(const char* module, const torch::Tensor& x, const torch::Tensor& param) {
  TORCH_CHECK(param.scalar_type() == x.scalar_type(), module, ": input is ", x.scalar_type(),
              " but the module's parameters are ", param.scalar_type(), " (convert one of them)");
  TORCH_CHECK(param.device() == x.device(), module, ": input is on ", x.device(), " but the module is on ",
              param.device());
}

int64_t token_count(const char* module, const char* name, c10::optional<int64_t> override_value, int64_t value) {
  const int64_t k = override_value.value_or(value);
  TORCH_CHECK(k >= 1, module, ": ", name, " must be at least 1, got ", k);
  return k;
}

// Output for every query: the null query token (or zeros) with the routed
// queries' outputs written at their positions.
torch::Tensor scatter_queries(const CoordinateDescentRouterImpl& router, const torch::Tensor& null_q_token,
                              const torch::Tensor& like, const torch::Tensor& routed_out,
                              const torch::Tensor& indices) {
  torch::Tensor base = null_q_token.defined() ? null_q_token.view({1, 1, -1}).expand_as(like) : torch::zeros_like(like);
  // Under autocast the heavy outputs may be in a lower precision than base.
  const auto dt = at::promote_types(base.scalar_type(), routed_out.scalar_type());
  return router.route_back(as_type(base, dt), as_type(routed_out, dt), indices);
}

// The type of rows times their scores (the rows' own where scores is
// undefined).
at::ScalarType scaled_type(const torch::Tensor& rows, const torch::Tensor& scores) {
  return scores.defined() ? at::promote_types(rows.scalar_type(), scores.scalar_type()) : rows.scalar_type();
}

// a + b (b may be undefined) + the heavy output: null_q_token (or zeros)
// everywhere, the routed outputs at their rows. One pass over the tokens for
// the sums; the routed rows then add (routed - null) in place (the same up
// to rounding).
torch::Tensor add_heavy_output(const torch::Tensor& null_q_token, const torch::Tensor& a, const torch::Tensor& b,
                               bool b_has_null, const torch::Tensor& routed_out, const torch::Tensor& scores,
                               const torch::Tensor& indices) {
  torch::Tensor null = null_q_token.defined() ? null_q_token.view({1, 1, -1}) : torch::Tensor();
  // A fresh tensor (the routed rows are added into it in place).
  torch::Tensor out = b.defined() ? residual_add(a, b) : torch::Tensor();
  if (null.defined() && !b_has_null) out = out.defined() ? out.add_(null) : a + null;
  const auto rows_t = scaled_type(routed_out, scores);
  if (!out.defined()) out = a.to(at::promote_types(a.scalar_type(), rows_t), false, /*copy=*/true);
  const auto dt = at::promote_types(out.scalar_type(), rows_t);
  out = as_type(out, dt);
  return add_scaled_rows(out, indices, routed_out, scores, null, 0);
}

// Of every `per` consecutive rows of a routing, all but the first.
torch::Tensor drop_first_rows(const torch::Tensor& t, int64_t per) {
  if (!t.defined()) return t;
  std::vector<int64_t> shape = t.sizes().vec();
  TORCH_CHECK(per >= 2 && shape[0] % per == 0, "heavy branch: ", shape[0], " query rows are not whole groups of ", per);
  shape[0] /= per;
  shape.insert(shape.begin() + 1, per);
  torch::Tensor kept = t.view(shape).narrow(1, 1, per - 1);
  shape.erase(shape.begin() + 1);
  shape[0] *= per - 1;
  return kept.reshape(shape);
}

RouterOutput drop_first_rows(const RouterOutput& r, int64_t per) {
  return {drop_first_rows(r.indices, per), drop_first_rows(r.scores, per), drop_first_rows(r.routed_tokens, per),
          drop_first_rows(r.routed_mask, per), r.x_passed};
}

// Rotary frequencies at the given positions: [b, k] -> [b, 1, k, d]; [b, r, k] -> [b, r, 1, k, d].
torch::Tensor rotary_at(const torch::Tensor& freqs, const torch::Tensor& indices) {
  auto shape = indices.sizes().vec();
  shape.push_back(freqs.size(-1));
  return freqs.index_select(0, indices.reshape({-1})).view(shape).unsqueeze(-3);
}

}  // namespace

CoordinateDescentRouterOptions router_options(int64_t dim, bool straight_through, const RouterKwargs& kwargs,
                                              int64_t num_routing_tokens) {
  return CoordinateDescentRouterOptions(dim)
      .kwargs(kwargs)
      .straight_through(straight_through)
      .num_routing_tokens(num_routing_tokens);
}

// ============================================================== heavy branch

AttentionOptions heavy_attention_options(int64_t dim, int64_t dim_head, int64_t heads, bool multiply_keys_by_score) {
  return AttentionOptions(dim)
      .dim_head(dim_head)
      .heads(heads)
      .multiply_keys_by_score(multiply_keys_by_score)
      .use_flash(true);
}

HeavyRoutedRows heavy_routed_rows(CoordinateDescentRouterImpl& q_router, CoordinateDescentRouterImpl& kv_router,
                                  AttentionImpl& heavy_attn, const HeavyBranchInputs& in) {
  RECORD_USER_SCOPE("colt5::heavy_branch");
  const bool once = in.project_context_once;
  RouterOutput q, kv;
  torch::Tensor context = in.context, context_passed;
  if (in.joint_routing && !once && in.queries.is_same(in.context) &&
      (in.query_mask.defined() ? in.query_mask.is_same(in.context_mask) : !in.context_mask.defined())) {
    std::tie(q, kv) = route_pair(q_router, kv_router, in.queries, in.num_q, in.num_kv, in.query_mask, in.random_route,
                                 /*joint_scores=*/true);
  } else {
    // Queries that view the context: both routers' scores from one read of it
    // where the routing-scores kernel takes them.
    auto joint = in.queries_view_context
                     ? route_queries_of_context(q_router, kv_router, in.queries, in.num_q, in.query_mask, in.context,
                                                in.num_kv, in.context_mask, in.context_view_lengths,
                                                in.context_view_groups, in.random_route, /*keep_one_route_dim=*/once,
                                                /*gather_tokens=*/!once)
                     : c10::nullopt;
    if (joint) {
      std::tie(q, kv) = *joint;
      if (in.query_rows_dropping_first > 0) q = drop_first_rows(q, in.query_rows_dropping_first);
      context = kv.x_passed;
    } else {
      q = q_router.forward(in.queries, in.num_q, in.query_mask, in.random_route);
      if (in.query_rows_dropping_first > 0) q = drop_first_rows(q, in.query_rows_dropping_first);
      if (in.queries_view_context && q.x_passed.defined() && q.x_passed.numel() == in.context.numel())
        context = q.x_passed.view(in.context.sizes());
      kv = route_prefix_views(kv_router, context, in.num_kv, in.context_mask, in.context_view_lengths,
                              in.context_view_groups, in.random_route, /*keep_one_route_dim=*/once,
                              /*gather_tokens=*/!once);
      if (in.queries_view_context && kv.x_passed.defined()) context = kv.x_passed;
    }
  }

  std::pair<torch::Tensor, torch::Tensor> rotary;
  if (in.q_freqs.defined()) {
    TORCH_CHECK(in.kv_freqs.defined(), "heavy branch: rotary needs both the query and the key frequencies");
    const torch::Tensor& fq = in.q_freqs;
    if (fq.dim() == 2) {
      rotary.first = q.indices.defined() ? rotary_at(fq, q.indices) : fq;
    } else {  // per-row positions [b, n, dh]
      const int64_t dh = fq.size(-1);
      rotary.first =
          (q.indices.defined() ? fq.gather(1, q.indices.unsqueeze(-1).expand({fq.size(0), q.indices.size(1), dh})) : fq)
              .unsqueeze(1);
    }
    rotary.second = kv.indices.defined() ? rotary_at(in.kv_freqs, kv.indices) : in.kv_freqs;
  }

  torch::Tensor routed_out;
  const torch::Tensor scores_q = in.multiply_queries_by_score ? q.scores : torch::Tensor();
  if (once && kv.indices.defined()) {
    // Projected keys/values of every context token, [bc * m * routes, c] rows
    // of one route's heads each; routed set rows of context row (row / views).
    const int64_t h = heavy_attn.options.heads(), dh = heavy_attn.options.dim_head();
    const int64_t bc = in.context.size(0), m = in.context.size(1);
    const int64_t rows = kv.indices.size(0), r = kv.indices.size(1), k = kv.indices.size(2);
    const int64_t views = rows / bc;
    torch::Tensor proj = project_keys_values(heavy_attn, context, in.queries_view_context ? &context_passed : nullptr)
                             .reshape({bc * m * r, h / r * 2 * dh});
    auto io = kv.indices.options();
    torch::Tensor row_start = (torch::arange(bc, io) * m).view({bc, 1}).expand({bc, views}).reshape({rows, 1, 1});
    torch::Tensor table_rows = (row_start + kv.indices) * r + torch::arange(r, io).view({1, r, 1});  // [rows, r, k]
    torch::Tensor qp = project_queries(heavy_attn, heavy_attn.norm->forward(q.routed_tokens), scores_q);
    if (!rotary.first.defined()) {
      // Prefix views of one context (the autoregressive module's windows):
      // consecutive views share most keys, summed in pairs by the backward.
      const int64_t pair_views = in.context_view_lengths.empty() || r != 1 ? 0 : views;
      routed_out = attend_gathered(heavy_attn, q.routed_tokens, qp, proj, table_rows, kv.routed_mask, kv.scores,
                                   /*index_kernel=*/true, pair_views, m);
    } else {
      torch::Tensor kvp =
          proj.index_select(0, table_rows.reshape({-1})).view({rows, r, k, h / r, 2 * dh}).permute({0, 1, 3, 2, 4});
      torch::Tensor scores_kv = as_type(kv.scores.reshape({rows, r, 1, k, 1}), kvp.scalar_type());
      routed_out = attend_projected(heavy_attn, q.routed_tokens, qp, kvp, kv.routed_mask, scores_kv, rotary);
    }
  } else {
    // Unrouted keys/values carry no scores (all ones): leave them out.
    torch::Tensor kv_scores = kv.indices.defined() ? kv.scores : torch::Tensor();
    routed_out = heavy_attn.forward(q.routed_tokens, kv.routed_tokens, kv.routed_mask, kv_scores, scores_q, rotary);
  }
  if (!q.indices.defined())
    return {routed_out, torch::Tensor(), torch::Tensor(), torch::Tensor(), context_passed};  // all routed, score 1
  return {routed_out, q.scores, q.indices, q.x_passed, context_passed};
}

torch::Tensor heavy_routed_attention(CoordinateDescentRouterImpl& q_router, CoordinateDescentRouterImpl& kv_router,
                                     AttentionImpl& heavy_attn, const torch::Tensor& null_q_token,
                                     const HeavyBranchInputs& in) {
  RECORD_USER_SCOPE("colt5::heavy_branch");
  auto [routed_out, scores, indices, x_passed, context_passed] = heavy_routed_rows(q_router, kv_router, heavy_attn, in);
  if (!indices.defined()) {  // every query took the heavy branch with score 1
    TORCH_CHECK(!in.plus_b_has_null, "heavy branch: plus_b holds the null token but every query is routed");
    if (!in.plus_a.defined()) return routed_out;
    return in.plus_b.defined() ? torch::add(in.plus_a, in.plus_b).add_(routed_out) : in.plus_a + routed_out;
  }
  if (in.plus_a.defined()) {
    const torch::Tensor& a = x_passed.defined() && in.plus_a.is_same(in.queries) ? x_passed : in.plus_a;
    return add_heavy_output(null_q_token, a, in.plus_b, in.plus_b_has_null, routed_out, scores, indices);
  }
  return scatter_queries(q_router, null_q_token, in.queries, routed_out * scores.unsqueeze(-1), indices);
}

// ================================================================ feedforward

ConditionalRoutedFeedForwardImpl::ConditionalRoutedFeedForwardImpl(const ConditionalRoutedFeedForwardOptions& o)
    : options(o) {
  reset();
}

void ConditionalRoutedFeedForwardImpl::reset() {
  const auto& o = options;
  const RouterKwargs kwargs = module_router_kwargs(o.router_kwargs(), o.use_triton());
  const char* m = "ConditionalRoutedFeedForward";
  TORCH_CHECK(o.dim() > 0, m, ": dim must be positive, got ", o.dim());
  TORCH_CHECK(o.num_heavy_tokens() >= 1, m, ": num_heavy_tokens must be at least 1, got ", o.num_heavy_tokens());
  TORCH_CHECK(static_cast<int64_t>(o.dim() * o.light_ff_mult()) >= 1, m, ": light_ff_mult ", o.light_ff_mult(),
              " gives an empty hidden layer");
  TORCH_CHECK(static_cast<int64_t>(o.dim() * o.heavy_ff_mult()) >= 1, m, ": heavy_ff_mult ", o.heavy_ff_mult(),
              " gives an empty hidden layer");
  router =
      register_module("router", CoordinateDescentRouter(router_options(o.dim(), o.router_straight_through(), kwargs)));
  light_ff = register_module("light_ff", FeedForward(FeedForwardOptions(o.dim()).mult(o.light_ff_mult())));
  heavy_ff = register_module("heavy_ff", FeedForward(FeedForwardOptions(o.dim()).mult(o.heavy_ff_mult())));
}

torch::Tensor ConditionalRoutedFeedForwardImpl::forward(const torch::Tensor& x, const torch::Tensor& mask,
                                                        c10::optional<int64_t> num_heavy_tokens) {
  return forward_plus(x, mask, num_heavy_tokens, /*residual=*/false);
}

torch::Tensor ConditionalRoutedFeedForwardImpl::residual_forward(const torch::Tensor& x, const torch::Tensor& mask,
                                                                 c10::optional<int64_t> num_heavy_tokens) {
  return forward_plus(x, mask, num_heavy_tokens, /*residual=*/true);
}

torch::Tensor ConditionalRoutedFeedForwardImpl::forward_plus(const torch::Tensor& x, const torch::Tensor& mask,
                                                             c10::optional<int64_t> num_heavy_tokens, bool residual) {
  const char* m = "ConditionalRoutedFeedForward";
  check_tokens(m, "x", x, options.dim());
  check_mask(m, "mask", mask, x, "x");
  check_matches_module(m, x, light_ff->proj_in->weight);
  const int64_t k = token_count(m, "num_heavy_tokens", num_heavy_tokens, options.num_heavy_tokens());

  // x passed on by the light feedforward's norm to the router, and by the
  // router's scores to the residual sum: x's three uses give it one gradient,
  // each backward kernel adding the one after it in its own pass.
  auto [light_out, x_norm_passed] = light_ff->forward_passing(x);
  RouterOutput r = router(x_norm_passed, k, mask);
  const torch::Tensor xr = r.x_passed.defined() ? r.x_passed : x_norm_passed;
  torch::Tensor heavy_out = heavy_ff(r.routed_tokens);
  if (!r.indices.defined()) {
    torch::Tensor routed_out = heavy_out * r.scores.unsqueeze(-1);
    return residual ? torch::add(xr, light_out).add_(routed_out) : light_out + routed_out;
  }
  // light_out (plus x) and the heavy outputs times their scores added at the
  // routed positions (indices of a row are distinct): one pass over the
  // tokens for the sum, the routed rows added into it in place.
  const auto dt =
      at::promote_types(residual ? x.scalar_type() : light_out.scalar_type(), scaled_type(heavy_out, r.scores));
  torch::Tensor out = residual ? as_type(residual_add(xr, light_out), dt) : light_out.to(dt, false, /*copy=*/true);
  return add_scaled_rows(out, r.indices, heavy_out, r.scores, torch::Tensor(), 0);
}

// ================================================================== attention

ConditionalRoutedAttentionImpl::ConditionalRoutedAttentionImpl(const ConditionalRoutedAttentionOptions& o)
    : options(o) {
  reset();
}

void ConditionalRoutedAttentionImpl::reset() {
  const auto& o = options;
  const char* m = "ConditionalRoutedAttention";
  check_routed_attention_options(m, o, o.rotary_emb());
  if (o.has_light_attn()) {
    TORCH_CHECK(o.light_window_size() >= 2, m, ": light_window_size must be at least 2, got ", o.light_window_size());
    light_attn = register_module("light_attn", LocalMHA(LocalMHAOptions(o.dim(), o.light_window_size() / 2)
                                                            .dim_head(o.light_dim_head())
                                                            .heads(o.light_heads())
                                                            .prenorm(true)
                                                            .causal(false)
                                                            .use_rotary_pos_emb(false)
                                                            .look_backward(1)
                                                            .look_forward(1)
                                                            .exact_windowsize(true)));
  }
  register_heavy_branch(*this, o);
  if (o.rotary_emb()) rotary_emb = register_module("rotary_emb", RotaryEmbedding(o.heavy_dim_head()));
}

torch::Tensor ConditionalRoutedAttentionImpl::forward(const torch::Tensor& x, const torch::Tensor& mask,
                                                      c10::optional<int64_t> num_heavy_tokens_q,
                                                      c10::optional<int64_t> num_heavy_tokens_kv) {
  return forward_plus(x, mask, num_heavy_tokens_q, num_heavy_tokens_kv, /*residual=*/false);
}

torch::Tensor ConditionalRoutedAttentionImpl::residual_forward(const torch::Tensor& x, const torch::Tensor& mask,
                                                               c10::optional<int64_t> num_heavy_tokens_q,
                                                               c10::optional<int64_t> num_heavy_tokens_kv) {
  return forward_plus(x, mask, num_heavy_tokens_q, num_heavy_tokens_kv, /*residual=*/true);
}

torch::Tensor ConditionalRoutedAttentionImpl::forward_plus(const torch::Tensor& x, const torch::Tensor& mask,
                                                           c10::optional<int64_t> num_heavy_tokens_q,
                                                           c10::optional<int64_t> num_heavy_tokens_kv, bool residual) {
  const char* m = "ConditionalRoutedAttention";
  check_tokens(m, "x", x, options.dim());
  check_mask(m, "mask", mask, x, "x");
  check_matches_module(m, x, heavy_attn->to_q->weight);
  const int64_t kq = token_count(m, "num_heavy_tokens_q", num_heavy_tokens_q, options.num_heavy_tokens_q());
  const int64_t kkv = token_count(m, "num_heavy_tokens_kv", num_heavy_tokens_kv, options.num_heavy_tokens_kv());

  HeavyBranchInputs in;
  torch::Tensor light_out;
  // x passed on by the light attention's norm to the routers, and by the
  // query router's scores to the residual sum (heavy_routed_attention): x's
  // uses give it one gradient, each backward kernel adding the one after it.
  torch::Tensor xp = x;
  if (light_attn) {
    // In the residual sum, the null token every unrouted position gets rides
    // on the light branch's output projection as its bias, where some query
    // will be left unrouted (the routed ones subtract it again).
    in.plus_b_has_null = residual && null_q_token.defined() && kq < x.size(1);
    light_out = light_attn->forward_with_output_bias(x, mask, in.plus_b_has_null ? null_q_token : torch::Tensor(), &xp);
  }

  in.queries = in.context = xp;
  in.query_mask = in.context_mask = mask;
  in.num_q = kq;
  in.num_kv = kkv;
  in.multiply_queries_by_score = options.multiply_queries_by_score();
  in.joint_routing = options.joint_routing();
  if (rotary_emb) in.q_freqs = in.kv_freqs = rotary_emb(x.size(1));
  // The light output (and x) and the heavy output summed in one pass.
  if (residual) {
    in.plus_a = xp;
    in.plus_b = light_out;
  } else {
    in.plus_a = light_out;
  }
  return heavy_routed_attention(*q_router, *kv_router, *heavy_attn, null_q_token, in);
}

// ====================================================================== block

ConditionalRoutedTransformerBlockImpl::ConditionalRoutedTransformerBlockImpl(
    const ConditionalRoutedTransformerBlockOptions& o)
    : options(o) {
  reset();
}

void ConditionalRoutedTransformerBlockImpl::reset() {
  conditional_ff = register_module("conditional_ff", ConditionalRoutedFeedForward(options.feedforward()));
  conditional_attn = register_module("conditional_attn", ConditionalRoutedAttention(options.attention()));
}

torch::Tensor ConditionalRoutedTransformerBlockImpl::forward(const torch::Tensor& x, const torch::Tensor& mask,
                                                             c10::optional<int64_t> num_heavy_attn_tokens_q,
                                                             c10::optional<int64_t> num_heavy_attn_tokens_kv,
                                                             c10::optional<int64_t> num_heavy_ff_tokens) {
  torch::Tensor h = conditional_attn->residual_forward(x, mask, num_heavy_attn_tokens_q, num_heavy_attn_tokens_kv);
  return conditional_ff->residual_forward(h, mask, num_heavy_ff_tokens);
}

// =================================================== autoregressive attention

ConditionalRoutedAutoregressiveAttentionImpl::ConditionalRoutedAutoregressiveAttentionImpl(
    const ConditionalRoutedAutoregressiveAttentionOptions& o)
    : options(o) {
  reset();
}

void ConditionalRoutedAutoregressiveAttentionImpl::reset() {
  const auto& o = options;
  const char* m = "ConditionalRoutedAutoregressiveAttention";
  check_routed_attention_options(m, o, o.rotary_emb());
  TORCH_CHECK(o.light_window_size() >= 1, m, ": light_window_size must be positive, got ", o.light_window_size());
  TORCH_CHECK(!o.heavy_window_size() || *o.heavy_window_size() >= 1, m, ": heavy_window_size must be positive, got ",
              o.heavy_window_size() ? *o.heavy_window_size() : 0);
  light_attn = register_module("light_attn", LocalMHA(LocalMHAOptions(o.dim(), o.light_window_size())
                                                          .dim_head(o.light_dim_head())
                                                          .heads(o.light_heads())
                                                          .prenorm(true)
                                                          .causal(true)
                                                          .exact_windowsize(false)
                                                          .use_rotary_pos_emb(false)));
  register_heavy_branch(*this, o);
  if (o.rotary_emb()) rotary_emb = register_module("rotary_emb", RotaryEmbedding(o.heavy_dim_head()));
}

torch::Tensor ConditionalRoutedAutoregressiveAttentionImpl::forward(const torch::Tensor& x,
                                                                    c10::optional<int64_t> num_heavy_tokens_q,
                                                                    c10::optional<int64_t> num_heavy_tokens_kv,
                                                                    bool random_route) {
  return forward_impl(x, num_heavy_tokens_q, num_heavy_tokens_kv, random_route, /*residual=*/false);
}

torch::Tensor ConditionalRoutedAutoregressiveAttentionImpl::residual_forward(const torch::Tensor& x,
                                                                             c10::optional<int64_t> num_heavy_tokens_q,
                                                                             c10::optional<int64_t> num_heavy_tokens_kv,
                                                                             bool random_route) {
  return forward_impl(x, num_heavy_tokens_q, num_heavy_tokens_kv, random_route, /*residual=*/true);
}

torch::Tensor ConditionalRoutedAutoregressiveAttentionImpl::forward_impl(const torch::Tensor& x,
                                                                         c10::optional<int64_t> num_heavy_tokens_q,
                                                                         c10::optional<int64_t> num_heavy_tokens_kv,
                                                                         bool random_route, bool residual) {
  const char* m = "ConditionalRoutedAutoregressiveAttention";
  check_tokens(m, "x", x, options.dim());
  check_matches_module(m, x, heavy_attn->to_q->weight);
  const int64_t kq = token_count(m, "num_heavy_tokens_q", num_heavy_tokens_q, options.num_heavy_tokens_q());
  const int64_t kkv = token_count(m, "num_heavy_tokens_kv", num_heavy_tokens_kv, options.num_heavy_tokens_kv());
  TORCH_CHECK(kv_route_groups >= 0, m, ": kv_route_groups must be 0 (by length) or positive, got ", kv_route_groups);

  // x passed on by the light attention's norm to the query router, by its
  // scores to the key/value router, and by that one's to the keys/values'
  // projection (HeavyBranchInputs::queries_view_context): x's uses give it
  // one gradient, each backward kernel adding the next one's.
  const int64_t b = x.size(0), seq = x.size(1), d = x.size(2);
  const int64_t w = options.heavy_window_size().value_or(options.light_window_size());
  const int64_t windows = (seq + w - 1) / w;
  // From window 1 on, every position takes the null query token (the routed
  // ones then add their heavy output minus it): it is the light attention's
  // output bias, added in that product, and window 0 gives it back below.
  // Where every query is routed the null token takes no part at all (its
  // gradient is exactly zero, as the reference's).
  const bool null_in_light = null_q_token.defined() && windows > 1 && kq < w;
  torch::Tensor x1;
  torch::Tensor light_out =
      light_attn->forward_with_output_bias(x, torch::Tensor(), null_in_light ? null_q_token : torch::Tensor(), &x1);
  // Window 0 has no earlier window to attend to: it gets the light branch only.
  if (windows <= 1) return residual ? residual_add(x1, light_out) : light_out;
  const int64_t padded = windows * w;
  const int64_t rows = b * (windows - 1);

  torch::Tensor xp = padded == seq ? x1 : torch::constant_pad_nd(x1, {0, 0, 0, padded - seq}, 0.0);
  auto bool_opts = torch::TensorOptions().dtype(torch::kBool).device(x.device());
  const auto long_opts = torch::TensorOptions().dtype(torch::kLong).device(x.device());

  // Queries: every window of each row, one batch row per window (a view of
  // the sequence); window 0's routing is dropped (query_rows_dropping_first).
  torch::Tensor q = xp.view({b * windows, w, d});
  torch::Tensor q_mask;
  if (padded != seq)
    q_mask = (torch::arange(padded, long_opts) < seq)
                 .view({1, windows, w})
                 .expand({b, windows, w})
                 .reshape({b * windows, w});

  // Keys/values: for each window, the whole padded sequence masked to the
  // windows before it — one view of each row per window, routed without
  // copying the sequence per window.
  torch::Tensor kv_mask = torch::ones({windows, windows}, bool_opts)
                              .tril(-1)
                              .narrow(0, 1, windows - 1)
                              .repeat_interleave(w, 1)
                              .unsqueeze(0)
                              .expand({b, windows - 1, padded});

  HeavyBranchInputs in;
  in.queries = q;
  in.query_mask = q_mask;
  in.query_rows_dropping_first = windows;
  in.context = xp;
  in.queries_view_context = true;
  in.context_mask = kv_mask;
  in.num_q = kq;
  in.num_kv = kkv;
  in.random_route = random_route;
  in.multiply_queries_by_score = options.multiply_queries_by_score();
  in.project_context_once = true;
  // Window j's keys/values are the j * w positions before it: route the
  // windows in groups over the prefixes they need (kv_route_groups).
  for (int64_t v = 1; v < windows; ++v) in.context_view_lengths.push_back(v * w);
  // Measured (bench_autoregressive_cpu, bench_modules_cuda): on the CPU 2
  // groups pay at 8192; on an H200 1 group is best at 8192 and 4 at 32768.
  const int64_t per_group = x.is_cuda() ? 8192 : 4096;
  in.context_view_groups = kv_route_groups ? kv_route_groups : std::clamp<int64_t>(padded / per_group, 1, 8);
  if (rotary_emb) {
    torch::Tensor freqs = rotary_emb(padded);
    const int64_t dh = freqs.size(-1);
    in.kv_freqs = freqs;
    in.q_freqs = freqs.view({windows, w, dh})
                     .narrow(0, 1, windows - 1)
                     .unsqueeze(0)
                     .expand({b, windows - 1, w, dh})
                     .reshape({rows, w, dh});
  }
  HeavyRoutedRows heavy = heavy_routed_rows(*q_router, *kv_router, *heavy_attn, in);
  torch::Tensor routed_out = heavy.out, indices = heavy.indices, scores = heavy.scores;

  // The output: the light branch everywhere, plus from window 1 on the null
  // query token, whose routed positions then add (heavy output - null). One
  // pass over the tokens (and the routed rows added in place) rather than the
  // heavy output written out per window, shifted by a window and added.
  const int64_t kq_routed = routed_out.size(1);
  if (!indices.defined())  // every query routed: all positions of windows 1..
    indices = torch::arange(kq_routed, long_opts).view({1, kq_routed}).expand({rows, kq_routed});
  torch::Tensor window_start = torch::arange(1, windows, long_opts).mul_(w).view({1, windows - 1, 1});
  torch::Tensor positions = (indices.view({b, windows - 1, kq_routed}) + window_start).view({b, -1});
  torch::Tensor base = padded == seq ? light_out : torch::constant_pad_nd(light_out, {0, 0, 0, padded - seq}, 0.0);
  torch::Tensor out;
  // The residual: x as the keys/values' norm passes it on (the last of its
  // uses), padded as the context is. Fresh tensors: the routed rows go in in
  // place.
  const torch::Tensor xr = heavy.context_passed.defined() ? heavy.context_passed : xp;
  if (residual) {
    out = residual_add(xr, base);
  } else {
    // The type the heavy output would have had written out at every position
    // (x's, or wider; the null token's too).
    auto dt =
        at::promote_types(at::promote_types(base.scalar_type(), scaled_type(routed_out, scores)), x.scalar_type());
    if (null_q_token.defined()) dt = at::promote_types(dt, null_q_token.scalar_type());
    out = base.to(dt, false, /*copy=*/true);
  }
  // The routed rows add (heavy output * score - null); window 0's rows give
  // the null token back. One scatter into the fresh sum (no in-place view).
  out = add_scaled_rows(out, positions, routed_out.reshape({b, -1, d}),
                        scores.defined() ? scores.reshape({b, -1}) : torch::Tensor(),
                        null_in_light ? null_q_token : torch::Tensor(), null_in_light ? w : 0);
  return padded == seq ? out : out.narrow(1, 0, seq).contiguous();
}

// ============================================================ cross attention

ConditionalRoutedCrossAttentionImpl::ConditionalRoutedCrossAttentionImpl(
    const ConditionalRoutedCrossAttentionOptions& o)
    : options(o) {
  reset();
}

void ConditionalRoutedCrossAttentionImpl::reset() {
  const auto& o = options;
  const RouterKwargs kwargs = module_router_kwargs(o.router_kwargs(), o.use_triton());
  const char* m = "ConditionalRoutedCrossAttention";
  TORCH_CHECK(o.dim() > 0, m, ": dim must be positive, got ", o.dim());
  TORCH_CHECK(o.num_tokens_q() >= 1, m, ": num_tokens_q must be at least 1, got ", o.num_tokens_q());
  TORCH_CHECK(o.num_tokens_kv() >= 1, m, ": num_tokens_kv must be at least 1, got ", o.num_tokens_kv());
  TORCH_CHECK(o.kv_routing_tokens() >= 1, m, ": kv_routing_tokens must be at least 1, got ", o.kv_routing_tokens());
  TORCH_CHECK(o.heads() >= 1 && o.heads() % o.kv_routing_tokens() == 0, m, ": heads (", o.heads(),
              ") must be divisible by kv_routing_tokens (", o.kv_routing_tokens(), ")");
  TORCH_CHECK(!o.router_kwargs().route_block_size(), m,
              ": route_block_size is a module option; do not also set it in router_kwargs");
  if (o.use_null_q_tokens()) null_q_token = register_parameter("null_q_token", torch::randn({o.dim()}));
  q_router = register_module("q_router",
                             CoordinateDescentRouter(router_options(o.dim(), o.router_straight_through(), kwargs)));
  auto kv_opts = router_options(o.dim(), o.router_straight_through(), kwargs, o.kv_routing_tokens());
  kv_opts.route_block_size(o.route_block_size());
  kv_router = register_module("kv_router", CoordinateDescentRouter(kv_opts));
  heavy_attn = register_module(
      "heavy_attn", Attention(heavy_attention_options(o.dim(), o.dim_head(), o.heads(), o.multiply_keys_by_score())));
}

torch::Tensor ConditionalRoutedCrossAttentionImpl::forward(const torch::Tensor& x, const torch::Tensor& context,
                                                           const torch::Tensor& mask, const torch::Tensor& context_mask,
                                                           c10::optional<int64_t> num_tokens_q,
                                                           c10::optional<int64_t> num_tokens_kv) {
  const char* m = "ConditionalRoutedCrossAttention";
  check_tokens(m, "x", x, options.dim());
  check_tokens(m, "context", context, options.dim());
  TORCH_CHECK(context.size(0) == x.size(0), m, ": context has batch ", context.size(0), " but x has batch ", x.size(0));
  TORCH_CHECK(context.scalar_type() == x.scalar_type(), m, ": x is ", x.scalar_type(), " but context is ",
              context.scalar_type());
  TORCH_CHECK(context.device() == x.device(), m, ": x is on ", x.device(), " but context is on ", context.device());
  check_mask(m, "mask", mask, x, "x");
  check_mask(m, "context_mask", context_mask, context, "context");
  check_matches_module(m, x, heavy_attn->to_q->weight);
  const int64_t kq = token_count(m, "num_tokens_q", num_tokens_q, options.num_tokens_q());
  const int64_t kkv = token_count(m, "num_tokens_kv", num_tokens_kv, options.num_tokens_kv());

  HeavyBranchInputs in;
  in.queries = x;
  in.query_mask = mask;
  in.context = context;
  in.context_mask = context_mask;
  in.num_q = kq;
  in.num_kv = kkv;
  return heavy_routed_attention(*q_router, *kv_router, *heavy_attn, null_q_token, in);
}

// ================================================================== options

ConditionalRoutedAttentionOptions ConditionalRoutedTransformerBlockOptions::attention() const {
  ConditionalRoutedAttentionOptions to(dim(), num_heavy_attn_tokens_q(), num_heavy_attn_tokens_kv());
  const auto& from = *this;
  COLT5_ROUTED_ATTN_OPTIONS(COLT5_COPY_OPTION)
  COLT5_ROUTING_MODULE_OPTIONS(COLT5_COPY_OPTION)
  return to;
}

ConditionalRoutedFeedForwardOptions ConditionalRoutedTransformerBlockOptions::feedforward() const {
  ConditionalRoutedFeedForwardOptions to(dim(), num_heavy_ff_tokens());
  const auto& from = *this;
  COLT5_ROUTED_FF_OPTIONS(COLT5_COPY_OPTION)
  COLT5_ROUTING_MODULE_OPTIONS(COLT5_COPY_OPTION)
  return to;
}

// ============================================================= pretty_print

namespace {

std::string required_args(std::initializer_list<std::pair<const char*, int64_t>> args) {
  std::string s;
  for (const auto& [name, value] : args) s += std::string(s.empty() ? "" : ", ") + name + "=" + std::to_string(value);
  return s;
}

}  // namespace

void ConditionalRoutedFeedForwardImpl::pretty_print(std::ostream& stream) const {
  const auto& o = options;
  print_module(stream, "ConditionalRoutedFeedForward",
               required_args({{"dim", o.dim()}, {"num_heavy_tokens", o.num_heavy_tokens()}}), o,
               ConditionalRoutedFeedForwardOptions(o.dim(), o.num_heavy_tokens()));
}

void ConditionalRoutedAttentionImpl::pretty_print(std::ostream& stream) const {
  const auto& o = options;
  print_module(stream, "ConditionalRoutedAttention",
               required_args({{"dim", o.dim()},
                              {"num_heavy_tokens_q", o.num_heavy_tokens_q()},
                              {"num_heavy_tokens_kv", o.num_heavy_tokens_kv()}}),
               o, ConditionalRoutedAttentionOptions(o.dim(), o.num_heavy_tokens_q(), o.num_heavy_tokens_kv()));
}

void ConditionalRoutedTransformerBlockImpl::pretty_print(std::ostream& stream) const {
  const auto& o = options;
  print_module(stream, "ConditionalRoutedTransformerBlock",
               required_args({{"dim", o.dim()},
                              {"num_heavy_attn_tokens_q", o.num_heavy_attn_tokens_q()},
                              {"num_heavy_attn_tokens_kv", o.num_heavy_attn_tokens_kv()},
                              {"num_heavy_ff_tokens", o.num_heavy_ff_tokens()}}),
               o,
               ConditionalRoutedTransformerBlockOptions(o.dim(), o.num_heavy_attn_tokens_q(),
                                                        o.num_heavy_attn_tokens_kv(), o.num_heavy_ff_tokens()));
}

void ConditionalRoutedAutoregressiveAttentionImpl::pretty_print(std::ostream& stream) const {
  const auto& o = options;
  print_module(
      stream, "ConditionalRoutedAutoregressiveAttention",
      required_args({{"dim", o.dim()},
                     {"num_heavy_tokens_q", o.num_heavy_tokens_q()},
                     {"num_heavy_tokens_kv", o.num_heavy_tokens_kv()}}),
      o, ConditionalRoutedAutoregressiveAttentionOptions(o.dim(), o.num_heavy_tokens_q(), o.num_heavy_tokens_kv()));
}

void ConditionalRoutedCrossAttentionImpl::pretty_print(std::ostream& stream) const {
  const auto& o = options;
  print_module(
      stream, "ConditionalRoutedCrossAttention",
      required_args({{"dim", o.dim()}, {"num_tokens_q", o.num_tokens_q()}, {"num_tokens_kv", o.num_tokens_kv()}}), o,
      ConditionalRoutedCrossAttentionOptions(o.dim(), o.num_tokens_q(), o.num_tokens_kv()));
}

}  // namespace nn
}  // namespace colt5
