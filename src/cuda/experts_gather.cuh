// Token-centric (gather) execution of the atomic experts, for few tokens per expert
// (m = T*K/N below a few): each token gathers its K expert rows with 16-byte loads, several rows
// in flight, and keeps its input and output rows on chip; there is nothing to share between
// tokens, so the time is the bytes of the gathered rows. Backward runs the same token pass for
// dgates and dx, then an expert-centric pass over the schedule for dW and dV (each expert's
// pairs summed in schedule order: deterministic, no atomics).
// Arguments are those of cuda::experts_forward / experts_backward (backend_ops.inc), already
// validated. No allocation (workspace sized by the queries), no host synchronisation.
#pragma once

#include <omnimoe/omnimoe.h>

#include <cstddef>
#include <cstdint>

namespace omnimoe::cuda {

size_t experts_gather_forward_workspace_bytes(const LayerConfig& cfg, int64_t tokens,
                                              DType dtype);
void experts_gather_forward(const LayerConfig& cfg, const TensorView& x,
                            const ExpertWeights& weights, const TensorView& indices,
                            const TensorView& gates, const TensorView& y, bool accumulate,
                            const TensorView& preact, Buffer workspace, const Exec& exec);

size_t experts_gather_backward_workspace_bytes(const LayerConfig& cfg, int64_t tokens,
                                               DType dtype);
void experts_gather_backward(const LayerConfig& cfg, const TensorView& x,
                             const ExpertWeights& weights, const TensorView& indices,
                             const TensorView& gates, const TensorView& preact,
                             const Schedule& schedule, const TensorView& dy, const TensorView& dx,
                             bool accumulate_dx, const ExpertWeights& grads,
                             const TensorView& dgates, Buffer workspace, const Exec& exec);

}  // namespace omnimoe::cuda
