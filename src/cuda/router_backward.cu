// Router backward on the device.
//  1. Per token (one CTA): dS from dgates; dS scattered onto the row and column log-probs in
//     shared memory as 64-bit fixed point (integer atomics: the sum is exact and independent of
//     the order, so the result is deterministic); log_softmax backward per axis. For K <= 32 and
//     axes of up to 1024, a warp per token instead (registers only, sums in slot order).
//  2. Batch-norm backward: per-logit sums over the tokens in a fixed order (training), or the
//     scale by rstd (evaluation); written as dL = [dL_r | dL_c] in the GEMM's compute type.
//  3. grads.row = dL_r^T x, grads.col = dL_c^T x (one GEMM when grads.col follows grads.row in
//     memory), dx (+)= dL [W_r; W_c] in one GEMM ([W_r; W_c] copied once per call unless W_c
//     follows W_r in memory).
// Compute type of the GEMMs: x's dtype for bf16, f32 and f64 (bf16 keeps f32's exponent range, so
// dL loses only mantissa bits: about 2^-9 relative per term, well inside the bf16 tolerance);
// f32 for f16 (dL would underflow in f16), with x and W converted and the results converted back.
#include <algorithm>
#include <cmath>

#include "backend/backend.h"
#include "cuda/cuda_common.cuh"
#include "cuda/gemm.h"
#include "cuda/router_common.cuh"
#include "cuda/router_norm.cuh"
#include "cuda/router_warp_row.cuh"

namespace omnimoe::cuda {
namespace {
using namespace router_detail;

constexpr size_t kAlign = 256;

constexpr size_t kSharedAccBudget = 64 * 1024;  // accumulators of one token in shared memory
constexpr int kGlobalCtas = 128;
constexpr int kDlogitsThreads = 256;

DType compute_dtype(DType x) { return x == DType::f16 ? DType::f32 : x; }

bool acc_in_shared(const LayerConfig& cfg) {
  return static_cast<size_t>(cfg.grid_rows + cfg.grid_cols) * 8 <= kSharedAccBudget;
}

struct BackwardLayout {
  size_t gemm = 0, acc = 0, dz_r = 0, dz_c = 0, partials = 0, sum_dy = 0, sum_dyy = 0, dl = 0,
         w = 0, x = 0, tmp = 0, total = 0;
};

BackwardLayout backward_layout(const LayerConfig& cfg, int64_t tokens, DType dtype) {
  BackwardLayout L;
  RegionOffsets regions(kAlign);
  const int64_t columns = cfg.grid_rows + cfg.grid_cols;
  const DType ct = compute_dtype(dtype);
  const size_t ct_size = dtype_size(ct);
  const size_t T = static_cast<size_t>(tokens), d = static_cast<size_t>(cfg.hidden);
  L.gemm = regions.take(gemm_workspace_bytes());
  if (!acc_in_shared(cfg)) {
    L.acc = regions.take(static_cast<size_t>(std::min<int64_t>(tokens, kGlobalCtas)) * columns * 8);
  }
  L.dz_r = regions.take(T * cfg.grid_rows * sizeof(float));
  L.dz_c = regions.take(T * cfg.grid_cols * sizeof(float));
  L.partials = regions.take(column_partials_bytes(tokens, columns));
  L.sum_dy = regions.take(columns * sizeof(float));
  L.sum_dyy = regions.take(columns * sizeof(float));
  L.dl = regions.take(T * columns * ct_size);
  L.w = regions.take(static_cast<size_t>(columns) * d * ct_size);
  if (ct != dtype) {
    L.x = regions.take(T * d * ct_size);
    L.tmp = regions.take(std::max<size_t>(T, columns) * d * ct_size);  // f32: ct is f32 here
  }
  L.total = regions.total();
  return L;
}

int ceil_log2(int64_t v) {
  int b = 0;
  while ((int64_t{1} << b) < v) ++b;
  return b;
}

// 2^e as a double, for e in [-1022, 1023].
__device__ __forceinline__ double pow2(int e) { return __hiloint2double((1023 + e) << 20, 0); }

// dS of position k of token t.
__device__ __forceinline__ float gate_grad(const float* g, const float* dg, int k, float sgd,
                                           bool joint) {
  return joint ? g[k] * dg[k] : g[k] * (dg[k] - sgd);
}

// Gradient of the loss with respect to the normalised logits z (the input of log_softmax).
template <bool kShared>
__global__ void __launch_bounds__(kDlogitsThreads)
    dlogits_kernel(int64_t tokens, int nr, int nc, int k, int k_bits, bool joint,
                   const int32_t* __restrict__ indices, const float* __restrict__ gates,
                   const float* __restrict__ dgates, const float* __restrict__ z_r,
                   const float* __restrict__ z_c, float* __restrict__ dz_r,
                   float* __restrict__ dz_c, char* __restrict__ global_acc) {
  kernel_prologue();
  extern __shared__ __align__(16) char smem[];
  __shared__ float fscratch[kMaxWarps];
  __shared__ int iscratch[kMaxWarps];
  const int columns = nr + nc;
  unsigned long long* acc = reinterpret_cast<unsigned long long*>(
      kShared ? smem : global_acc + static_cast<size_t>(blockIdx.x) * columns * 8);
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const uint32_t n_experts = static_cast<uint32_t>(nr) * static_cast<uint32_t>(nc);
  BadExpertId bad_id;

  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    const float* g = gates + t * k;
    const float* dg = dgates + t * k;
    const int32_t* idx = indices + t * k;
    float sgd = 0.0f;
    if (!joint) {
      float s = 0.0f;
      for (int i = tid; i < k; i += nthreads) s += g[i] * dg[i];
      sgd = block_sum(s, fscratch);
    }
    float m = 0.0f;
    int bad = 0;
    for (int i = tid; i < k; i += nthreads) {
      const float v = gate_grad(g, dg, i, sgd, joint);
      if (isfinite(v)) m = fmaxf(m, fabsf(v));
      else bad = 1;
    }
    m = block_max(m, fscratch);
    const bool exact = block_sum(bad, iscratch) == 0;
    // Fixed point with |sum| < 2^62: each accumulator gets at most k terms below 2^ex
    // (ex = frexp exponent of m; a subnormal or zero m is below 2^-126).
    const int ex = max(static_cast<int>((__float_as_uint(m) >> 23) & 0xffu), 1) - 126;
    const int scale_exp = 62 - k_bits - ex;  // in [-97, 187]
    const double scale = pow2(scale_exp), unscale = pow2(-scale_exp);
    for (int i = tid; i < columns; i += nthreads) acc[i] = 0ull;
    __syncthreads();
    for (int i = tid; i < k; i += nthreads) {
      const int32_t id_or_skip = expert_id_or_skip(idx[i], n_experts, bad_id);
      if (id_or_skip < 0) continue;
      const uint32_t id = static_cast<uint32_t>(id_or_skip);
      const uint32_t r = id / static_cast<uint32_t>(nc);
      const uint32_t c = id - r * nc;
      const float v = gate_grad(g, dg, i, sgd, joint);
      if (exact) {
        const unsigned long long q =
            static_cast<unsigned long long>(llrint(static_cast<double>(v) * scale));
        atomicAdd(acc + r, q);
        atomicAdd(acc + nr + c, q);
      } else {  // inf or NaN: the sum is inf or NaN whatever the order
        atomicAdd(reinterpret_cast<double*>(acc) + r, static_cast<double>(v));
        atomicAdd(reinterpret_cast<double*>(acc) + nr + c, static_cast<double>(v));
      }
    }
    __syncthreads();
    // log_softmax backward per axis: dz = dlogp - softmax(z) * sum(dlogp).
    for (int axis = 0; axis < 2; ++axis) {
      const int n = axis == 0 ? nr : nc;
      const float* z = (axis == 0 ? z_r : z_c) + t * n;
      float* dz = (axis == 0 ? dz_r : dz_c) + t * n;
      const unsigned long long* a = acc + (axis == 0 ? 0 : nr);
      auto dlogp = [&](int j) -> float {
        return exact ? static_cast<float>(static_cast<double>(static_cast<long long>(a[j])) *
                                          unscale)
                     : static_cast<float>(__longlong_as_double(static_cast<long long>(a[j])));
      };
      float zmax = -INFINITY, sdl = 0.0f;
      for (int j = tid; j < n; j += nthreads) {
        zmax = fmaxf(zmax, z[j]);
        sdl += dlogp(j);
      }
      zmax = block_max(zmax, fscratch);
      sdl = block_sum(sdl, fscratch);
      const float shift = isfinite(zmax) ? zmax : 0.0f;  // as the forward's log_softmax
      float se = 0.0f;
      for (int j = tid; j < n; j += nthreads) se += expf(z[j] - shift);
      const float lse = shift + logf(block_sum(se, fscratch));
      for (int j = tid; j < n; j += nthreads) dz[j] = dlogp(j) - expf(z[j] - lse) * sdl;
    }
    __syncthreads();  // acc is reused by the next token
  }
  report_bad_expert_id(bad_id, n_experts, "router_backward");
}

// The same for K <= 32 and axes of up to 1024, a warp per token and no shared memory. dlogp is
// zero but at the K rows (columns) of the selection, so dz = -softmax(z) * S everywhere (S = the
// sum of the K dS), written densely, then at those rows dlogp - softmax(z) * S, with dlogp the sum
// of the row's dS in slot order (every lane of a row computes the same value).
constexpr int kDlogitsWarps = 8;

template <int kItems, bool kVec>
__global__ void __launch_bounds__(kDlogitsWarps * 32)
    dlogits_warp_kernel(int64_t tokens, int nr, int nc, int k, bool joint,
                        const int32_t* __restrict__ indices, const float* __restrict__ gates,
                        const float* __restrict__ dgates, const float* __restrict__ z_r,
                        const float* __restrict__ z_c, float* __restrict__ dz_r,
                        float* __restrict__ dz_c) {
  kernel_prologue();
  using Row = WarpRow<kItems, kVec>;
  const int lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kDlogitsWarps + (threadIdx.x >> 5);
  if (t >= tokens) return;  // whole warps; no block barrier follows
  const uint32_t n_experts = static_cast<uint32_t>(nr) * static_cast<uint32_t>(nc);
  float g = 0.0f, dg = 0.0f;
  uint32_t id = 0xffffffffu;
  BadExpertId bad_id;
  if (lane < k) {
    g = gates[t * k + lane];
    dg = dgates[t * k + lane];
    id = static_cast<uint32_t>(expert_id_or_skip(indices[t * k + lane], n_experts, bad_id));
  }
  const float sgd = joint ? 0.0f : warp_sum(g * dg);
  const bool valid = id < n_experts;  // a lane past k, or a bad id (reported at the end)
  const float ds = valid ? gate_grad(&g, &dg, 0, sgd, joint) : 0.0f;
  const float total = warp_sum(ds);
  const int r = valid ? static_cast<int>(id / static_cast<uint32_t>(nc)) : -1;
  const int c = valid ? static_cast<int>(id - static_cast<uint32_t>(r) * nc) : -1;
  float sum_r = 0.0f, sum_c = 0.0f;
  for (int b = 0; b < k; ++b) {
    const float vb = __shfl_sync(0xffffffffu, ds, b);
    const int rb = __shfl_sync(0xffffffffu, r, b), cb = __shfl_sync(0xffffffffu, c, b);
    if (rb == r) sum_r += vb;
    if (cb == c) sum_c += vb;
  }
#pragma unroll 1
  for (int a = 0; a < 2; ++a) {
    const int n = a == 0 ? nr : nc;
    const float* z = (a == 0 ? z_r : z_c) + t * n;
    float* dz = (a == 0 ? dz_r : dz_c) + t * n;
    float v[kItems];
    Row::load(z, n, lane, v);
    const float lse = Row::log_sum_exp(v, n, lane);  // as the forward's log_softmax
#pragma unroll
    for (int q = 0; q < kItems; ++q) v[q] = -(expf(v[q] - lse) * total);
    Row::store(dz, n, lane, v);
    __syncwarp();  // the dense values are in memory before the selected ones replace them
    const int j = a == 0 ? r : c;
    if (valid) dz[j] = (a == 0 ? sum_r : sum_c) - expf(z[j] - lse) * total;
  }
  report_bad_expert_id(bad_id, n_experts, "router_backward");
}

// dL[t, c] in the compute type: batch-norm backward of dz (two dense f32 [T, n] halves). A thread
// takes kWidth adjacent columns of one half (kWidth = 4: N_r and N_c multiples of 4).
template <typename CT, int kWidth>
__global__ void norm_backward_kernel(int64_t tokens, int nr, int nc, int mode,
                                     const float* __restrict__ dz_r,
                                     const float* __restrict__ dz_c, const float* __restrict__ z_r,
                                     const float* __restrict__ z_c,
                                     const float* __restrict__ rstd_r,
                                     const float* __restrict__ rstd_c,
                                     const float* __restrict__ sum_dy,
                                     const float* __restrict__ sum_dyy, CT* __restrict__ dl) {
  kernel_prologue();
  const int columns = nr + nc;
  const int groups_r = nr / kWidth, groups = columns / kWidth;
  const int64_t n = tokens * groups;
  const float inv_t = 1.0f / static_cast<float>(tokens);
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < n;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = g / groups;
    const int cg = static_cast<int>(g - t * groups);
    const bool first = cg < groups_r;
    const int j = (first ? cg : cg - groups_r) * kWidth;  // column in its half
    const int c = first ? j : nr + j;                     // column of dL
    const int64_t at = t * (first ? nr : nc) + j;
    float v[kWidth];
    load_floats<kWidth>((first ? dz_r : dz_c) + at, v);
    if (mode != 0) {
      float r[kWidth];
      load_floats<kWidth>((first ? rstd_r : rstd_c) + j, r);
      if (mode == 1) {  // batch norm, evaluation: z = (l - running mean) * rstd
#pragma unroll
        for (int i = 0; i < kWidth; ++i) v[i] *= r[i];
      } else {  // batch norm, training: full backward through the batch statistics
        float y[kWidth], s[kWidth], sy[kWidth];
        load_floats<kWidth>((first ? z_r : z_c) + at, y);
        load_floats<kWidth>(sum_dy + c, s);
        load_floats<kWidth>(sum_dyy + c, sy);
#pragma unroll
        for (int i = 0; i < kWidth; ++i) {
          v[i] = r[i] * (v[i] - s[i] * inv_t - y[i] * sy[i] * inv_t);
        }
      }
    }
    CT* out = dl + t * columns + c;
#pragma unroll
    for (int i = 0; i < kWidth; ++i) out[i] = store_float<CT>(v[i]);
  }
}

// Row-strided source rows, the first `split` from a and the rest from b (two matrices stacked
// in one launch).
template <typename Src>
struct StackedRows {
  const Src* a;
  int64_t a_ld, split;
  const Src* b;
  int64_t b_ld;
};

// dst[r, :] = src row r converted.
template <typename Src, typename Dst>
__global__ void convert_rows_kernel(StackedRows<Src> src, Dst* __restrict__ dst, int64_t dst_ld,
                                    int64_t rows, int64_t cols) {
  kernel_prologue();
  const int64_t n = rows * cols;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i - r * cols;
    const Src v = r < src.split ? src.a[r * src.a_ld + c] : src.b[(r - src.split) * src.b_ld + c];
    dst[r * dst_ld + c] = store_float<Dst>(load_float(v));
  }
}

// dst = f16(src) or f16(dst + src) (src f32 dense).
template <typename T>
__global__ void store_result_kernel(const float* __restrict__ src, T* __restrict__ dst,
                                    int64_t dst_ld, int64_t rows, int64_t cols, bool accumulate) {
  kernel_prologue();
  const int64_t n = rows * cols;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i - r * cols;
    float v = src[i];
    if (accumulate) v += load_float(dst[r * dst_ld + c]);
    dst[r * dst_ld + c] = store_float<T>(v);
  }
}

unsigned grid_for(int64_t n, int threads) {
  return static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(ceil_div(n, threads), 1),
                                                 65535 * 16));
}

template <typename Src, typename Dst>
void convert_rows(const StackedRows<Src>& src, void* dst, int64_t dst_ld, int64_t rows,
                  int64_t cols, cudaStream_t stream) {
  if (rows * cols == 0) return;
  launch_kernel("router_backward (convert)", convert_rows_kernel<Src, Dst>,
                dim3(grid_for(rows * cols, 256)), dim3(256), 0, stream, src, static_cast<Dst*>(dst),
                dst_ld, rows, cols);
}

void zero_matrix(const TensorView& m, cudaStream_t stream) {
  if (m.shape[0] == 0 || m.shape[1] == 0) return;
  const size_t es = dtype_size(m.dtype);
  OMNIMOE_CUDA_CHECK(cudaMemset2DAsync(m.data, static_cast<size_t>(m.strides[0]) * es, 0,
                                       static_cast<size_t>(m.shape[1]) * es,
                                       static_cast<size_t>(m.shape[0]), stream));
}

TensorView view(void* data, DType dtype, int64_t rows, int64_t cols, int64_t ld, Device dev) {
  return TensorView::matrix(data, dtype, rows, cols, ld, dev);
}

}  // namespace

size_t router_backward_workspace_bytes(const LayerConfig& cfg, int64_t tokens, DType dtype) {
  return backward_layout(cfg, tokens, dtype).total;
}

void router_backward(const LayerConfig& cfg, const TensorView& x, const RouterWeights& weights,
                     bool training, const RouterSaved& saved, const RouterOutputs& out,
                     const TensorView& dgates, const TensorView& dx, bool accumulate_dx,
                     const RouterWeights& grads, Buffer workspace, const Exec& exec) {
  DeviceGuard guard(exec);
  const cudaStream_t stream = stream_of(exec);
  const int64_t tokens = x.shape[0];
  if (tokens == 0) {  // no token: the weight gradients are zero
    zero_matrix(grads.row, stream);
    zero_matrix(grads.col, stream);
    return;
  }
  const int nr = static_cast<int>(cfg.grid_rows), nc = static_cast<int>(cfg.grid_cols);
  const int k = static_cast<int>(cfg.top_k);
  const int64_t columns = nr + nc, d = cfg.hidden;
  const DType xt = x.dtype, ct = compute_dtype(xt);
  const Device dev = exec.device;
  const BackwardLayout L = backward_layout(cfg, tokens, xt);
  char* ws = static_cast<char*>(workspace.data);
  const Buffer gemm_ws{ws + L.gemm, gemm_workspace_bytes()};
  float* dz_r = reinterpret_cast<float*>(ws + L.dz_r);
  float* dz_c = reinterpret_cast<float*>(ws + L.dz_c);
  const float* z_r = static_cast<const float*>(saved.row_logits.data);
  const float* z_c = static_cast<const float*>(saved.col_logits.data);

  // 1. dz per token.
  const bool joint = cfg.gating == Gating::joint;
  const int k_bits = ceil_log2(k);
  if (k <= 32 && nr <= 1024 && nc <= 1024) {
    const unsigned grid = static_cast<unsigned>(ceil_div(tokens, kDlogitsWarps));
    auto launch = [&](auto kernel) {
      launch_kernel("router_backward (log_softmax backward)", kernel, dim3(grid),
                    dim3(kDlogitsWarps * 32), 0, stream, tokens, nr, nc, k, joint,
                    static_cast<const int32_t*>(out.indices.data),
                    static_cast<const float*>(out.gates.data),
                    static_cast<const float*>(dgates.data), z_r, z_c, dz_r, dz_c);
    };
    const int items = warp_row_items(std::max(nr, nc));
    if (vector_rows(z_r, nr) && vector_rows(z_c, nc)) {  // dz: workspace, aligned
      if (items == 4) launch(dlogits_warp_kernel<4, true>);
      else if (items == 8) launch(dlogits_warp_kernel<8, true>);
      else if (items == 16) launch(dlogits_warp_kernel<16, true>);
      else launch(dlogits_warp_kernel<32, true>);
    } else {
      if (items == 4) launch(dlogits_warp_kernel<4, false>);
      else if (items == 8) launch(dlogits_warp_kernel<8, false>);
      else if (items == 16) launch(dlogits_warp_kernel<16, false>);
      else launch(dlogits_warp_kernel<32, false>);
    }
  } else if (acc_in_shared(cfg)) {
    const size_t smem = static_cast<size_t>(columns) * 8;
    if (smem > 48 * 1024) {
      OMNIMOE_CUDA_CHECK(cudaFuncSetAttribute(dlogits_kernel<true>,
                                              cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              static_cast<int>(smem)));
    }
    dlogits_kernel<true><<<static_cast<unsigned>(tokens), kDlogitsThreads, smem, stream>>>(
        tokens, nr, nc, k, k_bits, joint, static_cast<const int32_t*>(out.indices.data),
        static_cast<const float*>(out.gates.data), static_cast<const float*>(dgates.data), z_r,
        z_c, dz_r, dz_c, nullptr);
  } else {
    const int grid = static_cast<int>(std::min<int64_t>(tokens, kGlobalCtas));
    dlogits_kernel<false><<<grid, kDlogitsThreads, 0, stream>>>(
        tokens, nr, nc, k, k_bits, joint, static_cast<const int32_t*>(out.indices.data),
        static_cast<const float*>(out.gates.data), static_cast<const float*>(dgates.data), z_r,
        z_c, dz_r, dz_c, ws + L.acc);
  }
  OMNIMOE_CUDA_CHECK_LAUNCH("router_backward (log_softmax backward)");

  // 2. Batch-norm backward into dL [T, N_r + N_c] (compute type).
  int mode = 0;
  float* sum_dy = reinterpret_cast<float*>(ws + L.sum_dy);
  float* sum_dyy = reinterpret_cast<float*>(ws + L.sum_dyy);
  if (cfg.router_norm == RouterNorm::batch) {
    mode = training ? 2 : 1;
    if (training) {
      launch_norm_grad_sums(ColumnPair{dz_r, nr, dz_c, nc}, ColumnPair{z_r, nr, z_c, nc}, tokens,
                            sum_dy, sum_dyy, reinterpret_cast<float*>(ws + L.partials), stream);
    }
  }
  const float* rstd_r = static_cast<const float*>(saved.row_rstd.data);
  const float* rstd_c = static_cast<const float*>(saved.col_rstd.data);
  void* dl = ws + L.dl;
  // 16-byte groups: the halves' rows, rstd and the sums (workspace, aligned) in fours.
  const bool vec4 = nr % 4 == 0 && nc % 4 == 0 &&
                    (mode == 0 || ((reinterpret_cast<uintptr_t>(rstd_r) |
                                    reinterpret_cast<uintptr_t>(rstd_c) |
                                    reinterpret_cast<uintptr_t>(z_r) |
                                    reinterpret_cast<uintptr_t>(z_c)) & 15) == 0);
  dispatch_storage(ct, [&](auto tag) {
    using CT = decltype(tag);
    if (vec4) {
      launch_kernel("router_backward (batch-norm backward)", norm_backward_kernel<CT, 4>,
                    dim3(grid_for(tokens * columns / 4, 256)), dim3(256), 0, stream, tokens, nr,
                    nc, mode, dz_r, dz_c, z_r, z_c, rstd_r, rstd_c, sum_dy, sum_dyy,
                    static_cast<CT*>(dl));
    } else {
      launch_kernel("router_backward (batch-norm backward)", norm_backward_kernel<CT, 1>,
                    dim3(grid_for(tokens * columns, 256)), dim3(256), 0, stream, tokens, nr, nc,
                    mode, dz_r, dz_c, z_r, z_c, rstd_r, rstd_c, sum_dy, sum_dyy,
                    static_cast<CT*>(dl));
    }
  });

  // 3. [W_r; W_c] (and x, for f16) in the compute type; no copy when W_c follows W_r in memory.
  const TensorView w_stacked = stacked_rows(weights.row, weights.col);
  const bool copy_w = ct != xt || w_stacked.data == nullptr;
  void* w_cat = ws + L.w;
  const size_t ct_size = dtype_size(ct);
  dispatch_storage(xt, [&](auto src_tag) {
    using Src = decltype(src_tag);
    dispatch_storage(ct, [&](auto dst_tag) {
      using Dst = decltype(dst_tag);
      const StackedRows<Src> w{static_cast<const Src*>(weights.row.data), weights.row.strides[0],
                               nr, static_cast<const Src*>(weights.col.data),
                               weights.col.strides[0]};
      if (copy_w) convert_rows<Src, Dst>(w, w_cat, d, columns, d, stream);
      if (ct != xt) {
        const Src* xs = static_cast<const Src*>(x.data);
        convert_rows<Src, Dst>({xs, x.strides[0], tokens, xs, x.strides[0]}, ws + L.x, d, tokens, d,
                               stream);
      }
    });
  });
  const TensorView x_ct = ct == xt ? x : view(ws + L.x, ct, tokens, d, d, dev);
  const TensorView dl_r = view(dl, ct, tokens, nr, columns, dev);
  const TensorView dl_c =
      view(static_cast<char*>(dl) + static_cast<size_t>(nr) * ct_size, ct, tokens, nc, columns,
           dev);
  const TensorView dl_all = view(dl, ct, tokens, columns, columns, dev);
  const TensorView w_all = copy_w ? view(w_cat, ct, columns, d, d, dev) : w_stacked;

  // 4. The GEMMs: both weight gradients in one when grads.col follows grads.row in memory.
  const TensorView grads_stacked = stacked_rows(grads.row, grads.col);
  if (ct == xt) {
    if (grads_stacked.data != nullptr) {
      gemm(dl_all, true, x_ct, false, grads_stacked, 1.0f, 0.0f, gemm_ws, exec);
    } else {
      gemm(dl_r, true, x_ct, false, grads.row, 1.0f, 0.0f, gemm_ws, exec);
      gemm(dl_c, true, x_ct, false, grads.col, 1.0f, 0.0f, gemm_ws, exec);
    }
    gemm(dl_all, false, w_all, false, dx, 1.0f, accumulate_dx ? 1.0f : 0.0f, gemm_ws, exec);
    return;
  }
  float* tmp = reinterpret_cast<float*>(ws + L.tmp);
  auto finish = [&](const TensorView& dst, int64_t rows, bool accumulate) {
    dispatch_storage(xt, [&](auto tag) {
      using T = decltype(tag);
      store_result_kernel<T><<<grid_for(rows * d, 256), 256, 0, stream>>>(
          tmp, static_cast<T*>(dst.data), dst.strides[0], rows, d, accumulate);
      OMNIMOE_CUDA_CHECK_LAUNCH("router_backward (store)");
    });
  };
  if (grads_stacked.data != nullptr) {
    gemm(dl_all, true, x_ct, false, view(tmp, DType::f32, columns, d, d, dev), 1.0f, 0.0f, gemm_ws,
         exec);
    finish(grads_stacked, columns, false);
  } else {
    gemm(dl_r, true, x_ct, false, view(tmp, DType::f32, nr, d, d, dev), 1.0f, 0.0f, gemm_ws, exec);
    finish(grads.row, nr, false);
    gemm(dl_c, true, x_ct, false, view(tmp, DType::f32, nc, d, d, dev), 1.0f, 0.0f, gemm_ws, exec);
    finish(grads.col, nc, false);
  }
  gemm(dl_all, false, w_all, false, view(tmp, DType::f32, tokens, d, d, dev), 1.0f, 0.0f, gemm_ws,
       exec);
  finish(dx, tokens, accumulate_dx);
}

}  // namespace omnimoe::cuda
