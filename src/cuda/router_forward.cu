// Router forward on the device: logits by GEMM (f32 output straight into the saved buffers),
// batch norm over the tokens, log_softmax per axis, then the exact top-K selection and the gates
// in one kernel per token.
#include <algorithm>

#include "backend/backend.h"
#include "cuda/cuda_common.cuh"
#include "cuda/gemm.h"
#include "cuda/router_common.cuh"
#include "cuda/router_norm.cuh"
#include "cuda/router_select.cuh"

namespace omnimoe::cuda {
namespace {
using namespace router_detail;

constexpr size_t kAlign = 256;
size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

struct ForwardLayout {
  size_t gemm = 0, logp_r = 0, logp_c = 0, stats = 0, partials = 0, select = 0, logits64 = 0,
         total = 0;
};

ForwardLayout forward_layout(const LayerConfig& cfg, int64_t tokens, DType dtype) {
  ForwardLayout L;
  size_t o = 0;
  auto take = [&](size_t bytes) {
    const size_t at = o;
    o += align_up(bytes);
    return at;
  };
  const size_t columns = static_cast<size_t>(cfg.grid_rows + cfg.grid_cols);
  L.gemm = take(gemm_workspace_bytes());
  L.logp_r = take(static_cast<size_t>(tokens * cfg.grid_rows) * sizeof(float));
  L.logp_c = take(static_cast<size_t>(tokens * cfg.grid_cols) * sizeof(float));
  L.stats = take(2 * columns * sizeof(double));
  L.partials = take(column_partials_bytes(tokens, static_cast<int64_t>(columns)));
  L.select = take(select_workspace_bytes(cfg, tokens));
  // f64 GEMMs write f64 only: their logits pass through here on the way to the f32 saved ones.
  if (dtype == DType::f64) L.logits64 = take(static_cast<size_t>(tokens) * columns * 8);
  L.total = o;
  return L;
}

constexpr int kWarpsPerBlock = 8;

__global__ void f64_to_f32_kernel(const double* __restrict__ src, float* __restrict__ dst,
                                  int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    dst[i] = static_cast<float>(src[i]);
  }
}

// logits = x W^T into the saved f32 [T, n] view.
void logits_gemm(const TensorView& x, const TensorView& w, const TensorView& logits,
                 const Buffer& gemm_ws, void* f64_scratch, const Exec& exec) {
  if (x.dtype != DType::f64) {
    gemm(x, false, w, true, logits, 1.0f, 0.0f, gemm_ws, exec);
    return;
  }
  const int64_t rows = logits.shape[0], cols = logits.shape[1], n = rows * cols;
  gemm(x, false, w, true,
       TensorView::matrix(f64_scratch, DType::f64, rows, cols, cols, exec.device), 1.0f, 0.0f,
       gemm_ws, exec);
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(n, 256), 65535));
  f64_to_f32_kernel<<<blocks, 256, 0, stream_of(exec)>>>(
      static_cast<const double*>(f64_scratch), static_cast<float*>(logits.data), n);
  OMNIMOE_CUDA_CHECK_LAUNCH("router_forward (f64 logits)");
}

// One warp per (token, axis): z = (l - mean) * rstd in fp64 (or l), written back in place as the
// saved normalised logits, then log_softmax(z) = z - (max + log(sum exp(z - max))).
// stats: mean [N_r + N_c] then rstd [N_r + N_c], fp64; null for router_norm = none.
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    normalize_log_softmax_kernel(float* row_logits, float* col_logits, int nr, int nc,
                                 int64_t tokens, const double* stats, float* logp_r,
                                 float* logp_c) {
  const int64_t w = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (w >= 2 * tokens) return;
  const bool cols = w >= tokens;
  const int64_t t = cols ? w - tokens : w;
  const int n = cols ? nc : nr;
  float* z = (cols ? col_logits : row_logits) + t * n;
  float* logp = (cols ? logp_c : logp_r) + t * n;
  const double* mu = stats == nullptr ? nullptr : (cols ? stats + nr : stats);
  const double* rstd = stats == nullptr ? nullptr : mu + nr + nc;
  float m = -INFINITY;
  for (int j = lane; j < n; j += 32) {
    float v = z[j];
    if (mu != nullptr) {
      v = static_cast<float>((static_cast<double>(v) - mu[j]) * rstd[j]);
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

  logits_gemm(x, weights.row, saved.row_logits, gemm_ws, ws + L.logits64, exec);
  logits_gemm(x, weights.col, saved.col_logits, gemm_ws, ws + L.logits64, exec);

  float* row_logits = static_cast<float*>(saved.row_logits.data);
  float* col_logits = static_cast<float*>(saved.col_logits.data);
  const double* stats = nullptr;
  if (cfg.router_norm == RouterNorm::batch) {
    double* stats_ws = reinterpret_cast<double*>(ws + L.stats);
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
  const int64_t rows = 2 * tokens;
  normalize_log_softmax_kernel<<<static_cast<unsigned>(ceil_div(rows, kWarpsPerBlock)),
                                 kWarpsPerBlock * 32, 0, stream>>>(
      row_logits, col_logits, nr, nc, tokens, stats, logp_r, logp_c);
  OMNIMOE_CUDA_CHECK_LAUNCH("router_forward (normalise, log_softmax)");

  launch_select(cfg, tokens, logp_r, logp_c, static_cast<int32_t*>(out.indices.data),
                static_cast<float*>(out.scores.data), static_cast<float*>(out.gates.data),
                cfg.gating == Gating::joint ? GateMode::joint : GateMode::softmax,
                ws + L.select, stream);
}

}  // namespace omnimoe::cuda
