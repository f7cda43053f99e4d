#include <map>
#include <mutex>

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

int64_t l2_bytes(int device) {
  static std::mutex mutex;
  static std::map<int, int64_t> known;
  std::lock_guard<std::mutex> lock(mutex);
  if (auto it = known.find(device); it != known.end()) return it->second;
  int bytes = 0;
  if (cudaDeviceGetAttribute(&bytes, cudaDevAttrL2CacheSize, device) != cudaSuccess) {
    cudaGetLastError();
    bytes = 0;
  }
  known.emplace(device, bytes);
  return bytes;
}

}  // namespace omnimoe::cuda
