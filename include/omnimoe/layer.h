// The composed OmniMoE layer: y = mlp(x) + experts(x, router(x)).
#pragma once

#include <omnimoe/config.h>
#include <omnimoe/experts.h>
#include <omnimoe/mlp.h>
#include <omnimoe/router.h>
#include <omnimoe/schedule.h>
#include <omnimoe/tensor.h>

namespace omnimoe {

struct LayerWeights {
  RouterWeights router;
  ExpertWeights experts;
  MlpWeights mlp;  // empty views when cfg.intermediate == 0
};

// Gradients have the shapes and dtype of the weights.
using LayerGrads = LayerWeights;

// Views into the one buffer that layer_forward fills and layer_backward reads:
// O(T*K) for the routing (16 bytes per pair: indices, scores, gates, preact) and
// O(T*(N_r+N_c+2I)) activations. The schedule is not saved: backward builds it in its workspace.
struct LayerSaved {
  RouterOutputs routing;
  RouterSaved router;
  TensorView expert_preact;  // f32 [T, K]
  MlpSaved mlp;
};

size_t layer_saved_bytes(const LayerConfig& cfg, int64_t tokens, DType dtype);
// Carves `saved` (at least layer_saved_bytes) into the views above; the routing can be read
// from here after forward (indices, scores, gates).
LayerSaved layer_saved_views(const LayerConfig& cfg, int64_t tokens, DType dtype, Buffer saved,
                             Device device);

size_t layer_forward_workspace_bytes(const LayerConfig& cfg, int64_t tokens, DType dtype,
                                     const Exec& exec);
// x, y [T, d]; all weights share x's dtype (f32, f64, bf16 or f16). Writes y and `saved`.
void layer_forward(const LayerConfig& cfg, const TensorView& x, const LayerWeights& weights,
                   const RouterNormState& norm, bool training, const TensorView& y, Buffer saved,
                   Buffer workspace, const Exec& exec);

size_t layer_backward_workspace_bytes(const LayerConfig& cfg, int64_t tokens, DType dtype,
                                      const Exec& exec);
// From dy [T, d] and the saved buffer of the matching forward: dx and every weight gradient
// (overwritten). `training` must match the forward's.
void layer_backward(const LayerConfig& cfg, const TensorView& x, const LayerWeights& weights,
                    bool training, Buffer saved, const TensorView& dy, const TensorView& dx,
                    const LayerGrads& grads, Buffer workspace, const Exec& exec);

}  // namespace omnimoe
