#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>

#include "colt5/coor_descent.h"
#include "support/golden.h"
#include "support/expect_error.h"

using colt5::testing::expect_error;
using colt5::testing::max_rel_error;
using colt5::testing::plain_coor_descent;
using colt5::testing::router_schedule;

namespace {

using colt5::CoorDescentOptions;

struct Grads {
  torch::Tensor y, ds, dk;
};

Grads fused(const torch::Tensor& s0, const torch::Tensor& k0, const CoorDescentOptions& o, const torch::Tensor& mask,
            const torch::Tensor& gy) {
  torch::Tensor s = s0.detach().clone().requires_grad_(true);
  torch::Tensor k = k0.detach().clone().requires_grad_(true);
  torch::Tensor y = colt5::coor_descent(s, k, o, mask);
  y.backward(gy.to(y.scalar_type()));
  return {y.detach(), s.grad(), k.grad()};
}

Grads plain(const torch::Tensor& s0, const torch::Tensor& k0, const CoorDescentOptions& o, const torch::Tensor& mask,
            const torch::Tensor& gy) {
  torch::Tensor s = s0.detach().clone().requires_grad_(true);
  torch::Tensor k = k0.detach().clone().requires_grad_(true);
  torch::Tensor y = plain_coor_descent(s, k, o, mask);
  y.backward(gy);
  torch::Tensor ds = s.grad();
  if (mask.defined()) ds = ds.masked_fill(~mask, 0.0);
  return {y.detach(), ds, k.grad()};
}

std::string golden_path(const char* name) { return std::string(COLT5_SOURCE_DIR) + "/tests/golden/" + name; }

}  // namespace

TEST(CoorDescentGolden, ReferenceCasesAgreeTo1e9) {
  for (const char* name : {"cd_plain.safetensors", "cd_eps_scaling_mask.safetensors", "cd_row_k.safetensors"}) {
    SCOPED_TRACE(name);
    auto c = colt5::golden::load_case(golden_path(name));
    auto r = colt5::golden::check_case(c, 1e-9);
    EXPECT_EQ(r.status, colt5::golden::Result::Pass) << r.detail;
    EXPECT_LE(r.worst, 1e-9);
  }
}

TEST(CoorDescent, MatchesPlainOpsInFloat64WithMasksRowKAndEpsScaling) {
  torch::manual_seed(1);
  const auto dd = torch::kDouble;
  torch::Tensor s = torch::randn({2, 3, 97}, dd) * 2;
  torch::Tensor mask = torch::rand({2, 3, 97}) > 0.3;
  torch::Tensor k = torch::rand({2, 3}, dd) * 10 + 1;
  torch::Tensor gy = torch::randn({2, 3, 97}, dd);
  for (auto o : {router_schedule(), CoorDescentOptions().n_iters(7).eps(0.5),
                 CoorDescentOptions().n_iters(1).eps(0.2).eps_init(1.0).eps_decay(0.5)}) {
    Grads f = fused(s, k, o, mask, gy), p = plain(s, k, o, mask, gy);
    EXPECT_LT(max_rel_error(f.y, p.y), 1e-10);
    EXPECT_LT(max_rel_error(f.ds, p.ds), 1e-9);
    EXPECT_LT(max_rel_error(f.dk, p.dk), 1e-9);
  }
}

TEST(CoorDescent, FiniteDifferenceGradientInFloat64) {
  torch::manual_seed(2);
  const auto dd = torch::kDouble;
  torch::Tensor s = torch::randn({3, 40}, dd);
  torch::Tensor mask = torch::rand({3, 40}) > 0.25;
  torch::Tensor k = torch::tensor({3.0, 5.5, 8.0}, dd);
  torch::Tensor gy = torch::randn({3, 40}, dd);
  auto o = CoorDescentOptions().n_iters(15).eps(0.2).eps_init(2.0).eps_decay(0.8);
  Grads f = fused(s, k, o, mask, gy);
  auto loss = [&](const torch::Tensor& ss, const torch::Tensor& kk) {
    return (colt5::coor_descent(ss, kk, o, mask) * gy).sum().item<double>();
  };
  const double h = 1e-6;
  for (int trial = 0; trial < 4; ++trial) {
    torch::Tensor v = torch::randn_like(s), w = torch::randn_like(k);
    const double numeric = (loss(s + h * v, k + h * w) - loss(s - h * v, k - h * w)) / (2 * h);
    const double analytic = (f.ds * v).sum().item<double>() + (f.dk * w).sum().item<double>();
    EXPECT_NEAR(numeric, analytic, 1e-6 * std::max(1.0, std::abs(analytic)));
  }
}

TEST(CoorDescent, Float32AgreesWithFloat64) {
  torch::manual_seed(3);
  // The same input values in both: float32 values, widened for the reference.
  torch::Tensor s = (torch::randn({4, 1000}) * 3).to(torch::kDouble);
  torch::Tensor mask = torch::rand({4, 1000}) > 0.1;
  torch::Tensor k = torch::full({4}, 60.0, torch::kDouble);
  torch::Tensor gy = torch::randn({4, 1000}, torch::kDouble);
  auto o = router_schedule();
  Grads d = fused(s, k, o, mask, gy);
  Grads f = fused(s.to(torch::kFloat), k.to(torch::kFloat), o, mask, gy.to(torch::kFloat));
  EXPECT_EQ(f.y.scalar_type(), torch::kFloat);
  EXPECT_LT(max_rel_error(f.y, d.y), 1e-5);
  EXPECT_LT(max_rel_error(f.ds, d.ds), 1e-4);
  EXPECT_LT(max_rel_error(f.dk, d.dk), 1e-4);
}

TEST(CoorDescent, NarrowDtypesComputeInFloat32) {
  torch::manual_seed(4);
  torch::Tensor s = torch::randn({2, 300});
  for (auto dt : {torch::kBFloat16, torch::kHalf}) {
    torch::Tensor sn = s.to(dt).requires_grad_(true);
    torch::Tensor y = colt5::coor_descent(sn, 30.0, router_schedule());
    EXPECT_EQ(y.scalar_type(), dt);
    torch::Tensor ref = colt5::coor_descent(sn.detach().to(torch::kFloat), 30.0, router_schedule());
    EXPECT_LT(max_rel_error(y, ref), 1e-2);
    y.sum().backward();
    ASSERT_TRUE(sn.grad().defined());
    EXPECT_EQ(sn.grad().scalar_type(), dt);
    EXPECT_TRUE(torch::isfinite(sn.grad().to(torch::kFloat)).all().item<bool>());
  }
}

TEST(CoorDescent, CheckpointSegmentsGiveIdenticalResults) {
  torch::manual_seed(5);
  torch::Tensor s = torch::randn({3, 257}, torch::kDouble);
  torch::Tensor mask = torch::rand({3, 257}) > 0.2;
  torch::Tensor k = torch::full({3}, 20.0, torch::kDouble);
  torch::Tensor gy = torch::randn({3, 257}, torch::kDouble);
  Grads all = fused(s, k, router_schedule(), mask, gy);
  for (int64_t c : {1, 3, 4, 20}) {
    SCOPED_TRACE(c);
    Grads seg = fused(s, k, router_schedule().checkpoint_segments(c), mask, gy);
    EXPECT_TRUE(torch::equal(seg.y, all.y));
    EXPECT_LT(max_rel_error(seg.ds, all.ds), 1e-14);
    EXPECT_LT(max_rel_error(seg.dk, all.dk), 1e-14);
  }
}

TEST(CoorDescent, FullyMaskedRowGivesZerosAndZeroGradients) {
  torch::Tensor s = torch::randn({3, 50});
  torch::Tensor mask = torch::ones({3, 50}, torch::kBool);
  mask[1].fill_(false);
  torch::Tensor k = torch::full({3}, 5.0);
  Grads f = fused(s, k, router_schedule(), mask, torch::randn({3, 50}));
  EXPECT_TRUE(torch::isfinite(f.y).all().item<bool>());
  EXPECT_TRUE(torch::isfinite(f.ds).all().item<bool>());
  EXPECT_EQ(f.y[1].abs().sum().item<float>(), 0.0f);
  EXPECT_EQ(f.ds[1].abs().sum().item<float>(), 0.0f);
  EXPECT_EQ(f.dk[1].item<float>(), 0.0f);
  // Rows are independent: the other rows are what they are alone.
  torch::Tensor alone = colt5::coor_descent(s.slice(0, 0, 1), 5.0, router_schedule());
  EXPECT_TRUE(torch::allclose(f.y.slice(0, 0, 1), alone, 1e-6, 1e-7));
}

TEST(CoorDescent, MaskedEntriesScoreZeroWhateverTheirValue) {
  torch::Tensor s = torch::randn({2, 64});
  torch::Tensor mask = torch::rand({2, 64}) > 0.5;
  torch::Tensor poisoned = s.masked_fill(~mask, std::numeric_limits<float>::quiet_NaN());
  torch::Tensor y = colt5::coor_descent(poisoned, 4.0, router_schedule(), mask);
  EXPECT_TRUE(torch::equal(y, colt5::coor_descent(s, 4.0, router_schedule(), mask)));
  EXPECT_EQ(y.masked_select(~mask).abs().sum().item<float>(), 0.0f);
}

TEST(CoorDescent, KAboveTheUnmaskedCountSaturatesToOne) {
  torch::Tensor s = torch::randn({1, 20}, torch::kDouble);
  torch::Tensor mask = torch::zeros({1, 20}, torch::kBool);
  mask.index_put_({0, torch::indexing::Slice(0, 3)}, true);
  torch::Tensor y = colt5::coor_descent(s, 5.0, CoorDescentOptions().n_iters(50).eps(0.1), mask);
  EXPECT_LT((y.masked_select(mask) - 1).abs().max().item<double>(), 1e-12);
  EXPECT_EQ(y.masked_select(~mask).abs().sum().item<double>(), 0.0);
}

TEST(CoorDescent, ApproachesKAndPrefersLargeScores) {
  torch::manual_seed(6);
  torch::Tensor s = torch::randn({5, 512});
  // With a moderate eps the iteration converges: the scores sum to k.
  torch::Tensor y = colt5::coor_descent(s, 32.0, CoorDescentOptions().n_iters(100).eps(0.5));
  EXPECT_LT((y.sum(-1) - 32).abs().max().item<float>(), 0.05f);
  EXPECT_GE(y.min().item<float>(), 0.0f);
  EXPECT_LE(y.max().item<float>(), 1.0f + 1e-6f);
  // Larger raw scores never get smaller soft scores.
  torch::Tensor order = std::get<1>(s.sort(-1));
  torch::Tensor ys = y.gather(-1, order);
  EXPECT_GE((ys.slice(-1, 1) - ys.slice(-1, 0, -1)).min().item<float>(), -1e-6f);
}

TEST(CoorDescent, ThreadCountDoesNotChangeResults) {
  torch::manual_seed(7);
  torch::Tensor s = torch::randn({64, 300});
  const int before = at::get_num_threads();
  at::set_num_threads(1);
  torch::Tensor one = colt5::coor_descent(s, 10.0, router_schedule());
  at::set_num_threads(2);
  torch::Tensor two = colt5::coor_descent(s, 10.0, router_schedule());
  at::set_num_threads(before);
  EXPECT_TRUE(torch::equal(one, two));
}

TEST(CoorDescent, BadArgumentsAreClearErrors) {
  torch::Tensor s = torch::randn({2, 10});
  expect_error([&] { colt5::coor_descent(s, 0.0); }, "k must be a positive number");
  expect_error([&] { colt5::coor_descent(s, -1.0); }, "k must be a positive number");
  expect_error([&] { colt5::coor_descent(s, 2.0, CoorDescentOptions().n_iters(0)); }, "n_iters must be at least 1");
  expect_error([&] { colt5::coor_descent(s, 2.0, CoorDescentOptions().eps(0)); }, "eps must be a positive");
  expect_error([&] { colt5::coor_descent(s, 2.0, CoorDescentOptions().eps_decay(1.5)); }, "eps_decay");
  expect_error([&] { colt5::coor_descent(s, 2.0, CoorDescentOptions().n_iters(4).checkpoint_segments(5)); },
               "checkpoint_segments");
  expect_error([&] { colt5::coor_descent(s, 2.0, {}, torch::ones({2, 9}, torch::kBool)); }, "mask must have the shape");
  expect_error([&] { colt5::coor_descent(s, 2.0, {}, torch::ones({2, 10})); }, "mask must be a bool tensor");
  expect_error([&] { colt5::coor_descent(torch::ones({2, 10}, torch::kLong), 2.0); }, "must be float32");
  expect_error([&] { colt5::coor_descent(torch::randn({2, 0}), 2.0); }, "empty last dimension");
  expect_error([&] { colt5::coor_descent(torch::randn({}), 2.0); }, "at least one dimension");
  expect_error([&] { colt5::coor_descent(s, torch::ones({3})); }, "one value per row");
  expect_error([&] { colt5::coor_descent(s, torch::tensor({1.0, -2.0})); }, "every k must be a positive");
  torch::Tensor nan = s.clone();
  nan[0][3] = std::numeric_limits<float>::quiet_NaN();
  expect_error([&] { colt5::coor_descent(nan, 2.0); }, "NaN or infinite");
}

TEST(CoorDescent, EmptyBatchGivesEmptyResult) {
  torch::Tensor y = colt5::coor_descent(torch::randn({0, 16}), 2.0);
  EXPECT_EQ(y.sizes(), (std::vector<int64_t>{0, 16}));
}

TEST(TopkIndices, BreaksTiesByTiebreakThenPosition) {
  torch::Tensor scores = torch::tensor({{1.0f, 1.0f, 0.5f, 1.0f, 1.0f, 0.2f}});
  torch::Tensor tiebreak = torch::tensor({{0.1f, 0.3f, 9.0f, 0.3f, 0.2f, 0.0f}});
  torch::Tensor idx = colt5::topk_indices(scores, 5, tiebreak);
  EXPECT_TRUE(torch::equal(idx, torch::tensor({{1, 3, 4, 0, 2}}, torch::kLong)));
  // Without a tiebreak: lower position first.
  EXPECT_TRUE(torch::equal(colt5::topk_indices(scores, 3), torch::tensor({{0, 1, 3}}, torch::kLong)));
  // Masked entries rank last, even with the highest score.
  torch::Tensor mask = torch::tensor({{false, true, true, true, true, true}});
  EXPECT_TRUE(torch::equal(colt5::topk_indices(scores, 2, tiebreak, mask), torch::tensor({{1, 3}}, torch::kLong)));
}

TEST(TopkIndices, SaturatedScoresGiveTheSameIndicesEveryRun) {
  torch::manual_seed(8);
  torch::Tensor s = torch::randn({4, 2048});
  torch::Tensor soft = colt5::coor_descent(s, 300.0, router_schedule());
  ASSERT_GT((soft == 1).sum().item<int64_t>(), 4 * 100);  // many exact ties
  torch::Tensor first = colt5::topk_indices(soft, 256, s);
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(torch::equal(colt5::topk_indices(soft, 256, s), first));
  // The chosen set is the 256 largest raw scores: ties broken by the raw score.
  torch::Tensor by_raw = std::get<1>(s.topk(256, -1));
  EXPECT_TRUE(torch::equal(std::get<0>(first.sort(-1)), std::get<0>(by_raw.sort(-1))));
}

TEST(Topk, StraightThroughValuesAndGradient) {
  torch::manual_seed(9);
  torch::Tensor x = torch::randn({3, 64}, torch::kDouble).requires_grad_(true);
  auto r = colt5::topk(x, 8);
  auto [values, indices] = x.detach().topk(8, -1);
  EXPECT_TRUE(torch::equal(r.indices, indices));
  EXPECT_LT(max_rel_error(r.values.detach(), values), 1e-15);
  EXPECT_LT((r.gates.detach() - 1).abs().max().item<double>(), 1e-15);
  r.values.sum().backward();
  // d/dx of x * gates: 1 at the selected entries plus x * d(soft)/dx everywhere.
  torch::Tensor x2 = x.detach().clone().requires_grad_(true);
  torch::Tensor soft = colt5::coor_descent(x2, 9.0, CoorDescentOptions().n_iters(20).eps(0.1));
  (x2.detach().gather(-1, indices) * soft.gather(-1, indices)).sum().backward();
  torch::Tensor expected = x2.grad() + torch::zeros_like(x2).scatter(-1, indices, 1.0);
  EXPECT_LT(max_rel_error(x.grad(), expected), 1e-12);
}
