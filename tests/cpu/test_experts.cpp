// The CPU atomic experts against the brute-force definition (reference::experts) and a
// brute-force backward written here, in double, token by token.
#include <gtest/gtest.h>
#include <omnimoe/omnimoe.h>

#include <cmath>
#include <set>
#include <string>

#include "layer_harness.h"
#include "reference.h"
#include "test_support.h"

namespace omnimoe::test {
namespace {

struct ExpertsCase {
  DType dtype;
  int64_t tokens, hidden, grid_rows, grid_cols, top_k;
  Activation act;
  Spread spread;
  int64_t pad;  // row padding of x, y, dy, dx and of W
};

std::string case_name(const ExpertsCase& c) {
  return std::string(dtype_name(c.dtype)) + "_T" + std::to_string(c.tokens) + "_d" +
         std::to_string(c.hidden) + "_Nr" + std::to_string(c.grid_rows) + "_Nc" +
         std::to_string(c.grid_cols) + "_K" + std::to_string(c.top_k) + "_" +
         activation_name(c.act) + "_" + spread_name(c.spread) + "_pad" + std::to_string(c.pad);
}

double activate_grad(Activation act, double z) {
  switch (act) {
    case Activation::silu: {
      const double s = 1.0 / (1.0 + std::exp(-z));
      return s * (1.0 + z * (1.0 - s));
    }
    case Activation::gelu:
      return 0.5 * (1.0 + std::erf(z / std::sqrt(2.0))) +
             z * std::exp(-0.5 * z * z) / std::sqrt(2.0 * M_PI);
    case Activation::relu:
      return z > 0.0 ? 1.0 : 0.0;
  }
  return 1.0;
}

// Brute-force gradients of sum(dy * y) for y = experts(x).
struct ExpertsGrads {
  std::vector<double> dx, dup, ddown, dgates, preact;
};

ExpertsGrads reference_backward(const LayerConfig& cfg, const std::vector<double>& x,
                                int64_t tokens, const std::vector<double>& up,
                                const std::vector<double>& down, const reference::Routing& routing,
                                const std::vector<double>& dy) {
  const int64_t d = cfg.hidden, K = cfg.top_k, N = cfg.num_experts();
  ExpertsGrads g;
  g.dx.assign(tokens * d, 0.0);
  g.dup.assign(N * d, 0.0);
  g.ddown.assign(N * d, 0.0);
  g.dgates.assign(tokens * K, 0.0);
  g.preact.assign(tokens * K, 0.0);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t e = routing.indices[t * K + k];
      const double gate = routing.gates[t * K + k];
      double a = 0.0, dyv = 0.0;
      for (int64_t j = 0; j < d; ++j) {
        a += x[t * d + j] * up[e * d + j];
        dyv += dy[t * d + j] * down[e * d + j];
      }
      const double h = reference::activate(cfg.act, a);
      const double da = gate * dyv * activate_grad(cfg.act, a);
      g.preact[t * K + k] = a;
      g.dgates[t * K + k] = h * dyv;
      for (int64_t j = 0; j < d; ++j) {
        g.dx[t * d + j] += da * up[e * d + j];
        g.dup[e * d + j] += da * x[t * d + j];
        g.ddown[e * d + j] += gate * h * dy[t * d + j];
      }
    }
  }
  return g;
}

class ExpertsTest : public ::testing::TestWithParam<ExpertsCase> {
 protected:
  void SetUp() override {
    const ExpertsCase& c = GetParam();
    cfg = make_config(c.hidden, c.grid_rows, c.grid_cols, c.top_k, 0, c.act);
    T = c.tokens;
    d = c.hidden;
    N = cfg.num_experts();
    K = c.top_k;
    const uint64_t seed = 1000 + static_cast<uint64_t>(T * 31 + d * 7 + K);
    const double a = std::sqrt(3.0 / static_cast<double>(d));
    x = HostTensor(c.dtype, {T, d}, c.pad);
    x.fill_uniform(seed, -1.0, 1.0);
    up = HostTensor(c.dtype, {N, d}, c.pad);
    up.fill_uniform(seed + 1, -a, a);
    down = HostTensor(c.dtype, {N, d});
    down.fill_uniform(seed + 2, -1.0, 1.0);
    indices = random_indices(T, K, N, c.spread, seed + 3);
    gates = random_gates(T, K, seed + 4);
    schedule = host_schedule(indices, N);
    dy = HostTensor(c.dtype, {T, d}, c.pad);
    dy.fill_uniform(seed + 5, -1.0, 1.0);
    routing = routing_of(indices, gates);
    // Pairs of the busiest expert: the number of terms in its gradient rows.
    std::vector<int64_t> count(N, 0);
    for (int64_t p = 0; p < T * K; ++p) ++count[static_cast<int64_t>(indices.get(p))];
    busiest = *std::max_element(count.begin(), count.end());
    for (int64_t e = 0; e < N; ++e) {
      if (count[e] == 0) unchosen.insert(e);
    }
  }

  ExpertWeights weights() const { return {up.view(), down.view()}; }

  void forward(HostTensor& y, HostTensor& preact, bool accumulate, const Exec& exec) {
    experts_forward(cfg, x.view(), weights(), indices.view(), gates.view(),
                    y.view(), accumulate, preact.view(), Buffer{}, exec);
  }

  struct Outputs {
    HostTensor dx, dup, ddown, dgates;
  };
  Outputs backward(const HostTensor& preact, const HostTensor* dx_init, const Exec& exec) {
    const ExpertsCase& c = GetParam();
    Outputs o{HostTensor(c.dtype, {T, d}, c.pad), HostTensor(c.dtype, {N, d}),
              HostTensor(c.dtype, {N, d}, c.pad + 1), HostTensor(DType::f32, {T, K})};
    o.dx.poison();
    if (dx_init) {
      for (int64_t i = 0; i < o.dx.numel(); ++i) o.dx.set(i, dx_init->get(i));
    }
    o.dup.poison();
    o.ddown.poison();
    o.dgates.poison();
    experts_backward(cfg, x.view(), weights(), indices.view(), gates.view(), preact.view(),
                     schedule.view(), dy.view(), o.dx.view(), dx_init != nullptr,
                     {o.dup.view(), o.ddown.view()}, o.dgates.view(), Buffer{}, exec);
    return o;
  }

  LayerConfig cfg;
  int64_t T = 0, d = 0, N = 0, K = 0, busiest = 0;
  HostTensor x, up, down, indices, gates, dy;
  HostSchedule schedule;
  reference::Routing routing;
  std::set<int64_t> unchosen;
};

TEST_P(ExpertsTest, forward_matches_reference) {
  const ExpertsCase& c = GetParam();
  HostTensor y(c.dtype, {T, d}, c.pad), preact(DType::f32, {T, K});
  y.poison();
  preact.poison();
  forward(y, preact, /*accumulate=*/false, cpu_exec());
  const auto want =
      reference::experts(cfg, x.to_vector(), T, up.to_vector(), down.to_vector(), routing);
  expect_close("y", y.to_vector(), want, tolerance_for(c.dtype, K + d));
  const auto grads = reference_backward(cfg, x.to_vector(), T, up.to_vector(), down.to_vector(),
                                        routing, dy.to_vector());
  // preact is f32 whatever the storage: the inputs are exact, only the f32 sum rounds.
  expect_close("preact", preact.to_vector(), grads.preact, tolerance_for(DType::f32, d));
}

TEST_P(ExpertsTest, forward_accumulates_into_y) {
  const ExpertsCase& c = GetParam();
  HostTensor y(c.dtype, {T, d}, c.pad), preact(DType::f32, {T, K});
  y.fill_uniform(77, -1.0, 1.0);
  const auto y0 = y.to_vector();
  preact.poison();
  forward(y, preact, /*accumulate=*/true, cpu_exec());
  auto want = reference::experts(cfg, x.to_vector(), T, up.to_vector(), down.to_vector(), routing);
  for (size_t i = 0; i < want.size(); ++i) want[i] += y0[i];
  expect_close("y0 + y", y.to_vector(), want, tolerance_for(c.dtype, K + d));
}

TEST_P(ExpertsTest, backward_matches_reference) {
  const ExpertsCase& c = GetParam();
  HostTensor y(c.dtype, {T, d}), preact(DType::f32, {T, K});
  forward(y, preact, false, cpu_exec());
  const Outputs o = backward(preact, nullptr, cpu_exec());
  const auto want = reference_backward(cfg, x.to_vector(), T, up.to_vector(), down.to_vector(),
                                       routing, dy.to_vector());
  expect_close("dx", o.dx.to_vector(), want.dx, tolerance_for(c.dtype, K + d));
  // dgates is f32 whatever the storage, from exactly stored inputs.
  expect_close("dgates", o.dgates.to_vector(), want.dgates, tolerance_for(DType::f32, d));
  expect_close("grads.up", o.dup.to_vector(), want.dup, tolerance_for(c.dtype, busiest + d));
  expect_close("grads.down", o.ddown.to_vector(), want.ddown, tolerance_for(c.dtype, busiest + d));
  // Rows of experts no token chose are exactly zero (they were poisoned).
  for (int64_t e : unchosen) {
    expect_all_zero("grads.up", o.dup, e, e + 1);
    expect_all_zero("grads.down", o.ddown, e, e + 1);
  }
  if (c.spread == Spread::half) {
    EXPECT_FALSE(unchosen.empty()) << "the half spread must leave experts unchosen";
  }
}

TEST_P(ExpertsTest, backward_accumulates_into_dx) {
  const ExpertsCase& c = GetParam();
  HostTensor y(c.dtype, {T, d}), preact(DType::f32, {T, K});
  forward(y, preact, false, cpu_exec());
  HostTensor dx0(c.dtype, {T, d});
  dx0.fill_uniform(91, -1.0, 1.0);
  const Outputs o = backward(preact, &dx0, cpu_exec());
  auto want = reference_backward(cfg, x.to_vector(), T, up.to_vector(), down.to_vector(), routing,
                                 dy.to_vector())
                  .dx;
  for (size_t i = 0; i < want.size(); ++i) want[i] += dx0.get(static_cast<int64_t>(i));
  expect_close("dx0 + dx", o.dx.to_vector(), want, tolerance_for(c.dtype, K + d));
}

// The expert-centric sums run in the schedule's order: the thread count changes no bit.
TEST_P(ExpertsTest, backward_is_bitwise_deterministic_across_thread_counts) {
  const ExpertsCase& c = GetParam();
  HostTensor y(c.dtype, {T, d}), preact(DType::f32, {T, K});
  forward(y, preact, false, cpu_exec(1));
  const Outputs a = backward(preact, nullptr, cpu_exec(1));
  const Outputs b = backward(preact, nullptr, cpu_exec(3));
  EXPECT_EQ(a.dx.to_vector(), b.dx.to_vector());
  EXPECT_EQ(a.dup.to_vector(), b.dup.to_vector());
  EXPECT_EQ(a.ddown.to_vector(), b.ddown.to_vector());
  EXPECT_EQ(a.dgates.to_vector(), b.dgates.to_vector());
}

INSTANTIATE_TEST_SUITE_P(
    Experts, ExpertsTest,
    ::testing::Values(
        ExpertsCase{DType::f32, 257, 37, 19, 23, 7, Activation::silu, Spread::random, 3},
        ExpertsCase{DType::f64, 64, 16, 8, 8, 64, Activation::gelu, Spread::random, 0},
        ExpertsCase{DType::bf16, 257, 37, 19, 23, 7, Activation::silu, Spread::random, 5},
        ExpertsCase{DType::f16, 100, 24, 16, 16, 16, Activation::relu, Spread::half, 0},
        ExpertsCase{DType::f32, 1, 8, 4, 4, 1, Activation::silu, Spread::random, 0},
        ExpertsCase{DType::f32, 33, 37, 5, 7, 1, Activation::gelu, Spread::one_hot, 2},
        ExpertsCase{DType::f64, 50, 13, 6, 6, 9, Activation::relu, Spread::one_hot, 1},
        ExpertsCase{DType::bf16, 64, 40, 10, 10, 50, Activation::gelu, Spread::half, 2},
        ExpertsCase{DType::f32, 129, 64, 32, 32, 5, Activation::relu, Spread::half, 1},
        ExpertsCase{DType::f16, 257, 19, 3, 5, 15, Activation::silu, Spread::one_hot, 0}),
    [](const ::testing::TestParamInfo<ExpertsCase>& info) { return case_name(info.param); });

TEST(ExpertsExecution, cpu_names_its_path) {
  const LayerConfig cfg = make_config(16, 4, 4, 3, 0);
  EXPECT_STREQ(experts_execution(cfg, 100, DType::bf16, cpu_exec()), "cpu");
  EXPECT_EQ(experts_forward_workspace_bytes(cfg, 100, DType::f32, cpu_exec()), 0u);
  EXPECT_EQ(experts_backward_workspace_bytes(cfg, 100, DType::f32, cpu_exec()), 0u);
  EXPECT_TRUE(experts_backward_reads_schedule(cfg, 100, DType::f32, cpu_exec()));
}

}  // namespace
}  // namespace omnimoe::test
