// Expert-Centric Scheduling: the T*K (token, expert) pairs grouped by expert, built on the
// device that holds the indices, without host synchronisation.
#pragma once

#include <omnimoe/config.h>
#include <omnimoe/tensor.h>

namespace omnimoe {

struct Schedule {
  // i32 [N + 1]: the pairs of expert e are pair_order[expert_offsets[e] .. expert_offsets[e+1]).
  TensorView expert_offsets;
  // i32 [T * K]: flat pair ids t * K + k, grouped by expert, tokens ascending within a group
  // (a stable counting sort, so the schedule is deterministic).
  TensorView pair_order;
};

size_t schedule_workspace_bytes(const LayerConfig& cfg, int64_t tokens, const Exec& exec);
void schedule_build(const LayerConfig& cfg, const TensorView& indices, const Schedule& schedule,
                    Buffer workspace, const Exec& exec);

}  // namespace omnimoe
