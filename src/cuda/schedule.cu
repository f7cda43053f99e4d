// Expert-Centric Scheduling on the device: the T*K pair ids grouped by expert, tokens ascending
// inside each group. Offsets come from a histogram (integer atomics: exact) and an exclusive scan;
// the order from a stable LSD radix sort of (expert id, pair id) over ceil(log2 N) key bits. All
// CUB calls take caller scratch; nothing synchronises the host, so the whole build is
// capturable.
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include <algorithm>

#include "backend/backend.h"
#include "cuda/cuda_common.cuh"

namespace omnimoe::cuda {
namespace {

constexpr size_t kAlign = 256;
size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

int key_bits(int64_t experts) {
  int b = 1;
  while ((int64_t{1} << b) < experts) ++b;
  return b;
}

struct ScheduleLayout {
  size_t keys_a = 0, keys_b = 0, values_b = 0, counts = 0, sort_temp = 0, scan_temp = 0,
         total = 0;
  size_t sort_temp_bytes = 0, scan_temp_bytes = 0;
};

ScheduleLayout schedule_layout(const LayerConfig& cfg, int64_t tokens) {
  const int pairs = static_cast<int>(tokens * cfg.top_k);
  const int experts = static_cast<int>(cfg.num_experts());
  ScheduleLayout L;
  if (pairs > 0) {
    cub::DoubleBuffer<uint32_t> keys(nullptr, nullptr);
    cub::DoubleBuffer<int32_t> values(nullptr, nullptr);
    OMNIMOE_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, L.sort_temp_bytes, keys, values,
                                                       pairs, 0, key_bits(experts)));
  }
  OMNIMOE_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, L.scan_temp_bytes,
                                                   static_cast<const int32_t*>(nullptr),
                                                   static_cast<int32_t*>(nullptr), experts + 1));
  size_t o = 0;
  auto take = [&](size_t bytes) {
    const size_t at = o;
    o += align_up(bytes);
    return at;
  };
  const size_t pair_bytes = static_cast<size_t>(pairs) * 4;
  L.keys_a = take(pair_bytes);
  L.keys_b = take(pair_bytes);
  L.values_b = take(pair_bytes);
  L.counts = take((static_cast<size_t>(experts) + 1) * 4);
  L.sort_temp = take(L.sort_temp_bytes);
  L.scan_temp = take(L.scan_temp_bytes);
  L.total = o;
  return L;
}

// counts[e] = pairs of expert e; ids outside [0, N) are not counted.
__global__ void histogram_kernel(const int32_t* __restrict__ ids, int64_t pairs, int experts,
                                 int32_t* __restrict__ counts) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < pairs;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t e = ids[i];
    if (e >= 0 && e < experts) atomicAdd(counts + e, 1);
  }
}

__global__ void iota_kernel(int32_t* __restrict__ out, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = static_cast<int32_t>(i);
  }
}

unsigned grid_for(int64_t n) {
  return static_cast<unsigned>(std::clamp<int64_t>(ceil_div(n, 256), 1, 65535 * 8));
}

}  // namespace

size_t schedule_workspace_bytes(const LayerConfig& cfg, int64_t tokens) {
  return schedule_layout(cfg, tokens).total;
}

void schedule_build(const LayerConfig& cfg, const TensorView& indices, const Schedule& schedule,
                    Buffer workspace, const Exec& exec) {
  DeviceGuard guard(exec);
  const cudaStream_t stream = stream_of(exec);
  const int64_t tokens = indices.shape[0];
  const int pairs = static_cast<int>(tokens * cfg.top_k);
  const int experts = static_cast<int>(cfg.num_experts());
  ScheduleLayout L = schedule_layout(cfg, tokens);
  char* ws = static_cast<char*>(workspace.data);
  const int32_t* ids = static_cast<const int32_t*>(indices.data);
  int32_t* offsets = static_cast<int32_t*>(schedule.expert_offsets.data);
  int32_t* order = static_cast<int32_t*>(schedule.pair_order.data);
  int32_t* counts = reinterpret_cast<int32_t*>(ws + L.counts);

  OMNIMOE_CUDA_CHECK(cudaMemsetAsync(counts, 0, (static_cast<size_t>(experts) + 1) * 4, stream));
  if (pairs > 0) {
    histogram_kernel<<<grid_for(pairs), 256, 0, stream>>>(ids, pairs, experts, counts);
    OMNIMOE_CUDA_CHECK_LAUNCH("schedule_build (histogram)");
  }
  // Same argument types as the size query in schedule_layout.
  OMNIMOE_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(ws + L.scan_temp, L.scan_temp_bytes,
                                                   static_cast<const int32_t*>(counts), offsets,
                                                   experts + 1, stream));
  if (pairs == 0) return;

  uint32_t* keys_a = reinterpret_cast<uint32_t*>(ws + L.keys_a);
  uint32_t* keys_b = reinterpret_cast<uint32_t*>(ws + L.keys_b);
  int32_t* values_b = reinterpret_cast<int32_t*>(ws + L.values_b);
  OMNIMOE_CUDA_CHECK(cudaMemcpyAsync(keys_a, ids, static_cast<size_t>(pairs) * 4,
                                     cudaMemcpyDeviceToDevice, stream));
  iota_kernel<<<grid_for(pairs), 256, 0, stream>>>(order, pairs);
  OMNIMOE_CUDA_CHECK_LAUNCH("schedule_build (pair ids)");
  // Radix sort is stable: pair ids (token-major) stay ascending inside each expert.
  cub::DoubleBuffer<uint32_t> keys(keys_a, keys_b);
  cub::DoubleBuffer<int32_t> values(order, values_b);
  OMNIMOE_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(ws + L.sort_temp, L.sort_temp_bytes, keys,
                                                     values, pairs, 0, key_bits(experts),
                                                     stream));
  if (values.Current() != order) {
    OMNIMOE_CUDA_CHECK(cudaMemcpyAsync(order, values.Current(), static_cast<size_t>(pairs) * 4,
                                       cudaMemcpyDeviceToDevice, stream));
  }
}

}  // namespace omnimoe::cuda
