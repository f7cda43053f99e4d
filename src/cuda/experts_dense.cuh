// Dense-masked execution of the atomic experts, for dense routings (K/N of a few percent), where
// the products over all N experts on the tensor cores (cuBLASLt) cost less than the sparse
// kernels. Forward, per chunk of tokens: S = X_c W^T over all experts (fp32 unless
// OMNIMOE_EXPERTS_DENSE_SCORES=storage, below), a fill kernel
// writes preact and the [tokens, N] coefficient matrix A = g * act(S) at the chosen entries and
// zeros elsewhere (storage dtype), then y_c = A V. Backward, per chunk of experts [e0, e1):
// S = dY V_c^T ([T, Nc] fp32), a fill kernel writes dgates and the [T, Nc] matrices DA =
// g * s * act'(preact) (as high and low storage-dtype parts: their sum keeps ~16 mantissa bits)
// and G = g * h; dx += DA_high W_c (fp32 over chunks, rounded once), dW_c = [DA_high; DA_low]^T
// [X; X] (one product, the inner dimension doubled) and dV_c = G^T dY, each written once.
// Chunk matrices take at most ~640 MiB. Deterministic (fixed GEMM configurations, chunks in
// order, no atomics). Assumes distinct experts per token (what the router returns).
// bf16 and f16 only: f32 storage would need FP32 GEMMs (no TF32: the CPU is the oracle) at about
// 1/15 of the bf16 rate, where the gather path wins.
// OMNIMOE_EXPERTS_DENSE_CHUNK_TOKENS (forward) and OMNIMOE_EXPERTS_DENSE_CHUNK_EXPERTS (backward)
// cap the chunks (tests reach many chunks with them). OMNIMOE_EXPERTS_DENSE_SCORES=storage writes
// the forward's S in the storage dtype instead of fp32 (half the bytes, larger token chunks);
// preact then carries that rounding, which the fp32 contract of preact does not allow, so fp32
// (OMNIMOE_EXPERTS_DENSE_SCORES=f32 or unset) is the default.
// Arguments are those of cuda::experts_forward / experts_backward (backend_ops.inc), already
// validated. No allocation (workspace sized by the queries), no host synchronisation.
#pragma once

#include <omnimoe/omnimoe.h>

#include <cstddef>
#include <cstdint>

namespace omnimoe::cuda {

// True when this path handles the call (bf16 / f16 storage).
bool experts_dense_supports(const LayerConfig& cfg, int64_t tokens, DType dtype);

size_t experts_dense_forward_workspace_bytes(const LayerConfig& cfg, int64_t tokens, DType dtype);
void experts_dense_forward(const LayerConfig& cfg, const TensorView& x,
                           const ExpertWeights& weights, const TensorView& indices,
                           const TensorView& gates, const TensorView& y, bool accumulate,
                           const TensorView& preact, Buffer workspace, const Exec& exec);

size_t experts_dense_backward_workspace_bytes(const LayerConfig& cfg, int64_t tokens, DType dtype);
void experts_dense_backward(const LayerConfig& cfg, const TensorView& x,
                            const ExpertWeights& weights, const TensorView& indices,
                            const TensorView& gates, const TensorView& preact,
                            const Schedule& schedule, const TensorView& dy, const TensorView& dx,
                            bool accumulate_dx, const ExpertWeights& grads,
                            const TensorView& dgates, Buffer workspace, const Exec& exec);

}  // namespace omnimoe::cuda
