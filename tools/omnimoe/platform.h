// Where the tool runs the layer: host memory and a steady clock on the CPU, device memory and
// CUDA events on a GPU. Everything the tool allocates goes through here (so peak memory is
// known); the library itself never allocates.
#pragma once

#include <omnimoe/omnimoe.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace omnimoe::tool {

struct Row;

// Hardware ceilings measured in the same run (CUDA only).
struct Ceilings {
  bool measured = false;
  double copy_gbps = 0.0;    // device-to-device copy, bytes read + bytes written per second
  double copy_bytes = 0.0;   // size of the copied buffer
  double gemm_tflops = 0.0;  // cuBLASLt, gemm_size^3, random data, fp32 accumulation
  int64_t gemm_size = 0;
  DType gemm_dtype = DType::bf16;
  std::string error;  // why they could not be measured
};

class Platform {
 public:
  virtual ~Platform() = default;

  virtual Device device() const = 0;
  virtual Exec exec() const = 0;
  // "NVIDIA H100 80GB HBM3" or "CPU".
  virtual std::string device_name() const = 0;
  // "132 SMs, 50.0 MiB L2, CUDA 13.0" or "2 OpenMP threads".
  virtual std::string device_details() const = 0;
  // Bytes of the last-level cache that repeated runs would hit (L2 on a GPU); 0 means the tool
  // does not rotate inputs.
  virtual int64_t cache_bytes() const = 0;

  // Throws omnimoe::Error when the memory is not there.
  virtual void* allocate(size_t bytes) = 0;
  virtual void release(void* data) = 0;
  virtual void copy_to_device(void* dst, const void* src, size_t bytes) = 0;
  virtual void copy_to_host(void* dst, const void* src, size_t bytes) = 0;
  // Uniform values in [lo, hi) from (seed, element index): the same numbers on every platform.
  virtual void fill_uniform(const TensorView& t, uint64_t seed, float lo, float hi) = 0;
  virtual void synchronize() = 0;

  // Runs fn(i) for i = 0 .. warmup + iters - 1 and returns the time of each of the last
  // `iters` calls in milliseconds (device time on a GPU).
  virtual std::vector<double> time_ms(const std::function<void(int)>& fn, int warmup,
                                      int iters) = 0;
  // Host wall time of `iters` calls fn(i), from the call to its return, in milliseconds. On a
  // GPU each timed call is issued behind one untimed call: the device is busy, as in time_ms,
  // but the launch queue never fills (in a back-to-back loop a host that runs ahead fills it,
  // about 1000 launches per stream, and then waits for the device on every call, so its time
  // would read as the device's). On the CPU a call is its work: this is its wall time.
  virtual std::vector<double> host_issue_ms(const std::function<void(int)>& fn, int iters) = 0;
  // Captures fn(0) once into a CUDA graph and times `iters` replays after `warmup`: the device
  // time without the host's launch overhead. Throws omnimoe::Error where there are no graphs.
  virtual std::vector<double> time_graph_ms(const std::function<void(int)>&, int, int) {
    throw Error("CUDA graph rows need a CUDA device");
  }

  virtual Ceilings measure_ceilings(DType dtype) { return {}; }

  size_t allocated_bytes() const { return allocated_; }
  size_t peak_bytes() const { return peak_; }
  void reset_peak() { peak_ = allocated_; }

 protected:
  void count_allocation(size_t bytes) {
    allocated_ += bytes;
    if (allocated_ > peak_) peak_ = allocated_;
  }
  void count_release(size_t bytes) { allocated_ -= bytes; }

 private:
  size_t allocated_ = 0;
  size_t peak_ = 0;
};

std::unique_ptr<Platform> make_cpu_platform(int num_threads);
// Throws omnimoe::Error with a clear message when this build or machine has no CUDA device.
std::unique_ptr<Platform> make_cuda_platform(int device_index);

// Memory owned through a Platform, released when it goes out of scope.
class DeviceArray {
 public:
  DeviceArray() = default;
  DeviceArray(Platform& platform, size_t bytes);
  ~DeviceArray();
  DeviceArray(DeviceArray&& other) noexcept;
  DeviceArray& operator=(DeviceArray&& other) noexcept;
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;

  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  Buffer buffer() const { return {data_, bytes_}; }

 private:
  Platform* platform_ = nullptr;
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

// Carves one allocation into aligned pieces; with base == nullptr it only measures.
class Carver {
 public:
  explicit Carver(void* base, Device device) : base_(static_cast<char*>(base)), device_(device) {}
  TensorView matrix(DType dtype, int64_t rows, int64_t cols);
  TensorView vector(DType dtype, int64_t n);
  Buffer buffer(size_t bytes);
  size_t bytes() const { return offset_; }

 private:
  void* take(size_t bytes);
  char* base_;
  Device device_;
  size_t offset_ = 0;
};

// How many copies of a working set to rotate through so that repeated runs do not find their
// inputs in a cache of `cache_bytes`: 1 when the set is at least twice the cache.
int rotation_sets(size_t working_set_bytes, int64_t cache_bytes);

double median(std::vector<double> v);

}  // namespace omnimoe::tool
