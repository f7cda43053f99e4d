// CUDA router against the CPU backend, from the same inputs.
//  - Selection (router_select_topk) from identical f32 log-probs: indices equal, scores bitwise
//    equal, on random inputs, odd and large grids, K = 1 and K = N, heavy ties, rounding ties,
//    non-finite values; both the shared-memory and the global-workspace kernels.
//  - Forward: the logits come from different GEMMs (cuBLAS vs the CPU's loops), so near-ties at
//    the K-th place may order differently by a rounding. Indices are therefore checked by the
//    scores they stand for: each CUDA id, scored with the CPU's log-probs, must equal the CPU's
//    score at that slot within tolerance (and ids are distinct); scores, gates, saved logits,
//    rstd and running statistics are compared elementwise within tolerance.
//  - Backward: both backends get the CPU forward's saved state; dx and the weight gradients are
//    compared with the tolerance policy, atol scaled by the RMS of the expected values (gradients
//    are small, so the absolute floor alone could not fail).
//  - A CUDA graph of router_forward + schedule_build replays to the eager result.
// f64 storage runs the router in fp32 (log-probs, saved logits are f32 by contract), so it is
// held to f32 tolerances.
#include <omnimoe/omnimoe.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "cuda_test_support.h"

namespace omnimoe::test {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// A device output: poisoned (0xFF bytes) on the device before the op runs.
DeviceTensor poisoned_output(DType dt, std::vector<int64_t> shape) {
  HostTensor h(dt, std::move(shape));
  DeviceTensor d(h);
  d.poison();
  return d;
}

// ---------------------------------------------------------------------------------------------
// Selection
// ---------------------------------------------------------------------------------------------

struct SelectData {
  LayerConfig cfg;
  int64_t tokens;
  HostTensor row_logp, col_logp;
  HostTensor cpu_idx, cpu_scores, gpu_idx, gpu_scores;

  SelectData(const LayerConfig& c, int64_t t)
      : cfg(c),
        tokens(t),
        row_logp(DType::f32, {t, c.grid_rows}),
        col_logp(DType::f32, {t, c.grid_cols}) {}

  void run() {
    const int64_t K = cfg.top_k;
    cpu_idx = HostTensor(DType::i32, {tokens, K});
    cpu_scores = HostTensor(DType::f32, {tokens, K});
    cpu_idx.poison();
    cpu_scores.poison();
    const Exec ce = cpu_exec();
    Scratch cws(ce, router_select_workspace_bytes(cfg, tokens, ce));
    router_select_topk(cfg, row_logp.view(), col_logp.view(), cpu_idx.view(), cpu_scores.view(),
                       cws.buffer(), ce);

    CudaStream stream;
    const Exec ge = cuda_exec(stream.get());
    DeviceTensor r(row_logp), c(col_logp);
    DeviceTensor idx = poisoned_output(DType::i32, {tokens, K});
    DeviceTensor sc = poisoned_output(DType::f32, {tokens, K});
    Scratch gws(ge, router_select_workspace_bytes(cfg, tokens, ge));
    router_select_topk(cfg, r.view(), c.view(), idx.view(), sc.view(), gws.buffer(), ge);
    stream.synchronize();
    OMNIMOE_TEST_CUDA_CHECK(cudaGetLastError());
    gpu_idx = idx.to_host();
    gpu_scores = sc.to_host();
  }

  // Same ids in the same order, scores bitwise equal (NaN where the CPU has NaN).
  void expect_equal() const {
    const int64_t K = cfg.top_k;
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t q = 0; q < K; ++q) {
        const int64_t at = t * K + q;
        ASSERT_EQ(gpu_idx.get(at), cpu_idx.get(at))
            << "token " << t << " slot " << q << " (" << cfg.describe() << ")";
        ASSERT_TRUE(same_or_both_nan(gpu_scores.get(at), cpu_scores.get(at)))
            << "token " << t << " slot " << q << ": score " << gpu_scores.get(at) << " vs CPU "
            << cpu_scores.get(at);
      }
    }
  }
};

struct SelectCase {
  int64_t tokens, nr, nc, k;
};

class RouterCudaSelect : public ::testing::TestWithParam<SelectCase> {};

TEST_P(RouterCudaSelect, MatchesCpu) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  const SelectCase c = GetParam();
  SelectData s(router_config(4, c.nr, c.nc, c.k), c.tokens);
  s.row_logp.fill_uniform(11 + c.k, -12.0, -4.0);
  s.col_logp.fill_uniform(13 + c.nr, -12.0, -4.0);
  s.run();
  s.expect_equal();
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, RouterCudaSelect,
    ::testing::Values(SelectCase{257, 19, 23, 7}, SelectCase{257, 19, 23, 1},
                      SelectCase{64, 19, 23, 437}, SelectCase{33, 1, 1, 1},
                      SelectCase{40, 1, 50, 5}, SelectCase{40, 50, 1, 50},
                      SelectCase{40, 3, 200, 150}, SelectCase{40, 200, 3, 150},
                      SelectCase{100, 320, 320, 512}, SelectCase{16, 320, 320, 4096},
                      SelectCase{64, 1024, 1024, 16}, SelectCase{64, 1024, 1024, 256},
                      SelectCase{8, 1024, 1024, 4096},  // global-workspace kernel
                      SelectCase{6, 100, 100, 10000},   // K = N, global-workspace kernel
                      SelectCase{4, 2048, 2048, 4096}),
    [](const auto& info) {
      const SelectCase& c = info.param;
      return "f32_" + shape_name(c.tokens, c.nr, c.nc, c.k);
    });

// The warp-per-token kernel (K <= 31, axes <= 1024): every row layout (4 to 32 values per lane,
// scalar and 16-byte rows), 2 and 4 staircase slots per lane, K = 1, K = 31, K = N, grids of one
// row or one column.
INSTANTIATE_TEST_SUITE_P(
    WarpShapes, RouterCudaSelect,
    ::testing::Values(SelectCase{300, 128, 128, 31}, SelectCase{257, 200, 136, 17},
                      SelectCase{257, 201, 130, 17}, SelectCase{129, 512, 300, 19},
                      SelectCase{129, 1000, 1024, 20}, SelectCase{129, 1023, 1021, 31},
                      SelectCase{200, 1024, 1024, 1}, SelectCase{200, 1024, 1024, 2},
                      SelectCase{64, 1024, 64, 31}, SelectCase{64, 3, 1000, 31},
                      SelectCase{64, 1000, 1, 31}, SelectCase{64, 1, 1024, 31},
                      SelectCase{64, 5, 6, 30}, SelectCase{64, 2, 3, 6}),
    [](const auto& info) {
      const SelectCase& c = info.param;
      return "f32_" + shape_name(c.tokens, c.nr, c.nc, c.k);
    });

// Tokens the warp kernel leaves to its CTA's block algorithm, between ordinary tokens of the same
// CTAs: every value equal; more than 64 row values at the bound; ties inside the staircase;
// rounding ties.
TEST(RouterCudaSelectTies, MixedTokens_T37_Nr1024_Nc1024_K16) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  const int64_t n = 1024, T = 37;
  SelectData s(router_config(4, n, n, 16), T);
  s.row_logp.fill_uniform(41, -12.0, -4.0);
  s.col_logp.fill_uniform(42, -12.0, -4.0);
  for (int64_t t : {1, 2, 9}) {
    for (int64_t i = 0; i < n; ++i) {
      s.row_logp.set(t * n + i, -7.0);
      s.col_logp.set(t * n + i, -6.5);
    }
  }
  for (int64_t i = 0; i < 100; ++i) s.row_logp.set(5 * n + 7 * i + 3, -1.0);
  for (int64_t i = 0; i < 40; ++i) {
    s.row_logp.set(6 * n + 11 * i, -1.0);
    s.col_logp.set(6 * n + 13 * i + 1, -2.0);
  }
  std::mt19937_64 rng(43);
  std::uniform_real_distribution<double> big(-3.0e7, -1.0e7);
  for (int64_t i = 0; i < n; ++i) s.row_logp.set(20 * n + i, big(rng));
  s.run();
  s.expect_equal();
}

// All log-probs equal: every pair ties, so the K smallest ids, in order.
TEST(RouterCudaSelectTies, ConstantLogp_T3_Nr7_Nc9) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  for (int64_t k : {1, 8, 10, 62, 63}) {
    SelectData s(router_config(4, 7, 9, k), 3);
    s.row_logp.fill(-std::log(7.0));
    s.col_logp.fill(-std::log(9.0));
    s.run();
    ASSERT_NO_FATAL_FAILURE(s.expect_equal()) << "K=" << k;
    for (int64_t q = 0; q < k; ++q) ASSERT_EQ(s.gpu_idx.get(q), q) << "K=" << k;
  }
}

// A handful of distinct values: large tie groups cut by the K-th place, for every K.
TEST(RouterCudaSelectTies, FewDistinctValues_T4_Nr13_Nc11_all_K) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  const int64_t nr = 13, nc = 11, T = 4;
  std::mt19937_64 rng(5);
  std::uniform_int_distribution<int> pick(0, 3);
  for (int64_t k = 1; k <= nr * nc; ++k) {
    SelectData s(router_config(4, nr, nc, k), T);
    for (int64_t i = 0; i < T * nr; ++i) s.row_logp.set(i, -0.5 * pick(rng) - 1.0);
    for (int64_t i = 0; i < T * nc; ++i) s.col_logp.set(i, -0.25 * pick(rng) - 2.0);
    s.run();
    ASSERT_NO_FATAL_FAILURE(s.expect_equal()) << "K=" << k;
  }
}

// Ties on a million-expert grid: the tie fallback that scans the grid in id order.
TEST(RouterCudaSelectTies, FewDistinctValues_T16_Nr1024_Nc1024_K16_K256) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(7);
  std::uniform_int_distribution<int> pick(0, 2);
  for (int64_t k : {16, 256}) {
    SelectData s(router_config(4, 1024, 1024, k), 16);
    for (int64_t i = 0; i < s.row_logp.numel(); ++i) s.row_logp.set(i, -1.0 - pick(rng));
    for (int64_t i = 0; i < s.col_logp.numel(); ++i) s.col_logp.set(i, -2.0 - pick(rng));
    // Token 0: every value equal.
    for (int64_t i = 0; i < 1024; ++i) {
      s.row_logp.set(i, -3.0);
      s.col_logp.set(i, -4.0);
    }
    s.run();
    ASSERT_NO_FATAL_FAILURE(s.expect_equal()) << "K=" << k;
  }
}

// Distinct values whose float sums round to equal scores.
TEST(RouterCudaSelectTies, RoundingTies_T8_Nr17_Nc29) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  for (int64_t k : {1, 5, 40, 200, 493}) {
    SelectData s(router_config(4, 17, 29, k), 8);
    s.row_logp.fill_uniform(21, -3.0e7, -1.0e7);
    s.col_logp.fill_uniform(22, -4.0, 0.0);
    s.run();
    ASSERT_NO_FATAL_FAILURE(s.expect_equal()) << "K=" << k;
  }
}

// Rounding ties on a large grid: the tie at the K-th place may sit outside the top K of an axis.
TEST(RouterCudaSelectTies, RoundingTies_T32_Nr1024_Nc64_K16) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  SelectData s(router_config(4, 1024, 64, 16), 32);
  s.row_logp.fill_uniform(23, -4.0, 0.0);
  s.col_logp.fill_uniform(24, -3.0e7, -1.0e7);
  s.run();
  s.expect_equal();
}

// NaN ranks as -inf; +inf + -inf is NaN and ranks as -inf; the scores keep the NaN.
TEST(RouterCudaSelectNonFinite, NaN_inf_T40_Nr9_Nc12) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  for (int64_t k : {1, 6, 50, 108}) {
    SelectData s(router_config(4, 9, 12, k), 40);
    fill_non_finite_logp(s.row_logp, s.col_logp, 31);
    s.run();
    ASSERT_NO_FATAL_FAILURE(s.expect_equal()) << "K=" << k;
  }
}

// Signed zeros compare equal, so they tie and the smaller id wins.
TEST(RouterCudaSelectTies, SignedZeros_T2_Nr5_Nc4_K6) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  SelectData s(router_config(4, 5, 4, 6), 2);
  for (int64_t i = 0; i < s.row_logp.numel(); ++i) s.row_logp.set(i, (i % 2) ? -0.0 : 0.0);
  for (int64_t i = 0; i < s.col_logp.numel(); ++i) s.col_logp.set(i, (i % 3) ? 0.0 : -0.0);
  s.run();
  s.expect_equal();
}

TEST(RouterCudaSelect, T0_Nr5_Nc6_K3) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  SelectData s(router_config(4, 5, 6, 3), 0);
  s.run();
  EXPECT_EQ(s.gpu_idx.numel(), 0);
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

struct ForwardCase {
  DType dtype;
  int64_t tokens, hidden, nr, nc, k;
  Gating gating;
  RouterNorm norm;
  bool training;
  int64_t padding;  // extra elements per row of x and the weights
};

std::string forward_name(const ForwardCase& c) {
  std::string s = std::string(dtype_name(c.dtype)) + "_" + shape_name(c.tokens, c.nr, c.nc, c.k) +
                  "_d" + std::to_string(c.hidden) + "_" + gating_name(c.gating) + "_norm_" +
                  router_norm_name(c.norm) + (c.training ? "_train" : "_eval");
  if (c.padding) s += "_pad" + std::to_string(c.padding);
  return s;
}

// The tolerance dtype of router outputs: the router runs in fp32 for f64 storage.
DType tolerance_dtype(DType dt) { return dt == DType::f64 ? DType::f32 : dt; }

// Random inputs and outputs of one router_forward, mirrored on both backends.
struct ForwardData {
  LayerConfig cfg;
  DType dtype;
  int64_t tokens;
  MirroredTensor x, wr, wc;
  MirroredTensor row_mean, row_var, col_mean, col_var;
  MirroredTensor indices, scores, gates, row_logits, col_logits, row_rstd, col_rstd;

  static MirroredTensor vec(int64_t n, uint64_t seed, double lo, double hi) {
    return MirroredTensor(make_random(DType::f32, {n}, seed, 0, lo, hi));
  }
  static MirroredTensor poisoned(DType dt, std::vector<int64_t> shape) {
    HostTensor h(dt, std::move(shape));
    h.poison();
    MirroredTensor m(std::move(h));
    m.device.poison();
    return m;
  }

  ForwardData(const LayerConfig& c, DType dt, int64_t t, int64_t padding, uint64_t seed)
      : cfg(c),
        dtype(dt),
        tokens(t),
        // Weights U(-3/sqrt(d), 3/sqrt(d)): logits of unit scale, so BN's rstd is about 1.
        x(make_random(dt, {t, c.hidden}, seed, padding)),
        wr(make_random(dt, {c.grid_rows, c.hidden}, seed + 1, padding,
                       -3.0 / std::sqrt(double(c.hidden)), 3.0 / std::sqrt(double(c.hidden)))),
        wc(make_random(dt, {c.grid_cols, c.hidden}, seed + 2, padding,
                       -3.0 / std::sqrt(double(c.hidden)), 3.0 / std::sqrt(double(c.hidden)))),
        row_mean(vec(c.grid_rows, seed + 3, -0.5, 0.5)),
        row_var(vec(c.grid_rows, seed + 4, 0.5, 1.5)),
        col_mean(vec(c.grid_cols, seed + 5, -0.5, 0.5)),
        col_var(vec(c.grid_cols, seed + 6, 0.5, 1.5)),
        indices(poisoned(DType::i32, {t, c.top_k})),
        scores(poisoned(DType::f32, {t, c.top_k})),
        gates(poisoned(DType::f32, {t, c.top_k})),
        row_logits(poisoned(DType::f32, {t, c.grid_rows})),
        col_logits(poisoned(DType::f32, {t, c.grid_cols})),
        row_rstd(poisoned(DType::f32, {c.grid_rows})),
        col_rstd(poisoned(DType::f32, {c.grid_cols})) {}

  RouterWeights weights(const Exec& e) const { return {wr.view(e), wc.view(e)}; }
  RouterNormState norm(const Exec& e) const {
    return {row_mean.view(e), row_var.view(e), col_mean.view(e), col_var.view(e)};
  }
  RouterOutputs outputs(const Exec& e) const {
    return {indices.view(e), scores.view(e), gates.view(e)};
  }
  RouterSaved saved(const Exec& e) const {
    RouterSaved s{row_logits.view(e), col_logits.view(e), {}, {}};
    if (cfg.router_norm == RouterNorm::batch) {
      s.row_rstd = row_rstd.view(e);
      s.col_rstd = col_rstd.view(e);
    }
    return s;
  }

  void run(const Exec& e, bool training) {
    Scratch ws(e, router_forward_workspace_bytes(cfg, tokens, dtype, e));
    router_forward(cfg, x.view(e), weights(e), norm(e), training, outputs(e), saved(e),
                   ws.buffer(), e);
  }
};

// log_softmax of each row of the CPU's saved logits, in fp64.
std::vector<double> log_softmax_rows(const HostTensor& z) {
  const int64_t rows = z.rows(), n = z.cols();
  std::vector<double> out(static_cast<size_t>(rows * n));
  for (int64_t t = 0; t < rows; ++t) {
    double m = -kInf;
    for (int64_t j = 0; j < n; ++j) m = std::max(m, z.at(t, j));
    double s = 0;
    for (int64_t j = 0; j < n; ++j) s += std::exp(z.at(t, j) - m);
    for (int64_t j = 0; j < n; ++j) out[t * n + j] = z.at(t, j) - m - std::log(s);
  }
  return out;
}

// CUDA ids: distinct per token, in range, and each one's score under the CPU's log-probs equal to
// the CPU's score at the same slot within tolerance. Returns the fraction of ids equal to the
// CPU's.
double expect_equivalent_selection(const ForwardData& f, const HostTensor& gpu_idx, Tolerance tol) {
  const LayerConfig& cfg = f.cfg;
  const int64_t K = cfg.top_k, nc = cfg.grid_cols, N = cfg.num_experts();
  const std::vector<double> lr = log_softmax_rows(f.row_logits.host);
  const std::vector<double> lc = log_softmax_rows(f.col_logits.host);
  int64_t same = 0;
  for (int64_t t = 0; t < f.tokens; ++t) {
    std::set<int64_t> seen;
    for (int64_t q = 0; q < K; ++q) {
      const double e = gpu_idx.get(t * K + q);
      EXPECT_TRUE(e >= 0 && e < N) << "token " << t << " slot " << q << ": id " << e;
      if (!(e >= 0 && e < N)) return 0;
      const int64_t id = static_cast<int64_t>(e);
      EXPECT_TRUE(seen.insert(id).second) << "token " << t << ": id " << id << " twice";
      if (id == static_cast<int64_t>(f.indices.host.get(t * K + q))) {
        ++same;
        continue;
      }
      const double want = f.scores.host.get(t * K + q);
      const double got = lr[t * cfg.grid_rows + id / nc] + lc[t * nc + id % nc];
      EXPECT_LE(std::fabs(got - want), tol.atol + tol.rtol * std::fabs(want))
          << "token " << t << " slot " << q << ": CUDA id " << id << " scores " << got
          << " under the CPU's log-probs, the CPU's id "
          << f.indices.host.get(t * K + q) << " scores " << want;
    }
  }
  return f.tokens * K == 0 ? 1.0 : double(same) / double(f.tokens * K);
}

class RouterCudaForward : public ::testing::TestWithParam<ForwardCase> {};

TEST_P(RouterCudaForward, MatchesCpu) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  const ForwardCase c = GetParam();
  const LayerConfig cfg = router_config(c.hidden, c.nr, c.nc, c.k, c.gating, c.norm);
  ForwardData f(cfg, c.dtype, c.tokens, c.padding, 100 + c.k);
  run_on_cpu_and_cuda([&](const Exec& e) { f.run(e, c.training); });

  const DType td = tolerance_dtype(c.dtype);
  const Tolerance logit_tol = tolerance_for(td, c.hidden);
  expect_close(f.row_logits.fetch(), f.row_logits.host, logit_tol, "saved.row_logits");
  expect_close(f.col_logits.fetch(), f.col_logits.host, logit_tol, "saved.col_logits");
  if (c.norm == RouterNorm::batch) {
    expect_close(f.row_rstd.fetch(), f.row_rstd.host, logit_tol, "saved.row_rstd");
    expect_close(f.col_rstd.fetch(), f.col_rstd.host, logit_tol, "saved.col_rstd");
    expect_close(f.row_mean.fetch(), f.row_mean.host, logit_tol, "norm.row_mean");
    expect_close(f.row_var.fetch(), f.row_var.host, logit_tol, "norm.row_var");
    expect_close(f.col_mean.fetch(), f.col_mean.host, logit_tol, "norm.col_mean");
    expect_close(f.col_var.fetch(), f.col_var.host, logit_tol, "norm.col_var");
  }
  // log-probs sum N logits' errors; scores add two of them.
  const Tolerance score_tol = tolerance_for(td, c.hidden * (c.nr + c.nc));
  expect_close(f.scores.fetch(), f.scores.host, score_tol, "scores");
  expect_close(f.gates.fetch(), f.gates.host, score_tol, "gates");
  const double same = expect_equivalent_selection(f, f.indices.fetch(), score_tol);
  EXPECT_GE(same, 0.9) << "fraction of ids equal to the CPU's";
  if (c.dtype == DType::f32) EXPECT_GE(same, 0.99) << "fraction of ids equal to the CPU's";
}

std::vector<ForwardCase> forward_cases() {
  const Gating sm = Gating::softmax, jt = Gating::joint;
  const RouterNorm bn = RouterNorm::batch, none = RouterNorm::none;
  std::vector<ForwardCase> v;
  for (DType dt : {DType::f32, DType::bf16, DType::f16, DType::f64}) {
    v.push_back({dt, 257, 37, 19, 23, 7, sm, bn, true, 0});
  }
  v.push_back({DType::f32, 257, 37, 19, 23, 7, sm, bn, false, 3});
  v.push_back({DType::bf16, 257, 37, 19, 23, 7, jt, bn, true, 5});
  v.push_back({DType::f32, 257, 37, 19, 23, 7, sm, none, true, 0});
  v.push_back({DType::bf16, 257, 37, 19, 23, 7, jt, none, false, 2});
  v.push_back({DType::f32, 100, 37, 19, 23, 1, sm, bn, true, 0});
  v.push_back({DType::f32, 50, 37, 19, 23, 437, sm, bn, true, 0});
  v.push_back({DType::bf16, 2, 16, 5, 4, 20, sm, bn, true, 0});
  v.push_back({DType::bf16, 300, 64, 1024, 1024, 16, sm, bn, true, 0});
  v.push_back({DType::bf16, 64, 64, 1024, 1024, 256, jt, bn, true, 0});
  v.push_back({DType::bf16, 64, 64, 320, 320, 4096, sm, bn, true, 0});
  // 16-byte rows (batch-norm moments, fused selection) over two chunks of tokens.
  v.push_back({DType::f32, 130, 40, 128, 132, 31, sm, bn, true, 0});
  v.push_back({DType::bf16, 64, 64, 1024, 1024, 16, jt, bn, false, 0});
  // Scalar rows of up to 1024 in the fused selection.
  v.push_back({DType::f32, 100, 48, 1001, 999, 20, sm, none, true, 1});
  // Normalise kernel (16-byte rows, then rows past 1024) with the block selection.
  v.push_back({DType::bf16, 300, 64, 320, 320, 64, sm, bn, true, 0});
  v.push_back({DType::f32, 70, 24, 1500, 30, 40, sm, bn, true, 0});
  return v;
}

INSTANTIATE_TEST_SUITE_P(Cases, RouterCudaForward, ::testing::ValuesIn(forward_cases()),
                         [](const auto& info) { return forward_name(info.param); });

// Training updates the running statistics; a second step and an evaluation step use them.
TEST(RouterCudaForwardNorm, TwoTrainingSteps_then_eval_f32_T50_Nr13_Nc11_K5) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  const LayerConfig cfg = router_config(24, 13, 11, 5);
  ForwardData f(cfg, DType::f32, 50, 0, 7);
  for (bool training : {true, true, false}) {
    run_on_cpu_and_cuda([&](const Exec& e) { f.run(e, training); });
  }
  const Tolerance tol = tolerance_for(DType::f32, 24 * 3);
  expect_close(f.row_mean.fetch(), f.row_mean.host, tol, "norm.row_mean");
  expect_close(f.row_var.fetch(), f.row_var.host, tol, "norm.row_var");
  expect_close(f.col_mean.fetch(), f.col_mean.host, tol, "norm.col_mean");
  expect_close(f.col_var.fetch(), f.col_var.host, tol, "norm.col_var");
  expect_close(f.row_logits.fetch(), f.row_logits.host, tol, "saved.row_logits (eval)");
  expect_close(f.gates.fetch(), f.gates.host, tolerance_for(DType::f32, 24 * 24), "gates (eval)");
}

// Equal logits for every token (W rows equal): all-tie selections through the whole forward
// (training, so the batch statistics of the identical columns are identical too).
void expect_constant_logits_ties(int64_t nr, int64_t nc, int64_t k) {
  for (RouterNorm norm : {RouterNorm::none, RouterNorm::batch}) {
    const LayerConfig cfg = router_config(8, nr, nc, k, Gating::softmax, norm);
    ForwardData f(cfg, DType::f32, 20, 0, 9);
    f.wr.host.fill(0.25);
    f.wc.host.fill(-0.5);
    f.wr.device.copy_from(f.wr.host);
    f.wc.device.copy_from(f.wc.host);
    run_on_cpu_and_cuda([&](const Exec& e) { f.run(e, /*training=*/true); });
    const HostTensor got = f.indices.fetch();
    for (int64_t i = 0; i < got.numel(); ++i) ASSERT_EQ(got.get(i), f.indices.host.get(i));
    for (int64_t q = 0; q < k; ++q) ASSERT_EQ(got.get(q), q);
  }
}

TEST(RouterCudaForwardTies, ConstantLogits_f32_T20_Nr7_Nc9_K10) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  expect_constant_logits_ties(7, 9, 10);
}

// The same through the fused warp kernel on 16-byte rows: every token goes to the block
// algorithm.
TEST(RouterCudaForwardTies, ConstantLogits_f32_T20_Nr256_Nc256_K16) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  expect_constant_logits_ties(256, 256, 16);
}

// A NaN in one token's input: its logits, log-probs and scores are NaN, its ids the K smallest;
// the other tokens are unaffected (router_norm = none keeps tokens independent).
void expect_nan_token_isolated(int64_t nr, int64_t nc, int64_t k) {
  const LayerConfig cfg = router_config(16, nr, nc, k, Gating::softmax, RouterNorm::none);
  ForwardData f(cfg, DType::f32, 12, 0, 21);
  f.x.host.set(3 * 16 + 5, kNaN);
  f.x.device.copy_from(f.x.host);
  run_on_cpu_and_cuda([&](const Exec& e) { f.run(e, /*training=*/false); });
  const HostTensor idx = f.indices.fetch(), sc = f.scores.fetch(), g = f.gates.fetch();
  for (int64_t q = 0; q < k; ++q) {
    EXPECT_EQ(idx.get(3 * k + q), q);
    EXPECT_TRUE(std::isnan(sc.get(3 * k + q)));
    EXPECT_TRUE(std::isnan(g.get(3 * k + q)));
  }
  for (int64_t t = 0; t < 12; ++t) {
    if (t == 3) continue;
    for (int64_t q = 0; q < k; ++q) {
      EXPECT_TRUE(std::isfinite(sc.get(t * k + q))) << "token " << t;
      EXPECT_TRUE(std::isfinite(g.get(t * k + q))) << "token " << t;
    }
  }
  expect_equivalent_selection(f, idx, tolerance_for(DType::f32, 16 * (nr + nc)));
}

TEST(RouterCudaForwardNonFinite, NaN_in_x_f32_T12_Nr9_Nc7_K10) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  expect_nan_token_isolated(9, 7, 10);
}

// The fused warp kernel on 16-byte rows leaves the NaN token to the block algorithm.
TEST(RouterCudaForwardNonFinite, NaN_in_x_f32_T12_Nr256_Nc128_K16) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  expect_nan_token_isolated(256, 128, 16);
}

// T = 0 never reaches the backend: nothing written, running statistics unchanged.
TEST(RouterCudaForwardEdge, T0_f32_Nr5_Nc6_K3) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  const LayerConfig cfg = router_config(8, 5, 6, 3);
  ForwardData f(cfg, DType::f32, 0, 0, 3);
  CudaStream stream;
  f.run(cuda_exec(stream.get()), /*training=*/true);
  stream.synchronize();
  EXPECT_EQ(f.row_mean.fetch().to_vector(), f.row_mean.host.to_vector());
  EXPECT_EQ(f.col_var.fetch().to_vector(), f.col_var.host.to_vector());
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// Within tolerance, atol scaled by the RMS of want; and the relative L2 error within rtol.
void expect_close_scaled(const HostTensor& got, const HostTensor& want, Tolerance tol,
                         const std::string& name) {
  const std::vector<double> g = got.to_vector(), w = want.to_vector();
  ASSERT_EQ(g.size(), w.size()) << name;
  double ss = 0, es = 0;
  for (size_t i = 0; i < w.size(); ++i) {
    ss += w[i] * w[i];
    es += (g[i] - w[i]) * (g[i] - w[i]);
  }
  const double rms = w.empty() ? 0.0 : std::sqrt(ss / double(w.size()));
  ASSERT_GT(rms, 0.0) << name << ": expected values are all zero (the test could not fail)";
  const Comparison c = compare(g, w, Tolerance{tol.rtol, tol.atol * rms});
  EXPECT_LE(c.worst_ratio, 1.0) << name << " (rms " << rms << "): " << c.describe();
  EXPECT_LE(std::sqrt(es / ss), tol.rtol) << name << ": relative L2 error";
}

struct BackwardCase {
  DType dtype;
  int64_t tokens, hidden, nr, nc, k;
  Gating gating;
  RouterNorm norm;
  bool training;
  bool accumulate;
  int64_t padding;
  bool stacked = false;  // weights and their gradients as the row blocks of one matrix each
};

std::string backward_name(const BackwardCase& c) {
  std::string s = std::string(dtype_name(c.dtype)) + "_" + shape_name(c.tokens, c.nr, c.nc, c.k) +
                  "_d" + std::to_string(c.hidden) + "_" + gating_name(c.gating) + "_norm_" +
                  router_norm_name(c.norm) + (c.training ? "_train" : "_eval");
  if (c.accumulate) s += "_accumulate";
  if (c.padding) s += "_pad" + std::to_string(c.padding);
  if (c.stacked) s += "_stacked";
  return s;
}

// The CPU forward's state, mirrored to the device, so both backwards see the same inputs.
MirroredTensor mirror_of(const HostTensor& h) { return MirroredTensor(h); }

class RouterCudaBackward : public ::testing::TestWithParam<BackwardCase> {};

TEST_P(RouterCudaBackward, MatchesCpu) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  const BackwardCase c = GetParam();
  const LayerConfig cfg = router_config(c.hidden, c.nr, c.nc, c.k, c.gating, c.norm);
  const DType dt = c.dtype;
  ForwardData f(cfg, dt, c.tokens, c.padding, 300 + c.k);
  f.run(cpu_exec(), c.training);

  MirroredTensor indices = mirror_of(f.indices.host), gates = mirror_of(f.gates.host);
  MirroredTensor zr = mirror_of(f.row_logits.host), zc = mirror_of(f.col_logits.host);
  MirroredTensor rr = mirror_of(f.row_rstd.host), rc = mirror_of(f.col_rstd.host);
  MirroredTensor scores = mirror_of(f.scores.host);
  MirroredTensor dgates(make_random(DType::f32, {c.tokens, c.k}, 400 + c.k));
  HostTensor dx0(dt, {c.tokens, c.hidden}, c.padding);
  if (c.accumulate) {
    dx0.fill_uniform(500);
  } else {
    dx0.poison();
  }
  MirroredTensor dx(dx0);
  HostTensor gr0(dt, {c.nr, c.hidden}, c.padding), gc0(dt, {c.nc, c.hidden}, c.padding);
  gr0.poison();
  gc0.poison();
  MirroredTensor grow(gr0), gcol(gc0);
  MirroredTensor w_stacked(stack_rows(f.wr.host, f.wc.host)), g_stacked(stack_rows(gr0, gc0));
  if (!c.accumulate) dx.device.poison();
  grow.device.poison();
  gcol.device.poison();
  g_stacked.device.poison();
  auto weights = [&](const Exec& e) {
    if (!c.stacked) return f.weights(e);
    const TensorView w = w_stacked.view(e);
    return RouterWeights{row_block(w, 0, c.nr), row_block(w, c.nr, c.nc)};
  };
  auto grads = [&](const Exec& e) {
    if (!c.stacked) return RouterWeights{grow.view(e), gcol.view(e)};
    const TensorView g = g_stacked.view(e);
    return RouterWeights{row_block(g, 0, c.nr), row_block(g, c.nr, c.nc)};
  };

  run_on_cpu_and_cuda([&](const Exec& e) {
    RouterSaved saved{zr.view(e), zc.view(e), {}, {}};
    if (c.norm == RouterNorm::batch) {
      saved.row_rstd = rr.view(e);
      saved.col_rstd = rc.view(e);
    }
    Scratch ws(e, router_backward_workspace_bytes(cfg, c.tokens, dt, e));
    router_backward(cfg, f.x.view(e), weights(e), c.training, saved,
                    {indices.view(e), scores.view(e), gates.view(e)}, dgates.view(e), dx.view(e),
                    c.accumulate, grads(e), ws.buffer(), e);
  });

  const DType td = tolerance_dtype(dt);
  if (c.stacked) {
    expect_close_scaled(g_stacked.fetch(), g_stacked.host, tolerance_for(td, c.tokens),
                        "grads (stacked)");
  } else {
    expect_close_scaled(grow.fetch(), grow.host, tolerance_for(td, c.tokens), "grads.row");
    expect_close_scaled(gcol.fetch(), gcol.host, tolerance_for(td, c.tokens), "grads.col");
  }
  expect_close_scaled(dx.fetch(), dx.host, tolerance_for(td, c.nr + c.nc), "dx");
}

std::vector<BackwardCase> backward_cases() {
  const Gating sm = Gating::softmax, jt = Gating::joint;
  const RouterNorm bn = RouterNorm::batch, none = RouterNorm::none;
  std::vector<BackwardCase> v;
  for (DType dt : {DType::f32, DType::bf16, DType::f16, DType::f64}) {
    v.push_back({dt, 257, 37, 19, 23, 7, sm, bn, true, false, 0});
  }
  v.push_back({DType::f32, 257, 37, 19, 23, 7, sm, bn, false, false, 0});
  v.push_back({DType::f32, 257, 37, 19, 23, 7, jt, none, true, true, 3});
  v.push_back({DType::bf16, 257, 37, 19, 23, 7, jt, bn, true, true, 2});
  v.push_back({DType::f16, 257, 37, 19, 23, 7, sm, bn, false, true, 1});
  // K = 1 with softmax gating has gate 1 and no gradient at all: joint gating here.
  v.push_back({DType::f32, 100, 37, 19, 23, 1, jt, bn, true, false, 0});
  v.push_back({DType::f32, 50, 37, 19, 23, 437, sm, bn, true, false, 0});
  v.push_back({DType::bf16, 128, 64, 1024, 1024, 16, sm, bn, true, false, 0});
  v.push_back({DType::bf16, 64, 64, 320, 320, 4096, sm, bn, true, true, 0});
  // 16-byte rows in the batch-norm gradient sums, three chunks of tokens.
  v.push_back({DType::f32, 300, 32, 128, 256, 20, sm, bn, true, false, 0});
  // N_r + N_c past the shared-memory accumulators: the global-workspace kernel.
  v.push_back({DType::f32, 40, 16, 6000, 3000, 20, sm, bn, true, false, 0});
  // Stacked weights and gradients: one product for both gradients, the weights used in place
  // (f16 converts them and sums in f32 first).
  for (DType dt : {DType::bf16, DType::f16, DType::f32}) {
    v.push_back({dt, 257, 37, 19, 23, 7, sm, bn, true, true, 2, true});
  }
  return v;
}

INSTANTIATE_TEST_SUITE_P(Cases, RouterCudaBackward, ::testing::ValuesIn(backward_cases()),
                         [](const auto& info) { return backward_name(info.param); });

// T = 0: the weight gradients are overwritten with zeros.
TEST(RouterCudaBackwardEdge, T0_zero_weight_grads_bf16_Nr5_Nc6_K3_pad2) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  const LayerConfig cfg = router_config(8, 5, 6, 3);
  const DType dt = DType::bf16;
  CudaStream stream;
  const Exec e = cuda_exec(stream.get());
  DeviceTensor x(HostTensor(dt, {0, 8})), dx(HostTensor(dt, {0, 8}));
  DeviceTensor wr(make_random(dt, {5, 8}, 1)), wc(make_random(dt, {6, 8}, 2));
  DeviceTensor zr(HostTensor(DType::f32, {0, 5})), zc(HostTensor(DType::f32, {0, 6}));
  DeviceTensor rr(make_random(DType::f32, {5}, 3)), rc(make_random(DType::f32, {6}, 4));
  DeviceTensor idx(HostTensor(DType::i32, {0, 3})), sc(HostTensor(DType::f32, {0, 3}));
  DeviceTensor g(HostTensor(DType::f32, {0, 3})), dg(HostTensor(DType::f32, {0, 3}));
  DeviceTensor grow(HostTensor(dt, {5, 8}, 2)), gcol(HostTensor(dt, {6, 8}, 2));
  grow.poison();
  gcol.poison();
  DeviceBuffer ws(router_backward_workspace_bytes(cfg, 0, dt, e));
  router_backward(cfg, x.view(), {wr.view(), wc.view()}, true,
                  {zr.view(), zc.view(), rr.view(), rc.view()}, {idx.view(), sc.view(), g.view()},
                  dg.view(), dx.view(), false, {grow.view(), gcol.view()}, ws.buffer(), e);
  stream.synchronize();
  for (double v : grow.to_host().to_vector()) ASSERT_EQ(v, 0.0);
  for (double v : gcol.to_host().to_vector()) ASSERT_EQ(v, 0.0);
}

// Bitwise repeatable: the same backward twice gives the same bits (no float atomics).
TEST(RouterCudaBackwardEdge, Deterministic_bf16_T300_Nr64_Nc48_K32) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  const LayerConfig cfg = router_config(40, 64, 48, 32);
  const DType dt = DType::bf16;
  ForwardData f(cfg, dt, 300, 0, 77);
  CudaStream stream;
  const Exec e = cuda_exec(stream.get());
  f.run(e, true);
  DeviceTensor dg(make_random(DType::f32, {300, 32}, 78));
  std::vector<std::vector<double>> results;
  for (int rep = 0; rep < 2; ++rep) {
    DeviceTensor dx(HostTensor(dt, {300, 40})), grow(HostTensor(dt, {64, 40})),
        gcol(HostTensor(dt, {48, 40}));
    DeviceBuffer ws(router_backward_workspace_bytes(cfg, 300, dt, e));
    router_backward(cfg, f.x.device.view(), {f.wr.device.view(), f.wc.device.view()}, true,
                    f.saved(e), f.outputs(e), dg.view(), dx.view(), false,
                    {grow.view(), gcol.view()}, ws.buffer(), e);
    stream.synchronize();
    std::vector<double> all = dx.to_host().to_vector();
    for (double v : grow.to_host().to_vector()) all.push_back(v);
    for (double v : gcol.to_host().to_vector()) all.push_back(v);
    results.push_back(all);
  }
  ASSERT_EQ(results[0].size(), results[1].size());
  for (size_t i = 0; i < results[0].size(); ++i) {
    ASSERT_TRUE(same_or_both_nan(results[0][i], results[1][i])) << "element " << i;
  }
}

// ---------------------------------------------------------------------------------------------
// CUDA graph: router_forward + schedule_build captured once, replayed onto poisoned outputs.
// ---------------------------------------------------------------------------------------------

TEST(RouterCudaGraph, ForwardAndSchedule_replay_matches_eager_bf16_T257_Nr19_Nc23_K7) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  const LayerConfig cfg = router_config(37, 19, 23, 7);
  const DType dt = DType::bf16;
  const int64_t T = 257;
  ForwardData f(cfg, dt, T, 1, 91);
  CudaStream stream;
  const Exec e = cuda_exec(stream.get());
  DeviceTensor offsets = poisoned_output(DType::i32, {cfg.num_experts() + 1});
  DeviceTensor order = poisoned_output(DType::i32, {T * cfg.top_k});
  const size_t ws_bytes = std::max(router_forward_workspace_bytes(cfg, T, dt, e),
                                   schedule_workspace_bytes(cfg, T, e));
  DeviceBuffer ws(ws_bytes);
  auto step = [&] {
    // Evaluation mode: the running statistics are read, not updated, so every replay is equal.
    router_forward(cfg, f.x.device.view(), {f.wr.device.view(), f.wc.device.view()},
                   f.norm(e), /*training=*/false, f.outputs(e), f.saved(e), ws.buffer(), e);
    schedule_build(cfg, f.indices.device.view(), {offsets.view(), order.view()}, ws.buffer(), e);
  };
  step();  // eager: also builds the GEMM plans outside the capture
  stream.synchronize();
  const std::vector<const DeviceTensor*> outs = {&f.indices.device, &f.scores.device,
                                                 &f.gates.device,   &f.row_logits.device,
                                                 &offsets,          &order};
  std::vector<std::vector<double>> eager;
  for (const DeviceTensor* t : outs) eager.push_back(t->to_host().to_vector());

  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  OMNIMOE_TEST_CUDA_CHECK(cudaStreamBeginCapture(stream.get(), cudaStreamCaptureModeGlobal));
  step();
  OMNIMOE_TEST_CUDA_CHECK(cudaStreamEndCapture(stream.get(), &graph));
  OMNIMOE_TEST_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  for (int replay = 0; replay < 2; ++replay) {
    for (const DeviceTensor* t : outs) t->poison();
    OMNIMOE_TEST_CUDA_CHECK(cudaGraphLaunch(exec, stream.get()));
    stream.synchronize();
    for (size_t i = 0; i < outs.size(); ++i) {
      const std::vector<double> got = outs[i]->to_host().to_vector();
      ASSERT_EQ(got.size(), eager[i].size());
      for (size_t j = 0; j < got.size(); ++j) {
        ASSERT_TRUE(same_or_both_nan(got[j], eager[i][j]))
            << "output " << i << " element " << j << " replay " << replay;
      }
    }
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
}

// ---------------------------------------------------------------------------------------------
// The bucket kernel (K >= 32, or axes past 1024): K just above 31, K not a power of two, K = N,
// axes of different lengths, axes past 1024 with small K (tokens whose region spills go to the
// block algorithm).
// ---------------------------------------------------------------------------------------------

INSTANTIATE_TEST_SUITE_P(
    BucketShapes, RouterCudaSelect,
    ::testing::Values(SelectCase{64, 320, 320, 32}, SelectCase{50, 37, 23, 33},
                      SelectCase{40, 7, 300, 100}, SelectCase{40, 300, 7, 2099},
                      SelectCase{30, 320, 320, 1000}, SelectCase{20, 45, 47, 45 * 47},
                      SelectCase{20, 2048, 64, 48}, SelectCase{20, 1500, 30, 1},
                      SelectCase{20, 30, 1500, 5}, SelectCase{16, 200, 3000, 777},
                      SelectCase{130, 320, 320, 4095}, SelectCase{33, 1024, 1024, 64}),
    [](const auto& info) {
      const SelectCase& c = info.param;
      return "f32_" + shape_name(c.tokens, c.nr, c.nc, c.k);
    });

// Few distinct values: tie groups at tau that the candidates settle or leave to the block
// algorithm, for K from 32 to N.
TEST(RouterCudaSelectTies, FewDistinctValues_T6_Nr40_Nc37_K32_to_N) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  const int64_t nr = 40, nc = 37, T = 6;
  std::mt19937_64 rng(17);
  std::uniform_int_distribution<int> pick(0, 5);
  const int64_t ks[] = {32, 33, 64, 100, 511, 777, 1400, nr * nc};
  for (int64_t k : ks) {
    SelectData s(router_config(4, nr, nc, k), T);
    for (int64_t i = 0; i < T * nr; ++i) s.row_logp.set(i, -0.5 * pick(rng) - 1.0);
    for (int64_t i = 0; i < T * nc; ++i) s.col_logp.set(i, -0.25 * pick(rng) - 2.0);
    s.run();
    ASSERT_NO_FATAL_FAILURE(s.expect_equal()) << "K=" << k;
  }
}

// Rounding ties (distinct values, equal float sums) at the K-th place, on grids the bucket kernel
// takes: pairs past a row's cap or outside the region may tie with tau.
TEST(RouterCudaSelectTies, RoundingTies_T16_Nr300_Nc40_K32_K500) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  for (int64_t k : {32, 40, 500}) {
    SelectData s(router_config(4, 300, 40, k), 16);
    s.row_logp.fill_uniform(25, -4.0, 0.0);
    s.col_logp.fill_uniform(26, -3.0e7, -1.0e7);
    s.run();
    ASSERT_NO_FATAL_FAILURE(s.expect_equal()) << "K=" << k;
    SelectData u(router_config(4, 40, 300, k), 16);
    u.row_logp.fill_uniform(27, -3.0e7, -1.0e7);
    u.col_logp.fill_uniform(28, -4.0, 0.0);
    u.run();
    ASSERT_NO_FATAL_FAILURE(u.expect_equal()) << "K=" << k << " (transposed)";
  }
}

// Tokens with ties between ordinary tokens in one launch: the ones the bucket kernel leaves and
// the ones it settles are both written.
TEST(RouterCudaSelectTies, MixedTokens_T41_Nr320_Nc320_K512) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  const int64_t n = 320, T = 41;
  SelectData s(router_config(4, n, n, 512), T);
  s.row_logp.fill_uniform(51, -12.0, -4.0);
  s.col_logp.fill_uniform(52, -12.0, -4.0);
  for (int64_t t : {0, 7, 40}) {
    for (int64_t i = 0; i < n; ++i) {
      s.row_logp.set(t * n + i, -7.0);
      s.col_logp.set(t * n + i, -6.5);
    }
  }
  for (int64_t i = 0; i < n; ++i) s.row_logp.set(13 * n + i, -1.0 - (i % 3));
  std::mt19937_64 rng(53);
  std::uniform_real_distribution<double> big(-3.0e7, -1.0e7);
  for (int64_t i = 0; i < n; ++i) s.row_logp.set(20 * n + i, big(rng));
  s.run();
  s.expect_equal();
}

// More tokens than the grid that finishes the left ones: tokens with ties in several of its
// CTAs, and more than one in a CTA.
TEST(RouterCudaSelectTies, MixedTokens_T700_Nr40_Nc37_K64) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  const int64_t nr = 40, nc = 37, T = 700;
  SelectData s(router_config(4, nr, nc, 64), T);
  s.row_logp.fill_uniform(61, -12.0, -4.0);
  s.col_logp.fill_uniform(62, -12.0, -4.0);
  for (int64_t t : {0, 3, 255, 256, 257, 300, 511, 512, 699}) {
    for (int64_t i = 0; i < nr; ++i) s.row_logp.set(t * nr + i, -7.0 - (i % 2));
    for (int64_t j = 0; j < nc; ++j) s.col_logp.set(t * nc + j, -6.5);
  }
  s.run();
  s.expect_equal();
}

// NaN ranks as -inf, +inf + -inf is NaN: candidates at -inf and non-finite sums at tau.
TEST(RouterCudaSelectNonFinite, NaN_inf_T40_Nr45_Nc50_K32_to_N) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  for (int64_t k : {32, 200, 1000, 2250}) {
    SelectData s(router_config(4, 45, 50, k), 40);
    fill_non_finite_logp(s.row_logp, s.col_logp, 37);
    s.run();
    ASSERT_NO_FATAL_FAILURE(s.expect_equal()) << "K=" << k;
  }
}

// The bucket kernel's gates for a NaN token (all ties at -inf) and finite ones.
TEST(RouterCudaForwardNonFinite, NaN_in_x_f32_T12_Nr64_Nc48_K40) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  expect_nan_token_isolated(64, 48, 40);
}

}  // namespace
}  // namespace omnimoe::test
