#include <omnimoe/schedule.h>

#include "backend/backend.h"
#include "core/validate.h"

namespace omnimoe {
using namespace detail;

size_t schedule_workspace_bytes(const LayerConfig& cfg, int64_t tokens, const Exec& exec) {
  check_query("schedule_workspace_bytes", cfg, tokens, exec);
  return OMNIMOE_DISPATCH(exec, schedule_workspace_bytes, cfg, tokens);
}

void schedule_build(const LayerConfig& cfg, const TensorView& indices, const Schedule& schedule,
                    Buffer workspace, const Exec& exec) {
  const char* op = "schedule_build";
  cfg.validate();
  check_exec(op, exec);
  const Device dev = exec.device;
  check_dense_matrix(op, "indices", indices, -1, cfg.top_k, DType::i32, dev);
  const int64_t tokens = indices.shape[0];
  check_token_count(op, cfg, tokens);
  check_schedule(op, cfg, tokens, schedule, dev);
  check_buffer(op, "workspace", workspace,
               OMNIMOE_DISPATCH(exec, schedule_workspace_bytes, cfg, tokens));
  OMNIMOE_DISPATCH(exec, schedule_build, cfg, indices, schedule, workspace, exec);
}

}  // namespace omnimoe
