// Dense-masked execution of the atomic experts (see experts_dense.cuh). Every product is a
// cuBLASLt GEMM (cuda::gemm); the kernels here build the coefficient matrices from S, one block
// per token row, zeros included, so that each matrix is written once with 16-byte stores.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "backend/backend.h"
#include "cuda/cuda_common.cuh"
#include "cuda/experts_activation.cuh"
#include "cuda/experts_dense.cuh"
#include "cuda/gemm.h"

namespace omnimoe::cuda {
namespace {

// Bytes of the chunk matrices (S in f32 plus the storage-dtype coefficient matrices): large
// enough that the GEMMs run at full rate, small enough to sit beside the layer's other buffers.
constexpr int64_t kChunkBudgetBytes = int64_t{512} << 20;
constexpr uintptr_t kAlign = 256;  // every carved buffer starts on 256 bytes (cuBLASLt's best)
constexpr int kThreads = 256;
// Columns of a coefficient row built in shared memory at a time (16 KB per 16-bit matrix).
constexpr int kSegment = 8192;
// Pairs per thread of a fill block's batch (4096 pairs per block).
constexpr int kPairsPerThread = 16;

size_t round_up(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }
// Row stride of the chunk matrices: a multiple of 8 elements, so rows start on 16 bytes.
__host__ __device__ constexpr int64_t padded(int64_t cols) { return ceil_div(cols, 8) * 8; }

// A positive cap from the environment, or 0.
int64_t env_cap(const char* name) {
  if (const char* v = std::getenv(name); v && *v) {
    const long long n = std::strtoll(v, nullptr, 10);
    if (n > 0) return n;
  }
  return 0;
}

enum class Direction { forward, backward };

// How a call is cut: `count` even chunks of `size` tokens (forward) or experts (backward; the
// last chunk may be smaller); the chunk matrices have `rows` rows of stride `ld` elements.
struct Chunking {
  int64_t size, count, rows, ld;
};

// `limit` (at least 1) items per chunk at most: the fewest chunks, then equal sizes.
void cut(Chunking& c, int64_t items, int64_t limit) {
  c.count = ceil_div(items, std::min(limit, items));
  c.size = ceil_div(items, c.count);
}

Chunking chunking(const LayerConfig& cfg, int64_t tokens, DType dtype, Direction dir) {
  const int64_t n = cfg.num_experts();
  const auto es = static_cast<int64_t>(dtype_size(dtype));
  const int64_t t = std::max<int64_t>(tokens, 1);
  Chunking c{};
  if (dir == Direction::forward) {  // [Tc, N] S (f32) and A
    c.ld = padded(n);
    int64_t limit = std::max<int64_t>(1, kChunkBudgetBytes / (c.ld * (4 + es)));
    if (const int64_t cap = env_cap("OMNIMOE_EXPERTS_DENSE_CHUNK_TOKENS"))
      limit = std::min(limit, cap);
    cut(c, t, limit);
    c.rows = c.size;
    return c;
  }
  // [T, Nc] S (f32), DA high and low, G: 4 + 3 storage elements per token and expert.
  // At most one fill segment (kSegment experts) per chunk.
  int64_t limit = std::clamp<int64_t>(kChunkBudgetBytes / (t * (4 + 3 * es)), 1, kSegment);
  if (const int64_t cap = env_cap("OMNIMOE_EXPERTS_DENSE_CHUNK_EXPERTS"))
    limit = std::min(limit, cap);
  cut(c, n, limit);
  c.rows = t;
  c.ld = padded(c.size);
  return c;
}

// The caller's workspace, carved in the order the sizes are listed.
struct Layout {
  size_t s = 0;     // f32 [rows, ld]
  size_t coef = 0;  // A (forward) or DA high over DA low, [2 rows, ld], then G (backward)
  size_t gh = 0;    // G [rows, ld] (backward)
  size_t x2 = 0;    // [2T, d] storage: X over X (backward)
  size_t sum = 0;   // f32 [T, d]: dx summed over chunks (backward)
  size_t total() const {
    return (kAlign - 1) + round_up(s) + round_up(coef) + round_up(gh) + round_up(x2) +
           round_up(sum) + gemm_workspace_bytes();
  }
};

Layout layout(const LayerConfig& cfg, int64_t tokens, DType dtype, Direction dir) {
  const Chunking c = chunking(cfg, tokens, dtype, dir);
  const size_t es = dtype_size(dtype);
  const auto cells = static_cast<size_t>(c.rows * c.ld);
  const auto td = static_cast<size_t>(tokens * cfg.hidden);
  Layout l;
  l.s = cells * sizeof(float);
  if (dir == Direction::forward) {
    l.coef = cells * es;
  } else {
    l.coef = 2 * cells * es;
    l.gh = cells * es;
    l.x2 = 2 * td * es;
    l.sum = td * sizeof(float);
  }
  return l;
}

struct Carved {
  float* s = nullptr;
  void* coef = nullptr;
  void* gh = nullptr;
  void* x2 = nullptr;
  float* sum = nullptr;
  Buffer gemm_ws;
};

Carved carve(Buffer ws, const Layout& l) {
  uintptr_t p = (reinterpret_cast<uintptr_t>(ws.data) + kAlign - 1) / kAlign * kAlign;
  auto take = [&p](size_t bytes) {
    void* r = reinterpret_cast<void*>(p);
    p += round_up(bytes);
    return r;
  };
  Carved c;
  c.s = static_cast<float*>(take(l.s));
  c.coef = take(l.coef);
  c.gh = take(l.gh);
  c.x2 = take(l.x2);
  c.sum = static_cast<float*>(take(l.sum));
  c.gemm_ws = Buffer{reinterpret_cast<void*>(p), gemm_workspace_bytes()};
  return c;
}

// Rows [r0, r0 + rows) of a 2-D view.
TensorView rows_of(const TensorView& v, int64_t r0, int64_t rows) {
  TensorView r = v;
  const auto elem = static_cast<int64_t>(dtype_size(v.dtype));
  r.data = static_cast<char*>(v.data) + r0 * v.strides[0] * elem;
  r.shape[0] = rows;
  return r;
}

// A fill block builds one row of each coefficient matrix in shared memory (16-bit bit patterns,
// zeros included) and writes it with 16-byte stores. Each thread takes kPairsPerThread of the
// row's pairs and issues their loads together, in two groups, before using any: a first version
// that loaded pair by pair inside each segment spent ~0.4 ms per chunk on serialised misses
// (paper-k4096-t4k, H100).
constexpr int64_t kCachedPairs = int64_t{kThreads} * kPairsPerThread;

// The bits of a 16-bit storage value.
template <typename T>
__device__ __forceinline__ uint32_t bits_of(T v) {
  uint16_t b;
  memcpy(&b, &v, sizeof(b));
  return b;
}

// Zeroes `count` (a multiple of 8) 16-bit elements of shared memory.
__device__ __forceinline__ void zero_segment(uint16_t* seg, int count) {
  for (int i = threadIdx.x; i < count / 8; i += kThreads) {
    reinterpret_cast<uint4*>(seg)[i] = make_uint4(0, 0, 0, 0);
  }
}

// dst[0, count) = seg[0, count) with 16-byte stores (count a multiple of 8, dst 16-byte aligned).
template <typename T>
__device__ __forceinline__ void store_segment(T* __restrict__ dst, const uint16_t* seg, int count) {
  for (int i = threadIdx.x; i < count / 8; i += kThreads) {
    reinterpret_cast<uint4*>(dst)[i] = reinterpret_cast<const uint4*>(seg)[i];
  }
}

// Columns [s0, s0 + width) of a row: width, and width rounded up to 8 (the pad columns up to
// the row stride get zeros).
struct Segment {
  int width, width8;
};
__device__ __forceinline__ Segment segment_at(int64_t s0, int64_t cols) {
  const int width = static_cast<int>(cols - s0 < kSegment ? cols - s0 : kSegment);
  return {width, static_cast<int>(padded(width))};
}

// Pair k = threadIdx.x + j * kThreads of the row: its expert's column relative to c0 when the
// expert lies in [c0, c0 + cols), else -1.
__device__ __forceinline__ void load_columns(int32_t col[kPairsPerThread], const int32_t* idx_row,
                                             int64_t top_k, int64_t c0, int64_t cols) {
#pragma unroll
  for (int j = 0; j < kPairsPerThread; ++j) {
    const int64_t k = static_cast<int64_t>(threadIdx.x) + j * kThreads;
    const int64_t c = k < top_k ? idx_row[k] - c0 : -1;
    col[j] = c >= 0 && c < cols ? static_cast<int32_t>(c) : -1;
  }
}

// Forward, one block per row r of the chunk (indices, gates and preact offset to its first
// token), over all cols = N experts in segments of kSegment columns: for the row's pairs,
// preact = S[r, e] and A[r, e] = g * act(preact); every other entry of A's row is zero. Rows of
// K <= 4096 keep their pairs' columns and values in shared memory across the segments; longer
// rows read their pairs again per segment. Ids are distinct per token (a repeated id would race
// for one entry).
template <typename T, Activation act>
__global__ void __launch_bounds__(kThreads, 1)
    dense_forward_fill_kernel(const float* __restrict__ s, T* __restrict__ a, int64_t ld,
                              int64_t cols, const int32_t* __restrict__ idx,
                              const float* __restrict__ gates, float* __restrict__ preact,
                              int64_t top_k) {
  __shared__ __align__(16) uint16_t seg[kSegment];
  const int64_t r = blockIdx.x;
  const float* s_row = s + r * ld;
  T* a_row = a + r * ld;
  const int32_t* idx_row = idx + r * top_k;
  const float* g_row = gates + r * top_k;
  float* z_row = preact + r * top_k;
  if (top_k <= kCachedPairs) {  // uniform over the block
    // Each thread's pairs: column and value staged in shared memory for the segment passes.
    __shared__ int32_t pair_col[kCachedPairs];
    __shared__ uint16_t pair_val[kCachedPairs];
    constexpr int kGroup = kPairsPerThread / 2;
    int32_t col[kPairsPerThread];
    load_columns(col, idx_row, top_k, 0, cols);
#pragma unroll
    for (int j0 = 0; j0 < kPairsPerThread; j0 += kGroup) {
      float sv[kGroup], gv[kGroup];
#pragma unroll
      for (int i = 0; i < kGroup; ++i) {
        const int j = j0 + i;
        const int64_t k = static_cast<int64_t>(threadIdx.x) + j * kThreads;
        sv[i] = col[j] >= 0 ? s_row[col[j]] : 0.0f;
        gv[i] = col[j] >= 0 ? g_row[k] : 0.0f;
      }
#pragma unroll
      for (int i = 0; i < kGroup; ++i) {
        const int j = j0 + i;
        const int k = threadIdx.x + j * kThreads;
        pair_col[k] = col[j];
        if (col[j] < 0) continue;
        z_row[k] = sv[i];
        pair_val[k] = static_cast<uint16_t>(bits_of(store_float<T>(gv[i] * activate(act, sv[i]))));
      }
    }
    for (int64_t s0 = 0; s0 < cols; s0 += kSegment) {
      const Segment sg = segment_at(s0, cols);
      zero_segment(seg, sg.width8);
      __syncthreads();
      for (int j = 0; j < kPairsPerThread; ++j) {  // this thread's own entries: no barrier
        const int k = threadIdx.x + j * kThreads;
        const int c = pair_col[k] - static_cast<int>(s0);
        if (c >= 0 && c < sg.width) seg[c] = pair_val[k];
      }
      __syncthreads();
      store_segment(a_row + s0, seg, sg.width8);
      __syncthreads();  // before the next segment zeroes seg
    }
    return;
  }
  // Longer rows: each segment reads the row's pairs again.
  for (int64_t s0 = 0; s0 < cols; s0 += kSegment) {
    const Segment sg = segment_at(s0, cols);
    zero_segment(seg, sg.width8);
    __syncthreads();
    for (int64_t k = threadIdx.x; k < top_k; k += kThreads) {
      const int64_t c = idx_row[k] - s0;
      if (c >= 0 && c < sg.width) {
        const float z = s_row[s0 + c];
        z_row[k] = z;
        seg[c] = static_cast<uint16_t>(bits_of(store_float<T>(g_row[k] * activate(act, z))));
      }
    }
    __syncthreads();
    store_segment(a_row + s0, seg, sg.width8);
    __syncthreads();
  }
}

// Backward, one block per token row r of the chunk's expert columns [c0, c0 + cols), cols <=
// kSegment (the chunk is one segment, so nothing is kept across segments): for each pair with e
// in the chunk, s = S[r, e - c0] (= dy_r . V[e]), h = act(preact): dgates = h * s; DA[r, e - c0]
// = g * s * act'(preact) as a high and a low storage-dtype part (their sum keeps ~16 mantissa
// bits: rounding da to bf16 alone failed the tolerance on dW, where large terms cancel);
// G[r, e - c0] = g * h. Every other entry of the three rows is zero. The row's pairs go in
// batches of kCachedPairs, each thread's loads of a batch issued in two groups.
template <typename T, Activation act>
__global__ void __launch_bounds__(kThreads)
    dense_backward_fill_kernel(const float* __restrict__ s, T* __restrict__ da_high,
                               T* __restrict__ da_low, T* __restrict__ gh, int64_t ld, int64_t cols,
                               int64_t c0, const int32_t* __restrict__ idx,
                               const float* __restrict__ gates, const float* __restrict__ preact,
                               float* __restrict__ dgates, int64_t top_k) {
  __shared__ __align__(16) uint16_t seg_high[kSegment];
  __shared__ __align__(16) uint16_t seg_low[kSegment];
  __shared__ __align__(16) uint16_t seg_g[kSegment];
  constexpr int kGroup = kPairsPerThread / 2;
  const int64_t r = blockIdx.x;
  const float* s_row = s + r * ld;
  const int width8 = static_cast<int>(padded(cols));  // cols <= kSegment
  zero_segment(seg_high, width8);
  zero_segment(seg_low, width8);
  zero_segment(seg_g, width8);
  __syncthreads();
  for (int64_t k0 = 0; k0 < top_k; k0 += kCachedPairs) {
    const int64_t base = r * top_k + k0;  // pair k0 + threadIdx.x + j * kThreads of the row
    int32_t col[kPairsPerThread];
    load_columns(col, idx + base, top_k - k0, c0, cols);
#pragma unroll
    for (int j0 = 0; j0 < kPairsPerThread; j0 += kGroup) {
      float sv[kGroup], zv[kGroup], gv[kGroup];
#pragma unroll
      for (int i = 0; i < kGroup; ++i) {
        const int j = j0 + i;
        const int64_t p = base + threadIdx.x + j * kThreads;
        sv[i] = col[j] >= 0 ? s_row[col[j]] : 0.0f;
        zv[i] = col[j] >= 0 ? preact[p] : 0.0f;
        gv[i] = col[j] >= 0 ? gates[p] : 0.0f;
      }
#pragma unroll
      for (int i = 0; i < kGroup; ++i) {
        const int j = j0 + i;
        if (col[j] < 0) continue;
        const float h = activate(act, zv[i]);
        const float dav = gv[i] * sv[i] * activate_grad(act, zv[i]);
        const T high = store_float<T>(dav);
        dgates[base + threadIdx.x + j * kThreads] = h * sv[i];
        seg_high[col[j]] = static_cast<uint16_t>(bits_of(high));
        seg_low[col[j]] = static_cast<uint16_t>(bits_of(store_float<T>(dav - load_float(high))));
        seg_g[col[j]] = static_cast<uint16_t>(bits_of(store_float<T>(gv[i] * h)));
      }
    }
  }
  __syncthreads();
  const int64_t off = r * ld;
  store_segment(da_high + off, seg_high, width8);
  store_segment(da_low + off, seg_low, width8);
  store_segment(gh + off, seg_g, width8);
}

// dst (storage dtype, any row stride) = src (f32, dense [rows, cols]), plus dst when accumulate.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    store_sum_kernel(const float* __restrict__ src, T* __restrict__ dst, int64_t rows, int64_t cols,
                     int64_t dst_stride, bool accumulate) {
  const int64_t total = rows * cols;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    T* p = dst + (i / cols) * dst_stride + i % cols;
    *p = store_float<T>(accumulate ? load_float(*p) + src[i] : src[i]);
  }
}

template <typename T>
void store_sum(const float* src, const TensorView& dst, bool accumulate, cudaStream_t stream) {
  const int64_t total = dst.shape[0] * dst.shape[1];
  if (total == 0) return;
  const auto blocks =
      static_cast<unsigned>(std::min<int64_t>(ceil_div(total, kThreads), 65535 * 4));
  store_sum_kernel<T><<<blocks, kThreads, 0, stream>>>(src, static_cast<T*>(dst.data), dst.shape[0],
                                                       dst.shape[1], dst.strides[0], accumulate);
  OMNIMOE_CUDA_CHECK_LAUNCH("store_sum_kernel");
}

// Calls fn(std::integral_constant<Activation, act>{}): the fill kernels are compiled per
// activation (one formula per kernel keeps their registers under the cap).
template <typename Fn>
void dispatch_activation(Activation act, Fn&& fn) {
  switch (act) {
    case Activation::silu:
      fn(std::integral_constant<Activation, Activation::silu>{});
      return;
    case Activation::gelu:
      fn(std::integral_constant<Activation, Activation::gelu>{});
      return;
    case Activation::relu:
      fn(std::integral_constant<Activation, Activation::relu>{});
      return;
  }
  OMNIMOE_FAIL("experts dense: unknown activation ", static_cast<int>(act));
}

unsigned row_blocks(int64_t rows) {
  OMNIMOE_CHECK(rows <= INT32_MAX, "experts dense: grid too large (", rows, " rows)");
  return static_cast<unsigned>(rows);
}

// Zeroes a [rows, cols] view with any row stride (0 bits are +0 in every float type).
void zero_rows(const TensorView& v, cudaStream_t stream) {
  const size_t elem = dtype_size(v.dtype);
  if (v.shape[0] == 0 || v.shape[1] == 0) return;
  const size_t pitch = static_cast<size_t>(std::max(v.strides[0], v.shape[1])) * elem;
  OMNIMOE_CUDA_CHECK(cudaMemset2DAsync(v.data, pitch, 0, static_cast<size_t>(v.shape[1]) * elem,
                                       static_cast<size_t>(v.shape[0]), stream));
}

// Copies a [rows, cols] view (any row stride) into dense rows at dst.
void copy_rows(const TensorView& v, void* dst, cudaStream_t stream) {
  const size_t elem = dtype_size(v.dtype);
  const size_t width = static_cast<size_t>(v.shape[1]) * elem;
  const size_t pitch = static_cast<size_t>(std::max(v.strides[0], v.shape[1])) * elem;
  OMNIMOE_CUDA_CHECK(cudaMemcpy2DAsync(dst, width, v.data, pitch, width,
                                       static_cast<size_t>(v.shape[0]), cudaMemcpyDeviceToDevice,
                                       stream));
}

template <typename T>
void forward_typed(const LayerConfig& cfg, const TensorView& x, const ExpertWeights& w,
                   const TensorView& indices, const TensorView& gates, const TensorView& y,
                   bool accumulate, const TensorView& preact, Buffer workspace, const Exec& exec) {
  const int64_t tokens = x.shape[0], n = cfg.num_experts(), K = cfg.top_k;
  const DType dtype = x.dtype;
  const cudaStream_t stream = stream_of(exec);
  const Chunking c = chunking(cfg, tokens, dtype, Direction::forward);
  const Carved ws = carve(workspace, layout(cfg, tokens, dtype, Direction::forward));
  const auto* idx = static_cast<const int32_t*>(indices.data);
  const auto* g = static_cast<const float*>(gates.data);
  auto* z = static_cast<float*>(preact.data);
  auto* a = static_cast<T*>(ws.coef);
  for (int64_t t0 = 0; t0 < tokens; t0 += c.size) {
    const int64_t rows = std::min(c.size, tokens - t0);
    const TensorView s = TensorView::matrix(ws.s, DType::f32, rows, n, c.ld, exec.device);
    const TensorView av = TensorView::matrix(a, dtype, rows, n, c.ld, exec.device);
    gemm(rows_of(x, t0, rows), false, w.up, true, s, 1.0f, 0.0f, ws.gemm_ws, exec);
    dispatch_activation(cfg.act, [&](auto act) {
      dense_forward_fill_kernel<T, decltype(act)::value><<<row_blocks(rows), kThreads, 0, stream>>>(
          ws.s, a, c.ld, n, idx + t0 * K, g + t0 * K, z + t0 * K, K);
    });
    OMNIMOE_CUDA_CHECK_LAUNCH("dense_forward_fill_kernel");
    gemm(av, false, w.down, false, rows_of(y, t0, rows), 1.0f, accumulate ? 1.0f : 0.0f, ws.gemm_ws,
         exec);
  }
}

template <typename T>
void backward_typed(const LayerConfig& cfg, const TensorView& x, const ExpertWeights& w,
                    const TensorView& indices, const TensorView& gates, const TensorView& preact,
                    const TensorView& dy, const TensorView& dx, bool accumulate_dx,
                    const ExpertWeights& grads, const TensorView& dgates, Buffer workspace,
                    const Exec& exec) {
  const int64_t tokens = x.shape[0], n = cfg.num_experts(), K = cfg.top_k, d = cfg.hidden;
  const DType dtype = x.dtype;
  const cudaStream_t stream = stream_of(exec);
  if (tokens == 0) {  // no pairs: the weight gradients are zero
    zero_rows(grads.up, stream);
    zero_rows(grads.down, stream);
    return;
  }
  const Chunking c = chunking(cfg, tokens, dtype, Direction::backward);
  const Carved ws = carve(workspace, layout(cfg, tokens, dtype, Direction::backward));
  // X over X: dW = DA_high^T X + DA_low^T X as one product with the inner dimension doubled.
  auto* x2 = static_cast<T*>(ws.x2);
  copy_rows(x, x2, stream);
  copy_rows(x, x2 + tokens * d, stream);
  const TensorView x_twice = TensorView::matrix(x2, dtype, 2 * tokens, d, d, exec.device);
  const TensorView dx_sum = TensorView::matrix(ws.sum, DType::f32, tokens, d, d, exec.device);
  auto* da = static_cast<T*>(ws.coef);  // DA high in rows [0, T), DA low in rows [T, 2T)
  auto* gh = static_cast<T*>(ws.gh);
  const auto* idx = static_cast<const int32_t*>(indices.data);
  const auto* g = static_cast<const float*>(gates.data);
  const auto* z = static_cast<const float*>(preact.data);
  auto* dg = static_cast<float*>(dgates.data);
  for (int64_t ci = 0; ci < c.count; ++ci) {
    const int64_t e0 = ci * c.size, cols = std::min(c.size, n - e0);
    const TensorView s = TensorView::matrix(ws.s, DType::f32, tokens, cols, c.ld, exec.device);
    const TensorView da_high = TensorView::matrix(da, dtype, tokens, cols, c.ld, exec.device);
    const TensorView da_both = TensorView::matrix(da, dtype, 2 * tokens, cols, c.ld, exec.device);
    const TensorView ghv = TensorView::matrix(gh, dtype, tokens, cols, c.ld, exec.device);
    gemm(dy, false, rows_of(w.down, e0, cols), true, s, 1.0f, 0.0f, ws.gemm_ws, exec);
    dispatch_activation(cfg.act, [&](auto act) {
      dense_backward_fill_kernel<T, decltype(act)::value>
          <<<row_blocks(tokens), kThreads, 0, stream>>>(ws.s, da, da + tokens * c.ld, gh, c.ld,
                                                        cols, e0, idx, g, z, dg, K);
    });
    OMNIMOE_CUDA_CHECK_LAUNCH("dense_backward_fill_kernel");
    // dx sums over chunks in fp32; dW and dV rows of the chunk are written once (rows of
    // experts nobody chose come out zero).
    gemm(da_high, false, rows_of(w.up, e0, cols), false, dx_sum, 1.0f, ci == 0 ? 0.0f : 1.0f,
         ws.gemm_ws, exec);
    gemm(da_both, true, x_twice, false, rows_of(grads.up, e0, cols), 1.0f, 0.0f, ws.gemm_ws, exec);
    gemm(ghv, true, dy, false, rows_of(grads.down, e0, cols), 1.0f, 0.0f, ws.gemm_ws, exec);
  }
  store_sum<T>(ws.sum, dx, accumulate_dx, stream);
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
  if (tokens == 0) return 0;
  return layout(cfg, tokens, dtype, Direction::forward).total();
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
  if (tokens == 0) return 0;  // backward with no tokens only zeroes dW and dV
  return layout(cfg, tokens, dtype, Direction::backward).total();
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
