// The routed modules on CUDA against the same modules on the CPU: the same
// tokens routed, outputs and gradients close, bf16 modules running.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "colt5/compat.h"
#include "colt5/cuda_graph.h"
#include "colt5/nn/conditional.h"
#include "support/support.h"
#include "colt5/nn/image.h"
#include "colt5/nn/local_attention.h"
#include "colt5/nn/router.h"
#include "nn/attention_core.h"
#include "nn/heavy_branch.h"

namespace {

using namespace colt5::nn;
using colt5::testing::max_rel_error;

torch::Device cuda() { return torch::Device(torch::kCUDA, 0); }

// A sorted copy of each row's indices: the routed set.
torch::Tensor routed_set(const torch::Tensor& idx) { return std::get<0>(idx.cpu().sort(-1)); }

// Routed rows [..., k, d] (or scores [..., k]) put in the order of their
// indices [..., k]: the same routed set compares equal whatever order the
// top-k gave to near-equal scores.
torch::Tensor in_index_order(const torch::Tensor& rows, const torch::Tensor& idx) {
  torch::Tensor order = std::get<1>(idx.cpu().sort(-1)).to(rows.device());
  if (rows.dim() == idx.dim()) return rows.gather(-1, order);
  return rows.gather(-2, order.unsqueeze(-1).expand(rows.sizes()));
}

// Every parameter of the CUDA copy has a gradient where the CPU float64
// module's has one, within tol (relative, in norm).
void expect_parameter_grads_close(const torch::nn::Module& cpu, const torch::nn::Module& gpu, double tol) {
  auto on_gpu = gpu.named_parameters();
  for (const auto& item : cpu.named_parameters()) {
    SCOPED_TRACE(item.key());
    const torch::Tensor& want = item.value().grad();
    const torch::Tensor& got = on_gpu[item.key()].grad();
    ASSERT_EQ(got.defined(), want.defined());
    if (want.defined()) EXPECT_LT(colt5::testing::norm_rel_error(got.to(torch::kDouble).cpu(), want), tol);
  }
}

}  // namespace

TEST(CudaModules, RouterRoutesTheSameTokensAsTheCpu) {
  torch::manual_seed(11);
  for (bool cosine : {false, true}) {
    for (int64_t routes : {1, 2}) {
      SCOPED_TRACE(std::to_string(cosine) + " routes " + std::to_string(routes));
      CoordinateDescentRouter cpu(
          CoordinateDescentRouterOptions(64).num_routing_tokens(routes).cosine_sim_routing(cosine).eps(cosine ? 1.0
                                                                                                              : 0.03));
      CoordinateDescentRouter gpu(std::dynamic_pointer_cast<CoordinateDescentRouterImpl>(cpu->clone(cuda())));
      torch::Tensor x = torch::randn({3, 4096, 64});
      torch::Tensor mask = torch::rand({3, 4096}) > 0.1;
      auto a = cpu->forward(x, 256, mask);
      auto b = gpu->forward(x.to(cuda()), 256, mask.to(cuda()));
      EXPECT_TRUE(torch::equal(routed_set(a.indices), routed_set(b.indices)));
      EXPECT_LT(
          max_rel_error(in_index_order(b.routed_tokens, b.indices).cpu(), in_index_order(a.routed_tokens, a.indices)),
          1e-6);
      EXPECT_LT(max_rel_error(in_index_order(b.scores, b.indices).cpu(), in_index_order(a.scores, a.indices)), 1e-3);
    }
  }
}

// Routing scores on CUDA (one read of x by the routing-scores kernel, and its
// backward) against the float64 router on the CPU: the same tokens, scores and
// gradients for x and the routing tokens; dot-product and cosine routing,
// float32 and bfloat16 inputs, one and two routing tokens, a ragged width (the
// kernel's unvectorized path; the backward's composite), widths whose pieces
// fill a block partly (1032) and twice (4104, float32) in the backward kernel,
// and a mask.
TEST(CudaModules, RouterGradientsMatchTheCpuFloat64) {
  torch::manual_seed(18);
  for (int64_t dim : {64, 37, 1032, 4104}) {
    for (bool cosine : {false, true}) {
      for (int64_t routes : {1, 2}) {
        for (auto dtype : {torch::kFloat, torch::kBFloat16}) {
          SCOPED_TRACE("dim " + std::to_string(dim) + " cosine " + std::to_string(cosine) + " routes " +
                       std::to_string(routes) + " " + c10::toString(dtype));
          CoordinateDescentRouter ref(
              CoordinateDescentRouterOptions(dim).num_routing_tokens(routes).cosine_sim_routing(cosine).eps(1.0));
          auto gpu = std::dynamic_pointer_cast<CoordinateDescentRouterImpl>(ref->clone(cuda()));
          gpu->to(dtype);
          ref->to(torch::kDouble);
          // bf16 routing: the reference sees the same rounded inputs and tokens.
          torch::Tensor x = torch::randn({2, 2048, dim}).to(dtype).to(torch::kDouble);
          ref->routing_token.set_data(gpu->routing_token.detach().cpu().to(torch::kDouble));
          torch::Tensor mask = torch::rand({2, 2048}) > 0.1;
          torch::Tensor x64 = x.clone().requires_grad_(true);
          torch::Tensor xd = x.to(cuda(), dtype).requires_grad_(true);
          auto a = ref->forward(x64, 128, mask);
          auto b = gpu->forward(xd, 128, mask.to(cuda()));
          ASSERT_TRUE(torch::equal(routed_set(a.indices), routed_set(b.indices)));
          // An order-free loss: each routed token's score times a weight of its position.
          std::vector<int64_t> wshape = a.indices.sizes().vec();
          wshape.back() = 2048;
          torch::Tensor w = torch::randn(wshape, torch::kDouble);
          ((a.scores * w.gather(-1, a.indices)).sum() + a.routed_tokens.sum()).backward();
          torch::Tensor wd = w.to(cuda(), torch::kFloat);
          ((b.scores.to(torch::kFloat) * wd.gather(-1, b.indices)).sum() + b.routed_tokens.to(torch::kFloat).sum())
              .backward();
          const double tol = dtype == torch::kFloat ? 1e-3 : 2e-2;
          EXPECT_LT(max_rel_error(b.scores.to(torch::kDouble).cpu(), a.scores), tol);
          EXPECT_LT(colt5::testing::norm_rel_error(xd.grad().to(torch::kDouble).cpu(), x64.grad()), tol);
          EXPECT_LT(colt5::testing::norm_rel_error(gpu->routing_token.grad().to(torch::kDouble).cpu(),
                                                   ref->routing_token.grad()),
                    tol);
        }
      }
    }
  }
}

// The autoregressive module's heavy attention reads its keys/values by index
// from the table of projected rows (one kernel, forward and backward) on CUDA.
// Against the gathered math on the CPU in float64: outputs and the gradients
// of the queries, the table, the scores, the null key/value and the output
// projection; head widths 16, 32, 64 and 128, one and two routes, one query
// tile and a ragged second one, one key tile and many (1000 rows), scores on
// the values only and on the keys too, a mask, rows shared between groups;
// float32 (CUDA cores), bfloat16 and float16 (tensor cores: the register-tile
// kernels for widths 32, 64 and 128, their backward up to 32 queries, the WMMA
// kernels otherwise).
TEST(CudaModules, GatheredAttentionKernelMatchesTheCpuFloat64) {
  torch::manual_seed(21);
  struct Case {
    int64_t dh, routes, n, m;
    bool keys_scaled, masked;
  };
  const Case cases[] = {{64, 2, 32, 100, false, true},  {16, 1, 40, 70, true, true},  {128, 2, 5, 33, true, false},
                        {64, 1, 1, 1, false, false},    {32, 2, 70, 64, false, true}, {64, 1, 32, 1000, true, true},
                        {128, 1, 17, 130, false, true}, {32, 2, 32, 64, true, false}};
  for (const Case& c : cases) {
    for (auto dtype : {torch::kFloat, torch::kBFloat16, torch::kHalf}) {
      SCOPED_TRACE("dh " + std::to_string(c.dh) + " routes " + std::to_string(c.routes) + " n " + std::to_string(c.n) +
                   " m " + std::to_string(c.m) + " keys_scaled " + std::to_string(c.keys_scaled) + " " +
                   c10::toString(dtype));
      const int64_t heads = 2 * c.routes, dim = 48, batch = 3, table_rows = 50 * c.routes;
      Attention ref(
          AttentionOptions(dim).dim_head(c.dh).heads(heads).multiply_keys_by_score(c.keys_scaled).use_flash(true));
      ref->to(torch::kDouble);
      auto gpu = std::dynamic_pointer_cast<AttentionImpl>(ref->clone(cuda()));
      gpu->to(dtype);
      for (auto& p : ref->parameters()) p.set_data(p.detach().to(dtype).to(torch::kDouble));
      const int64_t width = heads / c.routes * 2 * c.dh;
      torch::Tensor x = torch::randn({batch, c.n, dim}).to(dtype).to(torch::kDouble);
      torch::Tensor q = torch::randn({batch, heads, c.n, c.dh}).to(dtype).to(torch::kDouble);
      torch::Tensor proj = torch::randn({table_rows, width}).to(dtype).to(torch::kDouble);
      torch::Tensor rows = torch::randint(table_rows, {batch, c.routes, c.m}, torch::kLong);
      torch::Tensor scores = torch::rand({batch, c.routes, c.m}, torch::kDouble);
      torch::Tensor mask = c.masked ? torch::rand({batch, c.routes, c.m}) > 0.3 : torch::Tensor();
      auto leaf = [](const torch::Tensor& t) { return t.clone().requires_grad_(true); };
      auto leaf_on = [&](const torch::Tensor& t) {
        return t.to(cuda(), t.scalar_type() == torch::kDouble ? dtype : t.scalar_type()).requires_grad_(true);
      };
      torch::Tensor q64 = leaf(q), p64 = leaf(proj), s64 = leaf(scores);
      torch::Tensor qd = leaf_on(q), pd = leaf_on(proj), sd = scores.to(cuda(), torch::kFloat).requires_grad_(true);
      torch::Tensor a = attend_gathered(*ref, x, q64, p64, rows, mask, s64);
      torch::Tensor b = attend_gathered(*gpu, x.to(cuda(), dtype), qd, pd, rows.to(cuda()),
                                        mask.defined() ? mask.to(cuda()) : mask, sd);
      torch::Tensor w = torch::randn(a.sizes(), torch::kDouble);
      (a * w).sum().backward();
      (b.to(torch::kFloat) * w.to(cuda(), torch::kFloat)).sum().backward();
      const double tol = dtype == torch::kFloat ? 1e-4 : 2e-2;
      auto err = [](const torch::Tensor& got, const torch::Tensor& want) {
        return colt5::testing::norm_rel_error(got.detach().to(torch::kDouble).cpu(), want.detach());
      };
      EXPECT_LT(err(b, a), tol);
      EXPECT_LT(err(qd.grad(), q64.grad()), tol);
      EXPECT_LT(err(pd.grad(), p64.grad()), tol);
      EXPECT_LT(err(sd.grad(), s64.grad()), tol);
      EXPECT_LT(err(gpu->null_kv.grad(), ref->null_kv.grad()), tol);
      EXPECT_LT(err(gpu->to_out->weight.grad(), ref->to_out->weight.grad()), tol);
      // The same module's gathered path (index_kernel off) agrees with the kernel.
      torch::Tensor g = attend_gathered(*gpu, x.to(cuda(), dtype), qd.detach(), pd.detach(), rows.to(cuda()),
                                        mask.defined() ? mask.to(cuda()) : mask, sd.detach(), false);
      EXPECT_LT(err(g, a), dtype == torch::kFloat ? 1e-4 : 3e-2);
    }
  }
}

// The backward in pairs of consecutive views (attend_gathered's pair_views:
// the autoregressive module's windows) against float64 on the CPU and against
// the same kernels one group at a time: views of one context row whose key
// sets overlap (each shifted by an eighth of its keys, in its own order), an
// odd view count (the last alone), masks, keys scaled or not, one tile or many.
TEST(CudaModules, GatheredAttentionPairsMatchTheCpuFloat64) {
  torch::manual_seed(22);
  struct Case {
    int64_t dh, n, m, span, views;
    bool keys_scaled, masked;
  };
  const Case cases[] = {{64, 32, 100, 300, 5, false, true},
                        {64, 17, 1000, 1300, 4, true, true},
                        {32, 32, 64, 80, 3, true, false},
                        {64, 1, 200, 260, 2, false, false}};
  for (const Case& c : cases) {
    for (auto dtype : {torch::kBFloat16, torch::kHalf}) {
      SCOPED_TRACE("dh " + std::to_string(c.dh) + " n " + std::to_string(c.n) + " m " + std::to_string(c.m) +
                   " views " + std::to_string(c.views) + " keys_scaled " + std::to_string(c.keys_scaled) + " " +
                   c10::toString(dtype));
      const int64_t heads = 2, dim = 48, ctx_rows = 2, batch = ctx_rows * c.views;
      Attention ref(
          AttentionOptions(dim).dim_head(c.dh).heads(heads).multiply_keys_by_score(c.keys_scaled).use_flash(true));
      ref->to(torch::kDouble);
      auto gpu = std::dynamic_pointer_cast<AttentionImpl>(ref->clone(cuda()));
      gpu->to(dtype);
      for (auto& p : ref->parameters()) p.set_data(p.detach().to(dtype).to(torch::kDouble));
      const int64_t width = heads * 2 * c.dh;
      // View v of a context row: m positions of a shuffled span from v * m / 8 on
      // (cyclically), in an order of its own.
      std::vector<torch::Tensor> sets;
      for (int64_t r = 0; r < ctx_rows; ++r) {
        torch::Tensor perm = torch::randperm(c.span, torch::kLong);
        for (int64_t v = 0; v < c.views; ++v) {
          torch::Tensor idx = (torch::arange(c.m, torch::kLong) + v * (c.m / 8)).remainder(c.span);
          torch::Tensor pos = perm.index_select(0, idx);
          sets.push_back(pos.index_select(0, torch::randperm(c.m, torch::kLong)) + r * c.span);
        }
      }
      torch::Tensor rows = torch::stack(sets).view({batch, 1, c.m});
      torch::Tensor x = torch::randn({batch, c.n, dim}).to(dtype).to(torch::kDouble);
      torch::Tensor q = torch::randn({batch, heads, c.n, c.dh}).to(dtype).to(torch::kDouble);
      torch::Tensor proj = torch::randn({ctx_rows * c.span, width}).to(dtype).to(torch::kDouble);
      torch::Tensor scores = torch::rand({batch, 1, c.m}, torch::kDouble);
      torch::Tensor mask = c.masked ? torch::rand({batch, 1, c.m}) > 0.3 : torch::Tensor();
      torch::Tensor q64 = q.clone().requires_grad_(true), p64 = proj.clone().requires_grad_(true),
                    s64 = scores.clone().requires_grad_(true);
      torch::Tensor a = attend_gathered(*ref, x, q64, p64, rows, mask, s64);
      torch::Tensor w = torch::randn(a.sizes(), torch::kDouble);
      (a * w).sum().backward();
      auto err = [](const torch::Tensor& got, const torch::Tensor& want) {
        return colt5::testing::norm_rel_error(got.detach().to(torch::kDouble).cpu(), want.detach().cpu());
      };
      torch::Tensor grads[2][4];
      for (int64_t pair_views : {c.views, int64_t{0}}) {
        gpu->zero_grad();
        torch::Tensor qd = q.to(cuda(), dtype).requires_grad_(true), pd = proj.to(cuda(), dtype).requires_grad_(true);
        torch::Tensor sd = scores.to(cuda(), torch::kFloat).requires_grad_(true);
        torch::Tensor b = attend_gathered(*gpu, x.to(cuda(), dtype), qd, pd, rows.to(cuda()),
                                          mask.defined() ? mask.to(cuda()) : mask, sd, true, pair_views, c.span);
        (b.to(torch::kFloat) * w.to(cuda(), torch::kFloat)).sum().backward();
        EXPECT_LT(err(b, a), 2e-2);
        EXPECT_LT(err(qd.grad(), q64.grad()), 2e-2);
        EXPECT_LT(err(pd.grad(), p64.grad()), 2e-2);
        EXPECT_LT(err(sd.grad(), s64.grad()), 2e-2);
        EXPECT_LT(err(gpu->null_kv.grad(), ref->null_kv.grad()), 2e-2);
        const int i = pair_views ? 0 : 1;
        grads[i][0] = qd.grad();
        grads[i][1] = pd.grad();
        grads[i][2] = sd.grad();
        grads[i][3] = gpu->null_kv.grad().clone();
      }
      // In pairs and one group at a time: the same sums in another order.
      for (int k = 0; k < 4; ++k) EXPECT_LT(err(grads[0][k], grads[1][k].to(torch::kDouble)), 5e-3) << "gradient " << k;
    }
  }
}

// RMSNorm's CUDA kernels (float32, float16, bfloat16 rows up to 2048 wide;
// gamma float32 or of x's type) against the CPU composite in float64, forward
// and both gradients, with a zero row, widths that are not multiples of 32
// (100 and 1000: runs of four columns, the last partly past the row's end;
// 7: single columns), rows not 16-byte aligned (single columns), a width past
// the kernel's (the composite runs) and no rows at all.
// The routed rows' sum on its CUDA kernels (add_scaled_rows) against the
// same sum in float64 on the CPU from the same (rounded) inputs: the value
// and the gradients of the sum, the rows, their scores and the bias, for
// each pairing of the sum's and the rows' types, widths that are and are not
// multiples of 32, with and without lead rows, scale and bias.
TEST(CudaModules, ScatterRowsKernelsMatchTheCpuFloat64) {
  torch::manual_seed(17);
  struct Case {
    torch::ScalarType out_t, src_t;
    bool scaled, biased;
    int64_t lead, d;
  };
  const Case cases[] = {{torch::kFloat, torch::kBFloat16, true, true, 16, 512},
                        {torch::kFloat, torch::kFloat, true, false, 0, 64},
                        {torch::kBFloat16, torch::kBFloat16, false, true, 8, 96},
                        {torch::kHalf, torch::kFloat, true, true, 0, 40},
                        {torch::kFloat, torch::kHalf, true, true, 1, 33},
                        {torch::kBFloat16, torch::kFloat, true, false, 0, 1000}};
  const int64_t b = 3, n = 300, k = 50;
  for (const Case& c : cases) {
    SCOPED_TRACE(std::string(c10::toString(c.out_t)) + " sum, " + c10::toString(c.src_t) + " rows, d " +
                 std::to_string(c.d) + " lead " + std::to_string(c.lead) + " scaled " + std::to_string(c.scaled) +
                 " bias " + std::to_string(c.biased));
    std::vector<torch::Tensor> idx_rows;
    for (int64_t i = 0; i < b; ++i)
      idx_rows.push_back(torch::randperm(n - c.lead, torch::kLong).narrow(0, 0, k) + c.lead);
    torch::Tensor idx = torch::stack(idx_rows);
    auto on = [&](torch::ScalarType t) { return torch::TensorOptions().dtype(t).device(cuda()); };
    torch::Tensor base = torch::randn({b, n, c.d}, on(c.out_t)).requires_grad_(true);
    torch::Tensor src = torch::randn({b, k, c.d}, on(c.src_t)).requires_grad_(true);
    torch::Tensor scale = c.scaled ? torch::rand({b, k}, on(torch::kFloat)).requires_grad_(true) : torch::Tensor();
    torch::Tensor bias = c.biased ? torch::randn({c.d}, on(torch::kFloat)).requires_grad_(true) : torch::Tensor();
    torch::Tensor gy = torch::randn({b, n, c.d}, on(c.out_t));
    torch::Tensor y = add_scaled_rows(base.clone(), idx.to(cuda()), src, scale, bias, c.lead);
    std::vector<torch::Tensor> params = {base, src};
    if (c.scaled) params.push_back(scale);
    if (c.biased) params.push_back(bias);
    auto got = torch::autograd::grad({(y.to(torch::kFloat) * gy.to(torch::kFloat)).sum()}, params);

    // float64 on the CPU from the same values.
    std::vector<torch::Tensor> ref;
    for (const auto& t : params) ref.push_back(t.detach().cpu().to(torch::kDouble).requires_grad_(true));
    torch::Tensor y64 = add_scaled_rows(ref[0].clone(), idx, ref[1], c.scaled ? ref[2] : torch::Tensor(),
                                        c.biased ? ref.back() : torch::Tensor(), c.lead);
    auto want = torch::autograd::grad({(y64 * gy.cpu().to(torch::kDouble)).sum()}, ref);
    auto tol = [](torch::ScalarType t) { return t == torch::kFloat ? 1e-5 : t == torch::kHalf ? 2e-3 : 1e-2; };
    EXPECT_LT(max_rel_error(y.detach(), y64.detach()), tol(c.out_t));
    EXPECT_TRUE(torch::equal(got[0].cpu(), gy.cpu())) << "the sum's gradient passes through";
    EXPECT_LT(max_rel_error(got[1], want[1]), tol(c.src_t)) << "rows";
    for (size_t i = 2; i < params.size(); ++i)
      EXPECT_LT(colt5::testing::norm_rel_error(got[i], want[i]), c.out_t == torch::kFloat ? 1e-5 : 1e-2) << i;
  }
}

// residual_add (a float32 stream plus a 16-bit branch output) against
// LibTorch's addition: the sum and both gradients bit for bit, bf16 and f16,
// sizes that are not whole 8-element pieces and views whose data is not
// 16-byte aligned (the element-by-element path); other types fall back.
TEST(CudaModules, ResidualAddMatchesLibTorch) {
  torch::manual_seed(45);
  for (auto dt : {torch::kBFloat16, torch::kHalf}) {
    for (int64_t count : {1, 7, 8, 4099, 65536}) {
      for (bool offset : {false, true}) {
        SCOPED_TRACE(std::string(c10::toString(dt)) + " count " + std::to_string(count) + " offset " +
                     std::to_string(offset));
        auto f32 = torch::TensorOptions(cuda());
        torch::Tensor xs = torch::randn({count + 1}, f32), ys = torch::randn({count + 1}, f32.dtype(dt));
        torch::Tensor x0 = xs.narrow(0, offset ? 1 : 0, count).view({1, count}).detach().requires_grad_(true);
        torch::Tensor y0 = ys.narrow(0, offset ? 1 : 0, count).view({1, count}).detach().requires_grad_(true);
        torch::Tensor x1 = x0.detach().clone().requires_grad_(true), y1 = y0.detach().clone().requires_grad_(true);
        torch::Tensor got = colt5::nn::residual_add(x0, y0), want = torch::add(x1, y1);
        EXPECT_EQ(got.scalar_type(), torch::kFloat);
        EXPECT_TRUE(torch::equal(got, want));
        torch::Tensor g = torch::randn_like(want);
        got.backward(g);
        want.backward(g);
        EXPECT_TRUE(torch::equal(x0.grad(), x1.grad()));
        EXPECT_EQ(y0.grad().scalar_type(), dt);
        EXPECT_TRUE(torch::equal(y0.grad(), y1.grad()));
      }
    }
  }
  torch::Tensor a = torch::randn({3, 5}, torch::TensorOptions(cuda()));
  EXPECT_TRUE(torch::equal(colt5::nn::residual_add(a, a), a + a));
}

TEST(CudaModules, RMSNormKernelMatchesTheCpuFloat64) {
  torch::manual_seed(23);
  struct Case {
    int64_t d;
    torch::Dtype x, gamma;
  };
  const Case cases[] = {{512, torch::kFloat, torch::kFloat},       {100, torch::kFloat, torch::kFloat},
                        {2048, torch::kFloat, torch::kFloat},      {3000, torch::kFloat, torch::kFloat},
                        {512, torch::kBFloat16, torch::kFloat},    {7, torch::kHalf, torch::kFloat},
                        {512, torch::kBFloat16, torch::kBFloat16}, {1000, torch::kHalf, torch::kHalf}};
  for (const Case& c : cases) {
    for (int64_t rows : {0, 37, 1000}) {
      SCOPED_TRACE("d " + std::to_string(c.d) + " rows " + std::to_string(rows) + " x " + c10::toString(c.x) +
                   " gamma " + c10::toString(c.gamma));
      RMSNorm ref(c.d), gpu(RMSNormOptions(c.d).cuda_kernel(true));
      torch::Tensor gamma = torch::randn({c.d}).to(c.gamma).to(torch::kDouble);
      {
        torch::NoGradGuard no_grad;
        ref->to(torch::kDouble);
        ref->gamma.copy_(gamma);
        gpu->to(cuda(), c.gamma);
        gpu->gamma.copy_(gamma);
      }
      torch::Tensor x = (torch::randn({rows, c.d}) * 3).to(c.x).to(torch::kDouble);
      // A zero row (float32 only: its gradient, f * gamma * dy with f = sqrt(d) / 1e-12, overflows 16-bit types).
      const bool zero_row = rows > 1 && c.x == torch::kFloat;
      if (zero_row) x[1].zero_();
      torch::Tensor gy = torch::randn({rows, c.d}, torch::kDouble);
      torch::Tensor x64 = x.clone().requires_grad_(true), xd = x.to(cuda(), c.x).requires_grad_(true);
      torch::Tensor a = ref->forward(x64), b = gpu->forward(xd);
      EXPECT_EQ(b.scalar_type(), at::promote_types(c.x, c.gamma));
      ASSERT_EQ(b.sizes(), a.sizes());
      (a * gy).sum().backward();
      (b * gy.to(cuda(), b.scalar_type())).sum().backward();
      const double tol = c.x == torch::kFloat ? 1e-5 : 1e-2;
      auto err = [](const torch::Tensor& got, const torch::Tensor& want) {
        return colt5::testing::norm_rel_error(got.detach().to(torch::kDouble).cpu(), want.detach());
      };
      EXPECT_LT(err(b, a), tol);
      if (zero_row) {
        // Row by row: the zero row's gradient is 1e13 times the others'.
        EXPECT_LT(err(xd.grad()[1], x64.grad()[1]), tol);
        EXPECT_LT(err(xd.grad()[0], x64.grad()[0]), tol);
        EXPECT_LT(err(xd.grad().slice(0, 2), x64.grad().slice(0, 2)), tol);
      } else {
        EXPECT_LT(err(xd.grad(), x64.grad()), tol);
      }
      EXPECT_LT(err(gpu->gamma.grad(), ref->gamma.grad()), tol);
      EXPECT_TRUE(torch::isfinite(xd.grad()).all().item<bool>());
      // The composite on the same GPU (cuda_kernel off) agrees with the kernel.
      RMSNorm composite(RMSNormOptions(c.d).cuda_kernel(false));
      {
        torch::NoGradGuard no_grad;
        composite->to(cuda(), c.gamma);
        composite->gamma.copy_(gamma);
      }
      EXPECT_LT(err(composite->forward(xd.detach()), b.detach().to(torch::kDouble).cpu()), tol);
      if (rows == 37 && c.d == 512) {
        // x one element into its storage (contiguous, not 16-byte aligned):
        // the kernels take single columns rather than runs of four.
        torch::Tensor store = torch::zeros({rows * c.d + 1}, xd.options());
        {
          torch::NoGradGuard no_grad;
          store.narrow(0, 1, rows * c.d).copy_(xd.detach().reshape({-1}));
        }
        store.requires_grad_(true);
        torch::Tensor xo = store.narrow(0, 1, rows * c.d).view({rows, c.d});
        ASSERT_NE(reinterpret_cast<uintptr_t>(xo.data_ptr()) % 16, 0u);
        gpu->zero_grad();
        torch::Tensor bo = gpu->forward(xo);
        (bo * gy.to(cuda(), bo.scalar_type())).sum().backward();
        EXPECT_LT(err(bo, a), tol);
        const torch::Tensor go = store.grad().narrow(0, 1, rows * c.d).view({rows, c.d});
        if (zero_row) {
          EXPECT_LT(err(go[0], x64.grad()[0]), tol);
          EXPECT_LT(err(go.slice(0, 2), x64.grad().slice(0, 2)), tol);
        } else {
          EXPECT_LT(err(go, x64.grad()), tol);
        }
        EXPECT_LT(err(gpu->gamma.grad(), ref->gamma.grad()), tol);
      }
    }
  }
}

namespace {

// A CUDA autocast region in dt while alive (when on), the earlier state after.
struct Region {
  bool enabled;
  at::ScalarType dtype;
  explicit Region(at::ScalarType dt, bool on = true)
      : enabled(colt5::compat::autocast_enabled(at::kCUDA)), dtype(colt5::compat::autocast_dtype(at::kCUDA)) {
    if (on) colt5::compat::set_autocast(at::kCUDA, true, dt);
  }
  ~Region() {
    colt5::compat::set_autocast(at::kCUDA, enabled, dtype);
    at::autocast::clear_cache();
  }
};

}  // namespace

// FeedForward on CUDA (its linears' bias gradients by a product with a row of
// ones in 16-bit types, by the sum otherwise) against float64 on the CPU:
// bfloat16 and float16 modules, float32 under bf16 autocast and float32 alone,
// 3-D and 2-D inputs, every parameter's gradient and x's; its output can be
// modified in place (it is no view of the function that carries the bias's
// gradient).
TEST(CudaModules, FeedForwardBiasGradientsMatchTheCpuFloat64) {
  torch::manual_seed(41);
  for (int kind : {0, 1, 2, 3}) {  // bf16 module, f16 module, float32 under bf16 autocast, float32
    for (bool three_d : {true, false}) {
      SCOPED_TRACE("kind " + std::to_string(kind) + (three_d ? " 3-D" : " 2-D"));
      FeedForward ref(FeedForwardOptions(64).mult(2));
      ref->to(torch::kDouble);
      FeedForward gpu(std::dynamic_pointer_cast<FeedForwardImpl>(ref->clone(cuda())));
      const torch::Dtype dt = kind == 0 ? torch::kBFloat16 : kind == 1 ? torch::kHalf : torch::kFloat;
      gpu->to(dt);
      {
        // The reference takes the GPU module's (rounded) parameters.
        torch::NoGradGuard no_grad;
        auto from = gpu->named_parameters();
        for (auto& p : ref->named_parameters()) p.value().copy_(from[p.key()].to(torch::kDouble).cpu());
      }
      torch::Tensor x = three_d ? torch::randn({3, 129, 64}) : torch::randn({300, 64});
      x = x.to(dt).to(torch::kDouble);
      torch::Tensor gy = torch::randn(x.sizes(), torch::kDouble);
      torch::Tensor x64 = x.clone().requires_grad_(true), xd = x.to(cuda(), dt).requires_grad_(true);
      (ref->forward(x64) * gy).sum().backward();
      torch::Tensor out;
      {
        Region region(at::kBFloat16, kind == 2);
        out = gpu->forward(xd);
      }
      out.mul_(1.0);  // in place on the output: allowed
      (out * gy.to(cuda(), out.scalar_type())).sum().backward();
      const double tol = kind == 3 ? 1e-4 : 3e-2;
      EXPECT_LT(max_rel_error(xd.grad().to(torch::kDouble).cpu(), x64.grad()), tol);
      auto ref_params = ref->named_parameters();
      for (const auto& p : gpu->named_parameters()) {
        SCOPED_TRACE(p.key());
        ASSERT_TRUE(p.value().grad().defined());
        EXPECT_EQ(p.value().grad().scalar_type(), p.value().scalar_type());
        EXPECT_LT(max_rel_error(p.value().grad().to(torch::kDouble).cpu(), ref_params[p.key()].grad()), tol);
      }
    }
  }
}

// Under autocast, a norm that feeds a matrix product (autocast_output: the
// norms of FeedForward, Attention and SelfAttention) returns the region's
// 16-bit dtype: exactly the float32 output cast as the product would cast it,
// and from a 16-bit gradient exactly the gradients that flow back through that
// cast. Kernel and composite; float32 and bfloat16 x (gamma float32); bf16
// and f16 regions; a width past the kernel's.
TEST(CudaModules, RMSNormAutocastOutputIsTheCastFloat32Output) {
  torch::manual_seed(29);
  for (const bool kernel : {true, false}) {
    for (const torch::Dtype region : {torch::kBFloat16, torch::kHalf}) {
      for (const torch::Dtype xt : {torch::kFloat, torch::kBFloat16}) {
        for (const int64_t d : {512, 100, 3000}) {
          SCOPED_TRACE(std::string(kernel ? "kernel" : "composite") + " region " + c10::toString(region) + " x " +
                       c10::toString(xt) + " d " + std::to_string(d));
          RMSNorm cast(RMSNormOptions(d).cuda_kernel(kernel).autocast_output(true));
          RMSNorm plain(RMSNormOptions(d).cuda_kernel(kernel));
          torch::Tensor gamma = torch::randn({d}, cuda());
          {
            torch::NoGradGuard no_grad;
            cast->to(cuda());
            plain->to(cuda());
            cast->gamma.copy_(gamma);
            plain->gamma.copy_(gamma);
          }
          torch::Tensor x = (torch::randn({3, 77, d}, cuda()) * 3).to(xt);
          torch::Tensor gy = torch::randn({3, 77, d}, cuda()).to(region);
          torch::Tensor xa = x.clone().requires_grad_(true), xb = x.clone().requires_grad_(true);
          torch::Tensor a, b;
          {
            Region on(region);
            a = cast->forward(xa);
            b = plain->forward(xb);
          }
          // (bf16 x under an f16 region: the composite, as the kernel writes 16-bit rows only in x's type.)
          EXPECT_EQ(a.scalar_type(), region);
          EXPECT_EQ(b.scalar_type(), torch::kFloat);
          torch::Tensor b16 = b.to(a.scalar_type());
          a.backward(gy.to(a.scalar_type()));
          b16.backward(gy.to(a.scalar_type()));
          if (kernel && xt != torch::kFloat && xt != region) {
            // The kernel writes 16-bit rows only in x's type: the cast output
            // comes from the composite, the float32 one from the kernel, the
            // same to float32 rounding before the 16-bit one.
            EXPECT_LT(max_rel_error(a.to(torch::kFloat), b16.to(torch::kFloat)), 2e-3);
            EXPECT_LT(max_rel_error(xa.grad().to(torch::kFloat), xb.grad().to(torch::kFloat)), 2e-2);
            continue;
          }
          EXPECT_TRUE(torch::equal(a, b16));
          EXPECT_TRUE(torch::equal(xa.grad(), xb.grad()));
          EXPECT_TRUE(torch::equal(cast->gamma.grad(), plain->gamma.grad()));
        }
      }
    }
  }
  // Outside an autocast region the option changes nothing.
  RMSNorm cast(RMSNormOptions(64).autocast_output(true));
  cast->to(cuda());
  EXPECT_EQ(cast->forward(torch::randn({4, 64}, cuda())).scalar_type(), torch::kFloat);
}

// colt5::nn::layer_norm's CUDA kernels against torch::nn::LayerNorm in float64
// on the CPU: forward, the input, weight and bias gradients; float32, bf16 and
// f16 rows, weight float32 or of x's type, widths not multiples of 32, a width
// past the kernel's (torch::layer_norm runs), no rows; and under bf16 autocast
// with autocast_output the bf16 output and the gradients through it.
TEST(CudaModules, LayerNormKernelMatchesTheCpuFloat64) {
  torch::manual_seed(31);
  struct Case {
    int64_t d;
    torch::Dtype x, w;
  };
  const Case cases[] = {{512, torch::kFloat, torch::kFloat},       {100, torch::kFloat, torch::kFloat},
                        {2048, torch::kFloat, torch::kFloat},      {3000, torch::kFloat, torch::kFloat},
                        {512, torch::kBFloat16, torch::kFloat},    {7, torch::kHalf, torch::kFloat},
                        {512, torch::kBFloat16, torch::kBFloat16}, {1000, torch::kHalf, torch::kHalf}};
  auto err = [](const torch::Tensor& got, const torch::Tensor& want) {
    return colt5::testing::norm_rel_error(got.detach().to(torch::kDouble).cpu(), want.detach());
  };
  for (const Case& c : cases) {
    for (int64_t rows : {0, 37, 1000}) {
      for (const bool autocast : {false, true}) {
        if (autocast && c.x != torch::kFloat) continue;
        SCOPED_TRACE("d " + std::to_string(c.d) + " rows " + std::to_string(rows) + " x " + c10::toString(c.x) +
                     " weight " + c10::toString(c.w) + (autocast ? " under bf16 autocast" : ""));
        torch::nn::LayerNorm ref(torch::nn::LayerNormOptions({c.d}));
        torch::Tensor w = (torch::randn({c.d}) + 1).to(c.w).to(torch::kDouble);
        torch::Tensor bias = torch::randn({c.d}).to(c.w).to(torch::kDouble);
        {
          torch::NoGradGuard no_grad;
          ref->to(torch::kDouble);
          ref->weight.copy_(w);
          ref->bias.copy_(bias);
        }
        torch::Tensor wd = w.to(cuda(), c.w).requires_grad_(true), bd = bias.to(cuda(), c.w).requires_grad_(true);
        // Rows with an offset (the mean matters) and a constant row (zero variance).
        torch::Tensor x = (torch::randn({rows, c.d}) * 3 + 2).to(c.x).to(torch::kDouble);
        if (rows > 1) x[1].fill_(0.5);
        torch::Tensor gy = torch::randn({rows, c.d}, torch::kDouble);
        torch::Tensor x64 = x.clone().requires_grad_(true), xd = x.to(cuda(), c.x).requires_grad_(true);
        torch::Tensor a = ref->forward(x64), b;
        {
          Region on(torch::kBFloat16, autocast);
          b = colt5::nn::layer_norm(xd, wd, bd, 1e-5, /*autocast_output=*/true, /*cuda_kernel=*/true);
        }
        EXPECT_EQ(b.scalar_type(), autocast ? torch::kBFloat16 : at::promote_types(c.x, c.w));
        ASSERT_EQ(b.sizes(), a.sizes());
        (a * gy).sum().backward();
        (b * gy.to(cuda(), b.scalar_type())).sum().backward();
        const double tol = c.x == torch::kFloat && !autocast ? 1e-5 : 1e-2;
        EXPECT_LT(err(b, a), tol);
        EXPECT_LT(err(xd.grad(), x64.grad()), tol);
        EXPECT_LT(err(wd.grad(), ref->weight.grad()), tol);
        EXPECT_LT(err(bd.grad(), ref->bias.grad()), tol);
        EXPECT_TRUE(torch::isfinite(xd.grad()).all().item<bool>());
      }
    }
  }
}

// x passed on by the norms' and the routing scores' nodes (RMSNorm::
// forward_passing, layer_norm's x_passed, RouterOutput::x_passed), its
// gradient added inside their backward kernels: x's gradient against float64
// on the CPU with x used directly, where the passed x's gradient is a dense
// tensor, a sum's expanded one, or none; float32 and bfloat16, widths that
// take runs of four columns and single ones. A router fed by a norm's passed x
// hands the scores' part of x's gradient to the norm's kernel: x's and the
// routing token's gradients against the composite.
TEST(CudaModules, PassedOnInputsAddTheirGradientInTheBackwardKernels) {
  torch::manual_seed(43);
  auto err = [](const torch::Tensor& got, const torch::Tensor& want) {
    return colt5::testing::norm_rel_error(got.detach().to(torch::kDouble).cpu(), want.detach());
  };
  for (const auto dtype : {torch::kFloat, torch::kBFloat16}) {
    for (const int64_t d : {512, 7}) {
      RMSNorm rms_ref(d), rms(RMSNormOptions(d).cuda_kernel(true));
      torch::Tensor gamma = torch::randn({d}).to(torch::kDouble), w = torch::randn({d}).to(torch::kDouble),
                    bias = torch::randn({d}).to(torch::kDouble);
      CoordinateDescentRouter router_ref(CoordinateDescentRouterOptions(d).eps(1.0));
      auto router = std::dynamic_pointer_cast<CoordinateDescentRouterImpl>(router_ref->clone(cuda()));
      {
        torch::NoGradGuard no_grad;
        rms_ref->to(torch::kDouble);
        rms_ref->gamma.copy_(gamma);
        rms->to(cuda(), dtype);
        rms->gamma.copy_(gamma);
        router->to(dtype);
        router_ref->to(torch::kDouble);
        router_ref->routing_token.copy_(router->routing_token.detach().cpu().to(torch::kDouble));
      }
      torch::Tensor wd = w.to(cuda(), dtype), bd = bias.to(cuda(), dtype);
      torch::Tensor x = torch::randn({2, 300, d}).to(dtype).to(torch::kDouble);
      torch::Tensor gy = torch::randn({2, 364, d}, torch::kDouble), gp = torch::randn({2, 300, d}, torch::kDouble);
      // rms+router, layer+router: the router takes x as the norm passed it on
      // (the norm's kernel then adds the scores' part of x's gradient).
      for (const char* kind : {"rms", "layer", "router", "rms+router", "layer+router"}) {
        const std::string k(kind);
        if (k.find("router") != std::string::npos && d % 8 != 0) continue;  // the routing kernel takes 16-byte rows
        for (int use = 0; use < 3; ++use) {                         // passed x: weighted, summed, unused
          SCOPED_TRACE(k + " d " + std::to_string(d) + " " + c10::toString(dtype) + " use " +
                       std::to_string(use));
          auto loss = [&](const torch::Tensor& y, const torch::Tensor& passed, const torch::Tensor& g_y) {
            torch::Tensor l = (y.to(g_y.scalar_type()) * g_y).sum();
            if (use == 0) l = l + (passed.to(g_y.scalar_type()) * gp.to(g_y.device(), g_y.scalar_type())).sum();
            if (use == 1) l = l + passed.to(g_y.scalar_type()).sum();
            return l;
          };
          torch::Tensor x64 = x.clone().requires_grad_(true), xd = x.to(cuda(), dtype).requires_grad_(true);
          torch::Tensor y64, yd, passed;
          router->zero_grad();
          router_ref->zero_grad();
          // The routers' outputs (CPU a, CUDA b) in index order: the scores
          // against a weight per position, plus the routed rows.
          auto routed_parts = [&](const auto& a, const auto& b) {
            torch::Tensor wpos = torch::randn({2, 300}, torch::kDouble);
            torch::Tensor r64 = (a.scores * wpos.gather(-1, a.indices)).unsqueeze(-1) + a.routed_tokens;
            torch::Tensor rd =
                (b.scores.to(torch::kFloat) * wpos.to(cuda(), torch::kFloat).gather(-1, b.indices)).unsqueeze(-1) +
                b.routed_tokens.to(torch::kFloat);
            return std::make_pair(in_index_order(r64, a.indices), in_index_order(rd, b.indices));
          };
          if (k == "rms+router" || k == "layer+router") {
            torch::Tensor n64, nd, norm_passed;
            if (k == "rms+router") {
              n64 = rms_ref->forward(x64);
              std::tie(nd, norm_passed) = rms->forward_passing(xd);
            } else {
              n64 = torch::layer_norm(x64, {d}, w, bias, 1e-5);
              nd = colt5::nn::layer_norm(xd, wd, bd, 1e-5, false, true, &norm_passed);
            }
            ASSERT_TRUE(norm_passed.defined());
            auto a = router_ref->forward(x64, 64);
            auto b = router->forward(norm_passed, 64);
            ASSERT_TRUE(b.x_passed.defined());
            ASSERT_TRUE(torch::equal(routed_set(a.indices), routed_set(b.indices)));
            auto [r64, rd] = routed_parts(a, b);
            y64 = torch::cat({n64, r64}, 1);
            yd = torch::cat({nd.to(torch::kFloat), rd}, 1);
            passed = b.x_passed;
          } else if (k == "rms") {
            y64 = rms_ref->forward(x64);
            std::tie(yd, passed) = rms->forward_passing(xd);
          } else if (k == "layer") {
            y64 = torch::layer_norm(x64, {d}, w, bias, 1e-5);
            yd = colt5::nn::layer_norm(xd, wd, bd, 1e-5, false, true, &passed);
          } else {
            auto a = router_ref->forward(x64, 64);
            auto b = router->forward(xd, 64);
            ASSERT_TRUE(b.x_passed.defined());
            ASSERT_TRUE(torch::equal(routed_set(a.indices), routed_set(b.indices)));
            std::tie(y64, yd) = routed_parts(a, b);
            passed = b.x_passed;
          }
          ASSERT_TRUE(passed.defined());
          EXPECT_EQ(passed.data_ptr(), xd.data_ptr());
          EXPECT_EQ(passed.sizes(), xd.sizes());
          const torch::Tensor g64 = gy.narrow(1, 0, y64.size(1)).narrow(2, 0, y64.size(2));
          loss(y64, x64, g64).backward();
          loss(yd, passed, g64.to(cuda(), torch::kFloat)).backward();
          const double tol = dtype == torch::kFloat ? 1e-4 : 2e-2;
          EXPECT_LT(err(xd.grad(), x64.grad()), tol);
          if (k.find("router") != std::string::npos)
            EXPECT_LT(err(router->routing_token.grad(), router_ref->routing_token.grad()), tol);
        }
      }
    }
  }
}

TEST(CudaModules, SaturatedScoresBreakTiesLikeTheCpu) {
  // Many tokens saturate at exactly 1.0 with a large k: the set is decided by the tie-break.
  torch::manual_seed(12);
  CoordinateDescentRouter cpu(CoordinateDescentRouterOptions(32).eps(0.03));
  CoordinateDescentRouter gpu(std::dynamic_pointer_cast<CoordinateDescentRouterImpl>(cpu->clone(cuda())));
  torch::Tensor x = torch::randn({2, 8192, 32}) * 4;
  auto a = cpu->forward(x, 2048);
  auto b = gpu->forward(x.to(cuda()), 2048);
  EXPECT_TRUE(torch::equal(a.indices, b.indices.cpu()));
}

TEST(CudaModules, TransformerBlockMatchesTheCpuForwardAndBackward) {
  torch::manual_seed(13);
  auto opts = ConditionalRoutedTransformerBlockOptions(64, 128, 128, 128)
                  .light_dim_head(16)
                  .light_heads(4)
                  .light_window_size(32)
                  .heavy_dim_head(16)
                  .heavy_heads(4)
                  .router_kwargs(RouterKwargs().eps(1.0));
  ConditionalRoutedTransformerBlock cpu(opts);
  cpu->to(torch::kDouble);
  ConditionalRoutedTransformerBlock gpu(
      std::dynamic_pointer_cast<ConditionalRoutedTransformerBlockImpl>(cpu->clone(cuda())));
  gpu->to(torch::kFloat);
  torch::Tensor x = torch::randn({2, 1000, 64}, torch::kDouble);
  torch::Tensor mask = torch::ones({2, 1000}, torch::kBool);
  mask.index_put_({1, torch::indexing::Slice(900, torch::indexing::None)}, false);
  torch::Tensor xc = x.clone().requires_grad_(true);
  torch::Tensor xg = x.to(cuda(), torch::kFloat).requires_grad_(true);
  torch::Tensor yc = cpu->forward(xc, mask), yg = gpu->forward(xg, mask.to(cuda()));
  EXPECT_LT(max_rel_error(yg, yc), 1e-4);
  torch::Tensor g = torch::randn_like(x);
  yc.backward(g);
  yg.backward(g.to(cuda(), torch::kFloat));
  EXPECT_LT(max_rel_error(xg.grad(), xc.grad()), 1e-3);
  expect_parameter_grads_close(*cpu, *gpu, 1e-3);
}

// The autoregressive module's residual_forward in float32 on CUDA (the
// gathered attention kernel; x passed on from the light branch's norm to the
// routers, the keys/values' norm and the residual) against x + forward(x) in
// float64 on the CPU: the output, x's gradient and every parameter's; a length
// of whole windows and a ragged one.
TEST(CudaModules, AutoregressiveMatchesTheCpuForwardAndBackward) {
  torch::manual_seed(19);
  auto opts = ConditionalRoutedAutoregressiveAttentionOptions(64, 16, 96)
                  .light_dim_head(16)
                  .light_heads(4)
                  .light_window_size(32)
                  .heavy_dim_head(16)
                  .heavy_heads(4)
                  .rotary_emb(true)
                  .router_kwargs(RouterKwargs().eps(1.0));
  ConditionalRoutedAutoregressiveAttention cpu(opts);
  cpu->to(torch::kDouble);
  ConditionalRoutedAutoregressiveAttention gpu(
      std::dynamic_pointer_cast<ConditionalRoutedAutoregressiveAttentionImpl>(cpu->clone(cuda())));
  gpu->to(torch::kFloat);
  for (const int64_t n : {512, 500}) {
    SCOPED_TRACE("length " + std::to_string(n));
    cpu->zero_grad();
    gpu->zero_grad();
    torch::Tensor x = torch::randn({2, n, 64}, torch::kDouble);
    torch::Tensor xc = x.clone().requires_grad_(true);
    torch::Tensor xg = x.to(cuda(), torch::kFloat).requires_grad_(true);
    // residual_forward on the GPU (x's uses chained through the kernels) against x + forward(x) on the CPU.
    torch::Tensor yc = xc + cpu->forward(xc), yg = gpu->residual_forward(xg);
    EXPECT_LT(colt5::testing::norm_rel_error(yg.detach().to(torch::kDouble).cpu(), yc.detach()), 1e-4);
    torch::Tensor g = torch::randn_like(x);
    yc.backward(g);
    yg.backward(g.to(cuda(), torch::kFloat));
    EXPECT_LT(colt5::testing::norm_rel_error(xg.grad().to(torch::kDouble).cpu(), xc.grad()), 1e-3);
    expect_parameter_grads_close(*cpu, *gpu, 1e-3);
  }
}

// Without rotary embeddings the heavy attention runs on the gathered-rows
// kernel (in 16-bit types with the backward in pairs of windows, where the
// windows' key sets are prefixes of one sequence), and both routers score the
// sequence in one read: float32 and bfloat16 on the GPU against float64 on the
// CPU (the same bf16-rounded weights and input), one routed key/value set and
// two, a whole number of windows and a ragged length.
TEST(CudaModules, AutoregressiveWithoutRotaryMatchesTheCpuFloat64) {
  torch::manual_seed(29);
  for (int64_t routes : {1, 2}) {
    auto opts = ConditionalRoutedAutoregressiveAttentionOptions(64, 16, 96)
                    .light_dim_head(16)
                    .light_heads(4)
                    .light_window_size(32)
                    .heavy_dim_head(64)
                    .heavy_heads(2)
                    .num_routed_kv(routes)
                    .router_kwargs(RouterKwargs().eps(1.0));
    ConditionalRoutedAutoregressiveAttention cpu(opts);
    for (auto dtype : {torch::kFloat, torch::kBFloat16}) {
      const bool half = dtype != torch::kFloat;
      cpu->to(dtype);
      cpu->to(torch::kDouble);  // weights rounded to dtype
      ConditionalRoutedAutoregressiveAttention gpu(
          std::dynamic_pointer_cast<ConditionalRoutedAutoregressiveAttentionImpl>(cpu->clone(cuda())));
      gpu->to(dtype);
      for (const int64_t n : {1024, 1000}) {
        SCOPED_TRACE("routes " + std::to_string(routes) + " " + c10::toString(dtype) + " length " + std::to_string(n));
        cpu->zero_grad();
        gpu->zero_grad();
        torch::Tensor x = torch::randn({2, n, 64}).to(dtype).to(torch::kDouble);
        torch::Tensor xc = x.clone().requires_grad_(true);
        torch::Tensor xg = x.to(cuda(), dtype).requires_grad_(true);
        torch::Tensor yc = xc + cpu->forward(xc), yg = gpu->residual_forward(xg);
        EXPECT_LT(colt5::testing::norm_rel_error(yg.detach().to(torch::kDouble).cpu(), yc.detach()),
                  half ? 2e-2 : 1e-4);
        torch::Tensor g = torch::randn_like(x);
        yc.backward(g);
        yg.backward(g.to(cuda(), dtype));
        EXPECT_LT(colt5::testing::norm_rel_error(xg.grad().to(torch::kDouble).cpu(), xc.grad()), half ? 3e-2 : 1e-3);
        expect_parameter_grads_close(*cpu, *gpu, half ? 5e-2 : 1e-3);
      }
    }
  }
}

TEST(CudaModules, BFloat16BlockStaysCloseToFloat32AndBackpropagates) {
  torch::manual_seed(14);
  ConditionalRoutedTransformerBlock block(ConditionalRoutedTransformerBlockOptions(128, 256, 256, 256)
                                              .light_dim_head(32)
                                              .light_heads(4)
                                              .light_window_size(64)
                                              .heavy_dim_head(32)
                                              .heavy_heads(4));
  block->to(cuda(), torch::kFloat);
  torch::Tensor x = torch::randn({2, 4096, 128}, torch::TensorOptions(cuda()));
  torch::Tensor ref = block->forward(x);
  block->to(torch::kBFloat16);
  torch::Tensor xb = x.to(torch::kBFloat16).requires_grad_(true);
  torch::Tensor out = block->forward(xb);
  EXPECT_EQ(out.scalar_type(), torch::kBFloat16);
  // bf16 rounding flips the routing of a few tokens near the top-k boundary, which
  // changes those tokens' outputs entirely: compare in norm, and count large deviations.
  torch::Tensor diff = out.to(torch::kFloat) - ref;
  EXPECT_LT((diff.norm() / ref.norm()).item<double>(), 0.05);
  EXPECT_LT((diff.abs() > 0.1 * ref.abs().max()).to(torch::kFloat).mean().item<double>(), 0.01);
  out.to(torch::kFloat).sum().backward();
  EXPECT_TRUE(torch::isfinite(xb.grad().to(torch::kFloat)).all().item<bool>());
}

// Local attention on CUDA in half precision (unmasked windows take the flash
// kernels: causal windows its lower-right limit, exact causal windows its
// sliding window) and float32, forward and backward, against the CPU float64
// path: one window, two, many, a ragged length, with and without a key mask,
// causal, exact causal and not causal.
TEST(CudaModules, LocalAttentionWindowsMatchTheCpuFloat64) {
  torch::manual_seed(19);
  // causal, causal with exact windows (a sliding window), not causal, not
  // causal with exact windows (the block's light attention; a sliding window
  // both ways, over the autopadded sequence)
  for (int mode : {0, 1, 2, 3}) {
    const bool causal = mode < 2, exact = mode == 1 || mode == 3;
    // No mask; a mask with random holes; the same with a hidden stretch of
    // 400 positions, whose middle queries see no key at all.
    for (int masked : {0, 1, 2}) {
      LocalMHA attn(LocalMHAOptions(128, 64)
                        .dim_head(64)
                        .heads(2)
                        .causal(causal)
                        .exact_windowsize(exact)
                        .prenorm(true)
                        .look_forward(causal ? 0 : 1)
                        .use_rotary_pos_emb(false));
      auto ref = std::dynamic_pointer_cast<LocalMHAImpl>(attn->clone());
      ref->to(torch::kDouble);
      for (int64_t n : {40, 128, 1000, 2048}) {
        for (auto dtype : {torch::kBFloat16, torch::kHalf, torch::kFloat}) {
          SCOPED_TRACE("mode " + std::to_string(mode) + " masked " + std::to_string(masked) + " n " +
                       std::to_string(n) + " " + c10::toString(dtype));
          torch::Tensor x = torch::randn({2, n, 128}, torch::kDouble);
          torch::Tensor mask;
          if (masked) mask = torch::rand({2, n}) > 0.1;
          if (masked == 2 && n >= 1000) mask.narrow(1, 300, 400).fill_(false);
          torch::Tensor x64 = x.clone().requires_grad_(true);
          torch::Tensor out64 = ref->forward(x64, mask);
          torch::Tensor g = torch::randn_like(out64);
          out64.backward(g);
          // Exact windows: the flash kernel's sliding window and the windowed path.
          // With a mask in half precision, the sliding window from the packed
          // projection (packed_qkv) and from q, k, v views.
          std::vector<std::pair<bool, bool>> paths{{true, true}};
          if (exact) paths.push_back({false, true});
          if (exact && masked && dtype != torch::kFloat) paths.push_back({true, false});
          for (auto [sliding, packed] : paths) {
            SCOPED_TRACE(!sliding ? "windowed path" : packed ? "sliding window" : "sliding window, q/k/v views");
            auto dev = std::dynamic_pointer_cast<LocalMHAImpl>(attn->clone());
            dev->to(cuda(), dtype);
            dev->attn_fn->options.sliding_window(sliding);
            dev->options.packed_qkv(packed);
            torch::Tensor xd = x.to(cuda(), dtype).requires_grad_(true);
            torch::Tensor out = dev->forward(xd, masked ? mask.to(cuda()) : mask);
            out.backward(g.to(cuda(), dtype));
            const double tol = dtype == torch::kFloat ? 1e-4 : 3e-2;
            EXPECT_LT(max_rel_error(out.to(torch::kDouble).cpu(), out64), tol);
            EXPECT_LT(max_rel_error(xd.grad().to(torch::kDouble).cpu(), x64.grad()), 3 * tol);
            EXPECT_TRUE(torch::isfinite(xd.grad()).all().item<bool>());
          }
          ref->zero_grad();
        }
      }
    }
  }
}

// A LocalMHA of width 96 with exact windows of ws (one window each way, or
// back only when causal), heads of dh (2 of 64, else 3), a prenorm and no
// rotary embedding: the packed path's, the band kernels' and the register-tile
// kernels' tests.
namespace {
LocalMHAOptions exact_window_options(int64_t ws, bool causal, int64_t dh) {
  return LocalMHAOptions(96, ws)
      .dim_head(dh)
      .heads(dh == 64 ? 2 : 3)
      .causal(causal)
      .exact_windowsize(true)
      .prenorm(true)
      .look_backward(1)
      .look_forward(causal ? 0 : 1)
      .use_rotary_pos_emb(false);
}
}  // namespace

// LocalMHA's packed path (packed_qkv: q, k, v from the projection into the
// flash kernel's buffer and the gradients back, on colt5's kernels) against
// LocalAttention's path over q, k, v views, which runs the same flash kernel
// on the same inputs: outputs and every gradient bit for bit where no query is
// blind; with blind queries (a hidden stretch, a fully hidden row), whose
// means and mean gradients are summed in another order, within rounding. bf16
// and f16 modules, float32 under autocast (the block's case), causal and not,
// ragged lengths (autopadded), 2 heads of 64 and 3 of 40; with
// window_tile_kernels off (on, heads of 64 take the register-tile kernels:
// LocalMHAWindowTilesMatchTheCpuFloat64).
TEST(CudaModules, LocalMHAPackedQKVMatchesTheViewsPath) {
  torch::manual_seed(31);
  for (bool causal : {false, true}) {
    for (int64_t dh : {64, 40}) {
      LocalMHA attn(exact_window_options(32, causal, dh));
      for (int blind : {0, 1}) {
        for (int64_t n : {1, 33, 1000}) {
          for (int kind : {0, 1, 2}) {  // bf16 module, f16 module, float32 under bf16 autocast
            SCOPED_TRACE("causal " + std::to_string(causal) + " dh " + std::to_string(dh) + " blind " +
                         std::to_string(blind) + " n " + std::to_string(n) + " kind " + std::to_string(kind));
            const auto dtype = kind == 0 ? torch::kBFloat16 : kind == 1 ? torch::kHalf : torch::kFloat;
            torch::Tensor x = torch::randn({2, n, 96}, torch::TensorOptions(cuda()).dtype(dtype));
            torch::Tensor mask = torch::rand({2, n}, torch::TensorOptions(cuda())) > 0.05;
            if (blind) {
              mask.select(0, 1).fill_(false);
              if (n >= 1000) mask.select(0, 0).narrow(0, 200, 300).fill_(false);
            }
            torch::Tensor g = torch::randn({2, n, 96}, x.options());
            std::vector<torch::Tensor> outs, grads;
            for (bool packed : {true, false}) {
              auto dev = std::dynamic_pointer_cast<LocalMHAImpl>(attn->clone());
              dev->to(cuda(), dtype);
              dev->options.packed_qkv(packed);
              dev->options.window_tile_kernels(false);  // the packed kernels, not the register tiles
              torch::Tensor xd = x.clone().requires_grad_(true);
              torch::Tensor out;
              {
                Region region(torch::kBFloat16, kind == 2);
                out = dev->forward(xd, mask);
              }
              out.backward(g.to(out.scalar_type()));
              outs.push_back(out);
              grads.push_back(xd.grad());
              grads.push_back(dev->to_qkv->weight.grad());
              grads.push_back(dev->to_out->weight.grad());
            }
            ASSERT_EQ(outs[0].scalar_type(), outs[1].scalar_type());
            EXPECT_TRUE(torch::isfinite(outs[0]).all().item<bool>());
            if (!blind) {
              EXPECT_TRUE(torch::equal(outs[0], outs[1]));
              for (int i = 0; i < 3; ++i) EXPECT_TRUE(torch::equal(grads[i], grads[i + 3])) << "gradient " << i;
            } else {
              EXPECT_LT(max_rel_error(outs[0].to(torch::kDouble), outs[1].to(torch::kDouble)), 1e-2);
              for (int i = 0; i < 3; ++i)
                EXPECT_LT(max_rel_error(grads[i].to(torch::kDouble), grads[i + 3].to(torch::kDouble)), 2e-2)
                    << "gradient " << i;
            }
          }
        }
      }
    }
  }
}

// LocalMHA's exact windows on the band kernels (band_attention) against the
// CPU float64 module: outputs and every gradient; float32 with TF32 off (three
// TF32 products each: float32 accuracy) and on, bf16 and f16 modules and
// float32 under bf16 autocast; heads of 64 and 32, windows of 32 and 64 (128
// and 192 keys a block), causal and not, no mask, random holes, a hidden
// stretch whose middle queries see no key and a fully hidden row (blind
// queries take their look-around's mean), lengths of one token, a ragged
// one (autopadded) and several blocks.
TEST(CudaModules, LocalMHABandKernelsMatchTheCpuFloat64) {
  torch::manual_seed(41);
  const bool tf32_was = at::globalContext().allowTF32CuBLAS();
  for (int64_t ws : {32, 64}) {
    for (bool causal : {false, true}) {
      for (int64_t dh : {64, 32}) {
        LocalMHA attn(exact_window_options(ws, causal, dh).band_attention(true));
        auto ref = std::dynamic_pointer_cast<LocalMHAImpl>(attn->clone());
        ref->to(torch::kDouble);
        for (int masked : {0, 1, 2}) {
          for (int64_t n : {1, 33, 1000, 2048}) {
            if (!masked && n % ws != 0) continue;  // padded keys stay visible: not the band kernels' case
            torch::Tensor x = torch::randn({2, n, 96}, torch::kDouble);
            torch::Tensor mask;
            if (masked) mask = torch::rand({2, n}) > 0.1;
            if (masked == 2) {
              mask.select(0, 1).fill_(false);
              if (n >= 1000) mask.select(0, 0).narrow(0, 200, 300).fill_(false);
            }
            torch::Tensor x64 = x.clone().requires_grad_(true);
            torch::Tensor out64 = ref->forward(x64, mask);
            torch::Tensor g = torch::randn_like(out64);
            out64.backward(g);
            // float32 TF32 off, float32 TF32 on, bf16, f16, float32 under bf16 autocast
            for (int kind : {0, 1, 2, 3, 4}) {
              SCOPED_TRACE("ws " + std::to_string(ws) + " causal " + std::to_string(causal) + " dh " +
                           std::to_string(dh) + " masked " + std::to_string(masked) + " n " + std::to_string(n) +
                           " kind " + std::to_string(kind));
              const auto dtype = kind == 2 ? torch::kBFloat16 : kind == 3 ? torch::kHalf : torch::kFloat;
              at::globalContext().setAllowTF32CuBLAS(kind == 1);
              auto dev = std::dynamic_pointer_cast<LocalMHAImpl>(attn->clone());
              dev->to(cuda(), dtype);
              torch::Tensor xd = x.to(cuda(), dtype).requires_grad_(true);
              torch::Tensor out;
              {
                Region region(torch::kBFloat16, kind == 4);
                out = dev->forward(xd, masked ? mask.to(cuda()) : mask);
              }
              EXPECT_TRUE(colt5::testing::graph_has(out, "BandAttentionFunction"));
              out.backward(g.to(cuda(), out.scalar_type()));
              const double tol = kind == 0 ? 2e-5 : kind == 1 ? 5e-3 : 3e-2;
              EXPECT_LT(colt5::testing::norm_rel_error(out.to(torch::kDouble).cpu(), out64), tol);
              EXPECT_LT(colt5::testing::norm_rel_error(xd.grad().to(torch::kDouble).cpu(), x64.grad()), tol);
              expect_parameter_grads_close(*ref, *dev, tol);
            }
            at::globalContext().setAllowTF32CuBLAS(tf32_was);
            ref->zero_grad();
          }
        }
      }
    }
  }
}

// LocalMHA's exact windows in float16/bfloat16 on the register-tile kernels
// (window_tile_kernels, the default), forward and backward, against the CPU
// float64 module: outputs and every gradient; bf16 and f16 modules and float32
// under bf16 autocast; heads of 64 and 32, windows of 32 and 64, causal and
// not; no mask, an all-true mask, padding at the ends, random holes, a hidden
// stretch whose middle queries see no key and a fully hidden row; one token, a
// ragged length and several blocks.
TEST(CudaModules, LocalMHAWindowTilesMatchTheCpuFloat64) {
  torch::manual_seed(43);
  for (int64_t ws : {32, 64}) {
    for (bool causal : {false, true}) {
      for (int64_t dh : {64, 32}) {
        LocalMHA attn(exact_window_options(ws, causal, dh));
        auto ref = std::dynamic_pointer_cast<LocalMHAImpl>(attn->clone());
        ref->to(torch::kDouble);
        // no mask, all true, padded ends, random holes, blind queries
        for (int masked : {-1, 0, 1, 2, 3}) {
          for (int64_t n : {1, 33, 1000, 2048}) {
            if (masked < 0 && n % ws != 0) continue;  // padded keys stay visible: not this path's case
            torch::Tensor x = torch::randn({2, n, 96}, torch::kDouble);
            torch::Tensor mask = torch::ones({2, n}, torch::kBool);
            if (masked < 0) {
              mask = torch::Tensor();
            } else if (masked == 1) {
              mask.select(0, 0).narrow(0, n - n / 3, n / 3).fill_(false);  // right padding
              mask.select(0, 1).narrow(0, 0, n / 5).fill_(false);          // left padding
            } else if (masked == 2) {
              mask = torch::rand({2, n}) > 0.1;
            } else if (masked == 3) {
              mask = torch::rand({2, n}) > 0.02;
              mask.select(0, 1).fill_(false);
              if (n >= 1000) mask.select(0, 0).narrow(0, 200, 300).fill_(false);
            }
            torch::Tensor x64 = x.clone().requires_grad_(true);
            torch::Tensor out64 = ref->forward(x64, mask);
            torch::Tensor g = torch::randn_like(out64);
            out64.backward(g);
            for (int kind : {0, 1, 2}) {  // bf16, f16, float32 under bf16 autocast
              SCOPED_TRACE("ws " + std::to_string(ws) + " causal " + std::to_string(causal) + " dh " +
                           std::to_string(dh) + " masked " + std::to_string(masked) + " n " + std::to_string(n) +
                           " kind " + std::to_string(kind));
              const auto dtype = kind == 0 ? torch::kBFloat16 : kind == 1 ? torch::kHalf : torch::kFloat;
              auto dev = std::dynamic_pointer_cast<LocalMHAImpl>(attn->clone());
              dev->to(cuda(), dtype);
              torch::Tensor xd = x.to(cuda(), dtype).requires_grad_(true);
              torch::Tensor out;
              {
                Region region(torch::kBFloat16, kind == 2);
                out = dev->forward(xd, masked < 0 ? mask : mask.to(cuda()));
              }
              EXPECT_TRUE(colt5::testing::graph_has(out, "WindowTileFunction"));
              out.backward(g.to(cuda(), out.scalar_type()));
              EXPECT_TRUE(torch::isfinite(out).all().item<bool>());
              EXPECT_LT(colt5::testing::norm_rel_error(out.to(torch::kDouble).cpu(), out64), 3e-2);
              EXPECT_LT(colt5::testing::norm_rel_error(xd.grad().to(torch::kDouble).cpu(), x64.grad()), 3e-2);
              expect_parameter_grads_close(*ref, *dev, 3e-2);
            }
            ref->zero_grad();
          }
        }
      }
    }
  }
}

// With an all-true mask the register-tile kernels agree with the same module
// without a mask (the flash kernel both ways, or the register tiles) and with
// the score-bias path (window_tile_kernels off) to bf16 rounding: the output
// and every gradient. The register tiles' backward writes every gradient row
// once (no atomics): two backward passes give the same bits.
TEST(CudaModules, LocalMHAWindowTilesWithAnAllTrueMaskAreTheUnmaskedPath) {
  torch::manual_seed(44);
  for (bool causal : {false, true}) {
    LocalMHA attn(LocalMHAOptions(128, 64)
                      .dim_head(64)
                      .heads(2)
                      .causal(causal)
                      .exact_windowsize(true)
                      .prenorm(true)
                      .look_backward(1)
                      .look_forward(causal ? 0 : 1)
                      .use_rotary_pos_emb(false));
    attn->to(cuda(), torch::kBFloat16);
    torch::Tensor x = torch::randn({2, 1024, 128}, torch::TensorOptions(cuda()).dtype(torch::kBFloat16));
    torch::Tensor g = torch::randn_like(x);
    torch::Tensor mask = torch::ones({2, 1024}, torch::TensorOptions(cuda()).dtype(torch::kBool));
    std::vector<std::vector<torch::Tensor>> runs;
    // register tiles with the mask, no mask on the flash kernel, score-bias
    // mask, no mask on the register tiles
    for (int way : {0, 1, 2, 3}) {
      SCOPED_TRACE("causal " + std::to_string(causal) + " way " + std::to_string(way));
      auto dev = std::dynamic_pointer_cast<LocalMHAImpl>(attn->clone());
      dev->options.window_tile_kernels(way == 0 || way == 3);
      torch::Tensor xd = x.clone().requires_grad_(true);
      torch::Tensor out = dev->forward(xd, way == 1 || way == 3 ? torch::Tensor() : mask);
      EXPECT_EQ(colt5::testing::graph_has(out, "WindowTileFunction"), way == 0 || way == 3);
      if (way == 0) {
        // The same backward twice: the same bits.
        torch::Tensor first = torch::autograd::grad({out}, {xd}, {g}, /*retain_graph=*/true)[0];
        torch::Tensor second = torch::autograd::grad({out}, {xd}, {g}, /*retain_graph=*/true)[0];
        EXPECT_TRUE(torch::equal(first, second));
      }
      out.backward(g);
      runs.push_back({out, xd.grad(), dev->to_qkv->weight.grad(), dev->to_out->weight.grad()});
    }
    for (size_t i = 0; i < runs[0].size(); ++i) {
      for (int other : {1, 2, 3}) {
        const double err =
            colt5::testing::norm_rel_error(runs[0][i].to(torch::kDouble), runs[other][i].to(torch::kDouble));
        EXPECT_LT(err, 1e-2) << "tensor " << i << " (0: output) against way " << other;
      }
    }
  }
}

// band_attention unset takes the band kernels for a float32 projection and
// the flash kernel's sliding window for bf16 (also under autocast); true and
// false force either way.
TEST(CudaModules, LocalMHABandKernelsAreTheFloat32Default) {
  torch::manual_seed(42);
  for (int setting : {-1, 0, 1}) {  // unset, false, true
    LocalMHAOptions o = LocalMHAOptions(128, 64)
                            .dim_head(64)
                            .heads(2)
                            .exact_windowsize(true)
                            .prenorm(true)
                            .look_backward(1)
                            .look_forward(1)
                            .use_rotary_pos_emb(false);
    if (setting >= 0) o.band_attention(setting == 1);
    LocalMHA attn(o);
    for (int kind : {0, 1, 2}) {  // float32, bf16, float32 under bf16 autocast
      SCOPED_TRACE("setting " + std::to_string(setting) + " kind " + std::to_string(kind));
      auto dev = std::dynamic_pointer_cast<LocalMHAImpl>(attn->clone());
      dev->to(cuda(), kind == 1 ? torch::kBFloat16 : torch::kFloat);
      torch::Tensor x =
          torch::randn({2, 256, 128}, torch::TensorOptions(cuda()).dtype(kind == 1 ? torch::kBFloat16 : torch::kFloat));
      torch::Tensor mask = torch::rand({2, 256}, torch::TensorOptions(cuda())) > 0.1;
      torch::Tensor out;
      {
        Region region(torch::kBFloat16, kind == 2);
        out = dev->forward(x.requires_grad_(true), mask);
      }
      const bool band = setting == 1 || (setting == -1 && kind == 0);
      EXPECT_EQ(colt5::testing::graph_has(out, "BandAttentionFunction"), band);
    }
  }
}

// LocalMHA's causal windows of one look-back without a mask (the
// autoregressive light branch) as two flash calls on views of the projection,
// merged by their log-sum-exps (LocalMHAOptions::split_causal_windows),
// against the look-around windows' path and
// against float64 on the CPU: outputs and every gradient, bf16 and f16
// modules and float32 under bf16 autocast, one and three sequences (whose
// first windows must not see the sequence before), 2 to 32 windows.
TEST(CudaModules, LocalMHACausalWindowsMatchTheViewsPath) {
  torch::manual_seed(36);
  for (int64_t dh : {64, 40}) {
    LocalMHA attn(LocalMHAOptions(96, 32)
                      .dim_head(dh)
                      .heads(dh == 64 ? 2 : 3)
                      .causal(true)
                      .prenorm(true)
                      .exact_windowsize(false)
                      .use_rotary_pos_emb(false));
    for (int64_t b : {1, 3}) {
      for (int64_t n : {64, 160, 1024}) {
        torch::Tensor x64 = torch::randn({b, n, 96}, torch::kDouble), g64 = torch::randn({b, n, 96}, torch::kDouble);
        auto cpu = std::dynamic_pointer_cast<LocalMHAImpl>(attn->clone());
        cpu->to(torch::kDouble);
        torch::Tensor xc = x64.clone().requires_grad_(true);
        torch::Tensor want = cpu->forward(xc);
        want.backward(g64);
        const std::vector<torch::Tensor> want_grads{xc.grad(), cpu->to_qkv->weight.grad(), cpu->to_out->weight.grad()};
        for (int kind : {0, 1, 2}) {  // bf16 module, f16 module, float32 under bf16 autocast
          SCOPED_TRACE("dh " + std::to_string(dh) + " b " + std::to_string(b) + " n " + std::to_string(n) + " kind " +
                       std::to_string(kind));
          const auto dtype = kind == 0 ? torch::kBFloat16 : kind == 1 ? torch::kHalf : torch::kFloat;
          std::vector<torch::Tensor> outs, grads;
          for (bool packed : {true, false}) {
            auto dev = std::dynamic_pointer_cast<LocalMHAImpl>(attn->clone());
            dev->to(cuda(), dtype);
            dev->options.split_causal_windows(packed);
            torch::Tensor xd = x64.to(cuda(), dtype).requires_grad_(true);
            torch::Tensor out;
            {
              Region region(torch::kBFloat16, kind == 2);
              out = dev->forward(xd);
            }
            EXPECT_EQ(colt5::testing::graph_has(out, "CausalWindowsFunction"), packed);
            out.backward(g64.to(cuda(), out.scalar_type()));
            outs.push_back(out.to(torch::kCPU, torch::kDouble));
            grads.push_back(xd.grad().to(torch::kCPU, torch::kDouble));
            grads.push_back(dev->to_qkv->weight.grad().to(torch::kCPU, torch::kDouble));
            grads.push_back(dev->to_out->weight.grad().to(torch::kCPU, torch::kDouble));
          }
          {
            // The default (nullopt) takes the split windows on CUDA.
            auto dev = std::dynamic_pointer_cast<LocalMHAImpl>(attn->clone());
            dev->to(cuda(), dtype);
            Region region(torch::kBFloat16, kind == 2);
            EXPECT_TRUE(colt5::testing::graph_has(dev->forward(x64.to(cuda(), dtype).requires_grad_(true)),
                                                  "CausalWindowsFunction"));
          }
          EXPECT_TRUE(torch::isfinite(outs[0]).all().item<bool>());
          const double tol = kind == 1 ? 1e-2 : 3e-2;
          EXPECT_LT(max_rel_error(outs[0], outs[1]), tol);
          for (int p = 0; p < 2; ++p) EXPECT_LT(max_rel_error(outs[p], want), tol) << "path " << p;
          for (int i = 0; i < 3; ++i) {
            EXPECT_LT(max_rel_error(grads[i], grads[i + 3]), 3 * tol) << "gradient " << i;
            for (int p = 0; p < 2; ++p)
              EXPECT_LT(max_rel_error(grads[3 * p + i], want_grads[i]), 3 * tol) << "path " << p << " gradient " << i;
          }
        }
      }
    }
  }
}

// A module with joint routing against a copy of it with separate routers:
// the same output bit for bit, and the gradients of x and of both routers'
// tokens within float32 (bf16 autocast) tolerance, for upstream gradient g.
template <typename Impl>
void expect_joint_routing_matches_separate(Impl& module, const torch::Tensor& x, const torch::Tensor& mask,
                                           const torch::Tensor& g, bool bf16) {
  std::vector<torch::Tensor> got;
  for (bool joint : {true, false}) {
    auto m = std::dynamic_pointer_cast<Impl>(module.clone());
    m->options.joint_routing(joint);
    torch::Tensor xd = x.clone().requires_grad_(true);
    torch::Tensor out;
    {
      Region region(torch::kBFloat16, bf16);
      out = m->forward(xd, mask);
    }
    out.backward(g.to(out.scalar_type()));
    got.push_back(out.to(torch::kFloat));
    got.push_back(xd.grad());
    got.push_back(m->q_router->routing_token.grad());
    got.push_back(m->kv_router->routing_token.grad());
  }
  EXPECT_TRUE(torch::equal(got[0], got[4]));
  const double tol = bf16 ? 1e-2 : 1e-5;
  EXPECT_LT(max_rel_error(got[1], got[5]), tol) << "x gradient";
  EXPECT_LT(max_rel_error(got[2], got[6]), tol) << "query router gradient";
  EXPECT_LT(max_rel_error(got[3], got[7]), tol) << "key/value router gradient";
}

// Self-attention's two routers scoring x in one read and gathering in one
// (ConditionalRoutedAttentionOptions::joint_routing) against each router on
// its own: the same scores give the same routing and outputs; the gradients
// differ only in the order of their additions. Dot-product and cosine
// routing, one and two key/value routes, with and without a mask, float32
// and under bf16 autocast; as many queries as keys/values routed (both
// routers' rows in one coordinate descent and top-k) or not.
TEST(CudaModules, JointRoutingMatchesSeparateRouters) {
  torch::manual_seed(32);
  for (bool cosine : {false, true}) {
    for (int64_t routes : {1, 2}) {
      for (int64_t kq : {96, 64}) {
        ConditionalRoutedAttention attn(ConditionalRoutedAttentionOptions(128, kq, 64)
                                            .light_window_size(32)
                                            .light_heads(2)
                                            .light_dim_head(32)
                                            .heavy_heads(4)
                                            .heavy_dim_head(32)
                                            .num_routed_kv(routes)
                                            .router_kwargs(RouterKwargs().cosine_sim_routing(cosine)));
        attn->to(cuda());
        for (bool masked : {false, true}) {
          for (bool bf16 : {false, true}) {
            SCOPED_TRACE("cosine " + std::to_string(cosine) + " routes " + std::to_string(routes) + " kq " +
                         std::to_string(kq) + " masked " + std::to_string(masked) + " bf16 " + std::to_string(bf16));
            auto opts = torch::TensorOptions(cuda());
            torch::Tensor x = torch::randn({2, 700, 128}, opts);
            torch::Tensor mask = masked ? torch::rand({2, 700}, opts) > 0.2 : torch::Tensor();
            expect_joint_routing_matches_separate<ConditionalRoutedAttentionImpl>(
                *attn, x, mask, torch::randn({2, 700, 128}, opts), bf16);
          }
        }
      }
    }
  }
}

TEST(CudaModules, ImageJointRoutingMatchesSeparateRouters) {
  // The image module's routers over the map's tokens: one read, one descent
  // and one top-k for both, against each on its own.
  torch::manual_seed(33);
  for (bool masked : {false, true}) {
    for (bool bf16 : {false, true}) {
      SCOPED_TRACE("masked " + std::to_string(masked) + " bf16 " + std::to_string(bf16));
      ConditionalRoutedImageAttention attn(ConditionalRoutedImageAttentionOptions(32, 96, 64)
                                               .light_dim_head(16)
                                               .light_heads(2)
                                               .light_window_size(8)
                                               .heavy_dim_head(16)
                                               .heavy_heads(2)
                                               .channel_first(true));
      attn->to(cuda());
      auto opts = torch::TensorOptions(cuda());
      torch::Tensor x = torch::randn({2, 32, 24, 32}, opts);
      torch::Tensor mask = masked ? torch::rand({2, 24, 32}, opts) > 0.2 : torch::Tensor();
      expect_joint_routing_matches_separate<ConditionalRoutedImageAttentionImpl>(
          *attn, x, mask, torch::randn({2, 32, 24, 32}, opts), bf16);
    }
  }
}

TEST(CudaModules, CrossAttentionOverAMillionTokenMemory) {
  // The seed README's cross-attention example: 1024 queries over 1,048,576 memories, 2 kv routes,
  // route blocks of 131072.
  torch::manual_seed(15);
  ConditionalRoutedCrossAttention attn(ConditionalRoutedCrossAttentionOptions(512, 512, 1024)
                                           .dim_head(64)
                                           .heads(8)
                                           .kv_routing_tokens(2)
                                           .route_block_size(131072));
  attn->to(cuda());
  auto o = torch::TensorOptions(cuda());
  torch::Tensor tokens = torch::randn({1, 1024, 512}, o);
  torch::Tensor memories = torch::randn({1, 1048576, 512}, o);
  torch::Tensor out = attn->forward(tokens, memories, torch::ones({1, 1024}, o.dtype(torch::kBool)),
                                    torch::ones({1, 1048576}, o.dtype(torch::kBool)));
  EXPECT_EQ(out.sizes(), tokens.sizes());
  EXPECT_TRUE(torch::isfinite(out).all().item<bool>());
}

TEST(CudaModules, ImageAttentionAtTheReadmeSize) {
  torch::manual_seed(16);
  ConditionalRoutedImageAttention attn(ConditionalRoutedImageAttentionOptions(32, 1024, 1024)
                                           .light_dim_head(64)
                                           .light_heads(8)
                                           .light_window_size(32)
                                           .heavy_dim_head(64)
                                           .heavy_heads(8)
                                           .channel_first(true));
  attn->to(cuda());
  torch::Tensor fmap = torch::randn({1, 32, 256, 256}, torch::TensorOptions(cuda()));
  EXPECT_EQ(attn->forward(fmap).sizes(), fmap.sizes());
}

TEST(CudaModules, VitAtTheReadmeSize) {
  torch::manual_seed(17);
  ConditionalRoutedViT vit(ConditionalRoutedViTOptions(256, 32, 1000, 1024, 6)
                               .attn_num_heavy_tokens_q(16)
                               .attn_num_heavy_tokens_kv(16)
                               .attn_heavy_dim_head(64)
                               .attn_heavy_heads(8)
                               .attn_light_window_size(4)
                               .attn_light_dim_head(32)
                               .attn_light_heads(4)
                               .ff_num_heavy_tokens(16)
                               .ff_heavy_mult(4)
                               .ff_light_mult(2));
  vit->to(cuda());
  torch::Tensor logits = vit->forward(torch::randn({1, 3, 256, 256}, torch::TensorOptions(cuda())));
  EXPECT_EQ(logits.sizes(), (std::vector<int64_t>{1, 1000}));
  EXPECT_TRUE(torch::isfinite(logits).all().item<bool>());
}

// ---------------------------------------------------------------- host syncs and CUDA graphs

namespace {

// Fails the test on any synchronizing call LibTorch makes (.item(), a
// device-to-host copy, a stream synchronization) while alive.
struct NoHostSync {
  NoHostSync() { c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_ERROR); }
  ~NoHostSync() { c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_DISABLED); }
};

ConditionalRoutedTransformerBlockOptions small_block() {
  return ConditionalRoutedTransformerBlockOptions(128, 256, 256, 256)
      .light_dim_head(32)
      .light_heads(4)
      .light_window_size(64)
      .heavy_dim_head(32)
      .heavy_heads(4);
}

ConditionalRoutedAutoregressiveAttentionOptions small_autoregressive() {
  return ConditionalRoutedAutoregressiveAttentionOptions(128, 32, 64)
      .light_dim_head(32)
      .light_heads(4)
      .light_window_size(64)
      .heavy_dim_head(32)
      .heavy_heads(4)
      .rotary_emb(true);
}

// One training step's forward and backward: the loss and the input and
// parameter gradients (set to none first, so the step allocates them).
template <typename Module, typename Fwd>
std::vector<torch::Tensor> training_step(Module& m, const torch::Tensor& x, const torch::Tensor& gy, Fwd fwd) {
  for (auto& p : m->parameters()) p.mutable_grad() = torch::Tensor();
  x.mutable_grad() = torch::Tensor();
  torch::Tensor y = fwd(x);
  y.backward(gy);
  std::vector<torch::Tensor> out = {y.detach(), x.grad()};
  for (auto& p : m->parameters()) out.push_back(p.grad());
  return out;
}

// Captures the training step in a CUDA graph, replays it on new input values
// and compares with an eager step on the same values.
template <typename Module, typename Fwd>
void check_graph_capture(Module& m, torch::Tensor x, Fwd fwd) {
  torch::Tensor gy = torch::randn_like(x);
  x.requires_grad_(true);
  // (colt5::CapturedStep: warm-up on a side stream, gradients unset before the
  // capture so that the captured backward allocates and rewrites them)
  std::vector<torch::Tensor> captured;
  auto unset_grads = [&] {
    for (auto& p : m->parameters()) p.mutable_grad() = torch::Tensor();
    x.mutable_grad() = torch::Tensor();
  };
  colt5::CapturedStep graph([&] { captured = training_step(m, x, gy, fwd); }, 3, unset_grads);
  torch::Tensor fresh = torch::randn_like(x);
  {
    torch::NoGradGuard no_grad;
    x.copy_(fresh);
  }
  graph.replay();
  torch::cuda::synchronize();
  std::vector<torch::Tensor> replayed;
  for (auto& t : captured) replayed.push_back(t.clone());
  std::vector<torch::Tensor> eager = training_step(m, x, gy, fwd);
  ASSERT_EQ(replayed.size(), eager.size());
  for (size_t i = 0; i < eager.size(); ++i) {
    ASSERT_TRUE(replayed[i].defined() && eager[i].defined()) << "tensor " << i;
    EXPECT_LT(max_rel_error(replayed[i], eager[i]), 1e-5) << "tensor " << i << " (0: output, 1: input gradient)";
  }
}

}  // namespace

TEST(CudaModules, BlockTrainingStepHasNoHostSync) {
  torch::manual_seed(18);
  ConditionalRoutedTransformerBlock block(small_block());
  block->to(cuda());
  torch::Tensor x = torch::randn({2, 4096, 128}, torch::TensorOptions(cuda())).requires_grad_(true);
  torch::Tensor mask = torch::rand({2, 4096}, torch::TensorOptions(cuda())) < 0.9;
  block->forward(x, mask).sum().backward();  // first call: kernel attributes, caches
  torch::cuda::synchronize();
  NoHostSync guard;
  block->forward(x, mask).sum().backward();
}

// The same under bf16 autocast, where the light attention takes the
// register-tile kernels with the mask (the blocks that may hold a blind query
// flagged on the GPU, never read by the host).
TEST(CudaModules, BlockTrainingStepUnderAutocastHasNoHostSync) {
  torch::manual_seed(23);
  ConditionalRoutedTransformerBlock block(small_block());
  block->to(cuda());
  torch::Tensor x = torch::randn({2, 4096, 128}, torch::TensorOptions(cuda())).requires_grad_(true);
  torch::Tensor mask = torch::rand({2, 4096}, torch::TensorOptions(cuda())) < 0.999;
  auto step = [&] {
    torch::Tensor y;
    {
      Region region(torch::kBFloat16);
      y = block->forward(x, mask);
    }
    EXPECT_TRUE(colt5::testing::graph_has(y, "WindowTileFunction"));
    y.to(torch::kFloat).sum().backward();
  };
  step();
  torch::cuda::synchronize();
  NoHostSync guard;
  step();
}

TEST(CudaModules, AutoregressiveTrainingStepHasNoHostSync) {
  torch::manual_seed(19);
  ConditionalRoutedAutoregressiveAttention attn(small_autoregressive());
  attn->to(cuda());
  torch::Tensor x = torch::randn({2, 4000, 128}, torch::TensorOptions(cuda())).requires_grad_(true);
  attn->forward(x).sum().backward();
  torch::cuda::synchronize();
  NoHostSync guard;
  attn->forward(x).sum().backward();
}

TEST(CudaModules, BlockTrainingStepCapturesInACudaGraph) {
  torch::manual_seed(20);
  ConditionalRoutedTransformerBlock block(small_block());
  block->to(cuda());
  check_graph_capture(block, torch::randn({2, 4096, 128}, torch::TensorOptions(cuda())),
                      [&](const torch::Tensor& x) { return block->forward(x); });
}

// Under bf16 autocast with a mask that hides a few keys (the light
// attention's register tiles, blind queries included): the replay takes the
// new input values. The heavy branch's gradients are summed in no fixed
// order, so the replay and the eager step agree to bf16 rounding.
TEST(CudaModules, BlockTrainingStepUnderAutocastCapturesInACudaGraph) {
  torch::manual_seed(24);
  ConditionalRoutedTransformerBlock block(small_block());
  block->to(cuda());
  torch::Tensor mask = torch::ones({2, 4096}, torch::TensorOptions(cuda()).dtype(torch::kBool));
  mask.select(0, 1).narrow(0, 3000, 1096).fill_(false);
  mask.select(0, 0).narrow(0, 100, 7).fill_(false);
  torch::Tensor x = torch::randn({2, 4096, 128}, torch::TensorOptions(cuda())).requires_grad_(true);
  torch::Tensor gy = torch::randn_like(x);
  auto fwd = [&](const torch::Tensor& in) {
    Region region(torch::kBFloat16);
    return block->forward(in, mask).to(torch::kFloat);
  };
  std::vector<torch::Tensor> captured;
  auto unset_grads = [&] {
    for (auto& p : block->parameters()) p.mutable_grad() = torch::Tensor();
    x.mutable_grad() = torch::Tensor();
  };
  colt5::CapturedStep graph([&] { captured = training_step(block, x, gy, fwd); }, 3, unset_grads);
  {
    torch::NoGradGuard no_grad;
    x.copy_(torch::randn_like(x));
  }
  graph.replay();
  torch::cuda::synchronize();
  std::vector<torch::Tensor> replayed;
  for (auto& t : captured) replayed.push_back(t.clone());
  std::vector<torch::Tensor> eager = training_step(block, x, gy, fwd);
  ASSERT_EQ(replayed.size(), eager.size());
  EXPECT_LT(colt5::testing::norm_rel_error(replayed[0], eager[0]), 1e-3) << "the output";
  for (size_t i = 1; i < eager.size(); ++i) {
    ASSERT_TRUE(replayed[i].defined() && eager[i].defined()) << "tensor " << i;
    EXPECT_LT(colt5::testing::norm_rel_error(replayed[i], eager[i]), 1e-2) << "tensor " << i << " (1: input gradient)";
  }
}

TEST(CudaModules, AutoregressiveTrainingStepCapturesInACudaGraph) {
  torch::manual_seed(21);
  ConditionalRoutedAutoregressiveAttention attn(small_autoregressive());
  attn->to(cuda());
  check_graph_capture(attn, torch::randn({2, 4096, 128}, torch::TensorOptions(cuda())),
                      [&](const torch::Tensor& x) { return attn->forward(x); });
}

// LocalAttention keeps the masks that depend only on the length between calls,
// but never inside a CUDA graph: a graph reads what it captured at every
// replay. Captured at one length, then called eagerly at others on the same
// stream (which replaces what is kept; fresh tensors of the same sizes may take
// the freed memory), the replay still gives the eager output, masked or not.
TEST(CudaModules, LocalAttentionGraphReplaysAfterCallsAtOtherLengths) {
  torch::manual_seed(22);
  // The windowed path (its kept masks) and the band kernels
  // (band_attention), each captured and replayed.
  for (bool band : {false, true})
    for (bool masked : {true, false}) {
      SCOPED_TRACE(std::string(masked ? "masked" : "no mask") + (band ? ", band kernels" : ", windowed path"));
      LocalMHA attn(LocalMHAOptions(128, 64)
                        .dim_head(32)
                        .heads(4)
                        .prenorm(true)
                        .look_backward(1)
                        .look_forward(1)
                        .exact_windowsize(true)
                        .use_rotary_pos_emb(false)
                        .band_attention(band));
      attn->to(cuda());
      torch::NoGradGuard no_grad;
      auto opts = torch::TensorOptions(cuda());
      torch::Tensor x = torch::randn({2, 2048, 128}, opts);
      torch::Tensor mask = torch::rand({2, 2048}, opts) < 0.8;
      auto call = [&](const torch::Tensor& t, const torch::Tensor& m) {
        return masked ? attn->forward(t, m) : attn->forward(t);
      };
      at::cuda::CUDAStream side = at::cuda::getStreamFromPool();
      at::cuda::CUDAGraph graph;
      torch::Tensor captured;
      {
        at::cuda::CUDAStreamGuard guard(side);
        call(x, mask);  // warm-up: the masks are kept for this length and stream
        side.synchronize();
        graph.capture_begin();
        captured = call(x, mask);
        graph.capture_end();
        for (int64_t n : {1024, 512, 3072}) {  // replaces what is kept, several times
          torch::Tensor y = call(torch::randn({2, n, 128}, opts), torch::rand({2, n}, opts) < 0.8);
          std::vector<torch::Tensor> filler;  // fresh tensors that may reuse the freed blocks
          for (int i = 0; i < 64; ++i) filler.push_back(torch::full({2048 / 64, 1, 192}, 1, opts.dtype(torch::kBool)));
        }
        x.copy_(torch::randn_like(x));
        graph.replay();
        side.synchronize();
      }
      torch::Tensor replayed = captured.clone();
      torch::Tensor eager = call(x, mask);
      EXPECT_LT(max_rel_error(replayed, eager), 1e-6);
    }
}
