// The fused SwiGLU GEMMs in the coop_256x128 configuration (swiglu_gemm_configs.h).
#include "cuda/sm90/swiglu_gemm_kernels.cuh"

namespace omnimoe::cuda {
OMNIMOE_SWIGLU_GEMM_CONFIG(coop_256x128)
}  // namespace omnimoe::cuda
