// The CPU platform (host memory, steady clock) and the pieces every platform shares.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "host_array.h"
#include "platform.h"
#include "uniform.h"

namespace omnimoe::tool {

DeviceArray::DeviceArray(Platform& platform, size_t bytes)
    : platform_(&platform), data_(platform.allocate(bytes)), bytes_(bytes) {}

DeviceArray::~DeviceArray() {
  if (platform_ && data_) platform_->release(data_);
}

DeviceArray::DeviceArray(DeviceArray&& other) noexcept
    : platform_(other.platform_), data_(other.data_), bytes_(other.bytes_) {
  other.platform_ = nullptr;
  other.data_ = nullptr;
  other.bytes_ = 0;
}

DeviceArray& DeviceArray::operator=(DeviceArray&& other) noexcept {
  if (this != &other) {
    if (platform_ && data_) platform_->release(data_);
    platform_ = other.platform_;
    data_ = other.data_;
    bytes_ = other.bytes_;
    other.platform_ = nullptr;
    other.data_ = nullptr;
    other.bytes_ = 0;
  }
  return *this;
}

void* Carver::take(size_t bytes) {
  constexpr size_t kAlign = 256;  // what layer_saved_views and 16-byte vector loads need
  void* p = base_ ? base_ + offset_ : nullptr;
  offset_ += (bytes + kAlign - 1) / kAlign * kAlign;
  return p;
}

TensorView Carver::matrix(DType dtype, int64_t rows, int64_t cols) {
  void* p = take(static_cast<size_t>(rows * cols) * dtype_size(dtype));
  return TensorView::contiguous(p, dtype, {rows, cols}, device_);
}

TensorView Carver::vector(DType dtype, int64_t n) {
  void* p = take(static_cast<size_t>(n) * dtype_size(dtype));
  return TensorView::contiguous(p, dtype, {n}, device_);
}

Buffer Carver::buffer(size_t bytes) { return {take(bytes), bytes}; }

int rotation_sets(size_t working_set_bytes, int64_t cache_bytes) {
  if (cache_bytes <= 0 || working_set_bytes == 0) return 1;
  const double target = 2.0 * static_cast<double>(cache_bytes);
  if (static_cast<double>(working_set_bytes) >= target) return 1;
  const int sets = static_cast<int>(std::ceil(target / static_cast<double>(working_set_bytes)));
  return std::min(sets, 64);
}

double median(std::vector<double> v) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

namespace {

class CpuPlatform final : public Platform {
 public:
  explicit CpuPlatform(int num_threads) : num_threads_(num_threads) {}

  Device device() const override { return Device::cpu(); }
  Exec exec() const override {
    Exec e;
    e.device = Device::cpu();
    e.num_threads = num_threads_;
    return e;
  }
  std::string device_name() const override { return "CPU"; }
  std::string device_details() const override {
    const int threads = num_threads_ > 0 ? num_threads_ : omp_get_max_threads();
    return std::to_string(threads) + " OpenMP threads";
  }
  int64_t cache_bytes() const override { return 0; }

  void* allocate(size_t bytes) override {
    // std::vector's storage comes from operator new: 16-byte aligned, enough for the views.
    std::vector<uint8_t> block(std::max<size_t>(bytes, 1));
    void* p = block.data();
    blocks_.emplace(p, Block{std::move(block), bytes});
    count_allocation(bytes);
    return p;
  }
  void release(void* data) override {
    auto it = blocks_.find(data);
    if (it == blocks_.end()) return;
    count_release(it->second.requested);
    blocks_.erase(it);
  }
  void copy_to_device(void* dst, const void* src, size_t bytes) override {
    std::memcpy(dst, src, bytes);
  }
  void copy_to_host(void* dst, const void* src, size_t bytes) override {
    std::memcpy(dst, src, bytes);
  }
  void fill_uniform(const TensorView& t, uint64_t seed, float lo, float hi) override {
    HostArray values(t.dtype, t.numel());
    values.fill_uniform(seed, lo, hi);
    std::memcpy(t.data, values.data(), values.bytes());
  }
  void synchronize() override {}

  std::vector<double> time_ms(const std::function<void(int)>& fn, int warmup, int iters) override {
    for (int i = 0; i < warmup; ++i) fn(i);
    std::vector<double> samples;
    for (int i = 0; i < iters; ++i) {
      const auto start = std::chrono::steady_clock::now();
      fn(warmup + i);
      const auto stop = std::chrono::steady_clock::now();
      samples.push_back(std::chrono::duration<double, std::milli>(stop - start).count());
    }
    return samples;
  }
  std::vector<double> host_issue_ms(const std::function<void(int)>& fn, int iters) override {
    return time_ms(fn, 0, iters);
  }

 private:
  int num_threads_;
  struct Block {
    std::vector<uint8_t> storage;
    size_t requested;
  };
  std::map<void*, Block> blocks_;
};

}  // namespace

std::unique_ptr<Platform> make_cpu_platform(int num_threads) {
  return std::make_unique<CpuPlatform>(num_threads);
}

#ifndef OMNIMOE_WITH_CUDA
std::unique_ptr<Platform> make_cuda_platform(int) {
  throw Error(
      "--device cuda: this omnimoe was built without CUDA (no CUDA toolkit was found when it "
      "was configured); use --device cpu, or rebuild on a machine with nvcc");
}
#endif

}  // namespace omnimoe::tool
