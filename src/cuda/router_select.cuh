// The exact top-K selection over the Cartesian grid, shared by router_select_topk and
// router_forward (which also asks for the gates).
#pragma once

#include <cuda_runtime.h>
#include <omnimoe/omnimoe.h>

#include <cstddef>
#include <cstdint>

namespace omnimoe::cuda::router_detail {

enum class GateMode : int { none, softmax, joint };

size_t select_workspace_bytes(const LayerConfig& cfg, int64_t tokens);

// row_logp f32 [T, N_r], col_logp f32 [T, N_c] (dense); indices/scores (and gates unless
// mode = none) dense [T, K]. `workspace` holds select_workspace_bytes(cfg, tokens).
void launch_select(const LayerConfig& cfg, int64_t tokens, const float* row_logp,
                   const float* col_logp, int32_t* indices, float* scores, float* gates,
                   GateMode mode, void* workspace, cudaStream_t stream);

// Whether router_forward can fuse the normalisation and log_softmax into the selection (small K
// and axes: a warp per token).
bool select_fuses_normalise(const LayerConfig& cfg);

// The fused path: the logits f32 [T, N_r] and [T, N_c] (dense) normalised in place by `stats`
// (router_norm.cuh's layout; null for router_norm = none), log_softmax, the selection and the
// gates. row_logp / col_logp (f32 [T, N_r], [T, N_c]) receive the log-probs of the few tokens
// (ties) that the block algorithm finishes.
void launch_normalise_select(const LayerConfig& cfg, int64_t tokens, float* row_logits,
                             float* col_logits, const float* stats, float* row_logp,
                             float* col_logp, int32_t* indices, float* scores, float* gates,
                             GateMode mode, cudaStream_t stream);

}  // namespace omnimoe::cuda::router_detail
