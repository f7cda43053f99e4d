#include <map>
#include <mutex>
#include <utility>

#include "core/env.h"
#include "cuda/cuda_common.cuh"

namespace omnimoe {

bool cuda_available() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return false;
  }
  return count > 0;
}

}  // namespace omnimoe

namespace omnimoe::cuda {
namespace {

// cudaDeviceGetAttribute, cached per (device, attribute); 0 when it cannot be read.
int cached_attribute(int device, cudaDeviceAttr attribute) {
  static std::mutex mutex;
  static std::map<std::pair<int, int>, int> known;
  std::lock_guard<std::mutex> lock(mutex);
  const std::pair<int, int> key{device, static_cast<int>(attribute)};
  if (auto it = known.find(key); it != known.end()) return it->second;
  int value = 0;
  if (cudaDeviceGetAttribute(&value, attribute, device) != cudaSuccess) {
    cudaGetLastError();
    value = 0;
  }
  known.emplace(key, value);
  return value;
}

}  // namespace

int64_t l2_bytes(int device) { return cached_attribute(device, cudaDevAttrL2CacheSize); }

bool dependent_launch() {
  static const bool requested = detail::env_equals("OMNIMOE_PDL", "1");
  if (!requested) return false;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return cached_attribute(device, cudaDevAttrComputeCapabilityMajor) >= 9;
}

}  // namespace omnimoe::cuda
