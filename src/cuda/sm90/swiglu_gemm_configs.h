// The tile configurations of the fused SwiGLU GEMMs (swiglu_gemm_kernels.cuh), each compiled in
// its own translation unit, swiglu_gemm_<config>.cu; swiglu_gemm.cu picks one per call
// (OMNIMOE_SWIGLU_GEMM_CONFIG names one for timings).
#pragma once

#include <omnimoe/omnimoe.h>

// X(name): ping-pong (two consumer warp groups take turns on 128 x 128 tiles, so one's epilogue
// overlaps the other's main loop) or cooperative (both on one 128 x 256 or 256 x 128 tile).
#define OMNIMOE_SWIGLU_GEMM_CONFIGS(X) X(pingpong_128x128) X(coop_128x256) X(coop_256x128)

namespace omnimoe::cuda {

#define OMNIMOE_DECLARE_SWIGLU_GEMM(Config)                                                     \
  void swiglu_up_gemm_##Config(const TensorView& x, const TensorView& w_up,                    \
                               const TensorView& gate_pre, const TensorView& up_pre,           \
                               const TensorView& h, Buffer workspace, int sm_count,            \
                               const Exec& exec);                                              \
  void swiglu_down_grad_gemm_##Config(const TensorView& dy, const TensorView& w_down,          \
                                      const TensorView& gate_pre, const TensorView& up_pre,    \
                                      const TensorView& d_gate, const TensorView& d_up,        \
                                      const TensorView& h, Buffer workspace, int sm_count,     \
                                      const Exec& exec);
OMNIMOE_SWIGLU_GEMM_CONFIGS(OMNIMOE_DECLARE_SWIGLU_GEMM)
#undef OMNIMOE_DECLARE_SWIGLU_GEMM

}  // namespace omnimoe::cuda
