// Which execution the CUDA shared MLP's SwiGLU gets (mlp.cu): fused into the GEMM epilogues
// (CUTLASS, sm_90, bf16 / f16), or cuBLASLt products and separate elementwise kernels.
// OMNIMOE_MLP_SWIGLU=separate forces the latter (tests and timings of both).
#pragma once

#include <omnimoe/omnimoe.h>

namespace omnimoe::cuda {

// True when this build, device and dtype take the fused products. A call whose views are not
// 16-byte aligned (rows, starts) still falls back to the separate kernels.
bool mlp_swiglu_fused(DType dtype, const Exec& exec);

}  // namespace omnimoe::cuda
