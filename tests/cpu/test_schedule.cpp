// The CPU schedule: every (token, expert) pair exactly once, grouped by expert, tokens ascending
// within a group, against a count of the indices done here.
#include <gtest/gtest.h>
#include <omnimoe/omnimoe.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "test_support.h"

namespace omnimoe::test {
namespace {

// The schedule reads only the grid and K; d is any valid size.
LayerConfig schedule_config(int64_t nr, int64_t nc, int64_t k) { return make_config(8, nr, nc, k); }

// K distinct ids per token, drawn from [0, pool).
HostTensor distinct_indices(int64_t tokens, int64_t k, int64_t pool, uint64_t seed) {
  HostTensor idx(DType::i32, {tokens, k});
  std::mt19937_64 rng(seed);
  std::vector<int32_t> ids(static_cast<size_t>(pool));
  for (int64_t t = 0; t < tokens; ++t) {
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), rng);
    for (int64_t q = 0; q < k; ++q) idx.set(t * k + q, ids[q]);
  }
  return idx;
}

struct ScheduleData {
  HostTensor offsets, order;

  ScheduleData(const LayerConfig& cfg, const HostTensor& indices)
      : offsets(DType::i32, {cfg.num_experts() + 1}), order(DType::i32, {indices.numel()}) {
    offsets.poison();
    order.poison();
    const Exec exec;
    const int64_t tokens = indices.rows();
    std::vector<uint8_t> ws(schedule_workspace_bytes(cfg, tokens, exec));
    schedule_build(cfg, indices.view(), {offsets.view(), order.view()}, {ws.data(), ws.size()},
                   exec);
  }
};

// The schedule's contract, checked element by element.
void expect_valid_schedule(const LayerConfig& cfg, const HostTensor& indices,
                           const ScheduleData& s) {
  const int64_t n = cfg.num_experts(), pairs = indices.numel();
  std::vector<int64_t> count(static_cast<size_t>(n), 0);
  for (int64_t p = 0; p < pairs; ++p) ++count[static_cast<int64_t>(indices.get(p))];
  ASSERT_EQ(s.offsets.get(0), 0);
  std::vector<char> seen(static_cast<size_t>(pairs), 0);
  for (int64_t e = 0; e < n; ++e) {
    const int64_t begin = static_cast<int64_t>(s.offsets.get(e));
    const int64_t end = static_cast<int64_t>(s.offsets.get(e + 1));
    ASSERT_EQ(end - begin, count[e])
        << "expert " << e << " segment [" << begin << ", " << end << ")";
    for (int64_t q = begin; q < end; ++q) {
      const int64_t p = static_cast<int64_t>(s.order.get(q));
      ASSERT_TRUE(p >= 0 && p < pairs) << "slot " << q << ": pair " << p;
      ASSERT_FALSE(seen[p]) << "pair " << p << " twice";
      seen[p] = 1;
      ASSERT_EQ(indices.get(p), e) << "pair " << p << " in the segment of expert " << e;
      if (q > begin) {
        ASSERT_LT(s.order.get(q - 1), p) << "expert " << e << ": pairs not ascending";
      }
    }
  }
  ASSERT_EQ(s.offsets.get(n), pairs);
}

TEST(Schedule, Random_T257_Nr19_Nc23_K7) {
  const LayerConfig cfg = schedule_config(19, 23, 7);
  const HostTensor idx = distinct_indices(257, 7, cfg.num_experts(), 1);
  const ScheduleData s(cfg, idx);
  expect_valid_schedule(cfg, idx, s);
}

// Only experts [0, N/4) chosen: the rest have empty segments at the end offset.
TEST(Schedule, UnchosenExpertsEmpty_T100_Nr8_Nc8_K5) {
  const LayerConfig cfg = schedule_config(8, 8, 5);
  const HostTensor idx = distinct_indices(100, 5, 16, 2);
  const ScheduleData s(cfg, idx);
  expect_valid_schedule(cfg, idx, s);
  for (int64_t e = 16; e <= 64; ++e) EXPECT_EQ(s.offsets.get(e), 500) << "expert " << e;
}

// K = 1 with every token on one expert: one segment holding every pair in token order.
TEST(Schedule, AllTokensOnOneExpert_T300_Nr5_Nc7_K1) {
  const LayerConfig cfg = schedule_config(5, 7, 1);
  HostTensor idx(DType::i32, {300, 1});
  idx.fill(17);
  const ScheduleData s(cfg, idx);
  expect_valid_schedule(cfg, idx, s);
  for (int64_t e = 0; e <= 35; ++e) EXPECT_EQ(s.offsets.get(e), e <= 17 ? 0 : 300);
  for (int64_t p = 0; p < 300; ++p) ASSERT_EQ(s.order.get(p), p);
}

// K = N: every token on every expert, in shuffled order.
TEST(Schedule, KEqualsN_T33_Nr3_Nc4_K12) {
  const LayerConfig cfg = schedule_config(3, 4, 12);
  const HostTensor idx = distinct_indices(33, 12, 12, 3);
  const ScheduleData s(cfg, idx);
  expect_valid_schedule(cfg, idx, s);
  for (int64_t e = 0; e <= 12; ++e) EXPECT_EQ(s.offsets.get(e), 33 * e);
}

// Indices from the router itself.
TEST(Schedule, FromRouter_T64_Nr9_Nc11_K6) {
  const LayerConfig cfg = schedule_config(9, 11, 6);
  HostTensor row_logp(DType::f32, {64, 9}), col_logp(DType::f32, {64, 11});
  row_logp.fill_uniform(4, -5.0, 0.0);
  col_logp.fill_uniform(5, -5.0, 0.0);
  HostTensor idx(DType::i32, {64, 6}), scores(DType::f32, {64, 6});
  router_select_topk(cfg, row_logp.view(), col_logp.view(), idx.view(), scores.view(), {}, Exec{});
  const ScheduleData s(cfg, idx);
  expect_valid_schedule(cfg, idx, s);
}

TEST(Schedule, T0_offsets_zero_Nr4_Nc5_K3) {
  const LayerConfig cfg = schedule_config(4, 5, 3);
  const HostTensor idx(DType::i32, {0, 3});
  const ScheduleData s(cfg, idx);
  for (int64_t e = 0; e <= 20; ++e) EXPECT_EQ(s.offsets.get(e), 0) << "expert " << e;
}

TEST(Schedule, OutOfRangeIndexThrows_T4_Nr3_Nc3_K2) {
  const LayerConfig cfg = schedule_config(3, 3, 2);
  for (int bad : {9, -1}) {
    HostTensor idx = distinct_indices(4, 2, 9, 6);
    idx.set(5, bad);
    EXPECT_THROW(ScheduleData(cfg, idx), Error) << "id " << bad;
  }
}

}  // namespace
}  // namespace omnimoe::test
