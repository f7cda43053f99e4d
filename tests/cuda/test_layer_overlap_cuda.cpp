// The layer with its two branches (shared MLP; router -> schedule -> experts) running concurrently
// on CUDA: forward + backward against the CPU on a user stream, on the legacy default stream, and
// captured in a CUDA graph (replayed twice, each replay equal to the eager run bit for bit); the
// library's own graph replay (Exec::graph_replay) against launching every kernel.
#include <omnimoe/omnimoe.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "cuda_test_support.h"

namespace omnimoe::test {
namespace {

struct OverlapCase {
  DType dtype;
  int64_t tokens, hidden, grid_rows, grid_cols, top_k, inter, pad;
};

std::string case_name(const OverlapCase& c) {
  return std::string(dtype_name(c.dtype)) + "_T" + std::to_string(c.tokens) + "_d" +
         std::to_string(c.hidden) + "_Nr" + std::to_string(c.grid_rows) + "_Nc" +
         std::to_string(c.grid_cols) + "_K" + std::to_string(c.top_k) + "_I" +
         std::to_string(c.inter) + "_pad" + std::to_string(c.pad);
}

LayerConfig config_of(const OverlapCase& c) {
  return make_config(c.hidden, c.grid_rows, c.grid_cols, c.top_k, c.inter);
}

HostTensor converted(const HostTensor& src, DType dtype) {
  HostTensor out(dtype, src.shape(), src.row_stride() - src.cols());
  for (int64_t i = 0; i < src.numel(); ++i) out.set(i, src.get(i));
  return out;
}

// Host tensors of one layer call. in: x, W_r, W_c, W, V, W_gate, W_up, W_down, dy, then the
// four running statistics (f32). out: y, dx, then the grads of in[1..7].
struct Tensors {
  std::vector<HostTensor> in, out;
};

constexpr int kWeights = 7, kDy = 8, kNorm = 9;
const char* kOutNames[] = {"y",         "dx",       "grads.router.row", "grads.router.col",
                           "grads.up",  "grads.down", "grads.mlp.gate", "grads.mlp.up",
                           "grads.mlp.down"};

Tensors random_tensors(const OverlapCase& c, uint64_t seed) {
  const int64_t d = c.hidden, N = c.grid_rows * c.grid_cols, I = c.inter;
  const double a = std::sqrt(3.0 / static_cast<double>(d));
  const double b = std::sqrt(3.0 / static_cast<double>(I));
  Tensors t;
  t.in.push_back(make_random(c.dtype, {c.tokens, d}, seed + 1, c.pad));
  t.in.push_back(make_random(c.dtype, {c.grid_rows, d}, seed + 2, c.pad, -a, a));
  t.in.push_back(make_random(c.dtype, {c.grid_cols, d}, seed + 3, 0, -a, a));
  t.in.push_back(make_random(c.dtype, {N, d}, seed + 4, c.pad, -a, a));
  t.in.push_back(make_random(c.dtype, {N, d}, seed + 5, 0, -1.0, 1.0));
  t.in.push_back(make_random(c.dtype, {I, d}, seed + 6, c.pad, -a, a));
  t.in.push_back(make_random(c.dtype, {I, d}, seed + 7, 0, -a, a));
  t.in.push_back(make_random(c.dtype, {d, I}, seed + 8, c.pad, -b, b));
  t.in.push_back(make_random(c.dtype, {c.tokens, d}, seed + 9, c.pad));
  t.in.push_back(make_random(DType::f32, {c.grid_rows}, seed + 10, 0, -0.3, 0.3));
  t.in.push_back(make_random(DType::f32, {c.grid_rows}, seed + 11, 0, 0.5, 2.0));
  t.in.push_back(make_random(DType::f32, {c.grid_cols}, seed + 12, 0, -0.3, 0.3));
  t.in.push_back(make_random(DType::f32, {c.grid_cols}, seed + 13, 0, 0.5, 2.0));
  const HostTensor& x = t.in[0];
  t.out.emplace_back(c.dtype, x.shape(), c.pad);
  t.out.emplace_back(c.dtype, x.shape(), c.pad);
  for (int i = 1; i <= kWeights; ++i) {
    const HostTensor& p = t.in[i];
    t.out.emplace_back(c.dtype, p.shape(), p.row_stride() - p.cols());
  }
  return t;
}

// Runs forward (training) + backward over views of `in` and `out`.
void run_layer(const LayerConfig& cfg, const std::vector<TensorView>& in,
               const std::vector<TensorView>& out, Buffer saved, Buffer workspace,
               const Exec& e) {
  const LayerWeights w{{in[1], in[2]}, {in[3], in[4]}, {in[5], in[6], in[7]}};
  const LayerGrads g{{out[2], out[3]}, {out[4], out[5]}, {out[6], out[7], out[8]}};
  const RouterNormState norm{in[kNorm], in[kNorm + 1], in[kNorm + 2], in[kNorm + 3]};
  layer_forward(cfg, in[0], w, norm, /*training=*/true, out[0], saved, workspace, e);
  layer_backward(cfg, in[0], w, /*training=*/true, saved, in[kDy], out[1], g, workspace, e);
}

// The CPU oracle in f32 from the same rounded inputs; returns y, dx and the grads.
std::vector<HostTensor> cpu_outputs(const OverlapCase& c, const LayerConfig& cfg,
                                    const Tensors& t) {
  std::vector<HostTensor> in, out;
  std::vector<TensorView> iv, ov;
  for (const HostTensor& h : t.in) in.push_back(converted(h, DType::f32));
  for (const HostTensor& h : t.out) out.push_back(converted(h, DType::f32));
  for (HostTensor& h : out) h.poison();
  for (const HostTensor& h : in) iv.push_back(h.view());
  for (const HostTensor& h : out) ov.push_back(h.view());
  const Exec e = cpu_exec();
  std::vector<uint8_t> saved(layer_saved_bytes(cfg, c.tokens, DType::f32), 0xff);
  std::vector<uint8_t> ws(std::max(layer_forward_workspace_bytes(cfg, c.tokens, DType::f32, e),
                                   layer_backward_workspace_bytes(cfg, c.tokens, DType::f32, e)),
                          0xff);
  run_layer(cfg, iv, ov, {saved.data(), saved.size()},
            {ws.empty() ? nullptr : ws.data(), ws.size()}, e);
  return out;
}

// Device copies of the tensors; outputs, saved and workspace poisoned by reset().
struct DeviceSide {
  const Tensors& host;
  std::vector<DeviceTensor> in, out;
  DeviceBuffer saved, workspace;

  DeviceSide(const OverlapCase& c, const LayerConfig& cfg, const Tensors& t, const Exec& e)
      : host(t) {
    for (const HostTensor& h : t.in) in.emplace_back(h);
    for (const HostTensor& h : t.out) out.emplace_back(h);
    saved = DeviceBuffer(layer_saved_bytes(cfg, c.tokens, c.dtype));
    workspace = DeviceBuffer(std::max(layer_forward_workspace_bytes(cfg, c.tokens, c.dtype, e),
                                      layer_backward_workspace_bytes(cfg, c.tokens, c.dtype, e)));
    reset();
  }

  // Outputs poisoned and running statistics back to their start; waits for the copies. Waits
  // first for work still in flight: a call that threw halfway (launching directly) leaves what it
  // issued running on its stream, and that work reads these buffers.
  void reset() {
    OMNIMOE_TEST_CUDA_CHECK(cudaDeviceSynchronize());
    for (DeviceTensor& d : out) d.poison();
    saved.poison();
    workspace.poison();
    for (int i = kNorm; i < kNorm + 4; ++i) in[i].copy_from(host.in[i]);
    OMNIMOE_TEST_CUDA_CHECK(cudaDeviceSynchronize());
  }

  void run(const LayerConfig& cfg, const Exec& e) const {
    std::vector<TensorView> iv, ov;
    for (const DeviceTensor& d : in) iv.push_back(d.view());
    for (const DeviceTensor& d : out) ov.push_back(d.view());
    run_layer(cfg, iv, ov, saved.buffer(), workspace.buffer(), e);
  }

  std::vector<HostTensor> outputs() const {
    std::vector<HostTensor> h;
    for (const DeviceTensor& d : out) h.push_back(d.to_host());
    return h;
  }
};

void expect_matches_cpu(const OverlapCase& c, const std::vector<HostTensor>& got,
                        const std::vector<HostTensor>& want, const std::string& where) {
  // Terms per element as in test_layer_cuda.cpp; the join adds one rounding, within these.
  const int64_t route_terms = c.top_k + c.inter;
  expect_close(converted(got[0], DType::f32), want[0], tolerance_for(c.dtype, route_terms),
               where + ": y");
  expect_close(converted(got[1], DType::f32), want[1],
               tolerance_for(c.dtype, route_terms + c.grid_rows + c.grid_cols), where + ": dx");
  for (size_t i = 2; i < got.size(); ++i) {
    expect_close(converted(got[i], DType::f32), want[i], tolerance_for(c.dtype, c.tokens),
                 where + ": " + kOutNames[i]);
  }
}

void expect_bitwise(const std::vector<HostTensor>& got, const std::vector<HostTensor>& want,
                    const std::string& where) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_EQ(got[i].bytes(), want[i].bytes());
    EXPECT_EQ(std::memcmp(got[i].data(), want[i].data(), got[i].bytes()), 0)
        << where << ": " << kOutNames[i] << " differs from the eager run";
  }
}

uint64_t seed_of(const OverlapCase& c) {
  return 70000 + static_cast<uint64_t>(c.tokens * 7 + c.hidden * 13 + c.top_k * 29 + c.inter);
}

class LayerOverlapCuda : public ::testing::TestWithParam<OverlapCase> {};

TEST_P(LayerOverlapCuda, UserStreamMatchesCpu) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  const OverlapCase c = GetParam();
  const LayerConfig cfg = config_of(c);
  const Tensors t = random_tensors(c, seed_of(c));
  CudaStream stream;
  const Exec e = cuda_exec(stream.get());
  DeviceSide dev(c, cfg, t, e);
  dev.run(cfg, e);
  stream.synchronize();
  expect_matches_cpu(c, dev.outputs(), cpu_outputs(c, cfg, t), "user stream");
}

TEST_P(LayerOverlapCuda, LegacyDefaultStreamMatchesCpu) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  const OverlapCase c = GetParam();
  const LayerConfig cfg = config_of(c);
  const Tensors t = random_tensors(c, seed_of(c) + 1);
  const Exec e = cuda_exec(nullptr);
  DeviceSide dev(c, cfg, t, e);
  dev.run(cfg, e);
  OMNIMOE_TEST_CUDA_CHECK(cudaStreamSynchronize(nullptr));
  const std::vector<HostTensor> first = dev.outputs();
  expect_matches_cpu(c, first, cpu_outputs(c, cfg, t), "legacy stream");
  // Again, back to back with nothing in between: the side stream must not race the next call.
  dev.reset();
  dev.run(cfg, e);
  dev.run(cfg, e);
  OMNIMOE_TEST_CUDA_CHECK(cudaStreamSynchronize(nullptr));
  expect_bitwise(dev.outputs(), first, "legacy stream, repeated");
}

TEST_P(LayerOverlapCuda, GraphCaptureMatchesCpuAndEager) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  const OverlapCase c = GetParam();
  const LayerConfig cfg = config_of(c);
  const Tensors t = random_tensors(c, seed_of(c) + 2);
  CudaStream stream;
  const Exec e = cuda_exec(stream.get());
  DeviceSide dev(c, cfg, t, e);
  dev.run(cfg, e);
  stream.synchronize();
  const std::vector<HostTensor> eager = dev.outputs();
  expect_matches_cpu(c, eager, cpu_outputs(c, cfg, t), "eager");

  dev.reset();
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t graph_exec = nullptr;
  OMNIMOE_TEST_CUDA_CHECK(cudaStreamBeginCapture(stream.get(), cudaStreamCaptureModeGlobal));
  try {
    dev.run(cfg, e);
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
    expect_bitwise(dev.outputs(), eager, "replay " + std::to_string(replay));
  }
  cudaGraphExecDestroy(graph_exec);
  cudaGraphDestroy(graph);
}

// Exec::graph_replay: the cached graph, updated to other buffers on every call, gives what
// launching each kernel gives, bit for bit; so does the first capture (instantiation).
TEST_P(LayerOverlapCuda, GraphReplayMatchesKernelLaunches) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  const OverlapCase c = GetParam();
  const LayerConfig cfg = config_of(c);
  CudaStream stream;
  Exec launched = cuda_exec(stream.get());
  launched.graph_replay = false;
  Exec replayed = launched;
  replayed.graph_replay = true;
  const Tensors t1 = random_tensors(c, seed_of(c) + 3), t2 = random_tensors(c, seed_of(c) + 4);
  DeviceSide a(c, cfg, t1, launched), b(c, cfg, t2, launched);
  a.run(cfg, launched);
  b.run(cfg, launched);
  stream.synchronize();
  const std::vector<HostTensor> want_a = a.outputs(), want_b = b.outputs();
  expect_matches_cpu(c, want_a, cpu_outputs(c, cfg, t1), "kernel launches");
  // a, b, a: the same cached graph moved between two sets of buffers.
  for (int call = 0; call < 3; ++call) {
    DeviceSide& dev = call % 2 == 0 ? a : b;
    dev.reset();
    dev.run(cfg, replayed);
    stream.synchronize();
    expect_bitwise(dev.outputs(), call % 2 == 0 ? want_a : want_b,
                   "graph replay, call " + std::to_string(call));
  }
}

const std::vector<OverlapCase> kCases = {
    // d a multiple of 8, rows padded by 8: the join's 16-byte path.
    {DType::bf16, 257, 64, 19, 23, 7, 96, 8},
    // odd d and padding: the join's element path.
    {DType::f32, 100, 37, 5, 7, 35, 40, 3},
    {DType::f16, 64, 48, 4, 4, 1, 32, 0},
    // K = N.
    {DType::bf16, 33, 32, 3, 3, 9, 16, 0},
    // No tokens: the branches fork and join around nothing; the grads are still zeroed.
    {DType::bf16, 0, 64, 4, 4, 2, 32, 0},
};

INSTANTIATE_TEST_SUITE_P(Cases, LayerOverlapCuda, ::testing::ValuesIn(kCases),
                         [](const auto& info) { return case_name(info.param); });

// For graph replay and direct launches: `fail(dev, cfg, e)` makes one layer call throw and
// returns its message for `check`; then no CUDA error may be pending (CUB's next call would
// report it as its own), and the next call must match the CPU.
template <typename Fail, typename Check>
void expect_usable_after_failed_call(int seed_offset, Fail&& fail, Check&& check) {
  const OverlapCase c = kCases[0];
  const LayerConfig cfg = config_of(c);
  const Tensors t = random_tensors(c, seed_of(c) + seed_offset);
  CudaStream stream;
  for (const bool replay : {true, false}) {
    SCOPED_TRACE(replay ? "graph replay" : "direct launches");
    Exec e = cuda_exec(stream.get());
    e.graph_replay = replay;
    DeviceSide dev(c, cfg, t, e);
    try {
      fail(dev, cfg, e);
      ADD_FAILURE() << "the call did not throw";
    } catch (const Error& err) {
      check(std::string(err.what()));
    }
    EXPECT_EQ(cudaPeekAtLastError(), cudaSuccess)
        << "pending after the failed call: " << cudaGetErrorName(cudaGetLastError());
    dev.reset();
    dev.run(cfg, e);
    stream.synchronize();
    expect_matches_cpu(c, dev.outputs(), cpu_outputs(c, cfg, t), "after the failed call");
  }
}

// A check that fails inside the graph replay's capture (the layer checks x, y and its buffers
// before capturing, the ops check their weights inside) ends the capture before the error
// propagates and leaves no CUDA error pending; likewise for a call that launches directly.
TEST(LayerGraphReplayCuda, CheckFailingInsideTheCaptureLeavesReplayUsable) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  expect_usable_after_failed_call(
      5,
      [](const DeviceSide& dev, const LayerConfig& cfg, const Exec& e) {
        std::vector<TensorView> iv, ov;
        for (const DeviceTensor& d : dev.in) iv.push_back(d.view());
        for (const DeviceTensor& d : dev.out) ov.push_back(d.view());
        iv[7] = iv[6];  // W_up [I, d] where W_down [d, I] belongs (I != d)
        run_layer(cfg, iv, ov, dev.saved.buffer(), dev.workspace.buffer(), e);
      },
      [](const std::string& what) { EXPECT_NE(what.find("down"), std::string::npos) << what; });
}

// A runtime error left pending by the caller's own unchecked work is named at the next call's
// start (not reported by CUB as an "invalid device ordinal" halfway through) and cleared.
TEST(LayerGraphReplayCuda, ErrorPendingBeforeTheCallIsNamedAndCleared) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  expect_usable_after_failed_call(
      6,
      [](const DeviceSide& dev, const LayerConfig& cfg, const Exec& e) {
        void* p = nullptr;
        ASSERT_EQ(cudaMalloc(&p, size_t{1} << 62), cudaErrorMemoryAllocation);  // left pending
        dev.run(cfg, e);
      },
      [](const std::string& what) {
        EXPECT_NE(what.find("cudaErrorMemoryAllocation"), std::string::npos) << what;
        EXPECT_NE(what.find("pending"), std::string::npos) << what;
      });
}

}  // namespace
}  // namespace omnimoe::test
