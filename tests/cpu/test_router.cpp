// The CPU router against brute-force definitions (tests/support/reference_router.cpp) and finite
// differences: the exact selection and its ties, the norm and its running statistics, the gates,
// non-finite inputs, and the gradients to x, W_r and W_c.
#include <gtest/gtest.h>
#include <omnimoe/omnimoe.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "reference.h"
#include "test_support.h"

namespace omnimoe::test {
namespace {

using reference::Matrix;

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// A NaN score ranks as -inf (include/omnimoe/router.h).
double rank_key(double s) { return std::isnan(s) ? -kInf : s; }

// Every token has K distinct ids in [0, N), ordered by (score desc, id asc), NaN ranked -inf.
::testing::AssertionResult valid_selection(const LayerConfig& cfg, int64_t tokens,
                                           const HostTensor& indices, const HostTensor& scores) {
  const int64_t K = cfg.top_k, N = cfg.num_experts();
  std::vector<int64_t> seen(static_cast<size_t>(N), -1);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t k = 0; k < K; ++k) {
      const double e = indices.get(t * K + k);
      if (!(e >= 0 && e < N)) {
        return ::testing::AssertionFailure()
               << "token " << t << " slot " << k << ": id " << e << " outside [0, " << N << ")";
      }
      int64_t& last = seen[static_cast<size_t>(e)];
      if (last == t) {
        return ::testing::AssertionFailure() << "token " << t << ": id " << e << " twice";
      }
      last = t;
      if (k == 0) continue;
      const double prev = rank_key(scores.get(t * K + k - 1)),
                   cur = rank_key(scores.get(t * K + k));
      const double prev_id = indices.get(t * K + k - 1);
      if (prev < cur || (prev == cur && prev_id > e)) {
        return ::testing::AssertionFailure()
               << "token " << t << " slot " << k << ": (score " << cur << ", id " << e
               << ") after (score " << prev << ", id " << prev_id << ")";
      }
    }
  }
  return ::testing::AssertionSuccess();
}

// ---------------------------------------------------------------------------------------------
// router_select_topk: exact, bitwise, against the brute force over all N pairs.
// ---------------------------------------------------------------------------------------------

struct SelectData {
  LayerConfig cfg;
  int64_t tokens;
  HostTensor row_logp, col_logp, indices, scores;

  SelectData(const LayerConfig& c, int64_t T)
      : cfg(c),
        tokens(T),
        row_logp(DType::f32, {T, c.grid_rows}),
        col_logp(DType::f32, {T, c.grid_cols}),
        indices(DType::i32, {T, c.top_k}),
        scores(DType::f32, {T, c.top_k}) {}

  void run(int threads = 0) {
    indices.poison();
    scores.poison();
    const Exec exec = cpu_exec(threads);
    std::vector<uint8_t> ws(router_select_workspace_bytes(cfg, tokens, exec));
    router_select_topk(cfg, row_logp.view(), col_logp.view(), indices.view(), scores.view(),
                       {ws.data(), ws.size()}, exec);
  }

  std::vector<float> floats(const HostTensor& t) const {
    std::vector<float> v(static_cast<size_t>(t.numel()));
    for (int64_t i = 0; i < t.numel(); ++i) v[i] = static_cast<float>(t.get(i));
    return v;
  }

  // Indices equal, scores bitwise equal (NaN where the reference has NaN), on `tokens` rows.
  void expect_matches_reference(int64_t check_tokens = -1) const {
    const int64_t T = check_tokens < 0 ? tokens : check_tokens;
    ASSERT_TRUE(valid_selection(cfg, tokens, indices, scores));
    const int64_t K = cfg.top_k;
    const reference::Routing want = reference::select(cfg, floats(row_logp), floats(col_logp), T);
    for (int64_t i = 0; i < T * K; ++i) {
      ASSERT_EQ(indices.get(i), want.indices[i]) << "token " << i / K << " slot " << i % K;
      ASSERT_TRUE(same_or_both_nan(scores.get(i), want.scores[i]))
          << "token " << i / K << " slot " << i % K << ": score " << scores.get(i) << ", want "
          << want.scores[i];
    }
  }
};

class RouterSelectRandom
    : public ::testing::TestWithParam<std::tuple<int64_t, int64_t, int64_t, int64_t>> {};

TEST_P(RouterSelectRandom, MatchesBruteForce) {
  const auto [T, nr, nc, k] = GetParam();
  SelectData s(router_config(4, nr, nc, k), T);
  s.row_logp.fill_uniform(11, -8.0, 0.0);
  s.col_logp.fill_uniform(12, -8.0, 0.0);
  s.run();
  s.expect_matches_reference();
}

INSTANTIATE_TEST_SUITE_P(
    RouterSelectShapes, RouterSelectRandom,
    ::testing::Values(std::make_tuple(64, 19, 23, 7), std::make_tuple(64, 19, 23, 1),
                      std::make_tuple(16, 19, 23, 437), std::make_tuple(33, 23, 19, 100),
                      std::make_tuple(9, 1, 1, 1), std::make_tuple(9, 1, 37, 5),
                      std::make_tuple(9, 41, 1, 41), std::make_tuple(5, 64, 64, 4096),
                      std::make_tuple(7, 3, 200, 150), std::make_tuple(7, 200, 3, 150)),
    [](const auto& info) {
      const auto& p = info.param;
      return "f32_" + shape_name(std::get<0>(p), std::get<1>(p), std::get<2>(p), std::get<3>(p));
    });

// All log-probs equal: every pair ties, so the K smallest ids in order.
TEST(RouterSelect, ConstantLogp_ids_ascend_T3_Nr7_Nc9) {
  for (int64_t k : {1, 8, 10, 62, 63}) {
    SelectData s(router_config(4, 7, 9, k), 3);
    s.row_logp.fill(-std::log(7.0));
    s.col_logp.fill(-std::log(9.0));
    s.run();
    for (int64_t t = 0; t < 3; ++t) {
      for (int64_t q = 0; q < k; ++q) ASSERT_EQ(s.indices.get(t * k + q), q) << "K=" << k;
    }
    s.expect_matches_reference();
  }
}

// Log-probs from a handful of values: duplicated rows and columns, large tie groups that the
// K-th place cuts through, for every K.
TEST(RouterSelect, FewDistinctValues_ties_by_id_T4_Nr13_Nc11_all_K) {
  const int64_t nr = 13, nc = 11, T = 4;
  std::mt19937_64 rng(5);
  std::uniform_int_distribution<int> pick(0, 3);
  for (int64_t k = 1; k <= nr * nc; ++k) {
    SelectData s(router_config(4, nr, nc, k), T);
    for (int64_t i = 0; i < T * nr; ++i) s.row_logp.set(i, -0.5 * pick(rng) - 1.0);
    for (int64_t i = 0; i < T * nc; ++i) s.col_logp.set(i, -0.25 * pick(rng) - 2.0);
    s.run();
    ASSERT_NO_FATAL_FAILURE(s.expect_matches_reference()) << "K=" << k;
  }
}

// Distinct values whose float sums round to equal scores: ties between different column values,
// so a row's tied columns are not in id order by rank.
TEST(RouterSelect, RoundingTies_T8_Nr17_Nc29) {
  for (int64_t k : {1, 5, 40, 200, 493}) {
    SelectData s(router_config(4, 17, 29, k), 8);
    s.row_logp.fill_uniform(21, -3.0e7, -1.0e7);
    s.col_logp.fill_uniform(22, -4.0, 0.0);
    s.run();
    ASSERT_NO_FATAL_FAILURE(s.expect_matches_reference()) << "K=" << k;
  }
}

// NaN ranks as -inf; +inf + -inf is NaN and ranks as -inf; the scores keep the NaN.
TEST(RouterSelect, NonFinite_T40_Nr9_Nc12) {
  for (int64_t k : {1, 6, 50, 108}) {
    SelectData s(router_config(4, 9, 12, k), 40);
    fill_non_finite_logp(s.row_logp, s.col_logp, 31);
    s.run();
    ASSERT_NO_FATAL_FAILURE(s.expect_matches_reference()) << "K=" << k;
  }
}

// A million experts: the selection never visits the grid; brute force checks a few tokens.
TEST(RouterSelect, LargeGrid_f32_T64_Nr1024_Nc1024_K16_and_K1000) {
  for (int64_t k : {16, 1000}) {
    SelectData s(router_config(4, 1024, 1024, k), 64);
    s.row_logp.fill_uniform(41, -12.0, -4.0);
    s.col_logp.fill_uniform(42, -12.0, -4.0);
    s.run();
    ASSERT_NO_FATAL_FAILURE(s.expect_matches_reference(/*check_tokens=*/2)) << "K=" << k;
  }
}

TEST(RouterSelect, LargeGrid_f32_T2_Nr2048_Nc2048_K4096) {
  SelectData s(router_config(4, 2048, 2048, 4096), 2);
  s.row_logp.fill_uniform(43, -12.0, -4.0);
  s.col_logp.fill_uniform(44, -12.0, -4.0);
  s.run();
  s.expect_matches_reference(/*check_tokens=*/1);
}

TEST(RouterSelect, ThreadCountDoesNotChangeResult_T50_Nr31_Nc37_K20) {
  SelectData s(router_config(4, 31, 37, 20), 50);
  s.row_logp.fill_uniform(51, -6.0, 0.0);
  s.col_logp.fill_uniform(52, -6.0, 0.0);
  s.run(1);
  const std::vector<double> idx1 = s.indices.to_vector(), sc1 = s.scores.to_vector();
  s.run(2);
  EXPECT_EQ(s.indices.to_vector(), idx1);
  EXPECT_EQ(s.scores.to_vector(), sc1);
}

TEST(RouterSelect, T0_Nr5_Nc6_K3) {
  SelectData s(router_config(4, 5, 6, 3), 0);
  EXPECT_NO_THROW(s.run());
}

// ---------------------------------------------------------------------------------------------
// router_forward against the brute-force router.
// ---------------------------------------------------------------------------------------------

// One forward's tensors. Weights are scaled so the logits are O(1).
struct RouterData {
  LayerConfig cfg;
  int64_t tokens;
  HostTensor x, w_row, w_col;
  HostTensor row_mean, row_var, col_mean, col_var;  // f32 running statistics
  HostTensor indices, scores, gates, row_logits, col_logits, row_rstd, col_rstd;

  RouterData(const LayerConfig& c, int64_t T, DType dtype, int64_t pad, uint64_t seed)
      : cfg(c),
        tokens(T),
        x(dtype, {T, c.hidden}, pad),
        w_row(dtype, {c.grid_rows, c.hidden}, pad),
        w_col(dtype, {c.grid_cols, c.hidden}, pad),
        row_mean(DType::f32, {c.grid_rows}),
        row_var(DType::f32, {c.grid_rows}),
        col_mean(DType::f32, {c.grid_cols}),
        col_var(DType::f32, {c.grid_cols}),
        indices(DType::i32, {T, c.top_k}),
        scores(DType::f32, {T, c.top_k}),
        gates(DType::f32, {T, c.top_k}),
        row_logits(DType::f32, {T, c.grid_rows}),
        col_logits(DType::f32, {T, c.grid_cols}),
        row_rstd(DType::f32, {c.grid_rows}),
        col_rstd(DType::f32, {c.grid_cols}) {
    const double a = std::sqrt(3.0 / static_cast<double>(c.hidden));
    x.fill_uniform(seed + 1, -1.0, 1.0);
    w_row.fill_uniform(seed + 2, -a, a);
    w_col.fill_uniform(seed + 3, -a, a);
    row_mean.fill_uniform(seed + 4, -0.3, 0.3);
    row_var.fill_uniform(seed + 5, 0.5, 2.0);
    col_mean.fill_uniform(seed + 6, -0.3, 0.3);
    col_var.fill_uniform(seed + 7, 0.5, 2.0);
  }

  bool batch_norm() const { return cfg.router_norm == RouterNorm::batch; }
  RouterWeights weights() const { return {w_row.view(), w_col.view()}; }
  // Empty views when router_norm = none: the op must not touch them.
  RouterNormState norm() const {
    if (!batch_norm()) return {};
    return {row_mean.view(), row_var.view(), col_mean.view(), col_var.view()};
  }
  RouterOutputs outputs() const { return {indices.view(), scores.view(), gates.view()}; }
  RouterSaved saved() const {
    RouterSaved s;
    s.row_logits = row_logits.view();
    s.col_logits = col_logits.view();
    if (batch_norm()) {
      s.row_rstd = row_rstd.view();
      s.col_rstd = col_rstd.view();
    }
    return s;
  }

  void forward(bool training, int threads = 0) {
    for (HostTensor* t :
         {&indices, &scores, &gates, &row_logits, &col_logits, &row_rstd, &col_rstd}) {
      t->poison();
    }
    const Exec exec = cpu_exec(threads);
    std::vector<uint8_t> ws(router_forward_workspace_bytes(cfg, tokens, x.dtype(), exec));
    router_forward(cfg, x.view(), weights(), norm(), training, outputs(), saved(),
                   {ws.data(), ws.size()}, exec);
  }
};

// The brute-force router on the stored inputs, taken before the forward runs (training updates
// the running statistics in place).
struct RouterExpected {
  Matrix row_z, col_z, row_logp, col_logp;
  std::vector<double> row_rstd, col_rstd;
  std::vector<double> row_mean, row_var, col_mean, col_var;  // running statistics after the step
};

RouterExpected expected_router(const RouterData& b, bool training) {
  const LayerConfig& c = b.cfg;
  const Matrix x = b.x.to_vector(), wr = b.w_row.to_vector(), wc = b.w_col.to_vector();
  RouterExpected r;
  r.row_mean = b.row_mean.to_vector();
  r.row_var = b.row_var.to_vector();
  r.col_mean = b.col_mean.to_vector();
  r.col_var = b.col_var.to_vector();
  std::vector<double> rm = r.row_mean, rv = r.row_var, cm = r.col_mean, cv = r.col_var;
  r.row_z = reference::router_logits(c, x, b.tokens, wr, c.grid_rows, training, &r.row_mean,
                                     &r.row_var, &r.row_rstd);
  r.col_z = reference::router_logits(c, x, b.tokens, wc, c.grid_cols, training, &r.col_mean,
                                     &r.col_var, &r.col_rstd);
  r.row_logp = reference::router_logp(c, x, b.tokens, wr, c.grid_rows, training, &rm, &rv);
  r.col_logp = reference::router_logp(c, x, b.tokens, wc, c.grid_cols, training, &cm, &cv);
  return r;
}

void expect_near(const char* what, const std::vector<double>& got, const std::vector<double>& want,
                 Tolerance tol) {
  const Comparison c = compare(got, want, tol);
  EXPECT_LE(c.worst_ratio, 1.0) << what << ": " << c.describe();
}

// The forward's outputs against the brute force. The logits are accumulated in fp32 (fp64 for
// f64 storage) from the stored inputs, and log-probs are fp32, so fp32's tolerance applies to
// every storage type. The selection must equal the brute force's on the reference scores except
// where two experts' reference scores agree within that tolerance (a near-tie that rounding may
// order either way).
void expect_forward_matches(const RouterData& b, const RouterExpected& r, bool training) {
  const LayerConfig& c = b.cfg;
  const int64_t T = b.tokens, K = c.top_k, nr = c.grid_rows, nc = c.grid_cols;
  const Tolerance tol = tolerance_for(DType::f32, c.hidden);

  // The norm multiplies the logits' rounding error by 1/std of their column, which is large when
  // a column barely varies over the batch (T = 2): compare in the logits' own scale.
  auto unnormalised = [&](std::vector<double> z, const std::vector<double>& rstd, int64_t n) {
    if (!b.batch_norm()) return z;
    for (size_t i = 0; i < z.size(); ++i) z[i] /= rstd[i % static_cast<size_t>(n)];
    return z;
  };
  expect_near("saved.row_logits", unnormalised(b.row_logits.to_vector(), r.row_rstd, nr),
              unnormalised(r.row_z, r.row_rstd, nr), tol);
  expect_near("saved.col_logits", unnormalised(b.col_logits.to_vector(), r.col_rstd, nc),
              unnormalised(r.col_z, r.col_rstd, nc), tol);
  if (b.batch_norm()) {
    expect_near("saved.row_rstd", b.row_rstd.to_vector(), r.row_rstd, tol);
    expect_near("saved.col_rstd", b.col_rstd.to_vector(), r.col_rstd, tol);
    if (training) {
      expect_near("norm.row_mean", b.row_mean.to_vector(), r.row_mean, tol);
      expect_near("norm.row_var", b.row_var.to_vector(), r.row_var, tol);
      expect_near("norm.col_mean", b.col_mean.to_vector(), r.col_mean, tol);
      expect_near("norm.col_var", b.col_var.to_vector(), r.col_var, tol);
    } else {  // evaluation reads the running statistics and leaves them alone
      EXPECT_EQ(b.row_mean.to_vector(), r.row_mean);
      EXPECT_EQ(b.row_var.to_vector(), r.row_var);
      EXPECT_EQ(b.col_mean.to_vector(), r.col_mean);
      EXPECT_EQ(b.col_var.to_vector(), r.col_var);
    }
  }

  ASSERT_TRUE(valid_selection(c, T, b.indices, b.scores));
  std::vector<float> lr(r.row_logp.begin(), r.row_logp.end());
  std::vector<float> lc(r.col_logp.begin(), r.col_logp.end());
  const reference::Routing want = reference::select(c, lr, lc, T);
  auto ref_score = [&](int64_t t, int64_t e) {
    return r.row_logp[t * nr + e / nc] + r.col_logp[t * nc + e % nc];
  };
  std::vector<double> want_scores(static_cast<size_t>(T * K)), want_gates;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t got_e = static_cast<int64_t>(b.indices.get(t * K + k));
      const int64_t want_e = want.indices[t * K + k];
      want_scores[t * K + k] = ref_score(t, got_e);
      if (got_e != want_e) {
        const double a = ref_score(t, got_e), w = ref_score(t, want_e);
        ASSERT_LE(std::fabs(a - w), tol.atol + tol.rtol * std::fabs(w))
            << "token " << t << " slot " << k << ": id " << got_e << " (score " << a
            << "), want id " << want_e << " (score " << w << ")";
      }
    }
    const std::vector<double> g = reference::router_gates(c, want_scores.data() + t * K, K);
    want_gates.insert(want_gates.end(), g.begin(), g.end());
  }
  expect_near("scores", b.scores.to_vector(), want_scores, tol);
  expect_near("gates", b.gates.to_vector(), want_gates, tol);
}

struct ForwardCase {
  DType dtype;
  Gating gating;
  RouterNorm norm;
  bool training;
  int64_t tokens, hidden, grid_rows, grid_cols, top_k, pad;
};

std::string forward_name(const ForwardCase& c) {
  return std::string(dtype_name(c.dtype)) + "_" +
         shape_name(c.tokens, c.grid_rows, c.grid_cols, c.top_k) + "_d" + std::to_string(c.hidden) +
         "_" + gating_name(c.gating) + "_" + router_norm_name(c.norm) +
         (c.training ? "_train" : "_eval") + "_pad" + std::to_string(c.pad);
}

void PrintTo(const ForwardCase& c, std::ostream* os) { *os << forward_name(c); }

class RouterForward : public ::testing::TestWithParam<ForwardCase> {};

TEST_P(RouterForward, MatchesBruteForce) {
  const ForwardCase& p = GetParam();
  RouterData b(router_config(p.hidden, p.grid_rows, p.grid_cols, p.top_k, p.gating, p.norm),
               p.tokens, p.dtype, p.pad, 100);
  const RouterExpected r = expected_router(b, p.training);
  b.forward(p.training);
  expect_forward_matches(b, r, p.training);
}

std::vector<ForwardCase> forward_cases() {
  std::vector<ForwardCase> v;
  for (DType dt : {DType::f32, DType::f64, DType::bf16, DType::f16}) {
    for (Gating g : {Gating::softmax, Gating::joint}) {
      for (RouterNorm n : {RouterNorm::batch, RouterNorm::none}) {
        for (bool training : {true, false})
          v.push_back({dt, g, n, training, 257, 33, 19, 23, 7, 0});
      }
    }
  }
  const Gating sm = Gating::softmax, jt = Gating::joint;
  const RouterNorm bn = RouterNorm::batch, no = RouterNorm::none;
  v.push_back({DType::f32, sm, bn, true, 64, 17, 19, 23, 1, 0});     // K = 1
  v.push_back({DType::f32, jt, bn, false, 16, 17, 19, 23, 437, 0});  // K = N
  v.push_back({DType::f32, sm, bn, true, 16, 17, 19, 23, 437, 0});   // K = N
  v.push_back({DType::f32, sm, bn, false, 1, 17, 19, 23, 7, 0});     // T = 1, evaluation
  v.push_back({DType::bf16, jt, bn, false, 1, 17, 19, 23, 7, 0});
  v.push_back({DType::f32, sm, no, true, 1, 17, 19, 23, 7, 0});   // T = 1, no norm
  v.push_back({DType::f32, sm, bn, true, 2, 17, 19, 23, 7, 0});   // smallest training batch
  v.push_back({DType::f32, sm, bn, true, 65, 29, 19, 23, 7, 3});  // strided x and weights
  v.push_back({DType::bf16, jt, no, false, 65, 29, 19, 23, 7, 5});
  v.push_back({DType::f64, sm, bn, false, 65, 29, 19, 23, 7, 1});
  v.push_back({DType::f32, sm, bn, true, 31, 9, 1, 1, 1, 0});    // one expert
  v.push_back({DType::f32, sm, bn, true, 31, 9, 1, 37, 5, 0});   // one row
  v.push_back({DType::f16, jt, bn, true, 31, 9, 41, 1, 41, 0});  // one column, K = N
  v.push_back({DType::f32, sm, bn, true, 40, 12, 64, 48, 300, 0});
  return v;
}

INSTANTIATE_TEST_SUITE_P(RouterForwardCases, RouterForward, ::testing::ValuesIn(forward_cases()),
                         [](const auto& info) { return forward_name(info.param); });

// Two training steps then evaluation: the running statistics follow torch.nn.BatchNorm1d
// (momentum, unbiased variance), and evaluation normalises with them.
TEST(RouterForwardNorm, RunningStats_two_steps_then_eval_f32_T50_Nr13_Nc11_K5) {
  LayerConfig c = router_config(21, 13, 11, 5);
  c.norm_momentum = 0.25f;
  c.norm_eps = 1e-3f;
  RouterData b(c, 50, DType::f32, 0, 200);
  for (int step = 0; step < 2; ++step) {
    b.x.fill_uniform(300 + step, -1.0 + step, 2.0);  // a different batch each step
    const RouterExpected r = expected_router(b, true);
    b.forward(true);
    expect_forward_matches(b, r, true);
  }
  // The running mean moved towards the batch means: not the initial values.
  const RouterExpected r = expected_router(b, false);
  b.forward(false);
  expect_forward_matches(b, r, false);
}

// Running statistics recomputed in double, by hand, from the definition.
TEST(RouterForwardNorm, RunningStats_by_hand_f64_T9_Nr3_Nc4_K2) {
  RouterData b(router_config(6, 3, 4, 2), 9, DType::f64, 0, 400);
  const std::vector<double> mean0 = b.row_mean.to_vector(), var0 = b.row_var.to_vector();
  b.forward(true);
  const std::vector<double> x = b.x.to_vector(), w = b.w_row.to_vector();
  for (int64_t i = 0; i < 3; ++i) {
    std::vector<double> s(9);
    double mean = 0;
    for (int64_t t = 0; t < 9; ++t) {
      for (int64_t j = 0; j < 6; ++j) s[t] += x[t * 6 + j] * w[i * 6 + j];
      mean += s[t] / 9;
    }
    double sq = 0;
    for (double v : s) sq += (v - mean) * (v - mean);
    const double m = 0.1;
    EXPECT_NEAR(b.row_mean.get(i), (1 - m) * mean0[i] + m * mean, 1e-6);
    EXPECT_NEAR(b.row_var.get(i), (1 - m) * var0[i] + m * sq / 8, 1e-6);
    EXPECT_NEAR(b.row_rstd.get(i), 1 / std::sqrt(sq / 9 + 1e-5), 1e-6 / std::sqrt(sq / 9));
  }
}

// Equal weight rows give equal logits, so every pair ties and the K smallest ids win in order.
TEST(RouterForwardTies, ConstantLogits_ids_ascend_T20_Nr7_Nc9) {
  for (RouterNorm n : {RouterNorm::batch, RouterNorm::none}) {
    for (int64_t k : {1, 10, 63}) {
      RouterData b(router_config(8, 7, 9, k, Gating::softmax, n), 20, DType::f32, 0, 500);
      for (int64_t i = 0; i < 7 * 8; ++i) b.w_row.set(i, b.w_row.get(i % 8));
      for (int64_t i = 0; i < 9 * 8; ++i) b.w_col.set(i, b.w_col.get(i % 8));
      b.forward(true);
      for (int64_t t = 0; t < 20; ++t) {
        for (int64_t q = 0; q < k; ++q) {
          ASSERT_EQ(b.indices.get(t * k + q), q) << router_norm_name(n) << " K=" << k;
          ASSERT_NEAR(b.gates.get(t * k + q), 1.0 / static_cast<double>(k), 1e-6);
        }
      }
    }
  }
}

// Duplicated weight rows and columns tie exactly; the smaller id comes first.
TEST(RouterForwardTies, DuplicatedRowsAndCols_f32_T40_Nr8_Nc6_K11) {
  RouterData b(router_config(8, 8, 6, 11), 40, DType::f32, 0, 600);
  for (int64_t j = 0; j < 8; ++j) {
    b.w_row.set(5 * 8 + j, b.w_row.get(2 * 8 + j));  // row 5 = row 2
    b.w_row.set(7 * 8 + j, b.w_row.get(0 * 8 + j));  // row 7 = row 0
    b.w_col.set(4 * 8 + j, b.w_col.get(1 * 8 + j));  // col 4 = col 1
  }
  const RouterExpected r = expected_router(b, true);
  b.forward(true);
  expect_forward_matches(b, r, true);
  // Both twins of an exact tie appear in id order wherever both are chosen.
  int64_t pairs_seen = 0;
  for (int64_t t = 0; t < 40; ++t) {
    std::vector<int64_t> pos(48, -1);
    for (int64_t k = 0; k < 11; ++k) pos[static_cast<int64_t>(b.indices.get(t * 11 + k))] = k;
    for (int64_t e = 0; e < 48; ++e) {
      const int64_t i = e / 6, j = e % 6;
      const int64_t twin_i = i == 2 ? 5 : i == 0 ? 7 : i, twin_j = j == 1 ? 4 : j;
      const int64_t twin = twin_i * 6 + twin_j;
      if (twin != e && pos[e] >= 0 && pos[twin] >= 0) {
        EXPECT_LT(pos[e], pos[twin]) << "token " << t << ": id " << e << " and its twin " << twin;
        ++pairs_seen;
      }
    }
  }
  EXPECT_GT(pairs_seen, 0) << "the test never met a tie";
}

// A grid of a million experts, routed without visiting it; brute force on every token.
TEST(RouterForwardLarge, f32_T4_Nr1024_Nc1024_K16_d8) {
  RouterData b(router_config(8, 1024, 1024, 16), 4, DType::f32, 0, 700);
  const RouterExpected r = expected_router(b, true);
  b.forward(true);
  expect_forward_matches(b, r, true);
}

TEST(RouterForwardEdge, T0_leaves_running_stats_f32_Nr5_Nc6_K3) {
  RouterData b(router_config(8, 5, 6, 3), 0, DType::f32, 0, 800);
  const std::vector<double> m = b.row_mean.to_vector(), v = b.col_var.to_vector();
  EXPECT_NO_THROW(b.forward(true));
  EXPECT_NO_THROW(b.forward(false));
  EXPECT_EQ(b.row_mean.to_vector(), m);
  EXPECT_EQ(b.col_var.to_vector(), v);
}

// Non-finite logits (NaN, +-inf in x or in the weights) still give K distinct ids in [0, N) in
// (score desc, id asc) order; backward runs on them without crashing.
TEST(RouterForwardNonFinite, NaN_and_inf_in_x_and_weights_T12_Nr9_Nc7_K10) {
  for (DType dt : {DType::f32, DType::bf16}) {
    for (RouterNorm n : {RouterNorm::batch, RouterNorm::none}) {
      for (bool training : {true, false}) {
        for (int where = 0; where < 4; ++where) {
          RouterData b(router_config(8, 9, 7, 10, Gating::softmax, n), 12, dt, 0, 900);
          switch (where) {
            case 0:
              b.x.set(3 * 8 + 2, kNaN);
              break;  // one NaN in x
            case 1:
              b.x.set(5 * 8 + 1, kInf);
              b.x.set(6 * 8, -kInf);
              break;
            case 2:
              b.w_row.set(4 * 8 + 3, kInf);
              b.w_col.set(2 * 8, kNaN);
              break;
            case 3:
              b.x.fill(kNaN);
              break;  // nothing finite at all
          }
          b.forward(training);
          ASSERT_TRUE(valid_selection(b.cfg, 12, b.indices, b.scores))
              << dtype_name(dt) << " " << router_norm_name(n) << " training=" << training
              << " case " << where;
          HostTensor dg(DType::f32, {12, 10}), dx(dt, {12, 8}), gr(dt, {9, 8}), gc(dt, {7, 8});
          dg.fill_uniform(901, -1.0, 1.0);
          EXPECT_NO_THROW(router_backward(b.cfg, b.x.view(), b.weights(), training, b.saved(),
                                          b.outputs(), dg.view(), dx.view(), false,
                                          {gr.view(), gc.view()}, {}, cpu_exec()));
        }
      }
    }
  }
}

TEST(RouterForwardEdge, ThreadCountDoesNotChangeResult_bf16_T70_Nr19_Nc23_K7) {
  RouterData b(router_config(33, 19, 23, 7), 70, DType::bf16, 0, 1000);
  const std::vector<double> m0 = b.row_mean.to_vector(), v0 = b.row_var.to_vector();
  b.forward(true, 1);
  const std::vector<double> idx = b.indices.to_vector(), g = b.gates.to_vector();
  const std::vector<double> m1 = b.row_mean.to_vector();
  for (int64_t i = 0; i < 19; ++i) {
    b.row_mean.set(i, m0[i]);
    b.row_var.set(i, v0[i]);
  }
  b.forward(true, 2);
  EXPECT_EQ(b.indices.to_vector(), idx);
  EXPECT_EQ(b.gates.to_vector(), g);
  EXPECT_EQ(b.row_mean.to_vector(), m1);
}

// ---------------------------------------------------------------------------------------------
// router_backward: finite differences of loss = sum(dgates * gates).
// ---------------------------------------------------------------------------------------------

// The gradients of one backward, poisoned before the run.
struct RouterGrads {
  HostTensor dgates, dx, w_row, w_col;

  RouterGrads(const RouterData& b, int64_t pad, uint64_t seed)
      : dgates(DType::f32, {b.tokens, b.cfg.top_k}),
        dx(b.x.dtype(), {b.tokens, b.cfg.hidden}, pad),
        w_row(b.x.dtype(), {b.cfg.grid_rows, b.cfg.hidden}, pad),
        w_col(b.x.dtype(), {b.cfg.grid_cols, b.cfg.hidden}, pad) {
    dgates.fill_uniform(seed, -1.0, 1.0);
  }

  void backward(const RouterData& b, bool training, bool accumulate_dx = false) {
    if (!accumulate_dx) dx.poison();
    w_row.poison();
    w_col.poison();
    const Exec exec = cpu_exec();
    std::vector<uint8_t> ws(router_backward_workspace_bytes(b.cfg, b.tokens, b.x.dtype(), exec));
    router_backward(b.cfg, b.x.view(), b.weights(), training, b.saved(), b.outputs(), dgates.view(),
                    dx.view(), accumulate_dx, {w_row.view(), w_col.view()}, {ws.data(), ws.size()},
                    exec);
  }
};

// loss = sum dgates * gates in double, the selection held at `indices` (it has no gradient).
struct ReferenceLoss {
  LayerConfig cfg;
  int64_t tokens;
  bool training;
  std::vector<double> row_mean, row_var, col_mean, col_var;  // before the step
  std::vector<int32_t> indices;
  std::vector<double> dgates;

  double operator()(const Matrix& x, const Matrix& wr, const Matrix& wc) const {
    std::vector<double> rm = row_mean, rv = row_var, cm = col_mean, cv = col_var;
    const int64_t nr = cfg.grid_rows, nc = cfg.grid_cols, K = cfg.top_k;
    const Matrix lr = reference::router_logp(cfg, x, tokens, wr, nr, training, &rm, &rv);
    const Matrix lc = reference::router_logp(cfg, x, tokens, wc, nc, training, &cm, &cv);
    double loss = 0.0;
    std::vector<double> s(static_cast<size_t>(K));
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t k = 0; k < K; ++k) {
        const int64_t e = indices[t * K + k];
        s[k] = lr[t * nr + e / nc] + lc[t * nc + e % nc];
      }
      const std::vector<double> g = reference::router_gates(cfg, s.data(), K);
      for (int64_t k = 0; k < K; ++k) loss += dgates[t * K + k] * g[k];
    }
    return loss;
  }
};

// Central differences of `loss` with respect to each element of x, W_r, W_c.
struct FdGrads {
  std::vector<double> dx, dwr, dwc;
};

FdGrads finite_differences(const ReferenceLoss& loss, Matrix x, Matrix wr, Matrix wc, double h) {
  FdGrads g;
  auto sweep = [&](Matrix& m, std::vector<double>& out) {
    out.resize(m.size());
    for (size_t i = 0; i < m.size(); ++i) {
      const double v = m[i];
      m[i] = v + h;
      const double up = loss(x, wr, wc);
      m[i] = v - h;
      const double down = loss(x, wr, wc);
      m[i] = v;
      out[i] = (up - down) / (2 * h);
    }
  };
  sweep(x, g.dx);
  sweep(wr, g.dwr);
  sweep(wc, g.dwc);
  return g;
}

double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double a : v) m = std::max(m, std::fabs(a));
  return m;
}

// fp64 and fp32: the backward works from fp32 gates, saved logits and rstd, so its gradients
// carry fp32 rounding (~1e-7 relative), amplified by the norm; 1e-5 of the largest gradient
// (`scale`, over x and both weights: a gradient can be exactly zero, e.g. dW_r when every chosen
// expert of a token shares its row and softmax gating cancels p_r) leaves room for that and
// nothing for a wrong term. bf16/f16: the dtype's own policy.
Tolerance gradient_tolerance(DType dtype, double scale, int64_t terms) {
  if (dtype == DType::f64 || dtype == DType::f32) return {1e-5, 1e-5 * scale};
  const Tolerance t = tolerance_for(dtype, terms);
  return {t.rtol, t.atol * scale};
}

struct BackwardCase {
  DType dtype;
  Gating gating;
  RouterNorm norm;
  bool training;
  int64_t tokens, hidden, grid_rows, grid_cols, top_k, pad;
};

std::string backward_name(const BackwardCase& c) {
  return std::string(dtype_name(c.dtype)) + "_" +
         shape_name(c.tokens, c.grid_rows, c.grid_cols, c.top_k) + "_d" + std::to_string(c.hidden) +
         "_" + gating_name(c.gating) + "_" + router_norm_name(c.norm) +
         (c.training ? "_train" : "_eval") + "_pad" + std::to_string(c.pad);
}

void PrintTo(const BackwardCase& c, std::ostream* os) { *os << backward_name(c); }

class RouterBackward : public ::testing::TestWithParam<BackwardCase> {};

TEST_P(RouterBackward, MatchesFiniteDifferences) {
  const BackwardCase& p = GetParam();
  RouterData b(router_config(p.hidden, p.grid_rows, p.grid_cols, p.top_k, p.gating, p.norm),
               p.tokens, p.dtype, p.pad, 2000);
  ReferenceLoss loss{b.cfg,
                     p.tokens,
                     p.training,
                     b.row_mean.to_vector(),
                     b.row_var.to_vector(),
                     b.col_mean.to_vector(),
                     b.col_var.to_vector(),
                     {},
                     {}};
  b.forward(p.training);
  RouterGrads g(b, p.pad, 2001);
  g.backward(b, p.training);

  for (int64_t i = 0; i < b.indices.numel(); ++i) {
    loss.indices.push_back(static_cast<int32_t>(b.indices.get(i)));
  }
  loss.dgates = g.dgates.to_vector();
  const FdGrads want =
      finite_differences(loss, b.x.to_vector(), b.w_row.to_vector(), b.w_col.to_vector(), 1e-5);
  ASSERT_GT(max_abs(want.dx), 1e-6) << "the loss does not depend on x: the test cannot fail";
  const double scale = std::max({max_abs(want.dx), max_abs(want.dwr), max_abs(want.dwc)});
  const int64_t terms = p.grid_rows + p.grid_cols;
  expect_near("dx", g.dx.to_vector(), want.dx, gradient_tolerance(p.dtype, scale, terms));
  expect_near("grads.row (dW_r)", g.w_row.to_vector(), want.dwr,
              gradient_tolerance(p.dtype, scale, p.tokens));
  expect_near("grads.col (dW_c)", g.w_col.to_vector(), want.dwc,
              gradient_tolerance(p.dtype, scale, p.tokens));
}

std::vector<BackwardCase> backward_cases() {
  std::vector<BackwardCase> v;
  for (Gating g : {Gating::softmax, Gating::joint}) {
    for (RouterNorm n : {RouterNorm::batch, RouterNorm::none}) {
      for (bool training : {true, false}) {
        v.push_back({DType::f64, g, n, training, 6, 5, 4, 5, 3, 0});
        v.push_back({DType::f64, g, n, training, 7, 4, 3, 4, 12, 2});  // K = N, strided
      }
    }
  }
  for (DType dt : {DType::f32, DType::bf16, DType::f16}) {
    v.push_back({dt, Gating::softmax, RouterNorm::batch, true, 9, 6, 5, 4, 4, 1});
    v.push_back({dt, Gating::joint, RouterNorm::batch, false, 9, 6, 5, 4, 4, 0});
  }
  v.push_back({DType::f64, Gating::softmax, RouterNorm::batch, true, 3, 3, 3, 2, 2, 0});
  v.push_back({DType::f64, Gating::softmax, RouterNorm::batch, false, 1, 3, 3, 2, 2, 0});
  v.push_back({DType::f64, Gating::softmax, RouterNorm::batch, true, 11, 7, 1, 9, 4, 0});
  return v;
}

INSTANTIATE_TEST_SUITE_P(RouterBackwardCases, RouterBackward, ::testing::ValuesIn(backward_cases()),
                         [](const auto& info) { return backward_name(info.param); });

// The backward against differences of the backend's own forward (fp64 storage, fp32 gates):
// coordinates whose perturbation changes the selection are skipped. Coarser (fp32 gates, step
// 1e-3), but ties the gradient to the forward that actually ran.
TEST(RouterBackwardForwardDifferences, f64_T6_d5_Nr4_Nc5_K3_all_modes) {
  for (Gating gating : {Gating::softmax, Gating::joint}) {
    for (RouterNorm n : {RouterNorm::batch, RouterNorm::none}) {
      for (bool training : {true, false}) {
        RouterData b(router_config(5, 4, 5, 3, gating, n), 6, DType::f64, 0, 3000);
        const std::vector<double> stats[4] = {b.row_mean.to_vector(), b.row_var.to_vector(),
                                              b.col_mean.to_vector(), b.col_var.to_vector()};
        HostTensor* stat_tensors[4] = {&b.row_mean, &b.row_var, &b.col_mean, &b.col_var};
        auto restore_stats = [&] {
          for (int s = 0; s < 4; ++s) {
            for (int64_t i = 0; i < stat_tensors[s]->numel(); ++i) {
              stat_tensors[s]->set(i, stats[s][i]);
            }
          }
        };
        b.forward(training);
        RouterGrads g(b, 0, 3001);
        g.backward(b, training);
        const std::vector<double> idx0 = b.indices.to_vector(), dg = g.dgates.to_vector();
        const double h = 1e-3;
        int64_t checked = 0, skipped = 0;
        for (auto [name, t, grad] :
             {std::make_tuple("x", &b.x, &g.dx), std::make_tuple("W_r", &b.w_row, &g.w_row),
              std::make_tuple("W_c", &b.w_col, &g.w_col)}) {
          for (int64_t i = 0; i < t->numel(); ++i) {
            const double v = t->get(i);
            double l[2];
            bool same = true;
            for (int s = 0; s < 2; ++s) {
              t->set(i, v + (s == 0 ? h : -h));
              restore_stats();
              b.forward(training);
              same = same && b.indices.to_vector() == idx0;
              l[s] = 0;
              for (int64_t q = 0; q < b.gates.numel(); ++q) l[s] += dg[q] * b.gates.get(q);
            }
            t->set(i, v);
            if (!same) {
              ++skipped;
              continue;
            }
            ++checked;
            const double fd = (l[0] - l[1]) / (2 * h);
            EXPECT_NEAR(grad->get(i), fd, 2e-4 + 2e-3 * std::fabs(fd))
                << name << "[" << i << "] " << gating_name(gating) << " " << router_norm_name(n)
                << " training=" << training;
          }
        }
        EXPECT_GT(checked, 4 * skipped) << "too many coordinates changed the selection";
      }
    }
  }
}

// dx += the router's contribution; the weight gradients are overwritten either way.
TEST(RouterBackwardAccumulate, accumulate_dx_f32_and_bf16_T13_Nr5_Nc7_K4_pad2) {
  for (DType dt : {DType::f32, DType::bf16}) {
    RouterData b(router_config(10, 5, 7, 4), 13, dt, 2, 4000);
    b.forward(true);
    RouterGrads fresh(b, 2, 4001);
    fresh.backward(b, true, /*accumulate_dx=*/false);
    RouterGrads acc(b, 2, 4001);
    acc.dx.fill_uniform(4002, -1.0, 1.0);
    const std::vector<double> before = acc.dx.to_vector();
    acc.backward(b, true, /*accumulate_dx=*/true);
    std::vector<double> want = fresh.dx.to_vector();
    for (size_t i = 0; i < want.size(); ++i) want[i] += before[i];
    expect_near("dx accumulated", acc.dx.to_vector(), want, tolerance_for(dt, 2));
    EXPECT_EQ(acc.w_row.to_vector(), fresh.w_row.to_vector());
    EXPECT_EQ(acc.w_col.to_vector(), fresh.w_col.to_vector());
  }
}

// T = 0: the weight gradients are overwritten with zeros.
TEST(RouterBackwardEdge, T0_zero_weight_grads_f32_Nr5_Nc6_K3) {
  for (RouterNorm n : {RouterNorm::batch, RouterNorm::none}) {
    RouterData b(router_config(8, 5, 6, 3, Gating::softmax, n), 0, DType::f32, 0, 5000);
    RouterGrads g(b, 1, 5001);
    g.backward(b, true);
    for (double v : g.w_row.to_vector()) ASSERT_EQ(v, 0.0);
    for (double v : g.w_col.to_vector()) ASSERT_EQ(v, 0.0);
  }
}

TEST(RouterBackwardEdge, OutOfRangeIndexThrows_f32_T4_Nr3_Nc3_K2) {
  RouterData b(router_config(4, 3, 3, 2), 4, DType::f32, 0, 6000);
  b.forward(true);
  b.indices.set(5, 9);  // N = 9
  RouterGrads g(b, 0, 6001);
  EXPECT_THROW(g.backward(b, true), Error);
}

}  // namespace
}  // namespace omnimoe::test
