// One token's row of router logits (n <= 32 * kItems floats) held in the registers of a warp:
// loaded and stored with 16-byte accesses when the row allows it, normalised by the batch-norm
// statistics, and reduced for log_softmax. Shared by the normalise kernel of router_forward and
// the fused normalise + selection kernel.
#pragma once

#include "cuda/router_common.cuh"

namespace omnimoe::cuda::router_detail {

// (v - mean) * rstd with mean = mean_hi + mean_lo: v - mean_hi is exact near the mean and
// relatively accurate elsewhere, so z is within a few ulp whatever the mean's size.
__device__ __forceinline__ float normalised(float v, float mean_hi, float mean_lo, float rstd) {
  return __fmul_rn(__fsub_rn(__fsub_rn(v, mean_hi), mean_lo), rstd);
}

// Item q of lane l is element q * 32 + l, or, with kVec (n % 4 == 0, 16-byte aligned row),
// element ((q / 4) * 32 + l) * 4 + q % 4: one float4 per lane and group of four items. Items
// past n hold NaN.
template <int kItems, bool kVec>
struct WarpRow {
  static_assert(!kVec || kItems % 4 == 0, "vector rows hold whole float4s");

  __device__ static __forceinline__ int index(int q, int lane) {
    return kVec ? ((q / 4) * 32 + lane) * 4 + (q % 4) : q * 32 + lane;
  }
  __device__ static __forceinline__ bool valid(int q, int lane, int n) {
    return index(q, lane) < n;
  }

  // Plain loads: the row may be written back in place by the same thread.
  __device__ static __forceinline__ void load(const float* g, int n, int lane,
                                              float (&v)[kItems]) {
    if constexpr (kVec) {
#pragma unroll
      for (int p = 0; p < kItems / 4; ++p) {
        const int i = (p * 32 + lane) * 4;
        float4 x = make_float4(NAN, NAN, NAN, NAN);
        if (i < n) x = *reinterpret_cast<const float4*>(g + i);
        v[4 * p] = x.x;
        v[4 * p + 1] = x.y;
        v[4 * p + 2] = x.z;
        v[4 * p + 3] = x.w;
      }
    } else {
#pragma unroll
      for (int q = 0; q < kItems; ++q) {
        const int i = q * 32 + lane;
        v[q] = i < n ? g[i] : NAN;
      }
    }
  }

  __device__ static __forceinline__ void store(float* g, int n, int lane,
                                               const float (&v)[kItems]) {
    if constexpr (kVec) {
#pragma unroll
      for (int p = 0; p < kItems / 4; ++p) {
        const int i = (p * 32 + lane) * 4;
        if (i < n) {
          *reinterpret_cast<float4*>(g + i) =
              make_float4(v[4 * p], v[4 * p + 1], v[4 * p + 2], v[4 * p + 3]);
        }
      }
    } else {
#pragma unroll
      for (int q = 0; q < kItems; ++q) {
        const int i = q * 32 + lane;
        if (i < n) g[i] = v[q];
      }
    }
  }

  // v = ((v - mean_hi) - mean_lo) * rstd: the statistics of this axis's columns (router_norm.cuh;
  // with kVec all three 16-byte aligned).
  __device__ static __forceinline__ void normalise(float (&v)[kItems], int n, int lane,
                                                   const float* mean_hi, const float* mean_lo,
                                                   const float* rstd) {
    if constexpr (kVec) {
#pragma unroll
      for (int p = 0; p < kItems / 4; ++p) {
        const int i = (p * 32 + lane) * 4;
        if (i >= n) continue;
        const float4 h = *reinterpret_cast<const float4*>(mean_hi + i);
        const float4 l = *reinterpret_cast<const float4*>(mean_lo + i);
        const float4 r = *reinterpret_cast<const float4*>(rstd + i);
        v[4 * p] = normalised(v[4 * p], h.x, l.x, r.x);
        v[4 * p + 1] = normalised(v[4 * p + 1], h.y, l.y, r.y);
        v[4 * p + 2] = normalised(v[4 * p + 2], h.z, l.z, r.z);
        v[4 * p + 3] = normalised(v[4 * p + 3], h.w, l.w, r.w);
      }
    } else {
#pragma unroll
      for (int q = 0; q < kItems; ++q) {
        const int i = q * 32 + lane;
        if (i < n) v[q] = normalised(v[q], mean_hi[i], mean_lo[i], rstd[i]);
      }
    }
  }

  // log(sum(exp(z))) of the row, as the CPU's log_softmax: max first (NaN skipped), a non-finite
  // max shifts by 0; a NaN anywhere makes it NaN.
  __device__ static __forceinline__ float log_sum_exp(const float (&z)[kItems], int n, int lane) {
    float m = -INFINITY;
#pragma unroll
    for (int q = 0; q < kItems; ++q) m = fmaxf(m, z[q]);  // unused items are NaN: skipped
    m = warp_max(m);
    const float shift = isfinite(m) ? m : 0.0f;
    float s = 0.0f;
#pragma unroll
    for (int q = 0; q < kItems; ++q) {
      if (valid(q, lane, n)) s += expf(z[q] - shift);
    }
    return shift + logf(warp_sum(s));
  }
};

// Items per lane for rows of up to n floats (n <= 1024).
inline int warp_row_items(int64_t n) { return n <= 128 ? 4 : n <= 256 ? 8 : n <= 512 ? 16 : 32; }

// Rows of n floats from `p` with row stride n can take float4 accesses.
inline bool vector_rows(const void* p, int64_t n) {
  return n % 4 == 0 && (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

}  // namespace omnimoe::cuda::router_detail
