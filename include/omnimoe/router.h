// Cartesian-product router: row and column logits, optional batch norm, log-softmax per axis,
// exact top-K of the pair sums S_e = p_r[i] + p_c[j] (e = i * N_c + j), then gates.
#pragma once

#include <omnimoe/config.h>
#include <omnimoe/tensor.h>

namespace omnimoe {

struct RouterWeights {
  TensorView row;  // W_r, [N_r, d], dtype of x (router_gate_x.weight)
  TensorView col;  // W_c, [N_c, d], dtype of x (router_gate_y.weight)
};

// Batch-norm running statistics, f32. Training forward with router_norm = batch updates them in
// place (momentum, unbiased variance, as torch.nn.BatchNorm1d); evaluation reads them.
// Unused (may be empty views) when router_norm = none.
struct RouterNormState {
  TensorView row_mean, row_var;  // [N_r]
  TensorView col_mean, col_var;  // [N_c]
};

// The selection, in descending score order per token (ties: smaller expert id first).
struct RouterOutputs {
  TensorView indices;  // i32 [T, K], expert ids in [0, N)
  TensorView scores;   // f32 [T, K], S_e
  TensorView gates;    // f32 [T, K], softmax over the K scores, or exp(S_e) when gating = joint
};

// What router_backward needs from router_forward.
struct RouterSaved {
  TensorView row_logits;  // f32 [T, N_r], the normalised logits that entered log_softmax
  TensorView col_logits;  // f32 [T, N_c]
  TensorView row_rstd;    // f32 [N_r], 1/sqrt(var + eps) the norm used; unused for norm = none
  TensorView col_rstd;    // f32 [N_c]
};

// Non-finite logits: a NaN log-probability is ranked as -inf for the selection, so the selection
// always returns K distinct ids in [0, N); the scores and gates then carry the NaN. With
// router_norm = batch, training needs more than one token (as torch.nn.BatchNorm1d).
size_t router_forward_workspace_bytes(const LayerConfig& cfg, int64_t tokens, DType dtype,
                                      const Exec& exec);
void router_forward(const LayerConfig& cfg, const TensorView& x, const RouterWeights& weights,
                    const RouterNormState& norm, bool training, const RouterOutputs& out,
                    const RouterSaved& saved, Buffer workspace, const Exec& exec);

// The selection alone, from log-probabilities (f32 [T, N_r] and [T, N_c]) to indices and scores.
// Costs O((N_r + N_c) log(N_r + N_c) + K log K) per token; the N scores are never formed.
size_t router_select_workspace_bytes(const LayerConfig& cfg, int64_t tokens, const Exec& exec);
void router_select_topk(const LayerConfig& cfg, const TensorView& row_logp,
                        const TensorView& col_logp, const TensorView& indices,
                        const TensorView& scores, Buffer workspace, const Exec& exec);

// Gradients through the gates, log-softmax and norm to W_r, W_c and x. `dgates` is f32 [T, K].
// dx is overwritten, or added to when accumulate_dx is true. The selection has no gradient.
size_t router_backward_workspace_bytes(const LayerConfig& cfg, int64_t tokens, DType dtype,
                                       const Exec& exec);
void router_backward(const LayerConfig& cfg, const TensorView& x, const RouterWeights& weights,
                     bool training, const RouterSaved& saved, const RouterOutputs& out,
                     const TensorView& dgates, const TensorView& dx, bool accumulate_dx,
                     const RouterWeights& grads, Buffer workspace, const Exec& exec);

}  // namespace omnimoe
