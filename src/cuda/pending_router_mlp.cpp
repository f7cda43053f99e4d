// CUDA ops not written yet: each fails with a clear Error. Remove a function here when its
// kernel lands in src/cuda/.
#include "backend/backend.h"

namespace omnimoe {
namespace cuda {

size_t router_forward_workspace_bytes(const LayerConfig&, int64_t, DType) { return 0; }
void router_forward(const LayerConfig&, const TensorView&, const RouterWeights&,
                    const RouterNormState&, bool, const RouterOutputs&, const RouterSaved&, Buffer,
                    const Exec&) {
  OMNIMOE_FAIL("router_forward: the CUDA backend does not implement this op yet");
}
size_t router_select_workspace_bytes(const LayerConfig&, int64_t) { return 0; }
void router_select_topk(const LayerConfig&, const TensorView&, const TensorView&,
                        const TensorView&, const TensorView&, Buffer, const Exec&) {
  OMNIMOE_FAIL("router_select_topk: the CUDA backend does not implement this op yet");
}
size_t router_backward_workspace_bytes(const LayerConfig&, int64_t, DType) { return 0; }
void router_backward(const LayerConfig&, const TensorView&, const RouterWeights&, bool,
                     const RouterSaved&, const RouterOutputs&, const TensorView&,
                     const TensorView&, bool, const RouterWeights&, Buffer, const Exec&) {
  OMNIMOE_FAIL("router_backward: the CUDA backend does not implement this op yet");
}
size_t schedule_workspace_bytes(const LayerConfig&, int64_t) { return 0; }
void schedule_build(const LayerConfig&, const TensorView&, const Schedule&, Buffer, const Exec&) {
  OMNIMOE_FAIL("schedule_build: the CUDA backend does not implement this op yet");
}
size_t mlp_forward_workspace_bytes(const LayerConfig&, int64_t, DType) { return 0; }
void mlp_forward(const LayerConfig&, const TensorView&, const MlpWeights&, const TensorView&, bool,
                 const MlpSaved&, Buffer, const Exec&) {
  OMNIMOE_FAIL("mlp_forward: the CUDA backend does not implement this op yet");
}
size_t mlp_backward_workspace_bytes(const LayerConfig&, int64_t, DType) { return 0; }
void mlp_backward(const LayerConfig&, const TensorView&, const MlpWeights&, const MlpSaved&,
                  const TensorView&, const TensorView&, bool, const MlpWeights&, Buffer,
                  const Exec&) {
  OMNIMOE_FAIL("mlp_backward: the CUDA backend does not implement this op yet");
}

}  // namespace cuda
}  // namespace omnimoe
