// SwiGLU's elementwise math, one definition for the standalone kernels (mlp.cu) and the fused
// GEMM epilogues (sm90/swiglu_gemm.cu), so that both paths compute the same values from the
// same inputs. A is float (double for f64 storage); s is sigmoid(g), computed once per element.
#pragma once

#include "cuda/experts_activation.cuh"

namespace omnimoe::cuda::swiglu {

template <typename A>
__device__ __forceinline__ A sigmoid(A g) {
  return A(1) / (A(1) + exp_of(-g));
}

// h = silu(g) * u
template <typename A>
__device__ __forceinline__ A forward(A g, A s, A u) {
  return g * s * u;
}

// From dh = dL/dh: d_gate = dh * u * silu'(g) and d_up = dh * silu(g).
template <typename A>
__device__ __forceinline__ A grad_gate(A g, A s, A u, A dh) {
  return dh * u * s * (A(1) + g * (A(1) - s));
}
template <typename A>
__device__ __forceinline__ A grad_up(A g, A s, A dh) {
  return dh * g * s;
}

}  // namespace omnimoe::cuda::swiglu
