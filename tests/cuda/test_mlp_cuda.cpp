// CUDA shared MLP against the CPU backend, forward and backward, from the same random inputs.
#include <omnimoe/omnimoe.h>

#include <cmath>
#include <string>
#include <utility>

#include "cuda_test_support.h"

namespace omnimoe::test {
namespace {

struct MlpCase {
  DType dtype;
  int64_t tokens, hidden, inter;
  int64_t padding;       // extra elements per row of x, y, dy, dx, weights and grads
  bool accumulate;       // y (forward) and dx (backward) are added to
  bool stacked = false;  // W_gate, W_up (and their gradients) as the row blocks of one matrix
};

std::string case_name(const MlpCase& c) {
  std::string s = std::string(dtype_name(c.dtype)) + "_T" + std::to_string(c.tokens) + "_d" +
                  std::to_string(c.hidden) + "_I" + std::to_string(c.inter);
  if (c.padding) s += "_pad" + std::to_string(c.padding);
  if (c.accumulate) s += "_accumulate";
  if (c.stacked) s += "_stacked";
  return s;
}

LayerConfig config_for(const MlpCase& c) { return make_config(c.hidden, 2, 3, 2, c.inter); }

// Weights like nn.Linear's init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), so activations stay O(1).
MirroredTensor weight(DType dt, int64_t rows, int64_t cols, uint64_t seed, int64_t padding) {
  const double bound = 1.0 / std::sqrt(static_cast<double>(cols));
  return MirroredTensor(make_random(dt, {rows, cols}, seed, padding, -bound, bound));
}

// Output tensors start poisoned, or random when the op adds to them.
MirroredTensor output(DType dt, int64_t rows, int64_t cols, uint64_t seed, int64_t padding,
                      bool random) {
  HostTensor h(dt, {rows, cols}, padding);
  if (random) {
    h.fill_uniform(seed);
  } else {
    h.poison();
  }
  return MirroredTensor(std::move(h));
}

// The gate and up views: two matrices, or the row blocks of one when the case stacks them.
std::pair<TensorView, TensorView> gate_and_up(const MlpCase& c, const MirroredTensor& stacked,
                                              const MirroredTensor& gate, const MirroredTensor& up,
                                              const Exec& e) {
  if (!c.stacked) return {gate.view(e), up.view(e)};
  const TensorView v = stacked.view(e);
  return {row_block(v, 0, c.inter), row_block(v, c.inter, c.inter)};
}

class MlpCuda : public ::testing::TestWithParam<MlpCase> {};

TEST_P(MlpCuda, ForwardMatchesCpu) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  const MlpCase c = GetParam();
  const LayerConfig cfg = config_for(c);
  const DType dt = c.dtype;
  MirroredTensor x(make_random(dt, {c.tokens, c.hidden}, 1, c.padding));
  MirroredTensor wg = weight(dt, c.inter, c.hidden, 2, c.padding);
  MirroredTensor wu = weight(dt, c.inter, c.hidden, 3, c.padding);
  MirroredTensor wd = weight(dt, c.hidden, c.inter, 4, c.padding);
  MirroredTensor y = output(dt, c.tokens, c.hidden, 5, c.padding, c.accumulate);
  MirroredTensor gate_pre = output(dt, c.tokens, c.inter, 0, 0, false);
  MirroredTensor up_pre = output(dt, c.tokens, c.inter, 0, 0, false);

  MirroredTensor w_stacked(stack_rows(wg.host, wu.host));

  run_on_cpu_and_cuda([&](const Exec& e) {
    Scratch ws(e, mlp_forward_workspace_bytes(cfg, c.tokens, dt, e));
    const auto [w_gate, w_up] = gate_and_up(c, w_stacked, wg, wu, e);
    mlp_forward(cfg, x.view(e), {w_gate, w_up, wd.view(e)}, y.view(e), c.accumulate,
                {gate_pre.view(e), up_pre.view(e)}, ws.buffer(), e);
  });

  expect_close(gate_pre.fetch(), gate_pre.host, tolerance_for(dt, c.hidden), "gate_pre");
  expect_close(up_pre.fetch(), up_pre.host, tolerance_for(dt, c.hidden), "up_pre");
  expect_close(y.fetch(), y.host, tolerance_for(dt, c.inter), "y");
}

TEST_P(MlpCuda, BackwardMatchesCpu) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  const MlpCase c = GetParam();
  const LayerConfig cfg = config_for(c);
  const DType dt = c.dtype;
  MirroredTensor x(make_random(dt, {c.tokens, c.hidden}, 1, c.padding));
  MirroredTensor wg = weight(dt, c.inter, c.hidden, 2, c.padding);
  MirroredTensor wu = weight(dt, c.inter, c.hidden, 3, c.padding);
  MirroredTensor wd = weight(dt, c.hidden, c.inter, 4, c.padding);
  // Saved projections as forward would leave them: any O(1) values will do.
  MirroredTensor gate_pre(make_random(dt, {c.tokens, c.inter}, 6, 0, -2.0, 2.0));
  MirroredTensor up_pre(make_random(dt, {c.tokens, c.inter}, 7, 0, -2.0, 2.0));
  MirroredTensor dy(make_random(dt, {c.tokens, c.hidden}, 8, c.padding));
  MirroredTensor dx = output(dt, c.tokens, c.hidden, 9, c.padding, c.accumulate);
  MirroredTensor dwg = output(dt, c.inter, c.hidden, 0, c.padding, false);
  MirroredTensor dwu = output(dt, c.inter, c.hidden, 0, c.padding, false);
  MirroredTensor dwd = output(dt, c.hidden, c.inter, 0, c.padding, false);
  // Stacked: [W_gate; W_up] and [grads.gate; grads.up] as one matrix each (one product for the
  // two dx terms, one for the two weight gradients).
  MirroredTensor w_stacked(stack_rows(wg.host, wu.host));
  MirroredTensor dw_stacked(stack_rows(dwg.host, dwu.host));
  dw_stacked.device.poison();

  run_on_cpu_and_cuda([&](const Exec& e) {
    Scratch ws(e, mlp_backward_workspace_bytes(cfg, c.tokens, dt, e));
    const auto [w_gate, w_up] = gate_and_up(c, w_stacked, wg, wu, e);
    const auto [dw_gate, dw_up] = gate_and_up(c, dw_stacked, dwg, dwu, e);
    mlp_backward(cfg, x.view(e), {w_gate, w_up, wd.view(e)}, {gate_pre.view(e), up_pre.view(e)},
                 dy.view(e), dx.view(e), c.accumulate, {dw_gate, dw_up, dwd.view(e)}, ws.buffer(),
                 e);
  });

  // dx sums 2I products; weight gradients sum over the T tokens.
  expect_close(dx.fetch(), dx.host, tolerance_for(dt, 2 * c.inter), "dx");
  if (c.stacked) {
    expect_close(dw_stacked.fetch(), dw_stacked.host, tolerance_for(dt, c.tokens),
                 "grads.gate and grads.up (stacked)");
  } else {
    expect_close(dwg.fetch(), dwg.host, tolerance_for(dt, c.tokens), "grads.gate");
    expect_close(dwu.fetch(), dwu.host, tolerance_for(dt, c.tokens), "grads.up");
  }
  expect_close(dwd.fetch(), dwd.host, tolerance_for(dt, c.tokens), "grads.down");
}

std::vector<MlpCase> mlp_cases() {
  std::vector<MlpCase> cases;
  for (DType dt : {DType::bf16, DType::f16, DType::f32, DType::f64}) {
    cases.push_back({dt, 257, 37, 53, 0, false});
    cases.push_back({dt, 257, 37, 53, 3, true});
  }
  cases.push_back({DType::bf16, 1, 37, 53, 0, false});
  cases.push_back({DType::f32, 64, 1, 1, 1, false});
  // 16-byte-aligned rows (the vectorised elementwise path): a partial 128-row tile and several
  // column tiles, padded rows, one token.
  cases.push_back({DType::bf16, 300, 128, 256, 0, true});
  cases.push_back({DType::bf16, 520, 256, 1024, 0, false});
  cases.push_back({DType::f16, 257, 64, 136, 8, true});
  cases.push_back({DType::bf16, 1, 64, 200, 8, false});
  // Stacked gate and up weights and gradients (one product each for dx and the two gradients):
  // the vectorised activation pass, an odd I (scalar pass), f32 with padding.
  cases.push_back({DType::bf16, 300, 128, 256, 0, true, true});
  cases.push_back({DType::f16, 257, 37, 53, 3, false, true});
  cases.push_back({DType::f32, 129, 64, 136, 2, true, true});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Cases, MlpCuda, ::testing::ValuesIn(mlp_cases()),
                         [](const ::testing::TestParamInfo<MlpCase>& info) {
                           return case_name(info.param);
                         });

// T = 0: backward still overwrites the weight gradients, with zeros.
TEST(MlpCudaEmpty, bf16_T0_d37_I53_backward_writes_zero_grads) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  const MlpCase c{DType::bf16, 0, 37, 53, 0, false};
  const LayerConfig cfg = config_for(c);
  const DType dt = c.dtype;
  const Exec e = cuda_exec(nullptr);
  DeviceTensor x = upload(HostTensor(dt, {0, 37})), dy = upload(HostTensor(dt, {0, 37}));
  DeviceTensor dx = upload(HostTensor(dt, {0, 37}));
  DeviceTensor g = upload(HostTensor(dt, {0, 53})), u = upload(HostTensor(dt, {0, 53}));
  DeviceTensor wg = upload(make_random(dt, {53, 37}, 1)), wu = upload(make_random(dt, {53, 37}, 2));
  DeviceTensor wd = upload(make_random(dt, {37, 53}, 3));
  DeviceTensor dwg = upload(HostTensor(dt, {53, 37})), dwu = upload(HostTensor(dt, {53, 37}));
  DeviceTensor dwd = upload(HostTensor(dt, {37, 53}));
  dwg.poison();
  dwu.poison();
  dwd.poison();
  DeviceBuffer ws(mlp_backward_workspace_bytes(cfg, 0, dt, e));
  mlp_backward(cfg, x.view(), {wg.view(), wu.view(), wd.view()}, {g.view(), u.view()}, dy.view(),
               dx.view(), false, {dwg.view(), dwu.view(), dwd.view()}, ws.buffer(), e);
  OMNIMOE_TEST_CUDA_CHECK(cudaDeviceSynchronize());
  for (const DeviceTensor* t : {&dwg, &dwu, &dwd}) {
    for (double v : download(*t).to_vector()) ASSERT_EQ(v, 0.0);
  }
}

}  // namespace
}  // namespace omnimoe::test
