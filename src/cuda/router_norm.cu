#include "cuda/router_norm.cuh"

#include <algorithm>
#include <cmath>

#include "cuda/cuda_common.cuh"
#include "cuda/router_common.cuh"

namespace omnimoe::cuda::router_detail {
namespace {

// A CTA reduces a tile of kChunk tokens by kTileLanes * kWidth columns of one matrix: thread
// (tx, ty) reads kWidth adjacent columns (a float4 when kWidth = 4) of the rows ty, ty + 8, ...,
// all of them before the first use (one pass over memory, many loads in flight), then the
// kTileRows threads of a column are summed in order through shared memory. Chunks along grid x
// (any number of tokens), column tiles along grid y.
constexpr int kChunk = 128;
constexpr int kTileLanes = 32;
constexpr int kTileRows = 8;
constexpr int kRowsPerThread = kChunk / kTileRows;

int64_t chunk_count(int64_t tokens) { return ceil_div(tokens, kChunk); }

template <int kWidth>
int column_tiles(int n) {
  return static_cast<int>(ceil_div(n, kTileLanes * kWidth));
}

// Where a thread's columns are: the matrix, its row stride, the first column in the matrix and
// in the pair's numbering (a's columns, then b's).
struct TileColumns {
  const float* base;
  int ld, col, pair_col;
};

template <int kWidth>
__device__ __forceinline__ TileColumns tile_columns(const ColumnPair& p, int tiles_a) {
  const bool in_a = static_cast<int>(blockIdx.y) < tiles_a;
  const int tile = in_a ? blockIdx.y : blockIdx.y - tiles_a;
  const int col = (tile * kTileLanes + static_cast<int>(threadIdx.x)) * kWidth;
  return {in_a ? p.a : p.b, in_a ? p.na : p.nb, col, in_a ? col : p.na + col};
}

// kWidth floats of row `row` from column c (kWidth = 4: one aligned float4).
template <int kWidth>
__device__ __forceinline__ void load_columns(const float* base, int64_t row, int ld, int c,
                                             float (&v)[kWidth]) {
  load_floats<kWidth>(base + row * ld + c, v);
}

// Sums red[0..kTileRows)[c] in row order.
template <int kCols>
__device__ __forceinline__ float rows_sum(const float (*red)[kCols + 1], int c) {
  float s = 0.0f;
#pragma unroll
  for (int r = 0; r < kTileRows; ++r) s += red[r][c];
  return s;
}

// Per chunk of tokens and column: the chunk's mean and the sum of squared deviations from it.
// The chunk's values stay in registers between the two.
template <int kWidth>
__global__ void __launch_bounds__(kTileLanes* kTileRows)
    norm_moments_kernel(ColumnPair x, int64_t tokens, int tiles_a, float* partials) {
  kernel_prologue();
  constexpr int kCols = kTileLanes * kWidth;
  __shared__ float red[kTileRows][kCols + 1];
  __shared__ float chunk_mean[kCols];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const TileColumns tc = tile_columns<kWidth>(x, tiles_a);
  const bool valid = tc.col < tc.ld;  // kWidth = 4: the row length is a multiple of 4
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kChunk;
  const int rows = static_cast<int>(min(static_cast<int64_t>(kChunk), tokens - t0));
  float v[kRowsPerThread][kWidth];
#pragma unroll
  for (int r = 0; r < kRowsPerThread; ++r) {
    const int row = ty + r * kTileRows;
    if (valid && row < rows) {
      load_columns<kWidth>(tc.base, t0 + row, tc.ld, tc.col, v[r]);
    } else {
#pragma unroll
      for (int c = 0; c < kWidth; ++c) v[r][c] = 0.0f;
    }
  }
#pragma unroll
  for (int c = 0; c < kWidth; ++c) {
    float s = 0.0f;
#pragma unroll
    for (int r = 0; r < kRowsPerThread; ++r) s += v[r][c];  // rows past the chunk hold 0
    red[ty][tx * kWidth + c] = s;
  }
  __syncthreads();
  if (ty == 0) {
#pragma unroll
    for (int c = 0; c < kWidth; ++c) {
      chunk_mean[tx * kWidth + c] =
          rows_sum<kCols>(red, tx * kWidth + c) / static_cast<float>(rows);
    }
  }
  __syncthreads();
  float q[kWidth];
#pragma unroll
  for (int c = 0; c < kWidth; ++c) {
    const float mean = chunk_mean[tx * kWidth + c];
    float s = 0.0f;
#pragma unroll
    for (int r = 0; r < kRowsPerThread; ++r) {
      const float d = v[r][c] - mean;
      if (ty + r * kTileRows < rows) s += d * d;
    }
    q[c] = s;
  }
  // Every thread has read red (for chunk_mean, by ty == 0) before the barrier above.
#pragma unroll
  for (int c = 0; c < kWidth; ++c) red[ty][tx * kWidth + c] = q[c];
  __syncthreads();
  if (ty == 0 && valid) {
    const int columns = x.na + x.nb;
    float* p = partials + static_cast<size_t>(blockIdx.x) * 2 * columns;
#pragma unroll
    for (int c = 0; c < kWidth; ++c) {
      p[tc.pair_col + c] = chunk_mean[tx * kWidth + c];
      p[columns + tc.pair_col + c] = rows_sum<kCols>(red, tx * kWidth + c);
    }
  }
}

// The final reductions over the chunks: a CTA per 32 columns, its kFinalWarps warps take the
// chunks w, w + kFinalWarps, ... (loads in flight together), then the warps' sums in order.
constexpr int kFinalWarps = 8;

// Sum over the CTA's warps of one value per (warp, lane), in warp order, to every thread.
__device__ __forceinline__ double warps_sum(double v, double (*red)[33]) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  __syncthreads();  // red's previous use is over
  red[w][lane] = v;
  __syncthreads();
  double s = 0.0;
#pragma unroll
  for (int r = 0; r < kFinalWarps; ++r) s += red[r][lane];
  return s;
}

__device__ __forceinline__ double chunk_rows(int64_t s, int64_t tokens) {
  return static_cast<double>(min(static_cast<int64_t>(kChunk), tokens - s * kChunk));
}

// The chunks combined in fp64: mean = sum(n_s mean_s) / T, then m2 = sum(m2_s + n_s (mean_s -
// mean)^2); the statistics (router_norm.cuh) and the running statistics.
__global__ void __launch_bounds__(kFinalWarps * 32)
    norm_train_finalize_kernel(const float* partials, int64_t chunks, int64_t tokens, int na,
                               int nb, float eps, float momentum, float* run_mean_a,
                               float* run_var_a, float* run_mean_b, float* run_var_b,
                               float* stats, float* rstd_a, float* rstd_b) {
  kernel_prologue();
  __shared__ double red[kFinalWarps][33];
  const int columns = na + nb;
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int c = blockIdx.x * 32 + lane;
  const bool valid = c < columns;
  double sum = 0.0;
  if (valid) {
#pragma unroll 4
    for (int64_t s = w; s < chunks; s += kFinalWarps) {
      sum += chunk_rows(s, tokens) *
             static_cast<double>(partials[static_cast<size_t>(s) * 2 * columns + c]);
    }
  }
  const double mean = warps_sum(sum, red) / static_cast<double>(tokens);
  double m2 = 0.0;
  if (valid) {
#pragma unroll 4
    for (int64_t s = w; s < chunks; s += kFinalWarps) {
      const float* p = partials + static_cast<size_t>(s) * 2 * columns;
      const double d = static_cast<double>(p[c]) - mean;
      m2 += static_cast<double>(p[columns + c]) + chunk_rows(s, tokens) * d * d;
    }
  }
  m2 = warps_sum(m2, red);
  if (w != 0 || !valid) return;
  const double var_biased = m2 / static_cast<double>(tokens);
  const double var_unbiased = m2 / static_cast<double>(tokens - 1);
  const double rstd = 1.0 / sqrt(var_biased + static_cast<double>(eps));
  const float mean_hi = static_cast<float>(mean);
  stats[c] = mean_hi;
  stats[columns + c] = static_cast<float>(mean - static_cast<double>(mean_hi));
  stats[2 * columns + c] = static_cast<float>(rstd);
  float* rm = c < na ? run_mean_a + c : run_mean_b + (c - na);
  float* rv = c < na ? run_var_a + c : run_var_b + (c - na);
  (c < na ? rstd_a[c] : rstd_b[c - na]) = static_cast<float>(rstd);
  *rm = static_cast<float>((1.0 - momentum) * static_cast<double>(*rm) + momentum * mean);
  *rv = static_cast<float>((1.0 - momentum) * static_cast<double>(*rv) + momentum * var_unbiased);
}

__global__ void norm_eval_kernel(int na, int nb, float eps, const float* run_mean_a,
                                 const float* run_var_a, const float* run_mean_b,
                                 const float* run_var_b, float* stats, float* rstd_a,
                                 float* rstd_b) {
  kernel_prologue();
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  const int columns = na + nb;
  if (c >= columns) return;
  const bool first = c < na;
  const float m = first ? run_mean_a[c] : run_mean_b[c - na];
  const float v = first ? run_var_a[c] : run_var_b[c - na];
  const float rstd =
      static_cast<float>(1.0 / sqrt(static_cast<double>(v) + static_cast<double>(eps)));
  stats[c] = m;
  stats[columns + c] = 0.0f;
  stats[2 * columns + c] = rstd;
  (first ? rstd_a[c] : rstd_b[c - na]) = rstd;
}

// Per chunk and column: sum of dy and of dy * y. dy and y have the same shapes.
template <int kWidth>
__global__ void __launch_bounds__(kTileLanes* kTileRows)
    norm_grad_partial_kernel(ColumnPair dy, ColumnPair y, int64_t tokens, int tiles_a,
                             float* partials) {
  kernel_prologue();
  constexpr int kCols = kTileLanes * kWidth;
  __shared__ float red[2][kTileRows][kCols + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const TileColumns tg = tile_columns<kWidth>(dy, tiles_a);
  const TileColumns tv = tile_columns<kWidth>(y, tiles_a);
  const bool valid = tg.col < tg.ld;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kChunk;
  const int rows = static_cast<int>(min(static_cast<int64_t>(kChunk), tokens - t0));
  float s[kWidth], sy[kWidth];
#pragma unroll
  for (int c = 0; c < kWidth; ++c) s[c] = sy[c] = 0.0f;
  if (valid) {
#pragma unroll 4
    for (int r = 0; r < kRowsPerThread; ++r) {
      const int row = ty + r * kTileRows;
      if (row < rows) {
        float g[kWidth], v[kWidth];
        load_columns<kWidth>(tg.base, t0 + row, tg.ld, tg.col, g);
        load_columns<kWidth>(tv.base, t0 + row, tv.ld, tv.col, v);
#pragma unroll
        for (int c = 0; c < kWidth; ++c) {
          s[c] += g[c];
          sy[c] += g[c] * v[c];
        }
      }
    }
  }
#pragma unroll
  for (int c = 0; c < kWidth; ++c) {
    red[0][ty][tx * kWidth + c] = s[c];
    red[1][ty][tx * kWidth + c] = sy[c];
  }
  __syncthreads();
  if (ty == 0 && valid) {
    const int columns = dy.na + dy.nb;
    float* p = partials + static_cast<size_t>(blockIdx.x) * 2 * columns;
#pragma unroll
    for (int c = 0; c < kWidth; ++c) {
      p[tg.pair_col + c] = rows_sum<kCols>(red[0], tx * kWidth + c);
      p[columns + tg.pair_col + c] = rows_sum<kCols>(red[1], tx * kWidth + c);
    }
  }
}

__global__ void __launch_bounds__(kFinalWarps * 32)
    norm_grad_finalize_kernel(const float* partials, int64_t chunks, int columns, float* sum_dy,
                              float* sum_dyy) {
  kernel_prologue();
  __shared__ double red[kFinalWarps][33];
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int c = blockIdx.x * 32 + lane;
  const bool valid = c < columns;
  double s = 0.0, sy = 0.0;
  if (valid) {
#pragma unroll 4
    for (int64_t k = w; k < chunks; k += kFinalWarps) {
      const float* p = partials + static_cast<size_t>(k) * 2 * columns;
      s += p[c];
      sy += p[columns + c];
    }
  }
  s = warps_sum(s, red);
  sy = warps_sum(sy, red);
  if (w != 0 || !valid) return;
  sum_dy[c] = static_cast<float>(s);
  sum_dyy[c] = static_cast<float>(sy);
}

bool vector_pair(const ColumnPair& p) {
  return p.na % 4 == 0 && p.nb % 4 == 0 && (reinterpret_cast<uintptr_t>(p.a) & 15) == 0 &&
         (reinterpret_cast<uintptr_t>(p.b) & 15) == 0;
}

// Grid of a column reduction: chunks of tokens along x, column tiles of a then b along y.
template <int kWidth>
dim3 reduction_grid(const ColumnPair& p, int64_t tokens, int* tiles_a) {
  *tiles_a = column_tiles<kWidth>(p.na);
  const int tiles = *tiles_a + column_tiles<kWidth>(p.nb);
  OMNIMOE_CHECK(tiles <= 65535, "router batch norm: N_r + N_c must be at most ",
                int64_t{65535} * kTileLanes, ", got ", p.na + p.nb);
  return dim3(static_cast<unsigned>(chunk_count(tokens)), static_cast<unsigned>(tiles));
}

}  // namespace

size_t column_partials_bytes(int64_t tokens, int64_t columns) {
  return static_cast<size_t>(chunk_count(tokens)) * 2 * static_cast<size_t>(columns) *
         sizeof(float);
}

void launch_norm_train_stats(ColumnPair logits, int64_t tokens, float eps, float momentum,
                             float* run_mean_a, float* run_var_a, float* run_mean_b,
                             float* run_var_b, float* stats, float* rstd_a, float* rstd_b,
                             float* partials, cudaStream_t stream) {
  const int columns = logits.na + logits.nb;
  int tiles_a = 0;
  const dim3 block(kTileLanes, kTileRows);
  if (vector_pair(logits)) {
    const dim3 grid = reduction_grid<4>(logits, tokens, &tiles_a);
    launch_kernel("router_forward (batch-norm moments)", norm_moments_kernel<4>, grid, block, 0,
                  stream, logits, tokens, tiles_a, partials);
  } else {
    const dim3 grid = reduction_grid<1>(logits, tokens, &tiles_a);
    launch_kernel("router_forward (batch-norm moments)", norm_moments_kernel<1>, grid, block, 0,
                  stream, logits, tokens, tiles_a, partials);
  }
  launch_kernel("router_forward (batch-norm statistics)", norm_train_finalize_kernel,
                dim3(static_cast<unsigned>(ceil_div(columns, 32))), dim3(kFinalWarps * 32), 0,
                stream, static_cast<const float*>(partials), chunk_count(tokens), tokens,
                logits.na, logits.nb, eps, momentum, run_mean_a, run_var_a, run_mean_b, run_var_b,
                stats, rstd_a, rstd_b);
}

void launch_norm_eval_stats(int na, int nb, float eps, const float* run_mean_a,
                            const float* run_var_a, const float* run_mean_b,
                            const float* run_var_b, float* stats, float* rstd_a, float* rstd_b,
                            cudaStream_t stream) {
  norm_eval_kernel<<<static_cast<unsigned>(ceil_div(na + nb, 256)), 256, 0, stream>>>(
      na, nb, eps, run_mean_a, run_var_a, run_mean_b, run_var_b, stats, rstd_a, rstd_b);
  OMNIMOE_CUDA_CHECK_LAUNCH("router_forward (batch-norm running statistics)");
}

void launch_norm_grad_sums(ColumnPair dy, ColumnPair y, int64_t tokens, float* sum_dy,
                           float* sum_dyy, float* partials, cudaStream_t stream) {
  const int columns = dy.na + dy.nb;
  int tiles_a = 0;
  const dim3 block(kTileLanes, kTileRows);
  if (vector_pair(dy) && vector_pair(y)) {
    const dim3 grid = reduction_grid<4>(dy, tokens, &tiles_a);
    launch_kernel("router_backward (batch-norm gradient sums)", norm_grad_partial_kernel<4>, grid,
                  block, 0, stream, dy, y, tokens, tiles_a, partials);
  } else {
    const dim3 grid = reduction_grid<1>(dy, tokens, &tiles_a);
    launch_kernel("router_backward (batch-norm gradient sums)", norm_grad_partial_kernel<1>, grid,
                  block, 0, stream, dy, y, tokens, tiles_a, partials);
  }
  launch_kernel("router_backward (batch-norm gradient totals)", norm_grad_finalize_kernel,
                dim3(static_cast<unsigned>(ceil_div(columns, 32))), dim3(kFinalWarps * 32), 0,
                stream, static_cast<const float*>(partials), chunk_count(tokens), columns, sum_dy,
                sum_dyy);
}

}  // namespace omnimoe::cuda::router_detail
