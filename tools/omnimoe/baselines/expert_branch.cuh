// Launchers of the baseline kernels (tools/omnimoe/baselines/*.cu).
#pragma once

#include <cuda_runtime.h>
#include <omnimoe/omnimoe.h>

#include "baselines/baselines.h"
#include "baselines/cuda_util.cuh"
#include "cuda/gemm.h"

namespace omnimoe::tool {

// Token-centric expert branch, as PEER and the public reference run it: one CTA per token keeps
// x_t in registers and gathers the K rows of W and V with 16-byte loads, several rows in
// flight per warp. y [T, d] is overwritten.
void token_centric_forward(const LayerConfig& cfg, DType dtype, const ExpertBranchInputs& in,
                           const TensorView& y, cudaStream_t stream);

// Dense-masked expert branch: S = X W^T over all N experts (cuda::gemm), keep the selected
// pairs as g * act(S) and zero the rest, then Y = S V (cuda::gemm). Owns the T x N scratch.
class DenseMasked {
 public:
  DenseMasked(Platform& platform, const LayerConfig& cfg, int64_t tokens, DType dtype);
  void forward(const ExpertBranchInputs& in, const TensorView& y, cudaStream_t stream);

 private:
  LayerConfig cfg_;
  int64_t tokens_;
  DType dtype_;
  DeviceArray scores_;    // [T, N] in dtype: X W^T, then the masked activations
  DeviceArray selected_;  // f32 [T, K]: the selected entries of X W^T
  Exec exec_;
  DeviceArray workspace_;  // cuda::gemm_workspace_bytes()
};

// Dense SwiGLU with I' intermediate units: y = W_down (silu(W_gate x) * (W_up x)), gate and up
// stacked in one [2 I', d] weight; forward and backward through cuda::gemm. Owns its weights
// (one copy per rotation set), activations and gradients.
class DenseSwiglu {
 public:
  DenseSwiglu(Platform& platform, int64_t tokens, int64_t hidden, int64_t inter, DType dtype,
              int sets);
  void forward(const TensorView& x, int set, cudaStream_t stream);
  void backward(const TensorView& x, int set, cudaStream_t stream);
  int sets() const { return static_cast<int>(weights_.size()); }

 private:
  // A dense [rows, cols] view of dtype_ on the device.
  TensorView view(void* data, int64_t rows, int64_t cols) const;

  int64_t tokens_, hidden_, inter_;
  DType dtype_;
  std::vector<DeviceArray> weights_;  // [2 I', d] gate/up, then [d, I'] down
  DeviceArray activations_;           // H [T, 2 I'], A [T, I'], Y [T, d]
  DeviceArray gradients_;             // dY, dA [T, I'], dH [T, 2 I'], dX, dW_gu, dW_down
  Exec exec_;
  DeviceArray workspace_;  // cuda::gemm_workspace_bytes()
};

}  // namespace omnimoe::tool
