// The tiled (expert-centric, tensor-core) execution of the atomic experts against the CPU
// backend: routings as the Cartesian router makes them (each token's experts a staircase of its
// own row and column ranks, the structure the tiled path groups by) and uniform ones, many tokens
// per expert, odd sizes, padded rows, accumulate flags, both reductions (deterministic fixed
// point and fp32 atomics), bitwise repeatability. Runs forced onto the path through
// OMNIMOE_EXPERTS_PATH=tiled. A disabled timing test measures the paper shapes.
#include <omnimoe/omnimoe.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cuda/experts_tiled.cuh"
#include "cuda/gemm.h"
#include "experts_problem.h"

namespace omnimoe::test {
namespace {

// Forces the tiled path for the scope.
struct ForceTiledPath {
  ScopedEnv path{kExpertsPathVar, "tiled"};
};

enum class Routing {
  cartesian,  // top K of p_r[i] + p_c[j] from random normal logits (what the router makes)
  uniform,    // K distinct experts, uniform
};

// i32 [T, K] indices. Cartesian: log-softmax of N(0, 1) logits per row and column, the top K
// pair sums (brute force over the grid; ties by smaller id), in descending score order.
HostTensor make_routing(int64_t T, int64_t Nr, int64_t Nc, int64_t K, Routing routing,
                        uint64_t seed) {
  HostTensor idx(DType::i32, {T, K});
  std::mt19937_64 rng(seed);
  const int64_t N = Nr * Nc;
  std::vector<int32_t> ids(static_cast<size_t>(N));
  std::vector<double> score(static_cast<size_t>(N)), pr(Nr), pc(Nc);
  std::normal_distribution<double> normal(0.0, 1.0);
  auto log_softmax = [](std::vector<double>& v) {
    const double m = *std::max_element(v.begin(), v.end());
    double s = 0.0;
    for (double x : v) s += std::exp(x - m);
    for (double& x : v) x -= m + std::log(s);
  };
  for (int64_t t = 0; t < T; ++t) {
    std::iota(ids.begin(), ids.end(), 0);
    if (routing == Routing::cartesian) {
      for (double& v : pr) v = normal(rng);
      for (double& v : pc) v = normal(rng);
      log_softmax(pr);
      log_softmax(pc);
      for (int64_t e = 0; e < N; ++e) score[e] = pr[e / Nc] + pc[e % Nc];
      std::partial_sort(ids.begin(), ids.begin() + K, ids.end(), [&](int32_t a, int32_t b) {
        return score[a] != score[b] ? score[a] > score[b] : a < b;
      });
    } else {
      for (int64_t k = 0; k < K; ++k) {
        std::uniform_int_distribution<int64_t> pick(k, N - 1);
        std::swap(ids[k], ids[pick(rng)]);
      }
    }
    for (int64_t k = 0; k < K; ++k) idx.set(t * K + k, ids[k]);
  }
  return idx;
}

struct TiledCase {
  DType dtype;
  int64_t tokens, hidden, grid_rows, grid_cols, top_k;
  Activation act;
  Routing routing;
  int64_t pad;  // row padding of x, y, dy, dx, W, V and the gradients
};

std::string case_name(const TiledCase& c) {
  std::string s = std::string(dtype_name(c.dtype)) + "_T" + std::to_string(c.tokens) + "_d" +
                  std::to_string(c.hidden) + "_Nr" + std::to_string(c.grid_rows) + "_Nc" +
                  std::to_string(c.grid_cols) + "_K" + std::to_string(c.top_k) + "_" +
                  activation_name(c.act) + "_" +
                  (c.routing == Routing::cartesian ? "cartesian" : "uniform");
  if (c.pad) s += "_pad" + std::to_string(c.pad);
  return s;
}

ExpertsProblem problem_of(const TiledCase& c, uint64_t seed) {
  const ExpertsShape shape{c.dtype, c.tokens,  c.hidden, c.grid_rows, c.grid_cols,
                           c.top_k, c.act,     c.pad,    true};
  return ExpertsProblem(
      shape, make_routing(c.tokens, c.grid_rows, c.grid_cols, c.top_k, c.routing, seed + 4), seed);
}

uint64_t seed_of(const TiledCase& c) {
  return 9100 + static_cast<uint64_t>(c.tokens * 131 + c.hidden * 17 + c.top_k * 3 +
                                      c.grid_rows * 7 + c.grid_cols) +
         static_cast<uint64_t>(c.dtype) * 1000003;
}

Exec cuda_exec_mode(cudaStream_t s, bool deterministic) {
  Exec e = cuda_exec(s);
  e.deterministic = deterministic;
  return e;
}

// Runs op on the CPU, then on CUDA (deterministic or not) on a fresh stream.
template <typename Op>
void run_both(bool deterministic, Op&& op) {
  op(cpu_exec());
  CudaStream stream;
  op(cuda_exec_mode(stream.get(), deterministic));
  stream.synchronize();
  OMNIMOE_TEST_CUDA_CHECK(cudaGetLastError());
}

// Backward from the CPU's saved preact on both sides, against the CPU.
void expect_backward_matches_cpu(ExpertsProblem& P, bool accumulate_dx, bool deterministic,
                                 uint64_t seed) {
  P.reset_outputs(accumulate_dx, seed);
  P.forward(false, cpu_exec());
  P.share_cpu_preact();
  run_both(deterministic, [&](const Exec& e) { P.backward(accumulate_dx, e); });
  P.expect_backward_close();
}

class ExpertsTiledCuda : public ::testing::TestWithParam<TiledCase> {};

TEST_P(ExpertsTiledCuda, ForwardMatchesCpu) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  ForceTiledPath force;
  ExpertsProblem P = problem_of(GetParam(), seed_of(GetParam()));
  P.reset_outputs(false, 1);
  run_both(true, [&](const Exec& e) { P.forward(false, e); });
  P.expect_forward_close();
}

TEST_P(ExpertsTiledCuda, ForwardAccumulatesIntoY) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  ForceTiledPath force;
  ExpertsProblem P = problem_of(GetParam(), seed_of(GetParam()));
  P.reset_outputs(true, 2);
  run_both(true, [&](const Exec& e) { P.forward(true, e); });
  P.expect_forward_close();
}

TEST_P(ExpertsTiledCuda, ForwardWithFloatAtomicsMatchesCpu) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  ForceTiledPath force;
  ExpertsProblem P = problem_of(GetParam(), seed_of(GetParam()));
  P.reset_outputs(false, 3);
  run_both(false, [&](const Exec& e) { P.forward(false, e); });
  P.expect_forward_close();
}

TEST_P(ExpertsTiledCuda, BackwardMatchesCpu) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  ForceTiledPath force;
  ExpertsProblem P = problem_of(GetParam(), seed_of(GetParam()));
  expect_backward_matches_cpu(P, false, true, 4);
}

TEST_P(ExpertsTiledCuda, BackwardAccumulatesIntoDxWithFloatAtomics) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  ForceTiledPath force;
  ExpertsProblem P = problem_of(GetParam(), seed_of(GetParam()));
  expect_backward_matches_cpu(P, true, false, 5);
}

const auto kSilu = Activation::silu;
const auto kGelu = Activation::gelu;
const auto kRelu = Activation::relu;
const auto kCart = Routing::cartesian;
const auto kUni = Routing::uniform;

// m = T K / N from about 1 to 195. d = 37 with unpadded rows takes the element-wise copies;
// d = 37 padded to 40 the 16-byte copies with a partial last chunk; 80 grid columns need two
// slot blocks; K = 1, K = N; T = 512 and 1000 give groups of several token tiles; 600 grid
// columns need two coefficient windows in the token sums (and d = 264 two column blocks).
std::vector<TiledCase> tiled_cases() {
  return {
      {DType::bf16, 512, 64, 16, 16, 64, kSilu, kCart, 0},    // m = 128
      {DType::bf16, 257, 37, 19, 23, 7, kSilu, kCart, 0},     // odd everything
      {DType::f16, 257, 37, 19, 23, 7, kGelu, kCart, 3},      // padded rows
      {DType::bf16, 300, 200, 8, 80, 96, kRelu, kCart, 0},    // 80 slots, partial chunk
      {DType::f16, 200, 128, 24, 12, 40, kSilu, kUni, 0},     // uniform routing
      {DType::bf16, 64, 96, 8, 8, 64, kGelu, kCart, 0},       // K = N
      {DType::bf16, 129, 64, 4, 5, 1, kSilu, kCart, 8},       // K = 1
      {DType::bf16, 1000, 256, 32, 32, 200, kSilu, kCart, 0}, // m = 195, many tiles per group
      {DType::bf16, 300, 264, 3, 600, 48, kSilu, kCart, 0},   // 600 slots: two windows
  };
}

INSTANTIATE_TEST_SUITE_P(Cases, ExpertsTiledCuda, ::testing::ValuesIn(tiled_cases()),
                         [](const auto& info) { return case_name(info.param); });

// The tiled path takes bf16 and f16 (tensor cores); f32 and f64 go to the gather path.
TEST(ExpertsTiledCudaSupport, TensorCoreDtypesOnly) {
  LayerConfig cfg;
  cfg.hidden = 64;
  cfg.grid_rows = 16;
  cfg.grid_cols = 16;
  cfg.top_k = 8;
  EXPECT_TRUE(cuda::experts_tiled_supports(cfg, 512, DType::bf16));
  EXPECT_TRUE(cuda::experts_tiled_supports(cfg, 512, DType::f16));
  EXPECT_FALSE(cuda::experts_tiled_supports(cfg, 512, DType::f32));
  EXPECT_FALSE(cuda::experts_tiled_supports(cfg, 512, DType::f64));
}

// Deterministic mode: two runs (outputs poisoned before each) are bitwise identical.
TEST(ExpertsTiledCudaDeterminism, bf16_T1024_d256_Nr32_Nc32_K128_TwoRunsBitwiseIdentical) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  ForceTiledPath force;
  const TiledCase c{DType::bf16, 1024, 256, 32, 32, 128, kSilu, kCart, 0};
  ExpertsProblem P = problem_of(c, 31);
  CudaStream s;
  const Exec e = cuda_exec_mode(s.get(), true);
  const std::array<HostTensor, 6> first = P.run_device(e);
  expect_runs_bitwise_equal(first, P.run_device(e));
}

// The token sums' two levels: partial rows per (token, group) summed in rank order, the groups
// past a token's partial rows through the accumulators. OMNIMOE_TILED_PASS_COLUMNS=128 runs the
// columns in passes of 128 (d = 300: three passes, the last one partial), =0 the accumulators
// alone. Against the CPU in both routings (uniform: most tokens have more groups than rows), and
// the passes bitwise equal to one pass (each partial row is the same product either way).
class ExpertsTiledCudaPasses : public ::testing::TestWithParam<Routing> {};

TEST_P(ExpertsTiledCudaPasses, ForwardAndBackwardMatchCpu) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  ForceTiledPath force;
  const TiledCase c{DType::bf16, 300, 300, 12, 10, 40, kSilu, GetParam(), 0};
  for (const char* columns : {"128", "0"}) {
    SCOPED_TRACE(std::string("OMNIMOE_TILED_PASS_COLUMNS=") + columns);
    ScopedEnv env("OMNIMOE_TILED_PASS_COLUMNS", columns);
    ScopedEnv blocks("OMNIMOE_TILED_COEF_BLOCKS", "3");  // a few tiles prebuilt, the rest not
    ExpertsProblem P = problem_of(c, 77);
    P.reset_outputs(true, 6);
    run_both(true, [&](const Exec& e) { P.forward(true, e); });
    P.expect_forward_close();
    expect_backward_matches_cpu(P, false, true, 7);
  }
}

// Also the coefficient blocks built once per op against built in place by every pass and
// expert sum (=0), and a cap of 3 tiles (the rest built in place): the same blocks either way.
TEST_P(ExpertsTiledCudaPasses, ColumnPassesBitwiseEqualOnePass) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  ForceTiledPath force;
  const TiledCase c{DType::bf16, 300, 300, 12, 10, 40, kSilu, GetParam(), 0};
  ExpertsProblem P = problem_of(c, 78);
  CudaStream s;
  const Exec e = cuda_exec_mode(s.get(), true);
  struct Setting {
    const char* var;
    const char* value;
  };
  const Setting settings[4] = {{"OMNIMOE_TILED_PASS_COLUMNS", nullptr},
                               {"OMNIMOE_TILED_PASS_COLUMNS", "128"},
                               {"OMNIMOE_TILED_COEF_BLOCKS", "0"},
                               {"OMNIMOE_TILED_COEF_BLOCKS", "3"}};
  std::array<HostTensor, 6> out[4];
  for (int run = 0; run < 4; ++run) {
    ScopedEnv env(settings[run].var, settings[run].value);
    out[run] = P.run_device(e);
  }
  for (int run = 1; run < 4; ++run) {
    SCOPED_TRACE(std::string(settings[run].var) + "=" + settings[run].value);
    expect_runs_bitwise_equal(out[0], out[run]);
  }
}

// A tiled forward under var=value must fail with an error containing `message`.
void expect_env_error(const char* var, const char* value, const std::string& message) {
  ForceTiledPath force;
  ScopedEnv env(var, value);
  const TiledCase c{DType::bf16, 64, 64, 4, 4, 4, kSilu, kCart, 0};
  ExpertsProblem P = problem_of(c, 79);
  CudaStream s;
  const std::string what = error_of([&] { P.forward(false, cuda_exec_mode(s.get(), true)); });
  EXPECT_NE(what.find(message), std::string::npos) << "error: \"" << what << "\"";
}

TEST(ExpertsTiledCudaPassesEnv, BadColumnCountIsNamed) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  expect_env_error("OMNIMOE_TILED_PASS_COLUMNS", "100",
                   "OMNIMOE_TILED_PASS_COLUMNS must be 0 or a positive multiple of 128, got "
                   "\"100\"");
}

TEST(ExpertsTiledCudaPassesEnv, BadCoefBlockCountIsNamed) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  expect_env_error("OMNIMOE_TILED_COEF_BLOCKS", "-1",
                   "OMNIMOE_TILED_COEF_BLOCKS must be 0 or a positive integer, got \"-1\"");
}

INSTANTIATE_TEST_SUITE_P(Routings, ExpertsTiledCudaPasses, ::testing::Values(kCart, kUni),
                         [](const auto& info) {
                           return info.param == kCart ? "cartesian" : "uniform";
                         });

// ------------------------------------------------------------------------------------------
// Timing (disabled by default):
//   OMNIMOE_TILED_SHAPES=paper-k512-t4k,paper-k4096-t4k omnimoe_cuda_tests \
//     --gtest_also_run_disabled_tests --gtest_filter='ExpertsTiledCudaTiming.*'
// Routing: the CUDA router's selection (router_select_topk) on log-softmax of N(0, 1) logits
// (what batch-normalised logits are over random inputs), schedule by schedule_build.

// Device memory filled with random bf16 in +-bound (a 16 MB block repeated).
DeviceBuffer random_bf16(int64_t n, uint64_t seed, double bound) {
  DeviceBuffer b(static_cast<size_t>(n) * 2);
  const int64_t block = std::min<int64_t>(n, int64_t{8} << 20);
  const HostTensor h = make_random(DType::bf16, {block}, seed, 0, -bound, bound);
  for (int64_t i = 0; i < n; i += block) {
    OMNIMOE_TEST_CUDA_CHECK(cudaMemcpy(static_cast<char*>(b.data()) + i * 2, h.data(),
                                       static_cast<size_t>(std::min(block, n - i)) * 2,
                                       cudaMemcpyHostToDevice));
  }
  return b;
}

double gemm_tflops(int64_t m, int64_t n, int64_t k, cudaStream_t stream) {
  DeviceBuffer a = random_bf16(m * k, 1, 1.0), b = random_bf16(n * k, 2, 1.0);
  DeviceBuffer c(static_cast<size_t>(m * n) * 2), ws(cuda::gemm_workspace_bytes());
  const Device dev = Device::cuda(0);
  const TensorView va = TensorView::contiguous(a.data(), DType::bf16, {m, k}, dev);
  const TensorView vb = TensorView::contiguous(b.data(), DType::bf16, {n, k}, dev);
  const TensorView vc = TensorView::contiguous(c.data(), DType::bf16, {m, n}, dev);
  const Exec e = cuda_exec(stream);
  const double ms = median_ms(
      [&] { cuda::gemm(va, false, vb, true, vc, 1.0f, 0.0f, ws.buffer(), e); }, 3, 10, stream);
  return 2.0 * m * n * k / (ms * 1e-3) / 1e12;
}

struct Shape {
  const char* name;
  int64_t tokens, hidden, grid_rows, grid_cols, top_k;
};

// Tokens per group and the fill of the dense group blocks, as the tiled path assigns pairs.
void print_group_stats(const HostTensor& idx, int64_t T, int64_t K, int64_t Nr, int64_t Nc) {
  std::vector<int> rc(Nr), cc(Nc);
  std::vector<char> in_row(Nr), in_col(Nc);
  double groups = 0, slots = 0;
  std::vector<int> per_token(static_cast<size_t>(T), 0);  // groups of each token
  std::vector<int64_t> hist(10, 0);  // pairs per (token, grid row): 1, 2-3, 4-7, ...
  const int32_t* id = static_cast<const int32_t*>(idx.data());
  for (int64_t t = 0; t < T; ++t) {
    std::fill(rc.begin(), rc.end(), 0);
    std::fill(cc.begin(), cc.end(), 0);
    std::fill(in_row.begin(), in_row.end(), 0);
    std::fill(in_col.begin(), in_col.end(), 0);
    for (int64_t k = 0; k < K; ++k) {
      ++rc[id[t * K + k] / Nc];
      ++cc[id[t * K + k] % Nc];
    }
    for (int64_t k = 0; k < K; ++k) {
      const int i = id[t * K + k] / Nc, j = id[t * K + k] % Nc;
      if (rc[i] >= cc[j]) in_row[i] = 1; else in_col[j] = 1;
    }
    for (int64_t i = 0; i < Nr; ++i) per_token[t] += in_row[i];
    for (int64_t j = 0; j < Nc; ++j) per_token[t] += in_col[j];
    for (int64_t i = 0; i < Nr; ++i) {
      groups += in_row[i];
      slots += in_row[i] * Nc;
      if (rc[i] > 0) ++hist[std::min<int>(9, static_cast<int>(std::log2(rc[i])))];
    }
    for (int64_t j = 0; j < Nc; ++j) {
      groups += in_col[j];
      slots += in_col[j] * Nr;
    }
  }
  std::printf("  groups per token %.1f, block fill %.3f (pairs / dense block entries), "
              "tokens per group %.0f\n",
              groups / T, static_cast<double>(T * K) / slots, groups / (Nr + Nc));
  std::sort(per_token.begin(), per_token.end());
  if (T > 0) {
    std::printf("  groups per token: median %d, 99th percentile %d, max %d (sqrt(K) = %.1f)\n",
                per_token[T / 2], per_token[std::min<int64_t>(T - 1, T * 99 / 100)],
                per_token[T - 1], std::sqrt(static_cast<double>(K)));
  }
  std::printf("  (token, grid row) pair counts: ");
  for (int b = 0; b < 10; ++b) std::printf("[%d..%d] %lld  ", 1 << b, (2 << b) - 1,
                                           static_cast<long long>(hist[b]));
  std::printf("\n");
}

void time_shape(const Shape& s, double copy, double gemm_rate) {
  const int64_t T = s.tokens, d = s.hidden, K = s.top_k, Nr = s.grid_rows, Nc = s.grid_cols;
  const int64_t N = Nr * Nc, P = T * K;
  LayerConfig cfg;
  cfg.hidden = d;
  cfg.grid_rows = Nr;
  cfg.grid_cols = Nc;
  cfg.top_k = K;
  CudaStream stream;
  const Exec e = cuda_exec(stream.get());
  const Device dev = Device::cuda(0);

  // Routing from the router's own selection.
  HostTensor row_logp = make_random(DType::f32, {T, Nr}, 11), col_logp =
                                                                  make_random(DType::f32, {T, Nc}, 12);
  {
    std::mt19937_64 rng(13);
    std::normal_distribution<double> normal(0.0, 1.0);
    for (HostTensor* h : {&row_logp, &col_logp}) {
      const int64_t n = h->cols();
      for (int64_t t = 0; t < T; ++t) {
        std::vector<double> v(n);
        double m = -1e300, sum = 0;
        for (auto& x : v) {
          x = normal(rng);
          m = std::max(m, x);
        }
        for (double x : v) sum += std::exp(x - m);
        for (int64_t j = 0; j < n; ++j) h->set(t * n + j, v[j] - m - std::log(sum));
      }
    }
  }
  DeviceTensor d_row(row_logp), d_col(col_logp);
  DeviceTensor idx(HostTensor(DType::i32, {T, K})), scores(HostTensor(DType::f32, {T, K}));
  DeviceTensor offsets(HostTensor(DType::i32, {N + 1})), order(HostTensor(DType::i32, {P}));
  {
    DeviceBuffer ws(router_select_workspace_bytes(cfg, T, e));
    router_select_topk(cfg, d_row.view(), d_col.view(), idx.view(), scores.view(), ws.buffer(),
                       e);
    DeviceBuffer sws(schedule_workspace_bytes(cfg, T, e));
    schedule_build(cfg, idx.view(), {offsets.view(), order.view()}, sws.buffer(), e);
    stream.synchronize();
  }
  const HostTensor idx_host = idx.to_host();

  DeviceBuffer up = random_bf16(N * d, 1, std::sqrt(3.0 / static_cast<double>(d)));
  DeviceBuffer down = random_bf16(N * d, 2, 1.0);
  DeviceBuffer dup(static_cast<size_t>(N * d) * 2), ddown(static_cast<size_t>(N * d) * 2);
  DeviceTensor x(make_random(DType::bf16, {T, d}, 3)), dy(make_random(DType::bf16, {T, d}, 4));
  DeviceTensor y(HostTensor(DType::bf16, {T, d})), dx(HostTensor(DType::bf16, {T, d}));
  DeviceTensor gates(make_random(DType::f32, {T, K}, 6, 0, 0.05, 1.0));
  DeviceTensor preact(HostTensor(DType::f32, {T, K})), dgates(HostTensor(DType::f32, {T, K}));
  const Schedule sched{offsets.view(), order.view()};
  const ExpertWeights w{TensorView::contiguous(up.data(), DType::bf16, {N, d}, dev),
                        TensorView::contiguous(down.data(), DType::bf16, {N, d}, dev)};
  const ExpertWeights g{TensorView::contiguous(dup.data(), DType::bf16, {N, d}, dev),
                        TensorView::contiguous(ddown.data(), DType::bf16, {N, d}, dev)};

  const double m = static_cast<double>(P) / N;
  std::printf("%s: T=%lld d=%lld grid=%lldx%lld K=%lld  P=%lld m=%.1f density=%.4f\n", s.name,
              static_cast<long long>(T), static_cast<long long>(d), static_cast<long long>(Nr),
              static_cast<long long>(Nc), static_cast<long long>(K), static_cast<long long>(P),
              m, static_cast<double>(K) / N);
  print_group_stats(idx_host, T, K, Nr, Nc);
  const double fwd_flop = 4.0 * P * d, bwd_flop = 8.0 * P * d;
  const double fwd_bytes = 2.0 * N * d * 2 + 2.0 * T * d * 2 + P * 12.0;  // tables once
  const double fwd_floor_ms =
      std::max(fwd_bytes / (copy * 1e9), fwd_flop / (gemm_rate * 1e12)) * 1e3;
  const double dense_ms = 2.0 * 2.0 * T * N * d / (gemm_rate * 1e12) * 1e3;
  std::printf("  floor fwd %.3f ms (tables once at copy rate, or the FLOPs at the GEMM rate); "
              "dense-masked fwd at the GEMM rate %.3f ms\n",
              fwd_floor_ms, dense_ms);

  const int reps = 10;
  for (const char* path : {"tiled", "gather"}) {
    setenv("OMNIMOE_EXPERTS_PATH", path, 1);
    for (bool deterministic : {true, false}) {
      if (std::string(path) == "gather" && !deterministic) continue;
      Exec ex = e;
      ex.deterministic = deterministic;
      DeviceBuffer fw(experts_forward_workspace_bytes(cfg, T, DType::bf16, ex));
      DeviceBuffer bw(experts_backward_workspace_bytes(cfg, T, DType::bf16, ex));
      const int r = std::string(path) == "gather" && K >= 4096 ? 3 : reps;
      const double f_ms = median_ms(
          [&] {
            experts_forward(cfg, x.view(), w, idx.view(), gates.view(), y.view(), false,
                            preact.view(), fw.buffer(), ex);
          },
          2, r, stream.get());
      const double b_ms = median_ms(
          [&] {
            experts_backward(cfg, x.view(), w, idx.view(), gates.view(), preact.view(), sched,
                             dy.view(), dx.view(), false, g, dgates.view(), bw.buffer(), ex);
          },
          2, r, stream.get());
      std::printf("  %-6s %-13s fwd %8.3f ms (%6.1f TFLOP/s useful, %5.2fx floor) | bwd %8.3f ms "
                  "(%6.1f TFLOP/s) | fwd+bwd %8.3f ms\n",
                  path, deterministic ? "deterministic" : "fp32-atomics", f_ms,
                  fwd_flop / (f_ms * 1e-3) / 1e12, f_ms / fwd_floor_ms, b_ms,
                  bwd_flop / (b_ms * 1e-3) / 1e12, f_ms + b_ms);
      std::fflush(stdout);
    }
  }
  // Stage breakdown of one tiled call each, in both reductions.
  setenv("OMNIMOE_EXPERTS_PATH", "tiled", 1);
  setenv("OMNIMOE_TILED_TIMING", "1", 1);
  DeviceBuffer fws(experts_forward_workspace_bytes(cfg, T, DType::bf16, e));
  DeviceBuffer bws(experts_backward_workspace_bytes(cfg, T, DType::bf16, e));
  for (bool deterministic : {true, false}) {
    Exec ex = e;
    ex.deterministic = deterministic;
    std::fprintf(stderr, "  stages (%s):\n", deterministic ? "deterministic" : "fp32-atomics");
    experts_forward(cfg, x.view(), w, idx.view(), gates.view(), y.view(), false,
                    preact.view(), fws.buffer(), ex);
    experts_backward(cfg, x.view(), w, idx.view(), gates.view(), preact.view(), sched,
                     dy.view(), dx.view(), false, g, dgates.view(), bws.buffer(), ex);
    stream.synchronize();
  }
  unsetenv("OMNIMOE_TILED_TIMING");
  unsetenv("OMNIMOE_EXPERTS_PATH");
}

TEST(ExpertsTiledCudaTiming, DISABLED_paper_shapes) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  cudaDeviceProp prop{};
  OMNIMOE_TEST_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  CudaStream stream;
  double copy = 0;
  {
    const size_t bytes = size_t{1} << 30;
    DeviceBuffer a(bytes), b(bytes);
    OMNIMOE_TEST_CUDA_CHECK(cudaMemset(a.data(), 1, bytes));
    const double ms = median_ms(
        [&] {
          OMNIMOE_TEST_CUDA_CHECK(cudaMemcpyAsync(b.data(), a.data(), bytes,
                                                  cudaMemcpyDeviceToDevice, stream.get()));
        },
        2, 10, stream.get());
    copy = 2.0 * bytes / (ms * 1e-3) / 1e9;
  }
  const double gemm8k = gemm_tflops(8192, 8192, 8192, stream.get());
  const double gemm_masked = gemm_tflops(4096, 102400, 1024, stream.get());
  std::printf("device %s: copy %.0f GB/s (read + write); cuBLASLt bf16 GEMM 8192^3 %.0f "
              "TFLOP/s, 4096x102400x1024 (dense-masked half) %.0f TFLOP/s\n",
              prop.name, copy, gemm8k, gemm_masked);
  const char* only = std::getenv("OMNIMOE_TILED_SHAPES");
  const Shape shapes[] = {
      {"paper-k512-t4k", 4096, 1024, 320, 320, 512},
      {"paper-k512-t16k", 16384, 1024, 320, 320, 512},
      {"paper-k4096-t4k", 4096, 1024, 320, 320, 4096},
      {"N102k-k128-t4k", 4096, 1024, 320, 320, 128},
  };
  for (const Shape& s : shapes) {
    if (only && std::string(only).find(s.name) == std::string::npos) continue;
    time_shape(s, copy, gemm_masked);
  }
}

}  // namespace
}  // namespace omnimoe::test
