// Expert-centric tiled execution of the atomic experts (see experts_tiled.cuh and
// docs/experts-design.md).
//
// The token x expert matrix is sparse (density K/N), but each token's experts form a staircase
// in its own (row rank, column rank) grid: a few grid rows and a few grid columns hold nearly all
// of them. So every pair (t, e = i*Nc + j) is assigned to one "group": grid row i when token t
// has at least as many experts in row i as in column j, else grid column j. A group's tokens are
// the tokens with a pair assigned to it; over a tile of them, the group's experts form a dense
// block (about 20% filled at K/N = 4%, against 4% for the whole matrix), which runs on the tensor
// cores (mma.sync, bf16/f16 inputs, fp32 accumulators):
//   - dot products (preact = x.W, and s = dy.V in backward): [tokens x slots] blocks over d,
//     the results of the pairs picked out in the epilogue (dgates, a = g h, da, g h per pair);
//   - token-side sums (y = sum a V, dx = sum da W): [tokens x d] = coef block x expert rows,
//     summed over a token's groups in 64-bit fixed point (integer atomics: exact, so bitwise
//     repeatable in any order), or in fp32 atomics when exec.deterministic is false;
//   - expert-side sums (dW = sum da x, dV = sum g h dy): [slots x d] = coef block^T x token rows,
//     each output row owned by one block per group, so an expert's two groups (its row and its
//     column) are added in a fixed order through an fp32 buffer.
// The groups, their token lists, the tiles and the pair order (per (tile, slot), tokens
// ascending; a 128-bit mask per (tile, slot) gives each pair's row in its tile) are built on the
// device from the indices alone, token-major (the schedule argument is not needed). Kernels that
// walk the tiles are persistent: the grid is sized on the host without knowing the counts.
#include "cuda/experts_tiled.cuh"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "backend/backend.h"
#include "core/env.h"
#include "cuda/cuda_common.cuh"
#include "cuda/experts_activation.cuh"

namespace omnimoe::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kTileTokens = 128;  // tokens per tile of a group (dot products and token sums)

// Dot products: [128 tokens x 64 slots] over d in steps of 64, 3 stages.
constexpr int kDotBM = kTileTokens, kDotBN = 64, kDotBK = 64, kDotStages = 3;
// Token sums: [128 tokens x 128 columns of d] over slots in steps of 32, 3 stages (two blocks
// fit an SM at 320 slots: the slot ranges and masks of an in-place build share the stages'
// space).
constexpr int kTokBM = kTileTokens, kTokBN = 128, kTokBK = 32, kTokStages = 3;
constexpr int kTokMaxWindow = 512;  // slots of the coefficient block held in shared memory
// Expert sums: [up to 320 slots x 128 columns of d] over the group's tokens, 128 at a time.
constexpr int kExpBN = 128;

constexpr int kFixedPointBits = 60;  // |sum| < 2^60 in the 64-bit fixed-point accumulators
// A token's rank of each of its groups is kept in a byte: ranks from kRankCap on are stored as
// kRankCap (they never get a partial row: at most kRankCap rows per token).
constexpr int kRankCap = 254;

// ------------------------------------------------------------------------------------------
// Tensor-core and copy primitives (sm_80+).
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared; bytes past `src_bytes` (0..16) are zero-filled.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// c += a (16x16, row) * b (16x8, col), fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Element offset of (row, col) in a tile of rows of `chunks` 16-byte chunks (8 elements each),
// chunk index XOR-swizzled by the row so ldmatrix and cp.async hit distinct banks.
template <int kChunks>
__device__ __forceinline__ int swz(int row, int col) {
  static_assert(kChunks >= 8, "swizzle needs rows of at least 8 chunks");
  return row * kChunks * 8 + ((((col >> 3) ^ row) & 7) | ((col >> 3) & ~7)) * 8 + (col & 7);
}

// Copies one row segment of 8 elements into shared memory: 16-byte cp.async when rows are
// aligned (zero-filling past `valid` elements), else element by element.
template <typename T, bool kVec>
__device__ __forceinline__ void load_chunk(T* dst, const T* src, int valid) {
  if constexpr (kVec) {
    cp_async_16(dst, src, valid > 0 ? min(valid, 8) * 2 : 0);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) dst[i] = i < valid ? src[i] : store_float<T>(0.0f);
  }
}

// ------------------------------------------------------------------------------------------
// Groups: rows [0, Nr) and columns [Nr, Nr + Nc) of the expert grid. A group's experts are its
// "slots" (Nc of them for a grid row, Nr for a grid column).
struct Groups {
  int tokens, top_k, grid_rows, grid_cols, count, max_slots;
  const int* start;       // [G + 1] offsets of each group's tokens in `tokens_of`
  const int* tokens_of;   // tokens of each group, ascending
  const int* tile_start;  // [G + 1] prefix of kTileTokens-token tiles per group
  // Per (tile, slot) of a group: its pairs are [x, y) of the pair order, in token order, and
  // bit r of its mask is set when the tile's token r has a pair there.
  const int2* ranges;  // [tiles, max_slots]
  const uint4* masks;  // [tiles, max_slots]
  const int4* records; // [P] per pair in pair order: k, gate bits, saved pre-activation bits

  __device__ int slots(int g) const { return g < grid_rows ? grid_cols : grid_rows; }
  __device__ int expert(int g, int s) const {
    return g < grid_rows ? g * grid_cols + s : s * grid_cols + (g - grid_rows);
  }
  // The group holding tile `tile` (binary search over tile_start).
  __device__ int group_of_tile(int tile) const {
    int lo = 0, hi = count;  // tile_start[lo] <= tile < tile_start[hi]
    while (hi - lo > 1) {
      const int mid = (lo + hi) >> 1;
      if (__ldg(tile_start + mid) <= tile) lo = mid; else hi = mid;
    }
    return lo;
  }
};

// Loads the ranges and masks of slots [s_begin, s_begin + n) of `tile` into shared memory.
// Block-wide (ends with a barrier).
__device__ void load_slots(const Groups& gr, int tile, int s_begin, int n, int slots,
                           int2* range, uint4* mask) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const int s = s_begin + i;
    const int64_t entry = static_cast<int64_t>(tile) * gr.max_slots + s;
    range[i] = s < slots ? gr.ranges[entry] : make_int2(0, 0);
    mask[i] = s < slots ? gr.masks[entry] : make_uint4(0u, 0u, 0u, 0u);
  }
  __syncthreads();
}

// Position of the j-th (from 0) set bit of a 32-bit word.
__device__ __forceinline__ int nth_set_bit(unsigned w, int j) {
  int pos = 0;
#pragma unroll
  for (int width = 16; width > 0; width >>= 1) {
    const unsigned low = w & ((1u << width) - 1u);
    const int c = __popc(low);
    if (j >= c) {
      j -= c;
      w >>= width;
      pos += width;
    } else {
      w = low;
    }
  }
  return pos;
}

// Row in the tile of the j-th pair of a (tile, slot): the j-th set bit of its mask.
__device__ __forceinline__ int row_of_pair(const uint4& m, int j) {
  int c = __popc(m.x);
  if (j < c) return nth_set_bit(m.x, j);
  j -= c;
  c = __popc(m.y);
  if (j < c) return 32 + nth_set_bit(m.y, j);
  j -= c;
  c = __popc(m.z);
  if (j < c) return 64 + nth_set_bit(m.z, j);
  return 96 + nth_set_bit(m.w, j - c);
}

// The slot holding pair q, of slots [0, n) as load_slots put them in shared memory: their
// ranges follow each other in the pair order, so it is the last slot whose range starts at or
// before q (empty ranges before it start there too).
__device__ __forceinline__ int slot_of_pair(const int2* range, int n, int q) {
  int lo = 0, hi = n;
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (range[mid].x <= q) lo = mid; else hi = mid;
  }
  return lo;
}

// ------------------------------------------------------------------------------------------
// Building the groups.

// One block per token: counts its experts per grid row and column, assigns each pair to the
// longer line, and marks the groups the token belongs to: member[g, t] = 1 + the group's rank
// among the token's groups (ascending g, capped at kRankCap), 0 when not a member.
__global__ void __launch_bounds__(kThreads) assign_pairs_kernel(
    const int* __restrict__ indices, int64_t index_stride, int tokens, int top_k, int grid_rows,
    int grid_cols, uint8_t* __restrict__ assign_row, uint8_t* __restrict__ member,
    int* __restrict__ member_count) {
  extern __shared__ int counts[];  // [Nr + Nc], then Nr + Nc flags
  const int groups = grid_rows + grid_cols;
  uint8_t* flags = reinterpret_cast<uint8_t*>(counts + groups);
  const int t = blockIdx.x;
  for (int g = threadIdx.x; g < groups; g += blockDim.x) {
    counts[g] = 0;
    flags[g] = 0;
  }
  __syncthreads();
  const int* idx = indices + static_cast<int64_t>(t) * index_stride;
  const int64_t experts = static_cast<int64_t>(grid_rows) * grid_cols;
  // The first kernel to read the ids checks them, reporting after the loop (a thread rereads
  // only its own ids below); the later passes never run after a bad one.
  BadExpertId bad;
  for (int k = threadIdx.x; k < top_k; k += blockDim.x) {
    const int e = expert_id_or_skip(__ldg(idx + k), experts, bad);
    if (e < 0) continue;
    atomicAdd(&counts[e / grid_cols], 1);
    atomicAdd(&counts[grid_rows + e % grid_cols], 1);
  }
  report_bad_expert_id(bad, experts, "experts");
  __syncthreads();
  for (int k = threadIdx.x; k < top_k; k += blockDim.x) {
    const int e = __ldg(idx + k);
    const int i = e / grid_cols, j = e % grid_cols;
    const bool row = counts[i] >= counts[grid_rows + j];
    assign_row[static_cast<int64_t>(t) * top_k + k] = row ? 1 : 0;
    flags[row ? i : grid_rows + j] = 1;
  }
  __syncthreads();
  // Ranks: each thread scans a run of consecutive groups.
  const int per = (groups + kThreads - 1) / kThreads;
  const int g0 = min(groups, static_cast<int>(threadIdx.x) * per), g1 = min(groups, g0 + per);
  int mine = 0;
  for (int g = g0; g < g1; ++g) mine += flags[g];
  __shared__ int warp_sums[kThreads / 32];
  int total;
  int rank = block_exclusive_scan(mine, warp_sums, &total);
  for (int g = g0; g < g1; ++g) {
    const bool in = flags[g] != 0;
    member[static_cast<int64_t>(g) * tokens + t] =
        in ? static_cast<uint8_t>(min(rank, kRankCap) + 1) : uint8_t{0};
    rank += in ? 1 : 0;
  }
  if (threadIdx.x == 0) member_count[t] = total;
}

// The group lists are built per chunk of kListChunk tokens (a thread per 4 consecutive tokens),
// a block per (chunk, group): a warp walking a group's T tokens alone was latency-bound
// (0.45 ms of serial loads at T = 16384).
constexpr int kListChunk = 4 * kThreads;

int list_chunks(int64_t tokens) {
  return static_cast<int>(std::max<int64_t>(1, (tokens + kListChunk - 1) / kListChunk));
}

// Block (c, g): the number of group g's tokens in chunk c.
__global__ void __launch_bounds__(kThreads) count_group_tokens_kernel(
    const uint8_t* __restrict__ member, int tokens, int* __restrict__ chunk_count) {
  const int c = blockIdx.x, g = blockIdx.y, chunks = gridDim.x;
  const uint8_t* row = member + static_cast<int64_t>(g) * tokens;
  const int t0 = c * kListChunk + threadIdx.x * 4;
  int n = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) n += (t0 + i < tokens && row[t0 + i] != 0) ? 1 : 0;
  __shared__ int warp_sums[kThreads / 32];
  int total;
  block_exclusive_scan(n, warp_sums, &total);
  if (threadIdx.x == 0) chunk_count[static_cast<int64_t>(g) * chunks + c] = total;
}

// One block: each group's size (the sum of its chunk counts), and the exclusive prefix sums of
// the group sizes and of their tiles.
__global__ void __launch_bounds__(1024) scan_groups_kernel(const int* __restrict__ chunk_count,
                                                           int chunks, int groups,
                                                           int* __restrict__ count,
                                                           int* __restrict__ start,
                                                           int* __restrict__ tile_start) {
  __shared__ int part_tokens[1024], part_tiles[1024];
  const int per = (groups + blockDim.x - 1) / blockDim.x;
  const int g0 = threadIdx.x * per, g1 = min(groups, g0 + per);
  int a = 0, b = 0;
  for (int g = g0; g < g1; ++g) {
    int n = 0;
    for (int c = 0; c < chunks; ++c) n += chunk_count[static_cast<int64_t>(g) * chunks + c];
    count[g] = n;  // reread below by this thread only
    a += n;
    b += (n + kTileTokens - 1) / kTileTokens;
  }
  part_tokens[threadIdx.x] = a;
  part_tiles[threadIdx.x] = b;
  __syncthreads();
  if (threadIdx.x == 0) {  // at most 1024 partial sums: serial is fine
    int sa = 0, sb = 0;
    for (int i = 0; i < static_cast<int>(blockDim.x); ++i) {
      const int ta = part_tokens[i], tb = part_tiles[i];
      part_tokens[i] = sa;
      part_tiles[i] = sb;
      sa += ta;
      sb += tb;
    }
    start[groups] = sa;
    tile_start[groups] = sb;
  }
  __syncthreads();
  a = part_tokens[threadIdx.x];
  b = part_tiles[threadIdx.x];
  for (int g = g0; g < g1; ++g) {
    start[g] = a;
    tile_start[g] = b;
    a += count[g];
    b += (count[g] + kTileTokens - 1) / kTileTokens;
  }
}

// Block (c, g): group g's tokens of chunk c in ascending order at their place in the group's
// list, with their ranks (member - 1), and each token's position in the group (position [T, G],
// token-major for the per-token passes).
__global__ void __launch_bounds__(kThreads) fill_groups_kernel(
    const uint8_t* __restrict__ member, int tokens, const int* __restrict__ chunk_count,
    const int* __restrict__ start, int* __restrict__ tokens_of, uint8_t* __restrict__ rank_of,
    int* __restrict__ position) {
  const int c = blockIdx.x, g = blockIdx.y, chunks = gridDim.x, groups = gridDim.y;
  __shared__ int warp_sums[kThreads / 32];
  __shared__ int before;  // the group's tokens in chunks [0, c)
  if (threadIdx.x < 32) {
    int n = 0;
    for (int i = threadIdx.x; i < c; i += 32) n += chunk_count[static_cast<int64_t>(g) * chunks + i];
    n = warp_sum(n);
    if (threadIdx.x == 0) before = n;
  }
  const uint8_t* row = member + static_cast<int64_t>(g) * tokens;
  const int t0 = c * kListChunk + threadIdx.x * 4;
  uint8_t m[4];
  int n = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    m[i] = t0 + i < tokens ? row[t0 + i] : uint8_t{0};
    n += m[i] != 0 ? 1 : 0;
  }
  int total;
  int p = block_exclusive_scan(n, warp_sums, &total) + before;  // its barriers publish `before`
  const int base = start[g];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (m[i] == 0) continue;
    tokens_of[base + p] = t0 + i;
    rank_of[base + p] = static_cast<uint8_t>(m[i] - 1);
    position[static_cast<int64_t>(t0 + i) * groups + g] = p;
    ++p;
  }
}

// The pairs of each (tile, slot) are kept together, in token order: a 128-bit mask per
// (tile, slot) marks its tokens (bit = position in the tile), the prefix sums of the masks'
// populations give each (tile, slot) its range, and a pair's rank in its range is the number of
// bits below its own. Three passes over the pairs, each token-major (coalesced reads of the
// indices, gates and pre-activations); no atomics but bit-or, so the layout is deterministic.
struct PairSlot {
  int64_t entry;  // tile * max_slots + slot
  int bit;        // position of the token in its tile
  int pos;        // position of the token in its group
};

__device__ __forceinline__ PairSlot pair_slot(int e, bool row, int t, int groups, int grid_rows,
                                              int grid_cols, const int* __restrict__ position,
                                              const int* __restrict__ tile_start,
                                              int max_slots) {
  const int i = e / grid_cols, j = e - i * grid_cols;
  const int g = row ? i : grid_rows + j;
  const int pos = __ldg(position + static_cast<int64_t>(t) * groups + g);
  const int tile = __ldg(tile_start + g) + pos / kTileTokens;
  return {static_cast<int64_t>(tile) * max_slots + (row ? j : i), pos % kTileTokens, pos};
}

// One block per token: marks its pairs in the masks.
__global__ void __launch_bounds__(kThreads) mark_pairs_kernel(
    const int* __restrict__ indices, int64_t index_stride, int top_k, int grid_rows,
    int grid_cols, const uint8_t* __restrict__ assign_row, const int* __restrict__ position,
    const int* __restrict__ tile_start, int max_slots, unsigned* __restrict__ masks) {
  const int t = blockIdx.x, groups = grid_rows + grid_cols;
  for (int k = threadIdx.x; k < top_k; k += blockDim.x) {
    const int e = __ldg(indices + static_cast<int64_t>(t) * index_stride + k);
    const bool row = assign_row[static_cast<int64_t>(t) * top_k + k] != 0;
    const PairSlot ps =
        pair_slot(e, row, t, groups, grid_rows, grid_cols, position, tile_start, max_slots);
    atomicOr(masks + ps.entry * 4 + ps.bit / 32, 1u << (ps.bit % 32));
  }
}

__device__ __forceinline__ int mask_count(const unsigned* masks, int64_t entry) {
  const uint4 m = reinterpret_cast<const uint4*>(masks)[entry];
  return __popc(m.x) + __popc(m.y) + __popc(m.z) + __popc(m.w);
}

constexpr int kScanBlock = 1024;  // mask entries per block of the range scan (4 per thread)

// Sums of the mask populations per block of kScanBlock entries.
__global__ void __launch_bounds__(kThreads) mask_block_sums_kernel(
    const unsigned* __restrict__ masks, const int* __restrict__ tile_count, int max_slots,
    int* __restrict__ block_sums) {
  const int64_t n = static_cast<int64_t>(*tile_count) * max_slots;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kScanBlock;
  if (first >= n) return;
  int sum = 0;
  for (int i = threadIdx.x; i < kScanBlock; i += blockDim.x) {
    if (first + i < n) sum += mask_count(masks, first + i);
  }
  sum = warp_sum(sum);
  __shared__ int warp_sums[kThreads / 32];
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    int total = 0;
    for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
    block_sums[blockIdx.x] = total;
  }
}

// One block: exclusive prefix sums of the block sums, in place.
__global__ void __launch_bounds__(1024) scan_block_sums_kernel(
    const int* __restrict__ tile_count, int max_slots, int* __restrict__ block_sums) {
  const int64_t n = static_cast<int64_t>(*tile_count) * max_slots;
  const int blocks = static_cast<int>((n + kScanBlock - 1) / kScanBlock);
  __shared__ int part[1024];
  const int per = (blocks + blockDim.x - 1) / blockDim.x;
  const int b0 = threadIdx.x * per, b1 = min(blocks, b0 + per);
  int a = 0;
  for (int b = b0; b < b1; ++b) a += block_sums[b];
  part[threadIdx.x] = a;
  __syncthreads();
  if (threadIdx.x == 0) {
    int sum = 0;
    for (int i = 0; i < static_cast<int>(blockDim.x); ++i) {
      const int v = part[i];
      part[i] = sum;
      sum += v;
    }
  }
  __syncthreads();
  a = part[threadIdx.x];
  for (int b = b0; b < b1; ++b) {
    const int v = block_sums[b];
    block_sums[b] = a;
    a += v;
  }
}

// The range of each (tile, slot): its block's offset plus the populations before it.
__global__ void __launch_bounds__(kThreads) mask_ranges_kernel(
    const unsigned* __restrict__ masks, const int* __restrict__ tile_count, int max_slots,
    const int* __restrict__ block_offsets, int2* __restrict__ ranges) {
  const int64_t n = static_cast<int64_t>(*tile_count) * max_slots;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kScanBlock;
  if (first >= n) return;
  constexpr int kPer = kScanBlock / kThreads;  // consecutive entries per thread
  int counts[kPer];
  int sum = 0;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t entry = first + threadIdx.x * kPer + i;
    counts[i] = entry < n ? mask_count(masks, entry) : 0;
    sum += counts[i];
  }
  __shared__ int warp_sums[kThreads / 32];
  int total;
  int before = block_offsets[blockIdx.x] + block_exclusive_scan(sum, warp_sums, &total);
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t entry = first + threadIdx.x * kPer + i;
    if (entry < n) ranges[entry] = make_int2(before, before + counts[i]);
    before += counts[i];
  }
}

// One block per token: each pair's record (k, gate, saved pre-activation) to its place in its
// (tile, slot) range.
__global__ void __launch_bounds__(kThreads) place_pairs_kernel(
    const int* __restrict__ indices, int64_t index_stride, int top_k, int grid_rows,
    int grid_cols, const uint8_t* __restrict__ assign_row, const int* __restrict__ position,
    const int* __restrict__ tile_start, int max_slots, const unsigned* __restrict__ masks,
    const int2* __restrict__ ranges, const float* __restrict__ gates, int64_t gates_stride,
    const float* __restrict__ preact, int64_t preact_stride, int4* __restrict__ records) {
  const int t = blockIdx.x, groups = grid_rows + grid_cols;
  for (int k = threadIdx.x; k < top_k; k += blockDim.x) {
    const int e = __ldg(indices + static_cast<int64_t>(t) * index_stride + k);
    const bool row = assign_row[static_cast<int64_t>(t) * top_k + k] != 0;
    const PairSlot ps =
        pair_slot(e, row, t, groups, grid_rows, grid_cols, position, tile_start, max_slots);
    const uint4 m = reinterpret_cast<const uint4*>(masks)[ps.entry];
    const unsigned words[4] = {m.x, m.y, m.z, m.w};
    int rank = 0;
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const int lo = w * 32;
      if (ps.bit >= lo + 32) {
        rank += __popc(words[w]);
      } else if (ps.bit > lo) {
        rank += __popc(words[w] & ((1u << (ps.bit - lo)) - 1u));
      }
    }
    const int q = ranges[ps.entry].x + rank;
    const float gate = __ldg(gates + static_cast<int64_t>(t) * gates_stride + k);
    const float z =
        preact != nullptr ? __ldg(preact + static_cast<int64_t>(t) * preact_stride + k) : 0.0f;
    records[q] = make_int4(k, __float_as_int(gate), __float_as_int(z), 0);  // one 16-byte write
  }
}

// Zero masks for every (tile, slot) of this call (the count is on the device).
__global__ void __launch_bounds__(kThreads) zero_masks_kernel(const int* __restrict__ tile_count,
                                                              int max_slots,
                                                              uint4* __restrict__ masks) {
  const int64_t n = static_cast<int64_t>(*tile_count) * max_slots;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    masks[i] = make_uint4(0u, 0u, 0u, 0u);
  }
}

// max |v| over a table [rows, cols] (float bits, as unsigned: ordered for non-negative floats);
// 16-byte loads when rows are aligned and cols a multiple of 8.
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) table_amax_kernel(const T* __restrict__ table,
                                                              int64_t stride, int64_t rows,
                                                              int cols,
                                                              unsigned* __restrict__ amax) {
  float m = 0.0f;
  const int per_row = kVec ? cols / 8 : cols;
  const int64_t n = rows * per_row;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / per_row, c = i - r * per_row;
    if constexpr (kVec) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(table + r * stride) + c);
      const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
      for (int k = 0; k < 8; ++k) m = fmaxf(m, fabsf(load_float(e[k])));
    } else {
      m = fmaxf(m, fabsf(load_float(table[r * stride + c])));
    }
  }
  m = warp_max(m);
  if (threadIdx.x % 32 == 0 && m > 0.0f) atomicMax(amax, __float_as_uint(m));
}

// The power of two that scales a token's partial sums into the fixed-point range: its sum is
// at most K * max|coef| * max|table| in magnitude.
__device__ __forceinline__ int fixed_point_shift(unsigned coef_amax, unsigned table_amax,
                                                 int top_k) {
  const double bound = static_cast<double>(top_k) *
                       static_cast<double>(__uint_as_float(coef_amax)) *
                       static_cast<double>(__uint_as_float(table_amax));
  if (!(bound > 0.0) || !isfinite(bound)) return 0;
  return kFixedPointBits - (ilogb(bound) + 1);
}

// ------------------------------------------------------------------------------------------
// Dot products over tiles of [128 tokens x 64 slots] of a group.
template <typename T>
struct DotParams {
  Groups gr;
  const T* a;  // rows of tokens: x (forward) or dy (backward)
  int64_t a_stride;
  const T* b;  // rows of experts: W (forward) or V (backward)
  int64_t b_stride;
  int hidden;
  int slot_chunks;  // ceil(max(Nr, Nc) / kDotBN)
  Activation act;
  float* preact;  // [T, K]: written in forward
  int64_t preact_stride;
  float* dgates;  // [T, K]: written in backward
  int64_t dgates_stride;
  // Per pair, in pair order:
  float* coef;     // a = g h (forward), da (backward)
  float* coef2;    // g h (backward)
  unsigned* token_amax;  // [T] max |coef| per token (fixed-point scale of the token sums)
};

constexpr int kDotPitch = kDotBN + 4;  // fp32 epilogue tile row
constexpr size_t kDotSmem =
    static_cast<size_t>(kDotStages) * (kDotBM + kDotBN) * kDotBK * 2;  // 2-byte elements
static_assert(static_cast<size_t>(kDotBM) * kDotPitch * 4 <= kDotSmem, "epilogue tile fits");

template <typename T, bool kBackward, bool kVec>
__global__ void __launch_bounds__(kThreads) dot_kernel(DotParams<T> p) {
  extern __shared__ __align__(128) unsigned char smem[];
  T* sa = reinterpret_cast<T*>(smem);
  T* sb = sa + kDotStages * kDotBM * kDotBK;
  float* tile_out = reinterpret_cast<float*>(smem);
  __shared__ int tile_tokens[kDotBM];
  __shared__ unsigned row_amax[kDotBM];
  __shared__ int2 slot_range[kDotBN];
  __shared__ uint4 slot_mask[kDotBN];

  const Groups& gr = p.gr;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wm = warp / 2, wn = warp % 2;  // 4 x 2 warps of 32 x 32
  const int items = __ldg(gr.tile_start + gr.count) * p.slot_chunks;
  const int k_tiles = (p.hidden + kDotBK - 1) / kDotBK;

  for (int item = blockIdx.x; item < items; item += gridDim.x) {
    const int tile = item / p.slot_chunks, chunk = item - tile * p.slot_chunks;
    const int g = gr.group_of_tile(tile);
    const int slots = gr.slots(g), s0 = chunk * kDotBN;
    if (s0 >= slots) continue;  // uniform over the block
    const int base = __ldg(gr.start + g), n = __ldg(gr.start + g + 1) - base;
    const int r0 = (tile - __ldg(gr.tile_start + g)) * kDotBM;
    const int rows = min(kDotBM, n - r0);
    // Row blocks of 16 past the tile's last token are all zero: their products are skipped.
    const int live = min(2, max(0, (rows - wm * 32 + 15) / 16));  // this warp's live blocks
    for (int r = tid; r < kDotBM; r += kThreads) {
      tile_tokens[r] = r < rows ? __ldg(gr.tokens_of + base + r0 + r) : -1;
      row_amax[r] = 0u;
    }
    __syncthreads();

    // Each thread copies 4 chunks of the token tile and 2 of the expert tile per stage.
    const T* a_src[4];
    const T* b_src[2];
    int a_row[4], b_row[2];
    const int ch = tid % 8;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      a_row[i] = tid / 8 + 32 * i;
      const int t = tile_tokens[a_row[i]];
      a_src[i] = t >= 0 ? p.a + static_cast<int64_t>(t) * p.a_stride + ch * 8 : nullptr;
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      b_row[i] = tid / 8 + 32 * i;
      const int s = s0 + b_row[i];
      b_src[i] = s < slots ? p.b + static_cast<int64_t>(gr.expert(g, s)) * p.b_stride + ch * 8
                           : nullptr;
    }
    auto load_stage = [&](int stage, int k0) {
      T* da = sa + stage * kDotBM * kDotBK;
      T* db = sb + stage * kDotBN * kDotBK;
      const int valid = p.hidden - k0 - ch * 8;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        load_chunk<T, kVec>(da + swz<8>(a_row[i], ch * 8), a_src[i] ? a_src[i] + k0 : p.a,
                            a_src[i] ? valid : 0);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        load_chunk<T, kVec>(db + swz<8>(b_row[i], ch * 8), b_src[i] ? b_src[i] + k0 : p.b,
                            b_src[i] ? valid : 0);
      }
    };

    float acc[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int v = 0; v < 4; ++v) acc[i][j][v] = 0.0f;

#pragma unroll
    for (int s = 0; s < kDotStages - 1; ++s) {
      if (s < k_tiles) load_stage(s, s * kDotBK);
      cp_async_commit();
    }
    for (int kt = 0; kt < k_tiles; ++kt) {
      cp_async_wait<kDotStages - 2>();
      __syncthreads();
      const int next = kt + kDotStages - 1;
      if (next < k_tiles) load_stage(next % kDotStages, next * kDotBK);
      cp_async_commit();
      const T* ta = sa + (kt % kDotStages) * kDotBM * kDotBK;
      const T* tb = sb + (kt % kDotStages) * kDotBN * kDotBK;
#pragma unroll
      for (int kk = 0; kk < kDotBK; kk += 16) {
        if (live == 0) break;  // warp-uniform
        uint32_t af[2][4], bf[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          if (mt >= live) continue;
          ldsm_x4(af[mt], ta + swz<8>(wm * 32 + mt * 16 + lane % 16, kk + (lane / 16) * 8));
        }
#pragma unroll
        for (int np = 0; np < 2; ++np) {
          ldsm_x4(bf[np], tb + swz<8>(wn * 32 + np * 16 + lane % 8 + (lane / 16) * 8,
                                      kk + ((lane / 8) % 2) * 8));
        }
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int nt = 0; nt < 4; ++nt)
            if (mt < live) {
              mma_16816<T>(acc[mt][nt], af[mt], bf[nt / 2][(nt % 2) * 2],
                           bf[nt / 2][(nt % 2) * 2 + 1]);
            }
      }
    }
    cp_async_wait<0>();
    __syncthreads();

    // Results to shared memory, then each pair of the tile picks its own.
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          const int r = wm * 32 + mt * 16 + lane / 4 + (v >= 2 ? 8 : 0);
          const int c = wn * 32 + nt * 8 + (lane % 4) * 2 + (v & 1);
          tile_out[r * kDotPitch + c] = acc[mt][nt][v];
        }
    // The tile's pairs, a thread per pair (independent loads, many in flight).
    const int n_slots = min(kDotBN, slots - s0);
    load_slots(gr, tile, s0, n_slots, slots, slot_range, slot_mask);
    {
      const int q_end = slot_range[n_slots - 1].y;
      for (int q = slot_range[0].x + tid; q < q_end; q += kThreads) {
        const int s = slot_of_pair(slot_range, n_slots, q);
        const int r = row_of_pair(slot_mask[s], q - slot_range[s].x);
        const float val = tile_out[r * kDotPitch + s];
        const int4 rec = __ldg(gr.records + q);
        const int64_t t = tile_tokens[r];
        const int k = rec.x;
        const float gate = __int_as_float(rec.y);
        float c;
        if constexpr (!kBackward) {
          p.preact[t * p.preact_stride + k] = val;
          c = gate * activate(p.act, val);
        } else {
          const float z = __int_as_float(rec.z);
          const float h = activate(p.act, z);
          p.dgates[t * p.dgates_stride + k] = h * val;
          c = gate * val * activate_grad(p.act, z);
          p.coef2[q] = gate * h;
        }
        p.coef[q] = c;
        atomicMax(&row_amax[r], __float_as_uint(fabsf(c)));
      }
    }
    __syncthreads();
    for (int r = tid; r < rows; r += kThreads) {
      if (row_amax[r] != 0u) atomicMax(p.token_amax + tile_tokens[r], row_amax[r]);
    }
    __syncthreads();
  }
}

// ------------------------------------------------------------------------------------------
// The coefficient block of slots [w0, w0 + w_slots) of `tile`: block[r * pitch + s] = the
// coefficient of the tile's token r at slot w0 + s, zero where it has no pair. A thread per pair
// (independent loads, many in flight). Block-wide; ends with a barrier.
template <typename T>
__device__ void build_coef_window(const Groups& gr, const float* __restrict__ coef, int tile,
                                  int w0, int w_slots, int slots, int pitch, T* block,
                                  int2* slot_range, uint4* slot_mask) {
  for (int i = threadIdx.x; i < kTokBM * pitch / 8; i += blockDim.x) {  // 16-byte chunks
    reinterpret_cast<uint4*>(block)[i] = make_uint4(0u, 0u, 0u, 0u);
  }
  load_slots(gr, tile, w0, w_slots, slots, slot_range, slot_mask);
  const int q_end = slot_range[w_slots - 1].y;
  for (int q = slot_range[0].x + threadIdx.x; q < q_end; q += blockDim.x) {
    const int s = slot_of_pair(slot_range, w_slots, q);
    block[row_of_pair(slot_mask[s], q - slot_range[s].x) * pitch + s] =
        store_float<T>(__ldg(coef + q));
  }
  __syncthreads();
}

// Every tile's coefficient block built once, for the token sums' passes to copy instead of
// rebuilding it (tiles from `cap` on, past the workspace's budget, are built in place there):
// blocks[tile][r][s] over `window` slots (every group's slots fit one window) and the tile's
// token rows r, rounded up to 16 with zero rows (the expert sums reduce over whole 16-row steps;
// rows past those are never read).
template <typename T>
__global__ void __launch_bounds__(kThreads) build_coef_blocks_kernel(Groups gr,
                                                                     const float* __restrict__ coef,
                                                                     int window, int cap,
                                                                     T* __restrict__ blocks) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int pitch = window + 8;
  T* block = reinterpret_cast<T*>(smem);
  int2* slot_range = reinterpret_cast<int2*>(block + kTokBM * pitch);
  uint4* slot_mask = reinterpret_cast<uint4*>(slot_range + window);
  const int tiles = min(__ldg(gr.tile_start + gr.count), cap);
  const int row_chunks = window / 8;
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int g = gr.group_of_tile(tile);
    const int slots = gr.slots(g);
    const int n = __ldg(gr.start + g + 1) - __ldg(gr.start + g);
    const int rows = min(kTokBM, n - (tile - __ldg(gr.tile_start + g)) * kTokBM);
    const int rows16 = min(kTokBM, (rows + 15) / 16 * 16);
    build_coef_window(gr, coef, tile, 0, slots, slots, pitch, block, slot_range, slot_mask);
    uint4* dst = reinterpret_cast<uint4*>(blocks + static_cast<int64_t>(tile) * kTokBM * window);
    for (int i = threadIdx.x; i < rows16 * row_chunks; i += blockDim.x) {
      const int r = i / row_chunks;
      dst[i] = reinterpret_cast<const uint4*>(block + r * pitch)[i - r * row_chunks];
    }
    __syncthreads();
  }
}

// ------------------------------------------------------------------------------------------
// Token sums: out[t] = sum over the token's groups g of sum over g's slots of coef(t, slot) *
// table[expert(slot)], per tile of 128 tokens, d in blocks of 128 columns. Two levels: each
// (token, group) row of the tile is stored once in fp32 as the token's partial row `rank`
// (its rank among the token's groups), then the finish sums a token's rows in rank order, so the
// result is deterministic without atomics. Ranks from `partial_rows` on (tokens with more groups
// than the workspace holds rows for) are added into [T, d] accumulators instead: 64-bit fixed
// point (exact, so order-independent) or fp32 atomics (exec.deterministic false).
template <typename T>
struct TokenSumParams {
  Groups gr;
  const float* coef;  // [P] schedule order
  const T* table;     // V (forward) or W (backward)
  int64_t table_stride;
  int hidden;
  int window;  // slots of the coefficient block in shared memory (multiple of kTokBK)
  int db_begin, db_end;     // this pass's blocks of kTokBN columns
  const uint8_t* rank_of;   // per group member (as tokens_of): the token's rank of the group
  float* partial;           // [T, partial_rows, partial_pitch]: this pass's columns
  int partial_rows;         // per token (0: accumulators only)
  int64_t partial_pitch;    // floats, a multiple of 4
  const unsigned* token_amax;
  const unsigned* table_amax;
  long long* acc_fixed;  // deterministic
  float* acc_float;      // exec.deterministic == false
  const T* blocks;       // coefficient blocks of tiles [0, blocks_cap) (build_coef_blocks_kernel)
  int blocks_cap;        // 0: every tile builds its block in place
};

// The coefficient block, then the stages of expert rows; an in-place build's slot ranges and
// masks use the stages' space (a build runs only while no stage is in flight).
template <typename T>
size_t token_sum_smem(int window) {
  return static_cast<size_t>(kTokBM) * (window + 8) * sizeof(T) +
         std::max(static_cast<size_t>(kTokStages) * kTokBK * kTokBN * sizeof(T),
                  static_cast<size_t>(window) * (sizeof(int2) + sizeof(uint4)));
}

template <typename T, bool kVec, bool kFixed>
__global__ void __launch_bounds__(kThreads, 2) token_sum_kernel(TokenSumParams<T> p) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int pitch = p.window + 8;
  T* coef_block = reinterpret_cast<T*>(smem);  // [128 tokens][window + 8]
  T* sb = coef_block + kTokBM * pitch;         // stages of [32 slots][128 columns]
  int2* slot_range = reinterpret_cast<int2*>(sb);  // [window], in-place builds only
  uint4* slot_mask = reinterpret_cast<uint4*>(slot_range + p.window);  // [window]
  __shared__ int tile_tokens[kTokBM];
  __shared__ int tile_rank[kTokBM];
  __shared__ double tile_scale[kTokBM];

  const Groups& gr = p.gr;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wm = warp / 2, wn = warp % 2;  // 4 x 2 warps of 32 x 64
  const int tiles = __ldg(gr.tile_start + gr.count);
  unsigned table_amax = 0u;
  if constexpr (kFixed) table_amax = *p.table_amax;

  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int g = gr.group_of_tile(tile);
    const int slots = gr.slots(g);
    const int base = __ldg(gr.start + g), n = __ldg(gr.start + g + 1) - base;
    const int r0 = (tile - __ldg(gr.tile_start + g)) * kTokBM;
    const int rows = min(kTokBM, n - r0);
    // A warp whose 32 rows are all past the tile's last token skips its products (all zero;
    // a finer 16-row skip cost registers: one CTA per SM instead of two).
    const bool live = wm * 32 < rows;
    for (int r = tid; r < kTokBM; r += kThreads) {
      const int t = r < rows ? __ldg(gr.tokens_of + base + r0 + r) : -1;
      tile_tokens[r] = t;
      tile_rank[r] = r < rows ? __ldg(p.rank_of + base + r0 + r) : kRankCap;
      if constexpr (kFixed) {
        tile_scale[r] =
            t >= 0 ? ldexp(1.0, fixed_point_shift(__ldg(p.token_amax + t), table_amax, gr.top_k))
                   : 0.0;
      }
    }
    __syncthreads();
    const int windows = (slots + p.window - 1) / p.window;

    // The tile's coefficient block: copied from the prebuilt ones (one window; its cp.async
    // group completes with the first stage's), else built here for each window.
    auto build_window = [&](int w0) {
      if (tile < p.blocks_cap) {
        const int row_chunks = p.window / 8;
        const T* src = p.blocks + static_cast<int64_t>(tile) * kTokBM * p.window;
        for (int i = tid; i < rows * row_chunks; i += kThreads) {
          const int r = i / row_chunks, c = i - r * row_chunks;
          cp_async_16(coef_block + r * pitch + c * 8, src + static_cast<int64_t>(i) * 8, 16);
        }
        cp_async_commit();
        return;
      }
      build_coef_window(gr, p.coef, tile, w0, min(p.window, slots - w0), slots, pitch,
                        coef_block, slot_range, slot_mask);
    };

    const int ch = tid % 16;  // each thread copies 2 chunks of [32 slots][128 columns]
    for (int db = p.db_begin; db < p.db_end; ++db) {
      const int c0 = db * kTokBN;
      float acc[2][8][4];
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
          for (int v = 0; v < 4; ++v) acc[i][j][v] = 0.0f;

      for (int w = 0; w < windows; ++w) {
        const int w0 = w * p.window;
        if (windows > 1 || db == p.db_begin) build_window(w0);
        const int w_slots = min(p.window, slots - w0);
        const int k_tiles = (w_slots + kTokBK - 1) / kTokBK;
        auto load_stage = [&](int stage, int kt) {
          T* dst = sb + stage * kTokBK * kTokBN;
          const int valid = p.hidden - c0 - ch * 8;
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            const int r = tid / 16 + 16 * i;
            const int s = w0 + kt * kTokBK + r;
            const bool ok = s < w0 + w_slots;
            const T* src = ok ? p.table + static_cast<int64_t>(gr.expert(g, s)) * p.table_stride +
                                    c0 + ch * 8
                              : p.table;
            load_chunk<T, kVec>(dst + swz<16>(r, ch * 8), src, ok ? valid : 0);
          }
        };
#pragma unroll
        for (int s = 0; s < kTokStages - 1; ++s) {
          if (s < k_tiles) load_stage(s, s);
          cp_async_commit();
        }
        for (int kt = 0; kt < k_tiles; ++kt) {
          cp_async_wait<kTokStages - 2>();
          __syncthreads();
          const int next = kt + kTokStages - 1;
          if (next < k_tiles) load_stage(next % kTokStages, next);
          cp_async_commit();
          const T* tb = sb + (kt % kTokStages) * kTokBK * kTokBN;
#pragma unroll
          for (int kk = 0; kk < kTokBK; kk += 16) {
            if (!live) break;  // warp-uniform
            uint32_t af[2][4];
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
              ldsm_x4(af[mt], coef_block + (wm * 32 + mt * 16 + lane % 16) * pitch +
                                  kt * kTokBK + kk + (lane / 16) * 8);
            }
#pragma unroll
            for (int np = 0; np < 4; ++np) {
              uint32_t bf[4];
              ldsm_x4_trans(bf, tb + swz<16>(kk + lane % 8 + ((lane / 8) % 2) * 8,
                                             wn * 64 + np * 16 + (lane / 16) * 8));
#pragma unroll
              for (int mt = 0; mt < 2; ++mt) {
                mma_16816<T>(acc[mt][np * 2], af[mt], bf[0], bf[1]);
                mma_16816<T>(acc[mt][np * 2 + 1], af[mt], bf[2], bf[3]);
              }
            }
          }
        }
        cp_async_wait<0>();
        __syncthreads();
      }

#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int v = 0; v < 4; v += 2) {
            const int r = wm * 32 + mt * 16 + lane / 4 + (v >= 2 ? 8 : 0);
            const int c = c0 + wn * 64 + nt * 8 + (lane % 4) * 2;
            if (r >= rows || c >= p.hidden) continue;
            const float a0 = acc[mt][nt][v], a1 = acc[mt][nt][v + 1];
            const bool pair = c + 1 < p.hidden;
            const int rank = tile_rank[r];
            if (rank < p.partial_rows) {  // c - first column is even, the pitch a multiple of 4
              float* dst = p.partial +
                           (static_cast<int64_t>(tile_tokens[r]) * p.partial_rows + rank) *
                               p.partial_pitch +
                           (c - p.db_begin * kTokBN);
              if (pair) {
                *reinterpret_cast<float2*>(dst) = make_float2(a0, a1);
              } else {
                *dst = a0;
              }
              continue;
            }
            const int64_t o = static_cast<int64_t>(tile_tokens[r]) * p.hidden + c;
            if constexpr (kFixed) {
              const double scale = tile_scale[r];
              auto* dst = reinterpret_cast<unsigned long long*>(p.acc_fixed + o);
              atomicAdd(dst, static_cast<unsigned long long>(__double2ll_rn(a0 * scale)));
              if (pair) {
                atomicAdd(dst + 1, static_cast<unsigned long long>(__double2ll_rn(a1 * scale)));
              }
            } else {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
              if (pair && (o & 1) == 0) {
                atomicAdd(reinterpret_cast<float2*>(p.acc_float + o), make_float2(a0, a1));
                continue;
              }
#endif
              atomicAdd(p.acc_float + o, a0);
              if (pair) atomicAdd(p.acc_float + o + 1, a1);
            }
          }
    }
    __syncthreads();
  }
}

// out[t, c] = (accumulate ? out : 0) + the token's partial rows in rank order + its
// accumulator (when it has more groups than partial rows), for columns [c_begin, c_end).
template <typename T>
struct TokenSumFinishParams {
  const float* partial;
  int partial_rows;
  int64_t partial_pitch;
  const int* member_count;  // [T] groups per token
  const long long* acc_fixed;
  const float* acc_float;
  const unsigned* token_amax;
  const unsigned* table_amax;
  int tokens, hidden, top_k, c_begin, c_end;
  T* out;
  int64_t out_stride;
  bool accumulate;
};

template <typename T, bool kFixed>
__global__ void __launch_bounds__(kThreads) token_sum_finish_kernel(TokenSumFinishParams<T> p) {
  const int width = p.c_end - p.c_begin;
  const int64_t n = static_cast<int64_t>(p.tokens) * width;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / width;
    const int cc = static_cast<int>(i - t * width), c = p.c_begin + cc;
    const int groups = __ldg(p.member_count + t);
    const int rows = min(groups, p.partial_rows);
    const float* part = p.partial + t * p.partial_rows * p.partial_pitch + cc;
    float v = 0.0f;
#pragma unroll 4
    for (int r = 0; r < rows; ++r) v += __ldg(part + r * p.partial_pitch);
    if (groups > p.partial_rows) {
      const int64_t a = t * p.hidden + c;
      if constexpr (kFixed) {
        const int shift = fixed_point_shift(p.token_amax[t], *p.table_amax, p.top_k);
        v += static_cast<float>(ldexp(static_cast<double>(p.acc_fixed[a]), -shift));
      } else {
        v += p.acc_float[a];
      }
    }
    T* o = p.out + t * p.out_stride + c;
    if (p.accumulate) v += load_float(*o);
    *o = store_float<T>(v);
  }
}

// ------------------------------------------------------------------------------------------
// Expert sums (dW = sum da x, dV = sum g h dy): one block per (group, 128 columns of d) holds
// the sums of up to 320 of the group's slots and walks the group's token tiles; per tile, the
// coefficient block [slots x 128 tokens] is scattered into shared memory once and multiplied by
// the tile's rows [128 tokens x 128 columns]. Groups that are grid rows write fp32 partial sums;
// grid columns add them and store the result.
template <typename T>
struct ExpertSumParams {
  Groups gr;
  const float* coef;  // per pair in pair order: da or g h
  const T* rows;      // x or dy
  int64_t rows_stride;
  int hidden;
  int group_begin;  // the pass: grid rows [0, Nr) or grid columns [Nr, Nr + Nc)
  int slot_chunks;
  int d_blocks;
  float* partial;  // [N, d]
  T* out;          // [N, d] (column pass): grads.up or grads.down
  int64_t out_stride;
  const T* blocks;  // coefficient blocks of tiles [0, blocks_cap), [tile][128][window]
  int blocks_cap;
  int window;
};

constexpr int kExpThreads = 512;
constexpr int kExpSlots = 320;                 // 16 warps: 4 (80 slots) x 4 (32 columns)
constexpr int kExpPitch = kTileTokens + 8;     // padded row of the coefficient block
constexpr size_t kExpCoefBytes = static_cast<size_t>(kExpSlots) * kExpPitch * 2;
// A prebuilt block is copied token-major, [128 tokens][320 slots + 8], into the same space.
constexpr int kExpPrePitch = kExpSlots + 8;
static_assert(static_cast<size_t>(kTileTokens) * kExpPrePitch * 2 <= kExpCoefBytes,
              "a prebuilt block fits the coefficient block's space");
constexpr size_t kExpStageBytes = static_cast<size_t>(kTileTokens) * kExpBN * 2;
constexpr size_t kExpSmem =
    kExpCoefBytes + 2 * kExpStageBytes + kExpSlots * (sizeof(int2) + sizeof(uint4));

template <typename T, bool kVec, bool kColumnPass>
__global__ void __launch_bounds__(kExpThreads, 1) expert_sum_kernel(ExpertSumParams<T> p) {
  extern __shared__ __align__(128) unsigned char smem[];
  T* coef_block = reinterpret_cast<T*>(smem);                      // [320 slots][128 + 8]
  T* sb = reinterpret_cast<T*>(smem + kExpCoefBytes);               // 2 x [128 tokens][128]
  int2* slot_range = reinterpret_cast<int2*>(smem + kExpCoefBytes + 2 * kExpStageBytes);
  uint4* slot_mask = reinterpret_cast<uint4*>(slot_range + kExpSlots);

  const Groups& gr = p.gr;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wm = warp / 4, wn = warp % 4;  // 4 x 4 warps of 80 x 32
  int item = blockIdx.x;
  const int db = item % p.d_blocks;
  item /= p.d_blocks;
  const int sc = item % p.slot_chunks;
  const int g = p.group_begin + item / p.slot_chunks;
  const int slots = gr.slots(g), s0 = sc * kExpSlots;
  if (s0 >= slots) return;
  const int n_slots = min(kExpSlots, slots - s0);
  const int zero_words = ((n_slots + 15) / 16 * 16) * kExpPitch / 2;
  const int base = __ldg(gr.start + g), n = __ldg(gr.start + g + 1) - base;
  const int tile0 = __ldg(gr.tile_start + g), tiles = __ldg(gr.tile_start + g + 1) - tile0;
  const int c0 = db * kExpBN;
  const int ch = tid % 16;

  auto load_stage = [&](int buf, int kt) {
    T* dst = sb + buf * (kTileTokens * kExpBN);
    const int valid = p.hidden - c0 - ch * 8;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = tid / 16 + 32 * i;
      const int idx = kt * kTileTokens + r;
      const bool ok = idx < n;
      const T* src = p.rows;
      if (ok) {
        src = p.rows + static_cast<int64_t>(__ldg(gr.tokens_of + base + idx)) * p.rows_stride +
              c0 + ch * 8;
      }
      load_chunk<T, kVec>(dst + swz<16>(r, ch * 8), src, ok ? valid : 0);
    }
  };

  float acc[5][4][4];
#pragma unroll
  for (int i = 0; i < 5; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int v = 0; v < 4; ++v) acc[i][j][v] = 0.0f;

  if (tiles > 0) load_stage(0, 0);
  cp_async_commit();
  const int slot_chunks16 = (n_slots + 15) / 16 * 2;  // 16-byte chunks of a prebuilt row
  for (int kt = 0; kt < tiles; ++kt) {
    const int buf = kt % 2;
    const int tile_rows = min(kTileTokens, n - kt * kTileTokens);  // past them: zeros
    // The tile's block: copied token-major from the prebuilt ones (its group completes with
    // this tile's stage), else scattered here slot-major.
    const bool prebuilt = tile0 + kt < p.blocks_cap;  // uniform over the block
    if (prebuilt) {
      const int rows16 = min(kTileTokens, (tile_rows + 15) / 16 * 16);
      const T* src = p.blocks + static_cast<int64_t>(tile0 + kt) * kTileTokens * p.window + s0;
      for (int i = tid; i < rows16 * slot_chunks16; i += kExpThreads) {
        const int r = i / slot_chunks16, c = i - r * slot_chunks16;
        cp_async_16(coef_block + r * kExpPrePitch + c * 8,
                    src + static_cast<int64_t>(r) * p.window + c * 8, 16);
      }
      cp_async_commit();
    }
    if (kt + 1 < tiles) load_stage(buf ^ 1, kt + 1);
    cp_async_commit();
    if (!prebuilt) {
      for (int i = tid; i < zero_words; i += kExpThreads) {
        reinterpret_cast<uint32_t*>(coef_block)[i] = 0u;
      }
      load_slots(gr, tile0 + kt, s0, n_slots, slots, slot_range, slot_mask);
      const int q_end = slot_range[n_slots - 1].y;
      for (int q = slot_range[0].x + tid; q < q_end; q += kExpThreads) {  // a thread per pair
        const int s = slot_of_pair(slot_range, n_slots, q);
        coef_block[s * kExpPitch + row_of_pair(slot_mask[s], q - slot_range[s].x)] =
            store_float<T>(__ldg(p.coef + q));
      }
    }
    cp_async_wait<1>();
    __syncthreads();
    const T* tb = sb + buf * (kTileTokens * kExpBN);
#pragma unroll 2
    for (int kk = 0; kk < kTileTokens; kk += 16) {
      if (kk >= tile_rows) break;  // uniform over the block
      uint32_t bf[2][4];
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        ldsm_x4_trans(bf[np], tb + swz<16>(kk + lane % 8 + ((lane / 8) % 2) * 8,
                                           wn * 32 + np * 16 + (lane / 16) * 8));
      }
#pragma unroll
      for (int mt = 0; mt < 5; ++mt) {
        if (wm * 80 + mt * 16 >= n_slots) break;  // uniform over the warp
        uint32_t af[4];
        if (prebuilt) {  // [tokens][slots]: the transposed load gives the slot-major fragment
          ldsm_x4_trans(af, coef_block + (kk + lane % 8 + (lane / 16) * 8) * kExpPrePitch +
                                wm * 80 + mt * 16 + ((lane / 8) % 2) * 8);
        } else {
          ldsm_x4(af, coef_block + (wm * 80 + mt * 16 + lane % 16) * kExpPitch + kk +
                          (lane / 16) * 8);
        }
#pragma unroll
        for (int np = 0; np < 2; ++np) {
          mma_16816<T>(acc[mt][np * 2], af, bf[np][0], bf[np][1]);
          mma_16816<T>(acc[mt][np * 2 + 1], af, bf[np][2], bf[np][3]);
        }
      }
    }
    __syncthreads();
  }
  cp_async_wait<0>();

  const int d = p.hidden;
#pragma unroll
  for (int mt = 0; mt < 5; ++mt)
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int v = 0; v < 4; v += 2) {
        const int s = s0 + wm * 80 + mt * 16 + lane / 4 + (v >= 2 ? 8 : 0);
        const int c = c0 + wn * 32 + nt * 8 + (lane % 4) * 2;
        if (s >= slots) continue;
        const int64_t e = gr.expert(g, s);
        float* part = p.partial + e * d + c;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          if (c + h >= d) continue;
          if constexpr (kColumnPass) {
            p.out[e * p.out_stride + c + h] = store_float<T>(part[h] + acc[mt][nt][v + h]);
          } else {
            part[h] = acc[mt][nt][v + h];
          }
        }
      }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) zero_rows_kernel(T* __restrict__ out, int64_t stride,
                                                             int64_t rows, int cols) {
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i - r * cols;
    out[r * stride + c] = store_float<T>(0.0f);
  }
}

// ------------------------------------------------------------------------------------------
// Host side.

// The token sums' partial rows: `rows` per token (a token's groups of lower rank; the rest go to
// the accumulators), over the columns in `passes` passes of `blocks` blocks of kTokBN. A
// router-made routing gives each token about sqrt(K) groups (at K = 512 median 21, 99th
// percentile 28, max 33; 67.6 on average at K = 4096: its experts are a staircase, covered by at
// most 2 sqrt(K) lines), so 1.25 sqrt(K) + 1 rows hold nearly all of them. The buffer is kept
// near kPartialBudget by the column passes; each pass rebuilds the tiles' coefficient blocks
// (~0.2 ms per pass at paper-k512-t16k, H100: 3 passes there, 0.76 GB; one pass, 2.0 GB, ran
// its forward in 4.93 ms against 5.37); where one block of columns does not fit (T above ~52k
// at K = 512), the accumulators take every group. OMNIMOE_TILED_PASS_COLUMNS (a multiple of
// kTokBN, or 0 for the accumulators alone) overrides the columns per pass.
constexpr int64_t kPartialBudget = int64_t{768} << 20;

struct PartialPlan {
  int rows = 0;        // 0: no partial rows
  int blocks = 1;      // per pass
  int passes = 1;
  int64_t pitch = 0;   // floats per row, a multiple of 4
};

PartialPlan partial_plan(const LayerConfig& cfg, int64_t tokens) {
  const int64_t d = cfg.hidden, d_blocks = (d + kTokBN - 1) / kTokBN;
  const int64_t G = cfg.grid_rows + cfg.grid_cols;
  PartialPlan plan;
  const int64_t want = static_cast<int64_t>(std::ceil(1.25 * std::sqrt(double(cfg.top_k)))) + 1;
  const int64_t rows = std::min({want, cfg.top_k, G, int64_t{kRankCap}});
  const int64_t block_bytes = tokens * rows * kTokBN * int64_t{sizeof(float)};
  int64_t blocks = block_bytes > 0 ? kPartialBudget / block_bytes : d_blocks;
  if (const int64_t columns = detail::env_count("OMNIMOE_TILED_PASS_COLUMNS", kTokBN);
      columns >= 0) {
    blocks = columns / kTokBN;
  }
  if (blocks <= 0 || rows <= 0 || d_blocks == 0) {  // the accumulators alone, in one pass
    plan.blocks = static_cast<int>(d_blocks);
    return plan;
  }
  plan.rows = static_cast<int>(rows);
  plan.passes = static_cast<int>((d_blocks + blocks - 1) / blocks);
  plan.blocks = static_cast<int>((d_blocks + plan.passes - 1) / plan.passes);
  plan.pitch = (std::min<int64_t>(d, int64_t{plan.blocks} * kTokBN) + 3) / 4 * 4;
  return plan;
}

// Slots of the token sums' coefficient block in shared memory (a multiple of kTokBK).
int token_sum_window(const LayerConfig& cfg) {
  const int64_t s = std::max(cfg.grid_rows, cfg.grid_cols);
  return static_cast<int>(std::min<int64_t>((s + kTokBK - 1) / kTokBK * kTokBK, kTokMaxWindow));
}

// The workspace, carved in 256-byte aligned pieces.
struct Workspace {
  uint8_t* assign_row = nullptr;  // [P]
  uint8_t* member = nullptr;      // [G, T] 1 + rank, 0 when not a member
  int* member_count = nullptr;    // [T] groups per token
  int* chunk_count = nullptr;     // [G, list chunks] tokens of each group per chunk
  int* count = nullptr;           // [G]
  int* start = nullptr;           // [G + 1]
  int* tile_start = nullptr;      // [G + 1]
  int* tokens_of = nullptr;       // [min(T G, P)]
  uint8_t* rank_of = nullptr;     // [min(T G, P)] as tokens_of: the token's rank of the group
  int* position = nullptr;        // [G, T]
  uint4* masks = nullptr;         // [tile bound, max slots] tokens of each (tile, slot)
  int* block_sums = nullptr;      // [mask entries / kScanBlock]
  int2* ranges = nullptr;         // [tile bound, max slots]
  int4* records = nullptr;        // [P] in pair order: k, gate, saved pre-activation
  float* coef = nullptr;          // [P]
  float* coef2 = nullptr;         // [P] (backward)
  unsigned* token_amax = nullptr; // [T]
  unsigned* table_amax = nullptr; // [1]
  long long* acc = nullptr;       // [T, d] (fixed point, or fp32 in its first half)
  float* token_partial = nullptr; // [T, plan.rows, plan.pitch]
  PartialPlan plan;               // the token sums' partial rows and column passes
  uint16_t* coef_blocks = nullptr; // [blocks_cap, 128, window] bf16 / f16 blocks of coef, then
                                   // of coef2 (the backward's dV)
  int blocks_cap = 0;             // tiles whose blocks are built once (0: none)
  float* partial = nullptr;       // [N, d] (backward)
  size_t bytes = 0;
};

// Upper bound on the number of tiles (the exact count lives on the device).
int64_t tile_bound(const LayerConfig& cfg, int64_t tokens) {
  const int64_t G = cfg.grid_rows + cfg.grid_cols;
  return std::min(tokens * G, tokens * cfg.top_k) / kTileTokens + G;
}

// The tiles whose coefficient blocks are built once per op (build_coef_blocks_kernel) instead of
// once per token-sum pass: as many as kCoefBlockBudget holds, when every group's slots fit one
// window (else none). OMNIMOE_TILED_COEF_BLOCKS (a tile count; 0: none) overrides.
constexpr int64_t kCoefBlockBudget = int64_t{384} << 20;

int coef_block_cap(const LayerConfig& cfg, int64_t tokens) {
  if (std::max(cfg.grid_rows, cfg.grid_cols) > kTokMaxWindow) return 0;
  const int64_t per_tile = int64_t{kTokBM} * token_sum_window(cfg) * 2;
  int64_t cap = kCoefBlockBudget / per_tile;
  if (const int64_t tiles = detail::env_count("OMNIMOE_TILED_COEF_BLOCKS"); tiles >= 0) {
    cap = tiles;
  }
  return static_cast<int>(std::min(cap, tile_bound(cfg, tokens)));
}

Workspace carve(const LayerConfig& cfg, int64_t tokens, bool backward, void* base) {
  Workspace w;
  const int64_t T = tokens, K = cfg.top_k, G = cfg.grid_rows + cfg.grid_cols;
  const int64_t P = T * K, N = cfg.num_experts(), d = cfg.hidden;
  size_t off = 0;
  auto take = [&](auto*& ptr, int64_t count) {
    using Elem = std::remove_pointer_t<std::remove_reference_t<decltype(ptr)>>;
    ptr = base ? reinterpret_cast<Elem*>(static_cast<char*>(base) + off) : nullptr;
    off += (static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(Elem) + 255) / 256 * 256;
  };
  take(w.assign_row, P);
  take(w.member, G * T);
  take(w.member_count, T);
  take(w.chunk_count, G * list_chunks(T));
  take(w.count, G);
  take(w.start, G + 1);
  take(w.tile_start, G + 1);
  take(w.tokens_of, std::min(T * G, P));
  take(w.rank_of, std::min(T * G, P));
  take(w.position, G * T);
  const int64_t entries = tile_bound(cfg, tokens) * std::max(cfg.grid_rows, cfg.grid_cols);
  take(w.masks, entries);
  take(w.block_sums, (entries + kScanBlock - 1) / kScanBlock);
  take(w.ranges, entries);
  take(w.records, P);
  take(w.coef, P);
  if (backward) take(w.coef2, P);
  take(w.token_amax, T);
  take(w.table_amax, 1);
  take(w.acc, T * d);
  w.plan = partial_plan(cfg, tokens);
  take(w.token_partial, T * w.plan.rows * w.plan.pitch);
  w.blocks_cap = coef_block_cap(cfg, tokens);
  take(w.coef_blocks, int64_t{w.blocks_cap} * kTokBM * token_sum_window(cfg));
  if (backward) take(w.partial, N * d);
  w.bytes = off;
  return w;
}

// OMNIMOE_TILED_TIMING=1 (benchmarks only): events between the stages of a call, printed to
// stderr after a synchronisation at its end. Off by default: the ops never wait on the host.
class StageTimer {
 public:
  StageTimer(const char* op, cudaStream_t stream) : op_(op), stream_(stream) {
    on_ = detail::env_equals("OMNIMOE_TILED_TIMING", "1");
    mark("start");
  }
  void mark(const char* name) {
    if (!on_ || count_ == kMax) return;
    OMNIMOE_CUDA_CHECK(cudaEventCreate(&events_[count_]));
    OMNIMOE_CUDA_CHECK(cudaEventRecord(events_[count_], stream_));
    names_[count_++] = name;
  }
  ~StageTimer() {
    if (!on_) return;
    cudaEventSynchronize(events_[count_ - 1]);
    std::fprintf(stderr, "[experts_tiled %s]", op_);
    for (int i = 1; i < count_; ++i) {
      float ms = 0.0f;
      cudaEventElapsedTime(&ms, events_[i - 1], events_[i]);
      std::fprintf(stderr, " %s %.4f", names_[i], ms);
    }
    std::fprintf(stderr, " ms\n");
    for (int i = 0; i < count_; ++i) cudaEventDestroy(events_[i]);
  }

 private:
  static constexpr int kMax = 24;
  const char* op_;
  cudaStream_t stream_;
  bool on_ = false;
  int count_ = 0;
  cudaEvent_t events_[kMax];
  const char* names_[kMax];
};

int multiprocessors() {
  int device = 0, sms = 0;
  OMNIMOE_CUDA_CHECK(cudaGetDevice(&device));
  OMNIMOE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

template <typename Kernel>
int persistent_grid(Kernel kernel, size_t smem, int64_t work_bound) {
  if (smem > 48 * 1024) {
    OMNIMOE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(smem)));
  }
  int per_sm = 0;
  OMNIMOE_CUDA_CHECK(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
  const int64_t grid = static_cast<int64_t>(std::max(per_sm, 1)) * multiprocessors();
  return static_cast<int>(std::max<int64_t>(1, std::min(grid, work_bound)));
}

int elementwise_grid(int64_t n) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads,
                                                                 int64_t{multiprocessors()} * 16)));
}

bool rows_aligned(const TensorView& v) {
  return reinterpret_cast<uintptr_t>(v.data) % 16 == 0 &&
         (v.strides[0] * static_cast<int64_t>(dtype_size(v.dtype))) % 16 == 0;
}

// Builds the groups of this call's pairs into `w`, with each pair's gate and (when `preact` is
// given) pre-activation in group order.
Groups build_groups(const LayerConfig& cfg, int64_t tokens, const TensorView& indices,
                    const TensorView& gates, const TensorView* preact,
                    const Workspace& w, StageTimer& timer, cudaStream_t stream) {
  const int T = static_cast<int>(tokens), K = static_cast<int>(cfg.top_k);
  const int Nr = static_cast<int>(cfg.grid_rows), Nc = static_cast<int>(cfg.grid_cols);
  const int G = Nr + Nc;
  const size_t assign_smem = static_cast<size_t>(G) * (sizeof(int) + 1);
  if (assign_smem > 48 * 1024) {
    OMNIMOE_CUDA_CHECK(cudaFuncSetAttribute(assign_pairs_kernel,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(assign_smem)));
  }
  assign_pairs_kernel<<<T, kThreads, assign_smem, stream>>>(
      static_cast<const int*>(indices.data), indices.strides[0], T, K, Nr, Nc, w.assign_row,
      w.member, w.member_count);
  OMNIMOE_CUDA_CHECK_LAUNCH("assign_pairs_kernel");
  const int chunks = list_chunks(T);
  const dim3 list_grid(static_cast<unsigned>(chunks), static_cast<unsigned>(G));
  count_group_tokens_kernel<<<list_grid, kThreads, 0, stream>>>(w.member, T, w.chunk_count);
  OMNIMOE_CUDA_CHECK_LAUNCH("count_group_tokens_kernel");
  scan_groups_kernel<<<1, 1024, 0, stream>>>(w.chunk_count, chunks, G, w.count, w.start,
                                             w.tile_start);
  OMNIMOE_CUDA_CHECK_LAUNCH("scan_groups_kernel");
  fill_groups_kernel<<<list_grid, kThreads, 0, stream>>>(w.member, T, w.chunk_count, w.start,
                                                         w.tokens_of, w.rank_of, w.position);
  OMNIMOE_CUDA_CHECK_LAUNCH("fill_groups_kernel");
  const int max_slots = std::max(Nr, Nc);
  const int64_t entries = tile_bound(cfg, tokens) * max_slots;
  const int* tile_count = w.tile_start + G;
  zero_masks_kernel<<<elementwise_grid(entries), kThreads, 0, stream>>>(tile_count, max_slots,
                                                                         w.masks);
  OMNIMOE_CUDA_CHECK_LAUNCH("zero_masks_kernel");
  timer.mark("lists");
  const int* idx = static_cast<const int*>(indices.data);
  unsigned* masks = reinterpret_cast<unsigned*>(w.masks);
  mark_pairs_kernel<<<T, kThreads, 0, stream>>>(idx, indices.strides[0], K, Nr, Nc, w.assign_row,
                                                w.position, w.tile_start, max_slots, masks);
  OMNIMOE_CUDA_CHECK_LAUNCH("mark_pairs_kernel");
  const unsigned scan_blocks = static_cast<unsigned>((entries + kScanBlock - 1) / kScanBlock);
  mask_block_sums_kernel<<<scan_blocks, kThreads, 0, stream>>>(masks, tile_count, max_slots,
                                                                w.block_sums);
  OMNIMOE_CUDA_CHECK_LAUNCH("mask_block_sums_kernel");
  scan_block_sums_kernel<<<1, 1024, 0, stream>>>(tile_count, max_slots, w.block_sums);
  OMNIMOE_CUDA_CHECK_LAUNCH("scan_block_sums_kernel");
  mask_ranges_kernel<<<scan_blocks, kThreads, 0, stream>>>(masks, tile_count, max_slots,
                                                            w.block_sums, w.ranges);
  OMNIMOE_CUDA_CHECK_LAUNCH("mask_ranges_kernel");
  timer.mark("ranges");
  place_pairs_kernel<<<T, kThreads, 0, stream>>>(
      idx, indices.strides[0], K, Nr, Nc, w.assign_row, w.position, w.tile_start, max_slots,
      masks, w.ranges, static_cast<const float*>(gates.data), gates.strides[0],
      preact ? static_cast<const float*>(preact->data) : nullptr, preact ? preact->strides[0] : 0,
      w.records);
  OMNIMOE_CUDA_CHECK_LAUNCH("place_pairs_kernel");
  timer.mark("place");

  Groups gr;
  gr.tokens = T;
  gr.top_k = K;
  gr.grid_rows = Nr;
  gr.grid_cols = Nc;
  gr.count = G;
  gr.max_slots = max_slots;
  gr.start = w.start;
  gr.tokens_of = w.tokens_of;
  gr.tile_start = w.tile_start;
  gr.masks = w.masks;
  gr.records = w.records;
  gr.ranges = w.ranges;
  return gr;
}

template <typename T>
void launch_dot(const DotParams<T>& p, bool backward, bool vec, int64_t bound,
                cudaStream_t stream) {
  auto go = [&](auto kernel) {
    const int grid = persistent_grid(kernel, kDotSmem, bound * p.slot_chunks);
    kernel<<<grid, kThreads, kDotSmem, stream>>>(p);
    OMNIMOE_CUDA_CHECK_LAUNCH("experts_tiled dot_kernel");
  };
  if (backward) {
    vec ? go(dot_kernel<T, true, true>) : go(dot_kernel<T, true, false>);
  } else {
    vec ? go(dot_kernel<T, false, true>) : go(dot_kernel<T, false, false>);
  }
}

template <typename T>
DotParams<T> dot_params(const LayerConfig& cfg, const Groups& gr, const TensorView& rows,
                        const TensorView& table, const Workspace& w) {
  DotParams<T> dp{};
  dp.gr = gr;
  dp.a = static_cast<const T*>(rows.data);
  dp.a_stride = rows.strides[0];
  dp.b = static_cast<const T*>(table.data);
  dp.b_stride = table.strides[0];
  dp.hidden = static_cast<int>(cfg.hidden);
  dp.slot_chunks =
      static_cast<int>((std::max(cfg.grid_rows, cfg.grid_cols) + kDotBN - 1) / kDotBN);
  dp.act = cfg.act;
  dp.coef = w.coef;
  dp.coef2 = w.coef2;
  dp.token_amax = w.token_amax;
  return dp;
}

// The coefficient blocks of tiles [0, cap) from `coef` (build_coef_blocks_kernel).
template <typename T>
void launch_build_coef_blocks(const Groups& gr, const float* coef, int window, int cap,
                              uint16_t* blocks, int64_t bound, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(kTokBM) * (window + 8) * sizeof(T) +
                      static_cast<size_t>(window) * (sizeof(int2) + sizeof(uint4));
  auto kernel = build_coef_blocks_kernel<T>;
  const int grid = persistent_grid(kernel, smem, std::min<int64_t>(bound, cap));
  kernel<<<grid, kThreads, smem, stream>>>(gr, coef, window, cap, reinterpret_cast<T*>(blocks));
  OMNIMOE_CUDA_CHECK_LAUNCH("experts_tiled build_coef_blocks_kernel");
}

// The token sums of `coef` over the rows of `table`, into out (overwritten or added to), in the
// plan's column passes.
template <typename T>
void token_sums(const LayerConfig& cfg, const Groups& gr, const Workspace& w,
                const TensorView& table, const TensorView& out, bool accumulate, bool fixed,
                int64_t bound, StageTimer& timer, cudaStream_t stream) {
  const PartialPlan& plan = w.plan;
  const int hidden = static_cast<int>(cfg.hidden);
  TokenSumParams<T> tp{};
  tp.gr = gr;
  tp.coef = w.coef;
  tp.table = static_cast<const T*>(table.data);
  tp.table_stride = table.strides[0];
  tp.hidden = hidden;
  tp.window = token_sum_window(cfg);
  tp.rank_of = w.rank_of;
  tp.partial = w.token_partial;
  tp.partial_rows = plan.rows;
  tp.partial_pitch = plan.pitch;
  tp.token_amax = w.token_amax;
  tp.table_amax = w.table_amax;
  tp.acc_fixed = w.acc;
  tp.acc_float = reinterpret_cast<float*>(w.acc);
  tp.blocks = reinterpret_cast<const T*>(w.coef_blocks);
  tp.blocks_cap = w.blocks_cap;
  TokenSumFinishParams<T> fp{};
  fp.partial = w.token_partial;
  fp.partial_rows = plan.rows;
  fp.partial_pitch = plan.pitch;
  fp.member_count = w.member_count;
  fp.acc_fixed = w.acc;
  fp.acc_float = reinterpret_cast<const float*>(w.acc);
  fp.token_amax = w.token_amax;
  fp.table_amax = w.table_amax;
  fp.tokens = gr.tokens;
  fp.hidden = hidden;
  fp.top_k = gr.top_k;
  fp.out = static_cast<T*>(out.data);
  fp.out_stride = out.strides[0];
  fp.accumulate = accumulate;
  const size_t smem = token_sum_smem<T>(tp.window);
  const bool vec = rows_aligned(table);
  auto sum = [&](auto kernel) {
    const int grid = persistent_grid(kernel, smem, bound);
    kernel<<<grid, kThreads, smem, stream>>>(tp);
    OMNIMOE_CUDA_CHECK_LAUNCH("experts_tiled token_sum_kernel");
  };
  auto finish = [&](auto kernel) {
    const int64_t n = static_cast<int64_t>(gr.tokens) * (fp.c_end - fp.c_begin);
    kernel<<<elementwise_grid(n), kThreads, 0, stream>>>(fp);
    OMNIMOE_CUDA_CHECK_LAUNCH("experts_tiled token_sum_finish_kernel");
  };
  const int d_blocks = (hidden + kTokBN - 1) / kTokBN;
  if (w.blocks_cap > 0) {
    launch_build_coef_blocks<T>(gr, w.coef, tp.window, w.blocks_cap, w.coef_blocks, bound, stream);
    timer.mark("blocks");
  }
  for (int pass = 0; pass < plan.passes; ++pass) {
    tp.db_begin = pass * plan.blocks;
    tp.db_end = std::min(d_blocks, tp.db_begin + plan.blocks);
    if (fixed) {
      vec ? sum(token_sum_kernel<T, true, true>) : sum(token_sum_kernel<T, false, true>);
    } else {
      vec ? sum(token_sum_kernel<T, true, false>) : sum(token_sum_kernel<T, false, false>);
    }
    timer.mark("token_sum");
    fp.c_begin = tp.db_begin * kTokBN;
    fp.c_end = std::min(hidden, tp.db_end * kTokBN);
    fixed ? finish(token_sum_finish_kernel<T, true>) : finish(token_sum_finish_kernel<T, false>);
    timer.mark("finish");
  }
}

// An expert sum (dW or dV): grid rows into the partial sums, then grid columns into `out`.
template <typename T>
void expert_sum(const LayerConfig& cfg, const Groups& gr, const Workspace& w, const float* coef,
                const uint16_t* blocks, const TensorView& rows, const TensorView& out,
                cudaStream_t stream) {
  const int64_t d = cfg.hidden;
  ExpertSumParams<T> p{};
  p.gr = gr;
  p.coef = coef;
  p.rows = static_cast<const T*>(rows.data);
  p.rows_stride = rows.strides[0];
  p.hidden = static_cast<int>(d);
  p.slot_chunks =
      static_cast<int>((std::max(cfg.grid_rows, cfg.grid_cols) + kExpSlots - 1) / kExpSlots);
  p.d_blocks = static_cast<int>((d + kExpBN - 1) / kExpBN);
  p.partial = w.partial;
  p.out = static_cast<T*>(out.data);
  p.out_stride = out.strides[0];
  p.blocks = reinterpret_cast<const T*>(blocks);
  p.blocks_cap = w.blocks_cap;
  p.window = token_sum_window(cfg);
  const bool vec = rows_aligned(rows);
  const int64_t per_group = static_cast<int64_t>(p.slot_chunks) * p.d_blocks;
  auto go = [&](auto kernel, int64_t items) {
    OMNIMOE_CUDA_CHECK(cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kExpSmem)));
    kernel<<<static_cast<unsigned>(items), kExpThreads, kExpSmem, stream>>>(p);
    OMNIMOE_CUDA_CHECK_LAUNCH("experts_tiled expert_sum_kernel");
  };
  p.group_begin = 0;
  vec ? go(expert_sum_kernel<T, true, false>, cfg.grid_rows * per_group)
      : go(expert_sum_kernel<T, false, false>, cfg.grid_rows * per_group);
  p.group_begin = static_cast<int>(cfg.grid_rows);
  vec ? go(expert_sum_kernel<T, true, true>, cfg.grid_cols * per_group)
      : go(expert_sum_kernel<T, false, true>, cfg.grid_cols * per_group);
}

template <typename T>
void launch_table_amax(const TensorView& table, unsigned* amax, cudaStream_t stream) {
  const bool vec = rows_aligned(table) && table.shape[1] % 8 == 0;
  const int64_t n = table.shape[0] * table.shape[1] / (vec ? 8 : 1);
  auto kernel = vec ? table_amax_kernel<T, true> : table_amax_kernel<T, false>;
  kernel<<<elementwise_grid(n), kThreads, 0, stream>>>(static_cast<const T*>(table.data),
                                                       table.strides[0], table.shape[0],
                                                       static_cast<int>(table.shape[1]), amax);
  OMNIMOE_CUDA_CHECK_LAUNCH("experts_tiled table_amax_kernel");
}

template <typename T>
void forward_impl(const LayerConfig& cfg, const TensorView& x, const ExpertWeights& weights,
                  const TensorView& indices, const TensorView& gates, const TensorView& y,
                  bool accumulate, const TensorView& preact, Buffer workspace,
                  const Exec& exec) {
  cudaStream_t stream = stream_of(exec);
  const int64_t tokens = x.shape[0];
  const Workspace w = carve(cfg, tokens, false, workspace.data);
  const bool fixed = exec.deterministic;
  StageTimer timer("forward", stream);

  OMNIMOE_CUDA_CHECK(cudaMemsetAsync(w.token_amax, 0, sizeof(unsigned) * tokens, stream));
  OMNIMOE_CUDA_CHECK(cudaMemsetAsync(w.table_amax, 0, sizeof(unsigned), stream));
  OMNIMOE_CUDA_CHECK(cudaMemsetAsync(w.acc, 0, sizeof(long long) * tokens * cfg.hidden, stream));
  const Groups gr = build_groups(cfg, tokens, indices, gates, nullptr, w, timer, stream);
  if (fixed) launch_table_amax<T>(weights.down, w.table_amax, stream);
  timer.mark("amax");
  const int64_t bound = tile_bound(cfg, tokens);

  // preact = x . W and a = g act(preact) per pair.
  DotParams<T> dp = dot_params<T>(cfg, gr, x, weights.up, w);
  dp.preact = static_cast<float*>(preact.data);
  dp.preact_stride = preact.strides[0];
  launch_dot<T>(dp, false, rows_aligned(x) && rows_aligned(weights.up), bound, stream);
  timer.mark("dot");
  // y (+)= sum a V.
  token_sums<T>(cfg, gr, w, weights.down, y, accumulate, fixed, bound, timer, stream);
}

template <typename T>
void backward_impl(const LayerConfig& cfg, const TensorView& x, const ExpertWeights& weights,
                   const TensorView& indices, const TensorView& gates, const TensorView& preact,
                   const Schedule& schedule, const TensorView& dy, const TensorView& dx,
                   bool accumulate_dx, const ExpertWeights& grads, const TensorView& dgates,
                   Buffer workspace, const Exec& exec) {
  cudaStream_t stream = stream_of(exec);
  const int64_t tokens = x.shape[0];
  const int64_t N = cfg.num_experts();
  const int d = static_cast<int>(cfg.hidden);
  if (tokens == 0) {  // no pairs: the weight gradients are zero
    for (const TensorView* g : {&grads.up, &grads.down}) {
      zero_rows_kernel<T><<<elementwise_grid(N * d), kThreads, 0, stream>>>(
          static_cast<T*>(g->data), g->strides[0], N, d);
      OMNIMOE_CUDA_CHECK_LAUNCH("experts_tiled zero_rows_kernel");
    }
    return;
  }
  const Workspace w = carve(cfg, tokens, true, workspace.data);
  const bool fixed = exec.deterministic;
  StageTimer timer("backward", stream);

  OMNIMOE_CUDA_CHECK(cudaMemsetAsync(w.token_amax, 0, sizeof(unsigned) * tokens, stream));
  OMNIMOE_CUDA_CHECK(cudaMemsetAsync(w.table_amax, 0, sizeof(unsigned), stream));
  OMNIMOE_CUDA_CHECK(cudaMemsetAsync(w.acc, 0, sizeof(long long) * tokens * d, stream));
  const Groups gr = build_groups(cfg, tokens, indices, gates, &preact, w, timer, stream);
  if (fixed) launch_table_amax<T>(weights.up, w.table_amax, stream);
  timer.mark("amax");
  const int64_t bound = tile_bound(cfg, tokens);

  // s = dy . V per pair: dgates = h s, da = g s act'(preact) (coef), g h (coef2).
  DotParams<T> dp = dot_params<T>(cfg, gr, dy, weights.down, w);
  dp.dgates = static_cast<float*>(dgates.data);
  dp.dgates_stride = dgates.strides[0];
  launch_dot<T>(dp, true, rows_aligned(dy) && rows_aligned(weights.down), bound, stream);
  timer.mark("dot");
  // dx (+)= sum da W.
  token_sums<T>(cfg, gr, w, weights.up, dx, accumulate_dx, fixed, bound, timer, stream);
  // dW = sum da x (da's blocks built by the token sums), dV = sum g h dy (g h's blocks built
  // over da's, which dW has finished reading: same stream).
  expert_sum<T>(cfg, gr, w, w.coef, w.coef_blocks, x, grads.up, stream);
  timer.mark("dW");
  if (w.blocks_cap > 0) {
    launch_build_coef_blocks<T>(gr, w.coef2, token_sum_window(cfg), w.blocks_cap,
                                w.coef_blocks, bound, stream);
    timer.mark("blocks");
  }
  expert_sum<T>(cfg, gr, w, w.coef2, w.coef_blocks, dy, grads.down, stream);
  timer.mark("dV");
}

// Calls fn(T{}) for the storage types this path runs on the tensor cores.
template <typename Fn>
void dispatch_tensor_core(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::bf16: fn(__nv_bfloat16{}); return;
    case DType::f16: fn(__half{}); return;
    default: break;
  }
  OMNIMOE_FAIL("experts_tiled: unsupported storage dtype ", dtype_name(dtype),
               " (the tiled path runs bf16 and f16)");
}

}  // namespace

bool experts_tiled_supports(const LayerConfig& cfg, int64_t tokens, DType dtype) {
  if (dtype != DType::bf16 && dtype != DType::f16) return false;
  const int64_t G = cfg.grid_rows + cfg.grid_cols;
  const int64_t limit = int64_t{1} << 30;
  // 32-bit pair ids and positions; the per-token counts fit the default shared memory.
  // The sums round their coefficients to bf16 / f16 before the tensor-core products; the error
  // grows like sqrt(d) and left the bf16 tolerance on dW at d = 3000 (H100 run, 2026-11-25), so
  // wider layers take the other paths until a high/low split of the coefficients lands.
  constexpr int64_t kMaxHidden = 2048;
  return tokens >= 0 && tokens * cfg.top_k < limit && tokens * G < limit &&
         cfg.num_experts() < limit && cfg.hidden <= kMaxHidden && G * 5 <= 48 * 1024;
}

size_t experts_tiled_forward_workspace_bytes(const LayerConfig& cfg, int64_t tokens, DType) {
  return carve(cfg, tokens, false, nullptr).bytes;
}

size_t experts_tiled_backward_workspace_bytes(const LayerConfig& cfg, int64_t tokens, DType) {
  return carve(cfg, tokens, true, nullptr).bytes;
}

void experts_tiled_forward(const LayerConfig& cfg, const TensorView& x,
                           const ExpertWeights& weights, const TensorView& indices,
                           const TensorView& gates, const TensorView& y, bool accumulate,
                           const TensorView& preact, Buffer workspace, const Exec& exec) {
  OMNIMOE_CHECK(experts_tiled_supports(cfg, x.shape[0], x.dtype),
                "experts_tiled_forward: unsupported call (dtype ", dtype_name(x.dtype), ", T = ",
                x.shape[0], ", ", cfg.describe(), ")");
  OMNIMOE_CHECK(workspace.bytes >= experts_tiled_forward_workspace_bytes(cfg, x.shape[0], x.dtype),
                "experts_tiled_forward: workspace of ", workspace.bytes, " bytes, need ",
                experts_tiled_forward_workspace_bytes(cfg, x.shape[0], x.dtype));
  if (x.shape[0] == 0) return;
  DeviceGuard guard(exec);
  dispatch_tensor_core(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    forward_impl<T>(cfg, x, weights, indices, gates, y, accumulate, preact, workspace,
                    exec);
  });
}

void experts_tiled_backward(const LayerConfig& cfg, const TensorView& x,
                            const ExpertWeights& weights, const TensorView& indices,
                            const TensorView& gates, const TensorView& preact,
                            const Schedule& schedule, const TensorView& dy, const TensorView& dx,
                            bool accumulate_dx, const ExpertWeights& grads,
                            const TensorView& dgates, Buffer workspace, const Exec& exec) {
  OMNIMOE_CHECK(experts_tiled_supports(cfg, x.shape[0], x.dtype),
                "experts_tiled_backward: unsupported call (dtype ", dtype_name(x.dtype), ", T = ",
                x.shape[0], ", ", cfg.describe(), ")");
  OMNIMOE_CHECK(
      workspace.bytes >= experts_tiled_backward_workspace_bytes(cfg, x.shape[0], x.dtype),
      "experts_tiled_backward: workspace of ", workspace.bytes, " bytes, need ",
      experts_tiled_backward_workspace_bytes(cfg, x.shape[0], x.dtype));
  DeviceGuard guard(exec);
  dispatch_tensor_core(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    backward_impl<T>(cfg, x, weights, indices, gates, preact, schedule, dy, dx, accumulate_dx,
                     grads, dgates, workspace, exec);
  });
}

}  // namespace omnimoe::cuda
