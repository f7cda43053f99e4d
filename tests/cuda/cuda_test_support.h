// CUDA test harness, header-only (the support library also builds on machines without CUDA):
// device memory owned by RAII, host <-> device copies that keep shape, strides and row padding,
// poisoning, the no-GPU skip, and a way to run one op on both backends from the same inputs.
//
//   OMNIMOE_SKIP_WITHOUT_GPU();
//   MirroredTensor x(make_random(DType::bf16, {257, 37}, 1)), y(HostTensor(DType::bf16, {257, 9}));
//   y.poison();
//   run_on_cpu_and_cuda([&](const Exec& e) { some_op(x.view(e), y.view(e), ..., e); });
//   expect_close(y.fetch(), y.host, tolerance_for(DType::bf16, 37), "y");
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <omnimoe/omnimoe.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "test_support.h"

// Fails the test (by exception, which GoogleTest reports with the message) on a CUDA error.
#define OMNIMOE_TEST_CUDA_CHECK(call)                                                  \
  do {                                                                                 \
    const cudaError_t omnimoe_test_err_ = (call);                                      \
    if (omnimoe_test_err_ != cudaSuccess) {                                            \
      throw ::omnimoe::Error(std::string(#call) + " failed: " +                        \
                             cudaGetErrorName(omnimoe_test_err_) + " (" +              \
                             cudaGetErrorString(omnimoe_test_err_) + ")");             \
    }                                                                                  \
  } while (0)

// First statement of every CUDA test.
#define OMNIMOE_SKIP_WITHOUT_GPU()                                           \
  do {                                                                       \
    if (!::omnimoe::cuda_available()) {                                      \
      GTEST_SKIP() << "no CUDA device visible: CUDA test skipped";           \
    }                                                                        \
  } while (0)

namespace omnimoe::test {

// Owns cudaMalloc'd memory on the current device.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
    if (bytes_ > 0) OMNIMOE_TEST_CUDA_CHECK(cudaMalloc(&data_, bytes_));
  }
  ~DeviceBuffer() {
    if (data_ != nullptr) cudaFree(data_);
  }
  DeviceBuffer(DeviceBuffer&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(data_, o.data_);
    std::swap(bytes_, o.bytes_);
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  Buffer buffer() const { return {data_, bytes_}; }
  // All bytes 0xFF: NaN in every float type, so an element an op forgot to write fails.
  // Waits for the memset: cudaMemset runs on the legacy stream, which the tests' non-blocking
  // streams do not wait for, so an unfinished poison could land on an op's workspace mid-call.
  void poison() const {
    if (bytes_ == 0) return;
    OMNIMOE_TEST_CUDA_CHECK(cudaMemset(data_, 0xff, bytes_));
    OMNIMOE_TEST_CUDA_CHECK(cudaDeviceSynchronize());
  }

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

inline void poison_device(const DeviceBuffer& buffer) { buffer.poison(); }

// A device copy of a HostTensor: same dtype, shape, strides and row padding.
class DeviceTensor {
 public:
  DeviceTensor() = default;
  explicit DeviceTensor(const HostTensor& host)
      : buffer_(host.bytes()),
        dtype_(host.dtype()),
        shape_(host.shape()),
        row_padding_(host.row_stride() - host.cols()) {
    view_ = host.view();
    view_.data = buffer_.data();
    int device = 0;
    OMNIMOE_TEST_CUDA_CHECK(cudaGetDevice(&device));
    view_.device = Device::cuda(device);
    copy_from(host);
  }

  const TensorView& view() const { return view_; }
  DType dtype() const { return dtype_; }
  void poison() const { buffer_.poison(); }

  // Whole allocations are copied, padding included, so the layouts match byte for byte.
  void copy_from(const HostTensor& host) const {
    EXPECT_EQ(host.bytes(), buffer_.bytes()) << "copy_from: host and device layouts differ";
    if (host.bytes() == buffer_.bytes() && host.bytes() > 0) {
      OMNIMOE_TEST_CUDA_CHECK(
          cudaMemcpy(buffer_.data(), host.data(), host.bytes(), cudaMemcpyHostToDevice));
    }
  }
  void copy_to(HostTensor& host) const {
    EXPECT_EQ(host.bytes(), buffer_.bytes()) << "copy_to: host and device layouts differ";
    if (host.bytes() == buffer_.bytes() && host.bytes() > 0) {
      OMNIMOE_TEST_CUDA_CHECK(
          cudaMemcpy(host.data(), buffer_.data(), host.bytes(), cudaMemcpyDeviceToHost));
    }
  }
  HostTensor to_host() const {
    HostTensor host(dtype_, shape_, row_padding_);
    copy_to(host);
    return host;
  }

 private:
  DeviceBuffer buffer_;
  DType dtype_ = DType::f32;
  std::vector<int64_t> shape_;
  int64_t row_padding_ = 0;
  TensorView view_;
};

inline DeviceTensor upload(const HostTensor& host) { return DeviceTensor(host); }
inline HostTensor download(const DeviceTensor& device) { return device.to_host(); }
inline void download(const DeviceTensor& device, HostTensor& host) { device.copy_to(host); }
inline void poison_device(const DeviceTensor& device) { device.poison(); }

// A random host tensor (uniform in [lo, hi), never all zeros).
inline HostTensor make_random(DType dtype, std::vector<int64_t> shape, uint64_t seed,
                              int64_t row_padding = 0, double lo = -1.0, double hi = 1.0) {
  HostTensor t(dtype, std::move(shape), row_padding);
  t.fill_uniform(seed, lo, hi);
  return t;
}

// [a; b] in one matrix with a's row padding: operands whose rows follow each other in memory.
inline HostTensor stack_rows(const HostTensor& a, const HostTensor& b) {
  HostTensor s(a.dtype(), {a.rows() + b.rows(), a.cols()}, a.row_stride() - a.cols());
  for (int64_t i = 0; i < a.numel(); ++i) s.set(i, a.get(i));
  for (int64_t i = 0; i < b.numel(); ++i) s.set(a.numel() + i, b.get(i));
  return s;
}

// Rows [r0, r0 + rows) of a 2-D view.
inline TensorView row_block(TensorView v, int64_t r0, int64_t rows) {
  v.data =
      static_cast<char*>(v.data) + r0 * v.strides[0] * static_cast<int64_t>(dtype_size(v.dtype));
  v.shape[0] = rows;
  return v;
}

// One tensor on both backends, from the same host data: view(exec) gives the side exec runs on.
struct MirroredTensor {
  HostTensor host;
  DeviceTensor device;

  explicit MirroredTensor(HostTensor h) : host(std::move(h)), device(host) {}
  TensorView view(const Exec& exec) const {
    return exec.device.type == DeviceType::cuda ? device.view() : host.view();
  }
  void poison() {
    host.poison();
    device.poison();
  }
  HostTensor fetch() const { return device.to_host(); }  // the CUDA side's result
};

// Scratch memory for one side: host bytes for the CPU, device bytes for CUDA; poisoned.
class Scratch {
 public:
  Scratch(const Exec& exec, size_t bytes) {
    if (exec.device.type == DeviceType::cuda) {
      device_ = DeviceBuffer(bytes);
      device_.poison();
    } else {
      host_.assign(bytes, 0xff);
    }
  }
  Buffer buffer() {
    return host_.empty() ? device_.buffer() : Buffer{host_.data(), host_.size()};
  }

 private:
  std::vector<uint8_t> host_;
  DeviceBuffer device_;
};

// Owns a non-blocking stream, so tests catch ops that ignore exec.stream.
class CudaStream {
 public:
  CudaStream() { OMNIMOE_TEST_CUDA_CHECK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking)); }
  ~CudaStream() { cudaStreamDestroy(s_); }
  CudaStream(const CudaStream&) = delete;
  CudaStream& operator=(const CudaStream&) = delete;
  cudaStream_t get() const { return s_; }
  void synchronize() const { OMNIMOE_TEST_CUDA_CHECK(cudaStreamSynchronize(s_)); }

 private:
  cudaStream_t s_ = nullptr;
};

inline Exec cuda_exec(cudaStream_t stream) {
  int device = 0;
  OMNIMOE_TEST_CUDA_CHECK(cudaGetDevice(&device));
  return Exec{Device::cuda(device), stream};
}

// Runs op(exec) on the CPU, then on CUDA on a fresh non-blocking stream, and waits for it.
template <typename Op>
void run_on_cpu_and_cuda(Op&& op) {
  op(cpu_exec());
  CudaStream stream;
  op(cuda_exec(stream.get()));
  stream.synchronize();
  OMNIMOE_TEST_CUDA_CHECK(cudaGetLastError());
}

// Median milliseconds, by CUDA events on `stream`, of `iters` timed calls of fn after `warmup`
// untimed ones. fn() or fn(i): call i gets i (from 0, warm-up and timed calls alike), so a
// caller can rotate its inputs. For the timing tests; never asserts a time.
template <typename Fn>
double median_ms(Fn&& fn, int warmup, int iters, cudaStream_t stream) {
  auto call = [&](int i) {
    if constexpr (std::is_invocable_v<Fn&, int>) {
      fn(i);
    } else {
      fn();
    }
  };
  for (int i = 0; i < warmup; ++i) call(i);
  cudaEvent_t start = nullptr, stop = nullptr;
  OMNIMOE_TEST_CUDA_CHECK(cudaEventCreate(&start));
  OMNIMOE_TEST_CUDA_CHECK(cudaEventCreate(&stop));
  std::vector<double> ms;
  for (int i = 0; i < iters; ++i) {
    OMNIMOE_TEST_CUDA_CHECK(cudaEventRecord(start, stream));
    call(i);
    OMNIMOE_TEST_CUDA_CHECK(cudaEventRecord(stop, stream));
    OMNIMOE_TEST_CUDA_CHECK(cudaEventSynchronize(stop));
    float t = 0;
    OMNIMOE_TEST_CUDA_CHECK(cudaEventElapsedTime(&t, start, stop));
    ms.push_back(t);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

// Every logical element of got within tolerance of want (and no NaN).
inline void expect_close(const HostTensor& got, const HostTensor& want, Tolerance tol,
                         const std::string& name) {
  ASSERT_EQ(got.shape(), want.shape()) << name << ": shapes differ";
  const Comparison c = compare(got.to_vector(), want.to_vector(), tol);
  EXPECT_LE(c.worst_ratio, 1.0) << name << ": " << c.describe();
}

// Byte-for-byte equality of two host tensors (padding excluded): repeatability checks.
inline void expect_bitwise_equal(const HostTensor& a, const HostTensor& b, const char* what) {
  ASSERT_EQ(a.numel(), b.numel()) << what;
  const std::vector<double> va = a.to_vector(), vb = b.to_vector();
  for (size_t i = 0; i < va.size(); ++i) {
    ASSERT_TRUE(std::memcmp(&va[i], &vb[i], sizeof(double)) == 0)
        << what << ": element " << i << " differs between runs: " << va[i] << " vs " << vb[i];
  }
}

}  // namespace omnimoe::test
