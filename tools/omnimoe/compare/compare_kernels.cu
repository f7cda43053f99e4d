#include <cfloat>
#include <string>

#include "baselines/cuda_util.cuh"
#include "compare/compare_kernels.cuh"

namespace omnimoe::tool::compare {

namespace {

constexpr int kRowThreads = 128;  // a CTA per row: 128 threads x 8 elements = d of 1024

__device__ __forceinline__ void unpack8(const uint4& r, float* f) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&r);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 v = __bfloat1622float2(h[i]);
    f[2 * i] = v.x;
    f[2 * i + 1] = v.y;
  }
}

__device__ __forceinline__ uint4 pack8(const float* f) {
  uint4 r;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&r);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
  return r;
}

using cuda::warp_max;
using cuda::warp_sum;

unsigned blocks_for(int64_t items, int threads) {
  return static_cast<unsigned>((items + threads - 1) / threads);
}

constexpr int kMaxPerLane = 8;  // E <= 256

__global__ void moe_route_kernel(float* __restrict__ probs, int64_t tokens, int E, int K,
                                 int64_t capacity, bool renorm, int32_t* __restrict__ sel_expert,
                                 float* __restrict__ sel_gate, int32_t* __restrict__ rows,
                                 int32_t* __restrict__ slot_pair, int32_t* __restrict__ counts,
                                 int32_t* __restrict__ drops) {
  const int64_t t = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (t >= tokens) return;
  float* row = probs + t * E;
  float v[kMaxPerLane];
  float mx = -FLT_MAX;
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) {
    const int j = lane + 32 * i;
    v[i] = j < E ? row[j] : -FLT_MAX;
    mx = fmaxf(mx, v[i]);
  }
  mx = warp_max(mx);
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) {
    const int j = lane + 32 * i;
    v[i] = j < E ? __expf(v[i] - mx) : 0.0f;
    s += v[i];
  }
  const float inv = 1.0f / warp_sum(s);
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) {
    const int j = lane + 32 * i;
    v[i] *= inv;
    if (j < E) row[j] = v[i];
  }
  // Top-K by repeated warp arg-max (ties: smaller expert id); lane k keeps the k-th choice.
  int my_e = -1;
  float my_p = 0.0f;
  for (int k = 0; k < K; ++k) {
    float best = -1.0f;
    int best_j = 0x7fffffff;
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) {
      const int j = lane + 32 * i;
      if (j < E && v[i] > best) {
        best = v[i];
        best_j = j;
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, best, o);
      const int oj = __shfl_xor_sync(0xffffffffu, best_j, o);
      if (ob > best || (ob == best && oj < best_j)) {
        best = ob;
        best_j = oj;
      }
    }
    if (lane == k) {
      my_e = best_j;
      my_p = best;
    }
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) {
      if (lane + 32 * i == best_j) v[i] = -1.0f;  // unrolled: v stays in registers
    }
  }
  const float sel_sum = warp_sum(lane < K ? my_p : 0.0f);
  if (lane < K) {
    const int64_t pair = t * K + lane;
    const float g = renorm ? my_p / sel_sum : my_p;
    const int slot = atomicAdd(&counts[my_e], 1);
    int32_t r = -1;
    if (slot < capacity) {
      r = static_cast<int32_t>(my_e * capacity + slot);
      slot_pair[r] = static_cast<int32_t>(pair);
    } else {
      atomicAdd(drops, 1);
    }
    sel_expert[pair] = my_e;
    sel_gate[pair] = g;
    rows[pair] = r;
  }
}

__global__ void moe_dispatch_kernel(const bf16* __restrict__ src,
                                    const int32_t* __restrict__ slot_pair,
                                    const float* __restrict__ scale, int K, int64_t d,
                                    bf16* __restrict__ dst) {
  const int64_t r = blockIdx.x;
  const int32_t p = slot_pair[r];
  const float s = p >= 0 && scale ? scale[p] : 1.0f;
  const uint4* in = p >= 0 ? reinterpret_cast<const uint4*>(src + (p / K) * d) : nullptr;
  uint4* out = reinterpret_cast<uint4*>(dst + r * d);
  for (int64_t c = threadIdx.x; c < d / 8; c += blockDim.x) {
    if (!in) {
      out[c] = make_uint4(0, 0, 0, 0);
    } else if (!scale) {
      out[c] = in[c];
    } else {
      float f[8];
      unpack8(in[c], f);
#pragma unroll
      for (int i = 0; i < 8; ++i) f[i] *= s;
      out[c] = pack8(f);
    }
  }
}

__device__ __forceinline__ float sigmoid(float v) { return 1.0f / (1.0f + __expf(-v)); }

__global__ void swiglu_rows_forward_kernel(const bf16* __restrict__ h, bf16* __restrict__ a,
                                           int64_t rows, int64_t f) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= rows * f) return;
  const int64_t r = i / f, j = i % f;
  const float g = __bfloat162float(h[r * 2 * f + j]), u = __bfloat162float(h[r * 2 * f + f + j]);
  a[i] = __float2bfloat16_rn(g * sigmoid(g) * u);
}

__global__ void swiglu_rows_backward_kernel(const bf16* h,  // dh may alias h (in place)
                                            const bf16* __restrict__ da, bf16* dh, int64_t rows,
                                            int64_t f) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= rows * f) return;
  const int64_t r = i / f, j = i % f;
  const float g = __bfloat162float(h[r * 2 * f + j]), u = __bfloat162float(h[r * 2 * f + f + j]);
  const float s = sigmoid(g), grad = __bfloat162float(da[i]);
  dh[r * 2 * f + j] = __float2bfloat16_rn(grad * u * s * (1.0f + g * (1.0f - s)));
  dh[r * 2 * f + f + j] = __float2bfloat16_rn(grad * g * s);
}

// Each thread owns 16-byte chunk c of the row and walks the K sources four at a time so that
// four loads are in flight before the first is used.
__global__ void __launch_bounds__(kRowThreads)
    gather_weighted_sum_kernel(const bf16* __restrict__ src, const int32_t* __restrict__ rows,
                               const float* __restrict__ w, int K, int64_t d,
                               bf16* __restrict__ out) {
  const int64_t t = blockIdx.x;
  const int32_t* r = rows + t * K;
  const float* wt = w ? w + t * K : nullptr;
  for (int64_t c = threadIdx.x; c < d / 8; c += blockDim.x) {
    float acc[8] = {};
    int k = 0;
    for (; k + 4 <= K; k += 4) {
      int32_t ri[4];
      float wi[4];
      uint4 v[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        ri[u] = __ldg(r + k + u);
        wi[u] = ri[u] < 0 ? 0.0f : (wt ? __ldg(wt + k + u) : 1.0f);
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        v[u] = ri[u] < 0 ? make_uint4(0, 0, 0, 0)
                         : __ldg(reinterpret_cast<const uint4*>(src + ri[u] * d) + c);
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        float f[8];
        unpack8(v[u], f);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] += wi[u] * f[i];
      }
    }
    for (; k < K; ++k) {
      const int32_t ri = r[k];
      if (ri < 0) continue;
      const float wi = wt ? wt[k] : 1.0f;
      float f[8];
      unpack8(__ldg(reinterpret_cast<const uint4*>(src + ri * d) + c), f);
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] += wi * f[i];
    }
    reinterpret_cast<uint4*>(out + t * d)[c] = pack8(acc);
  }
}

// A warp per pair; dy's chunks are re-read per pair from L1/L2 (the K pairs of a token sit in
// neighbouring warps).
__global__ void gather_dot_kernel(const bf16* __restrict__ dy, const bf16* __restrict__ src,
                                  const int32_t* __restrict__ rows, int64_t pairs, int K, int64_t d,
                                  float* __restrict__ out) {
  const int64_t p = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (p >= pairs) return;
  const int32_t r = rows[p];
  if (r < 0) {
    if (lane == 0) out[p] = 0.0f;
    return;
  }
  const uint4* a = reinterpret_cast<const uint4*>(dy + (p / K) * d);
  const uint4* b = reinterpret_cast<const uint4*>(src + r * d);
  float acc = 0.0f;
  for (int64_t c = lane; c < d / 8; c += 32) {
    float fa[8], fb[8];
    unpack8(__ldg(a + c), fa);
    unpack8(__ldg(b + c), fb);
#pragma unroll
    for (int i = 0; i < 8; ++i) acc += fa[i] * fb[i];
  }
  acc = warp_sum(acc);
  if (lane == 0) out[p] = acc;
}

__global__ void moe_router_backward_kernel(const float* __restrict__ probs,
                                           const int32_t* __restrict__ sel_expert,
                                           const float* __restrict__ sel_gate,
                                           const float* __restrict__ dgates, int64_t tokens, int E,
                                           int K, bool renorm, bf16* __restrict__ dlogits) {
  const int64_t t = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (t >= tokens) return;
  const float* p = probs + t * E;
  float pk = 0.0f, gk = 0.0f, dgk = 0.0f;
  int ek = 0;
  if (lane < K) {
    ek = sel_expert[t * K + lane];
    pk = p[ek];
    gk = sel_gate[t * K + lane];
    dgk = dgates[t * K + lane];
  }
  // g = p (DeepSeekMoE) or p / S (GShard): dp_k = dg_k, or (dg_k - sum_i g_i dg_i) / S.
  float dpk = dgk;
  if (renorm) {
    const float S = warp_sum(pk);
    const float G = warp_sum(gk * dgk);
    dpk = (dgk - G) / S;
  }
  // Softmax: dlogit_j = p_j (dp_j - sum_i p_i dp_i), dp_j = 0 off the selection.
  const float D = warp_sum(pk * dpk);
  bf16* out = dlogits + t * E;
  for (int j = lane; j < E; j += 32) out[j] = __float2bfloat16_rn(-p[j] * D);
  __syncwarp();
  if (lane < K) out[ek] = __float2bfloat16_rn(pk * (dpk - D));
}

__global__ void __launch_bounds__(kRowThreads)
    scatter_rows_by_schedule_kernel(const bf16* __restrict__ dy, const float* __restrict__ w,
                                    const int32_t* __restrict__ offsets,
                                    const int32_t* __restrict__ order, int K, int64_t d,
                                    bf16* __restrict__ dv) {
  const int64_t e = blockIdx.x;
  const int32_t begin = offsets[e], end = offsets[e + 1];
  for (int64_t c = threadIdx.x; c < d / 8; c += blockDim.x) {
    float acc[8] = {};
    int32_t q = begin;
    for (; q + 4 <= end; q += 4) {
      int32_t pair[4];
      uint4 v[4];
      float wi[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) pair[u] = __ldg(order + q + u);
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        wi[u] = __ldg(w + pair[u]);
        v[u] = __ldg(reinterpret_cast<const uint4*>(dy + (pair[u] / K) * d) + c);
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        float f[8];
        unpack8(v[u], f);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] += wi[u] * f[i];
      }
    }
    for (; q < end; ++q) {
      const int32_t pair = order[q];
      const float wi = w[pair];
      float f[8];
      unpack8(__ldg(reinterpret_cast<const uint4*>(dy + (pair / K) * d) + c), f);
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] += wi * f[i];
    }
    reinterpret_cast<uint4*>(dv + e * d)[c] = pack8(acc);
  }
}

void check_rows(int64_t d) {
  if (d % 8 != 0) throw Error("compare: d must be a multiple of 8, got " + std::to_string(d));
}

}  // namespace

void moe_route(float* probs, int64_t tokens, int experts, int k, int64_t capacity, bool renorm,
               int32_t* sel_expert, float* sel_gate, int32_t* rows, int32_t* slot_pair,
               int32_t* counts, int32_t* drops, cudaStream_t stream) {
  if (experts > 32 * kMaxPerLane || k > 32 || k < 1) {
    throw Error("moe_route: needs E <= 256 and 1 <= K <= 32, got E = " + std::to_string(experts) +
                ", K = " + std::to_string(k));
  }
  moe_route_kernel<<<blocks_for(tokens * 32, 256), 256, 0, stream>>>(
      probs, tokens, experts, k, capacity, renorm, sel_expert, sel_gate, rows, slot_pair, counts,
      drops);
  TOOL_CUDA_CHECK_LAUNCH("moe_route_kernel");
}

void moe_dispatch(const bf16* src, const int32_t* slot_pair, const float* scale, int k,
                  int64_t slots, int64_t d, bf16* dst, cudaStream_t stream) {
  check_rows(d);
  moe_dispatch_kernel<<<static_cast<unsigned>(slots), kRowThreads, 0, stream>>>(src, slot_pair,
                                                                                scale, k, d, dst);
  TOOL_CUDA_CHECK_LAUNCH("moe_dispatch_kernel");
}

void swiglu_rows_forward(const bf16* h, bf16* a, int64_t rows, int64_t f, cudaStream_t stream) {
  swiglu_rows_forward_kernel<<<blocks_for(rows * f, 256), 256, 0, stream>>>(h, a, rows, f);
  TOOL_CUDA_CHECK_LAUNCH("swiglu_rows_forward_kernel");
}

void swiglu_rows_backward(const bf16* h, const bf16* da, bf16* dh, int64_t rows, int64_t f,
                          cudaStream_t stream) {
  swiglu_rows_backward_kernel<<<blocks_for(rows * f, 256), 256, 0, stream>>>(h, da, dh, rows, f);
  TOOL_CUDA_CHECK_LAUNCH("swiglu_rows_backward_kernel");
}

void gather_weighted_sum(const bf16* src, const int32_t* rows, const float* w, int64_t tokens,
                         int k, int64_t d, bf16* out, cudaStream_t stream) {
  check_rows(d);
  gather_weighted_sum_kernel<<<static_cast<unsigned>(tokens), kRowThreads, 0, stream>>>(
      src, rows, w, k, d, out);
  TOOL_CUDA_CHECK_LAUNCH("gather_weighted_sum_kernel");
}

void gather_dot(const bf16* dy, const bf16* src, const int32_t* rows, int64_t tokens, int k,
                int64_t d, float* out, cudaStream_t stream) {
  check_rows(d);
  const int64_t pairs = tokens * k;
  gather_dot_kernel<<<blocks_for(pairs * 32, 256), 256, 0, stream>>>(dy, src, rows, pairs, k, d,
                                                                     out);
  TOOL_CUDA_CHECK_LAUNCH("gather_dot_kernel");
}

void moe_router_backward(const float* probs, const int32_t* sel_expert, const float* sel_gate,
                         const float* dgates, int64_t tokens, int experts, int k, bool renorm,
                         bf16* dlogits, cudaStream_t stream) {
  moe_router_backward_kernel<<<blocks_for(tokens * 32, 256), 256, 0, stream>>>(
      probs, sel_expert, sel_gate, dgates, tokens, experts, k, renorm, dlogits);
  TOOL_CUDA_CHECK_LAUNCH("moe_router_backward_kernel");
}

void scatter_rows_by_schedule(const bf16* dy, const float* w, const int32_t* expert_offsets,
                              const int32_t* pair_order, int64_t experts, int k, int64_t d,
                              bf16* dv, cudaStream_t stream) {
  check_rows(d);
  scatter_rows_by_schedule_kernel<<<static_cast<unsigned>(experts), kRowThreads, 0, stream>>>(
      dy, w, expert_offsets, pair_order, k, d, dv);
  TOOL_CUDA_CHECK_LAUNCH("scatter_rows_by_schedule_kernel");
}

// Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: B goes first (as LtGemm).
BatchedGemm::BatchedGemm() { TOOL_CUBLAS_CHECK(cublasLtCreate(&handle_)); }

BatchedGemm::~BatchedGemm() {
  for (auto& [key, p] : plans_) {
    cublasLtMatrixLayoutDestroy(p.a);
    cublasLtMatrixLayoutDestroy(p.b);
    cublasLtMatrixLayoutDestroy(p.c);
    cublasLtMatmulDescDestroy(p.op);
  }
  cublasLtDestroy(handle_);
}

void BatchedGemm::run(const bf16* a, bool trans_a, int64_t stride_a, const bf16* b, bool trans_b,
                      int64_t stride_b, bf16* c, int64_t stride_c, int64_t m, int64_t n, int64_t k,
                      int64_t batch, bool accumulate, void* workspace, size_t workspace_bytes,
                      cudaStream_t stream) {
  const Key key{trans_a, trans_b, stride_a, stride_b, stride_c, m, n, k, batch};
  auto it = plans_.find(key);
  if (it == plans_.end()) {
    Plan p;
    TOOL_CUBLAS_CHECK(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t op_first = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasOperation_t op_second = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    TOOL_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &op_first,
                                                     sizeof op_first));
    TOOL_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &op_second,
                                                     sizeof op_second));
    // Dense operands: the leading dimension is the stored column count.
    const int64_t ldb = trans_b ? k : n, lda = trans_a ? m : k;
    TOOL_CUBLAS_CHECK(
        cublasLtMatrixLayoutCreate(&p.a, CUDA_R_16BF, trans_b ? k : n, trans_b ? n : k, ldb));
    TOOL_CUBLAS_CHECK(
        cublasLtMatrixLayoutCreate(&p.b, CUDA_R_16BF, trans_a ? m : k, trans_a ? k : m, lda));
    TOOL_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.c, CUDA_R_16BF, n, m, n));
    const int32_t count = static_cast<int32_t>(batch);
    const std::pair<cublasLtMatrixLayout_t, int64_t> layouts[] = {
        {p.a, stride_b}, {p.b, stride_a}, {p.c, stride_c}};
    for (const auto& [layout, stride] : layouts) {
      TOOL_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                                                         &count, sizeof count));
      TOOL_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(
          layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof stride));
    }
    cublasLtMatmulPreference_t pref = nullptr;
    TOOL_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    TOOL_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace_bytes, sizeof workspace_bytes));
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    const cublasStatus_t st =
        cublasLtMatmulAlgoGetHeuristic(handle_, p.op, p.a, p.b, p.c, p.c, pref, 1, &result, &found);
    cublasLtMatmulPreferenceDestroy(pref);
    if (st != CUBLAS_STATUS_SUCCESS || found == 0) {
      cublasLtMatrixLayoutDestroy(p.a);
      cublasLtMatrixLayoutDestroy(p.b);
      cublasLtMatrixLayoutDestroy(p.c);
      cublasLtMatmulDescDestroy(p.op);
      throw Error("cuBLASLt has no algorithm for a batched " + std::to_string(batch) + " x " +
                  std::to_string(m) + " x " + std::to_string(n) + " x " + std::to_string(k) +
                  " bf16 product");
    }
    p.algo = result.algo;
    it = plans_.emplace(key, p).first;
  }
  Plan& p = it->second;
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  TOOL_CUBLAS_CHECK(cublasLtMatmul(handle_, p.op, &alpha, b, p.a, a, p.b, &beta, c, p.c, c, p.c,
                                   &p.algo, workspace, workspace_bytes, stream));
}

}  // namespace omnimoe::tool::compare
