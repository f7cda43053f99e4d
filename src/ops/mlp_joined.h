// Internal (the layer's join of its concurrent branches): mlp_forward and mlp_backward, validated
// like the public ops, with y = MLP(x) + addend (dx = dMLP + addend), where `join` is called on
// the host just before the products that write y (dx), which add addend themselves: no separate
// add after the join. addend: y's (dx's) shape and dtype, written by the branch `join` waits for.
#pragma once

#include <omnimoe/mlp.h>

#include <functional>

namespace omnimoe::detail {

void mlp_forward_joined(const LayerConfig& cfg, const TensorView& x, const MlpWeights& weights,
                        const TensorView& y, const TensorView& addend, const MlpSaved& saved,
                        const std::function<void()>& join, Buffer workspace, const Exec& exec);
void mlp_backward_joined(const LayerConfig& cfg, const TensorView& x, const MlpWeights& weights,
                         const MlpSaved& saved, const TensorView& dy, const TensorView& dx,
                         const TensorView& addend, const MlpWeights& grads,
                         const std::function<void()>& join, Buffer workspace, const Exec& exec);

}  // namespace omnimoe::detail
