#include <omnimoe/mlp.h>

#include "backend/backend.h"
#include "core/validate.h"
#include "ops/mlp_joined.h"

namespace omnimoe {
using namespace detail;

namespace {

int64_t check_mlp(const char* op, const LayerConfig& cfg, const TensorView& x,
                  const MlpWeights& w, const char* gate_name, const char* up_name,
                  const char* down_name, const Exec& exec) {
  cfg.validate();
  check_exec(op, exec);
  OMNIMOE_CHECK(cfg.intermediate > 0, op,
                ": needs intermediate (I) > 0; I = 0 means the layer has no shared MLP");
  const Device dev = exec.device;
  check_matrix(op, "x", x, -1, cfg.hidden, x.dtype, dev);
  check_storage_dtype(op, "x", x.dtype);
  const int64_t tokens = x.shape[0];
  check_token_count(op, cfg, tokens);
  check_matrix(op, gate_name, w.gate, cfg.intermediate, cfg.hidden, x.dtype, dev);
  check_matrix(op, up_name, w.up, cfg.intermediate, cfg.hidden, x.dtype, dev);
  check_matrix(op, down_name, w.down, cfg.hidden, cfg.intermediate, x.dtype, dev);
  return tokens;
}

void check_saved(const char* op, const LayerConfig& cfg, int64_t tokens, const MlpSaved& s,
                 DType dtype, Device dev) {
  check_dense_matrix(op, "saved.gate_pre", s.gate_pre, tokens, cfg.intermediate, dtype, dev);
  check_dense_matrix(op, "saved.up_pre", s.up_pre, tokens, cfg.intermediate, dtype, dev);
}

}  // namespace

size_t mlp_forward_workspace_bytes(const LayerConfig& cfg, int64_t tokens, DType dtype,
                                   const Exec& exec) {
  check_query("mlp_forward_workspace_bytes", cfg, tokens, exec);
  return OMNIMOE_DISPATCH(exec, mlp_forward_workspace_bytes, cfg, tokens, dtype);
}

namespace {

int64_t check_forward(const char* op, const LayerConfig& cfg, const TensorView& x,
                      const MlpWeights& weights, const TensorView& y, const MlpSaved& saved,
                      Buffer workspace, const Exec& exec) {
  const int64_t tokens = check_mlp(op, cfg, x, weights, "weights.gate", "weights.up",
                                   "weights.down", exec);
  check_matrix(op, "y", y, tokens, cfg.hidden, x.dtype, exec.device);
  check_saved(op, cfg, tokens, saved, x.dtype, exec.device);
  check_buffer(op, "workspace", workspace,
               OMNIMOE_DISPATCH(exec, mlp_forward_workspace_bytes, cfg, tokens, x.dtype));
  return tokens;
}

}  // namespace

void mlp_forward(const LayerConfig& cfg, const TensorView& x, const MlpWeights& weights,
                 const TensorView& y, bool accumulate, const MlpSaved& saved, Buffer workspace,
                 const Exec& exec) {
  const int64_t tokens = check_forward("mlp_forward", cfg, x, weights, y, saved, workspace, exec);
  if (tokens == 0) return;
  OMNIMOE_DISPATCH(exec, mlp_forward, cfg, x, weights, y, accumulate, saved, workspace, exec);
}

void detail::mlp_forward_joined(const LayerConfig& cfg, const TensorView& x,
                                const MlpWeights& weights, const TensorView& y,
                                const TensorView& addend, const MlpSaved& saved,
                                const std::function<void()>& join, Buffer workspace,
                                const Exec& exec) {
  const char* op = "layer_forward (MLP)";
  const int64_t tokens = check_forward(op, cfg, x, weights, y, saved, workspace, exec);
  check_matrix(op, "expert branch output", addend, tokens, cfg.hidden, x.dtype, exec.device);
  if (tokens == 0) {
    join();
    return;
  }
  OMNIMOE_DISPATCH(exec, mlp_forward_joined, cfg, x, weights, y, addend, saved, join, workspace,
                   exec);
}

size_t mlp_backward_workspace_bytes(const LayerConfig& cfg, int64_t tokens, DType dtype,
                                    const Exec& exec) {
  check_query("mlp_backward_workspace_bytes", cfg, tokens, exec);
  return OMNIMOE_DISPATCH(exec, mlp_backward_workspace_bytes, cfg, tokens, dtype);
}

namespace {

void check_backward(const char* op, const LayerConfig& cfg, const TensorView& x,
                    const MlpWeights& weights, const MlpSaved& saved, const TensorView& dy,
                    const TensorView& dx, const MlpWeights& grads, Buffer workspace,
                    const Exec& exec) {
  const int64_t tokens = check_mlp(op, cfg, x, weights, "weights.gate", "weights.up",
                                   "weights.down", exec);
  check_saved(op, cfg, tokens, saved, x.dtype, exec.device);
  check_matrix(op, "dy", dy, tokens, cfg.hidden, x.dtype, exec.device);
  check_matrix(op, "dx", dx, tokens, cfg.hidden, x.dtype, exec.device);
  check_matrix(op, "grads.gate", grads.gate, cfg.intermediate, cfg.hidden, x.dtype, exec.device);
  check_matrix(op, "grads.up", grads.up, cfg.intermediate, cfg.hidden, x.dtype, exec.device);
  check_matrix(op, "grads.down", grads.down, cfg.hidden, cfg.intermediate, x.dtype, exec.device);
  check_buffer(op, "workspace", workspace,
               OMNIMOE_DISPATCH(exec, mlp_backward_workspace_bytes, cfg, tokens, x.dtype));
}

}  // namespace

void mlp_backward(const LayerConfig& cfg, const TensorView& x, const MlpWeights& weights,
                  const MlpSaved& saved, const TensorView& dy, const TensorView& dx,
                  bool accumulate_dx, const MlpWeights& grads, Buffer workspace,
                  const Exec& exec) {
  check_backward("mlp_backward", cfg, x, weights, saved, dy, dx, grads, workspace, exec);
  OMNIMOE_DISPATCH(exec, mlp_backward, cfg, x, weights, saved, dy, dx, accumulate_dx, grads,
                   workspace, exec);
}

void detail::mlp_backward_joined(const LayerConfig& cfg, const TensorView& x,
                                 const MlpWeights& weights, const MlpSaved& saved,
                                 const TensorView& dy, const TensorView& dx,
                                 const TensorView& addend, const MlpWeights& grads,
                                 const std::function<void()>& join, Buffer workspace,
                                 const Exec& exec) {
  const char* op = "layer_backward (MLP)";
  check_backward(op, cfg, x, weights, saved, dy, dx, grads, workspace, exec);
  check_matrix(op, "expert branch dx", addend, x.shape[0], cfg.hidden, x.dtype, exec.device);
  OMNIMOE_DISPATCH(exec, mlp_backward_joined, cfg, x, weights, saved, dy, dx, addend, grads,
                   join, workspace, exec);
}

}  // namespace omnimoe
