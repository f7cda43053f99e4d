// Exact top-K of the pair sums S = p_r[i] + p_c[j], one CTA per token, without visiting the grid.
//
// Per token:
//  1. Each axis keeps only its top L = min(N, K + 1) entries, sorted by (value desc, index asc):
//     a pair (i, j) of sorted ranks with sum >= t implies every (i' <= i, j' <= j) has sum >= t,
//     so counting pairs >= t restricted to the top min(N, K) of each axis answers "at least K?"
//     exactly. The extra (K+1)-th entry tells whether a tie at the threshold can sit outside.
//     The L entries come from a bucket select: a histogram of the keys over their [min, max]
//     range, the bucket holding the L-th largest key, and the few keys from there up (a bitwise
//     search for the L-th key when that bucket is too full, e.g. under ties).
//  2. tau = the K-th largest sum, by a search over the order-preserving uint32 key of the float
//     sum (interpolated on sqrt(count), bounds snapped onto actual pair keys: about 5 to 15
//     passes), counting pairs >= t by a binary search per row of the region.
//  3. Pairs > tau (fewer than K) are all taken; K - count(> tau) pairs == tau are taken by
//     increasing expert id: inside the region when all ties are there and few, else by a scan of
//     the grid in id order (exact, slower, only on heavy ties).
//  4. The K entries are sorted by (score desc, id asc) with a bucket sort (histogram over the key
//     range, scatter, rank within each small bucket; bitonic when a bucket is large). Scores are
//     the float sums of the original log-probabilities (a NaN log-probability gives a NaN score,
//     ranked as -inf).
// Sorts are by distinct 64-bit entries (key, id), so every order is unique and deterministic.
#include "backend/backend.h"
#include "cuda/router_common.cuh"
#include "cuda/router_select.cuh"

#include <algorithm>

namespace omnimoe::cuda::router_detail {
namespace {

// Per-token buffers live in shared memory when they fit this budget (the opt-in limit of the
// smallest supported parts, sm_86/89); otherwise in global workspace, one slice per CTA of a
// persistent grid.
constexpr size_t kSharedBudget = 99 * 1024;
constexpr int kGlobalCtas = 128;
constexpr int kGlobalThreads = 256;  // the global-buffer kernel needs more registers
constexpr uint32_t kRankCountMax = 64;  // sort by counting ranks up to this many entries
constexpr int kMaxBucket = 64;          // larger buckets fall back to a bitonic sort
constexpr uint32_t kMaxBuckets = 4096;

struct Scratch {
  long long i64[kMaxWarps];
  uint64_t u64[kMaxWarps];
  int i32[kMaxWarps];
  float f32[kMaxWarps];
  uint32_t u32[2 * kMaxWarps];
  int counter;
  uint32_t tau;
};

// Buckets for sorting or selecting among n entries: about two per bucket.
__host__ __device__ constexpr uint32_t bucket_count(uint32_t n) {
  const uint32_t b = next_pow2(n) / 2;
  return b < 32 ? 32 : (b > kMaxBuckets ? kMaxBuckets : b);
}

struct SelectShape {
  int nr, nc, k, threads;
  int lr, lc;  // entries kept per axis: min(N, K + 1)
  int ra, rb;  // region: min(N, K) rows and columns
  uint32_t cap_r, cap_c, pk, tmp_len, buckets;
  size_t o_keys_r, o_keys_c, o_vals_r, o_vals_c, o_cand_r, o_cand_c, o_rv_r, o_rid_r, o_rv_c,
      o_rid_c, o_g, o_e, o_gp, o_ep, o_out, o_tmp, o_cnt, o_scratch, bytes;
};

size_t align16(size_t n) { return (n + 15) / 16 * 16; }

SelectShape make_select_shape(const LayerConfig& cfg) {
  SelectShape s{};
  s.nr = static_cast<int>(cfg.grid_rows);
  s.nc = static_cast<int>(cfg.grid_cols);
  s.k = static_cast<int>(cfg.top_k);
  s.threads = s.k <= 64 ? 128 : s.k <= 512 ? 256 : 512;
  s.lr = static_cast<int>(std::min<int64_t>(cfg.grid_rows, cfg.top_k + 1));
  s.lc = static_cast<int>(std::min<int64_t>(cfg.grid_cols, cfg.top_k + 1));
  s.ra = std::min(s.nr, s.k);
  s.rb = std::min(s.nc, s.k);
  // Candidates of an axis: all of it, or a few times the entries kept (beyond: the exact
  // search).
  auto cap = [](int l, int n) {
    const uint32_t p = next_pow2(static_cast<uint32_t>(l));
    return l == n ? p : p * (p >= 256 ? 2u : 4u);
  };
  s.cap_r = cap(s.lr, s.nr);
  s.cap_c = cap(s.lc, s.nc);
  s.pk = next_pow2(static_cast<uint32_t>(s.k));
  s.tmp_len = std::max({s.cap_r, s.cap_c, static_cast<uint32_t>(s.k)});
  s.buckets = std::max({bucket_count(static_cast<uint32_t>(s.nr)),
                        bucket_count(static_cast<uint32_t>(s.nc)), bucket_count(s.cap_r),
                        bucket_count(s.cap_c), bucket_count(static_cast<uint32_t>(s.k))});
  size_t o = 0;
  auto take = [&](size_t bytes) {
    const size_t at = o;
    o += align16(bytes);
    return at;
  };
  s.o_scratch = take(sizeof(Scratch));
  s.o_keys_r = take(4ull * s.nr);
  s.o_keys_c = take(4ull * s.nc);
  s.o_vals_r = take(4ull * s.nr);
  s.o_vals_c = take(4ull * s.nc);
  s.o_cand_r = take(8ull * (s.cap_r + s.cap_c));  // one block: it doubles as the tie buffer
  s.o_cand_c = s.o_cand_r + 8ull * s.cap_r;
  s.o_rv_r = take(4ull * s.lr);
  s.o_rid_r = take(4ull * s.lr);
  s.o_rv_c = take(4ull * s.lc);
  s.o_rid_c = take(4ull * s.lc);
  s.o_g = take(4ull * s.ra);
  s.o_e = take(4ull * s.ra);
  s.o_gp = take(4ull * (s.ra + 1));
  s.o_ep = take(4ull * (s.ra + 1));
  s.o_out = take(8ull * s.pk);
  s.o_tmp = take(8ull * s.tmp_len);
  s.o_cnt = take(4ull * (s.buckets + 1));
  s.bytes = o;
  return s;
}

bool fits_shared(const SelectShape& s) { return s.bytes <= kSharedBudget; }

// Appends `entry` for the threads where pred holds, in any order; all lanes of the warp call it.
__device__ __forceinline__ void append(bool pred, uint64_t entry, uint64_t* buf, int* counter) {
  const unsigned mask = __ballot_sync(0xffffffffu, pred);
  if (mask == 0) return;
  const int lane = threadIdx.x & 31;
  const int leader = __ffs(mask) - 1;
  int base = 0;
  if (lane == leader) base = atomicAdd(counter, __popc(mask));
  base = __shfl_sync(0xffffffffu, base, leader);
  if (pred) buf[base + __popc(mask & ((1u << lane) - 1u))] = entry;
}

// Exclusive prefix of v[0, n) into p[0, n] (p[n] = total), in fixed order; p may be v.
__device__ void block_prefix(int* v, int n, int* p, Scratch* sc) {
  const int per = (n + blockDim.x - 1) / blockDim.x;
  const int b0 = min(n, static_cast<int>(threadIdx.x) * per), b1 = min(n, b0 + per);
  int s = 0;
  for (int i = b0; i < b1; ++i) s += v[i];
  int total;
  int off = block_exclusive_scan(s, sc->i32, &total);
  for (int i = b0; i < b1; ++i) {
    const int vi = v[i];
    p[i] = off;
    off += vi;
  }
  if (threadIdx.x == 0) p[n] = total;
  __syncthreads();
}

// Maps a 32-bit value in [lo, lo + span) to one of nb buckets, monotonically.
struct Buckets {
  uint32_t lo;
  float scale;
  int nb;
  __device__ Buckets(uint32_t lo_, uint32_t hi_, int nb_)
      : lo(lo_), scale(static_cast<float>(nb_) / (static_cast<float>(hi_ - lo_) + 1.0f)),
        nb(nb_) {}
  __device__ __forceinline__ int operator()(uint32_t v) const {
    return min(nb - 1, static_cast<int>(static_cast<float>(v - lo) * scale));
  }
};

// Sorts the distinct entries a[0, n) ascending; returns where the result is (a or tmp).
// Capacities: a >= next_pow2(n) (bitonic fallback), tmp >= n, cnt >= bucket_count(n) + 1.
__device__ uint64_t* sort_entries(uint64_t* a, uint32_t n, uint64_t* tmp, int* cnt,
                                  Scratch* sc) {
  const int tid = threadIdx.x, nthreads = blockDim.x;
  __syncthreads();  // a was just written
  if (n <= kRankCountMax) {
    for (uint32_t c = tid; c < n; c += nthreads) {
      const uint64_t e = a[c];
      uint32_t r = 0;
      for (uint32_t c2 = 0; c2 < n; ++c2) r += a[c2] < e;
      tmp[r] = e;
    }
    __syncthreads();
    return tmp;
  }
  // Buckets over the range of the high words (the keys); ids only order within a bucket.
  uint32_t lo = 0xffffffffu, hi = 0;
  for (uint32_t c = tid; c < n; c += nthreads) {
    const uint32_t h = static_cast<uint32_t>(a[c] >> 32);
    lo = min(lo, h);
    hi = max(hi, h);
  }
  block_min_max(lo, hi, sc->u32);
  const int nb = static_cast<int>(bucket_count(n));
  const Buckets bucket(lo, hi, nb);
  for (int b = tid; b <= nb; b += nthreads) cnt[b] = 0;
  __syncthreads();
  for (uint32_t c = tid; c < n; c += nthreads) {
    atomicAdd(cnt + bucket(static_cast<uint32_t>(a[c] >> 32)), 1);
  }
  __syncthreads();
  int big = 0;
  for (int b = tid; b < nb; b += nthreads) big = max(big, cnt[b]);
  if (block_max_int(big, sc->i32) > kMaxBucket) {
    const uint32_t p2 = next_pow2(n);
    for (uint32_t c = n + tid; c < p2; c += nthreads) a[c] = kPadEntry;
    bitonic_sort(a, p2);
    return a;
  }
  block_prefix(cnt, nb, cnt, sc);  // cnt[b] = first slot of bucket b
  for (uint32_t c = tid; c < n; c += nthreads) {
    const uint64_t e = a[c];
    tmp[atomicAdd(cnt + bucket(static_cast<uint32_t>(e >> 32)), 1)] = e;
  }
  __syncthreads();  // now cnt[b] = end of bucket b = first slot of bucket b + 1
  for (uint32_t c = tid; c < n; c += nthreads) {
    const uint64_t e = tmp[c];
    const int b = bucket(static_cast<uint32_t>(e >> 32));
    const int first = b == 0 ? 0 : cnt[b - 1], last = cnt[b];
    int r = 0;
    for (int q = first; q < last; ++q) r += tmp[q] < e;
    a[first + r] = e;
  }
  __syncthreads();
  return a;
}

// The top l entries of one axis (value desc, index asc) into rv (rank values) and rid (indices).
__device__ void axis_top(const float* vals, const uint32_t* keys, int n, int l, uint64_t* cand,
                         uint32_t cap, uint64_t* tmp, int* cnt, float* rv, int* rid,
                         Scratch* sc) {
  const int tid = threadIdx.x, nthreads = blockDim.x;
  uint32_t count = 0;  // entries in cand
  if (l == n) {
    for (int i = tid; i < n; i += nthreads) cand[i] = make_entry(keys[i], i);
    count = n;
  } else {
    // Bucket select: keys in the buckets from the one holding the l-th largest key up.
    uint32_t lo = 0xffffffffu, hi = 0;
    for (int i = tid; i < n; i += nthreads) {
      lo = min(lo, keys[i]);
      hi = max(hi, keys[i]);
    }
    block_min_max(lo, hi, sc->u32);
    const int nb = static_cast<int>(bucket_count(static_cast<uint32_t>(n)));
    const Buckets bucket(lo, hi, nb);
    for (int b = tid; b <= nb; b += nthreads) cnt[b] = 0;
    __syncthreads();
    for (int i = tid; i < n; i += nthreads) atomicAdd(cnt + bucket(keys[i]), 1);
    __syncthreads();
    block_prefix(cnt, nb, cnt, sc);  // cnt[b] = keys in buckets below b
    // The lowest bucket b with n - cnt[b] >= l: the largest b with cnt[b] <= n - l.
    int b_lo = 0, b_hi = nb - 1;
    while (b_lo < b_hi) {
      const int mid = (b_lo + b_hi + 1) >> 1;
      if (cnt[mid] <= n - l) b_lo = mid;
      else b_hi = mid - 1;
    }
    const int first = b_lo;
    const uint32_t total = static_cast<uint32_t>(n - cnt[first]);
    if (total <= cap) {
      __syncthreads();  // every thread has read cnt
      if (tid == 0) sc->counter = 0;
      __syncthreads();
      for (int i0 = 0; i0 < n; i0 += nthreads) {
        const int i = i0 + tid;
        const bool p = i < n && bucket(keys[i]) >= first;
        append(p, p ? make_entry(keys[i], i) : 0, cand, &sc->counter);
      }
      count = total;
    } else {
      // Bitwise search for the l-th largest key t; ties at t by smallest index.
      uint32_t t = 0;
      for (int bit = 31; bit >= 0; --bit) {
        const uint32_t c = t | (1u << bit);
        int local = 0;
        for (int i = tid; i < n; i += nthreads) local += keys[i] >= c;
        if (block_sum(local, sc->i32) >= l) t = c;
      }
      int gt = 0, eq = 0;
      for (int i = tid; i < n; i += nthreads) {
        gt += keys[i] > t;
        eq += keys[i] == t;
      }
      gt = block_sum(gt, sc->i32);
      eq = block_sum(eq, sc->i32);
      const int need = l - gt;
      if (tid == 0) sc->counter = 0;
      __syncthreads();
      const bool all_ties = eq == need;
      for (int i0 = 0; i0 < n; i0 += nthreads) {
        const int i = i0 + tid;
        const bool p = i < n && (keys[i] > t || (all_ties && keys[i] == t));
        append(p, p ? make_entry(keys[i], i) : 0, cand, &sc->counter);
      }
      if (!all_ties) {
        int taken = 0;
        for (int i0 = 0; i0 < n && taken < need; i0 += nthreads) {
          const int i = i0 + tid;
          const int p = i < n && keys[i] == t;
          int total_eq;
          const int pos = block_exclusive_scan(p, sc->i32, &total_eq);
          if (p && taken + pos < need) cand[gt + taken + pos] = make_entry(t, i);
          taken += total_eq;
        }
      }
      count = l;
    }
  }
  const uint64_t* sorted = sort_entries(cand, count, tmp, cnt, sc);
  for (int i = tid; i < l; i += nthreads) {
    const uint32_t id = entry_id(sorted[i]);
    rv[i] = rank_value(vals[id]);
    rid[i] = static_cast<int>(id);
  }
  __syncthreads();
}

// Number of j < n with sum_key(a, b[j]) >= t; the keys do not increase with j.
__device__ __forceinline__ int count_ge(float a, const float* b, int n, uint32_t t) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (sum_key(a, b[mid]) >= t) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// One counting pass over the region at threshold t: the pairs with key >= t, the smallest key
// >= t and the largest key < t (the bounds of the search snap onto actual pair keys). Rows first,
// first + stride, ... are summed over the block, or over one warp.
struct RegionPass {
  long long count;
  uint32_t up, down;  // 0xffffffff / 0 when there is none
};

__device__ __forceinline__ RegionPass region_pass(uint32_t t, const float* ra, int nra,
                                                  const float* cb, int nrb, int first,
                                                  int stride, bool warp_only, Scratch* sc) {
  long long c = 0;
  uint32_t up = 0xffffffffu, down = 0;
  for (int i = first; i < nra; i += stride) {
    const float a = ra[i];
    const int n = count_ge(a, cb, nrb, t);
    if (n > 0) up = min(up, sum_key(a, cb[n - 1]));
    if (n < nrb) down = max(down, sum_key(a, cb[n]));
    if (n == 0) break;  // rows are sorted: later rows count nothing and stay below
    c += n;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    c += __shfl_xor_sync(0xffffffffu, c, o);
    up = min(up, __shfl_xor_sync(0xffffffffu, up, o));
    down = max(down, __shfl_xor_sync(0xffffffffu, down, o));
  }
  if (warp_only) return {c, up, down};
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) {
    sc->i64[warp] = c;
    sc->u32[2 * warp] = up;
    sc->u32[2 * warp + 1] = down;
  }
  __syncthreads();
  c = lane < warps ? sc->i64[lane] : 0;
  up = lane < warps ? sc->u32[2 * lane] : 0xffffffffu;
  down = lane < warps ? sc->u32[2 * lane + 1] : 0u;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    c += __shfl_xor_sync(0xffffffffu, c, o);
    up = min(up, __shfl_xor_sync(0xffffffffu, up, o));
    down = max(down, __shfl_xor_sync(0xffffffffu, down, o));
  }
  return {c, up, down};
}

// tau = the largest t with count(pairs of the region >= t) >= k. lo (the region's smallest pair)
// qualifies. Invariants: lo is a pair key with count(lo) >= k, count(hi) < k. Each pass splits
// [lo, hi] where sqrt(count), about linear in t near the top of a sum of two sorted arrays,
// reaches sqrt(k) (or in the middle after a pass that did not halve the interval), then snaps
// lo up, or hi down, to the nearest pair key; done when count(lo) == k or hi = lo + 1.
__device__ __forceinline__ uint32_t search_tau(uint32_t lo, uint32_t top, const float* ra, int nra,
                               const float* cb, int nrb, int k, int first, int stride,
                               bool warp_only, Scratch* sc) {
  const RegionPass at_top = region_pass(top, ra, nra, cb, nrb, first, stride, warp_only, sc);
  if (at_top.count >= k) return top;
  long long c_lo = static_cast<long long>(nra) * nrb, c_hi = at_top.count;
  uint32_t hi = top;
  bool bisect = false;
  while (c_lo > k && hi - lo > 1) {
    const uint32_t width = hi - lo;
    uint32_t mid;
    if (bisect) {
      mid = lo + width / 2;
    } else {
      const double s_lo = sqrt(static_cast<double>(c_lo)), s_hi = sqrt(static_cast<double>(c_hi));
      const double f = (s_lo - sqrt(static_cast<double>(k) - 0.5)) / (s_lo - s_hi);
      const uint32_t step = static_cast<uint32_t>(f * static_cast<double>(width));
      mid = lo + min(max(step, 1u), width - 1);
    }
    const RegionPass p = region_pass(mid, ra, nra, cb, nrb, first, stride, warp_only, sc);
    if (p.count >= k) {
      lo = p.up;  // count(up) = count(mid): no pair key in [mid, up)
      c_lo = p.count;
    } else {
      hi = p.down + 1;  // count(down + 1) = count(mid): no pair key in (down, mid)
      c_hi = p.count;
    }
    bisect = !bisect && (hi - lo) > width / 2;
  }
  return lo;
}

// Largest i with p[i] <= s (p non-decreasing, p[0] = 0 <= s).
__device__ __forceinline__ int row_of(const int* p, int n, int s) {
  int lo = 0, hi = n;  // p[lo] <= s < p[hi] (p[n] > s by the caller)
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (p[mid] <= s) lo = mid;
    else hi = mid;
  }
  return lo;
}

// vals[i] = g[i], keys[i] = order_key(g[i]) for i < n; 16-byte loads when aligned.
__device__ __forceinline__ void load_axis(const float* __restrict__ g, int n, float* vals,
                                          uint32_t* keys) {
  const int tid = threadIdx.x, nthreads = blockDim.x;
  if ((n & 3) == 0 && (reinterpret_cast<uintptr_t>(g) & 15) == 0) {
    const float4* g4 = reinterpret_cast<const float4*>(g);
#pragma unroll 4
    for (int i = tid; i < n / 4; i += nthreads) {
      const float4 v = __ldg(g4 + i);
      reinterpret_cast<float4*>(vals)[i] = v;
      reinterpret_cast<uint4*>(keys)[i] =
          make_uint4(order_key(v.x), order_key(v.y), order_key(v.z), order_key(v.w));
    }
  } else {
#pragma unroll 4
    for (int i = tid; i < n; i += nthreads) {
      const float v = __ldg(g + i);
      vals[i] = v;
      keys[i] = order_key(v);
    }
  }
}

template <bool kShared>
__global__ void __launch_bounds__(kShared ? kMaxThreads : kGlobalThreads, kShared ? 2 : 1)
    select_topk_kernel(SelectShape sh, int64_t tokens, const float* __restrict__ row_logp,
                       const float* __restrict__ col_logp, int32_t* __restrict__ indices,
                       float* __restrict__ scores, float* __restrict__ gates, GateMode mode,
                       const int* __restrict__ only, char* __restrict__ global_buffers) {
  extern __shared__ __align__(16) char smem[];
  char* base = kShared ? smem : global_buffers + static_cast<size_t>(blockIdx.x) * sh.bytes;
  Scratch* sc = reinterpret_cast<Scratch*>(base + sh.o_scratch);
  uint32_t* keys_r = reinterpret_cast<uint32_t*>(base + sh.o_keys_r);
  uint32_t* keys_c = reinterpret_cast<uint32_t*>(base + sh.o_keys_c);
  float* vals_r = reinterpret_cast<float*>(base + sh.o_vals_r);
  float* vals_c = reinterpret_cast<float*>(base + sh.o_vals_c);
  uint64_t* cand_r = reinterpret_cast<uint64_t*>(base + sh.o_cand_r);
  uint64_t* cand_c = reinterpret_cast<uint64_t*>(base + sh.o_cand_c);
  float* rv_r = reinterpret_cast<float*>(base + sh.o_rv_r);
  int* rid_r = reinterpret_cast<int*>(base + sh.o_rid_r);
  float* rv_c = reinterpret_cast<float*>(base + sh.o_rv_c);
  int* rid_c = reinterpret_cast<int*>(base + sh.o_rid_c);
  int* g = reinterpret_cast<int*>(base + sh.o_g);
  int* e = reinterpret_cast<int*>(base + sh.o_e);
  int* gp = reinterpret_cast<int*>(base + sh.o_gp);
  int* ep = reinterpret_cast<int*>(base + sh.o_ep);
  uint64_t* out = reinterpret_cast<uint64_t*>(base + sh.o_out);
  uint64_t* tmp = reinterpret_cast<uint64_t*>(base + sh.o_tmp);
  int* cnt = reinterpret_cast<int*>(base + sh.o_cnt);

  const int tid = threadIdx.x, nthreads = blockDim.x, lane = tid & 31, warp = tid >> 5;
  const int nr = sh.nr, nc = sh.nc, k = sh.k, ra = sh.ra, rb = sh.rb;

  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    if (only != nullptr && only[t] == 0) continue;  // done by the warp kernel
    load_axis(row_logp + t * nr, nr, vals_r, keys_r);
    load_axis(col_logp + t * nc, nc, vals_c, keys_c);
    __syncthreads();
    axis_top(vals_r, keys_r, nr, sh.lr, cand_r, sh.cap_r, tmp, cnt, rv_r, rid_r, sc);
    axis_top(vals_c, keys_c, nc, sh.lc, cand_c, sh.cap_c, tmp, cnt, rv_c, rid_c, sc);

    // tau: the K-th largest sum. The region's smallest sum has at least K pairs above it.
    const uint32_t lo = sum_key(rv_r[ra - 1], rv_c[rb - 1]);
    const uint32_t hi = sum_key(rv_r[0], rv_c[0]);
    uint32_t tau;
    if (ra <= 64) {
      if (warp == 0) {
        const uint32_t w = search_tau(lo, hi, rv_r, ra, rv_c, rb, k, lane, 32, true, sc);
        if (lane == 0) sc->tau = w;
      }
      __syncthreads();
      tau = sc->tau;
    } else {
      tau = search_tau(lo, hi, rv_r, ra, rv_c, rb, k, tid, nthreads, false, sc);
    }

    // Per region row: g = pairs > tau, e = pairs == tau (sorted columns [g, g + e)).
    long long n_gt = 0, n_ge = 0;
    for (int i = tid; i < ra; i += nthreads) {
      const int gi = count_ge(rv_r[i], rv_c, rb, tau + 1);
      const int ei = count_ge(rv_r[i], rv_c, rb, tau);
      g[i] = gi;
      e[i] = ei - gi;
      n_gt += gi;
      n_ge += ei;
    }
    n_gt = block_sum(n_gt, sc->i64);
    n_ge = block_sum(n_ge, sc->i64);
    const int count_gt = static_cast<int>(n_gt);
    const int need = k - count_gt;
    const long long count_eq = n_ge - n_gt;
    // A tie outside the region: the best pair of the first row or column left out reaches tau.
    const bool spill = (nr > ra && sum_key(rv_r[ra], rv_c[0]) >= tau) ||
                       (nc > rb && sum_key(rv_r[0], rv_c[rb]) >= tau);
    const uint32_t tie_cap = sh.cap_r + sh.cap_c;
    const bool region_all = !spill && count_eq == need;
    const bool region_some =
        !spill && !region_all && count_eq <= static_cast<long long>(tie_cap) &&
        next_pow2(static_cast<uint32_t>(count_eq)) <= tie_cap;

    block_prefix(g, ra, gp, sc);
    if (region_all || region_some) block_prefix(e, ra, ep, sc);

    for (int s = tid; s < count_gt; s += nthreads) {
      const int i = row_of(gp, ra, s);
      const int j = s - gp[i];
      out[s] = make_entry(sum_key(rv_r[i], rv_c[j]),
                          static_cast<uint32_t>(rid_r[i]) * nc + rid_c[j]);
    }
    if (region_all) {
      for (int q = tid; q < need; q += nthreads) {
        const int i = row_of(ep, ra, q);
        const int j = g[i] + q - ep[i];
        out[count_gt + q] = make_entry(tau, static_cast<uint32_t>(rid_r[i]) * nc + rid_c[j]);
      }
    } else if (region_some) {
      uint64_t* ties = cand_r;  // the axis candidates are no longer needed
      const int n_eq = static_cast<int>(count_eq);
      const uint32_t p2 = next_pow2(static_cast<uint32_t>(n_eq));
      for (int q = tid; q < n_eq; q += nthreads) {
        const int i = row_of(ep, ra, q);
        const int j = g[i] + q - ep[i];
        ties[q] = static_cast<uint64_t>(rid_r[i]) * nc + rid_c[j];
      }
      for (uint32_t q = n_eq + tid; q < p2; q += nthreads) ties[q] = kPadEntry;
      bitonic_sort(ties, p2);
      for (int q = tid; q < need; q += nthreads) {
        out[count_gt + q] = make_entry(tau, static_cast<uint32_t>(ties[q]));
      }
    } else {
      // Heavy ties: scan the grid in id order. Every row visited holds a pair > tau or a tie,
      // so at most K rows are scanned.
      int found = 0;
      const float best_col = rv_c[0];
      for (int r = 0; r < nr && found < need; ++r) {
        const float a = rank_value(vals_r[r]);
        if (sum_key(a, best_col) < tau) continue;
        for (int c0 = 0; c0 < nc && found < need; c0 += nthreads) {
          const int c = c0 + tid;
          const int p = c < nc && sum_key(a, rank_value(vals_c[c])) == tau;
          int total;
          const int pos = block_exclusive_scan(p, sc->i32, &total);
          if (p && found + pos < need) {
            out[count_gt + found + pos] =
                make_entry(tau, static_cast<uint32_t>(r) * nc + static_cast<uint32_t>(c));
          }
          found += total;
        }
      }
    }
    __syncthreads();

    // Order the K entries by (score desc, id asc).
    const uint64_t* sorted = sort_entries(out, static_cast<uint32_t>(k), tmp, cnt, sc);

    int32_t* idx_out = indices + t * k;
    float* score_out = scores + t * k;
    float m = -INFINITY;
    for (int s = tid; s < k; s += nthreads) {
      const uint32_t id = entry_id(sorted[s]);
      const uint32_t r = id / static_cast<uint32_t>(nc);
      const float score = __fadd_rn(vals_r[r], vals_c[id - r * nc]);
      idx_out[s] = static_cast<int32_t>(id);
      score_out[s] = score;
      m = fmaxf(m, score);
    }
    if (mode == GateMode::joint) {
      float* gate_out = gates + t * k;
      for (int s = tid; s < k; s += nthreads) {
        const uint32_t id = entry_id(sorted[s]);
        const uint32_t r = id / static_cast<uint32_t>(nc);
        gate_out[s] = expf(__fadd_rn(vals_r[r], vals_c[id - r * nc]));
      }
    } else if (mode == GateMode::softmax) {
      // softmax over the K scores: max first, then the sum in a fixed order.
      m = block_max(m, sc->f32);
      const float shift = isfinite(m) ? m : 0.0f;
      float sum = 0.0f;
      for (int s = tid; s < k; s += nthreads) {
        const uint32_t id = entry_id(sorted[s]);
        const uint32_t r = id / static_cast<uint32_t>(nc);
        sum += expf(__fadd_rn(vals_r[r], vals_c[id - r * nc]) - shift);
      }
      const float inv = 1.0f / block_sum(sum, sc->f32);
      float* gate_out = gates + t * k;
      for (int s = tid; s < k; s += nthreads) {
        const uint32_t id = entry_id(sorted[s]);
        const uint32_t r = id / static_cast<uint32_t>(nc);
        gate_out[s] = expf(__fadd_rn(vals_r[r], vals_c[id - r * nc]) - shift) * inv;
      }
    }
    __syncthreads();  // the buffers are reused by the next token
  }
}


// ---------------------------------------------------------------------------------------------
// Small K (K + 1 <= 32 entries per axis, N_r and N_c <= 1024): one warp per token, keys in
// registers, no block barriers. Same algorithm; a token it cannot finish this way (more than
// kWarpCandidates candidates on an axis, or ties at tau that need the id order) is flagged and
// done by the block kernel afterwards.
// ---------------------------------------------------------------------------------------------

constexpr int kWarpMaxK = 31;
constexpr int kWarpMaxAxis = 1024;
constexpr int kWarpsPerCta = 4;
constexpr int kWarpCandidates = 64;

struct WarpBuffers {
  uint64_t cand[kWarpCandidates];
  uint64_t out[32];
  uint64_t sorted[32];
  float rv_r[32], rv_c[32];
  int rid_r[32], rid_c[32];
};

// The float a key stands for (NaN was ranked as -inf and -0 as +0: the rank value).
__device__ __forceinline__ float key_value(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

__device__ __forceinline__ unsigned lanes_below() {
  return (1u << (threadIdx.x & 31)) - 1u;
}

// The top l entries of an axis of n <= 32 * kItems values into rv / rid (sorted); false when
// more than kWarpCandidates keys reach the filter (ties): the token goes to the block kernel.
template <int kItems>
__device__ bool warp_axis_top(const float* __restrict__ g, int n, int l, uint64_t* cand,
                              float* rv, int* rid) {
  const int lane = threadIdx.x & 31;
  uint32_t key[kItems];
  uint32_t m = 0;
#pragma unroll
  for (int q = 0; q < kItems; ++q) {
    const int i = q * 32 + lane;
    key[q] = i < n ? order_key(__ldg(g + i)) : 0u;  // real keys are > 0
    m = max(m, key[q]);
  }
  // The l-th largest lane maximum bounds the l-th largest key from below (l <= 32 lanes).
  uint32_t t = 1;
  if (l < n) {
    t = 0;
    for (int bit = 31; bit >= 0; --bit) {
      const uint32_t c = t | (1u << bit);
      if (__popc(__ballot_sync(0xffffffffu, m >= c)) >= l) t = c;
    }
  }
  int local = 0;
#pragma unroll
  for (int q = 0; q < kItems; ++q) local += key[q] >= t;
  const int total = __reduce_add_sync(0xffffffffu, local);
  if (total > kWarpCandidates) return false;
  int base = 0;
#pragma unroll
  for (int q = 0; q < kItems; ++q) {
    const bool p = key[q] >= t;
    const unsigned mask = __ballot_sync(0xffffffffu, p);
    if (p) cand[base + __popc(mask & lanes_below())] = make_entry(key[q], q * 32 + lane);
    base += __popc(mask);
  }
  __syncwarp();
  for (int c = lane; c < total; c += 32) {
    const uint64_t e = cand[c];
    int r = 0;
    for (int c2 = 0; c2 < total; ++c2) r += cand[c2] < e;
    if (r < l) {
      rv[r] = key_value(~static_cast<uint32_t>(e >> 32));
      rid[r] = static_cast<int>(entry_id(e));
    }
  }
  __syncwarp();
  return true;
}

template <int kItems>
__global__ void __launch_bounds__(kWarpsPerCta * 32, 1)
    select_topk_warp_kernel(int nr, int nc, int k, int64_t tokens,
                            const float* __restrict__ row_logp,
                            const float* __restrict__ col_logp, int32_t* __restrict__ indices,
                            float* __restrict__ scores, float* __restrict__ gates,
                            GateMode mode, int* __restrict__ redo) {
  __shared__ WarpBuffers buffers[kWarpsPerCta];
  const int lane = threadIdx.x & 31;
  WarpBuffers& b = buffers[threadIdx.x >> 5];
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + (threadIdx.x >> 5);
  if (t >= tokens) return;
  const float* gr = row_logp + t * nr;
  const float* gc = col_logp + t * nc;
  const int lr = min(nr, k + 1), lc = min(nc, k + 1), ra = min(nr, k), rb = min(nc, k);
  bool ok = warp_axis_top<kItems>(gr, nr, lr, b.cand, b.rv_r, b.rid_r) &&
            warp_axis_top<kItems>(gc, nc, lc, b.cand, b.rv_c, b.rid_c);
  if (ok) {
    const uint32_t tau = search_tau(sum_key(b.rv_r[ra - 1], b.rv_c[rb - 1]),
                                    sum_key(b.rv_r[0], b.rv_c[0]), b.rv_r, ra, b.rv_c, rb, k,
                                    lane, 32, true, nullptr);
    // Row `lane`: columns [0, gi) above tau, [gi, gi + ei) at tau.
    int gi = 0, ei = 0;
    if (lane < ra) {
      gi = count_ge(b.rv_r[lane], b.rv_c, rb, tau + 1);
      ei = count_ge(b.rv_r[lane], b.rv_c, rb, tau) - gi;
    }
    const int count_gt = __reduce_add_sync(0xffffffffu, gi);
    const int count_eq = __reduce_add_sync(0xffffffffu, ei);
    const bool spill = (nr > ra && sum_key(b.rv_r[ra], b.rv_c[0]) >= tau) ||
                       (nc > rb && sum_key(b.rv_r[0], b.rv_c[rb]) >= tau);
    ok = !spill && count_eq == k - count_gt;  // else ties need the id order: block kernel
    if (ok) {
      const int mine = gi + ei;
      int first = mine;  // exclusive scan over the lanes
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int v = __shfl_up_sync(0xffffffffu, first, o);
        if (lane >= o) first += v;
      }
      first -= mine;
      for (int j = 0; j < mine; ++j) {
        b.out[first + j] = make_entry(sum_key(b.rv_r[lane], b.rv_c[j]),
                                      static_cast<uint32_t>(b.rid_r[lane]) * nc + b.rid_c[j]);
      }
      __syncwarp();
      if (lane < k) {
        const uint64_t e = b.out[lane];
        int r = 0;
        for (int q = 0; q < k; ++q) r += b.out[q] < e;
        b.sorted[r] = e;
      }
      __syncwarp();
      float score = -INFINITY;
      if (lane < k) {
        const uint32_t id = entry_id(b.sorted[lane]);
        const uint32_t r = id / static_cast<uint32_t>(nc);
        score = __fadd_rn(__ldg(gr + r), __ldg(gc + (id - r * nc)));
        indices[t * k + lane] = static_cast<int32_t>(id);
        scores[t * k + lane] = score;
      }
      if (mode == GateMode::joint) {
        if (lane < k) gates[t * k + lane] = expf(score);
      } else if (mode == GateMode::softmax) {
        const float m = warp_max(score);
        const float shift = isfinite(m) ? m : 0.0f;
        const float ex = lane < k ? expf(score - shift) : 0.0f;
        const float inv = 1.0f / warp_sum(ex);
        if (lane < k) gates[t * k + lane] = ex * inv;
      }
    }
  }
  if (lane == 0) redo[t] = ok ? 0 : 1;
}

// Warp per token for small K and axes; tokens it cannot finish (ties past its reach) are flagged
// and redone by the block kernel, so results are identical either way.
constexpr bool kWarpKernelEnabled = true;

bool use_warp_kernel(const LayerConfig& cfg) {
  return kWarpKernelEnabled && cfg.top_k <= kWarpMaxK && cfg.grid_rows <= kWarpMaxAxis &&
         cfg.grid_cols <= kWarpMaxAxis;
}

}  // namespace

// Workspace: the warp kernel's redo flags (int [T]), then the global per-CTA buffers.
size_t redo_bytes(const LayerConfig& cfg, int64_t tokens) {
  return use_warp_kernel(cfg) ? align16(static_cast<size_t>(tokens) * sizeof(int)) : 0;
}

size_t select_workspace_bytes(const LayerConfig& cfg, int64_t tokens) {
  if (tokens == 0) return 0;
  const SelectShape sh = make_select_shape(cfg);
  const size_t global = fits_shared(sh)
                            ? 0
                            : static_cast<size_t>(std::min<int64_t>(tokens, kGlobalCtas)) * sh.bytes;
  return redo_bytes(cfg, tokens) + global;
}

void launch_select(const LayerConfig& cfg, int64_t tokens, const float* row_logp,
                   const float* col_logp, int32_t* indices, float* scores, float* gates,
                   GateMode mode, void* workspace, cudaStream_t stream) {
  if (tokens == 0) return;
  const SelectShape sh = make_select_shape(cfg);
  const int* only = nullptr;  // the block kernel does every token, or the flagged ones
  unsigned block_grid = static_cast<unsigned>(tokens);
  if (use_warp_kernel(cfg)) {
    int* redo = static_cast<int*>(workspace);
    const unsigned grid = static_cast<unsigned>(ceil_div(tokens, kWarpsPerCta));
    const int n = std::max(sh.nr, sh.nc);
    auto launch = [&](auto kernel) {
      kernel<<<grid, kWarpsPerCta * 32, 0, stream>>>(sh.nr, sh.nc, sh.k, tokens, row_logp,
                                                    col_logp, indices, scores, gates, mode, redo);
    };
    if (n <= 128) launch(select_topk_warp_kernel<4>);
    else if (n <= 256) launch(select_topk_warp_kernel<8>);
    else if (n <= 512) launch(select_topk_warp_kernel<16>);
    else launch(select_topk_warp_kernel<32>);
    OMNIMOE_CUDA_CHECK_LAUNCH("router_select_topk (warp per token)");
    only = redo;
    // A persistent grid that skips unflagged tokens (a flag read each).
    int device = 0, sms = 0;
    OMNIMOE_CUDA_CHECK(cudaGetDevice(&device));
    OMNIMOE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    block_grid = static_cast<unsigned>(std::min<int64_t>(tokens, int64_t{8} * sms));
  }
  if (fits_shared(sh)) {
    if (sh.bytes > 48 * 1024) {
      OMNIMOE_CUDA_CHECK(cudaFuncSetAttribute(select_topk_kernel<true>,
                                              cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              static_cast<int>(sh.bytes)));
    }
    select_topk_kernel<true><<<block_grid, sh.threads, sh.bytes, stream>>>(
        sh, tokens, row_logp, col_logp, indices, scores, gates, mode, only, nullptr);
  } else {
    const int grid = static_cast<int>(std::min<int64_t>(tokens, kGlobalCtas));
    select_topk_kernel<false><<<grid, std::min(sh.threads, kGlobalThreads), 0, stream>>>(
        sh, tokens, row_logp, col_logp, indices, scores, gates, mode, only,
        static_cast<char*>(workspace) + redo_bytes(cfg, tokens));
  }
  OMNIMOE_CUDA_CHECK_LAUNCH("router_select_topk");
}

}  // namespace omnimoe::cuda::router_detail

namespace omnimoe::cuda {

size_t router_select_workspace_bytes(const LayerConfig& cfg, int64_t tokens) {
  return router_detail::select_workspace_bytes(cfg, tokens);
}

void router_select_topk(const LayerConfig& cfg, const TensorView& row_logp,
                        const TensorView& col_logp, const TensorView& indices,
                        const TensorView& scores, Buffer workspace, const Exec& exec) {
  DeviceGuard guard(exec);
  router_detail::launch_select(cfg, row_logp.shape[0], static_cast<const float*>(row_logp.data),
                               static_cast<const float*>(col_logp.data),
                               static_cast<int32_t*>(indices.data),
                               static_cast<float*>(scores.data), nullptr,
                               router_detail::GateMode::none, workspace.data, stream_of(exec));
}

}  // namespace omnimoe::cuda
