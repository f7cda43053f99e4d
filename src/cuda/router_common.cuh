// Device helpers shared by the CUDA router kernels: the order-preserving key of a float (the
// selection's ranking), block reductions and scans with fixed summation order (so results are
// bitwise repeatable), and a block-wide bitonic sort. Every helper is called by all threads of
// the block (each contains barriers).
#pragma once

#include <cstdint>

#include "cuda/cuda_common.cuh"

namespace omnimoe::cuda::router_detail {

constexpr int kMaxThreads = 512;
constexpr int kMaxWarps = kMaxThreads / 32;

// The value a log-probability is ranked by: NaN ranks as -inf (SPEC: the selection always returns
// K distinct ids).
__device__ __forceinline__ float rank_value(float v) { return v != v ? -INFINITY : v; }

// Unsigned key with the order of the floats: a < b <=> key(a) < key(b). NaN ranks as -inf, and
// -0 as +0 (they compare equal, so they tie and the smaller id wins).
__device__ __forceinline__ uint32_t order_key(float v) {
  uint32_t b = __float_as_uint(v);
  if (v != v) b = 0xff800000u;
  if (b == 0x80000000u) b = 0u;
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Key of the score p_r + p_c (float sum, round to nearest, as the CPU computes it).
__device__ __forceinline__ uint32_t sum_key(float a, float b) { return order_key(__fadd_rn(a, b)); }

// Entry of a sort in ascending order = (key descending, id ascending).
__device__ __forceinline__ uint64_t make_entry(uint32_t key, uint32_t id) {
  return (static_cast<uint64_t>(~key) << 32) | id;
}
__device__ __forceinline__ uint32_t entry_id(uint64_t e) { return static_cast<uint32_t>(e); }
constexpr uint64_t kPadEntry = ~0ull;  // sorts after every real entry

// Sum over the block, returned to every thread. `scratch` holds kMaxWarps values of T.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();  // the previous use of scratch is over
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T t = lane < warps ? scratch[lane] : T(0);
  return warp_sum(t);
}

// Max over the block (NaN is ignored, as fmaxf does), returned to every thread.
__device__ __forceinline__ float block_max(float v, float* scratch) {
  v = warp_max(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float t = lane < warps ? scratch[lane] : -INFINITY;
  return warp_max(t);
}

// Min and max of unsigned values over the block, returned to every thread.
__device__ __forceinline__ void block_min_max(uint32_t& lo, uint32_t& hi, uint32_t* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    lo = min(lo, __shfl_xor_sync(0xffffffffu, lo, o));
    hi = max(hi, __shfl_xor_sync(0xffffffffu, hi, o));
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) {
    scratch[2 * warp] = lo;
    scratch[2 * warp + 1] = hi;
  }
  __syncthreads();
  lo = lane < warps ? scratch[2 * lane] : 0xffffffffu;
  hi = lane < warps ? scratch[2 * lane + 1] : 0u;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    lo = min(lo, __shfl_xor_sync(0xffffffffu, lo, o));
    hi = max(hi, __shfl_xor_sync(0xffffffffu, hi, o));
  }
}

__device__ __forceinline__ int block_max_int(int v, int* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : 0;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sorts a[0, n) ascending, n a power of two. Starts and ends with a barrier.
__device__ __forceinline__ void bitonic_sort(uint64_t* a, uint32_t n) {
  __syncthreads();
  for (uint32_t k = 2; k <= n; k <<= 1) {
    for (uint32_t j = k >> 1; j > 0; j >>= 1) {
      for (uint32_t i = threadIdx.x; i < n / 2; i += blockDim.x) {
        const uint32_t lo = ((i & ~(j - 1)) << 1) | (i & (j - 1));
        const uint32_t hi = lo + j;
        const bool ascending = (lo & k) == 0;
        const uint64_t x = a[lo], y = a[hi];
        if ((x > y) == ascending) {
          a[lo] = y;
          a[hi] = x;
        }
      }
      __syncthreads();
    }
  }
}

__host__ __device__ constexpr uint32_t next_pow2(uint32_t n) {
  uint32_t p = 1;
  while (p < n) p <<= 1;
  return p;
}

// kWidth floats from p (kWidth = 4: one aligned float4, so p must be 16-byte aligned).
template <int kWidth>
__device__ __forceinline__ void load_floats(const float* __restrict__ p, float (&v)[kWidth]) {
  if constexpr (kWidth == 4) {
    const float4 x = *reinterpret_cast<const float4*>(p);
    v[0] = x.x;
    v[1] = x.y;
    v[2] = x.z;
    v[3] = x.w;
  } else {
#pragma unroll
    for (int i = 0; i < kWidth; ++i) v[i] = p[i];
  }
}

}  // namespace omnimoe::cuda::router_detail
