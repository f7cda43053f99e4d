#include <omnimoe/experts.h>

#include "backend/backend.h"
#include "core/validate.h"

namespace omnimoe {
using namespace detail;

namespace {

// The routing inputs shared by forward and backward.
int64_t check_routing(const char* op, const LayerConfig& cfg, const TensorView& x,
                      const ExpertWeights& w, const TensorView& indices, const TensorView& gates,
                      const Exec& exec) {
  const int64_t tokens = check_input(op, cfg, x, exec);
  const Device dev = exec.device;
  check_matrix(op, "weights.up (W)", w.up, cfg.num_experts(), cfg.hidden, x.dtype, dev);
  check_matrix(op, "weights.down (V)", w.down, cfg.num_experts(), cfg.hidden, x.dtype, dev);
  check_dense_matrix(op, "indices", indices, tokens, cfg.top_k, DType::i32, dev);
  check_dense_matrix(op, "gates", gates, tokens, cfg.top_k, DType::f32, dev);
  return tokens;
}

}  // namespace

const char* experts_execution(const LayerConfig& cfg, int64_t tokens, DType dtype,
                              const Exec& exec) {
  check_query("experts_execution", cfg, tokens, exec);
  return OMNIMOE_DISPATCH(exec, experts_execution, cfg, tokens, dtype);
}

size_t experts_forward_workspace_bytes(const LayerConfig& cfg, int64_t tokens, DType dtype,
                                       const Exec& exec) {
  check_query("experts_forward_workspace_bytes", cfg, tokens, exec);
  return OMNIMOE_DISPATCH(exec, experts_forward_workspace_bytes, cfg, tokens, dtype);
}

void experts_forward(const LayerConfig& cfg, const TensorView& x, const ExpertWeights& weights,
                     const TensorView& indices, const TensorView& gates, const TensorView& y,
                     bool accumulate, const TensorView& preact, Buffer workspace,
                     const Exec& exec) {
  const char* op = "experts_forward";
  const int64_t tokens = check_routing(op, cfg, x, weights, indices, gates, exec);
  check_matrix(op, "y", y, tokens, cfg.hidden, x.dtype, exec.device);
  check_dense_matrix(op, "preact", preact, tokens, cfg.top_k, DType::f32, exec.device);
  check_buffer(op, "workspace", workspace,
               OMNIMOE_DISPATCH(exec, experts_forward_workspace_bytes, cfg, tokens, x.dtype));
  if (tokens == 0) return;
  OMNIMOE_DISPATCH(exec, experts_forward, cfg, x, weights, indices, gates, y,
                   accumulate, preact, workspace, exec);
}

size_t experts_backward_workspace_bytes(const LayerConfig& cfg, int64_t tokens, DType dtype,
                                        const Exec& exec) {
  check_query("experts_backward_workspace_bytes", cfg, tokens, exec);
  return OMNIMOE_DISPATCH(exec, experts_backward_workspace_bytes, cfg, tokens, dtype);
}

bool experts_backward_reads_schedule(const LayerConfig& cfg, int64_t tokens, DType dtype,
                                     const Exec& exec) {
  check_query("experts_backward_reads_schedule", cfg, tokens, exec);
  return OMNIMOE_DISPATCH(exec, experts_backward_reads_schedule, cfg, tokens, dtype);
}

void experts_backward(const LayerConfig& cfg, const TensorView& x, const ExpertWeights& weights,
                      const TensorView& indices, const TensorView& gates,
                      const TensorView& preact, const Schedule& schedule, const TensorView& dy,
                      const TensorView& dx, bool accumulate_dx, const ExpertWeights& grads,
                      const TensorView& dgates, Buffer workspace, const Exec& exec) {
  const char* op = "experts_backward";
  const int64_t tokens = check_routing(op, cfg, x, weights, indices, gates, exec);
  const Device dev = exec.device;
  check_schedule(op, cfg, tokens, schedule, dev);
  check_dense_matrix(op, "preact", preact, tokens, cfg.top_k, DType::f32, dev);
  check_matrix(op, "dy", dy, tokens, cfg.hidden, x.dtype, dev);
  check_matrix(op, "dx", dx, tokens, cfg.hidden, x.dtype, dev);
  check_matrix(op, "grads.up (dW)", grads.up, cfg.num_experts(), cfg.hidden, x.dtype, dev);
  check_matrix(op, "grads.down (dV)", grads.down, cfg.num_experts(), cfg.hidden, x.dtype, dev);
  check_dense_matrix(op, "dgates", dgates, tokens, cfg.top_k, DType::f32, dev);
  check_buffer(op, "workspace", workspace,
               OMNIMOE_DISPATCH(exec, experts_backward_workspace_bytes, cfg, tokens, x.dtype));
  OMNIMOE_DISPATCH(exec, experts_backward, cfg, x, weights, indices, gates, preact, schedule, dy,
                   dx, accumulate_dx, grads, dgates, workspace, exec);
}

}  // namespace omnimoe
