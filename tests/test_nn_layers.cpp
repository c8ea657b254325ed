#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <functional>
#include <set>
#include <string>
#include <vector>

#include "colt5/nn/attention.h"
#include "colt5/nn/image.h"
#include "colt5/nn/layers.h"
#include "colt5/nn/local_attention.h"
#include "nn/attention_core.h"
#include "support/expect_error.h"

using colt5::testing::expect_error;
using colt5::testing::max_rel_error;

namespace {

using namespace colt5::nn;
std::set<std::string> param_names(const torch::nn::Module& m) {
  std::set<std::string> out;
  for (const auto& p : m.named_parameters()) out.insert(p.key());
  return out;
}

std::set<std::string> buffer_names(const torch::nn::Module& m) {
  std::set<std::string> out;
  for (const auto& p : m.named_buffers()) out.insert(p.key());
  return out;
}
// Randomizes every parameter (so gains and null key/values are not trivial).
void randomize(torch::nn::Module& m) {
  torch::NoGradGuard guard;
  for (auto& p : m.parameters()) p.copy_(torch::randn_like(p) * 0.5 + (p.dim() == 1 ? 1.0 : 0.0));
}

torch::Tensor naive_rmsnorm(const torch::Tensor& x, const torch::Tensor& gamma) {
  auto norm = x.pow(2).sum(-1, true).sqrt().clamp_min(1e-12);
  return x / norm * std::sqrt(static_cast<double>(x.size(-1))) * gamma;
}

// Rotation of pairs (i, i + d/2) of a vector by angles pos * inv_freq[i].
torch::Tensor naive_rotate(const torch::Tensor& v, double pos, const torch::Tensor& inv_freq) {
  const int64_t half = v.size(-1) / 2;
  auto out = v.clone();
  for (int64_t i = 0; i < half; ++i) {
    const double a = pos * inv_freq[i].item<double>();
    const double x1 = v[i].item<double>(), x2 = v[i + half].item<double>();
    out[i] = x1 * std::cos(a) - x2 * std::sin(a);
    out[i + half] = x2 * std::cos(a) + x1 * std::sin(a);
  }
  return out;
}

// ---------------------------------------------------------------- small layers

TEST(NnLayers, RMSNormIsNormalizeTimesSqrtDimTimesGamma) {
  torch::manual_seed(0);
  RMSNorm norm(16);
  norm->to(torch::kDouble);
  randomize(*norm);
  auto x = torch::randn({3, 5, 16}, torch::kDouble);
  x[0][0].zero_();
  auto y = norm(x);
  EXPECT_EQ(y.sizes(), x.sizes());
  EXPECT_LT(max_rel_error(y, naive_rmsnorm(x, norm->gamma)), 1e-14);
  EXPECT_TRUE(torch::isfinite(y).all().item<bool>());
  EXPECT_EQ(y[0][0].abs().max().item<double>(), 0.0);
  EXPECT_EQ(param_names(*norm), (std::set<std::string>{"gamma"}));
  expect_error([&] { norm(torch::randn({2, 8})); }, "dimension 16");
}

// RMSNorm's written-out backward against autograd through the composite
// formula, in float64: ordinary rows, a zero row and a row below the norm's
// floor (where the factor is constant); the input and gamma gradients. It is
// not differentiable twice and says so.
TEST(NnLayers, RMSNormBackwardMatchesAutogradOfTheFormula) {
  torch::manual_seed(1);
  RMSNorm norm(16);
  norm->to(torch::kDouble);
  randomize(*norm);
  auto x0 = torch::randn({3, 5, 16}, torch::kDouble);
  x0[0][0].zero_();
  x0[1][2].fill_(1e-15);  // ||x|| = 4e-15 < 1e-12
  auto g = torch::randn({3, 5, 16}, torch::kDouble);
  auto x = x0.clone().requires_grad_(true);
  norm(x).backward(g);
  auto xr = x0.clone().requires_grad_(true);
  auto gamma = norm->gamma.detach().clone().requires_grad_(true);
  auto factor = xr.norm(2, {-1}, true).clamp_min(1e-12).reciprocal() * std::sqrt(16.0);
  (xr * factor * gamma).backward(g);
  EXPECT_LT(max_rel_error(x.grad(), xr.grad()), 1e-12);
  EXPECT_LT(max_rel_error(norm->gamma.grad(), gamma.grad()), 1e-12);
  EXPECT_TRUE(torch::isfinite(x.grad()).all().item<bool>());
  // float32 against float64
  RMSNorm norm32(16);
  norm32->gamma.data().copy_(norm->gamma.detach());
  auto x32 = x0.to(torch::kFloat).requires_grad_(true);
  norm32(x32).backward(g.to(torch::kFloat));
  EXPECT_LT(max_rel_error(x32.grad(), x.grad()), 1e-5);
  EXPECT_LT(max_rel_error(norm32->gamma.grad(), norm->gamma.grad()), 1e-5);
  // no second derivative
  auto x2 = x0.clone().requires_grad_(true);
  auto y = norm(x2).sum();
  expect_error([&] { torch::autograd::grad({y}, {x2}, {}, /*retain_graph=*/true, /*create_graph=*/true); },
               "not differentiable");
}

// forward_passing: the output of forward and x passed on (x's values and
// storage), whose gradient joins the norm's: the same gradients as x used
// directly twice, including where the passed x gets a strided gradient (a
// sum's) or none.
TEST(NnLayers, NormsPassXOnWithItsGradient) {
  torch::manual_seed(3);
  RMSNorm norm(16);
  norm->to(torch::kDouble);
  randomize(*norm);
  FeedForward ff(FeedForwardOptions(16).mult(2));
  ff->to(torch::kDouble);
  randomize(*ff);
  auto dopt = torch::TensorOptions().dtype(torch::kDouble).requires_grad(true);
  torch::Tensor w = torch::randn({16}, dopt), b = torch::randn({16}, dopt);
  auto x0 = torch::randn({3, 5, 16}, torch::kDouble);
  auto gy = torch::randn({3, 5, 16}, torch::kDouble), gp = torch::randn({3, 5, 16}, torch::kDouble);
  using Fn = std::function<std::pair<torch::Tensor, torch::Tensor>(const torch::Tensor&)>;
  struct Case {
    const char* name;
    Fn fn;
    std::vector<torch::Tensor> params;
  };
  const Case cases[] = {
      {"RMSNorm", [&](const torch::Tensor& x) { return norm->forward_passing(x); }, norm->parameters()},
      {"FeedForward", [&](const torch::Tensor& x) { return ff->forward_passing(x); }, ff->parameters()},
      {"layer_norm",
       [&](const torch::Tensor& x) {
         torch::Tensor passed;
         torch::Tensor y = colt5::nn::layer_norm(x, w, b, 1e-5, false, true, &passed);
         return std::make_pair(y, passed);
       },
       {w, b}}};
  for (const Case& c : cases) {
    for (int use = 0; use < 3; ++use) {  // passed x: weighted, summed, unused
      SCOPED_TRACE(std::string(c.name) + " use " + std::to_string(use));
      auto loss = [&](const torch::Tensor& y, const torch::Tensor& passed) {
        torch::Tensor l = (y * gy).sum();
        if (use == 0) l = l + (passed * gp).sum();
        if (use == 1) l = l + passed.sum();
        return l;
      };
      auto x = x0.clone().requires_grad_(true), xr = x0.clone().requires_grad_(true);
      auto [y, passed] = c.fn(x);
      EXPECT_EQ(passed.data_ptr(), x.data_ptr());
      EXPECT_TRUE(torch::equal(passed.detach(), x0));
      std::vector<torch::Tensor> inputs{x}, inputs_r{xr};
      inputs.insert(inputs.end(), c.params.begin(), c.params.end());
      inputs_r.insert(inputs_r.end(), c.params.begin(), c.params.end());
      auto got = torch::autograd::grad({loss(y, passed)}, inputs);
      auto want = torch::autograd::grad({loss(c.fn(xr).first, xr)}, inputs_r);
      ASSERT_EQ(got.size(), want.size());
      for (size_t i = 0; i < got.size(); ++i) EXPECT_LT(max_rel_error(got[i], want[i]), 1e-12) << "input " << i;
    }
  }
}

TEST(NnLayers, FeedForwardNamesAndFormula) {
  torch::manual_seed(1);
  FeedForward ff(FeedForwardOptions(12).mult(0.5));
  EXPECT_EQ(param_names(*ff), (std::set<std::string>{"0.gamma", "1.weight", "1.bias", "3.weight", "3.bias"}));
  EXPECT_EQ(ff->proj_in->weight.sizes(), (std::vector<int64_t>{6, 12}));
  EXPECT_EQ(FeedForward(FeedForwardOptions(10).mult(0.35))->hidden_dim(), 3);  // int(3.5)
  ff->to(torch::kDouble);
  randomize(*ff);
  auto x = torch::randn({2, 7, 12}, torch::kDouble);
  auto h = torch::matmul(naive_rmsnorm(x, ff->norm->gamma), ff->proj_in->weight.t()) + ff->proj_in->bias;
  h = 0.5 * h * (1.0 + torch::erf(h / std::sqrt(2.0)));
  auto want = torch::matmul(h, ff->proj_out->weight.t()) + ff->proj_out->bias;
  EXPECT_LT(max_rel_error(ff(x), want), 1e-13);
  expect_error([] { FeedForward(FeedForwardOptions(3).mult(0.2)); }, "hidden");
}

TEST(NnLayers, RotaryFrequenciesAndRotation) {
  RotaryEmbedding rot(8);
  EXPECT_EQ(buffer_names(*rot), (std::set<std::string>{"inv_freq"}));
  EXPECT_TRUE(param_names(*rot).empty());
  auto inv = rot->inv_freq;
  ASSERT_EQ(inv.sizes(), (std::vector<int64_t>{4}));
  EXPECT_EQ(inv.scalar_type(), torch::kFloat);
  EXPECT_NEAR(inv[1].item<double>(), std::pow(10000.0, -0.25), 1e-7);
  rot->to(torch::kDouble);
  auto freqs = rot(5);
  ASSERT_EQ(freqs.sizes(), (std::vector<int64_t>{5, 8}));
  EXPECT_DOUBLE_EQ(freqs[3][5].item<double>(), 3 * rot->inv_freq[1].item<double>());
  auto t = torch::randn({5, 8}, torch::kDouble);
  auto got = apply_rotary_pos_emb(freqs, t);
  for (int64_t p = 0; p < 5; ++p)
    EXPECT_LT(max_rel_error(got[p], naive_rotate(t[p], static_cast<double>(p), rot->inv_freq)), 1e-14);
  expect_error([] { RotaryEmbedding(7); }, "even");
  expect_error([&] { apply_rotary_pos_emb(freqs, torch::randn({5, 6})); }, "last dimension");
}

// ---------------------------------------------------------------- heavy Attention

// The heavy attention written out per batch row and head.
torch::Tensor naive_attention(AttentionImpl& a, const torch::Tensor& x, const torch::Tensor& ctx /* b r m d */,
                              const torch::Tensor& mask /* b r m or undefined */, const torch::Tensor& skv /* b r m */,
                              const torch::Tensor& sq /* b n */, const torch::Tensor& rot_q /* b n dh or undef */,
                              const torch::Tensor& rot_k /* b r m dh */, const torch::Tensor& inv_freq) {
  const int64_t b = x.size(0), n = x.size(1), H = a.options.heads(), dh = a.options.dim_head();
  const int64_t r = ctx.size(1), m = ctx.size(2), hpr = H / r;
  auto xn = naive_rmsnorm(x, a.norm->gamma);
  auto cn = naive_rmsnorm(ctx, a.norm->gamma);
  auto wq = a.to_q->weight, wkv = a.to_kv->weight;
  auto out = torch::zeros({b, n, H * dh}, torch::kDouble);
  for (int64_t bi = 0; bi < b; ++bi) {
    for (int64_t hh = 0; hh < H; ++hh) {
      const int64_t route = hh / hpr, row0 = hh * 2 * dh;
      auto q = torch::matmul(xn[bi], wq.slice(0, hh * dh, (hh + 1) * dh).t());
      auto k = torch::matmul(cn[bi][route], wkv.slice(0, row0, row0 + dh).t());
      auto v = torch::matmul(cn[bi][route], wkv.slice(0, row0 + dh, row0 + 2 * dh).t());
      if (sq.defined()) q = q * sq[bi].unsqueeze(-1);
      if (skv.defined()) {
        v = v * skv[bi][route].unsqueeze(-1);
        if (a.options.multiply_keys_by_score()) k = k * skv[bi][route].unsqueeze(-1);
      }
      if (rot_q.defined()) {
        for (int64_t i = 0; i < n; ++i) q[i] = naive_rotate(q[i].clone(), rot_q[bi][i].item<double>(), inv_freq);
        for (int64_t j = 0; j < m; ++j) k[j] = naive_rotate(k[j].clone(), rot_k[bi][route][j].item<double>(), inv_freq);
      }
      k = torch::cat({a.null_kv[0][hh].unsqueeze(0), k}, 0);
      v = torch::cat({a.null_kv[1][hh].unsqueeze(0), v}, 0);
      auto sim = torch::matmul(q, k.t()) / std::sqrt(static_cast<double>(dh));
      if (mask.defined()) {
        auto keep = torch::cat({torch::ones({1}, torch::kBool), mask[bi][route]});
        sim = sim.masked_fill(keep.logical_not().unsqueeze(0), -INFINITY);
      }
      out[bi].slice(1, hh * dh, (hh + 1) * dh) = torch::matmul(sim.softmax(-1), v);
    }
  }
  return torch::matmul(out, a.to_out->weight.t());
}

TEST(NnLayers, AttentionParameterNames) {
  Attention attn(AttentionOptions(32).dim_head(8).heads(4));
  EXPECT_EQ(param_names(*attn),
            (std::set<std::string>{"norm.gamma", "null_kv", "to_q.weight", "to_kv.weight", "to_out.weight"}));
  EXPECT_EQ(attn->null_kv.sizes(), (std::vector<int64_t>{2, 4, 8}));
  EXPECT_EQ(attn->to_kv->weight.sizes(), (std::vector<int64_t>{64, 32}));
  EXPECT_TRUE(buffer_names(*attn).empty());
  SelfAttention sa(SelfAttentionOptions(32).dim_head(8).heads(2).prenorm(true));
  EXPECT_EQ(param_names(*sa), (std::set<std::string>{"norm.gamma", "to_qkv.weight", "to_out.weight"}));
  SelfAttention sa_plain(SelfAttentionOptions(32).dim_head(8).heads(2));
  EXPECT_EQ(param_names(*sa_plain), (std::set<std::string>{"to_qkv.weight", "to_out.weight"}));
}

TEST(NnLayers, AttentionMatchesNaiveFloat64TwoRoutes) {
  torch::manual_seed(2);
  for (bool mult_keys : {false, true}) {
    Attention attn(AttentionOptions(16).dim_head(4).heads(4).multiply_keys_by_score(mult_keys));
    attn->to(torch::kDouble);
    randomize(*attn);
    const int64_t b = 2, n = 5, r = 2, m = 6;
    auto x = torch::randn({b, n, 16}, torch::kDouble);
    auto ctx = torch::randn({b, r, m, 16}, torch::kDouble);
    auto mask = torch::rand({b, r, m}) > 0.3;
    mask[1][0].fill_(false);  // a fully masked route still has the null key
    auto skv = torch::rand({b, r, m}, torch::kDouble);
    auto sq = torch::rand({b, n}, torch::kDouble);
    RotaryEmbedding rot(4);
    rot->to(torch::kDouble);
    auto freqs = rot(20);
    auto pos_q = torch::randint(0, 20, {b, n});
    auto pos_k = torch::randint(0, 20, {b, r, m});
    auto fq = freqs.index({pos_q}).unsqueeze(1);  // b 1 n d
    auto fk = freqs.index({pos_k}).unsqueeze(2);  // b r 1 m d
    auto got = attn->forward(x, ctx, mask, skv, sq, {fq, fk});
    auto want = naive_attention(*attn, x, ctx, mask, skv, sq, pos_q.to(torch::kDouble), pos_k.to(torch::kDouble),
                                rot->inv_freq);
    ASSERT_EQ(got.sizes(), (std::vector<int64_t>{b, n, 16}));
    EXPECT_LT(max_rel_error(got, want), 1e-12) << "multiply_keys_by_score " << mult_keys;

    // Self attention path: no context, 2-D mask, no rotary.
    auto mask2 = torch::rand({b, n}) > 0.4;
    auto got2 = attn->forward(x, {}, mask2);
    auto want2 = naive_attention(*attn, x, x.unsqueeze(1), mask2.unsqueeze(1), {}, {}, {}, {}, {});
    EXPECT_LT(max_rel_error(got2, want2), 1e-12);
  }
}

TEST(NnLayers, AttentionFloat32AgreesWithFloat64AndFusedPath) {
  torch::manual_seed(3);
  Attention attn(AttentionOptions(32).dim_head(8).heads(4).use_flash(false));
  randomize(*attn);
  auto x = torch::randn({2, 9, 32});
  auto ctx = torch::randn({2, 2, 11, 32});
  auto mask = torch::rand({2, 2, 11}) > 0.3;
  auto skv = torch::rand({2, 2, 11});
  auto out32 = attn->forward(x, ctx, mask, skv);
  attn->options.use_flash(true);
  auto fused32 = attn->forward(x, ctx, mask, skv);
  EXPECT_LT(max_rel_error(fused32, out32), 1e-5);
  auto attn64 = std::dynamic_pointer_cast<AttentionImpl>(attn->clone());
  attn64->to(torch::kDouble);
  auto out64 = attn64->forward(x.to(torch::kDouble), ctx.to(torch::kDouble), mask, skv.to(torch::kDouble));
  EXPECT_EQ(out64.scalar_type(), torch::kDouble);
  EXPECT_LT(max_rel_error(out32, out64), 1e-5);
  // The fused flag does not change float64 results: they take the exact path.
  attn64->options.use_flash(false);
  auto exact64 = attn64->forward(x.to(torch::kDouble), ctx.to(torch::kDouble), mask, skv.to(torch::kDouble));
  EXPECT_TRUE(torch::equal(out64, exact64));
}

TEST(NnLayers, AttentionBadInputsNameTheProblem) {
  Attention attn(AttentionOptions(16).dim_head(4).heads(3));
  auto x = torch::randn({2, 5, 16});
  expect_error([&] { attn->forward(x, torch::randn({2, 2, 6, 16})); }, "divisible by the number of key/value routes");
  expect_error([&] { attn->forward(torch::randn({5, 16})); }, "x must be (b, n, 16)");
  expect_error([&] { attn->forward(torch::randn({2, 5, 12})); }, "x must be (b, n, 16)");
  expect_error([&] { attn->forward(x, torch::randn({3, 6, 16})); }, "context must be");
  expect_error([&] { attn->forward(x, {}, torch::ones({2, 4}, torch::kBool)); }, "mask must be (b, m)");
  expect_error([&] { attn->forward(x, {}, torch::ones({2, 5})); }, "mask must be a bool tensor");
  expect_error([&] { attn->forward(x, {}, {}, torch::ones({2, 4})); }, "normalized_scores_kv");
  expect_error([&] { attn->forward(x, {}, {}, {}, torch::ones({2, 4})); }, "normalized_scores_q");
  expect_error([&] { attn->forward(x, {}, {}, {}, {}, {torch::zeros({5, 4}), torch::Tensor()}); }, "rotary_emb");
  expect_error([&] { attn->forward(x, {}, {}, {}, {}, {torch::zeros({5, 6}), torch::zeros({5, 4})}); }, "query rotary");
}

TEST(NnLayers, AttendMatchesSoftmaxFormula) {
  torch::manual_seed(4);
  auto q = torch::randn({2, 3, 4, 8}, torch::kDouble);
  auto k = torch::randn({2, 3, 6, 8}, torch::kDouble);
  auto v = torch::randn({2, 3, 6, 8}, torch::kDouble);
  auto mask = torch::rand({2, 1, 1, 6}) > 0.5;
  mask.select(-1, 0).fill_(true);
  auto sim = torch::matmul(q, k.transpose(-1, -2)) / std::sqrt(8.0);
  auto want = torch::matmul(sim.masked_fill(mask.logical_not(), -INFINITY).softmax(-1), v);
  EXPECT_LT(max_rel_error(attend(q, k, v, mask), want), 1e-14);
  auto got32 = attend(q.to(torch::kFloat), k.to(torch::kFloat), v.to(torch::kFloat), mask, true);
  EXPECT_LT(max_rel_error(got32, want), 1e-5);
  expect_error([&] { attend(q, k, v, torch::ones({2, 2, 1, 6}, torch::kBool)); }, "does not broadcast");
  expect_error([&] { attend(q, k.slice(-1, 0, 4), v); }, "k and v must be");
}

// ---------------------------------------------------------------- SelfAttention

TEST(NnLayers, SelfAttentionMatchesNaive) {
  torch::manual_seed(5);
  SelfAttention sa(SelfAttentionOptions(12).dim_head(3).heads(2).prenorm(true));
  sa->to(torch::kDouble);
  randomize(*sa);
  auto x = torch::randn({2, 7, 12}, torch::kDouble);
  auto xn = naive_rmsnorm(x, sa->norm->gamma);
  auto qkv = torch::matmul(xn, sa->to_qkv->weight.t());
  std::vector<torch::Tensor> heads;
  for (int64_t h = 0; h < 2; ++h) {
    auto q = qkv.slice(-1, h * 3, h * 3 + 3), k = qkv.slice(-1, 6 + h * 3, 6 + h * 3 + 3),
         v = qkv.slice(-1, 12 + h * 3, 12 + h * 3 + 3);
    heads.push_back(torch::matmul((torch::matmul(q, k.transpose(1, 2)) / std::sqrt(3.0)).softmax(-1), v));
  }
  auto want = torch::matmul(torch::cat(heads, -1), sa->to_out->weight.t());
  EXPECT_LT(max_rel_error(sa(x), want), 1e-13);
  expect_error([&] { sa(torch::randn({2, 7, 11})); }, "x must be (b, n, 12)");
}

// ---------------------------------------------------------------- LocalMHA

struct LocalSpec {
  int64_t window, back, fwd;
  bool causal, exact;
};

// local-attention 1.10.0 semantics written per query: zero-padded keys and
// values past the end are visible unless a mask is given; window slots
// before the first / after the last window are masked (a fully masked row
// averages every slot, those holding -1).
torch::Tensor naive_local(const torch::Tensor& q /* n d */, const torch::Tensor& k, const torch::Tensor& v,
                          const torch::Tensor& mask /* n or undefined */, const LocalSpec& s,
                          const torch::Tensor& inv_freq /* or undefined */) {
  const int64_t n = q.size(0), d = q.size(1), ws = s.window;
  const int64_t N = (n + ws - 1) / ws * ws, W = N / ws, L = (s.back + s.fwd + 1) * ws;
  const double scale = std::pow(static_cast<double>(d), -0.5);
  auto out = torch::zeros({n, d}, torch::kDouble);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t wi = i / ws, p = i % ws;
    auto qi = q[i] * scale;
    if (inv_freq.defined()) qi = naive_rotate(qi, static_cast<double>(L - ws + p), inv_freq);
    std::vector<double> sims(L);
    std::vector<bool> keep(L);
    std::vector<torch::Tensor> vals(L);
    bool any = false;
    for (int64_t slot = 0; slot < L; ++slot) {
      const int64_t wj = wi - s.back + slot / ws;
      if (wj < 0 || wj >= W) {
        keep[slot] = false;
        vals[slot] = -torch::ones({d}, torch::kDouble);
        sims[slot] = 0;
        continue;
      }
      const int64_t j = wj * ws + slot % ws;
      auto kj = j < n ? k[j] : torch::zeros({d}, torch::kDouble);
      vals[slot] = j < n ? v[j] : torch::zeros({d}, torch::kDouble);
      if (inv_freq.defined()) kj = naive_rotate(kj, static_cast<double>(slot), inv_freq);
      sims[slot] = (qi * kj).sum().item<double>();
      bool ok = true;
      if (s.causal) {
        ok = j <= i && !(s.exact && i > j + ws * s.back);
      } else if (s.exact) {
        ok = !(j - ws * s.fwd > i) && !(i > j + ws * s.back);
      }
      if (mask.defined()) ok = ok && j < n && mask[j].item<bool>();
      keep[slot] = ok;
      any = any || ok;
    }
    auto acc = torch::zeros({d}, torch::kDouble);
    if (!any) {
      for (int64_t slot = 0; slot < L; ++slot) acc += vals[slot] / static_cast<double>(L);
    } else {
      double mx = -INFINITY, z = 0;
      for (int64_t slot = 0; slot < L; ++slot)
        if (keep[slot]) mx = std::max(mx, sims[slot]);
      for (int64_t slot = 0; slot < L; ++slot)
        if (keep[slot]) z += std::exp(sims[slot] - mx);
      for (int64_t slot = 0; slot < L; ++slot)
        if (keep[slot]) acc += vals[slot] * (std::exp(sims[slot] - mx) / z);
    }
    out[i] = acc;
  }
  return out;
}

torch::Tensor naive_local_mha(LocalMHAImpl& m, const torch::Tensor& x, const torch::Tensor& mask, const LocalSpec& s) {
  const int64_t b = x.size(0), n = x.size(1), h = m.options.heads(), dh = m.options.dim_head();
  auto xn = m.norm ? torch::layer_norm(x, {x.size(-1)}, m.norm->weight, m.norm->bias, 1e-5) : x;
  auto qkv = torch::matmul(xn, m.to_qkv->weight.t());
  torch::Tensor inv_freq = m.attn_fn->rel_pos ? m.attn_fn->rel_pos->inv_freq : torch::Tensor();
  auto out = torch::zeros({b, n, h * dh}, torch::kDouble);
  for (int64_t bi = 0; bi < b; ++bi)
    for (int64_t hh = 0; hh < h; ++hh) {
      auto q = qkv[bi].slice(-1, hh * dh, (hh + 1) * dh);
      auto k = qkv[bi].slice(-1, h * dh + hh * dh, h * dh + (hh + 1) * dh);
      auto v = qkv[bi].slice(-1, 2 * h * dh + hh * dh, 2 * h * dh + (hh + 1) * dh);
      out[bi].slice(-1, hh * dh, (hh + 1) * dh) = naive_local(q, k, v, mask.defined() ? mask[bi] : mask, s, inv_freq);
    }
  return torch::matmul(out, m.to_out->weight.t());
}

// As ConditionalRoutedAttention builds it: non-causal, window light_window_size / 2, exact window.
LocalMHAOptions routed_light(int64_t dim, int64_t light_window_size) {
  return LocalMHAOptions(dim, light_window_size / 2)
      .dim_head(4)
      .heads(2)
      .prenorm(true)
      .causal(false)
      .use_rotary_pos_emb(false)
      .look_backward(1)
      .look_forward(1);
}

// As ConditionalRoutedAutoregressiveAttention builds it: causal, not exact.
LocalMHAOptions autoregressive_light(int64_t dim, int64_t light_window_size) {
  return LocalMHAOptions(dim, light_window_size)
      .dim_head(4)
      .heads(2)
      .prenorm(true)
      .causal(true)
      .exact_windowsize(false)
      .use_rotary_pos_emb(false);
}

TEST(NnLayers, LocalMHAParameterNames) {
  LocalMHA light(routed_light(16, 8));
  EXPECT_EQ(param_names(*light), (std::set<std::string>{"norm.weight", "norm.bias", "to_qkv.weight", "to_out.weight"}));
  EXPECT_TRUE(buffer_names(*light).empty());
  LocalMHA defaults(LocalMHAOptions(16, 4).dim_head(4).heads(2));
  EXPECT_EQ(param_names(*defaults), (std::set<std::string>{"to_qkv.weight", "to_out.weight"}));
  EXPECT_EQ(buffer_names(*defaults), (std::set<std::string>{"attn_fn.rel_pos.inv_freq"}));
  EXPECT_EQ(light->to_qkv->weight.sizes(), (std::vector<int64_t>{24, 16}));
  EXPECT_EQ(defaults->attn_fn->look_forward(), 1);
  EXPECT_EQ(LocalMHA(autoregressive_light(16, 8))->attn_fn->look_forward(), 0);
}

TEST(NnLayers, LocalMHAMatchesNaiveFloat64) {
  torch::manual_seed(6);
  struct Case {
    LocalMHAOptions opts;
    LocalSpec spec;
  };
  std::vector<Case> cases = {
      {routed_light(16, 8), {4, 1, 1, false, true}},
      {autoregressive_light(16, 4), {4, 1, 0, true, false}},
      {autoregressive_light(16, 4).exact_windowsize(true), {4, 1, 0, true, true}},
      {LocalMHAOptions(16, 3).dim_head(4).heads(2), {3, 1, 1, false, true}},  // rotary on (the default)
      {LocalMHAOptions(16, 3).dim_head(4).heads(2).causal(true).look_backward(2), {3, 2, 0, true, true}},
      {routed_light(16, 8).exact_windowsize(false).look_backward(2), {4, 2, 1, false, false}},
  };
  for (size_t ci = 0; ci < cases.size(); ++ci) {
    LocalMHA mha(cases[ci].opts);
    mha->to(torch::kDouble);
    randomize(*mha);
    for (int64_t n : {8, 11, 2}) {  // a multiple of the window, not a multiple, shorter than a window
      auto x = torch::randn({2, n, 16}, torch::kDouble);
      auto want = naive_local_mha(*mha, x, {}, cases[ci].spec);
      auto got = mha(x);
      ASSERT_EQ(got.sizes(), x.sizes());
      EXPECT_LT(max_rel_error(got, want), 1e-12) << "case " << ci << " n " << n;
      auto mask = torch::rand({2, n}) > 0.3;
      mask[1].fill_(false);  // a fully padded row
      auto got_m = mha(x, mask);
      EXPECT_TRUE(torch::isfinite(got_m).all().item<bool>()) << "case " << ci << " n " << n;
      EXPECT_LT(max_rel_error(got_m, naive_local_mha(*mha, x, mask, cases[ci].spec)), 1e-12)
          << "case " << ci << " n " << n << " (masked)";
    }
  }
}

TEST(NnLayers, LocalMHACausalOutputsIgnoreTheFuture) {
  torch::manual_seed(7);
  for (bool exact : {false, true}) {
    // Rotary on, with xpos scaling for the exact-window variant.
    LocalMHA mha(autoregressive_light(16, 4).exact_windowsize(exact).use_rotary_pos_emb(true).use_xpos(exact));
    auto x = torch::randn({1, 13, 16});
    auto y = mha(x);
    for (int64_t t : {12, 7, 4, 1}) {
      auto x2 = x.clone();
      x2[0][t] += torch::randn({16}) * 3;
      auto y2 = mha(x2);
      EXPECT_TRUE(torch::equal(y.slice(1, 0, t), y2.slice(1, 0, t))) << "t " << t << " exact " << exact;
      EXPECT_FALSE(torch::allclose(y[0][t], y2[0][t])) << "t " << t;
    }
  }
  // The non-causal one does see one window ahead.
  LocalMHA both(routed_light(16, 8));
  auto x = torch::randn({1, 12, 16});
  auto x2 = x.clone();
  x2[0][5] += torch::randn({16});
  EXPECT_FALSE(torch::allclose(both(x)[0][2], both(x2)[0][2]));
}

TEST(NnLayers, LocalMHAFloat32AgreesWithFloat64) {
  torch::manual_seed(8);
  LocalMHA mha(routed_light(16, 8));
  randomize(*mha);
  auto x = torch::randn({2, 21, 16});
  auto mask = torch::rand({2, 21}) > 0.2;
  auto y32 = mha(x, mask);
  mha->to(torch::kDouble);
  auto y64 = mha(x.to(torch::kDouble), mask);
  EXPECT_EQ(y64.scalar_type(), torch::kDouble);
  EXPECT_LT(max_rel_error(y32, y64), 1e-5);
}

TEST(NnLayers, LocalMHAGradientsAreFinite) {
  torch::manual_seed(9);
  LocalMHA mha(routed_light(16, 8));
  auto x = torch::randn({2, 10, 16}, torch::requires_grad());
  auto mask = torch::ones({2, 10}, torch::kBool);
  mask[1].fill_(false);
  mha(x, mask).sum().backward();
  EXPECT_TRUE(torch::isfinite(x.grad()).all().item<bool>());
  for (const auto& p : mha->parameters()) {
    ASSERT_TRUE(p.grad().defined());
    EXPECT_TRUE(torch::isfinite(p.grad()).all().item<bool>());
  }
}

TEST(NnLayers, LocalMHABadInputsNameTheProblem) {
  LocalMHA mha(routed_light(16, 8));
  expect_error([&] { mha(torch::randn({10, 16})); }, "x must be (b, n, 16)");
  expect_error([&] { mha(torch::randn({2, 10, 15})); }, "x must be (b, n, 16)");
  expect_error([&] { mha(torch::randn({2, 10, 16}), torch::ones({2, 9}, torch::kBool)); }, "mask must be (2, 10)");
  expect_error([&] { mha(torch::randn({2, 10, 16}), torch::ones({2, 10})); }, "mask must be a bool tensor");
  expect_error([&] { mha(torch::randn({2, 0, 16})); }, "empty");
  expect_error([] { LocalMHA(LocalMHAOptions(16, 4).causal(true).look_forward(1)); }, "cannot look forward");
  expect_error([] { LocalMHA(LocalMHAOptions(16, 0)); }, "window_size must be positive");
  LocalAttention core(LocalAttentionOptions(4));
  auto t = torch::randn({1, 6, 4});
  expect_error([&] { core(t, t, t); }, "divisible by the window size");
}

TEST(NnLayers, LocalMHAOutputBiasIsAddedAtEveryPosition) {
  torch::manual_seed(12);
  LocalMHA mha(routed_light(16, 8));
  randomize(*mha);
  mha->to(torch::kDouble);
  auto x = torch::randn({2, 21, 16}, torch::kDouble);
  auto mask = torch::rand({2, 21}) > 0.2;
  auto bias = torch::randn({16}, torch::TensorOptions().dtype(torch::kDouble).requires_grad(true));
  for (const bool masked : {false, true}) {
    SCOPED_TRACE(masked ? "masked" : "no mask");
    torch::Tensor m = masked ? mask : torch::Tensor();
    auto want = mha(x, m) + bias;
    auto got = mha->forward_with_output_bias(x, m, bias);
    EXPECT_LT(max_rel_error(got.detach(), want.detach()), 1e-12);
    auto g = torch::randn_like(got);
    auto gb_got = torch::autograd::grad({got}, {bias}, {g})[0];
    auto gb_want = torch::autograd::grad({want}, {bias}, {g})[0];
    EXPECT_LT(max_rel_error(gb_got, gb_want), 1e-12);
  }
  expect_error([&] { mha->forward_with_output_bias(x, mask, torch::randn({15}, torch::kDouble)); },
               "out_bias must be (16)");
}

// ---------------------------------------------------------------- image attention

ConditionalRoutedImageAttentionOptions small_image_attn(int64_t dim, int64_t heavy_q, int64_t heavy_kv,
                                                        int64_t window) {
  return ConditionalRoutedImageAttentionOptions(dim, heavy_q, heavy_kv)
      .light_dim_head(8)
      .light_heads(2)
      .light_window_size(window)
      .heavy_dim_head(8)
      .heavy_heads(2)
      .router_kwargs(RouterKwargs().eps(1.0));
}

TEST(NnLayers, ImageAttentionReadmeShapeReduced) {
  torch::manual_seed(10);
  // The README's example at reduced size: channels first, 64 heavy tokens of 1024.
  ConditionalRoutedImageAttention attn(small_image_attn(32, 64, 64, 8).channel_first(true));
  auto fmap = torch::randn({1, 32, 32, 32});
  torch::Tensor out;
  {
    torch::NoGradGuard no_grad;
    out = attn(fmap);
  }
  EXPECT_EQ(out.sizes(), (std::vector<int64_t>{1, 32, 32, 32}));
  EXPECT_TRUE(torch::isfinite(out).all().item<bool>());
  // Heavy tokens outnumbering a window's 16 tokens: routing is over the whole map.
  ConditionalRoutedImageAttention small_windows(small_image_attn(32, 64, 64, 4).channel_first(true));
  torch::NoGradGuard no_grad;
  EXPECT_EQ(small_windows(fmap).sizes(), (std::vector<int64_t>{1, 32, 32, 32}));
  // Channels last gives the same numbers, laid out the other way.
  attn->options.channel_first(false);
  auto out_last = attn(fmap.permute({0, 2, 3, 1}).contiguous());
  EXPECT_EQ(out_last.sizes(), (std::vector<int64_t>{1, 32, 32, 32}));
  EXPECT_LT(max_rel_error(out_last.permute({0, 3, 1, 2}), out), 1e-5);
}

TEST(NnLayers, ImageAttentionParameterNames) {
  ConditionalRoutedImageAttention attn(small_image_attn(16, 4, 4, 2));
  EXPECT_EQ(param_names(*attn),
            (std::set<std::string>{"light_attn.norm.gamma", "light_attn.to_qkv.weight", "light_attn.to_out.weight",
                                   "null_q_token", "q_router.routing_token", "kv_router.routing_token",
                                   "heavy_attn.norm.gamma", "heavy_attn.null_kv", "heavy_attn.to_q.weight",
                                   "heavy_attn.to_kv.weight", "heavy_attn.to_out.weight"}));
}

TEST(NnLayers, ImageAttentionIsWindowedLightPlusWholeMapHeavy) {
  torch::manual_seed(11);
  // Enough heavy tokens for every position: no routing, so the heavy branch is
  // dense attention over the whole map and the sum can be written directly.
  const int64_t b = 2, H = 4, W = 6, d = 16, ws = 2;
  ConditionalRoutedImageAttention attn(small_image_attn(d, H * W, H * W, ws));
  attn->to(torch::kDouble);
  randomize(*attn);
  auto x = torch::randn({b, H, W, d}, torch::kDouble);
  auto got = attn(x);
  auto want = torch::zeros({b, H, W, d}, torch::kDouble);
  for (int64_t i = 0; i < H; i += ws)
    for (int64_t j = 0; j < W; j += ws) {
      auto win = x.slice(1, i, i + ws).slice(2, j, j + ws).reshape({b, ws * ws, d});
      want.slice(1, i, i + ws).slice(2, j, j + ws) = attn->light_attn(win).reshape({b, ws, ws, d});
    }
  auto tokens = x.reshape({b, H * W, d});
  want += attn->heavy_attn->forward(tokens, tokens, {}, torch::ones({b, H * W}, torch::kDouble)).reshape({b, H, W, d});
  EXPECT_LT(max_rel_error(got, want), 1e-12);

  // With routing: masks as (b, h, w) or (b, h * w) agree, output finite.
  auto routed = ConditionalRoutedImageAttention(small_image_attn(d, 6, 8, ws));
  routed->to(torch::kDouble);
  auto mask = torch::rand({b, H, W}) > 0.3;
  auto a = routed(x, mask);
  auto c = routed(x, mask.reshape({b, H * W}));
  EXPECT_TRUE(torch::equal(a, c));
  EXPECT_TRUE(torch::isfinite(a).all().item<bool>());
}

TEST(NnLayers, ImageAttentionBadInputsNameTheProblem) {
  ConditionalRoutedImageAttention attn(small_image_attn(16, 4, 4, 4));
  expect_error([&] { attn(torch::randn({1, 16, 16})); }, "4-D feature map");
  expect_error([&] { attn(torch::randn({1, 8, 6, 16})); }, "multiples of light_window_size 4");
  expect_error([&] { attn(torch::randn({1, 8, 8, 12})); }, "channels");
  expect_error([&] { attn(torch::randn({1, 8, 8, 16}), torch::ones({1, 8, 7}, torch::kBool)); }, "mask must be");
  expect_error([] { ConditionalRoutedImageAttention(small_image_attn(16, 4, 4, 4).num_routed_kv(3)); },
               "divisible by num_routed_kv");
}

// ---------------------------------------------------------------- ViT

ConditionalRoutedViTOptions small_vit() {
  return ConditionalRoutedViTOptions(64, 16, 10, 32, 2)
      .attn_num_heavy_tokens_q(8)
      .attn_num_heavy_tokens_kv(8)
      .attn_heavy_dim_head(8)
      .attn_heavy_heads(2)
      .attn_light_dim_head(8)
      .attn_light_heads(2)
      .attn_light_window_size(2)
      .ff_num_heavy_tokens(8)
      .ff_heavy_mult(4)
      .ff_light_mult(2);
}

TEST(NnLayers, PosembSincos2dFormula) {
  auto pe = posemb_sincos_2d(torch::zeros({1, 3, 5, 16}, torch::kDouble));
  ASSERT_EQ(pe.sizes(), (std::vector<int64_t>{3, 5, 16}));
  EXPECT_EQ(pe.scalar_type(), torch::kDouble);
  for (int64_t k = 0; k < 4; ++k) {
    const double omega = 1.0 / std::pow(10000.0, k / 3.0);
    EXPECT_NEAR(pe[2][4][k].item<double>(), std::sin(4 * omega), 1e-6);
    EXPECT_NEAR(pe[2][4][4 + k].item<double>(), std::cos(4 * omega), 1e-6);
    EXPECT_NEAR(pe[2][4][8 + k].item<double>(), std::sin(2 * omega), 1e-6);
    EXPECT_NEAR(pe[2][4][12 + k].item<double>(), std::cos(2 * omega), 1e-6);
  }
  expect_error([] { posemb_sincos_2d(torch::zeros({1, 2, 2, 6})); }, "multiple of 4");
}

TEST(NnLayers, ViTShapeNamesAndGradientsReachEveryParameter) {
  torch::manual_seed(12);
  // A large coordinate-descent eps keeps the selected scores below saturation,
  // where they (and so the routing tokens) have a non-zero gradient.
  ConditionalRoutedViT vit(small_vit().default_coor_descent_eps(20.0));
  auto names = param_names(*vit);
  for (const char* key :
       {"to_patch_embedding.1.weight", "to_patch_embedding.1.bias", "to_patch_embedding.2.weight",
        "to_patch_embedding.2.bias", "to_patch_embedding.3.weight", "to_patch_embedding.3.bias",
        "transformer.layers.0.0.null_q_token", "transformer.layers.0.0.light_attn.to_qkv.weight",
        "transformer.layers.0.0.heavy_attn.to_kv.weight", "transformer.layers.1.0.kv_router.routing_token",
        "transformer.layers.0.1.router.routing_token", "transformer.layers.1.1.light_ff.1.bias",
        "transformer.layers.1.1.heavy_ff.3.weight", "linear_head.1.weight", "linear_head.1.bias",
        "linear_head.2.weight", "linear_head.2.bias"})
    EXPECT_EQ(names.count(key), 1u) << key;
  EXPECT_EQ(vit->transformer->layers->size(), 2u);

  auto img = torch::randn({2, 3, 64, 64});
  auto logits = vit(img);
  ASSERT_EQ(logits.sizes(), (std::vector<int64_t>{2, 10}));
  EXPECT_TRUE(torch::isfinite(logits).all().item<bool>());
  (logits * torch::randn_like(logits)).sum().backward();
  for (const auto& p : vit->named_parameters()) {
    ASSERT_TRUE(p.value().grad().defined()) << p.key();
    EXPECT_TRUE(torch::isfinite(p.value().grad()).all().item<bool>()) << p.key();
    EXPECT_GT(p.value().grad().abs().max().item<double>(), 0.0) << p.key();
  }
}

TEST(NnLayers, ViTBadInputsNameTheProblem) {
  ConditionalRoutedViT vit(small_vit());
  expect_error([&] { vit(torch::randn({1, 1, 64, 64})); }, "img must be (b, 3, height, width)");
  expect_error([&] { vit(torch::randn({1, 3, 60, 64})); }, "divisible by the patch size");
  expect_error([] { ConditionalRoutedViT(ConditionalRoutedViTOptions(64, 16, 10, 32, 1)); },
               "attn_num_heavy_tokens_q must be set");
  expect_error([] { ConditionalRoutedViT(small_vit().image_size(60)); }, "divisible by the patch size");
}

}  // namespace

namespace {

// attend_gathered written out: every group's keys/values are its route's
// null row and the table rows it names, values (and keys with
// multiply_keys_by_score) times the scores, masked positions left out.
torch::Tensor gathered_by_formula(AttentionImpl& a, const torch::Tensor& q, const torch::Tensor& proj,
                                  const torch::Tensor& rows, const torch::Tensor& mask, const torch::Tensor& scores) {
  const int64_t h = a.options.heads(), dh = a.options.dim_head();
  const int64_t b = rows.size(0), routes = rows.size(1), hr = h / routes, n = q.size(2);
  std::vector<torch::Tensor> outs;
  for (int64_t bi = 0; bi < b; ++bi) {
    std::vector<torch::Tensor> heads;
    for (int64_t r = 0; r < routes; ++r) {
      torch::Tensor kv = proj.index_select(0, rows[bi][r]).view({-1, hr, 2, dh});
      torch::Tensor k = kv.select(2, 0), v = kv.select(2, 1);  // [m, hr, dh]
      if (scores.defined()) {
        torch::Tensor s = scores[bi][r].view({-1, 1, 1}).to(kv.scalar_type());
        v = v * s;
        if (a.options.multiply_keys_by_score()) k = k * s;
      }
      for (int64_t hh = 0; hh < hr; ++hh) {
        const int64_t head = r * hr + hh;
        torch::Tensor kk = torch::cat({a.null_kv[0][head].unsqueeze(0).to(k.scalar_type()), k.select(1, hh)}, 0);
        torch::Tensor vv = torch::cat({a.null_kv[1][head].unsqueeze(0).to(v.scalar_type()), v.select(1, hh)}, 0);
        torch::Tensor sim = torch::matmul(q[bi][head], kk.t()) * std::pow(static_cast<double>(dh), -0.5);
        if (mask.defined()) {
          torch::Tensor keep = torch::cat({torch::ones({1}, mask.options()), mask[bi][r]}, 0);
          sim = sim.masked_fill(keep.logical_not().unsqueeze(0), -std::numeric_limits<double>::infinity());
        }
        heads.push_back(torch::matmul(sim.softmax(-1), vv));  // [n, dh]
      }
    }
    outs.push_back(torch::stack(heads, 0).transpose(0, 1).reshape({n, h * dh}));
  }
  return a.to_out->forward(torch::stack(outs, 0));
}

}  // namespace

// The CPU's gathered keys/values (one pass: gather, scores, layout) and its
// backward against the formula: float64 to 1e-12 for the output and the
// gradients of q, the table, the scores and the null keys/values; with and
// without scores, keys scaled or not, a mask, and table rows that several
// sets (and one set twice) name. Float32 and bfloat16 against float64.
TEST(NnLayers, GatheredKeysValuesOnTheCpuMatchTheFormula) {
  torch::manual_seed(71);
  const int64_t b = 2, routes = 2, h = 4, dh = 8, n = 3, m = 6, table_rows = 9;
  for (bool mult_keys : {false, true}) {
    for (bool with_scores : {true, false}) {
      for (bool masked : {false, true}) {
        SCOPED_TRACE("mult_keys " + std::to_string(mult_keys) + " scores " + std::to_string(with_scores) + " masked " +
                     std::to_string(masked));
        Attention attn(AttentionOptions(16).dim_head(dh).heads(h).multiply_keys_by_score(mult_keys));
        attn->to(torch::kDouble);
        const torch::Tensor q0 = torch::randn({b, h, n, dh}, torch::kDouble);
        const torch::Tensor proj0 = torch::randn({table_rows, h / routes * 2 * dh}, torch::kDouble);
        torch::Tensor rows = torch::randint(table_rows, {b, routes, m}, torch::kLong);
        rows[0][0][1] = rows[0][0][0];  // one set names a row twice
        const torch::Tensor s0 = with_scores ? torch::rand({b, routes, m}, torch::kDouble) : torch::Tensor();
        torch::Tensor mask = masked ? torch::rand({b, routes, m}) > 0.3 : torch::Tensor();
        const torch::Tensor x = torch::zeros({b, n, 16}, torch::kDouble);
        const torch::Tensor g = torch::randn({b, n, 16}, torch::kDouble);

        auto run = [&](bool formula, at::ScalarType t) {
          auto a = std::dynamic_pointer_cast<AttentionImpl>(attn->clone());
          a->to(t);
          auto leaf = [&](const torch::Tensor& v) { return v.to(t).clone().requires_grad_(true); };
          torch::Tensor q = leaf(q0), proj = leaf(proj0);
          torch::Tensor s = with_scores ? leaf(s0) : torch::Tensor();
          torch::Tensor out = formula ? gathered_by_formula(*a, q, proj, rows, mask, s)
                                      : attend_gathered(*a, x.to(t), q, proj, rows, mask, s, false);
          out.backward(g.to(t));
          std::vector<torch::Tensor> got{out, q.grad(), proj.grad(), a->null_kv.grad()};
          if (with_scores) got.push_back(s.grad());
          return got;
        };
        const auto want = run(true, torch::kDouble);
        const auto got = run(false, torch::kDouble);
        for (size_t i = 0; i < want.size(); ++i) EXPECT_LT(max_rel_error(got[i], want[i]), 1e-12) << "tensor " << i;
        const auto f32 = run(false, torch::kFloat);
        for (size_t i = 0; i < want.size(); ++i) EXPECT_LT(max_rel_error(f32[i], want[i]), 1e-5) << "float32 " << i;
        const auto bf16 = run(false, torch::kBFloat16);
        for (size_t i = 0; i < want.size(); ++i) EXPECT_LT(max_rel_error(bf16[i], want[i]), 5e-2) << "bfloat16 " << i;
      }
    }
  }
}
