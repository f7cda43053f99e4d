// CUDA ops not written yet: each fails with a clear Error. Remove a function here when its
// kernel lands in src/cuda/.
#include "backend/backend.h"

namespace omnimoe::cuda {

const char* experts_execution(const LayerConfig&, int64_t, DType) { return "pending"; }
size_t experts_forward_workspace_bytes(const LayerConfig&, int64_t, DType) { return 0; }
void experts_forward(const LayerConfig&, const TensorView&, const ExpertWeights&,
                     const TensorView&, const TensorView&, const Schedule&, const TensorView&,
                     bool, const TensorView&, Buffer, const Exec&) {
  OMNIMOE_FAIL("experts_forward: the CUDA backend does not implement this op yet");
}
size_t experts_backward_workspace_bytes(const LayerConfig&, int64_t, DType) { return 0; }
void experts_backward(const LayerConfig&, const TensorView&, const ExpertWeights&,
                      const TensorView&, const TensorView&, const TensorView&, const Schedule&,
                      const TensorView&, const TensorView&, bool, const ExpertWeights&,
                      const TensorView&, Buffer, const Exec&) {
  OMNIMOE_FAIL("experts_backward: the CUDA backend does not implement this op yet");
}

}  // namespace omnimoe::cuda
