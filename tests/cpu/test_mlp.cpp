// The CPU shared SwiGLU MLP against reference::mlp and a brute-force backward written here.
#include <gtest/gtest.h>
#include <omnimoe/omnimoe.h>

#include <cmath>
#include <string>

#include "layer_harness.h"
#include "reference.h"
#include "test_support.h"

namespace omnimoe::test {
namespace {

struct MlpCase {
  DType dtype;
  int64_t tokens, hidden, intermediate;
  int64_t pad;  // row padding of x, y, dy, dx and of some weights
};

std::string case_name(const MlpCase& c) {
  return std::string(dtype_name(c.dtype)) + "_T" + std::to_string(c.tokens) + "_d" +
         std::to_string(c.hidden) + "_I" + std::to_string(c.intermediate) + "_pad" +
         std::to_string(c.pad);
}

struct MlpReference {
  std::vector<double> gate_pre, up_pre, dx, dgate, dup, ddown;
};

// Projections and the gradients of sum(dy * y), in double.
MlpReference reference_backward(int64_t T, int64_t d, int64_t I, const std::vector<double>& x,
                                const std::vector<double>& wg, const std::vector<double>& wu,
                                const std::vector<double>& wd, const std::vector<double>& dy) {
  MlpReference r;
  r.gate_pre.assign(T * I, 0.0);
  r.up_pre.assign(T * I, 0.0);
  r.dx.assign(T * d, 0.0);
  r.dgate.assign(I * d, 0.0);
  r.dup.assign(I * d, 0.0);
  r.ddown.assign(d * I, 0.0);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t i = 0; i < I; ++i) {
      double g = 0.0, u = 0.0, dh = 0.0;
      for (int64_t j = 0; j < d; ++j) {
        g += wg[i * d + j] * x[t * d + j];
        u += wu[i * d + j] * x[t * d + j];
        dh += wd[j * I + i] * dy[t * d + j];
      }
      r.gate_pre[t * I + i] = g;
      r.up_pre[t * I + i] = u;
      const double s = 1.0 / (1.0 + std::exp(-g));
      const double dg = dh * u * s * (1.0 + g * (1.0 - s));
      const double du = dh * g * s;
      for (int64_t j = 0; j < d; ++j) {
        r.ddown[j * I + i] += dy[t * d + j] * g * s * u;
        r.dgate[i * d + j] += dg * x[t * d + j];
        r.dup[i * d + j] += du * x[t * d + j];
        r.dx[t * d + j] += dg * wg[i * d + j] + du * wu[i * d + j];
      }
    }
  }
  return r;
}

class MlpTest : public ::testing::TestWithParam<MlpCase> {
 protected:
  void SetUp() override {
    const MlpCase& c = GetParam();
    T = c.tokens;
    d = c.hidden;
    I = c.intermediate;
    cfg = make_config(d, 2, 2, 1, I);
    const uint64_t seed = 500 + static_cast<uint64_t>(T * 13 + d * 5 + I);
    const double a = std::sqrt(3.0 / static_cast<double>(d));
    const double b = std::sqrt(3.0 / static_cast<double>(I));
    x = HostTensor(c.dtype, {T, d}, c.pad);
    x.fill_uniform(seed, -1.0, 1.0);
    wg = HostTensor(c.dtype, {I, d}, c.pad);
    wg.fill_uniform(seed + 1, -a, a);
    wu = HostTensor(c.dtype, {I, d});
    wu.fill_uniform(seed + 2, -a, a);
    wd = HostTensor(c.dtype, {d, I}, c.pad);
    wd.fill_uniform(seed + 3, -b, b);
    dy = HostTensor(c.dtype, {T, d}, c.pad);
    dy.fill_uniform(seed + 4, -1.0, 1.0);
    gate_pre = HostTensor(c.dtype, {T, I});
    up_pre = HostTensor(c.dtype, {T, I});
    ref = reference_backward(T, d, I, x.to_vector(), wg.to_vector(), wu.to_vector(), wd.to_vector(),
                             dy.to_vector());
  }
  MlpWeights weights() const { return {wg.view(), wu.view(), wd.view()}; }
  MlpSaved saved() const { return {gate_pre.view(), up_pre.view()}; }

  void forward(HostTensor& y, bool accumulate) {
    gate_pre.poison();
    up_pre.poison();
    mlp_forward(cfg, x.view(), weights(), y.view(), accumulate, saved(), Buffer{}, cpu_exec());
  }

  LayerConfig cfg;
  int64_t T = 0, d = 0, I = 0;
  HostTensor x, wg, wu, wd, dy, gate_pre, up_pre;
  MlpReference ref;
};

TEST_P(MlpTest, forward_matches_reference) {
  const MlpCase& c = GetParam();
  HostTensor y(c.dtype, {T, d}, c.pad);
  y.poison();
  forward(y, false);
  const auto want =
      reference::mlp(cfg, x.to_vector(), T, wg.to_vector(), wu.to_vector(), wd.to_vector());
  expect_close("y", y.to_vector(), want, tolerance_for(c.dtype, d + I));
  expect_close("saved.gate_pre", gate_pre.to_vector(), ref.gate_pre, tolerance_for(c.dtype, d));
  expect_close("saved.up_pre", up_pre.to_vector(), ref.up_pre, tolerance_for(c.dtype, d));
}

TEST_P(MlpTest, forward_accumulates_into_y) {
  const MlpCase& c = GetParam();
  HostTensor y(c.dtype, {T, d}, c.pad);
  y.fill_uniform(3, -1.0, 1.0);
  const auto y0 = y.to_vector();
  forward(y, true);
  auto want = reference::mlp(cfg, x.to_vector(), T, wg.to_vector(), wu.to_vector(), wd.to_vector());
  for (size_t i = 0; i < want.size(); ++i) want[i] += y0[i];
  expect_close("y0 + y", y.to_vector(), want, tolerance_for(c.dtype, d + I));
}

TEST_P(MlpTest, backward_matches_reference) {
  const MlpCase& c = GetParam();
  for (bool accumulate : {false, true}) {
    SCOPED_TRACE(accumulate ? "accumulate_dx" : "overwrite dx");
    HostTensor y(c.dtype, {T, d});
    forward(y, false);
    HostTensor dx(c.dtype, {T, d}, c.pad), dgate(c.dtype, {I, d}), dup(c.dtype, {I, d}, 1),
        ddown(c.dtype, {d, I}, c.pad);
    std::vector<double> want_dx = ref.dx;
    if (accumulate) {
      dx.fill_uniform(8, -1.0, 1.0);
      for (size_t i = 0; i < want_dx.size(); ++i) want_dx[i] += dx.get(static_cast<int64_t>(i));
    } else {
      dx.poison();
    }
    dgate.poison();
    dup.poison();
    ddown.poison();
    mlp_backward(cfg, x.view(), weights(), saved(), dy.view(), dx.view(), accumulate,
                 {dgate.view(), dup.view(), ddown.view()}, Buffer{}, cpu_exec());
    // bf16/f16 backward reads the rounded gate_pre/up_pre: the storage tolerance covers it.
    expect_close("dx", dx.to_vector(), want_dx, tolerance_for(c.dtype, d + I));
    expect_close("grads.gate", dgate.to_vector(), ref.dgate, tolerance_for(c.dtype, T));
    expect_close("grads.up", dup.to_vector(), ref.dup, tolerance_for(c.dtype, T));
    expect_close("grads.down", ddown.to_vector(), ref.ddown, tolerance_for(c.dtype, T));
  }
}

INSTANTIATE_TEST_SUITE_P(
    Mlp, MlpTest,
    ::testing::Values(MlpCase{DType::f32, 257, 37, 45, 3}, MlpCase{DType::f64, 64, 16, 24, 0},
                      MlpCase{DType::bf16, 257, 37, 45, 5}, MlpCase{DType::f16, 100, 24, 40, 0},
                      MlpCase{DType::f32, 1, 8, 3, 0}, MlpCase{DType::f64, 7, 5, 1, 2},
                      MlpCase{DType::bf16, 1, 40, 64, 1}),
    [](const ::testing::TestParamInfo<MlpCase>& info) { return case_name(info.param); });

}  // namespace
}  // namespace omnimoe::test
