// The composed layer, built from the public ops (so it runs on any backend they run on).
#include <omnimoe/layer.h>

#include <algorithm>
#include <string>

#include "backend/backend.h"
#include "backend/branch.h"
#include "backend/graph_replay.h"
#include "core/check.h"
#include "core/validate.h"
#include "ops/mlp_joined.h"

namespace omnimoe {
using namespace detail;

namespace {

constexpr size_t kAlign = 256;

size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// Lays out the saved buffer; with base == nullptr it only measures.
struct SavedLayout {
  size_t offset = 0;
  char* base = nullptr;
  Device device;

  void* take(size_t bytes) {
    void* p = base ? base + offset : nullptr;
    offset += align_up(bytes);
    return p;
  }
  TensorView matrix(DType dtype, int64_t rows, int64_t cols) {
    void* p = take(static_cast<size_t>(rows * cols) * dtype_size(dtype));
    return TensorView::contiguous(p, dtype, {rows, cols}, device);
  }
  TensorView vector(DType dtype, int64_t n) {
    void* p = take(static_cast<size_t>(n) * dtype_size(dtype));
    return TensorView::contiguous(p, dtype, {n}, device);
  }
};

LayerSaved lay_out(const LayerConfig& cfg, int64_t tokens, DType dtype, SavedLayout& L) {
  const int64_t K = cfg.top_k;
  LayerSaved s;
  s.routing.indices = L.matrix(DType::i32, tokens, K);
  s.routing.scores = L.matrix(DType::f32, tokens, K);
  s.routing.gates = L.matrix(DType::f32, tokens, K);
  s.expert_preact = L.matrix(DType::f32, tokens, K);
  s.router.row_logits = L.matrix(DType::f32, tokens, cfg.grid_rows);
  s.router.col_logits = L.matrix(DType::f32, tokens, cfg.grid_cols);
  if (cfg.router_norm == RouterNorm::batch) {
    s.router.row_rstd = L.vector(DType::f32, cfg.grid_rows);
    s.router.col_rstd = L.vector(DType::f32, cfg.grid_cols);
  }
  if (cfg.intermediate > 0) {
    s.mlp.gate_pre = L.matrix(dtype, tokens, cfg.intermediate);
    s.mlp.up_pre = L.matrix(dtype, tokens, cfg.intermediate);
  }
  return s;
}

// On CUDA the shared MLP and the expert branch (router -> experts forward; schedule -> experts
// -> router backward) run concurrently: the expert branch on BranchFork's high-priority side
// stream, so its chain of small kernels takes SMs as they free instead of queueing behind the
// MLP's GEMMs, and the MLP on the caller's stream. (Sizing the MLP's products for fewer SMs,
// Exec::sm_count, to leave room for the expert branch was measured and gained nothing.) Each
// branch then needs its own workspace region, and the expert branch a private [T, d] output (y,
// dx) that the MLP's last products add after the join (mlp_joined.h), with no add kernel. The
// CPU runs them in order, writing y and dx directly.
bool branches_concurrent(const LayerConfig& cfg, const Exec& exec) {
  return exec.device.type == DeviceType::cuda && cfg.intermediate > 0;
}

// Bytes of a [T, d] temporary in the storage dtype.
size_t hidden_bytes(const LayerConfig& cfg, int64_t tokens, DType dtype) {
  return align_up(static_cast<size_t>(tokens * cfg.hidden) * dtype_size(dtype));
}

// Splits `b` at `bytes` (a multiple of kAlign): returns the front, leaves the rest in `b`.
Buffer take_front(Buffer& b, size_t bytes) {
  const Buffer front{b.data, bytes};
  b = {static_cast<char*>(b.data) + bytes, b.bytes - bytes};
  return front;
}

size_t expert_branch_forward_bytes(const LayerConfig& cfg, int64_t tokens, DType dtype,
                                   const Exec& exec) {
  return std::max(router_forward_workspace_bytes(cfg, tokens, dtype, exec),
                  experts_forward_workspace_bytes(cfg, tokens, dtype, exec));
}

// The schedule is built in backward, where the gather execution's expert sums read it (the
// others build their own order from the indices): forward needs none, and it is not kept
// between the passes. It lives at the front of the expert branch's region.
size_t schedule_bytes(const LayerConfig& cfg, int64_t tokens) {
  return align_up(static_cast<size_t>(tokens * cfg.top_k) * 4) +
         align_up(static_cast<size_t>(cfg.num_experts() + 1) * 4);
}

Schedule take_schedule(const LayerConfig& cfg, int64_t tokens, Buffer& b, Device device) {
  const int64_t pairs = tokens * cfg.top_k, offsets = cfg.num_experts() + 1;
  Schedule s;
  s.pair_order = TensorView::contiguous(take_front(b, align_up(pairs * 4)).data, DType::i32,
                                        {pairs}, device);
  s.expert_offsets = TensorView::contiguous(take_front(b, align_up(offsets * 4)).data,
                                            DType::i32, {offsets}, device);
  return s;
}

size_t expert_branch_backward_bytes(const LayerConfig& cfg, int64_t tokens, DType dtype,
                                    const Exec& exec) {
  return schedule_bytes(cfg, tokens) +
         std::max({schedule_workspace_bytes(cfg, tokens, exec),
                   router_backward_workspace_bytes(cfg, tokens, dtype, exec),
                   experts_backward_workspace_bytes(cfg, tokens, dtype, exec)});
}

void check_layer_args(const char* op, const LayerConfig& cfg, const TensorView& x, Exec exec) {
  cfg.validate();
  check_exec(op, exec);
  check_matrix(op, "x", x, -1, cfg.hidden, x.dtype, exec.device);
  check_storage_dtype(op, "x", x.dtype);
  check_token_count(op, cfg, x.shape[0]);
}

// The cached graph of a layer call: one per op, shape, dtype and mode.
std::string graph_key(const char* op, const LayerConfig& cfg, int64_t tokens, DType dtype,
                      bool training, const Exec& exec) {
  return std::string(op) + " " + cfg.describe() + " T=" + std::to_string(tokens) + " " +
         dtype_name(dtype) + (training ? " training" : " eval") +
         (exec.deterministic ? "" : " atomics") + " sm=" + std::to_string(exec.sm_count);
}

void forward_issue(const LayerConfig& cfg, const TensorView& x, const LayerWeights& weights,
                   const RouterNormState& norm, bool training, const TensorView& y,
                   const LayerSaved& s, Buffer workspace, const Exec& exec) {
  const int64_t tokens = x.shape[0];
  if (branches_concurrent(cfg, exec)) {
    Buffer rest = workspace;
    const Buffer y_experts_buf = take_front(rest, hidden_bytes(cfg, tokens, x.dtype));
    const Buffer mlp_ws =
        take_front(rest, align_up(mlp_forward_workspace_bytes(cfg, tokens, x.dtype, exec)));
    BranchFork fork(exec);
    const Exec& side = fork.side();
    const TensorView y_experts = TensorView::contiguous(y_experts_buf.data, x.dtype,
                                                        {tokens, cfg.hidden}, exec.device);
    router_forward(cfg, x, weights.router, norm, training, s.routing, s.router, rest, side);
    experts_forward(cfg, x, weights.experts, s.routing.indices, s.routing.gates, y_experts,
                    /*accumulate=*/false, s.expert_preact, rest, side);
    mlp_forward_joined(cfg, x, weights.mlp, y, y_experts, s.mlp, [&] { fork.join(); }, mlp_ws,
                       exec);
    return;
  }

  const bool has_mlp = cfg.intermediate > 0;
  if (has_mlp) mlp_forward(cfg, x, weights.mlp, y, /*accumulate=*/false, s.mlp, workspace, exec);
  router_forward(cfg, x, weights.router, norm, training, s.routing, s.router, workspace, exec);
  experts_forward(cfg, x, weights.experts, s.routing.indices, s.routing.gates, y,
                  /*accumulate=*/has_mlp, s.expert_preact, workspace, exec);
}

void backward_issue(const LayerConfig& cfg, const TensorView& x, const LayerWeights& weights,
                    bool training, const LayerSaved& s, const TensorView& dy,
                    const TensorView& dx, const LayerGrads& grads, Buffer workspace,
                    const Exec& exec) {
  const int64_t tokens = x.shape[0];
  const size_t dgates_bytes = align_up(static_cast<size_t>(tokens * cfg.top_k) * 4);
  const TensorView dgates =
      TensorView::contiguous(workspace.data, DType::f32, {tokens, cfg.top_k}, exec.device);
  const Buffer op_workspace{static_cast<char*>(workspace.data) + dgates_bytes,
                            workspace.bytes - dgates_bytes};
  // The schedule keeps its place either way (experts_backward checks its shapes).
  const bool reads_schedule = experts_backward_reads_schedule(cfg, tokens, x.dtype, exec);

  if (branches_concurrent(cfg, exec)) {
    Buffer rest = op_workspace;
    const Buffer dx_experts_buf = take_front(rest, hidden_bytes(cfg, tokens, x.dtype));
    const Buffer mlp_ws =
        take_front(rest, align_up(mlp_backward_workspace_bytes(cfg, tokens, x.dtype, exec)));
    const TensorView dx_experts =
        TensorView::contiguous(dx_experts_buf.data, x.dtype, {tokens, cfg.hidden}, exec.device);
    const Schedule schedule = take_schedule(cfg, tokens, rest, exec.device);
    BranchFork fork(exec);
    const Exec& side = fork.side();
    if (reads_schedule) schedule_build(cfg, s.routing.indices, schedule, rest, side);
    experts_backward(cfg, x, weights.experts, s.routing.indices, s.routing.gates,
                     s.expert_preact, schedule, dy, dx_experts, /*accumulate_dx=*/false,
                     grads.experts, dgates, rest, side);
    router_backward(cfg, x, weights.router, training, s.router, s.routing, dgates, dx_experts,
                    /*accumulate_dx=*/true, grads.router, rest, side);
    mlp_backward_joined(cfg, x, weights.mlp, s.mlp, dy, dx, dx_experts, grads.mlp,
                        [&] { fork.join(); }, mlp_ws, exec);
    return;
  }

  const bool has_mlp = cfg.intermediate > 0;
  if (has_mlp) {
    mlp_backward(cfg, x, weights.mlp, s.mlp, dy, dx, /*accumulate_dx=*/false, grads.mlp,
                 op_workspace, exec);
  }
  Buffer rest = op_workspace;
  const Schedule schedule = take_schedule(cfg, tokens, rest, exec.device);
  if (reads_schedule) schedule_build(cfg, s.routing.indices, schedule, rest, exec);
  experts_backward(cfg, x, weights.experts, s.routing.indices, s.routing.gates, s.expert_preact,
                   schedule, dy, dx, /*accumulate_dx=*/has_mlp, grads.experts, dgates, rest,
                   exec);
  router_backward(cfg, x, weights.router, training, s.router, s.routing, dgates, dx,
                  /*accumulate_dx=*/true, grads.router, rest, exec);
}

}  // namespace

size_t layer_saved_bytes(const LayerConfig& cfg, int64_t tokens, DType dtype) {
  cfg.validate();
  check_storage_dtype("layer_saved_bytes", "dtype", dtype);
  check_token_count("layer_saved_bytes", cfg, tokens);
  SavedLayout L;
  lay_out(cfg, tokens, dtype, L);
  return L.offset;
}

LayerSaved layer_saved_views(const LayerConfig& cfg, int64_t tokens, DType dtype, Buffer saved,
                             Device device) {
  check_buffer("layer_saved_views", "saved", saved, layer_saved_bytes(cfg, tokens, dtype));
  OMNIMOE_CHECK(reinterpret_cast<uintptr_t>(saved.data) % 16 == 0,
                "layer_saved_views: saved must be 16-byte aligned, got address ", saved.data);
  SavedLayout L;
  L.base = static_cast<char*>(saved.data);
  L.device = device;
  return lay_out(cfg, tokens, dtype, L);
}

size_t layer_forward_workspace_bytes(const LayerConfig& cfg, int64_t tokens, DType dtype,
                                     const Exec& exec) {
  const size_t experts = expert_branch_forward_bytes(cfg, tokens, dtype, exec);
  if (branches_concurrent(cfg, exec)) {
    // [experts' y | MLP region | expert branch region]
    return hidden_bytes(cfg, tokens, dtype) +
           align_up(mlp_forward_workspace_bytes(cfg, tokens, dtype, exec)) + experts;
  }
  // The ops run one after another on one stream, so they share one workspace.
  if (cfg.intermediate > 0) {
    return std::max(experts, mlp_forward_workspace_bytes(cfg, tokens, dtype, exec));
  }
  return experts;
}

void layer_forward(const LayerConfig& cfg, const TensorView& x, const LayerWeights& weights,
                   const RouterNormState& norm, bool training, const TensorView& y, Buffer saved,
                   Buffer workspace, const Exec& exec) {
  const char* op = "layer_forward";
  check_layer_args(op, cfg, x, exec);
  const int64_t tokens = x.shape[0];
  check_matrix(op, "y", y, tokens, cfg.hidden, x.dtype, exec.device);
  check_buffer(op, "workspace", workspace,
               layer_forward_workspace_bytes(cfg, tokens, x.dtype, exec));
  const LayerSaved s = layer_saved_views(cfg, tokens, x.dtype, saved, exec.device);

  issue_as_graph(exec, graph_key(op, cfg, tokens, x.dtype, training, exec), [&](const Exec& e) {
    forward_issue(cfg, x, weights, norm, training, y, s, workspace, e);
  });
}

size_t layer_backward_workspace_bytes(const LayerConfig& cfg, int64_t tokens, DType dtype,
                                      const Exec& exec) {
  const size_t experts = expert_branch_backward_bytes(cfg, tokens, dtype, exec);
  // dgates (f32 [T, K]) passes from the experts' backward to the router's.
  const size_t dgates = align_up(static_cast<size_t>(tokens * cfg.top_k) * 4);
  if (branches_concurrent(cfg, exec)) {
    // [dgates | experts' dx | MLP region | expert branch region (schedule first)]
    return dgates + hidden_bytes(cfg, tokens, dtype) +
           align_up(mlp_backward_workspace_bytes(cfg, tokens, dtype, exec)) + experts;
  }
  size_t ops = experts;
  if (cfg.intermediate > 0) {
    ops = std::max(ops, mlp_backward_workspace_bytes(cfg, tokens, dtype, exec));
  }
  return dgates + ops;
}

void layer_backward(const LayerConfig& cfg, const TensorView& x, const LayerWeights& weights,
                    bool training, Buffer saved, const TensorView& dy, const TensorView& dx,
                    const LayerGrads& grads, Buffer workspace, const Exec& exec) {
  const char* op = "layer_backward";
  check_layer_args(op, cfg, x, exec);
  const int64_t tokens = x.shape[0];
  check_buffer(op, "workspace", workspace,
               layer_backward_workspace_bytes(cfg, tokens, x.dtype, exec));
  const LayerSaved s = layer_saved_views(cfg, tokens, x.dtype, saved, exec.device);

  issue_as_graph(exec, graph_key(op, cfg, tokens, x.dtype, training, exec), [&](const Exec& e) {
    backward_issue(cfg, x, weights, training, s, dy, dx, grads, workspace, e);
  });
}

}  // namespace omnimoe
