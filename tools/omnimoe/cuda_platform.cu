// The CUDA platform: device memory, a non-blocking stream, CUDA-event timing, the fill kernel,
// and the hardware ceilings (copy bandwidth, GEMM rate) measured in the same run.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "baselines/cuda_util.cuh"
#include "cuda/gemm.h"
#include "platform.h"
#include "report.h"
#include "uniform.h"

namespace omnimoe::tool {

namespace {

template <typename T>
__global__ void fill_uniform_kernel(T* out, int64_t n, uint64_t seed, float lo, float hi) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = from_f32<T>(uniform_at(seed, static_cast<uint64_t>(i), lo, hi));
  }
}

template <>
__global__ void fill_uniform_kernel<double>(double* out, int64_t n, uint64_t seed, float lo,
                                            float hi) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = uniform_at(seed, static_cast<uint64_t>(i), lo, hi);
  }
}

__global__ void fill_int_kernel(int32_t* out, int64_t n, uint64_t seed, float lo, float hi) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = static_cast<int32_t>(floorf(uniform_at(seed, static_cast<uint64_t>(i), lo, hi)));
  }
}

// Destroys its events however the timed function leaves (it may throw).
class EventPool {
 public:
  explicit EventPool(size_t n) : events_(n, nullptr) {
    for (auto& e : events_) TOOL_CUDA_CHECK(cudaEventCreate(&e));
  }
  ~EventPool() {
    for (auto e : events_) {
      if (e) cudaEventDestroy(e);
    }
  }
  cudaEvent_t operator[](size_t i) const { return events_[i]; }

 private:
  std::vector<cudaEvent_t> events_;
};

class CudaPlatform final : public Platform {
 public:
  explicit CudaPlatform(int index) : index_(index) {
    int count = 0;
    const cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess || count == 0) {
      cudaGetLastError();
      throw Error(std::string("--device cuda: no CUDA device is visible on this machine (") +
                  (err != cudaSuccess ? cudaGetErrorString(err) : "no devices") +
                  "); use --device cpu");
    }
    if (index < 0 || index >= count) {
      throw Error("--device cuda:" + std::to_string(index) + ": this machine has " +
                  std::to_string(count) + " CUDA device(s)");
    }
    TOOL_CUDA_CHECK(cudaSetDevice(index));
    TOOL_CUDA_CHECK(cudaGetDeviceProperties(&prop_, index));
    TOOL_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    cudaRuntimeGetVersion(&runtime_version_);
    cudaDriverGetVersion(&driver_version_);
  }
  ~CudaPlatform() override {
    if (stream_) cudaStreamDestroy(stream_);
  }

  Device device() const override { return Device::cuda(index_); }
  Exec exec() const override {
    Exec e;
    e.device = Device::cuda(index_);
    e.stream = stream_;
    return e;
  }
  std::string device_name() const override { return prop_.name; }
  std::string device_details() const override {
    char buf[256];
    std::snprintf(
        buf, sizeof buf, "sm_%d%d, %d SMs, %.0f MiB L2, %.1f GiB, CUDA runtime %d.%d, driver %d.%d",
        prop_.major, prop_.minor, prop_.multiProcessorCount, prop_.l2CacheSize / (1024.0 * 1024.0),
        static_cast<double>(prop_.totalGlobalMem) / (1024.0 * 1024 * 1024), runtime_version_ / 1000,
        runtime_version_ % 1000 / 10, driver_version_ / 1000, driver_version_ % 1000 / 10);
    return buf;
  }
  int64_t cache_bytes() const override { return prop_.l2CacheSize; }

  void* allocate(size_t bytes) override {
    void* p = nullptr;
    const cudaError_t err = cudaMalloc(&p, std::max<size_t>(bytes, 1));
    if (err != cudaSuccess) {
      cudaGetLastError();
      throw Error("cudaMalloc of " + format_bytes(static_cast<double>(bytes)) +
                  " failed: " + cudaGetErrorString(err) + " (the tool holds " +
                  format_bytes(static_cast<double>(allocated_bytes())) + ")");
    }
    sizes_.push_back({p, bytes});
    count_allocation(bytes);
    return p;
  }
  void release(void* data) override {
    for (size_t i = 0; i < sizes_.size(); ++i) {
      if (sizes_[i].first == data) {
        count_release(sizes_[i].second);
        sizes_.erase(sizes_.begin() + static_cast<std::ptrdiff_t>(i));
        break;
      }
    }
    cudaFree(data);
  }
  // Ordered after the work on the tool's stream (a non-blocking stream does not wait for
  // plain cudaMemcpy on the legacy stream).
  void copy_to_device(void* dst, const void* src, size_t bytes) override {
    TOOL_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_));
    TOOL_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }
  void copy_to_host(void* dst, const void* src, size_t bytes) override {
    TOOL_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_));
    TOOL_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }
  void fill_uniform(const TensorView& t, uint64_t seed, float lo, float hi) override {
    if (!t.is_contiguous()) throw Error("fill_uniform: the tool fills dense views only");
    const int64_t n = t.numel();
    if (n == 0) return;
    const int threads = 256;
    const int blocks = static_cast<int>(
        std::min<int64_t>((n + threads - 1) / threads, prop_.multiProcessorCount * 16));
    switch (t.dtype) {
      case DType::f32:
        fill_uniform_kernel<<<blocks, threads, 0, stream_>>>(static_cast<float*>(t.data), n, seed,
                                                             lo, hi);
        break;
      case DType::f64:
        fill_uniform_kernel<<<blocks, threads, 0, stream_>>>(static_cast<double*>(t.data), n, seed,
                                                             lo, hi);
        break;
      case DType::bf16:
        fill_uniform_kernel<<<blocks, threads, 0, stream_>>>(static_cast<__nv_bfloat16*>(t.data), n,
                                                             seed, lo, hi);
        break;
      case DType::f16:
        fill_uniform_kernel<<<blocks, threads, 0, stream_>>>(static_cast<__half*>(t.data), n, seed,
                                                             lo, hi);
        break;
      case DType::i32:
        fill_int_kernel<<<blocks, threads, 0, stream_>>>(static_cast<int32_t*>(t.data), n, seed, lo,
                                                         hi);
        break;
      default:
        throw Error(std::string("fill_uniform: unsupported dtype ") + dtype_name(t.dtype));
    }
    TOOL_CUDA_CHECK_LAUNCH("fill_uniform_kernel");
  }
  void synchronize() override { TOOL_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

  std::vector<double> time_ms(const std::function<void(int)>& fn, int warmup, int iters) override {
    for (int i = 0; i < warmup; ++i) fn(i);
    EventPool events(2 * static_cast<size_t>(iters));
    for (int i = 0; i < iters; ++i) {
      TOOL_CUDA_CHECK(cudaEventRecord(events[2 * i], stream_));
      fn(warmup + i);
      TOOL_CUDA_CHECK(cudaEventRecord(events[2 * i + 1], stream_));
    }
    TOOL_CUDA_CHECK(cudaStreamSynchronize(stream_));
    std::vector<double> samples(static_cast<size_t>(iters));
    for (int i = 0; i < iters; ++i) {
      float ms = 0.0f;
      TOOL_CUDA_CHECK(cudaEventElapsedTime(&ms, events[2 * i], events[2 * i + 1]));
      samples[i] = ms;
    }
    return samples;
  }

  std::vector<double> host_issue_ms(const std::function<void(int)>& fn, int iters) override {
    std::vector<double> samples(static_cast<size_t>(iters));
    for (int i = 0; i < iters; ++i) {
      TOOL_CUDA_CHECK(cudaStreamSynchronize(stream_));
      fn(2 * i);  // untimed: the device runs it while the timed call is issued
      const auto start = std::chrono::steady_clock::now();
      fn(2 * i + 1);
      const auto stop = std::chrono::steady_clock::now();
      samples[i] = std::chrono::duration<double, std::milli>(stop - start).count();
    }
    TOOL_CUDA_CHECK(cudaStreamSynchronize(stream_));
    return samples;
  }

  std::vector<double> time_graph_ms(const std::function<void(int)>& fn, int warmup,
                                    int iters) override {
    fn(0);  // first use outside the capture: plans, handles and side streams are created here
    TOOL_CUDA_CHECK(cudaStreamSynchronize(stream_));
    cudaGraph_t graph = nullptr;
    TOOL_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
    try {
      fn(0);
    } catch (...) {
      cudaStreamEndCapture(stream_, &graph);
      if (graph) cudaGraphDestroy(graph);
      throw;
    }
    TOOL_CUDA_CHECK(cudaStreamEndCapture(stream_, &graph));
    cudaGraphExec_t exec = nullptr;
    // Node priorities (the layer's expert branch runs on a high-priority stream) are kept.
    const cudaError_t err =
        cudaGraphInstantiateWithFlags(&exec, graph, cudaGraphInstantiateFlagUseNodePriority);
    cudaGraphDestroy(graph);
    TOOL_CUDA_CHECK(err);
    try {
      auto samples = time_ms([&](int) { TOOL_CUDA_CHECK(cudaGraphLaunch(exec, stream_)); },
                             warmup, iters);
      cudaGraphExecDestroy(exec);
      return samples;
    } catch (...) {
      cudaGraphExecDestroy(exec);
      throw;
    }
  }

  Ceilings measure_ceilings(DType dtype) override {
    Ceilings c;
    try {
      // Copy: large enough to leave the L2 far behind, small enough for any card.
      size_t free_bytes = 0, total_bytes = 0;
      TOOL_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
      const size_t copy_bytes = std::min<size_t>(size_t{1} << 30, free_bytes / 8) & ~size_t{255};
      {
        DeviceArray src(*this, copy_bytes), dst(*this, copy_bytes);
        fill_uniform(TensorView::contiguous(src.data(), DType::f32,
                                            {static_cast<int64_t>(copy_bytes / 4)}, device()),
                     1, -1.0f, 1.0f);
        const auto samples = time_ms(
            [&](int) {
              TOOL_CUDA_CHECK(cudaMemcpyAsync(dst.data(), src.data(), copy_bytes,
                                              cudaMemcpyDeviceToDevice, stream_));
            },
            3, 20);
        c.copy_bytes = static_cast<double>(copy_bytes);
        c.copy_gbps = 2.0 * c.copy_bytes / (median(samples) * 1e-3) / 1e9;
      }
      // GEMM: random data (a product of zeros runs faster than real data).
      const DType gemm_dtype = dtype == DType::f32 || dtype == DType::f16 ? dtype : DType::bf16;
      const int64_t n = 8192;
      const size_t bytes = static_cast<size_t>(n * n) * dtype_size(gemm_dtype);
      DeviceArray a(*this, bytes), b(*this, bytes), out(*this, bytes);
      DeviceArray workspace(*this, cuda::gemm_workspace_bytes());
      const auto view = [&](const DeviceArray& m) {
        return TensorView::contiguous(m.data(), gemm_dtype, {n, n}, device());
      };
      fill_uniform(view(a), 2, -1.0f, 1.0f);
      fill_uniform(view(b), 3, -1.0f, 1.0f);
      const auto samples = time_ms(
          [&](int) {
            cuda::gemm(view(a), false, view(b), false, view(out), 1.0f, 0.0f,
                       Buffer{workspace.data(), workspace.bytes()}, exec());
          },
          3, 10);
      c.gemm_size = n;
      c.gemm_dtype = gemm_dtype;
      c.gemm_tflops = 2.0 * n * n * n / (median(samples) * 1e-3) / 1e12;
      c.measured = true;
    } catch (const std::exception& e) {
      c.error = e.what();
      c.measured = false;
    }
    return c;
  }

 private:
  int index_;
  cudaDeviceProp prop_{};
  cudaStream_t stream_ = nullptr;
  int runtime_version_ = 0, driver_version_ = 0;
  std::vector<std::pair<void*, size_t>> sizes_;
};

}  // namespace

std::unique_ptr<Platform> make_cuda_platform(int device_index) {
  return std::make_unique<CudaPlatform>(device_index);
}

}  // namespace omnimoe::tool
