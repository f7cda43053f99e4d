// The fused SwiGLU GEMMs in the coop_128x256 configuration (swiglu_gemm_configs.h).
#include "cuda/sm90/swiglu_gemm_kernels.cuh"

namespace omnimoe::cuda {
OMNIMOE_SWIGLU_GEMM_CONFIG(coop_128x256)
}  // namespace omnimoe::cuda
