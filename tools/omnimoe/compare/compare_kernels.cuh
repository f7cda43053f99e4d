// Kernels of the comparison baselines (benchmark code, bf16 storage, fp32 arithmetic). Rows
// are dense with d a multiple of 8 (16-byte loads). No allocation, no host synchronisation.
#pragma once

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <tuple>

namespace omnimoe::tool::compare {

using bf16 = __nv_bfloat16;

// Coarse MoE routing, one warp per token (E <= 256, K <= 32): probs f32 [T, E] holds the router
// logits and is overwritten by their softmax; the top-K experts get gates p (or p / sum of the
// K when renorm, as GShard) and a slot in their expert's capacity-C segment by an atomic
// counter. rows i32 [T, K] = e * C + slot, or -1 when the segment is full (the pair is dropped
// and counted in drops). slot_pair i32 [E * C] = t * K + k of each filled slot; the caller sets
// it to -1 and counts to 0 first.
void moe_route(float* probs, int64_t tokens, int experts, int k, int64_t capacity, bool renorm,
               int32_t* sel_expert, float* sel_gate, int32_t* rows, int32_t* slot_pair,
               int32_t* counts, int32_t* drops, cudaStream_t stream);

// dst [R, d] row r = scale[p] * src[p / k] for p = slot_pair[r] (scale null: 1), zeros where
// p = -1 (empty slots contribute nothing to the weight gradients).
void moe_dispatch(const bf16* src, const int32_t* slot_pair, const float* scale, int k,
                  int64_t slots, int64_t d, bf16* dst, cudaStream_t stream);

// a [R, F] = silu(h[:, :F]) * h[:, F:] with h [R, 2F]; and its backward dh from da.
void swiglu_rows_forward(const bf16* h, bf16* a, int64_t rows, int64_t f, cudaStream_t stream);
void swiglu_rows_backward(const bf16* h, const bf16* da, bf16* dh, int64_t rows, int64_t f,
                          cudaStream_t stream);

// out [T, d] row t = sum_k w[t, k] * src[rows[t, k]] (w null: 1; rows -1 skipped); overwritten.
// A CTA per token, several rows in flight (the token-centric gather of PKM and the MoE combine).
void gather_weighted_sum(const bf16* src, const int32_t* rows, const float* w, int64_t tokens,
                         int k, int64_t d, bf16* out, cudaStream_t stream);

// out f32 [T, K] = dy[t] . src[rows[t, k]] (0 where rows is -1). A warp per pair.
void gather_dot(const bf16* dy, const bf16* src, const int32_t* rows, int64_t tokens, int k,
                int64_t d, float* out, cudaStream_t stream);

// Router backward of moe_route: dlogits bf16 [T, E] from dgates f32 [T, K] through the top-K
// (renormalised or not) and the softmax. One warp per token.
void moe_router_backward(const float* probs, const int32_t* sel_expert, const float* sel_gate,
                         const float* dgates, int64_t tokens, int experts, int k, bool renorm,
                         bf16* dlogits, cudaStream_t stream);

// PKM value gradient in expert order (as an embedding-bag backward after its sort):
// dv [N, d] row e = sum over the pairs p of e in schedule order of w[p] * dy[p / k]; zero rows
// for experts nobody chose. Deterministic, no atomics.
void scatter_rows_by_schedule(const bf16* dy, const float* w, const int32_t* expert_offsets,
                              const int32_t* pair_order, int64_t experts, int k, int64_t d,
                              bf16* dv, cudaStream_t stream);

// Strided-batched bf16 GEMM through cuBLASLt (fp32 accumulation): for b < batch,
// C_b [m, n] = op(A_b) op(B_b) (+ C_b when accumulate), row-major like cuda::gemm; A_b = a +
// b * stride_a elements, etc. A plan per shape is kept; the workspace is the caller's.
class BatchedGemm {
 public:
  BatchedGemm();
  ~BatchedGemm();
  BatchedGemm(const BatchedGemm&) = delete;
  BatchedGemm& operator=(const BatchedGemm&) = delete;
  void run(const bf16* a, bool trans_a, int64_t stride_a, const bf16* b, bool trans_b,
           int64_t stride_b, bf16* c, int64_t stride_c, int64_t m, int64_t n, int64_t k,
           int64_t batch, bool accumulate, void* workspace, size_t workspace_bytes,
           cudaStream_t stream);
  static size_t workspace_bytes() { return size_t{32} << 20; }

 private:
  struct Plan {
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
    cublasLtMatmulAlgo_t algo{};
  };
  using Key = std::tuple<bool, bool, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;
  cublasLtHandle_t handle_ = nullptr;
  std::map<Key, Plan> plans_;
};

}  // namespace omnimoe::tool::compare
