// Expert-centric execution of the atomic experts for many tokens per expert (m = T*K/N of tens
// to hundreds): pairs are grouped by grid row or grid column (where the Cartesian router's
// choices are dense), each group's tokens cut into tiles of 128, and dot products and sums run
// on the tensor cores (bf16/f16) over dense (token tile x group experts) blocks; token outputs
// are summed in 64-bit fixed point (deterministic) or fp32 atomics (exec.deterministic false).
// Design and measurements: docs/experts-design.md. The dispatcher (experts.cu) chooses this path
// by m; OMNIMOE_EXPERTS_PATH=tiled forces it. OMNIMOE_TILED_TIMING=1 prints per-stage times
// (benchmarks only: it synchronises).
// Arguments are those of cuda::experts_forward / experts_backward (backend_ops.inc), already
// validated. No allocation (workspace sized by the queries), no host synchronisation.
#pragma once

#include <omnimoe/omnimoe.h>

#include <cstddef>
#include <cstdint>

namespace omnimoe::cuda {

// True when this path handles the call (storage dtype, sizes within its index ranges).
bool experts_tiled_supports(const LayerConfig& cfg, int64_t tokens, DType dtype);

size_t experts_tiled_forward_workspace_bytes(const LayerConfig& cfg, int64_t tokens, DType dtype);
void experts_tiled_forward(const LayerConfig& cfg, const TensorView& x,
                           const ExpertWeights& weights, const TensorView& indices,
                           const TensorView& gates, const TensorView& y, bool accumulate,
                           const TensorView& preact, Buffer workspace, const Exec& exec);

size_t experts_tiled_backward_workspace_bytes(const LayerConfig& cfg, int64_t tokens,
                                              DType dtype);
void experts_tiled_backward(const LayerConfig& cfg, const TensorView& x,
                            const ExpertWeights& weights, const TensorView& indices,
                            const TensorView& gates, const TensorView& preact,
                            const Schedule& schedule, const TensorView& dy, const TensorView& dx,
                            bool accumulate_dx, const ExpertWeights& grads,
                            const TensorView& dgates, Buffer workspace, const Exec& exec);

}  // namespace omnimoe::cuda
