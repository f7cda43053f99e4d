// CPU Expert-Centric Scheduling: a stable counting sort of the flat pair ids by expert.
#include <cstdint>
#include <vector>

#include "backend/backend.h"
#include "cpu/cpu_common.h"

namespace omnimoe::cpu {

size_t schedule_workspace_bytes(const LayerConfig&, int64_t) { return 0; }

void schedule_build(const LayerConfig& cfg, const TensorView& indices, const Schedule& schedule,
                    Buffer, const Exec&) {
  const int64_t pairs = indices.shape[0] * cfg.top_k;
  const int64_t n = cfg.num_experts();
  const int32_t* idx = static_cast<const int32_t*>(indices.data);
  int32_t* offsets = static_cast<int32_t*>(schedule.expert_offsets.data);
  int32_t* order = static_cast<int32_t*>(schedule.pair_order.data);

  check_expert_ids("schedule_build", "indices", idx, pairs, cfg.top_k, n);

  // Counts into offsets[e + 1], then an exclusive prefix sum: offsets[e] = first slot of e.
  for (int64_t e = 0; e <= n; ++e) offsets[e] = 0;
  for (int64_t p = 0; p < pairs; ++p) ++offsets[idx[p] + 1];
  for (int64_t e = 0; e < n; ++e) offsets[e + 1] += offsets[e];

  // Pairs in increasing flat id land in increasing slots of their expert: stable, so tokens
  // ascend within each group.
  std::vector<int32_t> cursor(offsets, offsets + n);
  for (int64_t p = 0; p < pairs; ++p) order[cursor[idx[p]]++] = static_cast<int32_t>(p);
}

}  // namespace omnimoe::cpu
