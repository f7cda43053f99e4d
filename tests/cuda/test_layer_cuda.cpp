// The whole layer on CUDA against the CPU backend: layer_forward + layer_backward, the CUDA side
// in its storage type, the CPU side in f32 from the same rounded inputs; and a CUDA graph of
// forward + backward, captured once and replayed twice, against the eager run, bit for bit.
#include <omnimoe/omnimoe.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "cuda_test_support.h"
#include "experts_problem.h"

namespace omnimoe::test {
namespace {

struct LayerCase {
  DType dtype;  // of the CUDA run; the CPU runs f32 from the same (rounded) values
  int64_t tokens, hidden, grid_rows, grid_cols, top_k, inter;
  Activation act;
  Gating gating;
  RouterNorm norm;
  bool training;
  int64_t pad;  // row padding of x, y, dy, dx and some weights
  const char* experts_path = nullptr;  // forces an experts execution (OMNIMOE_EXPERTS_PATH)
};

std::string case_name(const LayerCase& c) {
  std::string s = std::string(dtype_name(c.dtype)) + "_T" + std::to_string(c.tokens) + "_d" +
                  std::to_string(c.hidden) + "_Nr" + std::to_string(c.grid_rows) + "_Nc" +
                  std::to_string(c.grid_cols) + "_K" + std::to_string(c.top_k) + "_I" +
                  std::to_string(c.inter) + "_" + activation_name(c.act) + "_" +
                  gating_name(c.gating) + "_" + router_norm_name(c.norm) + "_" +
                  (c.training ? "train" : "eval");
  if (c.pad) s += "_pad" + std::to_string(c.pad);
  if (c.experts_path) s += std::string("_") + c.experts_path;
  return s;
}

LayerConfig config_of(const LayerCase& c) {
  return make_config(c.hidden, c.grid_rows, c.grid_cols, c.top_k, c.inter, c.act, c.gating,
                     c.norm);
}

// The same values in another dtype and layout (row padding kept).
HostTensor converted(const HostTensor& src, DType dtype) {
  HostTensor out(dtype, src.shape(), src.row_stride() - src.cols());
  for (int64_t i = 0; i < src.numel(); ++i) out.set(i, src.get(i));
  return out;
}

// Inputs, weights, running statistics and dy of one layer, in one dtype, on the host.
// Order: x, W_r, W_c, W, V, W_gate, W_up, W_down (as LayerGrads), then dy.
struct LayerTensors {
  std::vector<HostTensor> params;  // x first, then the weights
  HostTensor dy;
  HostTensor norm[4];  // row_mean, row_var, col_mean, col_var (f32)

  static LayerTensors random(const LayerCase& c, uint64_t seed) {
    const int64_t d = c.hidden, N = c.grid_rows * c.grid_cols, I = c.inter;
    const double a = std::sqrt(3.0 / static_cast<double>(d));
    LayerTensors L;
    L.params.push_back(make_random(c.dtype, {c.tokens, d}, seed + 1, c.pad));
    L.params.push_back(make_random(c.dtype, {c.grid_rows, d}, seed + 2, c.pad, -a, a));
    L.params.push_back(make_random(c.dtype, {c.grid_cols, d}, seed + 3, 0, -a, a));
    L.params.push_back(make_random(c.dtype, {N, d}, seed + 4, c.pad, -a, a));
    L.params.push_back(make_random(c.dtype, {N, d}, seed + 5, 0, -1.0, 1.0));
    if (I > 0) {
      const double b = std::sqrt(3.0 / static_cast<double>(I));
      L.params.push_back(make_random(c.dtype, {I, d}, seed + 6, c.pad, -a, a));
      L.params.push_back(make_random(c.dtype, {I, d}, seed + 7, 0, -a, a));
      L.params.push_back(make_random(c.dtype, {d, I}, seed + 8, c.pad, -b, b));
    }
    L.dy = make_random(c.dtype, {c.tokens, d}, seed + 9, c.pad);
    L.norm[0] = make_random(DType::f32, {c.grid_rows}, seed + 10, 0, -0.3, 0.3);
    L.norm[1] = make_random(DType::f32, {c.grid_rows}, seed + 11, 0, 0.5, 2.0);
    L.norm[2] = make_random(DType::f32, {c.grid_cols}, seed + 12, 0, -0.3, 0.3);
    L.norm[3] = make_random(DType::f32, {c.grid_cols}, seed + 13, 0, 0.5, 2.0);
    return L;
  }

  LayerTensors to(DType dtype) const {
    LayerTensors L;
    for (const HostTensor& p : params) L.params.push_back(converted(p, dtype));
    L.dy = converted(dy, dtype);
    for (int i = 0; i < 4; ++i) L.norm[i] = norm[i];
    return L;
  }
};

// Views of one side's tensors, with its outputs and buffers.
struct LayerViews {
  TensorView x, dy, y, dx;
  LayerWeights weights;
  LayerGrads grads;
  RouterNormState norm;
  Buffer saved, workspace;
};

LayerWeights weights_of(const std::vector<TensorView>& p, bool mlp) {
  LayerWeights w;
  w.router = {p[1], p[2]};
  w.experts = {p[3], p[4]};
  if (mlp) w.mlp = {p[5], p[6], p[7]};
  return w;
}

void run_layer(const LayerConfig& cfg, const LayerViews& v, bool training, const Exec& e) {
  layer_forward(cfg, v.x, v.weights, v.norm, training, v.y, v.saved, v.workspace, e);
  layer_backward(cfg, v.x, v.weights, training, v.saved, v.dy, v.dx, v.grads, v.workspace, e);
}

// One side on the CPU: f32 host tensors, outputs poisoned.
struct CpuSide {
  LayerTensors in;
  HostTensor y, dx;
  std::vector<HostTensor> grads;  // like params[1..]
  std::vector<uint8_t> saved, workspace;

  CpuSide(const LayerCase& c, const LayerConfig& cfg, LayerTensors tensors) : in(std::move(tensors)) {
    const HostTensor& x = in.params[0];
    y = HostTensor(DType::f32, x.shape(), x.row_stride() - x.cols());
    dx = HostTensor(DType::f32, x.shape(), x.row_stride() - x.cols());
    y.poison();
    dx.poison();
    for (size_t i = 1; i < in.params.size(); ++i) {
      const HostTensor& p = in.params[i];
      grads.emplace_back(DType::f32, p.shape(), p.row_stride() - p.cols());
      grads.back().poison();
    }
    const Exec e = cpu_exec();
    saved.assign(layer_saved_bytes(cfg, c.tokens, DType::f32), 0xff);
    workspace.assign(std::max(layer_forward_workspace_bytes(cfg, c.tokens, DType::f32, e),
                              layer_backward_workspace_bytes(cfg, c.tokens, DType::f32, e)),
                     0xff);
  }

  LayerViews views(const LayerConfig& cfg) {
    std::vector<TensorView> p, g{TensorView{}};
    for (const HostTensor& t : in.params) p.push_back(t.view());
    for (const HostTensor& t : grads) g.push_back(t.view());
    LayerViews v;
    v.x = p[0];
    v.dy = in.dy.view();
    v.y = y.view();
    v.dx = dx.view();
    v.weights = weights_of(p, cfg.intermediate > 0);
    v.grads = weights_of(g, cfg.intermediate > 0);
    v.norm = {in.norm[0].view(), in.norm[1].view(), in.norm[2].view(), in.norm[3].view()};
    v.saved = {saved.data(), saved.size()};
    v.workspace = {workspace.empty() ? nullptr : workspace.data(), workspace.size()};
    return v;
  }
};

// One side on CUDA, in the case's dtype.
struct CudaSide {
  std::vector<DeviceTensor> params, grads;
  DeviceTensor dy, y, dx;
  DeviceTensor norm[4];
  HostTensor norm_initial[4];
  DeviceBuffer saved, workspace;

  CudaSide(const LayerCase& c, const LayerConfig& cfg, const LayerTensors& in, const Exec& e) {
    for (const HostTensor& p : in.params) params.emplace_back(p);
    for (size_t i = 1; i < in.params.size(); ++i) {
      const HostTensor& p = in.params[i];
      grads.emplace_back(HostTensor(p.dtype(), p.shape(), p.row_stride() - p.cols()));
    }
    dy = DeviceTensor(in.dy);
    const HostTensor& x = in.params[0];
    y = DeviceTensor(HostTensor(x.dtype(), x.shape(), x.row_stride() - x.cols()));
    dx = DeviceTensor(HostTensor(x.dtype(), x.shape(), x.row_stride() - x.cols()));
    for (int i = 0; i < 4; ++i) {
      norm[i] = DeviceTensor(in.norm[i]);
      norm_initial[i] = in.norm[i];
    }
    saved = DeviceBuffer(layer_saved_bytes(cfg, c.tokens, c.dtype));
    workspace = DeviceBuffer(std::max(layer_forward_workspace_bytes(cfg, c.tokens, c.dtype, e),
                                      layer_backward_workspace_bytes(cfg, c.tokens, c.dtype, e)));
    reset();
  }

  // Outputs, saved state and workspace poisoned; running statistics back to their start.
  void reset() {
    y.poison();
    dx.poison();
    for (DeviceTensor& g : grads) g.poison();
    saved.poison();
    workspace.poison();
    for (int i = 0; i < 4; ++i) norm[i].copy_from(norm_initial[i]);
  }

  LayerViews views(const LayerConfig& cfg) {
    std::vector<TensorView> p, g{TensorView{}};
    for (const DeviceTensor& t : params) p.push_back(t.view());
    for (const DeviceTensor& t : grads) g.push_back(t.view());
    LayerViews v;
    v.x = p[0];
    v.dy = dy.view();
    v.y = y.view();
    v.dx = dx.view();
    v.weights = weights_of(p, cfg.intermediate > 0);
    v.grads = weights_of(g, cfg.intermediate > 0);
    v.norm = {norm[0].view(), norm[1].view(), norm[2].view(), norm[3].view()};
    v.saved = saved.buffer();
    v.workspace = workspace.buffer();
    return v;
  }

  // Everything the layer writes, fetched to the host: y, dx, the grads, the running statistics,
  // and the saved buffer's bytes.
  std::vector<HostTensor> outputs() const {
    std::vector<HostTensor> out{y.to_host(), dx.to_host()};
    for (const DeviceTensor& g : grads) out.push_back(g.to_host());
    for (int i = 0; i < 4; ++i) out.push_back(norm[i].to_host());
    return out;
  }
  std::vector<uint8_t> saved_bytes() const {
    std::vector<uint8_t> b(saved.bytes());
    OMNIMOE_TEST_CUDA_CHECK(cudaMemcpy(b.data(), saved.data(), b.size(), cudaMemcpyDeviceToHost));
    return b;
  }
};

const char* kGradNames[] = {"grads.router.row (dW_r)", "grads.router.col (dW_c)",
                            "grads.experts.up (dW)",   "grads.experts.down (dV)",
                            "grads.mlp.gate",          "grads.mlp.up",
                            "grads.mlp.down"};

uint64_t seed_of(const LayerCase& c) {
  return 90000 + static_cast<uint64_t>(c.tokens * 7 + c.hidden * 13 + c.top_k * 29 + c.inter);
}

class LayerCuda : public ::testing::TestWithParam<LayerCase> {};

TEST_P(LayerCuda, ForwardBackwardMatchCpu) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  const LayerCase c = GetParam();
  const ScopedEnv path(kExpertsPathVar, c.experts_path);
  const LayerConfig cfg = config_of(c);
  const LayerTensors cuda_in = LayerTensors::random(c, seed_of(c));
  CpuSide cpu(c, cfg, cuda_in.to(DType::f32));
  CudaStream stream;
  const Exec e = cuda_exec(stream.get());
  CudaSide dev(c, cfg, cuda_in, e);

  run_layer(cfg, cpu.views(cfg), c.training, cpu_exec());
  run_layer(cfg, dev.views(cfg), c.training, e);
  stream.synchronize();

  // The routing first: the same experts, or nothing else can compare.
  std::vector<uint8_t> dev_saved = dev.saved_bytes();
  const LayerSaved got = layer_saved_views(cfg, c.tokens, c.dtype,
                                           {dev_saved.data(), dev_saved.size()}, Device::cpu());
  const LayerSaved want = layer_saved_views(cfg, c.tokens, DType::f32,
                                            {cpu.saved.data(), cpu.saved.size()}, Device::cpu());
  const int64_t pairs = c.tokens * c.top_k;
  const auto* got_idx = static_cast<const int32_t*>(got.routing.indices.data);
  const auto* want_idx = static_cast<const int32_t*>(want.routing.indices.data);
  for (int64_t p = 0; p < pairs; ++p) {
    ASSERT_EQ(got_idx[p], want_idx[p]) << "routing differs at token " << p / c.top_k << ", rank "
                                       << p % c.top_k;
  }
  auto f32_vector = [](const TensorView& v, int64_t n) {
    const auto* f = static_cast<const float*>(v.data);
    return std::vector<double>(f, f + n);
  };
  {
    const Comparison s = compare(f32_vector(got.routing.scores, pairs),
                                 f32_vector(want.routing.scores, pairs),
                                 tolerance_for(DType::f32, c.hidden + c.grid_rows + c.grid_cols));
    EXPECT_LE(s.worst_ratio, 1.0) << "scores: " << s.describe();
    const Comparison g = compare(f32_vector(got.routing.gates, pairs),
                                 f32_vector(want.routing.gates, pairs),
                                 tolerance_for(DType::f32, c.hidden + c.top_k));
    EXPECT_LE(g.worst_ratio, 1.0) << "gates: " << g.describe();
  }

  // Outputs: terms summed per element grow with what feeds them.
  const std::vector<HostTensor> out = dev.outputs();
  const int64_t route_terms = c.top_k + c.inter;
  expect_close(converted(out[0], DType::f32), cpu.y, tolerance_for(c.dtype, route_terms), "y");
  expect_close(converted(out[1], DType::f32), cpu.dx,
               tolerance_for(c.dtype, route_terms + c.grid_rows + c.grid_cols), "dx");
  for (size_t i = 0; i < cpu.grads.size(); ++i) {
    expect_close(converted(out[2 + i], DType::f32), cpu.grads[i],
                 tolerance_for(c.dtype, c.tokens), kGradNames[i]);
  }
  if (c.training && c.norm == RouterNorm::batch) {
    const char* names[4] = {"row_mean", "row_var", "col_mean", "col_var"};
    for (int i = 0; i < 4; ++i) {
      expect_close(out[2 + cpu.grads.size() + i], cpu.in.norm[i],
                   tolerance_for(DType::f32, c.hidden), names[i]);
    }
  }
}

// forward + backward captured in one CUDA graph and replayed twice: each replay writes every
// output (they start poisoned) and equals the eager run bit for bit.
TEST_P(LayerCuda, GraphReplayMatchesEagerBitwise) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  const LayerCase c = GetParam();
  const ScopedEnv path(kExpertsPathVar, c.experts_path);
  const LayerConfig cfg = config_of(c);
  CudaStream stream;
  const Exec e = cuda_exec(stream.get());
  CudaSide dev(c, cfg, LayerTensors::random(c, seed_of(c) + 1), e);
  const LayerViews v = dev.views(cfg);

  run_layer(cfg, v, c.training, e);
  stream.synchronize();
  const std::vector<HostTensor> eager = dev.outputs();
  const std::vector<uint8_t> eager_saved = dev.saved_bytes();

  cudaGraph_t graph = nullptr;
  cudaGraphExec_t graph_exec = nullptr;
  OMNIMOE_TEST_CUDA_CHECK(cudaStreamBeginCapture(stream.get(), cudaStreamCaptureModeGlobal));
  try {
    run_layer(cfg, v, c.training, e);
  } catch (...) {
    cudaStreamEndCapture(stream.get(), &graph);
    if (graph) cudaGraphDestroy(graph);
    throw;
  }
  OMNIMOE_TEST_CUDA_CHECK(cudaStreamEndCapture(stream.get(), &graph));
  OMNIMOE_TEST_CUDA_CHECK(cudaGraphInstantiate(&graph_exec, graph, 0));

  for (int replay = 0; replay < 2; ++replay) {
    dev.reset();
    OMNIMOE_TEST_CUDA_CHECK(cudaGraphLaunch(graph_exec, stream.get()));
    stream.synchronize();
    const std::vector<HostTensor> got = dev.outputs();
    ASSERT_EQ(got.size(), eager.size());
    for (size_t i = 0; i < got.size(); ++i) {
      const std::string what =
          "replay " + std::to_string(replay) + " against eager, output " + std::to_string(i);
      expect_bitwise_equal(got[i], eager[i], what.c_str());
    }
    // The saved routing (indices, gates) too.
    std::vector<uint8_t> saved = dev.saved_bytes();
    const LayerSaved sv = layer_saved_views(cfg, c.tokens, c.dtype, {saved.data(), saved.size()},
                                            Device::cpu());
    const LayerSaved ev = layer_saved_views(
        cfg, c.tokens, c.dtype, {const_cast<uint8_t*>(eager_saved.data()), eager_saved.size()},
        Device::cpu());
    const size_t pair_bytes = static_cast<size_t>(c.tokens * c.top_k) * 4;
    EXPECT_EQ(std::memcmp(sv.routing.indices.data, ev.routing.indices.data, pair_bytes), 0)
        << "replay " << replay << ": indices";
    EXPECT_EQ(std::memcmp(sv.routing.gates.data, ev.routing.gates.data, pair_bytes), 0)
        << "replay " << replay << ": gates";
  }
  cudaGraphExecDestroy(graph_exec);
  cudaGraphDestroy(graph);
}

const std::vector<LayerCase> kLayerCases = {
    {DType::bf16, 257, 64, 19, 23, 7, 96, Activation::silu, Gating::softmax, RouterNorm::batch,
     true, 0},
    {DType::bf16, 257, 64, 19, 23, 7, 0, Activation::gelu, Gating::joint, RouterNorm::none, false,
     8},
    {DType::f32, 100, 37, 5, 7, 35, 40, Activation::relu, Gating::softmax, RouterNorm::batch,
     true, 3},
    {DType::f16, 64, 48, 4, 4, 1, 32, Activation::silu, Gating::softmax, RouterNorm::batch, false,
     0},
    {DType::bf16, 512, 128, 8, 8, 32, 64, Activation::silu, Gating::softmax, RouterNorm::batch,
     true, 0},
    // 16 tokens per expert: the experts forward and backward may choose different paths.
    {DType::bf16, 512, 128, 8, 16, 4, 64, Activation::gelu, Gating::softmax, RouterNorm::batch,
     true, 0},
    // The executions small tables never choose, through the layer (whose backward builds the
    // schedule only for the gather).
    {DType::bf16, 257, 64, 19, 23, 7, 96, Activation::silu, Gating::softmax, RouterNorm::batch,
     true, 0, "dense"},
    {DType::f16, 300, 64, 16, 16, 12, 64, Activation::gelu, Gating::softmax, RouterNorm::batch,
     true, 0, "tiled"},
};

INSTANTIATE_TEST_SUITE_P(Cases, LayerCuda, ::testing::ValuesIn(kLayerCases),
                         [](const auto& info) { return case_name(info.param); });

}  // namespace
}  // namespace omnimoe::test
