// Atomic experts: y_t = sum_k g_k * act(x_t . W[e_k]) * V[e_k].
#pragma once

#include <omnimoe/config.h>
#include <omnimoe/schedule.h>
#include <omnimoe/tensor.h>

namespace omnimoe {

struct ExpertWeights {
  TensorView up;    // W, [N, d], dtype of x (up_embed.weight)
  TensorView down;  // V, [N, d], dtype of x (down_embed.weight)
};

// The execution the experts ops choose for this call ("cpu"; on CUDA e.g. "gather" for few
// tokens per expert, "tiled" for many), so benchmarks can say which path ran. The environment
// variable OMNIMOE_EXPERTS_PATH forces a CUDA path by name (for tests and benchmarks).
const char* experts_execution(const LayerConfig& cfg, int64_t tokens, DType dtype,
                              const Exec& exec);

// `indices` i32 [T, K] and `gates` f32 [T, K] come from the router. y [T, d] is overwritten, or
// added to when accumulate is true. `preact` f32 [T, K] receives x_t . W[e_k], which backward
// reuses. Forward needs no schedule: its executions either walk tokens or build their own
// expert-major tiles from the indices.
size_t experts_forward_workspace_bytes(const LayerConfig& cfg, int64_t tokens, DType dtype,
                                       const Exec& exec);
void experts_forward(const LayerConfig& cfg, const TensorView& x, const ExpertWeights& weights,
                     const TensorView& indices, const TensorView& gates, const TensorView& y,
                     bool accumulate, const TensorView& preact, Buffer workspace,
                     const Exec& exec);

// Whether experts_backward reads `schedule` for this call (on CUDA only the gather execution
// does; the CPU always does). When false the schedule must still have its shapes but need not be
// built: the layer then skips schedule_build (0.8 ms at T = 4096, K = 4096 on an H100).
bool experts_backward_reads_schedule(const LayerConfig& cfg, int64_t tokens, DType dtype,
                                     const Exec& exec);

// Gradients: dx [T, d] (overwritten, or added to when accumulate_dx), grads.up / grads.down
// [N, d] (overwritten; rows of experts no token chose are zero), dgates f32 [T, K]. `schedule`
// comes from schedule_build over the same indices (the per-expert sums of dW and dV walk it).
size_t experts_backward_workspace_bytes(const LayerConfig& cfg, int64_t tokens, DType dtype,
                                        const Exec& exec);
void experts_backward(const LayerConfig& cfg, const TensorView& x, const ExpertWeights& weights,
                      const TensorView& indices, const TensorView& gates,
                      const TensorView& preact, const Schedule& schedule, const TensorView& dy,
                      const TensorView& dx, bool accumulate_dx, const ExpertWeights& grads,
                      const TensorView& dgates, Buffer workspace, const Exec& exec);

}  // namespace omnimoe
