// Router forward on the device: logits by GEMM (f32 output straight into the saved buffers),
// batch-norm statistics over the tokens, then either one kernel that normalises, takes
// log_softmax and selects (small K and axes: a warp per token, the log-probs never leave
// registers), or a normalise + log_softmax kernel followed by the block selection.
#include <algorithm>

#include "backend/backend.h"
#include "core/env.h"
#include "cuda/cuda_common.cuh"
#include "cuda/gemm.h"
#include "cuda/router_common.cuh"
#include "cuda/router_norm.cuh"
#include "cuda/router_select.cuh"
#include "cuda/router_warp_row.cuh"

namespace omnimoe::cuda {
namespace {
using namespace router_detail;

constexpr size_t kAlign = 256;

struct ForwardLayout {
  size_t gemm = 0, logp_r = 0, logp_c = 0, stats = 0, partials = 0, select = 0, logits64 = 0,
         total = 0;
};

ForwardLayout forward_layout(const LayerConfig& cfg, int64_t tokens, DType dtype) {
  ForwardLayout L;
  RegionOffsets regions(kAlign);
  const size_t columns = static_cast<size_t>(cfg.grid_rows + cfg.grid_cols);
  L.gemm = regions.take(gemm_workspace_bytes());
  L.logp_r = regions.take(static_cast<size_t>(tokens * cfg.grid_rows) * sizeof(float));
  L.logp_c = regions.take(static_cast<size_t>(tokens * cfg.grid_cols) * sizeof(float));
  L.stats = regions.take(norm_stats_bytes(static_cast<int64_t>(columns)));
  L.partials = regions.take(column_partials_bytes(tokens, static_cast<int64_t>(columns)));
  L.select = regions.take(select_workspace_bytes(cfg, tokens));
  // f64 GEMMs write f64 only: their logits pass through here on the way to the f32 saved ones.
  if (dtype == DType::f64) L.logits64 = regions.take(static_cast<size_t>(tokens) * columns * 8);
  L.total = regions.total();
  return L;
}

constexpr int kWarpsPerBlock = 8;

__global__ void f64_to_f32_kernel(const double* __restrict__ src, float* __restrict__ dst,
                                  int64_t n) {
  kernel_prologue();
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    dst[i] = static_cast<float>(src[i]);
  }
}

// logits = x W^T into the saved f32 [T, n] view, for f64 x (f64 GEMMs write f64 only).
void logits_gemm_f64(const TensorView& x, const TensorView& w, const TensorView& logits,
                     const Buffer& gemm_ws, void* f64_scratch, const Exec& exec) {
  const int64_t rows = logits.shape[0], cols = logits.shape[1], n = rows * cols;
  gemm(x, false, w, true,
       TensorView::matrix(f64_scratch, DType::f64, rows, cols, cols, exec.device), 1.0f, 0.0f,
       gemm_ws, exec);
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(n, 256), 65535));
  f64_to_f32_kernel<<<blocks, 256, 0, stream_of(exec)>>>(
      static_cast<const double*>(f64_scratch), static_cast<float*>(logits.data), n);
  OMNIMOE_CUDA_CHECK_LAUNCH("router_forward (f64 logits)");
}

// One warp per (token, axis): z = (l - mean) * rstd (or l), written back in place as the
// saved normalised logits, then log_softmax(z) = z - (max + log(sum exp(z - max))).
// stats: router_norm.cuh's layout; null for router_norm = none.
// Rows of more than 1024 logits: three passes over memory.
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    normalize_log_softmax_kernel(float* row_logits, float* col_logits, int nr, int nc,
                                 int64_t tokens, const float* stats, float* logp_r,
                                 float* logp_c) {
  kernel_prologue();
  const int64_t w = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (w >= 2 * tokens) return;
  const bool cols = w >= tokens;
  const int64_t t = cols ? w - tokens : w;
  const int n = cols ? nc : nr;
  float* z = (cols ? col_logits : row_logits) + t * n;
  float* logp = (cols ? logp_c : logp_r) + t * n;
  const float* mean_hi = stats == nullptr ? nullptr : (cols ? stats + nr : stats);
  const float* mean_lo = stats == nullptr ? nullptr : mean_hi + nr + nc;
  const float* rstd = stats == nullptr ? nullptr : mean_lo + nr + nc;
  float m = -INFINITY;
  for (int j = lane; j < n; j += 32) {
    float v = z[j];
    if (mean_hi != nullptr) {
      v = normalised(v, mean_hi[j], mean_lo[j], rstd[j]);
      z[j] = v;
    }
    m = fmaxf(m, v);
  }
  m = warp_max(m);
  const float shift = isfinite(m) ? m : 0.0f;  // a row of -inf (or +inf) gives NaN, as on the CPU
  float s = 0.0f;
  for (int j = lane; j < n; j += 32) s += expf(z[j] - shift);
  const float lse = shift + logf(warp_sum(s));
  for (int j = lane; j < n; j += 32) logp[j] = z[j] - lse;
}

// The same for rows of up to 1024 logits, held in registers: one read, two writes.
template <int kItems, bool kVec>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    normalize_log_softmax_rows_kernel(float* row_logits, float* col_logits, int nr, int nc,
                                      int64_t tokens, const float* stats, float* logp_r,
                                      float* logp_c) {
  kernel_prologue();
  using Row = WarpRow<kItems, kVec>;
  const int64_t w = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (w >= 2 * tokens) return;
  const bool cols = w >= tokens;
  const int64_t t = cols ? w - tokens : w;
  const int n = cols ? nc : nr;
  float* z = (cols ? col_logits : row_logits) + t * n;
  float v[kItems];
  Row::load(z, n, lane, v);
  if (stats != nullptr) {
    const float* mean_hi = cols ? stats + nr : stats;
    Row::normalise(v, n, lane, mean_hi, mean_hi + nr + nc, mean_hi + 2 * (nr + nc));
    Row::store(z, n, lane, v);
  }
  const float lse = Row::log_sum_exp(v, n, lane);
#pragma unroll
  for (int q = 0; q < kItems; ++q) v[q] -= lse;
  Row::store((cols ? logp_c : logp_r) + t * n, n, lane, v);
}

void launch_normalize_log_softmax(float* row_logits, float* col_logits, int nr, int nc,
                                  int64_t tokens, const float* stats, float* logp_r,
                                  float* logp_c, cudaStream_t stream) {
  const int64_t rows = 2 * tokens;
  const unsigned grid = static_cast<unsigned>(ceil_div(rows, kWarpsPerBlock));
  const int n = std::max(nr, nc);
  if (n > 1024) {
    launch_kernel("router_forward (normalise, log_softmax)", normalize_log_softmax_kernel,
                  dim3(grid), dim3(kWarpsPerBlock * 32), 0, stream, row_logits, col_logits, nr, nc,
                  tokens, stats, logp_r, logp_c);
    return;
  }
  auto launch = [&](auto kernel) {
    launch_kernel("router_forward (normalise, log_softmax)", kernel, dim3(grid),
                  dim3(kWarpsPerBlock * 32), 0, stream, row_logits, col_logits, nr, nc, tokens,
                  stats, logp_r, logp_c);
  };
  const bool vec = vector_rows(row_logits, nr) && vector_rows(col_logits, nc) &&
                   vector_rows(logp_r, nr) && vector_rows(logp_c, nc);
  const int items = warp_row_items(n);
  if (vec) {
    if (items == 4) launch(normalize_log_softmax_rows_kernel<4, true>);
    else if (items == 8) launch(normalize_log_softmax_rows_kernel<8, true>);
    else if (items == 16) launch(normalize_log_softmax_rows_kernel<16, true>);
    else launch(normalize_log_softmax_rows_kernel<32, true>);
  } else {
    if (items == 4) launch(normalize_log_softmax_rows_kernel<4, false>);
    else if (items == 8) launch(normalize_log_softmax_rows_kernel<8, false>);
    else if (items == 16) launch(normalize_log_softmax_rows_kernel<16, false>);
    else launch(normalize_log_softmax_rows_kernel<32, false>);
  }
}

// OMNIMOE_ROUTER_FORWARD=unfused runs the normalise kernel and the selection apart where they
// would be fused (to time both; the results are the same).
bool fused_path_allowed() {
  static const bool allowed = !detail::env_equals("OMNIMOE_ROUTER_FORWARD", "unfused");
  return allowed;
}

}  // namespace

size_t router_forward_workspace_bytes(const LayerConfig& cfg, int64_t tokens, DType dtype) {
  return forward_layout(cfg, tokens, dtype).total;
}

void router_forward(const LayerConfig& cfg, const TensorView& x, const RouterWeights& weights,
                    const RouterNormState& norm, bool training, const RouterOutputs& out,
                    const RouterSaved& saved, Buffer workspace, const Exec& exec) {
  DeviceGuard guard(exec);
  const cudaStream_t stream = stream_of(exec);
  const int64_t tokens = x.shape[0];
  const int nr = static_cast<int>(cfg.grid_rows), nc = static_cast<int>(cfg.grid_cols);
  const ForwardLayout L = forward_layout(cfg, tokens, x.dtype);
  char* ws = static_cast<char*>(workspace.data);
  const Buffer gemm_ws{ws + L.gemm, gemm_workspace_bytes()};

  if (x.dtype == DType::f64) {
    logits_gemm_f64(x, weights.row, saved.row_logits, gemm_ws, ws + L.logits64, exec);
    logits_gemm_f64(x, weights.col, saved.col_logits, gemm_ws, ws + L.logits64, exec);
  } else {  // one launch when N_r = N_c and the operands are evenly spaced (the layer's are)
    gemm_pair({x, x}, false, {weights.row, weights.col}, true,
              {saved.row_logits, saved.col_logits}, 1.0f, 0.0f, gemm_ws, exec);
  }

  float* row_logits = static_cast<float*>(saved.row_logits.data);
  float* col_logits = static_cast<float*>(saved.col_logits.data);
  const float* stats = nullptr;
  if (cfg.router_norm == RouterNorm::batch) {
    float* stats_ws = reinterpret_cast<float*>(ws + L.stats);
    float* rr = static_cast<float*>(saved.row_rstd.data);
    float* rc = static_cast<float*>(saved.col_rstd.data);
    if (training) {
      launch_norm_train_stats(ColumnPair{row_logits, nr, col_logits, nc}, tokens, cfg.norm_eps,
                              cfg.norm_momentum, static_cast<float*>(norm.row_mean.data),
                              static_cast<float*>(norm.row_var.data),
                              static_cast<float*>(norm.col_mean.data),
                              static_cast<float*>(norm.col_var.data), stats_ws, rr, rc,
                              reinterpret_cast<float*>(ws + L.partials), stream);
    } else {
      launch_norm_eval_stats(nr, nc, cfg.norm_eps, static_cast<const float*>(norm.row_mean.data),
                             static_cast<const float*>(norm.row_var.data),
                             static_cast<const float*>(norm.col_mean.data),
                             static_cast<const float*>(norm.col_var.data), stats_ws, rr, rc,
                             stream);
    }
    stats = stats_ws;
  }

  float* logp_r = reinterpret_cast<float*>(ws + L.logp_r);
  float* logp_c = reinterpret_cast<float*>(ws + L.logp_c);
  const GateMode mode = cfg.gating == Gating::joint ? GateMode::joint : GateMode::softmax;
  int32_t* indices = static_cast<int32_t*>(out.indices.data);
  float* scores = static_cast<float*>(out.scores.data);
  float* gates = static_cast<float*>(out.gates.data);
  if (select_fuses_normalise(cfg) && fused_path_allowed()) {
    launch_normalise_select(cfg, tokens, row_logits, col_logits, stats, logp_r, logp_c, indices,
                            scores, gates, mode, stream);
    return;
  }
  launch_normalize_log_softmax(row_logits, col_logits, nr, nc, tokens, stats, logp_r, logp_c,
                               stream);
  launch_select(cfg, tokens, logp_r, logp_c, indices, scores, gates, mode, ws + L.select, stream);
}

}  // namespace omnimoe::cuda
