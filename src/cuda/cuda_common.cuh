// Shared pieces of the CUDA backend: error checks, the stream and device of an Exec, storage
// types and their conversions, dtype dispatch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <omnimoe/omnimoe.h>

#include <cstdint>

#include "core/check.h"

// Throws omnimoe::Error naming the call and the CUDA error.
#define OMNIMOE_CUDA_CHECK(call)                                                        \
  do {                                                                                  \
    const cudaError_t omnimoe_err_ = (call);                                            \
    if (omnimoe_err_ != cudaSuccess) {                                                  \
      OMNIMOE_FAIL("CUDA call ", #call, " failed: ", cudaGetErrorName(omnimoe_err_), " (", \
                   cudaGetErrorString(omnimoe_err_), ")");                              \
    }                                                                                   \
  } while (0)

// After every kernel launch: catches bad launch configurations at once.
#define OMNIMOE_CUDA_CHECK_LAUNCH(kernel_name)                                                 \
  do {                                                                                         \
    const cudaError_t omnimoe_err_ = cudaGetLastError();                                       \
    if (omnimoe_err_ != cudaSuccess) {                                                         \
      OMNIMOE_FAIL("CUDA launch of ", kernel_name, " failed: ", cudaGetErrorName(omnimoe_err_), \
                   " (", cudaGetErrorString(omnimoe_err_), ")");                               \
    }                                                                                          \
  } while (0)

namespace omnimoe::cuda {

inline cudaStream_t stream_of(const Exec& exec) { return static_cast<cudaStream_t>(exec.stream); }

// L2 size of CUDA device `device` in bytes (0 when it cannot be read); cached per device.
int64_t l2_bytes(int device);

// Rows [r0, r0 + rows) of a 2-D view.
inline TensorView rows_of(const TensorView& v, int64_t r0, int64_t rows) {
  TensorView r = v;
  r.data = static_cast<char*>(v.data) + r0 * v.strides[0] * static_cast<int64_t>(dtype_size(v.dtype));
  r.shape[0] = rows;
  return r;
}

// Makes exec.device current for the scope of an op, restoring the caller's device after.
class DeviceGuard {
 public:
  explicit DeviceGuard(const Exec& exec) {
    const cudaError_t err = cudaGetDevice(&previous_);
    if (err != cudaSuccess) {
      cudaGetLastError();
      OMNIMOE_FAIL("exec.device is ", device_name(exec.device), " but no CUDA device is usable (",
                   cudaGetErrorName(err), ": ", cudaGetErrorString(err),
                   "); run on Device::cpu() or on a machine with a GPU");
    }
    if (previous_ != exec.device.index) OMNIMOE_CUDA_CHECK(cudaSetDevice(exec.device.index));
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Storage <-> float on the device.
__device__ __forceinline__ float load_float(float v) { return v; }
__device__ __forceinline__ float load_float(double v) { return static_cast<float>(v); }
__device__ __forceinline__ float load_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float load_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T store_float(float v);
template <>
__device__ __forceinline__ float store_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ double store_float<double>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 store_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half store_float<__half>(float v) { return __float2half_rn(v); }

// Calls fn(T{}) with T the device storage type of `dtype`.
template <typename Fn>
decltype(auto) dispatch_storage(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::f32: return fn(float{});
    case DType::f64: return fn(double{});
    case DType::bf16: return fn(__nv_bfloat16{});
    case DType::f16: return fn(__half{});
    default: break;
  }
  OMNIMOE_FAIL("cuda backend: unsupported storage dtype ", dtype_name(dtype));
}

// Sum and maximum over the 32 lanes of a full warp, returned to every lane.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

}  // namespace omnimoe::cuda
