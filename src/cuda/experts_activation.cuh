// The atomic experts' activation and its derivative on the device, shared by the CUDA
// executions that apply them per pair (gather, tiled, dense): the formulas of the CPU backend (gelu: the
// exact erf form), in float or double.
#pragma once

#include <cmath>

#include "cuda/cuda_common.cuh"

namespace omnimoe::cuda {

__device__ __forceinline__ float exp_of(float z) { return expf(z); }
__device__ __forceinline__ double exp_of(double z) { return exp(z); }
__device__ __forceinline__ float erf_of(float z) { return erff(z); }
__device__ __forceinline__ double erf_of(double z) { return erf(z); }

// act(z).
template <typename A>
__device__ __forceinline__ A activate(Activation act, A z) {
  switch (act) {
    case Activation::silu:
      return z / (A(1) + exp_of(-z));
    case Activation::gelu:
      return A(0.5) * z * (A(1) + erf_of(z * A(M_SQRT1_2)));
    case Activation::relu:
      return z > A(0) ? z : A(0);
  }
  return z;
}

// act'(z).
template <typename A>
__device__ __forceinline__ A activate_grad(Activation act, A z) {
  switch (act) {
    case Activation::silu: {
      const A s = A(1) / (A(1) + exp_of(-z));
      return s * (A(1) + z * (A(1) - s));
    }
    case Activation::gelu: {
      const A cdf = A(0.5) * (A(1) + erf_of(z * A(M_SQRT1_2)));
      const A pdf = exp_of(A(-0.5) * z * z) * A(0.3989422804014327);  // 1/sqrt(2 pi)
      return cdf + z * pdf;
    }
    case Activation::relu:
      return z > A(0) ? A(1) : A(0);
  }
  return A(1);
}

}  // namespace omnimoe::cuda
