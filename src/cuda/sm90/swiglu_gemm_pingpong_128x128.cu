// The fused SwiGLU GEMMs in the pingpong_128x128 configuration (swiglu_gemm_configs.h).
#include "cuda/sm90/swiglu_gemm_kernels.cuh"

namespace omnimoe::cuda {
OMNIMOE_SWIGLU_GEMM_CONFIG(pingpong_128x128)
}  // namespace omnimoe::cuda
