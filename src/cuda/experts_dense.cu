// Dense-masked execution of the atomic experts (see experts_dense.cuh). Every product is a
// cuBLASLt GEMM (cuda::gemm); the kernels here build the coefficient matrices from S, one block
// per token row, zeros included, so that each matrix is written once with 16-byte stores.
#include <algorithm>
#include <type_traits>

#include "backend/backend.h"
#include "core/env.h"
#include "cuda/cuda_common.cuh"
#include "cuda/experts_activation.cuh"
#include "cuda/experts_dense.cuh"
#include "cuda/gemm.h"

namespace omnimoe::cuda {
namespace {

// Bytes of the chunk matrices (S plus the storage-dtype coefficient matrices): large enough
// that the GEMMs run at full rate, small enough to sit beside the layer's other buffers. 640 MiB
// holds 1024 tokens of f32 S and A at N = 102,400: the S product ran at 506 TFLOP/s on chunks of
// 512 tokens, 585 on 820 (H100, bf16, ExpertsDenseCudaTiming).
constexpr int64_t kChunkBudgetBytes = int64_t{640} << 20;
constexpr uintptr_t kAlign = 256;  // every carved buffer starts on 256 bytes (cuBLASLt's best)
constexpr int kThreads = 256;
// Columns of a coefficient row built in shared memory at a time (16 KB per 16-bit matrix).
constexpr int kSegment = 8192;
// Pairs per thread whose data a fill block loads once for all its segments (rows of K <= 4096;
// longer rows are re-read per segment).
constexpr int kPairsPerThread = 16;

size_t round_up(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }
// Row stride of the chunk matrices: a multiple of 8 elements, so rows start on 16 bytes.
__host__ __device__ constexpr int64_t padded(int64_t cols) { return ceil_div(cols, 8) * 8; }

// A positive cap from the environment, or 0.
int64_t env_cap(const char* name) { return detail::env_int(name, 1, INT64_MAX); }

enum class Direction { forward, backward };

// The forward's S is f32 unless OMNIMOE_EXPERTS_DENSE_SCORES=storage: then the S product writes
// the storage dtype (half the bytes, chunks half again as large, a faster GEMM epilogue), and
// preact carries that rounding, beyond the f32 tolerance preact is held to (see the design doc).
// The backward's S stays f32: DA's high/low split needs s exactly.
bool forward_scores_in_storage() {
  return detail::env_equals("OMNIMOE_EXPERTS_DENSE_SCORES", "storage");
}

// Bytes of one element of S.
int64_t score_bytes(DType dtype, Direction dir) {
  const bool storage = dir == Direction::forward && forward_scores_in_storage();
  return storage ? static_cast<int64_t>(dtype_size(dtype)) : int64_t{4};
}

// Forward runs in chunks of tokens (rows of S = X_c W^T over all experts) unless
// OMNIMOE_EXPERTS_DENSE_FORWARD=experts (chunks of experts, y summed in fp32); backward always in
// chunks of experts.
bool forward_by_experts() {
  return detail::env_equals("OMNIMOE_EXPERTS_DENSE_FORWARD", "experts");
}

// How a call is cut: `count` chunks of `size` tokens (forward by tokens) or experts (the last
// chunk may be smaller); the chunk matrices have `rows` rows of stride `ld` elements.
struct Chunking {
  bool by_experts;
  int64_t size, count, rows, ld;
};

// Cuts `total` rows (tokens) or columns (experts) into `count` even chunks of at most `cap`.
// Chunks are multiples of 256 where the cap allows: a chunk size is an inner dimension of some
// product, and cuBLASLt runs odd ones several times slower (7 backward chunks of 14,629 experts
// took 22 ms against 8.0 for 8 of 12,800, H100).
void cut(int64_t total, int64_t cap, Chunking& c) {
  constexpr int64_t kQuantum = 256;
  c.count = ceil_div(total, std::min(cap, total));
  c.size = ceil_div(total, c.count);
  if (c.count == 1 || cap < kQuantum) return;
  c.size = ceil_div(c.size, kQuantum) * kQuantum;
  while (c.size > cap) c.size = ceil_div(ceil_div(total, ++c.count), kQuantum) * kQuantum;
  c.count = ceil_div(total, c.size);
}

Chunking chunking(const LayerConfig& cfg, int64_t tokens, DType dtype, Direction dir) {
  const int64_t n = cfg.num_experts();
  const auto es = static_cast<int64_t>(dtype_size(dtype));
  const int64_t sb = score_bytes(dtype, dir);
  const int64_t t = std::max<int64_t>(tokens, 1);
  Chunking c{};
  c.by_experts = dir == Direction::backward || forward_by_experts();
  if (!c.by_experts) {  // [Tc, N] S and A
    int64_t tc = std::max<int64_t>(1, kChunkBudgetBytes / (padded(n) * (sb + es)));
    if (const int64_t cap = env_cap("OMNIMOE_EXPERTS_DENSE_CHUNK_TOKENS")) tc = std::min(tc, cap);
    cut(t, tc, c);  // even chunks: no narrow last product
    c.rows = c.size;
    c.ld = padded(n);
    return c;
  }
  // [T, Nc] S and A (forward), or S (f32), DA high and low, G (backward), per expert column.
  const int64_t col_bytes = t * (dir == Direction::forward ? sb + es : 4 + 3 * es);
  int64_t nc = std::max<int64_t>(1, kChunkBudgetBytes / col_bytes);
  if (const int64_t cap = env_cap("OMNIMOE_EXPERTS_DENSE_CHUNK_EXPERTS")) nc = std::min(nc, cap);
  cut(n, std::min(nc, n), c);
  c.rows = t;
  c.ld = padded(c.size);
  return c;
}

// The caller's workspace, carved in the order the sizes are listed.
struct Layout {
  size_t s = 0;       // [rows, ld]: f32, or storage (forward with OMNIMOE_EXPERTS_DENSE_SCORES)
  size_t coef = 0;    // A (forward) or DA high over DA low, [2 rows, ld], then G (backward)
  size_t gh = 0;      // G [rows, ld] (backward)
  size_t x2 = 0;      // [2T, d] storage: X over X (backward)
  size_t sum = 0;     // f32 [T, d]: y (forward by experts) or dx (backward) summed over chunks
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
  l.s = cells * static_cast<size_t>(score_bytes(dtype, dir));
  if (dir == Direction::forward) {
    l.coef = cells * es;
    if (c.by_experts) l.sum = td * sizeof(float);
  } else {
    l.coef = 2 * cells * es;
    l.gh = cells * es;
    l.x2 = 2 * td * es;
    l.sum = td * sizeof(float);
  }
  return l;
}

struct Carved {
  void* s = nullptr;
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
  c.s = take(l.s);
  c.coef = take(l.coef);
  c.gh = take(l.gh);
  c.x2 = take(l.x2);
  c.sum = static_cast<float*>(take(l.sum));
  c.gemm_ws = Buffer{reinterpret_cast<void*>(p), gemm_workspace_bytes()};
  return c;
}

// Zeroes `count` (a multiple of 8) 16-bit elements of shared memory.
template <typename T>
__device__ __forceinline__ void zero_segment(T* seg, int count) {
  for (int i = threadIdx.x; i < count / 8; i += kThreads) {
    reinterpret_cast<uint4*>(seg)[i] = make_uint4(0, 0, 0, 0);
  }
}

// dst[0, count) = seg[0, count) with 16-byte stores (count a multiple of 8, dst 16-byte aligned).
template <typename T>
__device__ __forceinline__ void store_segment(T* __restrict__ dst, const T* seg, int count) {
  for (int i = threadIdx.x; i < count / 8; i += kThreads) {
    reinterpret_cast<uint4*>(dst)[i] = reinterpret_cast<const uint4*>(seg)[i];
  }
}

// Calls pair(k, col) for each pair k of the row whose expert falls in columns [s0, s0 + width)
// of the chunk (col relative to s0), reading the row's ids: for rows too long to keep. An id
// outside [0, experts) is skipped and kept in `bad`, which the kernel reports at its end: with a
// check that calls out between the loads (which keeps them from being issued together),
// paper-k4096-t4k's experts forward measured 3.47 ms against 3.17 before any check.
template <typename Pair>
__device__ __forceinline__ void for_pairs_in_segment(const int32_t* idx_row, int64_t top_k,
                                                     int64_t experts, int64_t c0, int s0,
                                                     int width, BadExpertId& bad, Pair&& pair) {
  for (int64_t k = threadIdx.x; k < top_k; k += kThreads) {
    const int32_t e = expert_id_or_skip(idx_row[k], experts, bad);
    const int64_t col = e - c0 - s0;
    if (e >= 0 && col >= 0 && col < width) pair(k, static_cast<int>(col));
  }
}

// This thread's expert ids of the row relative to c0 (-1 past the row's end, for an id outside
// [0, experts), kept in `bad` as above, and where the difference leaves int range: such experts
// lie outside every chunk column).
__device__ __forceinline__ void load_ids(int32_t ids[kPairsPerThread], const int32_t* idx_row,
                                         int64_t top_k, int64_t experts, int64_t c0,
                                         int64_t cols, BadExpertId& bad) {
#pragma unroll
  for (int j = 0; j < kPairsPerThread; ++j) {
    const int64_t k = static_cast<int64_t>(threadIdx.x) + j * kThreads;
    const int32_t e = k < top_k ? expert_id_or_skip(idx_row[k], experts, bad) : -1;
    const int64_t col = e >= 0 ? e - c0 : -1;
    ids[j] = col >= 0 && col < cols ? static_cast<int32_t>(col) : -1;
  }
}

// Forward, one block per row r of the chunk (indices, gates and preact offset to its first
// token; S is f32 or the storage type): for the row's pairs whose expert e is in
// [c0, c0 + cols): preact = S[r, e - c0], A[r, e - c0] = g * act(preact); every other entry of
// A's row is zero. Ids are distinct per token (a repeated id would race for one entry).
// Rows of K <= kCachedPairs first load all their pairs (each thread's loads issued in two
// groups of 8 before any is used) and stage column and value in shared memory for the segment
// passes: a version that loaded pair by pair inside each segment waited on serialised misses
// (4.4 ms against 3.2 at paper-k4096-t4k, H100). Longer rows read their pairs per segment.
constexpr int64_t kCachedPairs = int64_t{kThreads} * kPairsPerThread;

template <typename T, typename Score>
__global__ void __launch_bounds__(kThreads, 1)
    dense_forward_fill_kernel(const Score* __restrict__ s, T* __restrict__ a, int64_t ld,
                              int64_t cols, int64_t c0, const int32_t* __restrict__ idx,
                              const float* __restrict__ gates, float* __restrict__ preact,
                              int64_t top_k, int64_t experts, Activation act) {
  __shared__ __align__(16) T seg[kSegment];
  const int64_t r = blockIdx.x;
  const Score* s_row = s + r * ld;
  T* a_row = a + r * ld;
  const int32_t* idx_row = idx + r * top_k;
  const float* g_row = gates + r * top_k;
  float* z_row = preact + r * top_k;
  BadExpertId bad;
  if (top_k <= kCachedPairs) {  // uniform over the block
    __shared__ int32_t pair_col[kCachedPairs];
    __shared__ T pair_val[kCachedPairs];
    constexpr int kGroup = kPairsPerThread / 2;
    int32_t col[kPairsPerThread];
    load_ids(col, idx_row, top_k, experts, c0, cols, bad);
#pragma unroll
    for (int j0 = 0; j0 < kPairsPerThread; j0 += kGroup) {
      float sv[kGroup], gv[kGroup];
#pragma unroll
      for (int i = 0; i < kGroup; ++i) {
        const int j = j0 + i;
        sv[i] = col[j] >= 0 ? load_float(s_row[col[j]]) : 0.0f;
        gv[i] = col[j] >= 0 ? g_row[threadIdx.x + j * kThreads] : 0.0f;
      }
#pragma unroll
      for (int i = 0; i < kGroup; ++i) {
        const int j = j0 + i;
        const int k = threadIdx.x + j * kThreads;
        pair_col[k] = col[j];
        if (col[j] < 0) continue;
        z_row[k] = sv[i];
        pair_val[k] = store_float<T>(gv[i] * activate(act, sv[i]));
      }
    }
    for (int64_t s0 = 0; s0 < cols; s0 += kSegment) {
      const int width = static_cast<int>(cols - s0 < kSegment ? cols - s0 : kSegment);
      const int width8 = static_cast<int>(padded(width));  // <= ld - s0: pad columns get zeros
      zero_segment(seg, width8);
      __syncthreads();
      for (int j = 0; j < kPairsPerThread; ++j) {  // this thread's own entries: no barrier
        const int k = threadIdx.x + j * kThreads;
        const int c = pair_col[k] - static_cast<int>(s0);
        if (c >= 0 && c < width) seg[c] = pair_val[k];
      }
      __syncthreads();
      store_segment(a_row + s0, seg, width8);
      __syncthreads();  // before the next segment zeroes seg
    }
    report_bad_expert_id(bad, experts, "experts");
    return;
  }
  for (int64_t s0 = 0; s0 < cols; s0 += kSegment) {
    const int width = static_cast<int>(cols - s0 < kSegment ? cols - s0 : kSegment);
    const int width8 = static_cast<int>(padded(width));
    zero_segment(seg, width8);
    __syncthreads();
    for_pairs_in_segment(idx_row, top_k, experts, c0, static_cast<int>(s0), width, bad,
                         [&](int64_t k, int col) {
                           const float z = load_float(s_row[s0 + col]);
                           z_row[k] = z;
                           seg[col] = store_float<T>(g_row[k] * activate(act, z));
                         });
    __syncthreads();
    store_segment(a_row + s0, seg, width8);
    __syncthreads();  // before the next segment zeroes seg
  }
  report_bad_expert_id(bad, experts, "experts");
}

// Backward, one block per token row r (expert columns [c0, c0 + cols)): for each pair with e in
// the chunk, s = S[r, e - c0] (= dy_r . V[e]), h = act(preact): dgates = h * s; DA[r, e - c0] =
// g * s * act'(preact) as a high and a low storage-dtype part (their sum keeps ~16 mantissa
// bits: rounding da to bf16 alone failed the tolerance on dW, where large terms cancel);
// G[r, e - c0] = g * h. Every other entry of the three rows is zero.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    dense_backward_fill_kernel(const float* __restrict__ s, T* __restrict__ da_high,
                               T* __restrict__ da_low, T* __restrict__ gh, int64_t ld, int64_t cols,
                               int64_t c0, const int32_t* __restrict__ idx,
                               const float* __restrict__ gates, const float* __restrict__ preact,
                               float* __restrict__ dgates, int64_t top_k, int64_t experts,
                               Activation act) {
  __shared__ __align__(16) T seg_high[kSegment];
  __shared__ __align__(16) T seg_low[kSegment];
  __shared__ __align__(16) T seg_g[kSegment];
  const int64_t r = blockIdx.x;
  const float* s_row = s + r * ld;
  const int32_t* idx_row = idx + r * top_k;
  const float* g_row = gates + r * top_k;
  const float* z_row = preact + r * top_k;
  float* dg_row = dgates + r * top_k;
  const int64_t off = r * ld;
  BadExpertId bad;
  // One pair's three coefficients and its dgates.
  auto coefficients = [&](float sv, float z, float g, T& high, T& low, T& gh_v) {
    const float h = activate(act, z);
    const float dav = g * sv * activate_grad(act, z);
    high = store_float<T>(dav);
    low = store_float<T>(dav - load_float(high));
    gh_v = store_float<T>(g * h);
    return h * sv;
  };
  if (top_k <= kCachedPairs) {  // uniform over the block
    // As in the forward: every load of the thread's pairs issued before the segment passes
    // (groups of 8), the coefficients kept in registers.
    constexpr int kGroup = kPairsPerThread / 2;
    int32_t col[kPairsPerThread];
    T high[kPairsPerThread], low[kPairsPerThread], gh_v[kPairsPerThread];
    load_ids(col, idx_row, top_k, experts, c0, cols, bad);
#pragma unroll
    for (int j0 = 0; j0 < kPairsPerThread; j0 += kGroup) {
      float sv[kGroup], zv[kGroup], gv[kGroup];
#pragma unroll
      for (int i = 0; i < kGroup; ++i) {
        const int j = j0 + i;
        const int k = threadIdx.x + j * kThreads;
        sv[i] = col[j] >= 0 ? s_row[col[j]] : 0.0f;
        zv[i] = col[j] >= 0 ? z_row[k] : 0.0f;
        gv[i] = col[j] >= 0 ? g_row[k] : 0.0f;
      }
#pragma unroll
      for (int i = 0; i < kGroup; ++i) {
        const int j = j0 + i;
        if (col[j] < 0) continue;
        dg_row[threadIdx.x + j * kThreads] =
            coefficients(sv[i], zv[i], gv[i], high[j], low[j], gh_v[j]);
      }
    }
    for (int64_t s0 = 0; s0 < cols; s0 += kSegment) {
      const int width = static_cast<int>(cols - s0 < kSegment ? cols - s0 : kSegment);
      const int width8 = static_cast<int>(padded(width));
      zero_segment(seg_high, width8);
      zero_segment(seg_low, width8);
      zero_segment(seg_g, width8);
      __syncthreads();
#pragma unroll
      for (int j = 0; j < kPairsPerThread; ++j) {
        const int c = col[j] - static_cast<int>(s0);
        if (c < 0 || c >= width) continue;
        seg_high[c] = high[j];
        seg_low[c] = low[j];
        seg_g[c] = gh_v[j];
      }
      __syncthreads();
      store_segment(da_high + off + s0, seg_high, width8);
      store_segment(da_low + off + s0, seg_low, width8);
      store_segment(gh + off + s0, seg_g, width8);
      __syncthreads();
    }
    report_bad_expert_id(bad, experts, "experts");
    return;
  }
  for (int64_t s0 = 0; s0 < cols; s0 += kSegment) {
    const int width = static_cast<int>(cols - s0 < kSegment ? cols - s0 : kSegment);
    const int width8 = static_cast<int>(padded(width));
    zero_segment(seg_high, width8);
    zero_segment(seg_low, width8);
    zero_segment(seg_g, width8);
    __syncthreads();
    for_pairs_in_segment(idx_row, top_k, experts, c0, static_cast<int>(s0), width, bad,
                         [&](int64_t k, int col) {
                           dg_row[k] = coefficients(s_row[s0 + col], z_row[k], g_row[k],
                                                    seg_high[col], seg_low[col], seg_g[col]);
                         });
    __syncthreads();
    store_segment(da_high + off + s0, seg_high, width8);
    store_segment(da_low + off + s0, seg_low, width8);
    store_segment(gh + off + s0, seg_g, width8);
    __syncthreads();
  }
  report_bad_expert_id(bad, experts, "experts");
}

// dst (storage dtype, any row stride) = src (f32, dense [rows, cols]), plus dst when accumulate.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    store_sum_kernel(const float* __restrict__ src, T* __restrict__ dst, int64_t rows,
                     int64_t cols, int64_t dst_stride, bool accumulate) {
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
  store_sum_kernel<T><<<blocks, kThreads, 0, stream>>>(
      src, static_cast<T*>(dst.data), dst.shape[0], dst.shape[1], dst.strides[0], accumulate);
  OMNIMOE_CUDA_CHECK_LAUNCH("store_sum_kernel");
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

template <typename T, typename Score>
void forward_typed(const LayerConfig& cfg, const TensorView& x, const ExpertWeights& w,
                   const TensorView& indices, const TensorView& gates, const TensorView& y,
                   bool accumulate, const TensorView& preact, Buffer workspace, const Exec& exec) {
  const int64_t tokens = x.shape[0], n = cfg.num_experts(), K = cfg.top_k, d = cfg.hidden;
  const DType dtype = x.dtype;
  const DType score_dtype = std::is_same_v<Score, float> ? DType::f32 : dtype;
  const cudaStream_t stream = stream_of(exec);
  const Chunking c = chunking(cfg, tokens, dtype, Direction::forward);
  const Carved ws = carve(workspace, layout(cfg, tokens, dtype, Direction::forward));
  const auto* idx = static_cast<const int32_t*>(indices.data);
  const auto* g = static_cast<const float*>(gates.data);
  auto* z = static_cast<float*>(preact.data);
  auto* s_data = static_cast<Score*>(ws.s);
  auto* a = static_cast<T*>(ws.coef);
  if (!c.by_experts) {
    for (int64_t t0 = 0; t0 < tokens; t0 += c.size) {
      const int64_t rows = std::min(c.size, tokens - t0);
      const TensorView s = TensorView::matrix(ws.s, score_dtype, rows, n, c.ld, exec.device);
      const TensorView av = TensorView::matrix(a, dtype, rows, n, c.ld, exec.device);
      gemm(rows_of(x, t0, rows), false, w.up, true, s, 1.0f, 0.0f, ws.gemm_ws, exec);
      dense_forward_fill_kernel<T, Score><<<row_blocks(rows), kThreads, 0, stream>>>(
          s_data, a, c.ld, n, 0, idx + t0 * K, g + t0 * K, z + t0 * K, K, n, cfg.act);
      OMNIMOE_CUDA_CHECK_LAUNCH("dense_forward_fill_kernel");
      gemm(av, false, w.down, false, rows_of(y, t0, rows), 1.0f, accumulate ? 1.0f : 0.0f,
           ws.gemm_ws, exec);
    }
    return;
  }
  const TensorView y_sum = TensorView::matrix(ws.sum, DType::f32, tokens, d, d, exec.device);
  for (int64_t ci = 0; ci < c.count; ++ci) {
    const int64_t e0 = ci * c.size, cols = std::min(c.size, n - e0);
    const TensorView s = TensorView::matrix(ws.s, score_dtype, tokens, cols, c.ld, exec.device);
    const TensorView av = TensorView::matrix(a, dtype, tokens, cols, c.ld, exec.device);
    gemm(x, false, rows_of(w.up, e0, cols), true, s, 1.0f, 0.0f, ws.gemm_ws, exec);
    dense_forward_fill_kernel<T, Score><<<row_blocks(tokens), kThreads, 0, stream>>>(
        s_data, a, c.ld, cols, e0, idx, g, z, K, n, cfg.act);
    OMNIMOE_CUDA_CHECK_LAUNCH("dense_forward_fill_kernel");
    gemm(av, false, rows_of(w.down, e0, cols), false, y_sum, 1.0f, ci == 0 ? 0.0f : 1.0f,
         ws.gemm_ws, exec);
  }
  store_sum<T>(ws.sum, y, accumulate, stream);
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
    dense_backward_fill_kernel<T><<<row_blocks(tokens), kThreads, 0, stream>>>(
        static_cast<const float*>(ws.s), da, da + tokens * c.ld, gh, c.ld, cols, e0, idx, g, z, dg,
        K, n, cfg.act);
    OMNIMOE_CUDA_CHECK_LAUNCH("dense_backward_fill_kernel");
    // dx sums over chunks in fp32; dW and dV rows of the chunk are written once (rows of
    // experts nobody chose come out zero).
    gemm(da_high, false, rows_of(w.up, e0, cols), false, dx_sum, 1.0f, ci == 0 ? 0.0f : 1.0f,
         ws.gemm_ws, exec);
    gemm(da_both, true, x_twice, false, rows_of(grads.up, e0, cols), 1.0f, 0.0f, ws.gemm_ws,
         exec);
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
  const bool storage_scores = forward_scores_in_storage();
  dispatch_half(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (storage_scores) {
      forward_typed<T, T>(cfg, x, weights, indices, gates, y, accumulate, preact, workspace, exec);
    } else {
      forward_typed<T, float>(cfg, x, weights, indices, gates, y, accumulate, preact, workspace,
                              exec);
    }
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
