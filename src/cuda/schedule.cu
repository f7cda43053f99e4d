// Expert-Centric Scheduling on the device: the T*K pair ids grouped by expert, tokens ascending
// inside each group. Two builds, both stable (one answer: the CPU's), both capturable (CUB calls
// take caller scratch; nothing synchronises the host):
// - tiles (when tiles x N is small, e.g. ref-quickstart: 64 tiles x 4096 experts): a block per
//   tile of kTilePairs pairs sorts it by expert in shared memory and counts each expert's pairs,
//   one exclusive scan over (expert, tile) gives each tile its first slot per expert, and the
//   block places its pairs. Four launches; the radix sort below took ~10 and 0.05-0.08 ms there
//   (its passes run 8 CTAs at 65k pairs).
// - radix: offsets from a histogram (integer atomics: exact) and an exclusive scan; the order
//   from a stable LSD radix sort of (expert id, pair id) over ceil(log2 N) key bits.
#include <cub/block/block_discontinuity.cuh>
#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include <algorithm>

#include "backend/backend.h"
#include "cuda/cuda_common.cuh"

namespace omnimoe::cuda {
namespace {

constexpr size_t kAlign = 256;

int key_bits(int64_t experts) {
  int b = 1;
  while ((int64_t{1} << b) < experts) ++b;
  return b;
}

// Pairs per tile of the tile build, and the most (expert, tile) counters it keeps (two int32
// arrays of this many).
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
    RegionOffsets regions(kAlign);
    L.tile_counts = regions.take(static_cast<size_t>(cells) * 4);
    L.tile_first = regions.take(static_cast<size_t>(cells) * 4);
    L.scan_temp = regions.take(L.scan_temp_bytes);
    L.total = regions.total();
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
  RegionOffsets regions(kAlign);
  const size_t pair_bytes = static_cast<size_t>(pairs) * 4;
  L.keys_a = regions.take(pair_bytes);
  L.keys_b = regions.take(pair_bytes);
  L.values_b = regions.take(pair_bytes);
  L.counts = regions.take((static_cast<size_t>(experts) + 1) * 4);
  L.sort_temp = regions.take(L.sort_temp_bytes);
  L.scan_temp = regions.take(L.scan_temp_bytes);
  L.total = regions.total();
  return L;
}

// counts[e] = pairs of expert e.
__global__ void histogram_kernel(const int32_t* __restrict__ ids, int64_t pairs, int experts,
                                 int32_t* __restrict__ counts) {
  kernel_prologue();
  BadExpertId bad;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < pairs;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t e = expert_id_or_skip(ids[i], experts, bad);
    if (e >= 0) atomicAdd(counts + e, 1);
  }
  report_bad_expert_id(bad, experts, "schedule_build");
}

__global__ void iota_kernel(int32_t* __restrict__ out, int64_t n) {
  kernel_prologue();
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = static_cast<int32_t>(i);
  }
}

// The tile build. Tile b holds pairs [b * kTilePairs, ...); counters are expert-major, cell
// (e, b) at e * tiles + b, so one exclusive scan orders every expert's tiles in turn. A block
// sorts its tile by expert in shared memory (a stable block radix sort keeps pair ids ascending
// within an expert); a pair's rank among its expert's pairs in the tile is its distance to the
// start of its run.
constexpr int kTileThreads = 256;
constexpr int kTileItems = kTilePairs / kTileThreads;

struct Differs {
  __device__ bool operator()(uint32_t a, uint32_t b) const { return a != b; }
};
struct Larger {
  __device__ int operator()(int a, int b) const { return a > b ? a : b; }
};

using TileSort = cub::BlockRadixSort<uint32_t, kTileThreads, kTileItems, int32_t>;
using TileFlags = cub::BlockDiscontinuity<uint32_t, kTileThreads>;
using TileScan = cub::BlockScan<int, kTileThreads>;
union TileTemp {
  typename TileSort::TempStorage sort;
  typename TileFlags::TempStorage flags;
  typename TileScan::TempStorage scan;
};

// This thread's kTileItems consecutive entries of tile b sorted by expert: key (the expert, or
// N for pairs past the end and ids outside [0, N)), pair id, rank in its expert's run, and
// whether it ends the run.
struct TileEntries {
  uint32_t key[kTileItems];
  int32_t pair[kTileItems];
  int rank[kTileItems];
  int last[kTileItems];
};

// Past the last pair, and for an id outside [0, N) (kept in `bad`), the key is N: after every
// real expert, so such entries are never placed.
__device__ void sort_tile(const int32_t* __restrict__ ids, int64_t pairs, int experts, int bits,
                          TileTemp& temp, TileEntries& t, BadExpertId& bad) {
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * kTilePairs + threadIdx.x * kTileItems;
#pragma unroll
  for (int i = 0; i < kTileItems; ++i) {
    const int64_t p = p0 + i;
    const int32_t e = p < pairs ? expert_id_or_skip(ids[p], experts, bad) : -1;
    t.key[i] = static_cast<uint32_t>(e < 0 ? experts : e);
    t.pair[i] = static_cast<int32_t>(p);
  }
  TileSort(temp.sort).Sort(t.key, t.pair, 0, bits);
  __syncthreads();
  int head[kTileItems];
  TileFlags(temp.flags).FlagHeads(head, t.key, Differs());
  __syncthreads();
  TileFlags(temp.flags).FlagTails(t.last, t.key, Differs());
  __syncthreads();
  int start[kTileItems];
#pragma unroll
  for (int i = 0; i < kTileItems; ++i) start[i] = head[i] ? threadIdx.x * kTileItems + i : 0;
  TileScan(temp.scan).InclusiveScan(start, start, Larger());
#pragma unroll
  for (int i = 0; i < kTileItems; ++i) t.rank[i] = threadIdx.x * kTileItems + i - start[i];
}

// counts[e * tiles + b] = pairs of expert e in tile b (zero for experts absent from it).
__global__ void __launch_bounds__(kTileThreads)
    tile_count_kernel(const int32_t* __restrict__ ids, int64_t pairs, int experts, int bits,
                      int tiles, int32_t* __restrict__ counts) {
  kernel_prologue();
  __shared__ TileTemp temp;
  const int b = blockIdx.x;
  for (int e = threadIdx.x; e < experts; e += kTileThreads) {
    counts[static_cast<int64_t>(e) * tiles + b] = 0;
  }
  TileEntries t;
  BadExpertId bad;
  sort_tile(ids, pairs, experts, bits, temp, t, bad);  // its barriers order the zeros first
#pragma unroll
  for (int i = 0; i < kTileItems; ++i) {
    if (t.last[i] && t.key[i] < static_cast<uint32_t>(experts)) {
      counts[static_cast<int64_t>(t.key[i]) * tiles + b] = t.rank[i] + 1;
    }
  }
  report_bad_expert_id(bad, experts, "schedule_build");
}

// Places tile b's pairs at first[e * tiles + b] + rank. Tile 0's block also writes offsets[e] =
// first[e * tiles] (where the scan starts expert e), the last tile's offsets[N] (its end).
__global__ void __launch_bounds__(kTileThreads)
    tile_place_kernel(const int32_t* __restrict__ ids, int64_t pairs, int experts, int bits,
                      int tiles, const int32_t* __restrict__ counts,
                      const int32_t* __restrict__ first, int32_t* __restrict__ offsets,
                      int32_t* __restrict__ order) {
  kernel_prologue();
  __shared__ TileTemp temp;
  const int b = blockIdx.x;
  if (b == 0) {
    for (int e = threadIdx.x; e < experts; e += kTileThreads) {
      offsets[e] = first[static_cast<int64_t>(e) * tiles];
    }
  }
  if (b == tiles - 1 && threadIdx.x == 0) {
    const int64_t last = static_cast<int64_t>(experts) * tiles - 1;
    offsets[experts] = first[last] + counts[last];
  }
  TileEntries t;
  BadExpertId bad;  // reported by tile_count_kernel, which ran first
  sort_tile(ids, pairs, experts, bits, temp, t, bad);
#pragma unroll
  for (int i = 0; i < kTileItems; ++i) {
    if (t.key[i] < static_cast<uint32_t>(experts)) {
      order[first[static_cast<int64_t>(t.key[i]) * tiles + b] + t.rank[i]] = t.pair[i];
    }
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
    const int bits = key_bits(static_cast<int64_t>(experts) + 1);  // N marks the padding
    launch_kernel("schedule_build (tile counts)", tile_count_kernel, dim3(tiles),
                  dim3(kTileThreads), 0, stream, ids, static_cast<int64_t>(pairs), experts, bits,
                  tiles, tile_counts);
    OMNIMOE_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(
        ws + L.scan_temp, L.scan_temp_bytes, static_cast<const int32_t*>(tile_counts),
        tile_first, tiles * experts, stream));
    launch_kernel("schedule_build (tile placement)", tile_place_kernel, dim3(tiles),
                  dim3(kTileThreads), 0, stream, ids, static_cast<int64_t>(pairs), experts, bits,
                  tiles, static_cast<const int32_t*>(tile_counts),
                  static_cast<const int32_t*>(tile_first), offsets, order);
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
