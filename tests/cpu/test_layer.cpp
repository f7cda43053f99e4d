// The composed CPU layer against the sum of its parts: the brute-force router
// (reference::router_logp, reference::select), reference::experts and reference::mlp.
#include <gtest/gtest.h>
#include <omnimoe/omnimoe.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "layer_harness.h"
#include "reference.h"
#include "test_support.h"

namespace omnimoe::test {
namespace {

struct LayerCase {
  DType dtype;
  bool training;
  RouterNorm norm;
  Gating gating;
  Activation act;
  int64_t tokens, hidden, grid_rows, grid_cols, top_k, intermediate;
  int64_t pad;  // row padding of x, y, dy, dx and some weights
};

std::string case_name(const LayerCase& c) {
  return std::string(dtype_name(c.dtype)) + "_" + (c.training ? "train" : "eval") + "_" +
         router_norm_name(c.norm) + "_" + gating_name(c.gating) + "_" + activation_name(c.act) +
         "_T" + std::to_string(c.tokens) + "_d" + std::to_string(c.hidden) + "_Nr" +
         std::to_string(c.grid_rows) + "_Nc" + std::to_string(c.grid_cols) + "_K" +
         std::to_string(c.top_k) + "_I" + std::to_string(c.intermediate) + "_pad" +
         std::to_string(c.pad);
}

void PrintTo(const LayerCase& c, std::ostream* os) { *os << case_name(c); }

LayerConfig config_of(const LayerCase& c) {
  return make_config(c.hidden, c.grid_rows, c.grid_cols, c.top_k, c.intermediate, c.act, c.gating,
                     c.norm);
}

std::vector<float> to_float(const std::vector<double>& v) { return {v.begin(), v.end()}; }

std::vector<int32_t> token_set(const int32_t* idx, int64_t t, int64_t K) {
  std::vector<int32_t> s(idx + t * K, idx + (t + 1) * K);
  std::sort(s.begin(), s.end());
  return s;
}

class LayerTest : public ::testing::TestWithParam<LayerCase> {};

TEST_P(LayerTest, forward_is_the_sum_of_its_parts) {
  const LayerCase& c = GetParam();
  const LayerConfig cfg = config_of(c);
  const int64_t T = c.tokens, d = c.hidden, K = c.top_k, N = cfg.num_experts();
  LayerData L(cfg, c.dtype, T, c.pad, 7 + static_cast<uint64_t>(T));
  std::vector<double> rm = L.row_mean.to_vector(), rv = L.row_var.to_vector(),
                      cm = L.col_mean.to_vector(), cv = L.col_var.to_vector();
  LayerRun run;
  run.forward(L, c.training, c.pad, cpu_exec());
  const LayerSaved s = run.views(L);

  // The reference on the same (stored) inputs.
  const auto x = L.x.to_vector();
  const auto row_logp =
      reference::router_logp(cfg, x, T, L.w_r.to_vector(), c.grid_rows, c.training, &rm, &rv);
  const auto col_logp =
      reference::router_logp(cfg, x, T, L.w_c.to_vector(), c.grid_cols, c.training, &cm, &cv);
  const reference::Routing ref = reference::select(cfg, to_float(row_logp), to_float(col_logp), T);

  // Selection: the same expert set per token, except at a near tie of the reference scores
  // (the f32 log-probs of the two computations differ in the last bits).
  const int32_t* idx = static_cast<const int32_t*>(s.routing.indices.data);
  const float* scores = static_cast<const float*>(s.routing.scores.data);
  const float* gates = static_cast<const float*>(s.routing.gates.data);
  auto ref_score = [&](int64_t t, int64_t e) {
    return row_logp[t * c.grid_rows + e / c.grid_cols] +
           col_logp[t * c.grid_cols + e % c.grid_cols];
  };
  std::vector<bool> same(static_cast<size_t>(T), true);
  int64_t mismatched = 0;
  for (int64_t t = 0; t < T; ++t) {
    const auto got = token_set(idx, t, K);
    const auto exp = token_set(ref.indices.data(), t, K);
    ASSERT_TRUE(std::all_of(got.begin(), got.end(), [&](int32_t e) { return e >= 0 && e < N; }))
        << "token " << t << " has an expert id outside [0, " << N << ")";
    ASSERT_EQ(std::adjacent_find(got.begin(), got.end()), got.end())
        << "token " << t << " selected an expert twice";
    if (got == exp) continue;
    double sum_got = 0.0, sum_exp = 0.0;
    for (int64_t k = 0; k < K; ++k) {
      sum_got += ref_score(t, got[k]);
      sum_exp += ref_score(t, exp[k]);
    }
    EXPECT_LE(sum_exp - sum_got, 1e-5 * static_cast<double>(K))
        << "token " << t << " selected a different expert set, and not at a near tie";
    same[t] = false;
    ++mismatched;
  }
  EXPECT_LE(mismatched, 1 + T / 100) << "too many tokens at near ties";

  // y from the layer's own selection and (f32) gates, checked against the reference above and
  // below: so y compares at the storage dtype's precision, f64 included, for every token.
  reference::Routing used;
  used.indices.assign(idx, idx + T * K);
  used.gates.assign(gates, gates + T * K);
  auto want = reference::experts(cfg, x, T, L.up.to_vector(), L.down.to_vector(), used);
  if (c.intermediate > 0) {
    const auto m =
        reference::mlp(cfg, x, T, L.gate_p.to_vector(), L.up_p.to_vector(), L.down_p.to_vector());
    for (size_t i = 0; i < want.size(); ++i) want[i] += m[i];
  }
  expect_close("y", run.y.to_vector(), want, tolerance_for(c.dtype, K + c.intermediate));

  // Scores, gates and pre-activations of the tokens whose selection agrees.
  std::vector<double> got_scores, want_scores, got_gates, want_gates, got_pre, want_pre;
  const auto up = L.up.to_vector();
  const float* pre = static_cast<const float*>(s.expert_preact.data);
  for (int64_t t = 0; t < T; ++t) {
    if (!same[t]) continue;
    std::map<int32_t, int64_t> position;
    for (int64_t k = 0; k < K; ++k) position[ref.indices[t * K + k]] = k;
    for (int64_t k = 0; k < K; ++k) {
      const int32_t e = idx[t * K + k];
      const int64_t q = t * K + position[e];
      got_scores.push_back(scores[t * K + k]);
      want_scores.push_back(ref.scores[q]);
      got_gates.push_back(gates[t * K + k]);
      want_gates.push_back(ref.gates[q]);
      double a = 0.0;
      for (int64_t j = 0; j < d; ++j) a += x[t * d + j] * up[e * d + j];
      got_pre.push_back(pre[t * K + k]);
      want_pre.push_back(a);
    }
  }
  // Router internals are f32 whatever the storage: logits over d, log-softmax over N_r + N_c.
  const Tolerance router_tol = tolerance_for(DType::f32, d + c.grid_rows + c.grid_cols);
  expect_close("scores", got_scores, want_scores, router_tol);
  expect_close("gates", got_gates, want_gates, router_tol);
  expect_close("expert_preact", got_pre, want_pre, tolerance_for(DType::f32, d));

  // Scores in descending order per token.
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k = 1; k < K; ++k) {
      ASSERT_GE(scores[t * K + k - 1], scores[t * K + k]) << "token " << t << " position " << k;
    }
  }

  // Training updates the running statistics as the reference does; evaluation leaves them.
  if (c.norm == RouterNorm::batch) {
    const Tolerance tol = tolerance_for(DType::f32, d);
    expect_close("row_mean", L.row_mean.to_vector(), rm, tol);
    expect_close("row_var", L.row_var.to_vector(), rv, tol);
    expect_close("col_mean", L.col_mean.to_vector(), cm, tol);
    expect_close("col_var", L.col_var.to_vector(), cv, tol);
  }
}

// The layer's gradients in this dtype against the f64 layer (checked by finite differences in
// test_gradients.cpp) run on the same stored inputs.
TEST_P(LayerTest, backward_matches_f64_layer) {
  const LayerCase& c = GetParam();
  const LayerConfig cfg = config_of(c);
  const int64_t T = c.tokens, K = c.top_k, N = cfg.num_experts();
  LayerData L(cfg, c.dtype, T, c.pad, 11 + static_cast<uint64_t>(T));
  LayerData W(cfg, DType::f64, T, 0, 11 + static_cast<uint64_t>(T));
  {
    auto from = L.inputs();
    auto to = W.inputs();
    for (size_t i = 0; i < from.size(); ++i) *to[i].second = converted(*from[i].second, DType::f64);
  }
  HostTensor dy(c.dtype, {T, c.hidden}, c.pad);
  dy.fill_uniform(99, -1.0, 1.0);
  const HostTensor dy64 = converted(dy, DType::f64);

  LayerRun run, run64;
  run.forward(L, c.training, c.pad, cpu_exec());
  run64.forward(W, c.training, 0, cpu_exec());
  const int32_t* idx = static_cast<const int32_t*>(run.views(L).routing.indices.data);
  const int32_t* idx64 = static_cast<const int32_t*>(run64.views(W).routing.indices.data);
  for (int64_t t = 0; t < T; ++t) {
    ASSERT_EQ(token_set(idx, t, K), token_set(idx64, t, K))
        << "token " << t << ": the " << dtype_name(c.dtype)
        << " and f64 layers select different experts; pick another seed";
  }
  LayerGradData g(L, c.pad), g64(W, 0);
  run.backward(L, c.training, dy, g, cpu_exec());
  run64.backward(W, c.training, dy64, g64, cpu_exec());

  const auto names = L.inputs();
  const auto got = g.all(cfg);
  const auto want = g64.all(cfg);
  // Terms (docs/testing.md): dx sums the K experts, the I units and the N_r + N_c logits; a
  // weight gradient sums over the tokens.
  for (size_t i = 0; i < got.size(); ++i) {
    const int64_t terms = i == 0 ? K + c.intermediate + c.grid_rows + c.grid_cols : T;
    expect_close(names[i].first, got[i]->to_vector(), want[i]->to_vector(),
                 tolerance_for(c.dtype, terms));
  }
  // Experts no token chose have zero gradient rows.
  std::vector<bool> chosen(static_cast<size_t>(N), false);
  for (int64_t p = 0; p < T * K; ++p) chosen[idx[p]] = true;
  for (int64_t e = 0; e < N; ++e) {
    if (chosen[e]) continue;
    expect_all_zero("grads.experts.up", g.up, e, e + 1);
    expect_all_zero("grads.experts.down", g.down, e, e + 1);
  }
}

const LayerCase kCases[] = {
    {DType::f32, true, RouterNorm::batch, Gating::softmax, Activation::silu, 257, 37, 19, 23, 7, 45,
     3},
    {DType::f64, false, RouterNorm::batch, Gating::joint, Activation::gelu, 64, 16, 8, 8, 64, 24,
     0},
    {DType::bf16, true, RouterNorm::batch, Gating::softmax, Activation::silu, 257, 37, 19, 23, 7,
     45, 5},
    {DType::f16, true, RouterNorm::none, Gating::joint, Activation::relu, 100, 24, 16, 16, 16, 40,
     0},
    {DType::f32, false, RouterNorm::batch, Gating::softmax, Activation::gelu, 1, 40, 10, 10, 5, 64,
     1},
    {DType::f32, true, RouterNorm::batch, Gating::softmax, Activation::silu, 64, 37, 5, 7, 1, 0, 2},
    {DType::bf16, false, RouterNorm::none, Gating::softmax, Activation::gelu, 1, 8, 4, 4, 16, 0, 0},
    {DType::f64, true, RouterNorm::batch, Gating::softmax, Activation::relu, 33, 13, 6, 5, 9, 7, 1},
    {DType::f16, false, RouterNorm::batch, Gating::joint, Activation::silu, 257, 19, 3, 5, 15, 9,
     2},
};

INSTANTIATE_TEST_SUITE_P(Layer, LayerTest, ::testing::ValuesIn(kCases),
                         [](const ::testing::TestParamInfo<LayerCase>& info) {
                           return case_name(info.param);
                         });

// Forward and backward give the same bits with 1 and 3 threads.
TEST(LayerDeterminism, f32_T129_Nr9_Nc11_K6_I20_bitwise_across_thread_counts) {
  const LayerConfig cfg = make_config(21, 9, 11, 6, 20);
  std::vector<std::vector<double>> results[2];
  for (int i = 0; i < 2; ++i) {
    LayerData L(cfg, DType::f32, 129, 1, 5);
    const Exec exec = cpu_exec(i == 0 ? 1 : 3);
    LayerRun run;
    run.forward(L, true, 0, exec);
    HostTensor dy(DType::f32, {129, 21});
    dy.fill_uniform(6, -1.0, 1.0);
    LayerGradData g(L, 0);
    run.backward(L, true, dy, g, exec);
    results[i].push_back(run.y.to_vector());
    for (const HostTensor* t : g.all(cfg)) results[i].push_back(t->to_vector());
  }
  for (size_t k = 0; k < results[0].size(); ++k) EXPECT_EQ(results[0][k], results[1][k]) << k;
}

}  // namespace
}  // namespace omnimoe::test
