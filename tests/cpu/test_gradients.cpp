// Every backward of the CPU backend against fp64 central finite differences of its forward:
// the experts, the MLP, the router and the whole layer, for every input and parameter.
//
// The loss is L = sum(r * out) for a fixed random r, so the analytic gradient is the op's
// backward with d out = r. The selection is piecewise constant: a coordinate whose +h or -h
// forward selects a different expert set (or, for relu, flips the sign of a pre-activation) is
// skipped, and most coordinates must be checked.
//
// Tolerances. Paths in f64 end to end (experts, MLP, and the layer's expert and MLP weights)
// use step 1e-5 and must agree to 1e-7 relative. The router computes its logits, log-probs,
// scores and gates in f32 by contract, so a difference quotient through it carries the f32
// rounding of those values divided by 2h (about 1e-4 relative at h = 1e-3): step 3e-3 and
// 5e-3 relative, with an absolute floor of 5e-4 of the tensor's largest gradient, for x, W_r
// and W_c wherever the router is involved (the worst case seen is a third of that).
#include <gtest/gtest.h>
#include <omnimoe/omnimoe.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "layer_harness.h"
#include "test_support.h"

namespace omnimoe::test {
namespace {

struct FdTolerance {
  double step;
  double rtol;
  double atol_rel;  // times the largest |gradient| of the tensor
};
constexpr FdTolerance kExact{1e-5, 1e-7, 1e-9};
constexpr FdTolerance kThroughRouter{3e-3, 5e-3, 5e-4};

// Evaluates the loss at the current inputs; returns false when the piecewise-constant part
// (selection, relu signs) differs from the unperturbed run.
using LossFn = std::function<bool(double* loss)>;

struct FdTally {
  int64_t checked = 0, skipped = 0;
};

// Compares analytic (a tensor shaped like `input`) with central differences of `loss` over all
// coordinates of `input`, or a random subset of `max_coords`.
void check_gradient(const char* name, HostTensor& input, const HostTensor& analytic,
                    const LossFn& loss, FdTolerance tol, FdTally& tally, int64_t max_coords = 400) {
  SCOPED_TRACE(name);
  ASSERT_EQ(input.numel(), analytic.numel());
  std::vector<int64_t> coords(static_cast<size_t>(input.numel()));
  std::iota(coords.begin(), coords.end(), 0);
  if (static_cast<int64_t>(coords.size()) > max_coords) {
    std::mt19937_64 rng(input.numel());
    std::shuffle(coords.begin(), coords.end(), rng);
    coords.resize(static_cast<size_t>(max_coords));
  }
  double scale = 0.0;
  for (int64_t i = 0; i < analytic.numel(); ++i)
    scale = std::max(scale, std::fabs(analytic.get(i)));
  ASSERT_TRUE(std::isfinite(scale)) << name << ": the analytic gradient is not finite";
  double worst = 0.0;
  int64_t worst_at = -1;
  double worst_fd = 0.0, worst_an = 0.0;
  int64_t checked = 0, skipped = 0;
  for (int64_t c : coords) {
    const double v = input.get(c);
    double lp = 0.0, lm = 0.0;
    input.set(c, v + tol.step);
    const double vp = input.get(c);  // as stored (f32 inputs round)
    const bool same_p = loss(&lp);
    input.set(c, v - tol.step);
    const double vm = input.get(c);
    const bool same_m = loss(&lm);
    input.set(c, v);
    if (!same_p || !same_m) {
      ++skipped;
      continue;
    }
    ++checked;
    const double fd = (lp - lm) / (vp - vm);
    const double an = analytic.get(c);
    const double ratio =
        std::fabs(an - fd) / (tol.atol_rel * scale + tol.rtol * std::fabs(fd) + 1e-300);
    if (!(ratio <= worst)) {
      worst = ratio;
      worst_at = c;
      worst_fd = fd;
      worst_an = an;
    }
  }
  EXPECT_LE(worst, 1.0) << name << ": worst coordinate " << worst_at << ": analytic " << worst_an
                        << ", finite difference " << worst_fd << " (gradient scale " << scale
                        << ", " << checked << " checked)";
  tally.checked += checked;
  tally.skipped += skipped;
}

void expect_mostly_checked(const FdTally& t) {
  EXPECT_GT(t.checked, 0);
  EXPECT_GE(t.checked, 4 * t.skipped) << t.skipped << " coordinates skipped, " << t.checked
                                      << " checked: the selection is too fragile for this test";
}

double weighted_sum(const HostTensor& out, const HostTensor& r) {
  double s = 0.0;
  for (int64_t i = 0; i < out.numel(); ++i) s += out.get(i) * r.get(i);
  return s;
}

// ---------------------------------------------------------------------------------------------
// Experts, f64, with fixed routing: x, W, V and the (f32) gates.
// ---------------------------------------------------------------------------------------------

class GradientsExperts : public ::testing::TestWithParam<Activation> {};

TEST_P(GradientsExperts, f64_T9_d7_Nr4_Nc5_K4) {
  const LayerConfig cfg = make_config(7, 4, 5, 4, 0, GetParam());
  const int64_t T = 9, d = 7, N = 20, K = 4;
  HostTensor x(DType::f64, {T, d}, 2), up(DType::f64, {N, d}), down(DType::f64, {N, d}, 1);
  x.fill_uniform(1, -1.0, 1.0);
  up.fill_uniform(2, -0.7, 0.7);
  down.fill_uniform(3, -1.0, 1.0);
  HostTensor indices = random_indices(T, K, N, Spread::half, 4);
  HostTensor gates = random_gates(T, K, 5);
  const HostSchedule schedule = host_schedule(indices, N);
  HostTensor r(DType::f64, {T, d});
  r.fill_uniform(6, -1.0, 1.0);
  HostTensor y(DType::f64, {T, d}), preact(DType::f32, {T, K});
  const Exec exec = cpu_exec(1);

  auto run = [&]() {
    experts_forward(cfg, x.view(), {up.view(), down.view()}, indices.view(), gates.view(),
                    y.view(), false, preact.view(), Buffer{}, exec);
  };
  run();
  const std::vector<double> base_preact = preact.to_vector();
  HostTensor dx(DType::f64, {T, d}), dup(DType::f64, {N, d}), ddown(DType::f64, {N, d}),
      dgates(DType::f32, {T, K});
  for (HostTensor* t : {&dx, &dup, &ddown, &dgates}) t->poison();
  experts_backward(cfg, x.view(), {up.view(), down.view()}, indices.view(), gates.view(),
                   preact.view(), schedule.view(), r.view(), dx.view(), false,
                   {dup.view(), ddown.view()}, dgates.view(), Buffer{}, exec);

  const LossFn loss = [&](double* l) {
    run();
    *l = weighted_sum(y, r);
    if (cfg.act != Activation::relu) return true;
    for (int64_t i = 0; i < T * K; ++i) {
      if ((preact.get(i) > 0) != (base_preact[i] > 0)) return false;  // across the kink
    }
    return true;
  };
  FdTally tally;
  check_gradient("x", x, dx, loss, kExact, tally);
  check_gradient("W", up, dup, loss, kExact, tally);
  check_gradient("V", down, ddown, loss, kExact, tally);
  // The loss is linear in the gates, so the quotient over the stored (f32) step is exact up to
  // the f32 rounding of dgates.
  check_gradient("gates", gates, dgates, loss, {1e-3, 1e-6, 1e-7}, tally);
  expect_mostly_checked(tally);
}

INSTANTIATE_TEST_SUITE_P(Gradients, GradientsExperts,
                         ::testing::Values(Activation::silu, Activation::gelu, Activation::relu),
                         [](const ::testing::TestParamInfo<Activation>& info) {
                           return std::string(activation_name(info.param));
                         });

// ---------------------------------------------------------------------------------------------
// Shared MLP, f64: x, W_gate, W_up, W_down.
// ---------------------------------------------------------------------------------------------

TEST(GradientsMlp, f64_T6_d5_I7) {
  const LayerConfig cfg = make_config(5, 2, 2, 1, 7);
  const int64_t T = 6, d = 5, I = 7;
  HostTensor x(DType::f64, {T, d}, 1), wg(DType::f64, {I, d}), wu(DType::f64, {I, d}, 3),
      wd(DType::f64, {d, I}, 2);
  x.fill_uniform(11, -1.0, 1.0);
  wg.fill_uniform(12, -0.8, 0.8);
  wu.fill_uniform(13, -0.8, 0.8);
  wd.fill_uniform(14, -0.6, 0.6);
  HostTensor r(DType::f64, {T, d});
  r.fill_uniform(15, -1.0, 1.0);
  HostTensor y(DType::f64, {T, d}), gate_pre(DType::f64, {T, I}), up_pre(DType::f64, {T, I});
  const Exec exec = cpu_exec(1);
  auto run = [&]() {
    mlp_forward(cfg, x.view(), {wg.view(), wu.view(), wd.view()}, y.view(), false,
                {gate_pre.view(), up_pre.view()}, Buffer{}, exec);
  };
  run();
  HostTensor dx(DType::f64, {T, d}), dwg(DType::f64, {I, d}), dwu(DType::f64, {I, d}),
      dwd(DType::f64, {d, I});
  for (HostTensor* t : {&dx, &dwg, &dwu, &dwd}) t->poison();
  mlp_backward(cfg, x.view(), {wg.view(), wu.view(), wd.view()}, {gate_pre.view(), up_pre.view()},
               r.view(), dx.view(), false, {dwg.view(), dwu.view(), dwd.view()}, Buffer{}, exec);
  const LossFn loss = [&](double* l) {
    run();
    *l = weighted_sum(y, r);
    return true;
  };
  FdTally tally;
  check_gradient("x", x, dx, loss, kExact, tally);
  check_gradient("W_gate", wg, dwg, loss, kExact, tally);
  check_gradient("W_up", wu, dwu, loss, kExact, tally);
  check_gradient("W_down", wd, dwd, loss, kExact, tally);
  expect_mostly_checked(tally);
}

// ---------------------------------------------------------------------------------------------
// Router and layer: both gatings, both norms, training and evaluation.
// ---------------------------------------------------------------------------------------------

struct RoutedCase {
  Gating gating;
  RouterNorm norm;
  bool training;
  Activation act;
  int64_t tokens, hidden, grid_rows, grid_cols, top_k, intermediate;
};

std::string case_name(const RoutedCase& c) {
  return std::string(gating_name(c.gating)) + "_" + router_norm_name(c.norm) + "_" +
         (c.training ? "train" : "eval") + "_" + activation_name(c.act) + "_T" +
         std::to_string(c.tokens) + "_d" + std::to_string(c.hidden) + "_Nr" +
         std::to_string(c.grid_rows) + "_Nc" + std::to_string(c.grid_cols) + "_K" +
         std::to_string(c.top_k) + "_I" + std::to_string(c.intermediate);
}

void PrintTo(const RoutedCase& c, std::ostream* os) { *os << case_name(c); }

LayerConfig config_of(const RoutedCase& c) {
  return make_config(c.hidden, c.grid_rows, c.grid_cols, c.top_k, c.intermediate, c.act, c.gating,
                     c.norm);
}

// Per token, the selected expert set (sorted: the loss does not depend on the order).
std::vector<int32_t> selected_sets(const TensorView& indices, int64_t tokens, int64_t K) {
  const int32_t* p = static_cast<const int32_t*>(indices.data);
  std::vector<int32_t> s(p, p + tokens * K);
  for (int64_t t = 0; t < tokens; ++t) std::sort(s.begin() + t * K, s.begin() + (t + 1) * K);
  return s;
}

// The running statistics, restored before every forward (training updates them).
struct NormSnapshot {
  std::vector<double> values[4];
  explicit NormSnapshot(const LayerData& L)
      : values{L.row_mean.to_vector(), L.row_var.to_vector(), L.col_mean.to_vector(),
               L.col_var.to_vector()} {}
  void restore(LayerData& L) const {
    HostTensor* t[4] = {&L.row_mean, &L.row_var, &L.col_mean, &L.col_var};
    for (int i = 0; i < 4; ++i) {
      for (size_t j = 0; j < values[i].size(); ++j)
        t[i]->set(static_cast<int64_t>(j), values[i][j]);
    }
  }
};

class GradientsRouter : public ::testing::TestWithParam<RoutedCase> {};

TEST_P(GradientsRouter, f64_matches_finite_differences) {
  const RoutedCase& c = GetParam();
  const LayerConfig cfg = config_of(c);
  const int64_t T = c.tokens, K = c.top_k;
  LayerData L(cfg, DType::f64, T, 1, 21);
  const NormSnapshot snapshot(L);
  HostTensor indices(DType::i32, {T, K}), scores(DType::f32, {T, K}), gates(DType::f32, {T, K});
  HostTensor row_logits(DType::f32, {T, cfg.grid_rows}), col_logits(DType::f32, {T, cfg.grid_cols});
  HostTensor row_rstd(DType::f32, {cfg.grid_rows}), col_rstd(DType::f32, {cfg.grid_cols});
  const RouterOutputs out{indices.view(), scores.view(), gates.view()};
  const RouterSaved saved{row_logits.view(), col_logits.view(), row_rstd.view(), col_rstd.view()};
  const Exec exec = cpu_exec(1);
  Bytes ws(std::max(router_forward_workspace_bytes(cfg, T, DType::f64, exec),
                    router_backward_workspace_bytes(cfg, T, DType::f64, exec)));
  auto run = [&]() {
    snapshot.restore(L);
    router_forward(cfg, L.x.view(), L.weights().router, L.norm(), c.training, out, saved,
                   ws.buffer(), exec);
  };
  run();
  const std::vector<int32_t> base = selected_sets(indices.view(), T, K);
  HostTensor r(DType::f32, {T, K});
  r.fill_uniform(22, -1.0, 1.0);
  HostTensor dx(DType::f64, {T, cfg.hidden}), dwr(DType::f64, {cfg.grid_rows, cfg.hidden}),
      dwc(DType::f64, {cfg.grid_cols, cfg.hidden});
  for (HostTensor* t : {&dx, &dwr, &dwc}) t->poison();
  router_backward(cfg, L.x.view(), L.weights().router, c.training, saved, out, r.view(), dx.view(),
                  false, {dwr.view(), dwc.view()}, ws.buffer(), exec);
  const LossFn loss = [&](double* l) {
    run();
    *l = weighted_sum(gates, r);
    return selected_sets(indices.view(), T, K) == base;
  };
  FdTally tally;
  check_gradient("x", L.x, dx, loss, kThroughRouter, tally);
  check_gradient("W_r", L.w_r, dwr, loss, kThroughRouter, tally);
  check_gradient("W_c", L.w_c, dwc, loss, kThroughRouter, tally);
  expect_mostly_checked(tally);
}

const RoutedCase kRouted[] = {
    {Gating::softmax, RouterNorm::batch, true, Activation::silu, 6, 5, 3, 4, 3, 6},
    {Gating::softmax, RouterNorm::batch, false, Activation::silu, 6, 5, 3, 4, 3, 6},
    {Gating::softmax, RouterNorm::none, true, Activation::silu, 6, 5, 3, 4, 3, 6},
    {Gating::softmax, RouterNorm::none, false, Activation::silu, 6, 5, 3, 4, 3, 6},
    {Gating::joint, RouterNorm::batch, true, Activation::silu, 6, 5, 3, 4, 3, 6},
    {Gating::joint, RouterNorm::batch, false, Activation::silu, 6, 5, 3, 4, 3, 6},
    {Gating::joint, RouterNorm::none, true, Activation::silu, 6, 5, 3, 4, 3, 6},
    {Gating::joint, RouterNorm::none, false, Activation::silu, 6, 5, 3, 4, 3, 6},
    // K = N: every expert is chosen, only the order moves.
    {Gating::softmax, RouterNorm::batch, true, Activation::gelu, 5, 4, 2, 3, 6, 4},
    // K = 1 with joint gating: the one gate is exp(S), its gradient reaches the router.
    {Gating::joint, RouterNorm::batch, true, Activation::relu, 7, 6, 4, 3, 1, 5},
    // One token in evaluation.
    {Gating::softmax, RouterNorm::batch, false, Activation::gelu, 1, 6, 3, 3, 4, 5},
    // No shared MLP.
    {Gating::softmax, RouterNorm::batch, true, Activation::silu, 8, 7, 4, 4, 5, 0},
};

INSTANTIATE_TEST_SUITE_P(Gradients, GradientsRouter, ::testing::ValuesIn(kRouted),
                         [](const ::testing::TestParamInfo<RoutedCase>& info) {
                           return case_name(info.param);
                         });

class GradientsLayer : public ::testing::TestWithParam<RoutedCase> {};

TEST_P(GradientsLayer, f64_matches_finite_differences) {
  const RoutedCase& c = GetParam();
  const LayerConfig cfg = config_of(c);
  const int64_t T = c.tokens, K = c.top_k;
  LayerData L(cfg, DType::f64, T, 2, 31);
  const NormSnapshot snapshot(L);
  const Exec exec = cpu_exec(1);
  LayerRun run;
  run.forward(L, c.training, 0, exec);
  const std::vector<int32_t> base = selected_sets(run.views(L).routing.indices, T, K);
  const std::vector<double> base_preact = [&] {
    HostTensor p(DType::f32, {T, K});
    const TensorView v = run.views(L).expert_preact;
    std::copy_n(static_cast<const float*>(v.data), T * K, static_cast<float*>(p.data()));
    return p.to_vector();
  }();
  HostTensor r(DType::f64, {T, cfg.hidden});
  r.fill_uniform(32, -1.0, 1.0);
  LayerGradData g(L, 1);
  run.backward(L, c.training, r, g, exec);

  const LossFn loss = [&](double* l) {
    snapshot.restore(L);
    run.forward(L, c.training, 0, exec);
    *l = weighted_sum(run.y, r);
    const LayerSaved s = run.views(L);
    if (selected_sets(s.routing.indices, T, K) != base) return false;
    if (cfg.act == Activation::relu) {
      const float* p = static_cast<const float*>(s.expert_preact.data);
      for (int64_t i = 0; i < T * K; ++i) {
        if ((p[i] > 0) != (base_preact[i] > 0)) return false;
      }
    }
    return true;
  };
  FdTally tally;
  const auto inputs = L.inputs();
  const auto grads = g.all(cfg);
  for (size_t i = 0; i < inputs.size(); ++i) {
    const std::string name = inputs[i].first;
    // x, W_r and W_c move the router; the others do not.
    const bool routed = name == "x" || name == "W_r" || name == "W_c";
    check_gradient(inputs[i].first, *inputs[i].second, *grads[i], loss,
                   routed ? kThroughRouter : kExact, tally);
  }
  expect_mostly_checked(tally);
  snapshot.restore(L);
}

INSTANTIATE_TEST_SUITE_P(Gradients, GradientsLayer, ::testing::ValuesIn(kRouted),
                         [](const ::testing::TestParamInfo<RoutedCase>& info) {
                           return case_name(info.param);
                         });

}  // namespace
}  // namespace omnimoe::test
