// Dense-masked execution of the atomic experts (see experts_dense.cuh). Every product is a
// cuBLASLt GEMM (cuda::gemm); the only kernels here pick the chosen entries of S per pair and
// scatter the coefficients into the zeroed [chunk, N] matrices.
#include <algorithm>
#include <cstdlib>

#include "backend/backend.h"
#include "cuda/cuda_common.cuh"
#include "cuda/experts_activation.cuh"
#include "cuda/experts_dense.cuh"
#include "cuda/gemm.h"

namespace omnimoe::cuda {
namespace {

// Bytes of the [chunk, N] buffers (S in f32, then the storage-dtype coefficient matrices:
// A forward; DA's high and low parts and G backward): large enough that the GEMMs run at full rate (about 870 tokens per chunk at
// N = 102,400), small enough to sit beside the layer's other buffers.
constexpr int64_t kChunkBudgetBytes = int64_t{512} << 20;
constexpr uintptr_t kAlign = 256;  // every carved buffer starts on 256 bytes (cuBLASLt's best)
constexpr int kThreads = 256;

enum class Direction { forward, backward };

size_t round_up(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

// Tokens per chunk: the budget over the bytes of one token's row in every [chunk, N] buffer,
// at least 1, at most the call's tokens; OMNIMOE_EXPERTS_DENSE_CHUNK_TOKENS caps it (tests).
int64_t chunk_tokens(const LayerConfig& cfg, int64_t tokens, DType dtype, Direction dir) {
  const int64_t n = cfg.num_experts();
  const int64_t coef_mats = dir == Direction::forward ? 1 : 3;
  const int64_t row_bytes = n * (4 + coef_mats * static_cast<int64_t>(dtype_size(dtype)));
  int64_t tc = std::max<int64_t>(1, kChunkBudgetBytes / row_bytes);
  if (const char* cap = std::getenv("OMNIMOE_EXPERTS_DENSE_CHUNK_TOKENS"); cap && *cap) {
    const long long v = std::strtoll(cap, nullptr, 10);
    if (v > 0) tc = std::min<int64_t>(tc, v);
  }
  return std::min(tc, std::max<int64_t>(tokens, 1));
}

size_t workspace_bytes(const LayerConfig& cfg, int64_t tokens, DType dtype, Direction dir) {
  if (tokens == 0) return 0;  // backward with no tokens only zeroes dW and dV
  const int64_t tc = chunk_tokens(cfg, tokens, dtype, dir);
  const auto cells = static_cast<size_t>(tc * cfg.num_experts());
  const size_t coef_mats = dir == Direction::forward ? 1 : 3;
  // Backward sums dW and dV over chunks in fp32 [N, d] buffers, rounded to storage once.
  const size_t accumulators =
      dir == Direction::forward ? 0
                                : 2 * round_up(static_cast<size_t>(cfg.num_experts() * cfg.hidden) *
                                               sizeof(float));
  return (kAlign - 1) + round_up(cells * sizeof(float)) +
         coef_mats * round_up(cells * dtype_size(dtype)) + accumulators + gemm_workspace_bytes();
}

// The caller's workspace carved as workspace_bytes lays it out.
struct Carved {
  float* s = nullptr;  // [tc, N] f32
  void* coef[3] = {};  // [tc, N] storage dtype: A (forward), or DA high, DA low, G (backward)
  float* dw = nullptr;  // [N, d] f32 sums over chunks (backward)
  float* dv = nullptr;
  Buffer gemm_ws;
};

Carved carve(Buffer ws, int64_t tc, int64_t n, int64_t d, DType dtype, Direction dir) {
  const auto cells = static_cast<size_t>(tc * n);
  uintptr_t p = (reinterpret_cast<uintptr_t>(ws.data) + kAlign - 1) / kAlign * kAlign;
  Carved c;
  c.s = reinterpret_cast<float*>(p);
  p += round_up(cells * sizeof(float));
  const int mats = dir == Direction::forward ? 1 : 3;
  for (int i = 0; i < mats; ++i) {
    c.coef[i] = reinterpret_cast<void*>(p);
    p += round_up(cells * dtype_size(dtype));
  }
  if (dir == Direction::backward) {
    const size_t acc_bytes = round_up(static_cast<size_t>(n * d) * sizeof(float));
    c.dw = reinterpret_cast<float*>(p);
    p += acc_bytes;
    c.dv = reinterpret_cast<float*>(p);
    p += acc_bytes;
  }
  c.gemm_ws = Buffer{reinterpret_cast<void*>(p), gemm_workspace_bytes()};
  return c;
}

// Rows [t0, t0 + rows) of a 2-D view.
TensorView rows_of(const TensorView& v, int64_t t0, int64_t rows) {
  TensorView r = v;
  const auto elem = static_cast<int64_t>(dtype_size(v.dtype));
  r.data = static_cast<char*>(v.data) + t0 * v.strides[0] * elem;
  r.shape[0] = rows;
  return r;
}

// Per pair p = (t, k) of the chunk (indices, gates, preact already offset to its first token):
// preact = S[t, e], A[t, e] = g * act(preact). A was zeroed; ids are distinct per token.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    dense_forward_pairs_kernel(const float* __restrict__ s, int64_t n, T* __restrict__ a,
                               const int32_t* __restrict__ idx, const float* __restrict__ gates,
                               float* __restrict__ preact, int64_t pairs, int top_k,
                               Activation act) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (p >= pairs) return;
  const int64_t cell = (p / top_k) * n + idx[p];
  const float z = s[cell];
  preact[p] = z;
  a[cell] = store_float<T>(gates[p] * activate(act, z));
}

// Per pair: s = S[t, e] (= dy_t . V[e]), h = act(preact); dgates = h * s; DA[t, e] =
// g * s * act'(preact) as a high and a low storage-dtype part (their sum carries ~16 mantissa
// bits: rounding da to bf16 alone failed the tolerance on dW, where large terms cancel),
// G[t, e] = g * h. DA and G were zeroed.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    dense_backward_pairs_kernel(const float* __restrict__ s, int64_t n, T* __restrict__ da,
                                T* __restrict__ da_low, T* __restrict__ gh,
                                const int32_t* __restrict__ idx,
                                const float* __restrict__ gates, const float* __restrict__ preact,
                                float* __restrict__ dgates, int64_t pairs, int top_k,
                                Activation act) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (p >= pairs) return;
  const int64_t cell = (p / top_k) * n + idx[p];
  const float sv = s[cell];
  const float z = preact[p];
  const float g = gates[p];
  const float h = activate(act, z);
  dgates[p] = h * sv;
  const float dav = g * sv * activate_grad(act, z);
  const T high = store_float<T>(dav);
  da[cell] = high;
  da_low[cell] = store_float<T>(dav - load_float(high));
  gh[cell] = store_float<T>(g * h);
}

// dst (storage dtype, any row stride) = src (f32, dense [rows, cols]).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    store_rows_kernel(const float* __restrict__ src, T* __restrict__ dst, int64_t rows,
                      int64_t cols, int64_t dst_stride) {
  const int64_t total = rows * cols;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    dst[(i / cols) * dst_stride + i % cols] = store_float<T>(src[i]);
  }
}

template <typename T>
void store_rows(const float* src, const TensorView& dst, cudaStream_t stream) {
  const int64_t total = dst.shape[0] * dst.shape[1];
  const auto blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(total, kThreads), 65535 * 4));
  store_rows_kernel<T><<<blocks, kThreads, 0, stream>>>(src, static_cast<T*>(dst.data),
                                                        dst.shape[0], dst.shape[1],
                                                        dst.strides[0]);
  OMNIMOE_CUDA_CHECK_LAUNCH("store_rows_kernel");
}

unsigned pair_blocks(int64_t pairs) {
  const int64_t blocks = ceil_div(pairs, kThreads);
  OMNIMOE_CHECK(blocks <= INT32_MAX, "experts dense: grid too large (", pairs, " pairs)");
  return static_cast<unsigned>(blocks);
}

// Zeroes a [rows, cols] view with any row stride (0 bits are +0 in every float type).
void zero_rows(const TensorView& v, cudaStream_t stream) {
  const size_t elem = dtype_size(v.dtype);
  if (v.shape[0] == 0 || v.shape[1] == 0) return;
  const size_t pitch = static_cast<size_t>(std::max(v.strides[0], v.shape[1])) * elem;
  OMNIMOE_CUDA_CHECK(cudaMemset2DAsync(v.data, pitch, 0, static_cast<size_t>(v.shape[1]) * elem,
                                       static_cast<size_t>(v.shape[0]), stream));
}

template <typename T>
void forward_typed(const LayerConfig& cfg, const TensorView& x, const ExpertWeights& w,
                   const TensorView& indices, const TensorView& gates, const TensorView& y,
                   bool accumulate, const TensorView& preact, Buffer workspace, const Exec& exec) {
  const int64_t tokens = x.shape[0], n = cfg.num_experts(), K = cfg.top_k;
  const DType dtype = x.dtype;
  const cudaStream_t stream = stream_of(exec);
  const int64_t tc = chunk_tokens(cfg, tokens, dtype, Direction::forward);
  const Carved ws = carve(workspace, tc, n, cfg.hidden, dtype, Direction::forward);
  const auto* idx = static_cast<const int32_t*>(indices.data);
  const auto* g = static_cast<const float*>(gates.data);
  auto* z = static_cast<float*>(preact.data);
  for (int64_t t0 = 0; t0 < tokens; t0 += tc) {
    const int64_t rows = std::min(tc, tokens - t0);
    const TensorView s = TensorView::matrix(ws.s, DType::f32, rows, n, n, exec.device);
    const TensorView a = TensorView::matrix(ws.coef[0], dtype, rows, n, n, exec.device);
    gemm(rows_of(x, t0, rows), false, w.up, true, s, 1.0f, 0.0f, ws.gemm_ws, exec);
    OMNIMOE_CUDA_CHECK(
        cudaMemsetAsync(ws.coef[0], 0, static_cast<size_t>(rows * n) * sizeof(T), stream));
    const int64_t pairs = rows * K;
    dense_forward_pairs_kernel<T><<<pair_blocks(pairs), kThreads, 0, stream>>>(
        ws.s, n, static_cast<T*>(ws.coef[0]), idx + t0 * K, g + t0 * K, z + t0 * K, pairs,
        static_cast<int>(K), cfg.act);
    OMNIMOE_CUDA_CHECK_LAUNCH("dense_forward_pairs_kernel");
    gemm(a, false, w.down, false, rows_of(y, t0, rows), 1.0f, accumulate ? 1.0f : 0.0f, ws.gemm_ws,
         exec);
  }
}

template <typename T>
void backward_typed(const LayerConfig& cfg, const TensorView& x, const ExpertWeights& w,
                    const TensorView& indices, const TensorView& gates, const TensorView& preact,
                    const TensorView& dy, const TensorView& dx, bool accumulate_dx,
                    const ExpertWeights& grads, const TensorView& dgates, Buffer workspace,
                    const Exec& exec) {
  const int64_t tokens = x.shape[0], n = cfg.num_experts(), K = cfg.top_k;
  const DType dtype = x.dtype;
  const cudaStream_t stream = stream_of(exec);
  if (tokens == 0) {  // no pairs: the weight gradients are zero
    zero_rows(grads.up, stream);
    zero_rows(grads.down, stream);
    return;
  }
  const int64_t tc = chunk_tokens(cfg, tokens, dtype, Direction::backward);
  const Carved ws = carve(workspace, tc, n, cfg.hidden, dtype, Direction::backward);
  const int64_t d = cfg.hidden;
  const TensorView dw_acc = TensorView::matrix(ws.dw, DType::f32, n, d, d, exec.device);
  const TensorView dv_acc = TensorView::matrix(ws.dv, DType::f32, n, d, d, exec.device);
  const auto* idx = static_cast<const int32_t*>(indices.data);
  const auto* g = static_cast<const float*>(gates.data);
  const auto* z = static_cast<const float*>(preact.data);
  auto* dg = static_cast<float*>(dgates.data);
  for (int64_t t0 = 0; t0 < tokens; t0 += tc) {
    const int64_t rows = std::min(tc, tokens - t0);
    const TensorView s = TensorView::matrix(ws.s, DType::f32, rows, n, n, exec.device);
    const TensorView da = TensorView::matrix(ws.coef[0], dtype, rows, n, n, exec.device);
    const TensorView da_low = TensorView::matrix(ws.coef[1], dtype, rows, n, n, exec.device);
    const TensorView gh = TensorView::matrix(ws.coef[2], dtype, rows, n, n, exec.device);
    const TensorView x_c = rows_of(x, t0, rows), dy_c = rows_of(dy, t0, rows);
    gemm(dy_c, false, w.down, true, s, 1.0f, 0.0f, ws.gemm_ws, exec);
    const size_t coef_bytes = static_cast<size_t>(rows * n) * sizeof(T);
    OMNIMOE_CUDA_CHECK(cudaMemsetAsync(ws.coef[0], 0, coef_bytes, stream));
    OMNIMOE_CUDA_CHECK(cudaMemsetAsync(ws.coef[1], 0, coef_bytes, stream));
    OMNIMOE_CUDA_CHECK(cudaMemsetAsync(ws.coef[2], 0, coef_bytes, stream));
    const int64_t pairs = rows * K;
    dense_backward_pairs_kernel<T><<<pair_blocks(pairs), kThreads, 0, stream>>>(
        ws.s, n, static_cast<T*>(ws.coef[0]), static_cast<T*>(ws.coef[1]),
        static_cast<T*>(ws.coef[2]), idx + t0 * K, g + t0 * K,
        z + t0 * K, dg + t0 * K, pairs, static_cast<int>(K), cfg.act);
    OMNIMOE_CUDA_CHECK_LAUNCH("dense_backward_pairs_kernel");
    const TensorView dx_c = rows_of(dx, t0, rows);
    gemm(da, false, w.up, false, dx_c, 1.0f, accumulate_dx ? 1.0f : 0.0f, ws.gemm_ws, exec);
    gemm(da_low, false, w.up, false, dx_c, 1.0f, 1.0f, ws.gemm_ws, exec);
    // The first chunk overwrites the fp32 sums of dW and dV (rows of unchosen experts come out
    // zero); later chunks add to them, in chunk order.
    const float beta = t0 == 0 ? 0.0f : 1.0f;
    gemm(da, true, x_c, false, dw_acc, 1.0f, beta, ws.gemm_ws, exec);
    gemm(da_low, true, x_c, false, dw_acc, 1.0f, 1.0f, ws.gemm_ws, exec);
    gemm(gh, true, dy_c, false, dv_acc, 1.0f, beta, ws.gemm_ws, exec);
  }
  store_rows<T>(ws.dw, grads.up, stream);
  store_rows<T>(ws.dv, grads.down, stream);
}

// Calls fn(T{}) for the 16-bit storage types this path runs.
template <typename Fn>
void dispatch_half(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::bf16:
      fn(__nv_bfloat16{});
      return;
    case DType::f16:
      fn(__half{});
      return;
    default:
      break;
  }
  OMNIMOE_FAIL("experts dense: dtype must be bf16 or f16, got ", dtype_name(dtype));
}

}  // namespace

bool experts_dense_supports(const LayerConfig&, int64_t, DType dtype) {
  return dtype == DType::bf16 || dtype == DType::f16;
}

size_t experts_dense_forward_workspace_bytes(const LayerConfig& cfg, int64_t tokens, DType dtype) {
  return workspace_bytes(cfg, tokens, dtype, Direction::forward);
}

void experts_dense_forward(const LayerConfig& cfg, const TensorView& x,
                           const ExpertWeights& weights, const TensorView& indices,
                           const TensorView& gates, const TensorView& y, bool accumulate,
                           const TensorView& preact, Buffer workspace, const Exec& exec) {
  const DeviceGuard guard(exec);
  dispatch_half(x.dtype, [&](auto tag) {
    forward_typed<decltype(tag)>(cfg, x, weights, indices, gates, y, accumulate, preact, workspace,
                                 exec);
  });
}

size_t experts_dense_backward_workspace_bytes(const LayerConfig& cfg, int64_t tokens, DType dtype) {
  return workspace_bytes(cfg, tokens, dtype, Direction::backward);
}

void experts_dense_backward(const LayerConfig& cfg, const TensorView& x,
                            const ExpertWeights& weights, const TensorView& indices,
                            const TensorView& gates, const TensorView& preact, const Schedule&,
                            const TensorView& dy, const TensorView& dx, bool accumulate_dx,
                            const ExpertWeights& grads, const TensorView& dgates, Buffer workspace,
                            const Exec& exec) {
  const DeviceGuard guard(exec);
  dispatch_half(x.dtype, [&](auto tag) {
    backward_typed<decltype(tag)>(cfg, x, weights, indices, gates, preact, dy, dx, accumulate_dx,
                                  grads, dgates, workspace, exec);
  });
}

}  // namespace omnimoe::cuda
