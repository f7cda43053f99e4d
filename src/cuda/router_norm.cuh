// Per-logit statistics over the tokens for the router's batch norm, forward and backward. The
// row and column logits are two dense f32 matrices [T, N_r] and [T, N_c], treated as one set of
// N_r + N_c columns. Reductions run in a fixed order (chunks of tokens, then the chunks in
// order), so results are bitwise repeatable.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace omnimoe::cuda::router_detail {

// Two dense f32 [T, na] and [T, nb] matrices.
struct ColumnPair {
  const float* a;
  int na;
  const float* b;
  int nb;
};

// Workspace of the partial reductions: 2 floats per column per chunk of tokens.
size_t column_partials_bytes(int64_t tokens, int64_t columns);

// The statistics the normalisation uses, f32 [3, N] (N = N_r + N_c columns): mean_hi, mean_lo
// (the fp64 mean as a sum of two floats) and rstd = 1/sqrt(biased var + eps);
// z = ((l - mean_hi) - mean_lo) * rstd is within a few ulp of the CPU's fp64 normalisation.
inline size_t norm_stats_bytes(int64_t columns) {
  return 3 * static_cast<size_t>(columns) * sizeof(float);
}

// Training forward: the statistics over the tokens (fp64 from per-chunk float partials), rstd
// also to rstd_a / rstd_b, and the running stats updated in place (momentum, unbiased variance).
void launch_norm_train_stats(ColumnPair logits, int64_t tokens, float eps, float momentum,
                             float* run_mean_a, float* run_var_a, float* run_mean_b,
                             float* run_var_b, float* stats, float* rstd_a, float* rstd_b,
                             float* partials, cudaStream_t stream);

// Evaluation forward: the same outputs from the running statistics.
void launch_norm_eval_stats(int na, int nb, float eps, const float* run_mean_a,
                            const float* run_var_a, const float* run_mean_b,
                            const float* run_var_b, float* stats, float* rstd_a, float* rstd_b,
                            cudaStream_t stream);

// Backward: sum_dy[c] = sum_t dy[t, c] and sum_dyy[c] = sum_t dy[t, c] * y[t, c] (f32 results of
// fp64 sums of per-chunk float partials).
void launch_norm_grad_sums(ColumnPair dy, ColumnPair y, int64_t tokens, float* sum_dy,
                           float* sum_dyy, float* partials, cudaStream_t stream);

}  // namespace omnimoe::cuda::router_detail
