// CUDA schedule_build against the CPU backend: offsets and pair order equal exactly (a stable
// counting sort has one answer), on outputs poisoned before the run. Selections are random
// distinct ids per token unless a case says otherwise. Cases with tiles x N <= 2^20 (tiles of
// 1024 pairs) take the tile build, the others the radix sort.
#include <omnimoe/omnimoe.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cuda_test_support.h"

namespace omnimoe::test {
namespace {

// The schedule reads only the grid and K; d is any valid size.
LayerConfig schedule_config(int64_t nr, int64_t nc, int64_t k) { return make_config(8, nr, nc, k); }

// K distinct ids per token, uniform over [0, N) (or over [0, span) when span > 0).
HostTensor random_selection(int64_t tokens, int64_t n, int64_t k, uint64_t seed,
                            int64_t span = 0) {
  const int64_t range = span > 0 ? span : n;
  HostTensor idx(DType::i32, {tokens, k});
  std::mt19937_64 rng(seed);
  std::vector<int32_t> pool;
  for (int64_t t = 0; t < tokens; ++t) {
    if (k * 4 >= range) {  // dense: shuffle the range
      pool.resize(static_cast<size_t>(range));
      std::iota(pool.begin(), pool.end(), 0);
      std::shuffle(pool.begin(), pool.end(), rng);
      for (int64_t q = 0; q < k; ++q) idx.set(t * k + q, pool[q]);
    } else {  // sparse: rejection
      std::uniform_int_distribution<int64_t> pick(0, range - 1);
      std::vector<int64_t> chosen;
      while (static_cast<int64_t>(chosen.size()) < k) {
        const int64_t e = pick(rng);
        if (std::find(chosen.begin(), chosen.end(), e) == chosen.end()) chosen.push_back(e);
      }
      for (int64_t q = 0; q < k; ++q) idx.set(t * k + q, static_cast<double>(chosen[q]));
    }
  }
  return idx;
}

void expect_schedule_matches_cpu(const LayerConfig& cfg, const HostTensor& indices) {
  const int64_t tokens = indices.rows(), n = cfg.num_experts(), pairs = tokens * cfg.top_k;
  HostTensor cpu_off(DType::i32, {n + 1}), cpu_order(DType::i32, {pairs});
  cpu_off.poison();
  cpu_order.poison();
  const Exec ce = cpu_exec();
  Scratch cws(ce, schedule_workspace_bytes(cfg, tokens, ce));
  schedule_build(cfg, indices.view(), {cpu_off.view(), cpu_order.view()}, cws.buffer(), ce);

  CudaStream stream;
  const Exec ge = cuda_exec(stream.get());
  DeviceTensor idx(indices), off(cpu_off), order(cpu_order);
  off.poison();
  order.poison();
  Scratch gws(ge, schedule_workspace_bytes(cfg, tokens, ge));
  schedule_build(cfg, idx.view(), {off.view(), order.view()}, gws.buffer(), ge);
  stream.synchronize();
  OMNIMOE_TEST_CUDA_CHECK(cudaGetLastError());

  const HostTensor got_off = off.to_host(), got_order = order.to_host();
  for (int64_t e = 0; e <= n; ++e) {
    ASSERT_EQ(got_off.get(e), cpu_off.get(e)) << "expert_offsets[" << e << "]";
  }
  for (int64_t p = 0; p < pairs; ++p) {
    ASSERT_EQ(got_order.get(p), cpu_order.get(p)) << "pair_order[" << p << "]";
  }
}

struct ScheduleCase {
  int64_t tokens, nr, nc, k;
  int64_t span;  // ids drawn from [0, span) when > 0: experts no token chose
};

class ScheduleCuda : public ::testing::TestWithParam<ScheduleCase> {};

TEST_P(ScheduleCuda, MatchesCpu) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  const ScheduleCase c = GetParam();
  const LayerConfig cfg = schedule_config(c.nr, c.nc, c.k);
  expect_schedule_matches_cpu(cfg, random_selection(c.tokens, cfg.num_experts(), c.k,
                                                    17 + c.tokens + c.k, c.span));
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, ScheduleCuda,
    ::testing::Values(ScheduleCase{257, 19, 23, 7, 0}, ScheduleCase{257, 19, 23, 1, 0},
                      ScheduleCase{33, 19, 23, 437, 0},  // K = N: every expert every token
                      ScheduleCase{1, 1, 1, 1, 0}, ScheduleCase{300, 19, 23, 5, 40},
                      ScheduleCase{4096, 64, 64, 16, 0},  // ref-quickstart: the tile build
                      ScheduleCase{4096, 1024, 1024, 16, 0}, ScheduleCase{512, 320, 320, 512, 0},
                      ScheduleCase{64, 2048, 2048, 64, 0},  // N = 4M experts
                      ScheduleCase{16, 2048, 2048, 8, 1000}),
    [](const auto& info) {
      const ScheduleCase& c = info.param;
      std::string s = "T" + std::to_string(c.tokens) + "_Nr" + std::to_string(c.nr) + "_Nc" +
                      std::to_string(c.nc) + "_K" + std::to_string(c.k);
      if (c.span) s += "_ids_below_" + std::to_string(c.span);
      return s;
    });

// Every token on one expert (K = 1): a single group holding all tokens, in order.
TEST(ScheduleCudaEdge, AllTokensOnOneExpert_T1000_Nr7_Nc9_K1) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  const LayerConfig cfg = schedule_config(7, 9, 1);
  HostTensor idx(DType::i32, {1000, 1});
  idx.fill(41);
  expect_schedule_matches_cpu(cfg, idx);
}

// Every token on one expert across several tiles of the tile build (5000 pairs: the last tile
// partial), and a second expert nobody chose after it.
TEST(ScheduleCudaEdge, AllTokensOnOneExpert_T5000_Nr2_Nc3_K1) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  const LayerConfig cfg = schedule_config(2, 3, 1);
  HostTensor idx(DType::i32, {5000, 1});
  idx.fill(4);
  expect_schedule_matches_cpu(cfg, idx);
}

// T = 0: every offset is 0.
TEST(ScheduleCudaEdge, T0_Nr5_Nc6_K3) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  const LayerConfig cfg = schedule_config(5, 6, 3);
  expect_schedule_matches_cpu(cfg, HostTensor(DType::i32, {0, 3}));
}

}  // namespace
}  // namespace omnimoe::test
