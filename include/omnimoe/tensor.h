// Non-owning views of caller-owned memory. The library never allocates device memory:
// outputs, saved state and scratch are all passed in as views or buffers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>

namespace omnimoe {

enum class DType : int { f32, f64, bf16, f16, i32, i64, u8 };

// Bytes per element, and the name used in messages ("bf16").
size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);

enum class DeviceType : int { cpu, cuda };

struct Device {
  DeviceType type = DeviceType::cpu;
  int index = 0;  // CUDA device ordinal; 0 on the CPU

  static Device cpu() { return {DeviceType::cpu, 0}; }
  static Device cuda(int index = 0) { return {DeviceType::cuda, index}; }
  bool operator==(const Device& o) const { return type == o.type && index == o.index; }
  bool operator!=(const Device& o) const { return !(*this == o); }
};

// "cpu" or "cuda:0".
const char* device_name(Device device);

constexpr int kMaxDims = 4;

// A strided view: element (i, j) of a 2-D view lives at data + (i*strides[0] + j*strides[1])
// elements. Ops accept any row stride but need the last dimension contiguous (stride 1).
struct TensorView {
  void* data = nullptr;
  DType dtype = DType::f32;
  int ndim = 0;
  int64_t shape[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};  // in elements, not bytes
  Device device{};

  int64_t size(int dim) const { return shape[dim]; }
  int64_t stride(int dim) const { return strides[dim]; }
  int64_t numel() const;
  bool is_contiguous() const;
  bool empty() const { return data == nullptr && ndim == 0; }

  // A dense row-major view.
  static TensorView contiguous(void* data, DType dtype, std::initializer_list<int64_t> shape,
                               Device device = Device::cpu());
  // A 2-D view with a row stride of `row_stride` elements (>= cols).
  static TensorView matrix(void* data, DType dtype, int64_t rows, int64_t cols, int64_t row_stride,
                           Device device = Device::cpu());
};

// Caller-owned raw memory: scratch (workspace) or the state that forward saves for backward.
struct Buffer {
  void* data = nullptr;
  size_t bytes = 0;
};

// Where and how an op runs. The stream is a cudaStream_t (nullptr: the legacy default stream)
// and is ignored on the CPU. Every op takes this as its last argument.
struct Exec {
  Device device{};
  void* stream = nullptr;
  int num_threads = 0;       // CPU: OpenMP threads, 0 = OpenMP's default
  bool deterministic = true; // CUDA: no floating-point atomics; bitwise repeatable results
  // CUDA: how many SMs the call's matrix products aim to fill (0 = all). For callers that run
  // other work beside the call; cuBLASLt then sizes its products for that many SMs.
  int sm_count = 0;
  // CUDA: layer_forward / layer_backward issue their kernels as the replay of a cached CUDA graph
  // (captured on each call, the cached executable updated to it): the GPU starts each kernel
  // sooner than after a stream launch. Off: every kernel is launched on the stream. Either way
  // the results are the same; inside the caller's own capture the kernels are always launched.
  bool graph_replay = true;
};

// True when this build contains the CUDA backend and a CUDA device is visible.
bool cuda_available();

}  // namespace omnimoe
