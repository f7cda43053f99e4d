// The shared MLP's products with SwiGLU fused into their epilogues, on Hopper (sm_90) through
// CUTLASS; mlp.cu uses them where swiglu_gemm_device_supported() and
// swiglu_gemm_views_supported() hold, else cuBLASLt and its elementwise kernels. Present only in
// builds with CUTLASS (OMNIMOE_WITH_CUTLASS). bf16 and f16; row-major views with 16-byte-aligned
// rows; no allocation (CUTLASS's workspace comes from `workspace`, at most
// gemm_workspace_bytes()); capturable.
#pragma once

#include <omnimoe/omnimoe.h>

#include <initializer_list>

namespace omnimoe::cuda {

bool swiglu_gemm_device_supported(int device);
// Every view: 16-byte-aligned start and row stride, unit inner stride, sizes within int32.
bool swiglu_gemm_views_supported(std::initializer_list<const TensorView*> views);

// up_pre = x W_up^T and h = silu(gate_pre) * up_pre.  x [T, d], w_up [I, d], the rest [T, I].
void swiglu_up_gemm(const TensorView& x, const TensorView& w_up, const TensorView& gate_pre,
                    const TensorView& up_pre, const TensorView& h, Buffer workspace,
                    const Exec& exec);

// With dh = dy W_down (not stored): d_up = dh * silu(g), d_gate = dh * u * silu'(g) and
// h = silu(g) * u, for g = gate_pre and u = up_pre.  dy [T, d], w_down [d, I], the rest [T, I].
void swiglu_down_grad_gemm(const TensorView& dy, const TensorView& w_down,
                           const TensorView& gate_pre, const TensorView& up_pre,
                           const TensorView& d_gate, const TensorView& d_up, const TensorView& h,
                           Buffer workspace, const Exec& exec);

}  // namespace omnimoe::cuda
