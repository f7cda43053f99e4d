// What the tool's CUDA files share: error checks that throw, storage-type conversions, the
// activations, and a cuBLASLt matrix product for row-major views.
#pragma once

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <omnimoe/omnimoe.h>

#include <map>
#include <string>
#include <tuple>

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

// act(v) for omnimoe::Activation (silu, exact gelu, relu) and its derivative.
__device__ __forceinline__ float activate(float v, int act) {
  if (act == static_cast<int>(Activation::silu)) return v / (1.0f + __expf(-v));
  if (act == static_cast<int>(Activation::gelu)) return 0.5f * v * (1.0f + erff(v * 0.70710678f));
  return v > 0.0f ? v : 0.0f;
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

// C[m, n] = op(A) op(B) with row-major operands (fp32 accumulation, alpha 1, beta 0): op(A) is
// A [m, k], or A stored [k, m] when trans_a; op(B) is B [k, n], or B stored [n, k] when
// trans_b. A plan per shape is kept, so repeated calls cost one cublasLtMatmul.
class LtGemm {
 public:
  explicit LtGemm(size_t workspace_bytes = size_t{64} << 20);
  ~LtGemm();
  LtGemm(const LtGemm&) = delete;
  LtGemm& operator=(const LtGemm&) = delete;

  void run(DType dtype, const void* a, int64_t lda, bool trans_a, const void* b, int64_t ldb,
           bool trans_b, void* c, int64_t ldc, int64_t m, int64_t n, int64_t k,
           cudaStream_t stream);

 private:
  struct Plan {
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
    cublasLtMatmulAlgo_t algo{};
  };
  using Key = std::tuple<int, int64_t, int64_t, bool, int64_t, int64_t, int64_t, int64_t, bool>;
  Plan& plan(DType dtype, int64_t lda, bool trans_a, int64_t ldb, bool trans_b, int64_t ldc,
             int64_t m, int64_t n, int64_t k);

  cublasLtHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_;
  std::map<Key, Plan> plans_;
};

}  // namespace omnimoe::tool
