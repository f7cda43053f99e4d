// CUDA atomic experts against the CPU backend, forward and backward, from the same random inputs
// and routings; each execution path (OMNIMOE_EXPERTS_PATH) and the default choice; bitwise
// repeatability of the default path.
#include <omnimoe/omnimoe.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "experts_problem.h"

namespace omnimoe::test {
namespace {

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
  const int64_t pool = spread == Spread::half ? std::max<int64_t>(K, N / 2) : N;
  return uniform_indices(tokens, K, pool, seed,
                         spread == Spread::hot ? static_cast<int32_t>(N / 2) : -1);
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

ExpertsProblem problem_of(const ExpertsCase& c, uint64_t seed) {
  const ExpertsShape shape{c.dtype, c.tokens,  c.hidden, c.grid_rows, c.grid_cols,
                           c.top_k, c.act,     c.pad,    false};
  return ExpertsProblem(
      shape, make_indices(c.tokens, c.top_k, c.grid_rows * c.grid_cols, c.spread, seed + 4),
      seed);
}

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
  ScopedEnv env(kExpertsPathVar, c.path);
  ExpertsProblem P = problem_of(c, seed_of(c));
  SKIP_IF_PATH_UNSUPPORTED(P.cfg, P.T, P.dtype);
  P.reset_outputs(false, 1);
  run_on_cpu_and_cuda([&](const Exec& e) { P.forward(false, e); });
  P.expect_forward_close();
}

TEST_P(ExpertsCuda, ForwardAccumulatesIntoY) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  const ExpertsCase c = GetParam();
  ScopedEnv env(kExpertsPathVar, c.path);
  ExpertsProblem P = problem_of(c, seed_of(c));
  SKIP_IF_PATH_UNSUPPORTED(P.cfg, P.T, P.dtype);
  P.reset_outputs(true, 2);
  run_on_cpu_and_cuda([&](const Exec& e) { P.forward(true, e); });
  P.expect_forward_close();
}

TEST_P(ExpertsCuda, BackwardMatchesCpu) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  const ExpertsCase c = GetParam();
  ScopedEnv env(kExpertsPathVar, c.path);
  ExpertsProblem P = problem_of(c, seed_of(c));
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
  ScopedEnv env(kExpertsPathVar, c.path);
  ExpertsProblem P = problem_of(c, seed_of(c));
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
  ExpertsProblem P = problem_of(c, 11);
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
  ExpertsProblem P = problem_of(c, 12);
  P.reset_outputs(false, 1);
  CudaStream s;
  const Exec e = cuda_exec(s.get());
  P.backward(false, e);
  s.synchronize();
  const HostTensor dup = P.dup.fetch(), ddown = P.ddown.fetch();
  for (int64_t i = 0; i < dup.numel(); ++i) ASSERT_EQ(dup.get(i), 0.0) << "dW element " << i;
  for (int64_t i = 0; i < ddown.numel(); ++i) ASSERT_EQ(ddown.get(i), 0.0) << "dV element " << i;
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
  ScopedEnv env(kExpertsPathVar, dc.path);
  const ExpertsCase c{dc.dtype, dc.tokens, dc.hidden, dc.grid_rows, dc.grid_cols, dc.top_k,
                      kSilu,    Spread::random, 0, nullptr};
  ExpertsProblem P = problem_of(c, 21);
  SKIP_IF_PATH_UNSUPPORTED(P.cfg, P.T, P.dtype);
  CudaStream s;
  const Exec e = cuda_exec(s.get());
  const std::array<HostTensor, 6> first = P.run_device(e);
  expect_runs_bitwise_equal(first, P.run_device(e));
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
    ScopedEnv env(kExpertsPathVar, nullptr);
    // pool-1m-k16: 0.06 tokens per expert.
    EXPECT_STREQ(experts_execution(cfg, 4096, DType::bf16, e), "gather");
  }
  {
    // ref-quickstart's shape, 16 tokens per expert: forward and backward may differ.
    ScopedEnv env(kExpertsPathVar, nullptr);
    cfg.grid_rows = cfg.grid_cols = 64;
    const std::string name = experts_execution(cfg, 4096, DType::bf16, e);
    EXPECT_TRUE(name == "gather" || name == "tiled" || name == "tiled+gather" ||
                name == "gather+tiled")
        << name;
    // f64 has no tiled execution: always gather.
    EXPECT_STREQ(experts_execution(cfg, 4096, DType::f64, e), "gather");
  }
  {
    ScopedEnv env(kExpertsPathVar, "gather");
    cfg.grid_rows = cfg.grid_cols = 16;
    EXPECT_STREQ(experts_execution(cfg, 4096, DType::bf16, e), "gather");
  }
  {
    ScopedEnv env(kExpertsPathVar, "bogus");
    EXPECT_THROW(experts_execution(cfg, 4096, DType::bf16, e), Error);
  }
}

}  // namespace
}  // namespace omnimoe::test
