// Router launchers: validate, then dispatch to the backend of `exec`.
#include <omnimoe/router.h>

#include "backend/backend.h"
#include "core/validate.h"

namespace omnimoe {
using namespace detail;

namespace {

void check_weights(const char* op, const char* name_row, const char* name_col,
                   const LayerConfig& cfg, const RouterWeights& w, DType dtype, Device dev) {
  check_matrix(op, name_row, w.row, cfg.grid_rows, cfg.hidden, dtype, dev);
  check_matrix(op, name_col, w.col, cfg.grid_cols, cfg.hidden, dtype, dev);
}

void check_outputs(const char* op, const LayerConfig& cfg, int64_t tokens,
                   const RouterOutputs& out, Device dev) {
  check_dense_matrix(op, "indices", out.indices, tokens, cfg.top_k, DType::i32, dev);
  check_dense_matrix(op, "scores", out.scores, tokens, cfg.top_k, DType::f32, dev);
  check_dense_matrix(op, "gates", out.gates, tokens, cfg.top_k, DType::f32, dev);
}

void check_saved(const char* op, const LayerConfig& cfg, int64_t tokens, const RouterSaved& s,
                 Device dev) {
  check_dense_matrix(op, "saved.row_logits", s.row_logits, tokens, cfg.grid_rows, DType::f32,
                     dev);
  check_dense_matrix(op, "saved.col_logits", s.col_logits, tokens, cfg.grid_cols, DType::f32,
                     dev);
  if (cfg.router_norm == RouterNorm::batch) {
    check_vector(op, "saved.row_rstd", s.row_rstd, cfg.grid_rows, DType::f32, dev);
    check_vector(op, "saved.col_rstd", s.col_rstd, cfg.grid_cols, DType::f32, dev);
  }
}

}  // namespace

size_t router_forward_workspace_bytes(const LayerConfig& cfg, int64_t tokens, DType dtype,
                                      const Exec& exec) {
  check_query("router_forward_workspace_bytes", cfg, tokens, exec);
  return OMNIMOE_DISPATCH(exec, router_forward_workspace_bytes, cfg, tokens, dtype);
}

void router_forward(const LayerConfig& cfg, const TensorView& x, const RouterWeights& weights,
                    const RouterNormState& norm, bool training, const RouterOutputs& out,
                    const RouterSaved& saved, Buffer workspace, const Exec& exec) {
  const char* op = "router_forward";
  const int64_t tokens = check_input(op, cfg, x, exec);
  const Device dev = exec.device;
  check_weights(op, "weights.row (W_r)", "weights.col (W_c)", cfg, weights, x.dtype, dev);
  if (cfg.router_norm == RouterNorm::batch) {
    check_vector(op, "norm.row_mean", norm.row_mean, cfg.grid_rows, DType::f32, dev);
    check_vector(op, "norm.row_var", norm.row_var, cfg.grid_rows, DType::f32, dev);
    check_vector(op, "norm.col_mean", norm.col_mean, cfg.grid_cols, DType::f32, dev);
    check_vector(op, "norm.col_var", norm.col_var, cfg.grid_cols, DType::f32, dev);
    OMNIMOE_CHECK(!training || tokens != 1, op,
                  ": router_norm=batch in training needs more than 1 token per batch, got 1");
  }
  check_outputs(op, cfg, tokens, out, dev);
  check_saved(op, cfg, tokens, saved, dev);
  check_buffer(op, "workspace", workspace,
               OMNIMOE_DISPATCH(exec, router_forward_workspace_bytes, cfg, tokens, x.dtype));
  if (tokens == 0) return;
  OMNIMOE_DISPATCH(exec, router_forward, cfg, x, weights, norm, training, out, saved, workspace,
                   exec);
}

size_t router_select_workspace_bytes(const LayerConfig& cfg, int64_t tokens, const Exec& exec) {
  check_query("router_select_workspace_bytes", cfg, tokens, exec);
  return OMNIMOE_DISPATCH(exec, router_select_workspace_bytes, cfg, tokens);
}

void router_select_topk(const LayerConfig& cfg, const TensorView& row_logp,
                        const TensorView& col_logp, const TensorView& indices,
                        const TensorView& scores, Buffer workspace, const Exec& exec) {
  const char* op = "router_select_topk";
  cfg.validate();
  check_exec(op, exec);
  const Device dev = exec.device;
  check_dense_matrix(op, "row_logp", row_logp, -1, cfg.grid_rows, DType::f32, dev);
  const int64_t tokens = row_logp.shape[0];
  check_token_count(op, cfg, tokens);
  check_dense_matrix(op, "col_logp", col_logp, tokens, cfg.grid_cols, DType::f32, dev);
  check_dense_matrix(op, "indices", indices, tokens, cfg.top_k, DType::i32, dev);
  check_dense_matrix(op, "scores", scores, tokens, cfg.top_k, DType::f32, dev);
  check_buffer(op, "workspace", workspace,
               OMNIMOE_DISPATCH(exec, router_select_workspace_bytes, cfg, tokens));
  if (tokens == 0) return;
  OMNIMOE_DISPATCH(exec, router_select_topk, cfg, row_logp, col_logp, indices, scores, workspace,
                   exec);
}

size_t router_backward_workspace_bytes(const LayerConfig& cfg, int64_t tokens, DType dtype,
                                       const Exec& exec) {
  check_query("router_backward_workspace_bytes", cfg, tokens, exec);
  return OMNIMOE_DISPATCH(exec, router_backward_workspace_bytes, cfg, tokens, dtype);
}

void router_backward(const LayerConfig& cfg, const TensorView& x, const RouterWeights& weights,
                     bool training, const RouterSaved& saved, const RouterOutputs& out,
                     const TensorView& dgates, const TensorView& dx, bool accumulate_dx,
                     const RouterWeights& grads, Buffer workspace, const Exec& exec) {
  const char* op = "router_backward";
  const int64_t tokens = check_input(op, cfg, x, exec);
  const Device dev = exec.device;
  check_weights(op, "weights.row (W_r)", "weights.col (W_c)", cfg, weights, x.dtype, dev);
  check_saved(op, cfg, tokens, saved, dev);
  check_outputs(op, cfg, tokens, out, dev);
  check_dense_matrix(op, "dgates", dgates, tokens, cfg.top_k, DType::f32, dev);
  check_matrix(op, "dx", dx, tokens, cfg.hidden, x.dtype, dev);
  check_weights(op, "grads.row (dW_r)", "grads.col (dW_c)", cfg, grads, x.dtype, dev);
  check_buffer(op, "workspace", workspace,
               OMNIMOE_DISPATCH(exec, router_backward_workspace_bytes, cfg, tokens, x.dtype));
  OMNIMOE_DISPATCH(exec, router_backward, cfg, x, weights, training, saved, out, dgates, dx,
                   accumulate_dx, grads, workspace, exec);
}

}  // namespace omnimoe
