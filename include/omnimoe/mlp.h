// The shared dense SwiGLU MLP: y = W_down (silu(W_gate x) * (W_up x)).
#pragma once

#include <omnimoe/config.h>
#include <omnimoe/tensor.h>

namespace omnimoe {

struct MlpWeights {
  TensorView gate;  // [I, d] (gate_proj.weight)
  TensorView up;    // [I, d] (up_proj.weight)
  TensorView down;  // [d, I] (down_proj.weight)
};

// What mlp_backward needs: the two projections before the activation, dtype of x.
struct MlpSaved {
  TensorView gate_pre;  // [T, I], W_gate x
  TensorView up_pre;    // [T, I], W_up x
};

// y [T, d] is overwritten, or added to when accumulate is true. Needs cfg.intermediate > 0.
size_t mlp_forward_workspace_bytes(const LayerConfig& cfg, int64_t tokens, DType dtype,
                                   const Exec& exec);
void mlp_forward(const LayerConfig& cfg, const TensorView& x, const MlpWeights& weights,
                 const TensorView& y, bool accumulate, const MlpSaved& saved, Buffer workspace,
                 const Exec& exec);

// dx is overwritten, or added to when accumulate_dx; grads are overwritten.
size_t mlp_backward_workspace_bytes(const LayerConfig& cfg, int64_t tokens, DType dtype,
                                    const Exec& exec);
void mlp_backward(const LayerConfig& cfg, const TensorView& x, const MlpWeights& weights,
                  const MlpSaved& saved, const TensorView& dy, const TensorView& dx,
                  bool accumulate_dx, const MlpWeights& grads, Buffer workspace,
                  const Exec& exec);

}  // namespace omnimoe
