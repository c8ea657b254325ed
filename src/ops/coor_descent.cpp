// LibTorch boundary of coordinate descent: argument checks, dtype and device
// dispatch, and the autograd function around the fused kernels.
#include "colt5/coor_descent.h"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/autograd.h>
#include <torch/types.h>

#include <cmath>

#include "kernels/coor_descent.h"
#include "ops/as_type.h"

#ifdef COLT5_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace colt5 {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::ScalarType acc_type_for(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_scores(const at::Tensor& s, const char* name) {
  TORCH_CHECK(s.defined(), name, " is undefined");
  const auto t = s.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf, name,
              " must be float32, float64, bfloat16 or float16, got ", t);
  TORCH_CHECK(s.dim() >= 1, name, " must have at least one dimension (the sequence), got a scalar");
  TORCH_CHECK(s.size(-1) >= 1, name, " has an empty last dimension: there is nothing to select from");
  TORCH_CHECK(s.device().is_cpu() || s.device().is_cuda(), name, " must be on the CPU or a CUDA device, got ",
              s.device());
}

void check_mask(const at::Tensor& mask, const at::Tensor& s, const char* name) {
  if (!mask.defined()) return;
  TORCH_CHECK(mask.scalar_type() == at::kBool, name, " must be a bool tensor, got ", mask.scalar_type());
  TORCH_CHECK(mask.sizes() == s.sizes(), name, " must have the shape of the scores ", s.sizes(), ", got ",
              mask.sizes());
  TORCH_CHECK(mask.device() == s.device(), name, " is on ", mask.device(), " but the scores are on ", s.device());
}

void check_options(const CoorDescentOptions& o) {
  TORCH_CHECK(o.n_iters() >= 1, "coor_descent: n_iters must be at least 1, got ", o.n_iters());
  TORCH_CHECK(std::isfinite(o.eps()) && o.eps() > 0, "coor_descent: eps must be a positive number, got ", o.eps());
  if (o.eps_init())
    TORCH_CHECK(std::isfinite(*o.eps_init()) && *o.eps_init() > 0,
                "coor_descent: eps_init must be a positive number, got ", *o.eps_init());
  TORCH_CHECK(o.eps_decay() > 0 && o.eps_decay() <= 1, "coor_descent: eps_decay must be in (0, 1], got ",
              o.eps_decay());
  TORCH_CHECK(o.checkpoint_segments() >= 0 && o.checkpoint_segments() <= o.n_iters(),
              "coor_descent: checkpoint_segments must be between 0 and n_iters (", o.n_iters(), "), got ",
              o.checkpoint_segments());
  TORCH_CHECK(o.cuda_blocks_per_row() >= 0 && o.cuda_blocks_per_row() <= (1 << 20),
              "coor_descent: cuda_blocks_per_row must be between 0 and 2^20, got ", o.cuda_blocks_per_row());
  TORCH_CHECK(o.cuda_max_cluster() >= 1 && o.cuda_max_cluster() <= 16,
              "coor_descent: cuda_max_cluster must be between 1 and 16, got ", o.cuda_max_cluster());
}

kernels::RowLaunch row_launch(const CoorDescentOptions& o) {
  kernels::RowLaunch l;
  const std::string& name = o.cuda_kernel();
  if (name == "auto") {
    l.kernel = kernels::RowKernel::kAuto;
  } else if (name == "warp") {
    l.kernel = kernels::RowKernel::kWarp;
  } else if (name == "block") {
    l.kernel = kernels::RowKernel::kBlock;
  } else if (name == "cluster") {
    l.kernel = kernels::RowKernel::kCluster;
  } else if (name == "grid") {
    l.kernel = kernels::RowKernel::kGrid;
  } else {
    TORCH_CHECK(false, "coor_descent: cuda_kernel must be auto, warp, block, cluster or grid, got \"", name, "\"");
  }
  l.blocks_per_row = static_cast<int32_t>(o.cuda_blocks_per_row());
  l.max_cluster = static_cast<int32_t>(o.cuda_max_cluster());
  return l;
}

template <typename T>
kernels::CoorDescentParams<T> make_params(const at::Tensor& s2, const at::Tensor& mask2, const at::Tensor& k1,
                                          const CoorDescentOptions& o) {
  kernels::CoorDescentParams<T> p;
  p.rows = s2.size(0);
  p.cols = s2.size(1);
  p.s = s2.data_ptr<T>();
  p.mask = mask2.defined() ? mask2.data_ptr<uint8_t>() : nullptr;
  p.k = k1.data_ptr<T>();
  p.n_iters = o.n_iters();
  p.eps = o.eps();
  p.eps_init = std::max(o.eps_init().value_or(o.eps()), o.eps());
  p.eps_decay = o.eps_decay();
  p.checkpoint_segments = o.checkpoint_segments();
  p.launch = row_launch(o);
  return p;
}

// Rows per parallel chunk on the CPU: about this many entries each.
constexpr int64_t kCpuGrainEntries = 16384;
int64_t grain_for(int64_t cols) { return std::max<int64_t>(1, kCpuGrainEntries / std::max<int64_t>(cols, 1)); }

struct Saved {
  at::Tensor y, saved, stats;
};

Saved run_forward(const at::Tensor& s2, const at::Tensor& mask2, const at::Tensor& k1, const CoorDescentOptions& o) {
  const int64_t rows = s2.size(0), cols = s2.size(1);
  const int64_t per_row = kernels::saved_per_row(o.n_iters(), o.checkpoint_segments());
  Saved out;
  out.y = at::empty({rows, cols}, s2.options());
  out.saved = at::empty({rows, per_row}, s2.options().dtype(at::kDouble));
  out.stats = at::empty({rows, 2}, s2.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(s2.scalar_type(), "coor_descent_forward", [&] {
    auto p = make_params<scalar_t>(s2, mask2, k1, o);
    p.y = out.y.data_ptr<scalar_t>();
    p.saved = out.saved.data_ptr<double>();
    p.row_stats = out.stats.data_ptr<double>();
    if (s2.is_cuda()) {
#ifdef COLT5_WITH_CUDA
      c10::cuda::CUDAGuard guard(s2.device());
      kernels::coor_descent_forward_cuda<scalar_t>(p, at::cuda::getCurrentCUDAStream().stream());
#else
      TORCH_CHECK(false, "coor_descent: colt5 was built without CUDA support");
#endif
    } else {
      at::parallel_for(0, rows, grain_for(cols),
                       [&](int64_t b, int64_t e) { kernels::coor_descent_forward_cpu<scalar_t>(p, b, e); });
      // The kernel marks a row holding a non-finite unmasked score with a NaN maximum.
      TORCH_CHECK(!at::isnan(out.stats.select(1, 0)).any().item<bool>(),
                  "coor_descent: the scores contain NaN or infinite values at unmasked positions");
    }
  });
  return out;
}

// Not differentiable, so kept out of autograd's view of the inputs.
struct ConstantMask {
  at::Tensor value;
};

class CoorDescentFunction : public torch::autograd::Function<CoorDescentFunction> {
 public:
  // s2: rows x cols in the accumulation dtype; k1: rows, same dtype.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& s2, const at::Tensor& k1, const ConstantMask& mask,
                            const CoorDescentOptions& o) {
    const at::Tensor& mask2 = mask.value;
    Saved f = run_forward(s2, mask2, k1, o);
    ctx->save_for_backward({s2, k1, f.y, f.saved, f.stats});
    ctx->saved_data["mask"] = mask2.defined() ? mask2 : at::Tensor();
    ctx->saved_data["n_iters"] = o.n_iters();
    ctx->saved_data["eps"] = o.eps();
    ctx->saved_data["eps_init"] = std::max(o.eps_init().value_or(o.eps()), o.eps());
    ctx->saved_data["eps_decay"] = o.eps_decay();
    ctx->saved_data["segments"] = o.checkpoint_segments();
    ctx->saved_data["cuda_kernel"] = o.cuda_kernel();
    ctx->saved_data["cuda_blocks_per_row"] = o.cuda_blocks_per_row();
    ctx->saved_data["cuda_max_cluster"] = o.cuda_max_cluster();
    return f.y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto v = ctx->get_saved_variables();
    const at::Tensor &s2 = v[0], &k1 = v[1], &y = v[2], &saved = v[3], &stats = v[4];
    const at::Tensor mask2 = ctx->saved_data["mask"].toTensor();
    CoorDescentOptions o;
    o.n_iters(ctx->saved_data["n_iters"].toInt())
        .eps(ctx->saved_data["eps"].toDouble())
        .eps_init(ctx->saved_data["eps_init"].toDouble())
        .eps_decay(ctx->saved_data["eps_decay"].toDouble())
        .checkpoint_segments(ctx->saved_data["segments"].toInt())
        .cuda_kernel(ctx->saved_data["cuda_kernel"].toStringRef())
        .cuda_blocks_per_row(ctx->saved_data["cuda_blocks_per_row"].toInt())
        .cuda_max_cluster(ctx->saved_data["cuda_max_cluster"].toInt());
    at::Tensor gy = grads[0];
    if (!gy.defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    gy = as_type(gy, s2.scalar_type()).contiguous();
    const bool want_k = ctx->needs_input_grad(1);
    at::Tensor gs = at::empty_like(s2);
    at::Tensor gk = want_k ? at::empty_like(k1) : at::Tensor();
    const int64_t rows = s2.size(0), cols = s2.size(1);
    AT_DISPATCH_FLOATING_TYPES(s2.scalar_type(), "coor_descent_backward", [&] {
      kernels::CoorDescentBackwardParams<scalar_t> bp;
      bp.fwd = make_params<scalar_t>(s2, mask2, k1, o);
      bp.fwd.y = const_cast<scalar_t*>(y.data_ptr<scalar_t>());
      bp.fwd.saved = const_cast<double*>(saved.data_ptr<double>());
      bp.fwd.row_stats = const_cast<double*>(stats.data_ptr<double>());
      bp.grad_y = gy.data_ptr<scalar_t>();
      bp.grad_s = gs.data_ptr<scalar_t>();
      bp.grad_k = want_k ? gk.data_ptr<scalar_t>() : nullptr;
      if (s2.is_cuda()) {
#ifdef COLT5_WITH_CUDA
        c10::cuda::CUDAGuard guard(s2.device());
        kernels::coor_descent_backward_cuda<scalar_t>(bp, at::cuda::getCurrentCUDAStream().stream());
#else
        TORCH_CHECK(false, "coor_descent: colt5 was built without CUDA support");
#endif
      } else {
        at::parallel_for(0, rows, grain_for(cols),
                         [&](int64_t b, int64_t e) { kernels::coor_descent_backward_cpu<scalar_t>(bp, b, e); });
      }
    });
    return {gs, gk, at::Tensor(), at::Tensor()};
  }
};

at::Tensor coor_descent_impl(const at::Tensor& s, const at::Tensor& k_rows, const CoorDescentOptions& o,
                             const at::Tensor& mask) {
  const auto acc = acc_type_for(s.scalar_type());
  const int64_t cols = s.size(-1);
  const int64_t rows = s.numel() / cols;
  if (rows == 0) return at::zeros_like(s);
  at::Tensor s2 = as_type(s, acc).reshape({rows, cols}).contiguous();
  at::Tensor mask2;
  if (mask.defined()) mask2 = mask.reshape({rows, cols}).contiguous().view(at::kByte);
  at::Tensor k1 = as_type(k_rows, acc).reshape({rows}).contiguous();
  at::Tensor y = CoorDescentFunction::apply(s2, k1, ConstantMask{mask2}, o);
  return as_type(y, s.scalar_type()).view(s.sizes());
}

}  // namespace

at::Tensor coor_descent(const at::Tensor& s, double k, const CoorDescentOptions& options, const at::Tensor& mask) {
  RECORD_USER_SCOPE("colt5::coor_descent");
  check_scores(s, "coor_descent: s");
  check_mask(mask, s, "coor_descent: mask");
  check_options(options);
  TORCH_CHECK(std::isfinite(k) && k > 0, "coor_descent: k must be a positive number, got ", k);
  const int64_t rows = s.numel() / s.size(-1);
  at::Tensor k_rows = at::full({rows}, k, s.options().dtype(acc_type_for(s.scalar_type())));
  return coor_descent_impl(s, k_rows, options, mask);
}

at::Tensor coor_descent(const at::Tensor& s, const at::Tensor& k, const CoorDescentOptions& options,
                        const at::Tensor& mask) {
  check_scores(s, "coor_descent: s");
  check_mask(mask, s, "coor_descent: mask");
  check_options(options);
  TORCH_CHECK(k.defined(), "coor_descent: k is undefined");
  TORCH_CHECK(at::isFloatingType(k.scalar_type()), "coor_descent: k must be a floating tensor, got ", k.scalar_type());
  TORCH_CHECK(k.device() == s.device(), "coor_descent: k is on ", k.device(), " but s is on ", s.device());
  TORCH_CHECK(k.sizes() == s.sizes().slice(0, s.dim() - 1), "coor_descent: k must have one value per row, shape ",
              s.sizes().slice(0, s.dim() - 1), ", got ", k.sizes());
  TORCH_CHECK(k.numel() == 0 || at::logical_and(at::isfinite(k), k > 0).all().item<bool>(),
              "coor_descent: every k must be a positive number");
  return coor_descent_impl(s, k, options, mask);
}

at::Tensor topk_indices(const at::Tensor& scores, int64_t k, const at::Tensor& tiebreak, const at::Tensor& mask) {
  RECORD_USER_SCOPE("colt5::topk");
  check_scores(scores, "topk_indices: scores");
  check_mask(mask, scores, "topk_indices: mask");
  const int64_t cols = scores.size(-1);
  TORCH_CHECK(k >= 1 && k <= cols, "topk_indices: k must be between 1 and the last dimension (", cols, "), got ", k);
  if (tiebreak.defined()) {
    TORCH_CHECK(tiebreak.sizes() == scores.sizes(), "topk_indices: tiebreak must have the shape of scores ",
                scores.sizes(), ", got ", tiebreak.sizes());
    TORCH_CHECK(tiebreak.device() == scores.device(), "topk_indices: tiebreak is on ", tiebreak.device(),
                " but scores are on ", scores.device());
  }
  const auto acc = acc_type_for(scores.scalar_type());
  const int64_t rows = scores.numel() / cols;
  std::vector<int64_t> out_shape(scores.sizes().begin(), scores.sizes().end());
  out_shape.back() = k;
  at::Tensor idx = at::empty({rows, k}, scores.options().dtype(at::kLong));
  if (rows == 0) return idx.view(out_shape);
  at::Tensor sc = as_type(scores.detach(), acc).reshape({rows, cols}).contiguous();
  at::Tensor tb = tiebreak.defined() ? as_type(tiebreak.detach(), acc).reshape({rows, cols}).contiguous() : at::Tensor();
  at::Tensor m = mask.defined() ? mask.reshape({rows, cols}).contiguous().view(at::kByte) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(acc, "topk_indices", [&] {
    const scalar_t* tbp = tb.defined() ? tb.data_ptr<scalar_t>() : nullptr;
    const uint8_t* mp = m.defined() ? m.data_ptr<uint8_t>() : nullptr;
    if (sc.is_cuda()) {
#ifdef COLT5_WITH_CUDA
      c10::cuda::CUDAGuard guard(sc.device());
      kernels::topk_tiebreak_cuda<scalar_t>(sc.data_ptr<scalar_t>(), tbp, mp, rows, cols, k, idx.data_ptr<int64_t>(),
                                            at::cuda::getCurrentCUDAStream().stream());
#else
      TORCH_CHECK(false, "topk_indices: colt5 was built without CUDA support");
#endif
    } else {
      at::parallel_for(0, rows, grain_for(cols), [&](int64_t b, int64_t e) {
        kernels::topk_tiebreak_cpu<scalar_t>(sc.data_ptr<scalar_t>(), tbp, mp, rows, cols, k, idx.data_ptr<int64_t>(),
                                             b, e);
      });
    }
  });
  return idx.view(out_shape);
}

TopkResult topk(const at::Tensor& x, int64_t k, const TopkOptions& options, const at::Tensor& mask) {
  check_scores(x, "topk: x");
  check_mask(mask, x, "topk: mask");
  const int64_t n = x.size(-1);
  TORCH_CHECK(k >= 1 && k <= n, "topk: k must be between 1 and the last dimension (", n, "), got ", k);
  TopkResult r;
  if (options.non_differentiable()) {
    r.indices = topk_indices(x, k, {}, mask);
    r.values = x.gather(-1, r.indices);
    return r;
  }
  TORCH_CHECK(options.coor_descent_k_ratio() >= 1.0, "topk: coor_descent_k_ratio must be at least 1, got ",
              options.coor_descent_k_ratio());
  CoorDescentOptions cd;
  cd.n_iters(options.n_iters()).eps(options.eps()).eps_init(options.eps_init()).eps_decay(options.eps_decay());
  const double cd_k = std::min(static_cast<double>(k) * options.coor_descent_k_ratio(), static_cast<double>(n));
  at::Tensor soft = coor_descent(x, cd_k, cd, mask);
  at::Tensor gates = soft + at::rsub(soft, 1).detach();
  at::Tensor gated = x * gates;
  r.indices = topk_indices(gated, k, {}, mask);
  r.values = gated.gather(-1, r.indices);
  r.coor_descent_values = soft.gather(-1, r.indices);
  r.gates = gates.gather(-1, r.indices);
  return r;
}

}  // namespace colt5
