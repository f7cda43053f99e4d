// Internal (the layer's schedule built on a stream of its own, beside the experts' backward):
// experts_backward, validated like the public op, where `schedule_ready` is called on the host
// once, before the first work on exec's stream that reads the schedule (the gather execution's
// dW / dV pass; other executions call it first). The caller makes exec's stream wait there for
// the stream that builds the schedule.
#pragma once

#include <omnimoe/experts.h>

#include <functional>

namespace omnimoe::detail {

void experts_backward_joined(const LayerConfig& cfg, const TensorView& x,
                             const ExpertWeights& weights, const TensorView& indices,
                             const TensorView& gates, const TensorView& preact,
                             const Schedule& schedule, const TensorView& dy, const TensorView& dx,
                             bool accumulate_dx, const ExpertWeights& grads,
                             const TensorView& dgates, const std::function<void()>& schedule_ready,
                             Buffer workspace, const Exec& exec);

}  // namespace omnimoe::detail
