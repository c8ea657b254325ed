#include "colt5/nn/attention.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <vector>

#include "colt5/compat.h"
#include "nn/attention_core.h"
#include "nn/checks.h"
#include "nn/masking.h"
#include "ops/as_type.h"
#include "ops/row_dtype.h"

#ifdef COLT5_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "kernels/coor_descent.h"
#endif

namespace colt5 {
namespace nn {
namespace {

#ifdef COLT5_WITH_CUDA
// Attention over table rows read by index (kernels/gathered_attention_cuda.cu):
// q [G, heads, n, dh], table [T, heads * 2 * dh] (q's dtype, 16-byte
// aligned), null_kv [routes, heads * 2 * dh] float32, scores [G, m] float32,
// rows [G, m] int64, mask [G, m] bool; scores and mask may be empty (none:
// autograd takes no undefined inputs). Returns [G, heads, n, dh].
class GatheredAttentionFunction : public torch::autograd::Function<GatheredAttentionFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& q,
                               const torch::Tensor& table, const torch::Tensor& null_kv, const torch::Tensor& scores,
                               const torch::Tensor& rows, const torch::Tensor& mask, bool keys_scaled,
                               const torch::Tensor& pair_a, const torch::Tensor& pair_b, const torch::Tensor& pair_slot,
                               const torch::Tensor& pair_extra, const torch::Tensor& pair_extra_count) {
    c10::cuda::CUDAGuard guard(q.device());
    kernels::GatheredAttentionParams p = params(q, table, null_kv, scores, rows, mask, keys_scaled);
    torch::Tensor out = torch::empty_like(q);
    torch::Tensor lse = torch::empty({p.groups, p.heads, p.n}, q.options().dtype(at::kFloat));
    p.out = out.data_ptr();
    p.lse = lse.data_ptr<float>();
    kernels::gathered_attention_forward_cuda(p, at::cuda::getCurrentCUDAStream().stream());
    ctx->save_for_backward(
        {q, table, null_kv, scores, rows, mask, out, lse, pair_a, pair_b, pair_slot, pair_extra, pair_extra_count});
    ctx->saved_data["keys_scaled"] = keys_scaled;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const torch::Tensor &q = s[0], &table = s[1], &null_kv = s[2], &scores = s[3], &rows = s[4], &mask = s[5],
                        &out = s[6], &lse = s[7];
    c10::cuda::CUDAGuard guard(q.device());
    kernels::GatheredAttentionParams p =
        params(q, table, null_kv, scores, rows, mask, ctx->saved_data["keys_scaled"].toBool());
    torch::Tensor go = as_type(grads[0], q.scalar_type()).contiguous();
    auto f32 = q.options().dtype(at::kFloat);
    torch::Tensor gq = torch::empty(q.sizes(), f32);
    torch::Tensor gtable = torch::zeros(table.sizes(), f32);
    torch::Tensor gnull = torch::zeros(null_kv.sizes(), f32);
    torch::Tensor gscores = torch::zeros(scores.sizes(), f32);
    p.out = const_cast<void*>(out.data_ptr());
    p.lse = const_cast<float*>(lse.data_ptr<float>());
    p.grad_out = go.data_ptr();
    p.grad_q = gq.data_ptr<float>();
    p.grad_table = gtable.data_ptr<float>();
    p.grad_null = gnull.data_ptr<float>();
    p.grad_scores = scores.numel() ? gscores.data_ptr<float>() : nullptr;
    if (s[8].numel()) {
      p.pairs = s[8].numel();
      p.pair_a = s[8].data_ptr<int>();
      p.pair_b = s[9].data_ptr<int>();
      p.pair_slot = s[10].data_ptr<int>();
      p.pair_extra = s[11].data_ptr<int>();
      p.pair_extra_count = s[12].data_ptr<int>();
    }
    kernels::gathered_attention_backward_cuda(p, at::cuda::getCurrentCUDAStream().stream());
    auto wanted = [&](int i, const torch::Tensor& t) { return ctx->needs_input_grad(i) ? t : torch::Tensor(); };
    return {wanted(0, as_type(gq, q.scalar_type())),
            wanted(1, as_type(gtable, table.scalar_type())),
            wanted(2, gnull),
            wanted(3, gscores),
            {},
            {},
            {},
            {},
            {},
            {},
            {},
            {}};
  }

 private:
  static kernels::GatheredAttentionParams params(const torch::Tensor& q, const torch::Tensor& table,
                                                 const torch::Tensor& null_kv, const torch::Tensor& scores,
                                                 const torch::Tensor& rows, const torch::Tensor& mask,
                                                 bool keys_scaled) {
    kernels::GatheredAttentionParams p;
    p.groups = q.size(0);
    p.heads = q.size(1);
    p.n = q.size(2);
    p.dim_head = q.size(3);
    p.m = rows.size(1);
    p.routes = null_kv.size(0);
    p.scale = static_cast<float>(std::pow(static_cast<double>(p.dim_head), -0.5));
    p.keys_scaled = keys_scaled;
    p.dtype = row_dtype(q.scalar_type());
    p.q = q.data_ptr();
    p.table = table.data_ptr();
    p.rows = rows.data_ptr<int64_t>();
    p.null_kv = null_kv.data_ptr<float>();
    p.scores = scores.numel() ? scores.data_ptr<float>() : nullptr;
    p.mask = mask.numel() ? mask.data_ptr<bool>() : nullptr;
    return p;
  }
};

// Pairs of consecutive views of one context row for the backward's shared-key
// sums (attend_gathered's pair_views): views 0 and 1, 2 and 3, ... of each
// row (the last alone where the count is odd); for each, the slot in B of
// each of A's keys (-1 where B lacks it or A's key is masked) and B's keys
// that A lacks, first in each row, with their count. int32, on rows' device.
std::vector<torch::Tensor> gathered_pairs(const torch::Tensor& rows, const torch::Tensor& mask, int64_t views,
                                          int64_t span) {
  const int64_t g = rows.size(0), m = rows.size(1), bc = g / views, per = (views + 1) / 2, np = bc * per;
  const auto io = rows.options().dtype(at::kLong);
  const auto i32 = rows.options().dtype(at::kInt);
  torch::Tensor a = (torch::arange(bc, io).view({bc, 1}) * views + torch::arange(per, io).view({1, per}) * 2).reshape({np});
  torch::Tensor has_b = (torch::arange(per, io) * 2 + 1 < views).view({1, per}).expand({bc, per}).reshape({np});
  torch::Tensor b_rows = torch::where(has_b, a + 1, a);  // a stand-in where there is no B (none of it valid)
  torch::Tensor start = (torch::div(a, views, "floor") * span).view({np, 1});
  torch::Tensor pos_a = rows.index_select(0, a) - start;
  torch::Tensor pos_b = rows.index_select(0, b_rows) - start;
  torch::Tensor valid_a = mask.defined() ? mask.index_select(0, a) : torch::ones({np, m}, io.dtype(at::kBool));
  torch::Tensor valid_b =
      (mask.defined() ? mask.index_select(0, b_rows) : torch::ones({np, m}, io.dtype(at::kBool))) & has_b.view({np, 1});
  const torch::Tensor nowhere = torch::full({1, 1}, span, io);
  // B's slot of each position of the span (column span: B's masked keys).
  torch::Tensor slot_of = torch::full({np, span + 1}, -1, i32);
  slot_of.scatter_(1, torch::where(valid_b, pos_b, nowhere),
                   torch::arange(m, i32).view({1, m}).expand({np, m}).contiguous());
  torch::Tensor slot = slot_of.gather(1, torch::where(valid_a, pos_a, nowhere));
  torch::Tensor covered = torch::zeros({np, m + 1}, io.dtype(at::kBool));
  covered.scatter_(1, torch::where(slot >= 0, slot.to(at::kLong), torch::full({1, 1}, m, io)), true);
  torch::Tensor extra = valid_b & covered.narrow(1, 0, m).logical_not();
  torch::Tensor count = extra.sum(1).to(at::kInt);
  torch::Tensor order = std::get<1>(extra.to(at::kByte).sort(1, /*descending=*/true)).to(at::kInt);
  torch::Tensor b = torch::where(has_b, a + 1, torch::full_like(a, -1));
  return {a.to(at::kInt), b.to(at::kInt), slot.contiguous(), order.contiguous(), count};
}

// Whether the backward takes groups in pairs (COLT5_GATHERED_PAIRS=0: never;
// read once per process).
bool gathered_pairs_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("COLT5_GATHERED_PAIRS");
    return !(v && v[0] == '0');
  }();
  return on;
}

// Whether attend_gathered's index kernel takes these inputs.
bool gathered_kernel_applies(const torch::Tensor& q, const torch::Tensor& proj, int64_t dh) {
  const auto t = at::promote_types(q.scalar_type(), proj.scalar_type());
  return q.is_cuda() && proj.device() == q.device() && (t == at::kFloat || t == at::kHalf || t == at::kBFloat16) &&
         kernels::gathered_attention_supports(dh);
}
#endif

// Gathered row r's score: group r / m1's entry j - 1 for j = r % m1 > 0; 1
// for the null row (j = 0) and where there are no scores.
template <typename acc_t, typename scalar_t>
acc_t gathered_row_score(const scalar_t* scores, int64_t r, int64_t m1) {
  const int64_t j = r % m1;
  return scores != nullptr && j > 0 ? static_cast<acc_t>(scores[r / m1 * (m1 - 1) + j - 1]) : acc_t(1);
}

// The CPU's gathered keys and values: row flat[g * m1 + j] of table
// [T, hr * 2 * dh] (heads' keys and values side by side, as projected) for
// group g's key/value j (j = 0 its null row), values times scores[g, j - 1]
// (and keys with scale_keys; scores [G, m1 - 1] in table's dtype, or empty
// for none), written into k and v [G, m1, hr, dh] (the caller views them as
// [G, hr, m1, dh]; the attention's gradients come back in this layout). One
// pass instead of a gather and the score product, the rows written in order;
// the backward forms the scores' gradients in one pass and adds each row's
// gradient into the table's in another (by column blocks, in parallel).
class GatherKVFunction : public torch::autograd::Function<GatherKVFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& table,
                                                const torch::Tensor& flat, const torch::Tensor& scores, int64_t groups,
                                                int64_t m1, int64_t hr, bool scale_keys) {
    const int64_t c = table.size(1), dh = c / (2 * hr);
    torch::Tensor k = torch::empty({groups, m1, hr, dh}, table.options());
    torch::Tensor v = torch::empty({groups, m1, hr, dh}, table.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, table.scalar_type(), "colt5_gather_kv", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* src = table.data_ptr<scalar_t>();
      const int64_t* rows = flat.data_ptr<int64_t>();
      const scalar_t* sc = scores.numel() ? scores.data_ptr<scalar_t>() : nullptr;
      scalar_t* K = k.data_ptr<scalar_t>();
      scalar_t* V = v.data_ptr<scalar_t>();
      at::parallel_for(0, groups * m1, 16, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const scalar_t* row = src + rows[r] * c;
          const acc_t sv = gathered_row_score<acc_t>(sc, r, m1), sk = scale_keys ? sv : acc_t(1);
          for (int64_t h = 0; h < hr; ++h) {
            const scalar_t* kr = row + h * 2 * dh;
            const scalar_t* vr = kr + dh;
            scalar_t* kd = K + (r * hr + h) * dh;
            scalar_t* vd = V + (r * hr + h) * dh;
            for (int64_t d = 0; d < dh; ++d) {
              kd[d] = static_cast<scalar_t>(static_cast<acc_t>(kr[d]) * sk);
              vd[d] = static_cast<scalar_t>(static_cast<acc_t>(vr[d]) * sv);
            }
          }
        }
      });
    });
    ctx->save_for_backward({table, flat, scores});
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["m1"] = m1;
    ctx->saved_data["hr"] = hr;
    ctx->saved_data["scale_keys"] = scale_keys;
    return {k, v};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor &table = saved[0], &flat = saved[1], &scores = saved[2];
    const int64_t groups = ctx->saved_data["groups"].toInt(), m1 = ctx->saved_data["m1"].toInt();
    const int64_t hr = ctx->saved_data["hr"].toInt();
    const bool scale_keys = ctx->saved_data["scale_keys"].toBool();
    const int64_t c = table.size(1), dh = c / (2 * hr);
    auto grad_of = [&](const torch::Tensor& g) {
      return g.defined() ? g.to(table.scalar_type()).contiguous() : torch::zeros({groups, m1, hr, dh}, table.options());
    };
    const torch::Tensor gk = grad_of(grads[0]), gv = grad_of(grads[1]);
    const int64_t n_rows = groups * m1;
    torch::Tensor grad_scores = scores.numel() ? torch::empty_like(scores) : torch::Tensor();
    // The table's gradient accumulates in the operations' precision (float
    // for bfloat16/float16), column blocks in parallel: no two threads touch
    // one element, and repeated rows simply add.
    torch::Tensor grad_acc = torch::zeros(table.sizes(), table.options().dtype(at::toOpMathType(table.scalar_type())));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, table.scalar_type(), "colt5_gather_kv_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* src = table.data_ptr<scalar_t>();
      const int64_t* rows = flat.data_ptr<int64_t>();
      const scalar_t* sc = scores.numel() ? scores.data_ptr<scalar_t>() : nullptr;
      const scalar_t* GK = gk.data_ptr<scalar_t>();
      const scalar_t* GV = gv.data_ptr<scalar_t>();
      if (sc != nullptr) {
        scalar_t* GS = grad_scores.data_ptr<scalar_t>();
        at::parallel_for(0, n_rows, 64, [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            const int64_t j = r % m1;
            if (j == 0) continue;
            const scalar_t* row = src + rows[r] * c;
            acc_t ds = 0;
            for (int64_t h = 0; h < hr; ++h) {
              const scalar_t* kr = row + h * 2 * dh;
              const scalar_t* vr = kr + dh;
              const scalar_t* gkr = GK + (r * hr + h) * dh;
              const scalar_t* gvr = GV + (r * hr + h) * dh;
              for (int64_t d = 0; d < dh; ++d) {
                ds += static_cast<acc_t>(gvr[d]) * static_cast<acc_t>(vr[d]);
                if (scale_keys) ds += static_cast<acc_t>(gkr[d]) * static_cast<acc_t>(kr[d]);
              }
            }
            GS[r / m1 * (m1 - 1) + j - 1] = static_cast<scalar_t>(ds);
          }
        });
      }
      // Column blocks of 16 (or a head's dh whole where 16 does not divide it).
      const int64_t block = dh % 16 == 0 ? 16 : dh, blocks = c / block;
      acc_t* GT = grad_acc.data_ptr<acc_t>();
      at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t r = 0; r < n_rows; ++r) {
          const acc_t sv = gathered_row_score<acc_t>(sc, r, m1), sk = scale_keys ? sv : acc_t(1);
          acc_t* out = GT + rows[r] * c;
          for (int64_t blk = b0; blk < b1; ++blk) {
            const int64_t col = blk * block, h = col / (2 * dh), within = col % (2 * dh);
            const bool is_v = within >= dh;
            const scalar_t* gr = (is_v ? GV : GK) + (r * hr + h) * dh + (is_v ? within - dh : within);
            const acc_t f = is_v ? sv : sk;
            for (int64_t d = 0; d < block; ++d) out[col + d] += static_cast<acc_t>(gr[d]) * f;
          }
        }
      });
    });
    torch::Tensor grad_table = grad_acc.to(table.scalar_type());
    return {grad_table,      torch::Tensor(), grad_scores,    torch::Tensor(),
            torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

void check_floating(const torch::Tensor& t, const char* who, const char* name) {
  TORCH_CHECK(t.defined(), who, ": ", name, " is undefined");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), who, ": ", name, " must be a floating point tensor, got ",
              t.scalar_type());
}

}  // namespace

bool fused_attention_available() { return COLT5_HAS_SDPA != 0; }

torch::Tensor attend(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& mask,
                     bool use_fused) {
  check_floating(q, "attend", "q");
  check_floating(k, "attend", "k");
  check_floating(v, "attend", "v");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "attend: q, k, v must be 4-D (b, heads, length, dim_head), got ", q.sizes(), ", ", k.sizes(), ", ",
              v.sizes());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && k.sizes() == v.sizes() && q.size(3) == k.size(3),
              "attend: k and v must be (", q.size(0), ", ", q.size(1), ", j, ", q.size(3), ") to match q ", q.sizes(),
              ", got k ", k.sizes(), " and v ", v.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(),
              "attend: q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  if (mask.defined()) {
    TORCH_CHECK(mask.scalar_type() == at::kBool, "attend: mask must be bool, got ", mask.scalar_type());
    TORCH_CHECK(mask.dim() <= 4, "attend: mask must have at most 4 dimensions, got ", mask.sizes());
    const std::vector<int64_t> full = {q.size(0), q.size(1), q.size(2), k.size(2)};
    const int64_t off = 4 - mask.dim();
    for (int64_t i = 0; i < mask.dim(); ++i)
      TORCH_CHECK(mask.size(i) == 1 || mask.size(i) == full[off + i], "attend: mask of shape ", mask.sizes(),
                  " does not broadcast to (b, heads, i, j) = ", c10::IntArrayRef(full));
  }

#if COLT5_HAS_SDPA
  if (use_fused && q.scalar_type() != at::kDouble) {
    c10::optional<at::Tensor> m;
    if (mask.defined()) m = mask;
    return at::scaled_dot_product_attention(q, k, v, m);
  }
#endif

  // d ** -0.5 as the reference computes it (pow, not 1 / sqrt).
  const double scale = std::pow(static_cast<double>(q.size(-1)), -0.5);
  auto sim = torch::matmul(q, k.transpose(-1, -2)) * scale;
  if (mask.defined()) sim = sim.masked_fill(mask.logical_not(), most_negative(sim.scalar_type()));
  auto attn = sim.softmax(-1);
  return torch::matmul(attn, v);
}

// ---------------------------------------------------------------- Attention

AttentionImpl::AttentionImpl(const AttentionOptions& options_) : options(options_) { reset(); }

void AttentionImpl::reset() {
  check_heads("Attention", options.dim(), options.dim_head(), options.heads());
  const int64_t hidden = options.dim_head() * options.heads();
  norm = register_module("norm", RMSNorm(RMSNormOptions(options.dim()).autocast_output(true)));
  null_kv = register_parameter("null_kv", torch::randn({2, options.heads(), options.dim_head()}));
  to_q = register_module("to_q", torch::nn::Linear(torch::nn::LinearOptions(options.dim(), hidden).bias(false)));
  to_kv = register_module("to_kv", torch::nn::Linear(torch::nn::LinearOptions(options.dim(), hidden * 2).bias(false)));
  to_out = register_module("to_out", torch::nn::Linear(torch::nn::LinearOptions(hidden, options.dim()).bias(false)));
}

void AttentionImpl::pretty_print(std::ostream& stream) const {
  stream << "colt5::nn::Attention(dim=" << options.dim() << ", dim_head=" << options.dim_head()
         << ", heads=" << options.heads() << ", multiply_keys_by_score=" << options.multiply_keys_by_score() << ")";
}

torch::Tensor AttentionImpl::forward(const torch::Tensor& x, const torch::Tensor& context_in,
                                     const torch::Tensor& mask_in, const torch::Tensor& scores_kv_in,
                                     const torch::Tensor& scores_q,
                                     const std::pair<torch::Tensor, torch::Tensor>& rotary_emb) {
  const char* who = "Attention";
  check_floating(x, who, "x");
  const int64_t dim = options.dim(), h = options.heads(), dh = options.dim_head();
  TORCH_CHECK(x.dim() == 3 && x.size(2) == dim, "Attention: x must be (b, n, ", dim, "), got ", x.sizes());
  const int64_t batch = x.size(0);

  auto xn = norm->forward(x);

  torch::Tensor context;
  if (context_in.defined()) {
    check_floating(context_in, who, "context");
    TORCH_CHECK(
        (context_in.dim() == 3 || context_in.dim() == 4) && context_in.size(0) == batch && context_in.size(-1) == dim,
        "Attention: context must be (", batch, ", m, ", dim, ") or (", batch, ", routes, m, ", dim, "), got ",
        context_in.sizes());
    TORCH_CHECK(context_in.device() == x.device(), "Attention: context is on ", context_in.device(), " but x is on ",
                x.device());
    context = norm->forward(context_in);
  } else {
    context = xn;
  }
  if (context.dim() == 3) context = context.unsqueeze(1);
  const int64_t routes = context.size(1), m = context.size(2);
  TORCH_CHECK(routes >= 1, "Attention: context has no key/value routes (shape ", context.sizes(), ")");
  TORCH_CHECK(h % routes == 0, "Attention: the number of heads (", h,
              ") must be divisible by the number of key/value routes (", routes, ")");
  const int64_t heads_per_route = h / routes;

  torch::Tensor scores_kv;
  if (scores_kv_in.defined()) {
    check_floating(scores_kv_in, who, "normalized_scores_kv");
    auto s = scores_kv_in.dim() == 2 ? scores_kv_in.unsqueeze(1) : scores_kv_in;
    TORCH_CHECK(s.dim() == 3 && s.size(0) == batch && s.size(1) == routes && s.size(2) == m,
                "Attention: normalized_scores_kv must be (", batch, ", ", m, ") or (", batch, ", ", routes, ", ", m,
                ") to match the context, got ", scores_kv_in.sizes());
    // Scores may be float32 for a reduced-precision module; the products stay in the module's dtype.
    scores_kv = as_type(s.reshape({batch, routes, 1, m, 1}), x.scalar_type());
  }

  auto q = project_queries(*this, xn, scores_q);

  // keys / values: the projection's heads are split across the routes; each
  // (route, head) owns 2 * dim_head consecutive rows, keys first.
  auto kv_weight = to_kv->weight.reshape({routes, heads_per_route, 2 * dh, dim});
  auto kv = torch::einsum("rhdi,brni->brhnd", {kv_weight, context});
  return attend_projected(*this, x, q, kv, mask_in, scores_kv, rotary_emb);
}

torch::Tensor project_queries(AttentionImpl& a, const torch::Tensor& xn, const torch::Tensor& scores_q) {
  const int64_t batch = xn.size(0), n = xn.size(1), h = a.options.heads(), dh = a.options.dim_head();
  auto q = a.to_q->forward(xn).view({batch, n, h, dh}).transpose(1, 2);
  if (scores_q.defined()) {
    check_floating(scores_q, "Attention", "normalized_scores_q");
    TORCH_CHECK(scores_q.dim() == 2 && scores_q.size(0) == batch && scores_q.size(1) == n,
                "Attention: normalized_scores_q must be (", batch, ", ", n, "), got ", scores_q.sizes());
    q = q * as_type(scores_q.reshape({batch, 1, n, 1}), q.scalar_type());
  }
  return q;
}

torch::Tensor project_keys_values(AttentionImpl& a, const torch::Tensor& context, torch::Tensor* context_passed) {
  if (!context_passed) return a.to_kv->forward(a.norm->forward(context));
  auto [normed, passed] = a.norm->forward_passing(context);
  *context_passed = passed;
  return a.to_kv->forward(normed);
}

torch::Tensor attend_projected(AttentionImpl& a, const torch::Tensor& x, const torch::Tensor& q_in,
                               const torch::Tensor& kv, const torch::Tensor& mask_in, const torch::Tensor& scores_kv,
                               const std::pair<torch::Tensor, torch::Tensor>& rotary_emb) {
  RECORD_USER_SCOPE("colt5::heavy_attention");
  const int64_t h = a.options.heads(), dh = a.options.dim_head();
  const int64_t batch = kv.size(0), routes = kv.size(1), heads_per_route = kv.size(2), m = kv.size(3);
  const int64_t n = q_in.size(2);
  TORCH_CHECK(heads_per_route * routes == h && kv.size(4) == 2 * dh && q_in.size(0) == batch,
              "Attention: projected keys/values must be (", batch, ", routes, heads / routes, m, ", 2 * dh, "), got ",
              kv.sizes());
  torch::Tensor q = q_in;
  auto kv_halves = kv.chunk(2, -1);
  auto k = kv_halves[0], v = kv_halves[1];

  if (scores_kv.defined()) {
    v = v * scores_kv;
    if (a.options.multiply_keys_by_score()) k = k * scores_kv;
  }

  const auto& rq = rotary_emb.first;
  const auto& rk = rotary_emb.second;
  TORCH_CHECK(rq.defined() == rk.defined(),
              "Attention: rotary_emb needs both the query and the key frequencies, or neither");
  if (rq.defined()) {
    TORCH_CHECK((rq.dim() == 2 && rq.size(0) == n && rq.size(1) == dh) ||
                    (rq.dim() == 4 && rq.size(0) == batch && rq.size(1) == 1 && rq.size(2) == n && rq.size(3) == dh),
                "Attention: query rotary frequencies must be (", n, ", ", dh, ") or (", batch, ", 1, ", n, ", ", dh,
                "), got ", rq.sizes());
    TORCH_CHECK((rk.dim() == 2 && rk.size(0) == m && rk.size(1) == dh) ||
                    (rk.dim() == 4 && rk.size(0) == batch && rk.size(1) == 1 && rk.size(2) == m && rk.size(3) == dh) ||
                    (rk.dim() == 5 && rk.size(0) == batch && rk.size(1) == routes && rk.size(2) == 1 &&
                     rk.size(3) == m && rk.size(4) == dh),
                "Attention: key rotary frequencies must be (", m, ", ", dh, "), (", batch, ", 1, ", m, ", ", dh,
                ") or (", batch, ", ", routes, ", 1, ", m, ", ", dh, "), got ", rk.sizes());
    q = apply_rotary_pos_emb(rq, q);
    // (b, 1, m, d): the same positions for every route.
    auto rk5 = rk.dim() == 4 ? rk.unsqueeze(1) : rk;
    k = apply_rotary_pos_emb(rk5, k);
  }

  k = k.reshape({batch, h, m, dh});
  v = v.reshape({batch, h, m, dh});

  auto nk = a.null_kv[0].unsqueeze(0).unsqueeze(2).expand({batch, h, 1, dh});
  auto nv = a.null_kv[1].unsqueeze(0).unsqueeze(2).expand({batch, h, 1, dh});
  k = torch::cat({as_type(nk, k.scalar_type()), k}, -2);
  v = torch::cat({as_type(nv, v.scalar_type()), v}, -2);

  torch::Tensor mask;
  if (mask_in.defined()) {
    TORCH_CHECK(mask_in.scalar_type() == at::kBool, "Attention: mask must be a bool tensor, got ",
                mask_in.scalar_type());
    TORCH_CHECK(mask_in.device() == x.device(), "Attention: mask is on ", mask_in.device(), " but x is on ",
                x.device());
    if (mask_in.dim() == 3) {
      TORCH_CHECK(mask_in.size(0) == batch && mask_in.size(1) == routes && mask_in.size(2) == m,
                  "Attention: a 3-D mask must be (b, routes, m) = (", batch, ", ", routes, ", ", m, "), got ",
                  mask_in.sizes());
      mask = mask_in.unsqueeze(2).expand({batch, routes, heads_per_route, m}).reshape({batch, h, 1, m});
    } else {
      TORCH_CHECK(mask_in.dim() == 2 && mask_in.size(0) == batch && mask_in.size(1) == m,
                  "Attention: mask must be (b, m) = (", batch, ", ", m, ") or (b, routes, m), got ", mask_in.sizes());
      mask = mask_in.view({batch, 1, 1, m});
    }
    mask = torch::constant_pad_nd(mask, {1, 0}, 1);
  }

  // Under autocast the projections come out in the low precision while the
  // routing scores and rotary factors are float32: bring q, k, v to one dtype
  // (autocast then runs the attention in its own).
  const auto common = at::promote_types(at::promote_types(q.scalar_type(), k.scalar_type()), v.scalar_type());
  auto out = attend(as_type(q, common), as_type(k, common), as_type(v, common), mask, a.options.use_flash());
  out = out.transpose(1, 2).reshape({batch, n, h * dh});
  return a.to_out->forward(as_type(out, x.scalar_type()));
}

torch::Tensor attend_gathered(AttentionImpl& a, const torch::Tensor& x, const torch::Tensor& q_in,
                              const torch::Tensor& proj, const torch::Tensor& rows, const torch::Tensor& mask_in,
                              const torch::Tensor& scores_kv, bool index_kernel, int64_t pair_views,
                              int64_t pair_span) {
  RECORD_USER_SCOPE("colt5::heavy_attention");
  const int64_t h = a.options.heads(), dh = a.options.dim_head();
  const int64_t batch = rows.size(0), routes = rows.size(1), m = rows.size(2), hr = h / routes;
  const int64_t n = q_in.size(2), table_rows = proj.size(0);
  TORCH_CHECK(hr * routes == h && proj.dim() == 2 && proj.size(1) == hr * 2 * dh && q_in.size(0) == batch &&
                  q_in.size(1) == h && q_in.size(3) == dh,
              "Attention: gathered keys/values need proj (N, ", hr * 2 * dh, ") and q (", batch, ", ", h, ", n, ", dh,
              "), got ", proj.sizes(), " and ", q_in.sizes());
  // Route j's null row: its heads' null key and value, in proj's row layout.
  torch::Tensor nulls = torch::cat({a.null_kv[0], a.null_kv[1]}, -1).reshape({routes, hr * 2 * dh});
  if (mask_in.defined())
    TORCH_CHECK(mask_in.scalar_type() == at::kBool && mask_in.sizes() == rows.sizes(),
                "Attention: the gathered rows' mask must be bool ", rows.sizes(), ", got ", mask_in.sizes());
#ifdef COLT5_WITH_CUDA
  if (index_kernel && a.options.use_flash() && gathered_kernel_applies(q_in, proj, dh)) {
    const auto common = at::promote_types(q_in.scalar_type(), proj.scalar_type());
    const int64_t groups = batch * routes;
    torch::Tensor q = as_type(q_in.reshape({groups, hr, n, dh}), common).contiguous();
    auto none = [&](at::ScalarType t) { return torch::empty({0}, q.options().dtype(t)); };
    torch::Tensor s =
        scores_kv.defined() ? as_type(scores_kv.reshape({groups, m}), at::kFloat).contiguous() : none(at::kFloat);
    torch::Tensor mk = mask_in.defined() ? mask_in.reshape({groups, m}).contiguous() : none(at::kBool);
    torch::Tensor table = as_type(proj, common).contiguous();
    if (reinterpret_cast<uintptr_t>(table.data_ptr()) % 16 != 0) table = table.clone();  // 16-byte loads
    torch::Tensor flat_rows = as_type(rows.reshape({groups, m}), at::kLong).contiguous();
    std::vector<torch::Tensor> pairs(5, torch::empty({0}, q.options().dtype(at::kInt)));
    if (pair_views >= 2 && routes == 1 && batch % pair_views == 0 && pair_span >= m && n <= 32 &&
        common != at::kFloat && kernels::gathered_attention_pairs_supported(dh) && torch::GradMode::is_enabled() &&
        (q_in.requires_grad() || proj.requires_grad()) && gathered_pairs_enabled())
      pairs = gathered_pairs(flat_rows, mk.numel() ? mk : torch::Tensor(), pair_views, pair_span);
    torch::Tensor out = GatheredAttentionFunction::apply(q, table, as_type(nulls, at::kFloat).contiguous(), s, flat_rows,
                                                         mk, a.options.multiply_keys_by_score(), pairs[0], pairs[1],
                                                         pairs[2], pairs[3], pairs[4]);
    out = out.reshape({batch, h, n, dh}).transpose(1, 2).reshape({batch, n, h * dh});
    return a.to_out->forward(as_type(out, x.scalar_type()));
  }
#endif
  torch::Tensor table = torch::cat({proj, as_type(nulls, proj.scalar_type())}, 0);
  auto io = rows.options();
  torch::Tensor null_rows = (torch::arange(routes, io) + table_rows).view({1, routes, 1}).expand({batch, routes, 1});
  torch::Tensor flat = torch::cat({null_rows, rows}, 2).reshape({-1});
  torch::Tensor k, v;
  const bool recorded =
      torch::GradMode::is_enabled() && (table.requires_grad() || (scores_kv.defined() && scores_kv.requires_grad()));
  if (table.is_cpu() && recorded) {
    // The keys and values gathered and scaled in one pass, and their gradients
    // in two (for a forward alone the gather and the product below are no
    // slower: the time goes to first touches of the new memory).
    torch::Tensor s = scores_kv.defined()
                          ? as_type(scores_kv.reshape({batch * routes, m}), table.scalar_type()).contiguous()
                          : torch::empty({0}, table.options());
    auto kv = GatherKVFunction::apply(table.contiguous(), as_type(flat, at::kLong).contiguous(), s, batch * routes,
                                      1 + m, hr, scores_kv.defined() && a.options.multiply_keys_by_score());
    k = kv[0].transpose(1, 2);
    v = kv[1].transpose(1, 2);
  } else {
    // (batch * routes, heads / routes, 1 + m, 2 * dim_head): a view of the gathered rows.
    torch::Tensor kv = table.index_select(0, flat).view({batch * routes, 1 + m, hr, 2 * dh}).transpose(1, 2);
    auto halves = kv.chunk(2, -1);
    k = halves[0];
    v = halves[1];
    if (scores_kv.defined()) {
      torch::Tensor s = torch::constant_pad_nd(as_type(scores_kv.reshape({batch * routes, 1, m, 1}), kv.scalar_type()),
                                               {0, 0, 1, 0}, 1.0);
      v = v * s;
      if (a.options.multiply_keys_by_score()) k = k * s;
    }
  }
  torch::Tensor mask;
  if (mask_in.defined()) {
    mask = torch::constant_pad_nd(mask_in.reshape({batch * routes, 1, 1, m}), {1, 0}, 1);
  }
  torch::Tensor q = q_in.reshape({batch * routes, hr, n, dh});
  const auto common = at::promote_types(at::promote_types(q.scalar_type(), k.scalar_type()), v.scalar_type());
  auto out = attend(as_type(q, common), as_type(k, common), as_type(v, common), mask, a.options.use_flash());
  out = out.reshape({batch, h, n, dh}).transpose(1, 2).reshape({batch, n, h * dh});
  return a.to_out->forward(as_type(out, x.scalar_type()));
}

// ---------------------------------------------------------------- SelfAttention

SelfAttentionImpl::SelfAttentionImpl(const SelfAttentionOptions& options_) : options(options_) { reset(); }

void SelfAttentionImpl::reset() {
  check_heads("SelfAttention", options.dim(), options.dim_head(), options.heads());
  const int64_t hidden = options.dim_head() * options.heads();
  norm = nullptr;
  if (options.prenorm()) norm = register_module("norm", RMSNorm(RMSNormOptions(options.dim()).autocast_output(true)));
  to_qkv =
      register_module("to_qkv", torch::nn::Linear(torch::nn::LinearOptions(options.dim(), hidden * 3).bias(false)));
  to_out = register_module("to_out", torch::nn::Linear(torch::nn::LinearOptions(hidden, options.dim()).bias(false)));
}

void SelfAttentionImpl::pretty_print(std::ostream& stream) const {
  stream << "colt5::nn::SelfAttention(dim=" << options.dim() << ", dim_head=" << options.dim_head()
         << ", heads=" << options.heads() << ", prenorm=" << options.prenorm() << ")";
}

torch::Tensor SelfAttentionImpl::forward(const torch::Tensor& x_in) {
  check_floating(x_in, "SelfAttention", "x");
  TORCH_CHECK(x_in.dim() == 3 && x_in.size(2) == options.dim(), "SelfAttention: x must be (b, n, ", options.dim(),
              "), got ", x_in.sizes());
  const int64_t b = x_in.size(0), n = x_in.size(1), h = options.heads(), dh = options.dim_head();
  auto x = norm ? norm->forward(x_in) : x_in;
  auto qkv = to_qkv->forward(x).chunk(3, -1);
  auto split = [&](const torch::Tensor& t) { return t.reshape({b, n, h, dh}).transpose(1, 2); };
  auto out = attend(split(qkv[0]), split(qkv[1]), split(qkv[2]), {}, options.use_flash());
  return to_out->forward(out.transpose(1, 2).reshape({b, n, h * dh}));
}

}  // namespace nn
}  // namespace colt5
