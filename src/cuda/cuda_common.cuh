// Shared pieces of the CUDA backend: error checks, the stream and device of an Exec, storage
// types and their conversions, dtype dispatch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <omnimoe/omnimoe.h>

#include <cstdint>
#include <cstdio>
#include <utility>

#include "core/check.h"

// The device-side assert's entry point (glibc's name, which CUDA implements for device code; the
// CUDA headers do not declare it for us).
extern "C" __host__ __device__ void __assert_fail(const char* assertion, const char* file,
                                                  unsigned int line, const char* function) noexcept
    __attribute__((__noreturn__));

// Throws omnimoe::Error naming the call and the CUDA error.
#define OMNIMOE_CUDA_CHECK(call)                                                        \
  do {                                                                                  \
    const cudaError_t omnimoe_err_ = (call);                                            \
    if (omnimoe_err_ != cudaSuccess) {                                                  \
      cudaGetLastError(); /* reported by the exception: the next call starts clean */   \
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

// Byte offsets of workspace regions laid out one after another, each start a multiple of `align`.
class RegionOffsets {
 public:
  explicit RegionOffsets(size_t align) : align_(align) {}
  size_t take(size_t bytes) {
    const size_t at = end_;
    end_ += (bytes + align_ - 1) / align_ * align_;
    return at;
  }
  size_t total() const { return end_; }

 private:
  size_t align_, end_ = 0;
};

// Programmatic dependent launch (sm_90 and later). A kernel started by launch_kernel() with it
// may begin while the kernel before it in the stream is still running: its launch overlaps the
// other's tail instead of following it. So every kernel of ours starts with kernel_prologue():
// it lets the kernel's own dependents begin launching, then waits until the kernels before it
// have finished and their writes are visible; before that it touches no global memory. Launched
// without the attribute, both instructions do nothing.
__device__ __forceinline__ void kernel_prologue() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Expert ids come from the caller, and an id outside [0, n) used as a row index would read or
// write out of bounds. Kernels cannot throw and forward / backward may not synchronise, so such
// an id stops the kernel with a device-side assert, as PyTorch's index kernels do: stdout gets
// the op, the id and the range, and every later CUDA call fails (a synchronisation with
// cudaErrorAssert; the context is unusable). The CPU backend throws Error.
__device__ __noinline__ inline void expert_id_out_of_range(const char* op, int64_t id,
                                                          int64_t n) {
  printf("omnimoe: %s: expert id %lld is outside [0, %lld)\n", op, static_cast<long long>(id),
         static_cast<long long>(n));
  __assert_fail("expert id in [0, num_experts)", __FILE__, __LINE__, op);
}
// Kernels check ids in two steps, so that no call sits among their loads (a call there made the
// gather kernels spill and kept the dense fills from issuing their loads together): a bad id
// comes back from expert_id_or_skip as -1, which the caller skips as "no pair", and is kept in
// `bad`; report_bad_expert_id, once the kernel has no more loads of ids in flight (at its end, or
// before a pass that would index with them), asserts.
struct BadExpertId {
  bool seen = false;
  int32_t id = 0;
};
__device__ __forceinline__ int32_t expert_id_or_skip(int32_t id, int64_t n, BadExpertId& bad) {
  const bool ok = id >= 0 && id < n;
  if (!ok) {
    bad.seen = true;
    bad.id = id;
  }
  return ok ? id : -1;
}
__device__ __forceinline__ void report_bad_expert_id(const BadExpertId& bad, int64_t n,
                                                     const char* op) {
  if (bad.seen) expert_id_out_of_range(op, bad.id, n);
}

// Whether launch_kernel() asks for programmatic dependent launch: OMNIMOE_PDL=1 (off by
// default: measured no gain) and a current device of compute capability 9.0 or later. Without
// the variable it returns at once, with no CUDA call (it runs for every launch).
bool dependent_launch();

// kernel<<<grid, block, smem, stream>>>(args...), with programmatic dependent launch where
// dependent_launch() allows it. `name` goes into the error message.
template <typename... Params, typename... Args>
void launch_kernel(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block,
                   size_t smem, cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = dependent_launch() ? 1 : 0;
  const cudaError_t err = cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
  if (err != cudaSuccess) {
    cudaGetLastError();
    OMNIMOE_FAIL("CUDA launch of ", name, " failed: ", cudaGetErrorName(err), " (",
                 cudaGetErrorString(err), ")");
  }
}

// Rows [r0, r0 + rows) of a 2-D view.
inline TensorView rows_of(const TensorView& v, int64_t r0, int64_t rows) {
  TensorView r = v;
  r.data = static_cast<char*>(v.data) + r0 * v.strides[0] * static_cast<int64_t>(dtype_size(v.dtype));
  r.shape[0] = rows;
  return r;
}

// Columns [c0, c0 + cols) of a 2-D view.
inline TensorView cols_of(const TensorView& v, int64_t c0, int64_t cols) {
  TensorView r = v;
  r.data = static_cast<char*>(v.data) + c0 * static_cast<int64_t>(dtype_size(v.dtype));
  r.shape[1] = cols;
  return r;
}

// a and b as one matrix when b's rows follow a's in memory (same dtype, columns and row
// stride): [a; b] in one product instead of two. Else a view with data == nullptr.
inline TensorView stacked_rows(const TensorView& a, const TensorView& b) {
  const int64_t ld = a.strides[0];
  const bool follows = a.dtype == b.dtype && a.shape[1] == b.shape[1] && b.strides[0] == ld &&
                       a.strides[1] == 1 && b.strides[1] == 1 &&
                       static_cast<const char*>(b.data) ==
                           static_cast<const char*>(a.data) +
                               a.shape[0] * ld * static_cast<int64_t>(dtype_size(a.dtype));
  if (!follows) return TensorView{};
  return TensorView::matrix(a.data, a.dtype, a.shape[0] + b.shape[0], a.shape[1], ld, a.device);
}

// Makes exec.device current for the scope of an op, restoring the caller's device after.
class DeviceGuard {
 public:
  // check_pending = false: the layer's own fork and join, which also run while an exception
  // unwinds and must then join whatever is pending; the ops' entries check.
  explicit DeviceGuard(const Exec& exec, bool check_pending = true) {
    const cudaError_t err = cudaGetDevice(&previous_);
    if (err != cudaSuccess) {
      cudaGetLastError();
      OMNIMOE_FAIL("exec.device is ", device_name(exec.device), " but no CUDA device is usable (",
                   cudaGetErrorName(err), ": ", cudaGetErrorString(err),
                   "); run on Device::cpu() or on a machine with a GPU");
    }
    // An error left pending by earlier, unchecked work would be read by the next call that looks
    // (CUB reports it as its own "invalid device ordinal"): name it here, and clear it.
    if (const cudaError_t stale = check_pending ? cudaGetLastError() : cudaSuccess;
        stale != cudaSuccess) {
      OMNIMOE_FAIL("a CUDA error was pending when this omnimoe call started: ",
                   cudaGetErrorName(stale), " (", cudaGetErrorString(stale),
                   "), left by earlier work on this thread (a launch or CUDA call nobody "
                   "checked); it is cleared now, unless the context itself is broken");
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

// Exclusive prefix sum over the block in thread order (blockDim.x a multiple of 32; scratch
// holds a value per warp); *total gets the block's sum.
template <typename T>
__device__ __forceinline__ T block_exclusive_scan(T v, T* scratch, T* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  T inc = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const T n = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += n;
  }
  __syncthreads();
  if (lane == 31) scratch[warp] = inc;
  __syncthreads();
  const T w = lane < warps ? scratch[lane] : T(0);
  T ws = w;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const T n = __shfl_up_sync(0xffffffffu, ws, o);
    if (lane >= o) ws += n;
  }
  const T warp_prefix = __shfl_sync(0xffffffffu, ws - w, warp);
  *total = __shfl_sync(0xffffffffu, ws, warps - 1);
  return warp_prefix + inc - v;
}

}  // namespace omnimoe::cuda
