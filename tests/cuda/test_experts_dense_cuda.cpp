// The dense-masked execution of the atomic experts (OMNIMOE_EXPERTS_PATH=dense) against the CPU
// backend: bf16 and f16, odd sizes, K = 1 and K = N, experts nobody chose, padded rows,
// accumulate flags, several token chunks (OMNIMOE_EXPERTS_DENSE_CHUNK_TOKENS), bitwise
// repeatability, CUDA graph capture, the T = 0 backward, and the dispatcher's choice and naming
// of the path.
// (The case builder of test_experts_cuda.cpp lives in that file's anonymous namespace; this is
// a smaller one for this path's cases.)
#include <omnimoe/omnimoe.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "cuda_test_support.h"

namespace omnimoe::test {
namespace {

constexpr const char* kPathVar = "OMNIMOE_EXPERTS_PATH";
constexpr const char* kChunkVar = "OMNIMOE_EXPERTS_DENSE_CHUNK_TOKENS";

// Sets (or, with nullptr, unsets) an environment variable for the scope, restoring it after.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = std::string(old);
    if (value) {
      setenv(name, value, 1);
    } else {
      unsetenv(name);
    }
  }
  ~ScopedEnv() {
    if (old_) {
      setenv(name_, old_->c_str(), 1);
    } else {
      unsetenv(name_);
    }
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  const char* name_;
  std::optional<std::string> old_;
};

// i32 [T, K]: K distinct experts per token, uniform over [0, pool) (pool < N leaves experts
// nobody chose, whose gradient rows must be zero).
HostTensor make_indices(int64_t tokens, int64_t K, int64_t pool, uint64_t seed) {
  HostTensor idx(DType::i32, {tokens, K});
  std::mt19937_64 rng(seed);
  std::vector<int32_t> ids(static_cast<size_t>(pool));
  for (int64_t t = 0; t < tokens; ++t) {
    std::iota(ids.begin(), ids.end(), 0);
    for (int64_t k = 0; k < K; ++k) {  // partial Fisher-Yates: a uniform K-subset
      std::uniform_int_distribution<int64_t> pick(k, pool - 1);
      std::swap(ids[k], ids[pick(rng)]);
    }
    for (int64_t k = 0; k < K; ++k) idx.set(t * K + k, ids[k]);
  }
  return idx;
}

// The schedule by a stable counting sort on the host (the CPU backend reads it).
void host_schedule(const HostTensor& indices, int64_t N, HostTensor& offsets, HostTensor& order) {
  const int64_t pairs = indices.numel();
  std::vector<int64_t> count(static_cast<size_t>(N + 1), 0);
  for (int64_t p = 0; p < pairs; ++p) ++count[static_cast<size_t>(indices.get(p)) + 1];
  for (int64_t e = 0; e < N; ++e) count[e + 1] += count[e];
  for (int64_t e = 0; e <= N; ++e) offsets.set(e, static_cast<double>(count[e]));
  for (int64_t p = 0; p < pairs; ++p) {
    order.set(count[static_cast<size_t>(indices.get(p))]++, static_cast<double>(p));
  }
}

struct DenseCase {
  DType dtype;
  int64_t tokens, hidden, grid_rows, grid_cols, top_k;
  Activation act;
  bool half_pool;  // only experts [0, max(K, N/2)) chosen
  int64_t pad;     // row padding of x, y, dy, dx, W and dV
  int64_t chunk;   // OMNIMOE_EXPERTS_DENSE_CHUNK_TOKENS, 0: the path's own choice
};

std::string case_name(const DenseCase& c) {
  std::string s = std::string(dtype_name(c.dtype)) + "_T" + std::to_string(c.tokens) + "_d" +
                  std::to_string(c.hidden) + "_Nr" + std::to_string(c.grid_rows) + "_Nc" +
                  std::to_string(c.grid_cols) + "_K" + std::to_string(c.top_k) + "_" +
                  activation_name(c.act);
  if (c.half_pool) s += "_halfpool";
  if (c.pad) s += "_pad" + std::to_string(c.pad);
  s += c.chunk ? "_chunk" + std::to_string(c.chunk) : std::string("_onechunk");
  return s;
}

// Every tensor of one experts call, on both backends.
struct DenseProblem {
  LayerConfig cfg;
  DType dtype;
  int64_t T, d, N, K, busiest = 0;
  std::vector<int64_t> unchosen;
  MirroredTensor x, up, down, indices, gates, offsets, order, dy;
  MirroredTensor y, preact, dx, dup, ddown, dgates;

  DenseProblem(const DenseCase& c, uint64_t seed)
      : dtype(c.dtype),
        T(c.tokens),
        d(c.hidden),
        N(c.grid_rows * c.grid_cols),
        K(c.top_k),
        // W scaled so pre-activations are O(1); V, x, dy O(1); gates in [0.05, 1).
        x(make_random(c.dtype, {c.tokens, c.hidden}, seed + 1, c.pad)),
        up(make_random(c.dtype, {N, c.hidden}, seed + 2, c.pad,
                       -std::sqrt(3.0 / static_cast<double>(c.hidden)),
                       std::sqrt(3.0 / static_cast<double>(c.hidden)))),
        down(make_random(c.dtype, {N, c.hidden}, seed + 3)),
        indices(make_indices(c.tokens, c.top_k, c.half_pool ? std::max<int64_t>(c.top_k, N / 2) : N,
                             seed + 4)),
        gates(make_random(DType::f32, {c.tokens, c.top_k}, seed + 5, 0, 0.05, 1.0)),
        offsets(HostTensor(DType::i32, {N + 1})),
        order(HostTensor(DType::i32, {c.tokens * c.top_k})),
        dy(make_random(c.dtype, {c.tokens, c.hidden}, seed + 6, c.pad)),
        y(HostTensor(c.dtype, {c.tokens, c.hidden}, c.pad)),
        preact(HostTensor(DType::f32, {c.tokens, c.top_k})),
        dx(HostTensor(c.dtype, {c.tokens, c.hidden}, c.pad)),
        dup(HostTensor(c.dtype, {N, c.hidden})),
        ddown(HostTensor(c.dtype, {N, c.hidden}, c.pad)),
        dgates(HostTensor(DType::f32, {c.tokens, c.top_k})) {
    cfg.hidden = c.hidden;
    cfg.grid_rows = c.grid_rows;
    cfg.grid_cols = c.grid_cols;
    cfg.top_k = c.top_k;
    cfg.act = c.act;
    host_schedule(indices.host, N, offsets.host, order.host);
    offsets.device.copy_from(offsets.host);
    order.device.copy_from(order.host);
    std::vector<int64_t> count(static_cast<size_t>(N), 0);
    for (int64_t p = 0; p < T * K; ++p) ++count[static_cast<size_t>(indices.host.get(p))];
    busiest = T > 0 ? *std::max_element(count.begin(), count.end()) : 0;
    for (int64_t e = 0; e < N; ++e) {
      if (count[e] == 0) unchosen.push_back(e);
    }
  }

  ExpertWeights weights(const Exec& e) const { return {up.view(e), down.view(e)}; }
  Schedule schedule(const Exec& e) const { return {offsets.view(e), order.view(e)}; }

  void forward(bool accumulate, const Exec& e) {
    Scratch ws(e, experts_forward_workspace_bytes(cfg, T, dtype, e));
    experts_forward(cfg, x.view(e), weights(e), indices.view(e), gates.view(e),
                    y.view(e), accumulate, preact.view(e), ws.buffer(), e);
  }
  void backward(bool accumulate_dx, const Exec& e) {
    Scratch ws(e, experts_backward_workspace_bytes(cfg, T, dtype, e));
    experts_backward(cfg, x.view(e), weights(e), indices.view(e), gates.view(e), preact.view(e),
                     schedule(e), dy.view(e), dx.view(e), accumulate_dx,
                     {dup.view(e), ddown.view(e)}, dgates.view(e), ws.buffer(), e);
  }

  // y and dx start poisoned, or random (the same on both sides) when the op adds to them.
  void reset_outputs(bool accumulate, uint64_t seed) {
    for (MirroredTensor* t : {&y, &dx}) {
      if (accumulate) {
        t->host.fill_uniform(seed++);
        t->device.copy_from(t->host);
      } else {
        t->poison();
      }
    }
    for (MirroredTensor* t : {&preact, &dup, &ddown, &dgates}) t->poison();
    OMNIMOE_TEST_CUDA_CHECK(cudaDeviceSynchronize());  // cudaMemset runs on the legacy stream
  }

  // Backward reads the CPU's preact on both sides.
  void share_cpu_preact() {
    preact.device.copy_from(preact.host);
    OMNIMOE_TEST_CUDA_CHECK(cudaDeviceSynchronize());
  }

  void expect_forward_close() {
    expect_close(y.fetch(), y.host, tolerance_for(dtype, K), "y");
    expect_close(preact.fetch(), preact.host, tolerance_for(DType::f32, d), "preact");
  }
  void expect_backward_close() {
    expect_close(dx.fetch(), dx.host, tolerance_for(dtype, K), "dx");
    expect_close(dgates.fetch(), dgates.host, tolerance_for(DType::f32, d), "dgates");
    const HostTensor dup_got = dup.fetch(), ddown_got = ddown.fetch();
    const int64_t terms = std::max<int64_t>(1, busiest);
    expect_close(dup_got, dup.host, tolerance_for(dtype, terms), "grads.up (dW)");
    expect_close(ddown_got, ddown.host, tolerance_for(dtype, terms), "grads.down (dV)");
    for (int64_t e : unchosen) {
      for (int64_t j = 0; j < d; ++j) {
        ASSERT_EQ(dup_got.at(e, j), 0.0) << "dW row of unchosen expert " << e;
        ASSERT_EQ(ddown_got.at(e, j), 0.0) << "dV row of unchosen expert " << e;
      }
    }
  }
};

uint64_t seed_of(const DenseCase& c) {
  return 9100 +
         static_cast<uint64_t>(c.tokens * 131 + c.hidden * 17 + c.top_k * 3 + c.grid_rows +
                               c.chunk * 7) +
         static_cast<uint64_t>(c.dtype) * 1000003;
}

// Forces the dense path and the case's chunk size for the scope.
struct DenseScope {
  ScopedEnv path;
  ScopedEnv chunk;
  explicit DenseScope(int64_t chunk_tokens)
      : path(kPathVar, "dense"),
        chunk(kChunkVar, chunk_tokens ? std::to_string(chunk_tokens).c_str() : nullptr) {}
};

class ExpertsDenseCuda : public ::testing::TestWithParam<DenseCase> {};

TEST_P(ExpertsDenseCuda, ForwardMatchesCpu) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  const DenseCase c = GetParam();
  DenseScope scope(c.chunk);
  DenseProblem P(c, seed_of(c));
  ASSERT_STREQ(experts_execution(P.cfg, P.T, P.dtype, cuda_exec(nullptr)), "dense");
  P.reset_outputs(false, 1);
  run_on_cpu_and_cuda([&](const Exec& e) { P.forward(false, e); });
  P.expect_forward_close();
}

TEST_P(ExpertsDenseCuda, ForwardAccumulatesIntoY) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  const DenseCase c = GetParam();
  DenseScope scope(c.chunk);
  DenseProblem P(c, seed_of(c));
  P.reset_outputs(true, 2);
  run_on_cpu_and_cuda([&](const Exec& e) { P.forward(true, e); });
  P.expect_forward_close();
}

TEST_P(ExpertsDenseCuda, BackwardMatchesCpu) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  const DenseCase c = GetParam();
  DenseScope scope(c.chunk);
  DenseProblem P(c, seed_of(c));
  P.reset_outputs(false, 3);
  P.forward(false, cpu_exec());
  P.share_cpu_preact();
  run_on_cpu_and_cuda([&](const Exec& e) { P.backward(false, e); });
  P.expect_backward_close();
}

TEST_P(ExpertsDenseCuda, BackwardAccumulatesIntoDx) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  const DenseCase c = GetParam();
  DenseScope scope(c.chunk);
  DenseProblem P(c, seed_of(c));
  P.reset_outputs(true, 5);
  P.forward(false, cpu_exec());  // the CPU's preact; dx stays as reset, the same on both sides
  P.share_cpu_preact();
  run_on_cpu_and_cuda([&](const Exec& e) { P.backward(true, e); });
  P.expect_backward_close();
}

const auto kSilu = Activation::silu;
const auto kGelu = Activation::gelu;
const auto kRelu = Activation::relu;

// Odd sizes (d = 37: rows not 16-byte aligned; N = 437), K = 1 and K = N, experts nobody chose,
// padded rows, one chunk and several (the last one partial, and one token per chunk). dW and dV
// are rounded to the storage type once per chunk, so chunked cases keep to a few chunks (as
// real calls do: about 5 at T = 4096, N = 102,400) to stay within one rounding's tolerance.
std::vector<DenseCase> dense_cases() {
  return {
      {DType::bf16, 257, 37, 19, 23, 7, kSilu, false, 0, 0},
      {DType::f16, 257, 37, 19, 23, 7, kGelu, false, 3, 0},
      {DType::bf16, 257, 37, 19, 23, 1, kRelu, false, 0, 64},
      {DType::f16, 257, 37, 19, 23, 1, kSilu, false, 2, 0},
      {DType::bf16, 257, 37, 19, 23, 437, kGelu, false, 0, 100},
      {DType::f16, 257, 37, 19, 23, 437, kSilu, false, 1, 0},
      {DType::bf16, 257, 64, 5, 7, 35, kSilu, false, 8, 0},
      {DType::bf16, 300, 96, 8, 8, 9, kGelu, true, 0, 100},
      {DType::f16, 300, 96, 8, 8, 9, kRelu, true, 4, 0},
      {DType::f16, 9, 128, 4, 8, 16, kSilu, false, 0, 1},
      {DType::bf16, 64, 1024, 8, 8, 16, kGelu, false, 0, 0},
      {DType::f16, 513, 256, 16, 16, 24, kSilu, true, 0, 200},
  };
}

INSTANTIATE_TEST_SUITE_P(Cases, ExpertsDenseCuda, ::testing::ValuesIn(dense_cases()),
                         [](const auto& info) { return case_name(info.param); });

// Byte-for-byte equality of two host tensors (padding excluded).
void expect_bitwise_equal(const HostTensor& a, const HostTensor& b, const char* what) {
  ASSERT_EQ(a.numel(), b.numel()) << what;
  const std::vector<double> va = a.to_vector(), vb = b.to_vector();
  for (size_t i = 0; i < va.size(); ++i) {
    ASSERT_TRUE(std::memcmp(&va[i], &vb[i], sizeof(double)) == 0)
        << what << ": element " << i << " differs between runs: " << va[i] << " vs " << vb[i];
  }
}

// Two runs (several chunks) give bitwise identical outputs and gradients.
TEST(ExpertsDenseCudaDeterminism, bf16_T700_d96_Nr16_Nc16_K24_chunk128_TwoRunsBitwiseIdentical) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  DenseScope scope(128);
  const DenseCase c{DType::bf16, 700, 96, 16, 16, 24, kSilu, false, 0, 128};
  DenseProblem P(c, 21);
  CudaStream s;
  const Exec e = cuda_exec(s.get());
  HostTensor out[2][6];
  for (int run = 0; run < 2; ++run) {
    P.reset_outputs(false, 1);
    P.forward(false, e);
    P.backward(false, e);
    s.synchronize();
    int i = 0;
    for (MirroredTensor* t : {&P.y, &P.preact, &P.dx, &P.dup, &P.ddown, &P.dgates}) {
      out[run][i++] = t->fetch();
    }
  }
  const char* names[6] = {"y", "preact", "dx", "grads.up", "grads.down", "dgates"};
  for (int i = 0; i < 6; ++i) expect_bitwise_equal(out[0][i], out[1][i], names[i]);
}

// Forward and backward (several chunks) record into a CUDA graph (no host synchronisation, no
// allocation) and the replay gives the eager results bit for bit.
TEST(ExpertsDenseCudaGraph, bf16_T257_d64_Nr8_Nc8_K5_chunk100_CapturedAndReplayed) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  DenseScope scope(100);
  const DenseCase c{DType::bf16, 257, 64, 8, 8, 5, kGelu, false, 0, 100};
  DenseProblem P(c, 31);
  CudaStream s;
  const Exec e = cuda_exec(s.get());
  DeviceBuffer fws(experts_forward_workspace_bytes(P.cfg, P.T, P.dtype, e));
  DeviceBuffer bws(experts_backward_workspace_bytes(P.cfg, P.T, P.dtype, e));
  auto run = [&] {
    experts_forward(P.cfg, P.x.view(e), P.weights(e), P.indices.view(e), P.gates.view(e),
                    P.y.view(e), false, P.preact.view(e), fws.buffer(), e);
    experts_backward(P.cfg, P.x.view(e), P.weights(e), P.indices.view(e), P.gates.view(e),
                     P.preact.view(e), P.schedule(e), P.dy.view(e), P.dx.view(e), false,
                     {P.dup.view(e), P.ddown.view(e)}, P.dgates.view(e), bws.buffer(), e);
  };
  MirroredTensor* outs[6] = {&P.y, &P.preact, &P.dx, &P.dup, &P.ddown, &P.dgates};
  HostTensor eager[6];
  P.reset_outputs(false, 1);
  run();  // also builds the GEMM plans outside the capture, as a real first step would
  s.synchronize();
  for (int i = 0; i < 6; ++i) eager[i] = outs[i]->fetch();
  P.reset_outputs(false, 1);
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t instance = nullptr;
  OMNIMOE_TEST_CUDA_CHECK(cudaStreamBeginCapture(s.get(), cudaStreamCaptureModeGlobal));
  run();
  OMNIMOE_TEST_CUDA_CHECK(cudaStreamEndCapture(s.get(), &graph));
  OMNIMOE_TEST_CUDA_CHECK(cudaGraphInstantiate(&instance, graph, 0));
  OMNIMOE_TEST_CUDA_CHECK(cudaGraphLaunch(instance, s.get()));
  s.synchronize();
  cudaGraphExecDestroy(instance);
  cudaGraphDestroy(graph);
  const char* names[6] = {"y", "preact", "dx", "grads.up", "grads.down", "dgates"};
  for (int i = 0; i < 6; ++i) expect_bitwise_equal(outs[i]->fetch(), eager[i], names[i]);
}

// T = 0: backward still overwrites the weight gradients (padded dV rows too), with zeros.
TEST(ExpertsDenseCudaEdge, NoTokensBackwardZeroesWeightGrads) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  DenseScope scope(0);
  const DenseCase c{DType::bf16, 0, 64, 4, 5, 3, kSilu, false, 3, 0};
  DenseProblem P(c, 12);
  P.reset_outputs(false, 1);
  CudaStream s;
  P.backward(false, cuda_exec(s.get()));
  s.synchronize();
  const HostTensor dup = P.dup.fetch(), ddown = P.ddown.fetch();
  for (int64_t i = 0; i < dup.numel(); ++i) ASSERT_EQ(dup.get(i), 0.0) << "dW element " << i;
  for (int64_t i = 0; i < ddown.numel(); ++i) ASSERT_EQ(ddown.get(i), 0.0) << "dV element " << i;
}

// The comparison can fail: one wrong element of the dense path's y is caught.
TEST(ExpertsDenseCudaHarness, ComparisonCatchesOneWrongElement) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  DenseScope scope(64);
  const DenseCase c{DType::bf16, 257, 37, 19, 23, 7, kSilu, false, 0, 64};
  DenseProblem P(c, 11);
  P.reset_outputs(false, 1);
  run_on_cpu_and_cuda([&](const Exec& e) { P.forward(false, e); });
  HostTensor got = P.y.fetch();
  const Tolerance tol = tolerance_for(c.dtype, c.top_k);
  EXPECT_LE(compare(got.to_vector(), P.y.host.to_vector(), tol).worst_ratio, 1.0);
  got.set(200 * c.hidden + 5, got.get(200 * c.hidden + 5) + 0.25);
  EXPECT_GT(compare(got.to_vector(), P.y.host.to_vector(), tol).worst_ratio, 1.0);
}

// Named "dense"; chosen by default for 16-bit storage, tables beyond L2 and K/N >= 2%; never for
// f32 / f64 (forcing it there is an error).
TEST(ExpertsDenseCudaExecution, ChosenByDensityAndForced) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  LayerConfig cfg;
  cfg.hidden = 1024;
  cfg.grid_rows = 320;
  cfg.grid_cols = 320;
  const Exec e = cuda_exec(nullptr);
  {
    ScopedEnv env(kPathVar, nullptr);
    cfg.top_k = 4096;  // paper-k4096-t4k: K/N = 4%
    EXPECT_STREQ(experts_execution(cfg, 4096, DType::bf16, e), "dense");
    EXPECT_STREQ(experts_execution(cfg, 4096, DType::f16, e), "dense");
    EXPECT_STRNE(experts_execution(cfg, 4096, DType::f32, e), "dense");
    // One token: the dense products would read all the tables for it.
    EXPECT_STRNE(experts_execution(cfg, 1, DType::bf16, e), "dense");
    cfg.top_k = 512;  // paper-k512-t4k: K/N = 0.5%
    const std::string name = experts_execution(cfg, 4096, DType::bf16, e);
    EXPECT_EQ(name.find("dense"), std::string::npos) << name;
  }
  {
    ScopedEnv env(kPathVar, "dense");
    cfg.grid_rows = cfg.grid_cols = 16;
    cfg.top_k = 1;
    EXPECT_STREQ(experts_execution(cfg, 4096, DType::bf16, e), "dense");
    EXPECT_THROW(experts_execution(cfg, 4096, DType::f32, e), Error);
    EXPECT_THROW(experts_execution(cfg, 4096, DType::f64, e), Error);
  }
}

}  // namespace
}  // namespace omnimoe::test
