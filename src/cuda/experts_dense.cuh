// Dense-masked execution of the atomic experts, for dense routings (K/N of a few percent), where
// the products over all N experts on the tensor cores (cuBLASLt) cost less than the sparse
// kernels: per chunk of tokens, S = X W^T over all experts (fp32), the chosen entries picked out
// into a zeroed [tokens, N] coefficient matrix A (g * act(S), storage dtype), then y = A V.
// Backward likewise: S = dY V^T, DA and G = g*h scattered per pair, dx = DA W, dW = DA^T X,
// dV = G^T dY, with DA split into high and low storage-dtype parts (two products each) so the
// coefficient keeps ~16 mantissa bits. Tokens run in chunks so that the [chunk, N] buffers stay
// within ~512 MiB; dW and dV are summed over chunks in fp32 buffers in chunk order and rounded
// once (deterministic: fixed GEMM configurations, no atomics).
// Assumes distinct experts per token (what the router returns): a repeated id keeps one pair.
// bf16 and f16 only: f32 storage would need FP32 GEMMs (no TF32: the CPU is the oracle) at about
// 1/15 of the bf16 rate, where the gather path wins.
// OMNIMOE_EXPERTS_DENSE_CHUNK_TOKENS caps the chunk (tests reach several chunks with it).
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
