#include "colt5/nn/layers.h"

#include <ATen/record_function.h>
#include <torch/autograd.h>

#include <cmath>
#include <cstdlib>
#include <tuple>
#include <utility>
#include <vector>

#include "colt5/compat.h"
#include "nn/linear.h"
#include "ops/as_type.h"

#ifdef COLT5_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/csrc/autograd/graph_task.h>

#include "nn/norm_route_grad.h"
#include "ops/row_dtype.h"
#endif

namespace colt5 {
namespace nn {

// ---------------------------------------------------------------- linear

#ifdef COLT5_WITH_CUDA
namespace {

// a + b for a float32 residual stream a and a 16-bit branch output b of the
// same shape on CUDA in one vectorized pass (LibTorch's addition of mixed
// types runs element by element); the gradients as autograd's: a's passes
// through, b's is it cast to b's type.
class AddFloatHalfFunction : public torch::autograd::Function<AddFloatHalfFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& a_in,
                               const torch::Tensor& b_in) {
    c10::cuda::CUDAGuard guard(a_in.device());
    torch::Tensor a = a_in.contiguous(), b = b_in.contiguous();
    torch::Tensor out = torch::empty_like(a, at::MemoryFormat::Contiguous);
    kernels::add_float_half_cuda(a.data_ptr<float>(), b.data_ptr(), row_dtype(b.scalar_type()), out.data_ptr<float>(),
                                 a.numel(), c10::cuda::getCurrentCUDAStream().stream());
    ctx->saved_data["b_dtype"] = b.scalar_type();
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto dt = ctx->saved_data["b_dtype"].toScalarType();
    return {grads[0], grads[0].to(dt)};
  }
};

}  // namespace
#endif

namespace {

// y as it is (marked modified in place, so y keeps its storage and takes this
// node as its history); the bias's gradient from y's gradient: for 16-bit
// types ones(1, rows) @ gy (float32 accumulation in cuBLAS, as the sum has),
// for others the sum over rows.
class BiasGradFunction : public torch::autograd::Function<BiasGradFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, torch::Tensor y, const torch::Tensor& bias) {
    ctx->saved_data["bias_dtype"] = static_cast<int64_t>(bias.scalar_type());
    ctx->mark_dirty({y});
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const torch::Tensor& g = grads[0];
    const auto bias_dtype = static_cast<at::ScalarType>(ctx->saved_data["bias_dtype"].toInt());
    torch::Tensor gb;
    if (ctx->needs_input_grad(1)) {
      const torch::Tensor g2 = g.reshape({-1, g.size(-1)});
      if (g2.scalar_type() == at::kBFloat16 || g2.scalar_type() == at::kHalf)
        gb = torch::ones({1, g2.size(0)}, g2.options()).mm(g2).view({-1});
      else
        gb = g2.sum(0);
      gb = as_type(gb, bias_dtype);
    }
    return {g, gb};
  }
};

}  // namespace

torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias) {
  if (!bias.defined() || !x.is_cuda() || !bias.requires_grad() || !torch::GradMode::is_enabled() || x.dim() < 1)
    return torch::linear(x, weight, bias);
  // Rows as a matrix: torch::linear of a matrix is one addmm whose result is
  // not a view, which BiasGradFunction may then mark as modified.
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = weight.size(0);
  torch::Tensor y = torch::linear(x.reshape({-1, x.size(-1)}), weight, bias.detach());
  return BiasGradFunction::apply(y, bias).view(shape);
}

// ---------------------------------------------------------------- RMSNorm

namespace {

// y = x * f * gamma, f = scale / max(||x||, eps) per row (F.normalize times
// sqrt(dim) times gamma), with its backward written out: half the kernels and
// one autograd node instead of six. With xhat = x * f (saved) and dxhat =
// dy * gamma, for rows with ||x|| > eps
//   dx = f * (dxhat - xhat * <dxhat, xhat> / scale^2),
// and dx = f * dxhat for the others (f is constant there), as autograd gives
// for the composite. Not differentiable twice. On CUDA (float32, float16,
// bfloat16; rows up to 2048 wide) one kernel each way
// (kernels/rms_norm_cuda.cu), keeping x and the row norms for the backward.
// out_dtype (undefined: the promoted type of x and gamma) is an autocast
// region's 16-bit dtype where the output goes straight into a matrix product
// that would cast it: the kernel rounds its float32 result once, as the cast
// would, and takes the 16-bit gradient as it comes.
#ifdef COLT5_WITH_CUDA
// The norm kernels' shape and dtypes for x [..., d], gamma [d] and y_dtype, or
// false where the kernels do not apply.
bool norm_kernel_params(const torch::Tensor& x, const torch::Tensor& gamma, at::ScalarType y_dtype,
                        kernels::RmsNormParams& p) {
  if (!x.is_cuda() || gamma.device() != x.device() || gamma.dim() != 1) return false;
  if (!row_dtype(x.scalar_type(), p.x_dtype) || !row_dtype(gamma.scalar_type(), p.gamma_dtype) ||
      !row_dtype(y_dtype, p.y_dtype))
    return false;
  p.d = gamma.size(0);
  if (!kernels::rms_norm_supports(p.d, p.x_dtype, p.gamma_dtype, p.y_dtype)) return false;
  p.rows = x.numel() / p.d;
  return true;
}

// The gradient of x where a norm passed x on as its second output (a
// residual's use of x), in x's dtype and contiguous for the backward kernel to
// add into its own; undefined where x was not passed on or got no gradient.
torch::Tensor passed_grad(const torch::autograd::variable_list& grads, const torch::Tensor& x) {
  if (grads.size() < 2 || !grads[1].defined()) return torch::Tensor();
  return as_type(grads[1], x.scalar_type()).contiguous();
}
#endif

#ifdef COLT5_WITH_CUDA
// A fused norm that passes x on keeps a hand-over for the routing scores
// taken from it (NormRouteGrad), with x's address to match them by.
void offer_route_grad(torch::autograd::AutogradContext* ctx, const torch::Tensor& xc, bool pass_x) {
  if (!pass_x) return;
  ctx->saved_data["route_grad"] = c10::IValue::make_capsule(c10::make_intrusive<NormRouteGrad>());
  ctx->saved_data["x_ptr"] = static_cast<int64_t>(reinterpret_cast<intptr_t>(xc.data_ptr()));
  ctx->saved_data["x_numel"] = xc.numel();
}

// The routing scores' terms left for this backward pass, if any: into p's
// route_* (the tensors held in `held` until the kernel is launched) and their
// alias's gradient into `add`. The hand-over is emptied either way.
void take_route_grad(torch::autograd::AutogradContext* ctx, bool needs_x, const torch::Tensor& x,
                     torch::Tensor& add, kernels::RmsNormParams& p, NormRouteGradPtr& held) {
  auto it = ctx->saved_data.find("route_grad");
  if (it == ctx->saved_data.end()) return;
  auto h = c10::static_intrusive_pointer_cast<NormRouteGrad>(it->second.toCapsule());
  if (!h->pending) return;
  if (!needs_x || h->task != current_backward_pass()) {
    h->clear();
    return;
  }
  held = c10::make_intrusive<NormRouteGrad>(*h);
  h->clear();
  if (held->passed.defined()) add = add.defined() ? add + held->passed : held->passed;
  p.route_r = static_cast<int>(held->r);
  if (held->r > 0) {
    p.route_tokens = held->tokens.data_ptr<float>();
    p.route_grad_dots = held->grad_dots.data_ptr<float>();
  }
  if (held->grad_norms.defined()) {
    p.route_grad_norms = held->grad_norms.data_ptr<float>();
    p.route_norms = held->norms.data_ptr<float>();
  }
  for (int i = 0; i < 2; ++i) {
    if (!held->slot[i].defined()) continue;
    TORCH_INTERNAL_ASSERT(held->slot_rows[i].scalar_type() == x.scalar_type() && held->slot_rows[i].size(1) == p.d);
    p.route_slot[i] = held->slot[i].data_ptr<int32_t>();
    p.route_slot_rows[i] = held->slot_rows[i].data_ptr();
  }
}
#endif

// A norm function's outputs: y, and x passed on through the node with pass_x.
torch::autograd::variable_list norm_outputs(const torch::Tensor& y, const torch::Tensor& x, bool pass_x) {
  return pass_x ? torch::autograd::variable_list{y, x} : torch::autograd::variable_list{y};
}

class RMSNormFunction : public torch::autograd::Function<RMSNormFunction> {
 public:
  static constexpr double kEps = 1e-12;

#ifdef COLT5_WITH_CUDA
  // The kernel's parameters for x and gamma, or false where the kernel does
  // not apply (the composite runs).
  static bool fused(const torch::Tensor& x, const torch::Tensor& gamma, at::ScalarType y_dtype, double scale,
                    kernels::RmsNormParams& p) {
    if (!norm_kernel_params(x, gamma, y_dtype, p)) return false;
    p.scale = static_cast<float>(scale);
    p.eps = static_cast<float>(kEps);
    return true;
  }
#endif

  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                                                const torch::Tensor& gamma, double scale, bool cuda_kernel,
                                                int64_t out_dtype, bool pass_x) {
    // An unused output (x passed on) gets no gradient rather than zeros.
    ctx->set_materialize_grads(false);
    const at::ScalarType promoted = at::promote_types(x.scalar_type(), gamma.scalar_type());
    const at::ScalarType y_dtype = out_dtype < 0 ? promoted : static_cast<at::ScalarType>(out_dtype);
#ifdef COLT5_WITH_CUDA
    kernels::RmsNormParams p;
    if (cuda_kernel && fused(x, gamma, y_dtype, scale, p)) {
      c10::cuda::CUDAGuard guard(x.device());
      torch::Tensor xc = x.contiguous(), g = gamma.contiguous();
      torch::Tensor y = torch::empty(x.sizes(), x.options().dtype(y_dtype));
      torch::Tensor norms = torch::empty({p.rows}, x.options().dtype(at::kFloat));
      p.x = xc.data_ptr();
      p.gamma = g.data_ptr();
      p.y = y.data_ptr();
      p.norms = norms.data_ptr<float>();
      kernels::rms_norm_forward_cuda(p, at::cuda::getCurrentCUDAStream().stream());
      ctx->save_for_backward({xc, g, norms});
      ctx->saved_data["scale"] = scale;
      ctx->saved_data["fused"] = static_cast<int64_t>(y_dtype);
      offer_route_grad(ctx, xc, pass_x);
      return norm_outputs(y, x, pass_x);
    }
#else
    (void)cuda_kernel;
#endif
    // The same arithmetic as the composite (and under autocast the same
    // dtypes: the norm in float32, the products promoted).
    torch::Tensor n = x.norm(2, {-1}, /*keepdim=*/true);
    torch::Tensor f = n.clamp_min(kEps).reciprocal() * scale;
    torch::Tensor xhat = x * f;
    ctx->save_for_backward({xhat, gamma, f, n});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["x_dtype"] = static_cast<int64_t>(x.scalar_type());
    ctx->saved_data["y_dtype"] = static_cast<int64_t>(y_dtype);
    return norm_outputs(as_type(xhat * gamma, y_dtype), x, pass_x);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    TORCH_CHECK(!torch::GradMode::is_enabled(),
                "RMSNorm: its backward is not differentiable (call backward without create_graph)");
    const auto saved = ctx->get_saved_variables();
    const double scale = ctx->saved_data["scale"].toDouble();
#ifdef COLT5_WITH_CUDA
    if (ctx->saved_data.count("fused")) {
      const torch::Tensor &x = saved[0], &gamma = saved[1], &norms = saved[2];
      const auto y_dtype = static_cast<at::ScalarType>(ctx->saved_data["fused"].toInt());
      kernels::RmsNormParams p;
      TORCH_INTERNAL_ASSERT(fused(x, gamma, y_dtype, scale, p));
      c10::cuda::CUDAGuard guard(x.device());
      torch::Tensor gy = grads[0].defined() ? as_type(grads[0], y_dtype).contiguous()
                                            : torch::zeros(x.sizes(), x.options().dtype(y_dtype));
      torch::Tensor dx = torch::empty(x.sizes(), x.options());
      torch::Tensor add = passed_grad(grads, x);
      NormRouteGradPtr route;
      take_route_grad(ctx, ctx->needs_input_grad(0), x, add, p, route);
      p.grad_x_add = add.defined() ? add.data_ptr() : nullptr;
      torch::Tensor partial;
      if (ctx->needs_input_grad(1))
        partial = torch::empty({kernels::rms_norm_partials(p.rows), p.d}, x.options().dtype(at::kFloat));
      p.x = x.data_ptr();
      p.gamma = gamma.data_ptr();
      p.norms = const_cast<float*>(norms.data_ptr<float>());
      p.grad_y = gy.data_ptr();
      p.grad_x = dx.data_ptr();
      p.grad_gamma_partial = partial.defined() ? partial.data_ptr<float>() : nullptr;
      kernels::rms_norm_backward_cuda(p, at::cuda::getCurrentCUDAStream().stream());
      torch::Tensor dgamma;
      if (partial.defined()) dgamma = as_type(partial.sum(0), gamma.scalar_type());
      return {ctx->needs_input_grad(0) ? dx : torch::Tensor(),
              dgamma,
              torch::Tensor(),
              torch::Tensor(),
              torch::Tensor(),
              torch::Tensor()};
    }
#endif
    const torch::Tensor &xhat = saved[0], &gamma = saved[1], &f = saved[2], &n = saved[3];
    const auto x_dtype = static_cast<at::ScalarType>(ctx->saved_data["x_dtype"].toInt());
    const auto y_dtype = static_cast<at::ScalarType>(ctx->saved_data["y_dtype"].toInt());
    const torch::Tensor g = grads[0].defined() ? grads[0] : torch::zeros(xhat.sizes(), xhat.options().dtype(y_dtype));
    torch::Tensor dx, dgamma;
    if (ctx->needs_input_grad(1)) {
      const int64_t d = gamma.size(0);
      dgamma = as_type((g * xhat).reshape({-1, d}).sum(0), gamma.scalar_type());
    }
    if (ctx->needs_input_grad(0)) {
      torch::Tensor dxhat = g * gamma;
      torch::Tensor dot = (dxhat * xhat).sum(-1, /*keepdim=*/true);
      dot = torch::where(n > kEps, dot, torch::zeros_like(dot)) / (scale * scale);
      dx = as_type(dxhat.sub_(xhat * dot).mul_(f), x_dtype);
      if (grads.size() > 1 && grads[1].defined()) dx.add_(grads[1]);
    }
    return {dx, dgamma, torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

#ifdef COLT5_WITH_CUDA
// LayerNorm with weight and bias on the CUDA kernels (layer_norm checked
// params first); out of a [rows, d] x: y in y_dtype, and per row rstd and
// mean for the backward. Not differentiable twice.
class LayerNormFunction : public torch::autograd::Function<LayerNormFunction> {
 public:
  static bool params(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias,
                     at::ScalarType y_dtype, double eps, kernels::RmsNormParams& p) {
    if (!weight.defined() || !bias.defined() || bias.dim() != 1 || bias.device() != weight.device() ||
        bias.scalar_type() != weight.scalar_type() || bias.size(0) != weight.size(0) ||
        !norm_kernel_params(x, weight, y_dtype, p))
      return false;
    p.eps = static_cast<float>(eps);
    p.layer_norm = true;
    return true;
  }

  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                                                const torch::Tensor& weight, const torch::Tensor& bias, double eps,
                                                int64_t y_dtype_in, bool pass_x) {
    ctx->set_materialize_grads(false);  // an unused output gets no gradient rather than zeros
    const auto y_dtype = static_cast<at::ScalarType>(y_dtype_in);
    kernels::RmsNormParams p;
    TORCH_INTERNAL_ASSERT(params(x, weight, bias, y_dtype, eps, p));
    c10::cuda::CUDAGuard guard(x.device());
    torch::Tensor xc = x.contiguous(), w = weight.contiguous(), b = bias.contiguous();
    torch::Tensor y = torch::empty(x.sizes(), x.options().dtype(y_dtype));
    torch::Tensor rstd = torch::empty({p.rows}, x.options().dtype(at::kFloat));
    torch::Tensor mean = torch::empty({p.rows}, x.options().dtype(at::kFloat));
    p.x = xc.data_ptr();
    p.gamma = w.data_ptr();
    p.beta = b.data_ptr();
    p.y = y.data_ptr();
    p.norms = rstd.data_ptr<float>();
    p.means = mean.data_ptr<float>();
    kernels::rms_norm_forward_cuda(p, at::cuda::getCurrentCUDAStream().stream());
    ctx->save_for_backward({xc, w, b, rstd, mean});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["y_dtype"] = y_dtype_in;
    offer_route_grad(ctx, xc, pass_x);
    return norm_outputs(y, x, pass_x);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    TORCH_CHECK(!torch::GradMode::is_enabled(),
                "LayerNorm: its backward is not differentiable (call backward without create_graph)");
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor &x = saved[0], &w = saved[1], &b = saved[2], &rstd = saved[3], &mean = saved[4];
    const auto y_dtype = static_cast<at::ScalarType>(ctx->saved_data["y_dtype"].toInt());
    kernels::RmsNormParams p;
    TORCH_INTERNAL_ASSERT(params(x, w, b, y_dtype, ctx->saved_data["eps"].toDouble(), p));
    c10::cuda::CUDAGuard guard(x.device());
    torch::Tensor gy = grads[0].defined() ? as_type(grads[0], y_dtype).contiguous()
                                          : torch::zeros(x.sizes(), x.options().dtype(y_dtype));
    torch::Tensor dx = torch::empty(x.sizes(), x.options());
    torch::Tensor add = passed_grad(grads, x);
    NormRouteGradPtr route;
    take_route_grad(ctx, ctx->needs_input_grad(0), x, add, p, route);
    p.grad_x_add = add.defined() ? add.data_ptr() : nullptr;
    const bool need_w = ctx->needs_input_grad(1), need_b = ctx->needs_input_grad(2);
    const int64_t parts = kernels::rms_norm_partials(p.rows);
    torch::Tensor pw, pb;
    if (need_w) pw = torch::empty({parts, p.d}, x.options().dtype(at::kFloat));
    if (need_b) pb = torch::empty({parts, p.d}, x.options().dtype(at::kFloat));
    p.x = x.data_ptr();
    p.gamma = w.data_ptr();
    p.beta = b.data_ptr();
    p.norms = const_cast<float*>(rstd.data_ptr<float>());
    p.means = const_cast<float*>(mean.data_ptr<float>());
    p.grad_y = gy.data_ptr();
    p.grad_x = dx.data_ptr();
    p.grad_gamma_partial = need_w ? pw.data_ptr<float>() : nullptr;
    p.grad_beta_partial = need_b ? pb.data_ptr<float>() : nullptr;
    kernels::rms_norm_backward_cuda(p, at::cuda::getCurrentCUDAStream().stream());
    torch::Tensor dw = need_w ? as_type(pw.sum(0), w.scalar_type()) : torch::Tensor();
    torch::Tensor db = need_b ? as_type(pb.sum(0), b.scalar_type()) : torch::Tensor();
    return {ctx->needs_input_grad(0) ? dx : torch::Tensor(), dw, db, torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};
#endif

#ifdef COLT5_WITH_CUDA
// The hand-over of the fused norm whose x_passed output x is (or a view of
// it with the same elements). COLT5_NORM_ROUTE_HANDOVER=0: never (the scores'
// node writes x's gradient itself; read once per process).
NormRouteGradPtr route_grad_of_node(const torch::Tensor& x) {
  static const bool on = [] {
    const char* v = std::getenv("COLT5_NORM_ROUTE_HANDOVER");
    return !(v && v[0] == '0');
  }();
  if (!on || !x.defined() || !x.is_cuda() || !x.is_contiguous() || !x.requires_grad()) return {};
  std::shared_ptr<torch::autograd::Node> fn = x.grad_fn();
  uint32_t nr = x.output_nr();
  for (int hop = 0; fn && hop < 3; ++hop) {
    torch::autograd::AutogradContext* ctx = nullptr;
    if (auto* node = dynamic_cast<torch::autograd::CppNode<RMSNormFunction>*>(fn.get()))
      ctx = &node->ctx_;
    else if (auto* node = dynamic_cast<torch::autograd::CppNode<LayerNormFunction>*>(fn.get()))
      ctx = &node->ctx_;
    if (ctx) {
      auto it = ctx->saved_data.find("route_grad");
      if (nr != 1 || it == ctx->saved_data.end() ||
          ctx->saved_data.at("x_ptr").toInt() != static_cast<int64_t>(reinterpret_cast<intptr_t>(x.data_ptr())) ||
          ctx->saved_data.at("x_numel").toInt() != x.numel())
        return {};
      return c10::static_intrusive_pointer_cast<NormRouteGrad>(it->second.toCapsule());
    }
    // Through a reshape of the passed-on x (a view: the data address and
    // size checks above make it the same elements in the same order).
    const std::string name = fn->name();
    if ((name != "ViewBackward0" && name != "AliasBackward0" && name != "ReshapeAliasBackward0") ||
        fn->num_outputs() != 1 || fn->next_edges().size() != 1)
      return {};
    const torch::autograd::Edge& e = fn->next_edge(0);
    fn = e.function;
    nr = e.input_nr;
  }
  return {};
}
#endif

// The output dtype of a norm whose output feeds a matrix product: under
// autocast with float32 x and parameters, the autocast dtype (rounded once
// from float32, as the product's own cast would); -1 (the promoted type)
// otherwise. Autocast leaves float64 alone.
int64_t autocast_output_dtype(const torch::Tensor& x, const torch::Tensor& param) {
  if (at::promote_types(x.scalar_type(), param.scalar_type()) != at::kFloat ||
      !compat::autocast_enabled(x.device().type()))
    return -1;
  const at::ScalarType dt = compat::autocast_dtype(x.device().type());
  return dt == at::kBFloat16 || dt == at::kHalf ? static_cast<int64_t>(dt) : -1;
}

}  // namespace

torch::Tensor layer_norm(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias, double eps,
                         bool autocast_output, bool cuda_kernel, torch::Tensor* x_passed) {
  if (x_passed) *x_passed = x;
  const int64_t out = autocast_output && weight.defined() ? autocast_output_dtype(x, weight) : -1;
#ifdef COLT5_WITH_CUDA
  if (cuda_kernel && weight.defined()) {
    const at::ScalarType y_dtype =
        out < 0 ? at::promote_types(x.scalar_type(), weight.scalar_type()) : static_cast<at::ScalarType>(out);
    kernels::RmsNormParams p;
    if (LayerNormFunction::params(x, weight, bias, y_dtype, eps, p)) {
      auto out = LayerNormFunction::apply(x, weight, bias, eps, static_cast<int64_t>(y_dtype), x_passed != nullptr);
      if (x_passed) *x_passed = out[1];
      return out[0];
    }
  }
#else
  (void)cuda_kernel;
#endif
  torch::Tensor y = torch::layer_norm(x, {x.size(-1)}, weight, bias, eps);
  return out < 0 ? y : as_type(y, static_cast<at::ScalarType>(out));
}

#ifdef COLT5_WITH_CUDA
NormRouteGradPtr norm_route_grad_of(const at::Tensor& x) { return route_grad_of_node(x); }

int64_t current_backward_pass() { return torch::autograd::get_current_graph_task_id(); }
#endif

RMSNormImpl::RMSNormImpl(const RMSNormOptions& options_) : options(options_) { reset(); }

void RMSNormImpl::reset() {
  TORCH_CHECK(options.dim() > 0, "RMSNorm: dim must be positive, got ", options.dim());
  gamma = register_parameter("gamma", torch::ones({options.dim()}));
}

void RMSNormImpl::pretty_print(std::ostream& stream) const {
  stream << "colt5::nn::RMSNorm(dim=" << options.dim() << ")";
}

torch::Tensor RMSNormImpl::forward(const torch::Tensor& x) { return apply_norm(x, /*pass_x=*/false)[0]; }

std::pair<torch::Tensor, torch::Tensor> RMSNormImpl::forward_passing(const torch::Tensor& x) {
  auto out = apply_norm(x, /*pass_x=*/true);
  return {out[0], out[1]};
}

std::vector<torch::Tensor> RMSNormImpl::apply_norm(const torch::Tensor& x, bool pass_x) {
  TORCH_CHECK(x.defined(), "RMSNorm: input x is undefined");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == options.dim(), "RMSNorm: input x must end in dimension ", options.dim(),
              ", got shape ", x.sizes());
  const double scale = std::sqrt(static_cast<double>(options.dim()));
  // F.normalize: x / max(||x||, 1e-12); the row factor and sqrt(dim) are
  // combined before touching x (two passes over x instead of three).
  // Under autocast, where the output feeds a matrix product (autocast_output),
  // it comes in the region's dtype, rounded once from float32 as the product's
  // own cast would (float32 inputs only: autocast leaves float64 alone).
  const int64_t out_dtype = options.autocast_output() ? autocast_output_dtype(x, gamma) : -1;
  return RMSNormFunction::apply(x, gamma, scale, options.cuda_kernel(), out_dtype, pass_x);
}

// ---------------------------------------------------------------- FeedForward

FeedForwardImpl::FeedForwardImpl(const FeedForwardOptions& options_) : options(options_) { reset(); }

int64_t FeedForwardImpl::hidden_dim() const {
  return static_cast<int64_t>(static_cast<double>(options.dim()) * options.mult());
}

void FeedForwardImpl::reset() {
  TORCH_CHECK(options.dim() > 0, "FeedForward: dim must be positive, got ", options.dim());
  TORCH_CHECK(std::isfinite(options.mult()) && options.mult() > 0, "FeedForward: mult must be positive, got ",
              options.mult());
  const int64_t hidden = hidden_dim();
  TORCH_CHECK(hidden > 0, "FeedForward: int(dim * mult) = int(", options.dim(), " * ", options.mult(),
              ") is 0; the hidden layer would be empty");
  norm = register_module("0", RMSNorm(RMSNormOptions(options.dim()).autocast_output(true)));
  proj_in = register_module("1", torch::nn::Linear(options.dim(), hidden));
  act = register_module("2", torch::nn::GELU());
  proj_out = register_module("3", torch::nn::Linear(hidden, options.dim()));
}

void FeedForwardImpl::pretty_print(std::ostream& stream) const {
  stream << "colt5::nn::FeedForward(dim=" << options.dim() << ", mult=" << options.mult() << ")";
}

torch::Tensor FeedForwardImpl::forward(const torch::Tensor& x) { return forward_impl(x, nullptr); }

std::pair<torch::Tensor, torch::Tensor> FeedForwardImpl::forward_passing(const torch::Tensor& x) {
  torch::Tensor x_passed;
  torch::Tensor y = forward_impl(x, &x_passed);
  return {y, x_passed};
}

torch::Tensor FeedForwardImpl::forward_impl(const torch::Tensor& x, torch::Tensor* x_passed) {
  RECORD_USER_SCOPE("colt5::feedforward");
  TORCH_CHECK(x.defined(), "FeedForward: input x is undefined");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == options.dim(), "FeedForward: input x must end in dimension ", options.dim(),
              ", got shape ", x.sizes());
  // torch::linear rather than the modules' forward: the C++ frontend's
  // Linear adds the bias in a separate pass for inputs of more than two
  // dimensions, where torch::linear folds them into one matrix product with
  // the bias added in its epilogue (one write of the output instead of three).
  // (nn::linear: torch::linear with a faster bias gradient on CUDA.)
  torch::Tensor normed;
  if (x_passed)
    std::tie(normed, *x_passed) = norm->forward_passing(x);
  else
    normed = norm->forward(x);
  const torch::Tensor hidden = torch::gelu(linear(normed, proj_in->weight, proj_in->bias));
  return linear(hidden, proj_out->weight, proj_out->bias);
}

// ---------------------------------------------------------------- rotary embedding

RotaryEmbeddingImpl::RotaryEmbeddingImpl(const RotaryEmbeddingOptions& options_) : options(options_) { reset(); }

void RotaryEmbeddingImpl::reset() {
  TORCH_CHECK(options.dim() > 0 && options.dim() % 2 == 0, "RotaryEmbedding: dim must be positive and even, got ",
              options.dim());
  TORCH_CHECK(std::isfinite(options.theta()) && options.theta() > 0, "RotaryEmbedding: theta must be positive, got ",
              options.theta());
  auto exponent = torch::arange(0, options.dim(), 2, torch::kFloat) / static_cast<double>(options.dim());
  auto values = 1.0 / torch::pow(options.theta(), exponent);
  inv_freq = register_buffer("inv_freq", values);
}

void RotaryEmbeddingImpl::pretty_print(std::ostream& stream) const {
  stream << "colt5::nn::RotaryEmbedding(dim=" << options.dim() << ", theta=" << options.theta() << ")";
}

torch::Tensor RotaryEmbeddingImpl::forward(int64_t seq_len) {
  TORCH_CHECK(seq_len >= 0, "RotaryEmbedding: seq_len must be non-negative, got ", seq_len);
  auto t = torch::arange(seq_len, inv_freq.options());
  auto freqs = torch::outer(t, inv_freq);
  return torch::cat({freqs, freqs}, -1);
}

torch::Tensor rotate_half(const torch::Tensor& x) {
  TORCH_CHECK(x.defined(), "rotate_half: x is undefined");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) % 2 == 0, "rotate_half: the last dimension of x must be even, got shape ",
              x.sizes());
  auto halves = x.chunk(2, -1);
  return torch::cat({-halves[1], halves[0]}, -1);
}

torch::Tensor apply_rotary_pos_emb(const torch::Tensor& pos, const torch::Tensor& t) {
  TORCH_CHECK(pos.defined() && t.defined(), "apply_rotary_pos_emb: pos and t must be defined");
  TORCH_CHECK(pos.dim() >= 1 && t.dim() >= 1 && pos.size(-1) == t.size(-1),
              "apply_rotary_pos_emb: pos must end in t's last dimension ", t.size(-1), ", got pos shape ", pos.sizes(),
              " and t shape ", t.sizes());
  auto out = t * pos.cos() + rotate_half(t) * pos.sin();
  return out.scalar_type() == t.scalar_type() ? out : out.to(t.scalar_type());
}

torch::Tensor residual_add(const torch::Tensor& x, const torch::Tensor& y) {
#ifdef COLT5_WITH_CUDA
  if (x.is_cuda() && y.is_cuda() && x.get_device() == y.get_device() && x.scalar_type() == torch::kFloat &&
      (y.scalar_type() == torch::kBFloat16 || y.scalar_type() == torch::kHalf) && x.sizes() == y.sizes())
    return AddFloatHalfFunction::apply(x, y);
#endif
  return torch::add(x, y);
}

}  // namespace nn
}  // namespace colt5
