// CUDA atomic experts against the CPU backend, forward and backward, from the same random inputs
// and routings; each execution path (OMNIMOE_EXPERTS_PATH) and the default choice; bitwise
// repeatability of the default path.
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

// Sets an environment variable for the scope, restoring the previous value.
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

constexpr const char* kPathVar = "OMNIMOE_EXPERTS_PATH";

// How a routing spreads the tokens over the experts.
enum class Spread {
  random,  // K distinct experts per token, uniform over all N
  half,    // only experts [0, max(K, N/2)) are chosen: the others must get zero gradients
  hot,     // every token's first choice is expert N/2 (K = 1: all tokens on one expert)
};

const char* spread_name(Spread s) {
  return s == Spread::random ? "random" : s == Spread::half ? "half" : "hot";
}

// i32 [T, K] indices, distinct per token.
HostTensor make_indices(int64_t tokens, int64_t K, int64_t N, Spread spread, uint64_t seed) {
  HostTensor idx(DType::i32, {tokens, K});
  std::mt19937_64 rng(seed);
  const int64_t pool = spread == Spread::half ? std::max<int64_t>(K, N / 2) : N;
  std::vector<int32_t> ids(static_cast<size_t>(pool));
  for (int64_t t = 0; t < tokens; ++t) {
    std::iota(ids.begin(), ids.end(), 0);
    // A partial Fisher-Yates shuffle: the first K are a uniform K-subset.
    for (int64_t k = 0; k < K; ++k) {
      std::uniform_int_distribution<int64_t> pick(k, pool - 1);
      std::swap(ids[k], ids[pick(rng)]);
    }
    if (spread == Spread::hot) {
      const auto hot = static_cast<int32_t>(N / 2);
      const auto it = std::find(ids.begin(), ids.end(), hot);
      std::iter_swap(ids.begin(), it);
    }
    for (int64_t k = 0; k < K; ++k) idx.set(t * K + k, ids[k]);
  }
  return idx;
}

// The schedule by a stable counting sort on the host (the experts tests do not depend on
// schedule_build): offsets i32 [N + 1], pair order i32 [T * K].
void host_schedule(const HostTensor& indices, int64_t N, HostTensor& offsets,
                   HostTensor& order) {
  const int64_t pairs = indices.numel();
  offsets = HostTensor(DType::i32, {N + 1});
  order = HostTensor(DType::i32, {pairs});
  std::vector<int64_t> count(static_cast<size_t>(N + 1), 0);
  for (int64_t p = 0; p < pairs; ++p) ++count[static_cast<size_t>(indices.get(p)) + 1];
  for (int64_t e = 0; e < N; ++e) count[e + 1] += count[e];
  for (int64_t e = 0; e <= N; ++e) offsets.set(e, static_cast<double>(count[e]));
  for (int64_t p = 0; p < pairs; ++p) {
    order.set(count[static_cast<size_t>(indices.get(p))]++, static_cast<double>(p));
  }
}

struct ExpertsCase {
  DType dtype;
  int64_t tokens, hidden, grid_rows, grid_cols, top_k;
  Activation act;
  Spread spread;
  int64_t pad;       // row padding of x, y, dy, dx, W and dV
  const char* path;  // OMNIMOE_EXPERTS_PATH, or nullptr for the default choice
};

std::string case_name(const ExpertsCase& c) {
  std::string s = std::string(dtype_name(c.dtype)) + "_T" + std::to_string(c.tokens) + "_d" +
                  std::to_string(c.hidden) + "_Nr" + std::to_string(c.grid_rows) + "_Nc" +
                  std::to_string(c.grid_cols) + "_K" + std::to_string(c.top_k) + "_" +
                  activation_name(c.act) + "_" + spread_name(c.spread);
  if (c.pad) s += "_pad" + std::to_string(c.pad);
  s += std::string("_") + (c.path ? c.path : "default");
  return s;
}

// Every tensor of one experts call, on both backends.
struct ExpertsProblem {
  LayerConfig cfg;
  DType dtype;
  int64_t T, d, N, K, busiest = 0;
  std::vector<int64_t> unchosen;
  MirroredTensor x, up, down, indices, gates, offsets, order, dy;
  MirroredTensor y, preact, dx, dup, ddown, dgates;

  static HostTensor indices_for(const ExpertsCase& c, uint64_t seed) {
    return make_indices(c.tokens, c.top_k, c.grid_rows * c.grid_cols, c.spread, seed);
  }

  ExpertsProblem(const ExpertsCase& c, uint64_t seed)
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
        indices(indices_for(c, seed + 4)),
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
    // cudaMemset may run asynchronously on the legacy stream, which the test's non-blocking
    // stream does not wait for.
    OMNIMOE_TEST_CUDA_CHECK(cudaDeviceSynchronize());
  }

  // Backward reads the CPU's preact on both sides, so both start from the same saved state.
  void share_cpu_preact() {
    preact.device.copy_from(preact.host);
    OMNIMOE_TEST_CUDA_CHECK(cudaDeviceSynchronize());
  }

  // Products behind an output element that sums `outer` weighted rows. In 16-bit storage the
  // final rounding dominates and `outer` is the count; in f32 / f64 the d-term dot inside each
  // row's coefficient (x . W or dy . V, summed in another order on each side) dominates.
  int64_t terms(int64_t outer) const {
    const bool wide = dtype == DType::f32 || dtype == DType::f64;
    return std::max<int64_t>(1, wide ? outer * d : outer);
  }

  void expect_forward_close() {
    // preact is a d-term fp32 dot on both sides.
    expect_close(y.fetch(), y.host, tolerance_for(dtype, terms(K)), "y");
    expect_close(preact.fetch(), preact.host, tolerance_for(DType::f32, d), "preact");
  }
  void expect_backward_close() {
    expect_close(dx.fetch(), dx.host, tolerance_for(dtype, terms(K)), "dx");
    expect_close(dgates.fetch(), dgates.host, tolerance_for(DType::f32, d), "dgates");
    const HostTensor dup_got = dup.fetch(), ddown_got = ddown.fetch();
    expect_close(dup_got, dup.host, tolerance_for(dtype, terms(busiest)), "grads.up (dW)");
    expect_close(ddown_got, ddown.host, tolerance_for(dtype, terms(busiest)), "grads.down (dV)");
    for (int64_t e : unchosen) {
      for (int64_t j = 0; j < d; ++j) {
        ASSERT_EQ(dup_got.at(e, j), 0.0) << "dW row of unchosen expert " << e;
        ASSERT_EQ(ddown_got.at(e, j), 0.0) << "dV row of unchosen expert " << e;
      }
    }
  }
};

uint64_t seed_of(const ExpertsCase& c) {
  return 7000 + static_cast<uint64_t>(c.tokens * 131 + c.hidden * 17 + c.top_k * 3 +
                                      c.grid_rows) +
         static_cast<uint64_t>(c.dtype) * 1000003;
}

// Skips when a forced path does not handle this call (the tiled path's dtypes and sizes).
#define SKIP_IF_PATH_UNSUPPORTED(cfg, tokens, dtype)                                       \
  do {                                                                                     \
    try {                                                                                  \
      experts_execution(cfg, tokens, dtype, cuda_exec(nullptr));                           \
    } catch (const Error& err) {                                                           \
      GTEST_SKIP() << "forced path does not handle this call: " << err.what();            \
    }                                                                                      \
  } while (0)

class ExpertsCuda : public ::testing::TestWithParam<ExpertsCase> {};

TEST_P(ExpertsCuda, ForwardMatchesCpu) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  const ExpertsCase c = GetParam();
  ScopedEnv env(kPathVar, c.path);
  ExpertsProblem P(c, seed_of(c));
  SKIP_IF_PATH_UNSUPPORTED(P.cfg, P.T, P.dtype);
  P.reset_outputs(false, 1);
  run_on_cpu_and_cuda([&](const Exec& e) { P.forward(false, e); });
  P.expect_forward_close();
}

TEST_P(ExpertsCuda, ForwardAccumulatesIntoY) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  const ExpertsCase c = GetParam();
  ScopedEnv env(kPathVar, c.path);
  ExpertsProblem P(c, seed_of(c));
  SKIP_IF_PATH_UNSUPPORTED(P.cfg, P.T, P.dtype);
  P.reset_outputs(true, 2);
  run_on_cpu_and_cuda([&](const Exec& e) { P.forward(true, e); });
  P.expect_forward_close();
}

TEST_P(ExpertsCuda, BackwardMatchesCpu) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  const ExpertsCase c = GetParam();
  ScopedEnv env(kPathVar, c.path);
  ExpertsProblem P(c, seed_of(c));
  SKIP_IF_PATH_UNSUPPORTED(P.cfg, P.T, P.dtype);
  P.reset_outputs(false, 3);
  P.forward(false, cpu_exec());
  P.share_cpu_preact();
  run_on_cpu_and_cuda([&](const Exec& e) { P.backward(false, e); });
  P.expect_backward_close();
}

TEST_P(ExpertsCuda, BackwardAccumulatesIntoDx) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  const ExpertsCase c = GetParam();
  ScopedEnv env(kPathVar, c.path);
  ExpertsProblem P(c, seed_of(c));
  SKIP_IF_PATH_UNSUPPORTED(P.cfg, P.T, P.dtype);
  P.reset_outputs(true, 5);
  P.forward(false, cpu_exec());  // the CPU's preact; dx stays as reset, the same on both sides
  P.share_cpu_preact();
  run_on_cpu_and_cuda([&](const Exec& e) { P.backward(true, e); });
  P.expect_backward_close();
}

const auto kSilu = Activation::silu;
const auto kGelu = Activation::gelu;
const auto kRelu = Activation::relu;

// Shapes that reach every gather kernel variant: d = 64 in bf16 (16-byte chunks, one warp per
// token), d = 37 or padded rows (single-element chunks), d = 1024 (128 or 256 threads per token),
// 3000 and 6000 (two and four chunks per thread), 1100 and 1031 unaligned and 2100 in f64 (the
// split path for long rows); K = 1, K = N, K not a multiple of the expert group; experts nobody
// chose; all tokens on one expert. Then each forced path and the default choice on a few cases
// of few and many tokens per expert.
std::vector<ExpertsCase> experts_cases() {
  const char* gather = "gather";
  std::vector<ExpertsCase> v = {
      {DType::bf16, 257, 64, 19, 23, 7, kSilu, Spread::random, 0, gather},
      {DType::bf16, 257, 37, 19, 23, 7, kSilu, Spread::random, 0, gather},
      {DType::f16, 257, 37, 19, 23, 7, kGelu, Spread::random, 3, gather},
      {DType::f32, 257, 37, 19, 23, 7, kRelu, Spread::random, 0, gather},
      {DType::bf16, 100, 64, 19, 23, 7, kGelu, Spread::random, 8, gather},
      {DType::f32, 64, 1024, 8, 8, 16, kSilu, Spread::random, 0, gather},
      {DType::bf16, 64, 1024, 8, 8, 16, kGelu, Spread::half, 0, gather},
      {DType::bf16, 33, 3000, 4, 5, 6, kSilu, Spread::random, 0, gather},
      {DType::f16, 17, 6000, 3, 5, 4, kRelu, Spread::random, 0, gather},
      {DType::bf16, 40, 1100, 4, 5, 6, kSilu, Spread::random, 0, gather},
      {DType::f32, 21, 1031, 3, 4, 5, kGelu, Spread::random, 1, gather},
      {DType::f32, 64, 37, 4, 4, 1, kSilu, Spread::random, 0, gather},
      {DType::bf16, 33, 40, 5, 7, 35, kGelu, Spread::random, 0, gather},
      {DType::f16, 100, 24, 16, 16, 16, kRelu, Spread::half, 0, gather},
      {DType::f32, 257, 37, 5, 7, 1, kGelu, Spread::hot, 2, gather},
      {DType::bf16, 257, 64, 5, 7, 3, kSilu, Spread::hot, 0, gather},
      {DType::f64, 64, 16, 8, 8, 64, kGelu, Spread::random, 0, gather},
      {DType::f64, 50, 37, 6, 6, 9, kSilu, Spread::hot, 1, gather},
      {DType::f64, 9, 2100, 3, 3, 4, kRelu, Spread::random, 0, gather},
      {DType::f32, 1, 8, 4, 4, 1, kSilu, Spread::random, 0, gather},
  };
  for (const char* path : {"tiled", static_cast<const char*>(nullptr)}) {
    v.push_back({DType::bf16, 257, 64, 19, 23, 7, kSilu, Spread::random, 0, path});
    v.push_back({DType::bf16, 512, 128, 4, 8, 16, kGelu, Spread::random, 0, path});
    v.push_back({DType::f16, 300, 96, 8, 8, 9, kRelu, Spread::half, 0, path});
    v.push_back({DType::f32, 257, 37, 19, 23, 7, kSilu, Spread::hot, 3, path});
    v.push_back({DType::bf16, 257, 40, 5, 7, 1, kGelu, Spread::hot, 0, path});
    v.push_back({DType::f32, 64, 1024, 8, 8, 16, kSilu, Spread::random, 0, path});
    v.push_back({DType::bf16, 33, 3000, 4, 5, 6, kSilu, Spread::random, 0, path});
    v.push_back({DType::f32, 21, 1031, 3, 4, 5, kGelu, Spread::random, 1, path});
    v.push_back({DType::bf16, 300, 64, 8, 8, 3, kSilu, Spread::random, 0, path});
  }
  return v;
}

INSTANTIATE_TEST_SUITE_P(Cases, ExpertsCuda, ::testing::ValuesIn(experts_cases()),
                         [](const auto& info) { return case_name(info.param); });

// The comparison above can fail: one wrong element in y is caught.
TEST(ExpertsCudaHarness, ComparisonCatchesOneWrongElement) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  const ExpertsCase c{DType::bf16, 65, 64, 5, 7, 4, kSilu, Spread::random, 0, nullptr};
  ExpertsProblem P(c, 11);
  P.reset_outputs(false, 1);
  run_on_cpu_and_cuda([&](const Exec& e) { P.forward(false, e); });
  HostTensor got = P.y.fetch();
  EXPECT_LE(compare(got.to_vector(), P.y.host.to_vector(), tolerance_for(c.dtype, c.top_k))
                .worst_ratio,
            1.0);
  got.set(17 * c.hidden + 5, got.get(17 * c.hidden + 5) + 0.25);
  EXPECT_GT(compare(got.to_vector(), P.y.host.to_vector(), tolerance_for(c.dtype, c.top_k))
                .worst_ratio,
            1.0);
}

// T = 0: backward still overwrites the weight gradients, with zeros.
TEST(ExpertsCudaEdge, NoTokensBackwardZeroesWeightGrads) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  const ExpertsCase c{DType::bf16, 0, 64, 4, 5, 3, kSilu, Spread::random, 0, nullptr};
  ExpertsProblem P(c, 12);
  P.reset_outputs(false, 1);
  CudaStream s;
  const Exec e = cuda_exec(s.get());
  P.backward(false, e);
  s.synchronize();
  const HostTensor dup = P.dup.fetch(), ddown = P.ddown.fetch();
  for (int64_t i = 0; i < dup.numel(); ++i) ASSERT_EQ(dup.get(i), 0.0) << "dW element " << i;
  for (int64_t i = 0; i < ddown.numel(); ++i) ASSERT_EQ(ddown.get(i), 0.0) << "dV element " << i;
}

// Byte-for-byte equality of two host tensors (padding excluded).
void expect_bitwise_equal(const HostTensor& a, const HostTensor& b, const char* what) {
  ASSERT_EQ(a.numel(), b.numel()) << what;
  const std::vector<double> va = a.to_vector(), vb = b.to_vector();
  for (size_t i = 0; i < va.size(); ++i) {
    ASSERT_TRUE(std::memcmp(&va[i], &vb[i], sizeof(double)) == 0)
        << what << ": element " << i << " differs between runs: " << va[i] << " vs " << vb[i];
  }
}

struct DeterminismCase {
  DType dtype;
  int64_t tokens, hidden, grid_rows, grid_cols, top_k;
  const char* path;
};

class ExpertsCudaDeterminism : public ::testing::TestWithParam<DeterminismCase> {};

// Two runs give bitwise identical outputs and gradients (no float atomics).
TEST_P(ExpertsCudaDeterminism, TwoRunsBitwiseIdentical) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  const DeterminismCase dc = GetParam();
  ScopedEnv env(kPathVar, dc.path);
  const ExpertsCase c{dc.dtype, dc.tokens, dc.hidden, dc.grid_rows, dc.grid_cols, dc.top_k,
                      kSilu,    Spread::random, 0, nullptr};
  ExpertsProblem P(c, 21);
  SKIP_IF_PATH_UNSUPPORTED(P.cfg, P.T, P.dtype);
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

INSTANTIATE_TEST_SUITE_P(
    Cases, ExpertsCudaDeterminism,
    ::testing::Values(DeterminismCase{DType::bf16, 2048, 256, 64, 64, 32, nullptr},
                      DeterminismCase{DType::bf16, 1024, 128, 64, 64, 8, nullptr},
                      DeterminismCase{DType::f32, 700, 96, 16, 16, 24, nullptr},
                      DeterminismCase{DType::bf16, 2048, 256, 64, 64, 32, "gather"},
                      DeterminismCase{DType::bf16, 2048, 256, 64, 64, 32, "tiled"}),
    [](const auto& info) {
      const DeterminismCase& c = info.param;
      return std::string(dtype_name(c.dtype)) + "_T" + std::to_string(c.tokens) + "_d" +
             std::to_string(c.hidden) + "_Nr" + std::to_string(c.grid_rows) + "_Nc" +
             std::to_string(c.grid_cols) + "_K" + std::to_string(c.top_k) + "_" +
             (c.path ? c.path : "default");
    });

// The execution is named, chosen by tokens per expert, and forced by OMNIMOE_EXPERTS_PATH.
TEST(ExpertsCudaExecution, NamesAndForcesThePath) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  LayerConfig cfg;
  cfg.hidden = 1024;
  cfg.grid_rows = 1024;
  cfg.grid_cols = 1024;
  cfg.top_k = 16;
  const Exec e = cuda_exec(nullptr);
  {
    ScopedEnv env(kPathVar, nullptr);
    // pool-1m-k16: 0.06 tokens per expert.
    EXPECT_STREQ(experts_execution(cfg, 4096, DType::bf16, e), "gather");
  }
  {
    // ref-quickstart's shape, 16 tokens per expert: forward and backward may differ.
    ScopedEnv env(kPathVar, nullptr);
    cfg.grid_rows = cfg.grid_cols = 64;
    const std::string name = experts_execution(cfg, 4096, DType::bf16, e);
    EXPECT_TRUE(name == "gather" || name == "tiled" || name == "tiled+gather" ||
                name == "gather+tiled")
        << name;
    // f64 has no tiled execution: always gather.
    EXPECT_STREQ(experts_execution(cfg, 4096, DType::f64, e), "gather");
  }
  {
    ScopedEnv env(kPathVar, "gather");
    cfg.grid_rows = cfg.grid_cols = 16;
    EXPECT_STREQ(experts_execution(cfg, 4096, DType::bf16, e), "gather");
  }
  {
    ScopedEnv env(kPathVar, "bogus");
    EXPECT_THROW(experts_execution(cfg, 4096, DType::bf16, e), Error);
  }
}

}  // namespace
}  // namespace omnimoe::test
