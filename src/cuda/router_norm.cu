#include "cuda/router_norm.cuh"

#include <algorithm>
#include <cmath>

#include "cuda/cuda_common.cuh"

namespace omnimoe::cuda::router_detail {
namespace {

constexpr int64_t kMinChunk = 256;  // tokens per partial reduction, at least
constexpr int64_t kMaxChunks = 65535;  // the grid's y limit
constexpr int kTileCols = 32;
constexpr int kTileRows = 8;

int64_t chunk_size(int64_t tokens) { return std::max(kMinChunk, ceil_div(tokens, kMaxChunks)); }
int64_t chunk_count(int64_t tokens) { return ceil_div(tokens, chunk_size(tokens)); }

// The column c of the pair (a then b) and its row stride.
__device__ __forceinline__ const float* column_of(const ColumnPair& p, int c, int* ld) {
  if (c < p.na) {
    *ld = p.na;
    return p.a + c;
  }
  *ld = p.nb;
  return p.b + (c - p.na);
}

// Sum of red[0..kTileRows)[tx] in row order.
__device__ __forceinline__ float tile_column_sum(float (*red)[kTileCols + 1], int tx) {
  float s = 0.0f;
#pragma unroll
  for (int r = 0; r < kTileRows; ++r) s += red[r][tx];
  return s;
}

// Per chunk of tokens and column: mean and sum of squared deviations from it (two passes).
__global__ void __launch_bounds__(kTileCols* kTileRows)
    norm_moments_kernel(ColumnPair x, int64_t tokens, int64_t chunk, float* partials) {
  __shared__ float red[kTileRows][kTileCols + 1];
  __shared__ float chunk_mean[kTileCols];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int columns = x.na + x.nb;
  const int c = blockIdx.x * kTileCols + tx;
  const bool valid = c < columns;
  int ld = 0;
  const float* col = valid ? column_of(x, c, &ld) : nullptr;
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t t1 = min(tokens, t0 + chunk);
  float s = 0.0f;
  if (valid) {
    for (int64_t t = t0 + ty; t < t1; t += kTileRows) s += col[t * ld];
  }
  red[ty][tx] = s;
  __syncthreads();
  if (ty == 0) chunk_mean[tx] = tile_column_sum(red, tx) / static_cast<float>(t1 - t0);
  __syncthreads();
  const float mean = chunk_mean[tx];
  float q = 0.0f;
  if (valid) {
    for (int64_t t = t0 + ty; t < t1; t += kTileRows) {
      const float d = col[t * ld] - mean;
      q += d * d;
    }
  }
  red[ty][tx] = q;
  __syncthreads();
  if (ty == 0 && valid) {
    float* p = partials + static_cast<size_t>(blockIdx.y) * 2 * columns;
    p[c] = mean;
    p[columns + c] = tile_column_sum(red, tx);
  }
}

// Chunks combined in order (Chan et al.), in fp64; then rstd and the running statistics.
__global__ void norm_train_finalize_kernel(const float* partials, int64_t chunks, int64_t chunk,
                                           int64_t tokens,
                                           int na, int nb, float eps, float momentum,
                                           float* run_mean_a, float* run_var_a,
                                           float* run_mean_b, float* run_var_b, double* stats,
                                           float* rstd_a, float* rstd_b) {
  const int columns = na + nb;
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= columns) return;
  double n = 0.0, mean = 0.0, m2 = 0.0;
  for (int64_t s = 0; s < chunks; ++s) {
    const double nb_s = static_cast<double>(min(chunk, tokens - s * chunk));
    const float* p = partials + static_cast<size_t>(s) * 2 * columns;
    const double mb = p[c], m2b = p[columns + c];
    const double total = n + nb_s;
    const double delta = mb - mean;
    mean += delta * nb_s / total;
    m2 += m2b + delta * delta * n * nb_s / total;
    n = total;
  }
  const double var_biased = m2 / static_cast<double>(tokens);
  const double var_unbiased = m2 / static_cast<double>(tokens - 1);
  const double rstd = 1.0 / sqrt(var_biased + static_cast<double>(eps));
  stats[c] = mean;
  stats[columns + c] = rstd;
  float* rm = c < na ? run_mean_a + c : run_mean_b + (c - na);
  float* rv = c < na ? run_var_a + c : run_var_b + (c - na);
  (c < na ? rstd_a[c] : rstd_b[c - na]) = static_cast<float>(rstd);
  *rm = static_cast<float>((1.0 - momentum) * static_cast<double>(*rm) + momentum * mean);
  *rv = static_cast<float>((1.0 - momentum) * static_cast<double>(*rv) + momentum * var_unbiased);
}

__global__ void norm_eval_kernel(int na, int nb, float eps, const float* run_mean_a,
                                 const float* run_var_a, const float* run_mean_b,
                                 const float* run_var_b, double* stats, float* rstd_a,
                                 float* rstd_b) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= na + nb) return;
  const bool first = c < na;
  const float m = first ? run_mean_a[c] : run_mean_b[c - na];
  const float v = first ? run_var_a[c] : run_var_b[c - na];
  const double rstd = 1.0 / sqrt(static_cast<double>(v) + static_cast<double>(eps));
  stats[c] = m;
  stats[na + nb + c] = rstd;
  (first ? rstd_a[c] : rstd_b[c - na]) = static_cast<float>(rstd);
}

// Per chunk and column: sum of dy and of dy * y.
__global__ void __launch_bounds__(kTileCols* kTileRows)
    norm_grad_partial_kernel(ColumnPair dy, ColumnPair y, int64_t tokens, int64_t chunk,
                             float* partials) {
  __shared__ float red[kTileRows][kTileCols + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int columns = dy.na + dy.nb;
  const int c = blockIdx.x * kTileCols + tx;
  const bool valid = c < columns;
  int ld = 0, ldy = 0;
  const float* gcol = valid ? column_of(dy, c, &ld) : nullptr;
  const float* ycol = valid ? column_of(y, c, &ldy) : nullptr;
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t t1 = min(tokens, t0 + chunk);
  float s = 0.0f, sy = 0.0f;
  if (valid) {
    for (int64_t t = t0 + ty; t < t1; t += kTileRows) {
      const float g = gcol[t * ld];
      s += g;
      sy += g * ycol[t * ldy];
    }
  }
  red[ty][tx] = s;
  __syncthreads();
  const float total_s = tile_column_sum(red, tx);
  __syncthreads();
  red[ty][tx] = sy;
  __syncthreads();
  if (ty == 0 && valid) {
    float* p = partials + static_cast<size_t>(blockIdx.y) * 2 * columns;
    p[c] = total_s;
    p[columns + c] = tile_column_sum(red, tx);
  }
}

__global__ void norm_grad_finalize_kernel(const float* partials, int64_t chunks, int columns,
                                          float* sum_dy, float* sum_dyy) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= columns) return;
  double s = 0.0, sy = 0.0;
  for (int64_t k = 0; k < chunks; ++k) {
    const float* p = partials + static_cast<size_t>(k) * 2 * columns;
    s += p[c];
    sy += p[columns + c];
  }
  sum_dy[c] = static_cast<float>(s);
  sum_dyy[c] = static_cast<float>(sy);
}

}  // namespace

size_t column_partials_bytes(int64_t tokens, int64_t columns) {
  return static_cast<size_t>(chunk_count(tokens)) * 2 * static_cast<size_t>(columns) *
         sizeof(float);
}

void launch_norm_train_stats(ColumnPair logits, int64_t tokens, float eps, float momentum,
                             float* run_mean_a, float* run_var_a, float* run_mean_b,
                             float* run_var_b, double* stats, float* rstd_a, float* rstd_b,
                             float* partials, cudaStream_t stream) {
  const int columns = logits.na + logits.nb;
  const int64_t chunks = chunk_count(tokens);
  const dim3 grid(static_cast<unsigned>(ceil_div(columns, kTileCols)),
                  static_cast<unsigned>(chunks));
  norm_moments_kernel<<<grid, dim3(kTileCols, kTileRows), 0, stream>>>(
      logits, tokens, chunk_size(tokens), partials);
  OMNIMOE_CUDA_CHECK_LAUNCH("router_forward (batch-norm moments)");
  norm_train_finalize_kernel<<<static_cast<unsigned>(ceil_div(columns, 256)), 256, 0, stream>>>(
      partials, chunks, chunk_size(tokens), tokens, logits.na, logits.nb, eps, momentum, run_mean_a, run_var_a,
      run_mean_b, run_var_b, stats, rstd_a, rstd_b);
  OMNIMOE_CUDA_CHECK_LAUNCH("router_forward (batch-norm statistics)");
}

void launch_norm_eval_stats(int na, int nb, float eps, const float* run_mean_a,
                            const float* run_var_a, const float* run_mean_b,
                            const float* run_var_b, double* stats, float* rstd_a, float* rstd_b,
                            cudaStream_t stream) {
  norm_eval_kernel<<<static_cast<unsigned>(ceil_div(na + nb, 256)), 256, 0, stream>>>(
      na, nb, eps, run_mean_a, run_var_a, run_mean_b, run_var_b, stats, rstd_a, rstd_b);
  OMNIMOE_CUDA_CHECK_LAUNCH("router_forward (batch-norm running statistics)");
}

void launch_norm_grad_sums(ColumnPair dy, ColumnPair y, int64_t tokens, float* sum_dy,
                           float* sum_dyy, float* partials, cudaStream_t stream) {
  const int columns = dy.na + dy.nb;
  const int64_t chunks = chunk_count(tokens);
  const dim3 grid(static_cast<unsigned>(ceil_div(columns, kTileCols)),
                  static_cast<unsigned>(chunks));
  norm_grad_partial_kernel<<<grid, dim3(kTileCols, kTileRows), 0, stream>>>(
      dy, y, tokens, chunk_size(tokens), partials);
  OMNIMOE_CUDA_CHECK_LAUNCH("router_backward (batch-norm gradient sums)");
  norm_grad_finalize_kernel<<<static_cast<unsigned>(ceil_div(columns, 256)), 256, 0, stream>>>(
      partials, chunks, columns, sum_dy, sum_dyy);
  OMNIMOE_CUDA_CHECK_LAUNCH("router_backward (batch-norm gradient totals)");
}

}  // namespace omnimoe::cuda::router_detail
