// Host study of the tiled path's grid-line groups (docs/experts-design.md) under router-made
// routing: per token, the top K of r[i] + c[j] with r, c ~ N(0, 1) (batch-normalised logits;
// log-softmax shifts each axis and does not change the order of the sums), pairs assigned to
// grid row i or column j by the kernels' rule. Prints, per product (S = X W^T or Y = A V):
//  - group-major blocks (today's kernels): dense work over useful work, and the fp32 partial
//    rows the token side writes and reads back;
//  - token-tile-major blocks (a CTA owns tau tokens x w columns of y and walks every group that
//    touches them, tau * w = 32768 fp32 accumulators): dense work with rows padded to 16
//    (mma.sync) or 64 (wgmma), and the L2 -> SM bytes of V rows and of sparse coefficients.
// No GPU needed:
//   g++ -O2 -std=c++17 scripts/tiled_groups_sim.cpp -o /tmp/tiled_groups_sim
//   /tmp/tiled_groups_sim 4096 4096      # T K (N = 320 x 320, d = 1024)
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <utility>
#include <vector>

int main(int argc, char** argv) {
  const int T = argc > 1 ? std::atoi(argv[1]) : 4096;
  const int K = argc > 2 ? std::atoi(argv[2]) : 4096;
  constexpr int kNr = 320, kNc = 320, kGroups = kNr + kNc, kSlots = 320;
  constexpr double kD = 1024, kAccumulators = 32768;
  if (T < 1 || K < 1 || K > kNr * kNc) {
    std::fprintf(stderr, "usage: %s T K (1 <= K <= %d)\n", argv[0], kNr * kNc);
    return 2;
  }
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<std::vector<int>> groups_of(T);  // the groups each token has pairs in
  std::vector<float> r(kNr), c(kNc);
  std::vector<int> ri(kNr), ci(kNc), per_row(kNr), per_col(kNc), per_group(kGroups);
  double groups_total = 0;
  for (int t = 0; t < T; ++t) {
    for (auto& v : r) v = normal(rng);
    for (auto& v : c) v = normal(rng);
    std::iota(ri.begin(), ri.end(), 0);
    std::iota(ci.begin(), ci.end(), 0);
    std::sort(ri.begin(), ri.end(), [&](int a, int b) { return r[a] > r[b]; });
    std::sort(ci.begin(), ci.end(), [&](int a, int b) { return c[a] > c[b]; });
    // The staircase (a + 1)(b + 1) <= K of sorted ranks holds the top K.
    std::vector<std::pair<float, int>> cand;
    for (int a = 0; a < kNr && a < K; ++a)
      for (int b = 0; b < kNc && static_cast<long long>(a + 1) * (b + 1) <= K; ++b)
        cand.push_back({r[ri[a]] + c[ci[b]], ri[a] * kNc + ci[b]});
    std::nth_element(cand.begin(), cand.begin() + (K - 1), cand.end(),
                     [](const auto& x, const auto& y) { return x.first > y.first; });
    cand.resize(K);
    std::fill(per_row.begin(), per_row.end(), 0);
    std::fill(per_col.begin(), per_col.end(), 0);
    std::fill(per_group.begin(), per_group.end(), 0);
    for (const auto& p : cand) ++per_row[p.second / kNc], ++per_col[p.second % kNc];
    for (const auto& p : cand) {
      const int i = p.second / kNc, j = p.second % kNc;
      ++per_group[per_row[i] >= per_col[j] ? i : kNr + j];  // the kernels' assign_pairs rule
    }
    for (int g = 0; g < kGroups; ++g)
      if (per_group[g] > 0) groups_of[t].push_back(g);
    groups_total += groups_of[t].size();
  }
  const double useful = 2.0 * T * K * kD;  // FLOPs of one product on the pairs alone
  const double block_flops = 2.0 * kSlots * kD;  // per padded row of a block
  std::printf("T = %d, K = %d: %.1f groups per token, %.1f pairs per (token, group)\n", T, K,
              groups_total / T, static_cast<double>(T) * K / groups_total);

  std::vector<long long> tokens_in(kGroups, 0);
  for (const auto& gs : groups_of)
    for (int g : gs) ++tokens_in[g];
  double pad16 = 0, pad128 = 0;
  for (long long n : tokens_in) pad16 += (n + 15) / 16 * 16, pad128 += (n + 127) / 128 * 128;
  std::printf("group-major: %.0f tokens per group; dense / useful %.2f (rows padded to 16), %.2f "
              "(whole tiles of 128); %.0f GFLOP per product; fp32 partial rows written + read "
              "%.2f GB\n",
              groups_total / kGroups, pad16 * block_flops / useful, pad128 * block_flops / useful,
              pad16 * block_flops / 1e9, 2.0 * groups_total * kD * 4 / 1e9);

  std::vector<int> n(kGroups);
  for (int tau : {128, 256, 512, 1024}) {
    if (tau > T) break;
    double blocks = 0, rows = 0, p16 = 0, p64 = 0;
    for (int t0 = 0; t0 < T; t0 += tau) {
      std::fill(n.begin(), n.end(), 0);
      for (int t = t0; t < std::min(T, t0 + tau); ++t)
        for (int g : groups_of[t]) ++n[g];
      for (int v : n) {
        if (v == 0) continue;
        blocks += 1, rows += v, p16 += (v + 15) / 16 * 16, p64 += (v + 63) / 64 * 64;
      }
    }
    const double tiles = (T + tau - 1) / tau, w = kAccumulators / tau;
    std::printf("token tiles of %4d (w = %3.0f): %3.0f of %d groups per tile, %5.1f rows per "
                "block; dense / useful %.2f (pad 16), %.2f (pad 64); V rows %.2f GB, sparse "
                "coefficients (4 B per pair per column slice) %.2f GB\n",
                tau, w, blocks / tiles, kGroups, rows / blocks, p16 * block_flops / useful,
                p64 * block_flops / useful, blocks * kSlots * kD * 2 / 1e9,
                static_cast<double>(T) * K * 4 * (kD / w) / 1e9);
  }
  return 0;
}
