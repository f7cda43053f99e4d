// What the tool's CUDA files share: error checks that throw, storage-type conversions and the
// activations. Matrix products go through the library's cuda::gemm (src/cuda/gemm.h).
#pragma once

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <omnimoe/omnimoe.h>

#include <string>

#include "cuda/experts_activation.cuh"

namespace omnimoe::tool {

[[noreturn]] void throw_cuda(const char* call, const char* error_name, const char* message);

#define TOOL_CUDA_CHECK(call)                                         \
  do {                                                                \
    const cudaError_t tool_err_ = (call);                             \
    if (tool_err_ != cudaSuccess) {                                   \
      ::omnimoe::tool::throw_cuda(#call, cudaGetErrorName(tool_err_), \
                                  cudaGetErrorString(tool_err_));     \
    }                                                                 \
  } while (0)

#define TOOL_CUDA_CHECK_LAUNCH(name) TOOL_CUDA_CHECK(cudaGetLastError())

#define TOOL_CUBLAS_CHECK(call)                                           \
  do {                                                                    \
    const cublasStatus_t tool_st_ = (call);                               \
    if (tool_st_ != CUBLAS_STATUS_SUCCESS) {                              \
      ::omnimoe::tool::throw_cuda(#call, cublasLtGetStatusName(tool_st_), \
                                  cublasLtGetStatusString(tool_st_));     \
    }                                                                     \
  } while (0)

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) {
  return __float2half_rn(v);
}

// act(v) for omnimoe::Activation passed as an int: the library's formulas.
__device__ __forceinline__ float activate(float v, int act) {
  return cuda::activate(static_cast<Activation>(act), v);
}

// `exec` with its stream replaced: the baselines take their stream per call.
inline Exec exec_on(Exec exec, cudaStream_t stream) {
  exec.stream = stream;
  return exec;
}

// Calls fn(T{}) for the device storage type of a dtype the baselines support.
template <typename Fn>
void dispatch_baseline_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::f32:
      fn(float{});
      return;
    case DType::bf16:
      fn(__nv_bfloat16{});
      return;
    case DType::f16:
      fn(__half{});
      return;
    default:
      break;
  }
  throw Error(std::string("the baselines support bf16, f16 and f32, not ") + dtype_name(dtype));
}

}  // namespace omnimoe::tool
