// Expert-Centric Scheduling on the device: the T*K pair ids grouped by expert, tokens ascending
// inside each group. Two builds, both stable (one answer: the CPU's), both capturable (CUB calls
// take caller scratch; nothing synchronises the host):
// - tiles (when tiles x N is small, e.g. ref-quickstart: 64 tiles x 4096 experts): a warp per
//   tile of kTilePairs pairs counts its experts, one exclusive scan over (expert, tile) gives each
//   tile its first slot per expert, and the warp places its pairs in order. Four launches; the
//   radix sort below took ~10 and 0.05-0.08 ms there (its first passes run 8 CTAs).
// - radix: offsets from a histogram (integer atomics: exact) and an exclusive scan; the order
//   from a stable LSD radix sort of (expert id, pair id) over ceil(log2 N) key bits.
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

// Pairs per tile of the tile build (a warp takes 32 per step), and the most (expert, tile)
// counters it keeps (two int32 arrays of this many).
constexpr int kTilePairs = 1024;
constexpr int64_t kMaxTileCounters = int64_t{1} << 20;

int64_t tile_count(int64_t pairs) { return ceil_div(pairs, int64_t{kTilePairs}); }

bool use_tiles(int64_t pairs, int64_t experts) {
  return pairs > 0 && tile_count(pairs) * experts <= kMaxTileCounters;
}

struct ScheduleLayout {
  bool tiles = false;
  size_t keys_a = 0, keys_b = 0, values_b = 0, counts = 0, sort_temp = 0, scan_temp = 0,
         total = 0;
  size_t sort_temp_bytes = 0, scan_temp_bytes = 0;
  size_t tile_counts = 0, tile_first = 0;  // int32 [N][tiles] each (tile build)
};

ScheduleLayout schedule_layout(const LayerConfig& cfg, int64_t tokens) {
  const int pairs = static_cast<int>(tokens * cfg.top_k);
  const int experts = static_cast<int>(cfg.num_experts());
  ScheduleLayout L;
  L.tiles = use_tiles(pairs, experts);
  if (L.tiles) {
    const int cells = static_cast<int>(tile_count(pairs) * experts);
    OMNIMOE_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, L.scan_temp_bytes,
                                                     static_cast<const int32_t*>(nullptr),
                                                     static_cast<int32_t*>(nullptr), cells));
    size_t o = 0;
    auto take = [&](size_t bytes) {
      const size_t at = o;
      o += align_up(bytes);
      return at;
    };
    L.tile_counts = take(static_cast<size_t>(cells) * 4);
    L.tile_first = take(static_cast<size_t>(cells) * 4);
    L.scan_temp = take(L.scan_temp_bytes);
    L.total = o;
    return L;
  }
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

// The tile build. Tile b holds pairs [b * kTilePairs, ...); counters are expert-major,
// cell (e, b) at e * tiles + b, so one exclusive scan orders every expert's tiles in turn. Each
// tile's cells belong to one warp, which updates them in order without atomics.

// Lanes of this warp holding the same expert as this lane; the group's count and this lane's
// rank in it (lower lanes = earlier pairs first).
struct Peers {
  unsigned mask;
  int count, rank;
};
__device__ __forceinline__ Peers peers_of(int32_t e, bool active) {
  const unsigned live = __ballot_sync(0xffffffffu, active);
  unsigned mask = __match_any_sync(0xffffffffu, active ? e : -1) & live;
  if (!active) mask = 0;
  const unsigned lower = (1u << (threadIdx.x & 31)) - 1u;
  return {mask, __popc(mask), __popc(mask & lower)};
}

// The group's lowest lane does the group's single update.
__device__ __forceinline__ bool group_leader(const Peers& p) {
  return p.mask != 0 && (__ffs(p.mask) - 1) == static_cast<int>(threadIdx.x & 31);
}

// counts[e * tiles + b] = pairs of expert e in tile b (zero for experts absent from it).
__global__ void tile_count_kernel(const int32_t* __restrict__ ids, int64_t pairs, int experts,
                                  int tiles, int32_t* __restrict__ counts) {
  const int b = blockIdx.x;
  const int lane = threadIdx.x;
  for (int e = lane; e < experts; e += 32) counts[static_cast<int64_t>(e) * tiles + b] = 0;
  __syncwarp();
  const int64_t p0 = static_cast<int64_t>(b) * kTilePairs;
  const int64_t p1 = p0 + kTilePairs < pairs ? p0 + kTilePairs : pairs;
  for (int64_t p = p0 + lane; p - lane < p1; p += 32) {
    const int32_t e = p < p1 ? ids[p] : -1;
    const bool active = e >= 0 && e < experts;
    const Peers g = peers_of(e, active);
    if (group_leader(g)) counts[static_cast<int64_t>(e) * tiles + b] += g.count;
    __syncwarp();
  }
}

// Places tile b's pairs: slot = first[e * tiles + b] + earlier pairs of e in the tile. Before
// moving its cells, tile 0's warp writes offsets[e] = first[e * tiles] (where the scan starts
// expert e) and the last tile's writes offsets[N] (the scan's end, from the last cell).
__global__ void tile_place_kernel(const int32_t* __restrict__ ids, int64_t pairs, int experts,
                                  int tiles, const int32_t* __restrict__ counts,
                                  int32_t* __restrict__ first, int32_t* __restrict__ offsets,
                                  int32_t* __restrict__ order) {
  const int b = blockIdx.x;
  const int lane = threadIdx.x;
  if (b == 0) {
    for (int e = lane; e < experts; e += 32) offsets[e] = first[static_cast<int64_t>(e) * tiles];
  }
  if (b == tiles - 1 && lane == 0) {
    const int64_t last = static_cast<int64_t>(experts) * tiles - 1;  // (N - 1, this tile)
    offsets[experts] = first[last] + counts[last];
  }
  __syncwarp();  // the reads above come before this warp moves its own cells
  const int64_t p0 = static_cast<int64_t>(b) * kTilePairs;
  const int64_t p1 = p0 + kTilePairs < pairs ? p0 + kTilePairs : pairs;
  for (int64_t p = p0 + lane; p - lane < p1; p += 32) {
    const int32_t e = p < p1 ? ids[p] : -1;
    const bool active = e >= 0 && e < experts;
    const Peers g = peers_of(e, active);
    int32_t* cell = active ? first + static_cast<int64_t>(e) * tiles + b : nullptr;
    const int32_t base = active ? *cell : 0;
    __syncwarp();  // every lane has read its cell before a leader moves it
    if (active) order[base + g.rank] = static_cast<int32_t>(p);
    if (group_leader(g)) *cell = base + g.count;
    __syncwarp();
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

  if (L.tiles) {
    const int tiles = static_cast<int>(tile_count(pairs));
    int32_t* tile_counts = reinterpret_cast<int32_t*>(ws + L.tile_counts);
    int32_t* tile_first = reinterpret_cast<int32_t*>(ws + L.tile_first);
    tile_count_kernel<<<tiles, 32, 0, stream>>>(ids, pairs, experts, tiles, tile_counts);
    OMNIMOE_CUDA_CHECK_LAUNCH("schedule_build (tile counts)");
    OMNIMOE_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(
        ws + L.scan_temp, L.scan_temp_bytes, static_cast<const int32_t*>(tile_counts),
        tile_first, tiles * experts, stream));
    tile_place_kernel<<<tiles, 32, 0, stream>>>(ids, pairs, experts, tiles, tile_counts,
                                                tile_first, offsets, order);
    OMNIMOE_CUDA_CHECK_LAUNCH("schedule_build (tile placement)");
    return;
  }

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
