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
// For K <= 31 and axes of up to 1024 a warp per token does the work (below), and its CTA runs
// this block algorithm only on the tokens whose ties it cannot settle.
//
// Otherwise (when both kernels' buffers fit shared memory) a bucket kernel settles nearly every
// token first, and this block algorithm runs, in a second small launch, only on the tokens it
// flags in the workspace. The block algorithm's time went to its chain of about 60 barriers and
// 5 to 15 counting passes per token at one or two CTAs per SM; the bucket kernel keeps the
// chain short and runs several tokens per SM (CTAs of 128 threads up to K = 1024):
//  a. The axes as in 1; when N <= K for both and the buffers allow, one sort of both axes (the
//     axis in the id's top bit) instead of two.
//  b. No exact tau: a loose threshold lo with K <= count(lo) <= 2.5 K, usually from one counting
//     pass of 8 thresholds (one reduction; the first pass tries pairs (d, d) of the diagonal,
//     later ones interpolate on sqrt(count)). Row i counts at most K / (i + 1) columns: without
//     ties at tau the top K form a staircase, which lies inside that hyperbola.
//  c. The candidates (capped pairs >= lo) are walked twice in place, never stored: a histogram
//     of their keys, then a scatter of the buckets that reach slot K only; ranks within those
//     (small) buckets give the order by (key desc, id asc), so ties inside are settled too. An
//     entry goes to its output slot as soon as its rank is known: no buffer of the K ids, so
//     at K = 4096 four CTAs fit an SM instead of three (0.57 -> 0.49 ms at T = 4096, H100).
//  d. A token is flagged when a pair left out could tie with tau (past a row's cap or outside
//     the region), a bucket holds more than kMaxBucket entries, or no threshold is found in
//     kMaxPasses passes (heavy ties).
#include "backend/backend.h"
#include "core/env.h"
#include "cuda/router_common.cuh"
#include "cuda/router_select.cuh"
#include "cuda/router_warp_row.cuh"

#include <algorithm>
#include <type_traits>

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
constexpr int kLeftCtas = 256;  // grid of the block algorithm on the tokens the bucket kernel left

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
  RegionOffsets regions(16);
  s.o_scratch = regions.take(sizeof(Scratch));
  s.o_keys_r = regions.take(4ull * s.nr);
  s.o_keys_c = regions.take(4ull * s.nc);
  s.o_vals_r = regions.take(4ull * s.nr);
  s.o_vals_c = regions.take(4ull * s.nc);
  s.o_cand_r = regions.take(8ull * (s.cap_r + s.cap_c));  // one block: it doubles as the tie buffer
  s.o_cand_c = s.o_cand_r + 8ull * s.cap_r;
  s.o_rv_r = regions.take(4ull * s.lr);
  s.o_rid_r = regions.take(4ull * s.lr);
  s.o_rv_c = regions.take(4ull * s.lc);
  s.o_rid_c = regions.take(4ull * s.lc);
  s.o_g = regions.take(4ull * s.ra);
  s.o_e = regions.take(4ull * s.ra);
  s.o_gp = regions.take(4ull * (s.ra + 1));
  s.o_ep = regions.take(4ull * (s.ra + 1));
  s.o_out = regions.take(8ull * s.pk);
  s.o_tmp = regions.take(8ull * s.tmp_len);
  s.o_cnt = regions.take(4ull * (s.buckets + 1));
  s.bytes = regions.total();
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

// Maps a 32-bit value in [lo, hi] to one of nb buckets by the square of its distance from lo,
// monotonically. For the candidates (v = ~key, lo = ~top), whose number grows about linearly with
// the distance from the top, it makes the buckets near the threshold, where most of them lie,
// finer: fewer entries to rank against (about 5 instead of 9 per entry at K = 512 and 4096).
struct SquareBuckets {
  uint32_t lo;
  float scale;
  int nb;
  __device__ SquareBuckets(uint32_t lo_, uint32_t hi_, int nb_) : lo(lo_), nb(nb_) {
    const float range = static_cast<float>(hi_ - lo_) + 1.0f;
    scale = static_cast<float>(nb_) / (range * range);
  }
  __device__ __forceinline__ int operator()(uint32_t v) const {
    const float x = static_cast<float>(v - lo);
    return min(nb - 1, static_cast<int>(x * x * scale));
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

// The block algorithm for token t, its buffers at `base` (the sh.o_* offsets). Reads the token's
// log-probs first and ends with a barrier: the buffers can take the next token at once.
__device__ __forceinline__ void select_token_block(const SelectShape& sh, int64_t t,
                                                   const float* __restrict__ row_logp,
                                                   const float* __restrict__ col_logp,
                                                   int32_t* __restrict__ indices,
                                                   float* __restrict__ scores,
                                                   float* __restrict__ gates, GateMode mode,
                                                   char* base) {
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

  {
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

template <bool kShared>
__global__ void __launch_bounds__(kShared ? kMaxThreads : kGlobalThreads, kShared ? 2 : 1)
    select_topk_kernel(SelectShape sh, int64_t tokens, const float* __restrict__ row_logp,
                       const float* __restrict__ col_logp, int32_t* __restrict__ indices,
                       float* __restrict__ scores, float* __restrict__ gates, GateMode mode,
                       char* __restrict__ global_buffers, const int* __restrict__ left) {
  kernel_prologue();
  extern __shared__ __align__(16) char smem[];
  __shared__ unsigned left_mask[kMaxWarps];
  char* base = kShared ? smem : global_buffers + static_cast<size_t>(blockIdx.x) * sh.bytes;
  if (left == nullptr) {
    for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
      select_token_block(sh, t, row_logp, col_logp, indices, scores, gates, mode, base);
    }
    return;
  }
  // Only the tokens the bucket kernel left: this CTA's flags are read blockDim.x at a time.
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int64_t stride = gridDim.x;
  for (int64_t first = blockIdx.x; first < tokens; first += stride * blockDim.x) {
    const int64_t mine = first + threadIdx.x * stride;
    const unsigned m = __ballot_sync(0xffffffffu, mine < tokens && left[mine] != 0);
    if (lane == 0) left_mask[warp] = m;
    __syncthreads();
    for (int w = 0; w < warps; ++w) {
      for (unsigned bits = left_mask[w]; bits != 0; bits &= bits - 1) {  // CTA-uniform
        const int64_t t = first + (w * 32 + __ffs(bits) - 1) * stride;
        select_token_block(sh, t, row_logp, col_logp, indices, scores, gates, mode, base);
      }
    }
    __syncthreads();  // left_mask is written again
  }
}

// ---------------------------------------------------------------------------------------------
// The block algorithm's common case for K >= 32 (see the header): candidates above a loose
// threshold, one bucket pass, ranks within buckets. A token it cannot settle exactly is flagged
// and left to select_topk_kernel.
// ---------------------------------------------------------------------------------------------

constexpr int kPassThresholds = 8;  // thresholds counted per pass (one reduction)
constexpr int kMaxPasses = 8;

struct BucketShape {
  int nr, nc, k, threads;
  int lr, lc, ra, rb;
  uint32_t cap_r, cap_c;  // axis candidates, as SelectShape
  int cand_cap;           // candidates allowed above the threshold
  int nb;                 // their buckets
  bool whole;             // both axes sorted at once (sort_axes_whole)
  size_t o_scratch, o_red, o_keys_r, o_keys_c, o_vals_r, o_vals_c, o_rv_r, o_rid_r, o_rv_c, o_rid_c,
      o_g, o_gp, o_cnt, o_buf, o_tmp, bytes;
};

// For timing: OMNIMOE_ROUTER_BUCKET_THREADS = 128, 256 or 512 sets the bucket kernel's CTA size,
// OMNIMOE_ROUTER_BUCKET_CAP = c its candidates to c / 10 * K + 32 (c in 10 to 80; 25 default).
BucketShape make_bucket_shape(const SelectShape& s) {
  static const int env_threads =
      static_cast<int>(detail::env_int("OMNIMOE_ROUTER_BUCKET_THREADS", 128, 512));
  static const int env_cap = static_cast<int>(detail::env_int("OMNIMOE_ROUTER_BUCKET_CAP", 10, 80));
  BucketShape b{};
  b.nr = s.nr;
  b.nc = s.nc;
  b.k = s.k;
  // Measured on an H100: 128 threads (8 CTAs per SM) up to K = 1024; above, 256 (3 CTAs, by
  // shared memory) beat 512 (2 CTAs).
  b.threads = s.k <= 1024 ? 128 : 256;
  if (env_threads == 128 || env_threads == 256 || env_threads == 512) b.threads = env_threads;
  b.lr = s.lr;
  b.lc = s.lc;
  b.ra = s.ra;
  b.rb = s.rb;
  b.cap_r = s.cap_r;
  b.cap_c = s.cap_c;
  // Wide: one counting pass usually finds a threshold.
  b.cand_cap = static_cast<int>(
      std::min<int64_t>(INT32_MAX, int64_t{s.k} * (env_cap > 0 ? env_cap : 25) / 10 + 32));
  b.nb = static_cast<int>(bucket_count(static_cast<uint32_t>(s.k)));
  // sort_entries' capacities for one axis; both whole axes are sorted at once only where that
  // takes no more shared memory (more would cost CTAs per SM: slower at K = 512 on 320 x 320).
  const uint32_t both = static_cast<uint32_t>(s.nr + s.nc);
  const uint32_t axis_cap = std::max(s.cap_r, s.cap_c);
  const uint32_t cnt_len = std::max({static_cast<uint32_t>(b.nb),
                                     bucket_count(static_cast<uint32_t>(s.nr)),
                                     bucket_count(static_cast<uint32_t>(s.nc)),
                                     bucket_count(s.cap_r), bucket_count(s.cap_c)}) + 1;
  const size_t buf_len = std::max<size_t>(static_cast<size_t>(s.k) + kMaxBucket, axis_cap);
  // The axis sort's second buffer lies in buf behind the candidates when buf holds both (large
  // K: shared memory decides the CTAs per SM), else in a region of its own.
  b.whole = s.lr == s.nr && s.lc == s.nc && next_pow2(both) + both <= buf_len &&
            bucket_count(both) + 1 <= cnt_len;
  const size_t sort_cap = b.whole ? next_pow2(both) : axis_cap;
  const size_t tmp_len = b.whole ? both : axis_cap;
  const bool tmp_in_buf = sort_cap + tmp_len <= buf_len;
  RegionOffsets regions(16);
  b.o_scratch = regions.take(sizeof(Scratch));
  b.o_red = regions.take(4ull * 2 * (kPassThresholds + 1) * (b.threads / 32));
  b.o_keys_r = regions.take(4ull * s.nr);
  b.o_keys_c = regions.take(4ull * s.nc);
  b.o_vals_r = regions.take(4ull * s.nr);
  b.o_vals_c = regions.take(4ull * s.nc);
  b.o_rv_r = regions.take(4ull * s.lr);
  b.o_rid_r = regions.take(4ull * s.lr);
  b.o_rv_c = regions.take(4ull * s.lc);
  b.o_rid_c = regions.take(4ull * s.lc);
  b.o_g = regions.take(4ull * s.ra);
  b.o_gp = regions.take(4ull * (s.ra + 1));
  b.o_cnt = regions.take(4ull * cnt_len);
  b.o_buf = regions.take(8ull * buf_len);  // axis candidates, then the buckets reaching slot K
  b.o_tmp = tmp_in_buf ? b.o_buf + 8 * sort_cap : regions.take(8ull * tmp_len);
  b.bytes = regions.total();
  return b;
}

// Both axes whole (N <= K, so L = N): one sort of the nr + nc entries, the axis in the id's top
// bit, and a scan that splits them; half the barriers of two axis_top calls.
__device__ void sort_axes_whole(const float* vals_r, const uint32_t* keys_r, int nr,
                                const float* vals_c, const uint32_t* keys_c, int nc,
                                uint64_t* cand, uint64_t* tmp, int* cnt, float* rv_r, int* rid_r,
                                float* rv_c, int* rid_c, Scratch* sc) {
  constexpr uint32_t kColumn = 0x80000000u;
  const int tid = threadIdx.x, nthreads = blockDim.x, n = nr + nc;
  for (int i = tid; i < n; i += nthreads) {
    cand[i] = i < nr ? make_entry(keys_r[i], static_cast<uint32_t>(i))
                     : make_entry(keys_c[i - nr], kColumn | static_cast<uint32_t>(i - nr));
  }
  const uint64_t* sorted = sort_entries(cand, static_cast<uint32_t>(n), tmp, cnt, sc);
  // A row's rank = rows before it; a column's = its position - rows before it.
  const int per = (n + nthreads - 1) / nthreads;
  const int q0 = min(n, tid * per), q1 = min(n, q0 + per);
  int rows = 0;
  for (int q = q0; q < q1; ++q) rows += (entry_id(sorted[q]) & kColumn) == 0;
  int total;
  int r = block_exclusive_scan(rows, sc->i32, &total);
  for (int q = q0; q < q1; ++q) {
    const uint32_t id = entry_id(sorted[q]);
    if ((id & kColumn) == 0) {
      rv_r[r] = rank_value(vals_r[id]);
      rid_r[r] = static_cast<int>(id);
      ++r;
    } else {
      const uint32_t j = id & ~kColumn;
      rv_c[q - r] = rank_value(vals_c[j]);
      rid_c[q - r] = static_cast<int>(j);
    }
  }
  __syncthreads();
}

// For thresholds t[0] >= t[1] >= ...: c[m] = the region's pairs with key >= t[m], row i counting
// at most its first min(rb, k / (i + 1)) columns (the hyperbola that holds every top-K set
// without ties at tau); c[kPassThresholds] = the sum of those caps. Every thread gets c.
__device__ __forceinline__ void count_thresholds(const uint32_t (&t)[kPassThresholds],
                                                 const float* rv_r, const float* rv_c, int ra,
                                                 int rb, int k, bool all_rows,
                                                 int (&c)[kPassThresholds + 1], int* red,
                                                 int parity) {
  const int tid = threadIdx.x, nthreads = blockDim.x, lane = tid & 31, warp = tid >> 5;
  const int warps = nthreads >> 5;
  int local[kPassThresholds + 1];
#pragma unroll
  for (int m = 0; m <= kPassThresholds; ++m) local[m] = 0;
  for (int i = tid; i < ra; i += nthreads) {
    const float a = rv_r[i];
    const int cap = min(rb, k / (i + 1));  // >= 1
    local[kPassThresholds] += cap;
    if (sum_key(a, rv_c[0]) < t[kPassThresholds - 1]) {  // counts 0 at every threshold
      if (!all_rows) break;                              // sorted rows: the rest count 0 too
      continue;
    }
    // The searches side by side (independent loads in flight): pos[m] = the longest prefix of
    // the row's first cap columns with keys >= t[m].
    int pos[kPassThresholds];
#pragma unroll
    for (int m = 0; m < kPassThresholds; ++m) pos[m] = 0;
    for (int step = 1 << (31 - __clz(cap)); step > 0; step >>= 1) {
#pragma unroll
      for (int m = 0; m < kPassThresholds; ++m) {
        const int q = pos[m] + step;
        if (q <= cap && sum_key(a, rv_c[q - 1]) >= t[m]) pos[m] = q;
      }
    }
#pragma unroll
    for (int m = 0; m < kPassThresholds; ++m) local[m] += pos[m];
  }
  int* r = red + parity * (kPassThresholds + 1) * warps;
#pragma unroll
  for (int m = 0; m <= kPassThresholds; ++m) {
    const int v = warp_sum(local[m]);
    if (lane == 0) r[m * warps + warp] = v;
  }
  __syncthreads();  // the other parity's buffer may be written by the next pass
#pragma unroll
  for (int m = 0; m <= kPassThresholds; ++m) {
    int s = 0;
    for (int w = 0; w < warps; ++w) s += r[m * warps + w];
    c[m] = s;
  }
}

// Sorts t[0, kPassThresholds) descending (constant indices: the array stays in registers).
__device__ __forceinline__ void sort_descending(uint32_t (&t)[kPassThresholds]) {
#pragma unroll
  for (int p = 0; p < kPassThresholds; ++p) {
#pragma unroll
    for (int m = p & 1; m + 1 < kPassThresholds; m += 2) {
      const uint32_t x = t[m], y = t[m + 1];
      t[m] = max(x, y);
      t[m + 1] = min(x, y);
    }
  }
}

// Calls f(key, i, j) for the candidates s in [s0, s1): row i holds g[i] = gp[i + 1] - gp[i]
// of them, its first sorted columns.
template <typename F>
__device__ __forceinline__ void walk_candidates(const int* gp, int ra, const float* rv_r,
                                                const float* rv_c, int s0, int s1, F&& f) {
  if (s0 >= s1) return;
  int i = row_of(gp, ra, s0);
  int j = s0 - gp[i];
  int end = gp[i + 1];
  float a = rv_r[i];
  for (int s = s0; s < s1; ++s) {
    if (s == end) {  // the next non-empty row
      do {
        ++i;
        end = gp[i + 1];
      } while (end == s);
      j = 0;
      a = rv_r[i];
    }
    f(sum_key(a, rv_c[j]), i, j);
    ++j;
  }
}

template <int kThreads, int kMinCtas>
__global__ void __launch_bounds__(kThreads, kMinCtas)
    select_topk_bucket_kernel(const BucketShape sh, const float* __restrict__ row_logp,
                              const float* __restrict__ col_logp, int32_t* __restrict__ indices,
                              float* __restrict__ scores, float* __restrict__ gates,
                              GateMode mode, int* __restrict__ left) {
  kernel_prologue();
  extern __shared__ __align__(16) char base[];
  Scratch* sc = reinterpret_cast<Scratch*>(base + sh.o_scratch);
  int* red = reinterpret_cast<int*>(base + sh.o_red);
  uint32_t* keys_r = reinterpret_cast<uint32_t*>(base + sh.o_keys_r);
  uint32_t* keys_c = reinterpret_cast<uint32_t*>(base + sh.o_keys_c);
  float* vals_r = reinterpret_cast<float*>(base + sh.o_vals_r);
  float* vals_c = reinterpret_cast<float*>(base + sh.o_vals_c);
  float* rv_r = reinterpret_cast<float*>(base + sh.o_rv_r);
  int* rid_r = reinterpret_cast<int*>(base + sh.o_rid_r);
  float* rv_c = reinterpret_cast<float*>(base + sh.o_rv_c);
  int* rid_c = reinterpret_cast<int*>(base + sh.o_rid_c);
  int* g = reinterpret_cast<int*>(base + sh.o_g);
  int* gp = reinterpret_cast<int*>(base + sh.o_gp);
  int* cnt = reinterpret_cast<int*>(base + sh.o_cnt);
  uint64_t* buf = reinterpret_cast<uint64_t*>(base + sh.o_buf);
  uint64_t* axis_tmp = reinterpret_cast<uint64_t*>(base + sh.o_tmp);

  const int tid = threadIdx.x, nthreads = kThreads;
  const int nr = sh.nr, nc = sh.nc, k = sh.k, ra = sh.ra, rb = sh.rb;
  const int64_t t = blockIdx.x;

  load_axis(row_logp + t * nr, nr, vals_r, keys_r);
  load_axis(col_logp + t * nc, nc, vals_c, keys_c);
  __syncthreads();
  if (sh.whole) {
    sort_axes_whole(vals_r, keys_r, nr, vals_c, keys_c, nc, buf, axis_tmp, cnt, rv_r, rid_r,
                    rv_c, rid_c, sc);
  } else {
    axis_top(vals_r, keys_r, nr, sh.lr, buf, sh.cap_r, axis_tmp, cnt, rv_r, rid_r, sc);
    axis_top(vals_c, keys_c, nc, sh.lc, buf, sh.cap_c, axis_tmp, cnt, rv_c, rid_c, sc);
  }

  // 1. A threshold lo with K <= (capped pairs >= lo) <= cand_cap. Invariants: count(lo) >= K,
  //    count(hi) < K. The first pass tries keys of pairs (d, d) on the diagonal, squares of 0.15 K
  //    to 0.9 K (the top-K staircase covers one of them); later ones interpolate on sqrt(count).
  uint32_t lo = sum_key(rv_r[ra - 1], rv_c[rb - 1]);
  const uint32_t top = sum_key(rv_r[0], rv_c[0]);
  uint32_t hi = top + 1;
  long long c_lo = static_cast<long long>(ra) * rb;  // exact after the first pass
  int c_hi = 0;
  bool settled = true;
  for (int pass = 0; c_lo > sh.cand_cap; ++pass) {
    if (pass == kMaxPasses || hi - lo <= 1) {
      settled = false;
      break;
    }
    uint32_t th[kPassThresholds];
    if (pass == 0) {
      constexpr float kArea[kPassThresholds] = {0.15f, 0.2f, 0.26f, 0.33f,
                                                0.42f, 0.53f, 0.68f, 0.9f};
#pragma unroll
      for (int m = 0; m < kPassThresholds; ++m) {
        const float area = kArea[m] * static_cast<float>(k);
        const int i = min(ra - 1, max(0, static_cast<int>(sqrtf(area * ra / rb)) - 1));
        const int j = min(rb - 1, max(0, static_cast<int>(area / (i + 1)) - 1));
        th[m] = sum_key(rv_r[i], rv_c[j]);
      }
    } else {
      constexpr double kTarget[kPassThresholds - 2] = {1.05, 1.2, 1.4, 1.65, 1.9, 2.2};
      const double width = static_cast<double>(hi - lo);
      const double s_lo = sqrt(static_cast<double>(c_lo)), s_hi = sqrt(static_cast<double>(c_hi));
#pragma unroll
      for (int m = 0; m < kPassThresholds - 2; ++m) {
        const double f = (s_lo - sqrt(kTarget[m] * k)) / (s_lo - s_hi);
        const double step = fmin(fmax(f * width, 1.0), width - 1.0);
        th[m] = lo + static_cast<uint32_t>(step);
      }
      // Plain splits of the interval: progress where the model is poor (ties, gaps).
      th[kPassThresholds - 2] = lo + static_cast<uint32_t>(width / 3.0);
      th[kPassThresholds - 1] = lo + static_cast<uint32_t>(2.0 * width / 3.0);
    }
    sort_descending(th);
    int c[kPassThresholds + 1];
    count_thresholds(th, rv_r, rv_c, ra, rb, k, pass == 0, c, red, pass & 1);
    if (pass == 0) c_lo = c[kPassThresholds];
#pragma unroll
    for (int m = 0; m < kPassThresholds; ++m) {
      if (c[m] >= k) {
        if (th[m] > lo) {
          lo = th[m];
          c_lo = c[m];
        }
      } else if (th[m] < hi) {
        hi = th[m];
        c_hi = c[m];
      }
    }
  }

  const int nb = sh.nb;
  int n_cand = 0, boundary = 0, filled = 0;
  int32_t* idx_out = indices + t * k;
  float* score_out = scores + t * k;
  float m = -INFINITY;                        // the largest score this thread wrote
  const SquareBuckets bucket(~top, ~lo, nb);  // over ~key: bucket order is the output order
  if (settled) {
    // 2. The candidates: row i's first g[i] sorted columns (capped pairs >= lo).
    for (int i = tid; i < ra; i += nthreads) {
      g[i] = sum_key(rv_r[i], rv_c[0]) < lo ? 0 : count_ge(rv_r[i], rv_c, min(rb, k / (i + 1)), lo);
    }
    for (int b = tid; b <= nb; b += nthreads) cnt[b] = 0;
    __syncthreads();
    block_prefix(g, ra, gp, sc);
    n_cand = gp[ra];
    const int chunk = (n_cand + nthreads - 1) / nthreads;
    const int s0 = min(n_cand, tid * chunk), s1 = min(n_cand, s0 + chunk);
    walk_candidates(gp, ra, rv_r, rv_c, s0, s1,
                    [&](uint32_t key, int, int) { atomicAdd(cnt + bucket(~key), 1); });
    __syncthreads();
    block_prefix(cnt, nb, cnt, sc);  // cnt[b] = first slot of bucket b
    // 3. The buckets up to the one holding slot K - 1: scattered, then ranked within.
    int b_lo = 0, b_hi = nb - 1;
    while (b_lo < b_hi) {
      const int mid = (b_lo + b_hi + 1) >> 1;
      if (cnt[mid] <= k - 1) b_lo = mid;
      else b_hi = mid - 1;
    }
    boundary = b_lo;
    filled = cnt[boundary + 1];
    bool big = false;
    for (int b = tid; b <= boundary; b += nthreads) big |= cnt[b + 1] - cnt[b] > kMaxBucket;
    settled = !__syncthreads_or(big);
  }
  if (settled) {
    const int chunk = (n_cand + nthreads - 1) / nthreads;
    const int s0 = min(n_cand, tid * chunk), s1 = min(n_cand, s0 + chunk);
    walk_candidates(gp, ra, rv_r, rv_c, s0, s1, [&](uint32_t key, int i, int j) {
      const int b = bucket(~key);
      if (b <= boundary) {
        buf[atomicAdd(cnt + b, 1)] =
            make_entry(key, static_cast<uint32_t>(rid_r[i]) * nc + static_cast<uint32_t>(rid_c[j]));
      }
    });
    __syncthreads();  // now cnt[b] = end of bucket b = first slot of bucket b + 1 (b <= boundary)
    // Each entry's rank in its bucket is its output slot: written there directly (a token left
    // to the block algorithm is written again, whole, by it).
    for (int q = tid; q < filled; q += nthreads) {
      const uint64_t e = buf[q];
      const int b = bucket(static_cast<uint32_t>(e >> 32));
      const int first = b == 0 ? 0 : cnt[b - 1], last = cnt[b];
      int r = 0;
      for (int q2 = first; q2 < last; ++q2) r += buf[q2] < e;
      const int pos = first + r;
      if (pos < k) {
        const uint32_t id = entry_id(e);
        const uint32_t row = id / static_cast<uint32_t>(nc);
        const float score = __fadd_rn(vals_r[row], vals_c[id - row * nc]);
        idx_out[pos] = static_cast<int32_t>(id);
        score_out[pos] = score;
        if (mode == GateMode::joint) gates[t * k + pos] = expf(score);
        m = fmaxf(m, score);
      }
      if (pos == k - 1) sc->tau = ~static_cast<uint32_t>(e >> 32);
    }
    __syncthreads();  // also makes the scores written above visible to the whole block
    // 4. Exact unless a pair left out ties with tau: past a row's cap (inside the region), or
    //    outside the region.
    const uint32_t tau = sc->tau;
    bool out = false;
    for (int i = tid; i < ra; i += nthreads) {
      const int cap = min(rb, k / (i + 1));
      out |= cap < rb && sum_key(rv_r[i], rv_c[cap]) >= tau;
    }
    if (tid == 0) {
      out |= (nr > ra && sum_key(rv_r[ra], rv_c[0]) >= tau) ||
             (nc > rb && sum_key(rv_r[0], rv_c[rb]) >= tau);
    }
    settled = !__syncthreads_or(out);
  }
  if (tid == 0) left[t] = settled ? 0 : 1;
  if (!settled || mode != GateMode::softmax) return;

  // Softmax over the K scores, read back in slot order (as written above, so the sum's order is
  // fixed).
  m = block_max(m, sc->f32);
  const float shift = isfinite(m) ? m : 0.0f;
  float sum = 0.0f;
  for (int s = tid; s < k; s += nthreads) sum += expf(score_out[s] - shift);
  const float inv = 1.0f / block_sum(sum, sc->f32);
  float* gate_out = gates + t * k;
  for (int s = tid; s < k; s += nthreads) gate_out[s] = expf(score_out[s] - shift) * inv;
}

// The block algorithm called from the warp kernels for the rare token they leave (ties): kept
// out of line, so that the warp kernels stay small.
__device__ __noinline__ void select_token_fallback(const SelectShape& sh, int64_t t,
                                                   const float* row_logp, const float* col_logp,
                                                   int32_t* indices, float* scores, float* gates,
                                                   GateMode mode, char* base) {
  select_token_block(sh, t, row_logp, col_logp, indices, scores, gates, mode, base);
}


// ---------------------------------------------------------------------------------------------
// Small K (K <= 31, N_r and N_c <= 1024): one warp per token, the rows in registers.
//  1. Per axis, the top L = K + 1 entries: the L-th largest lane maximum (for L > 16, of the
//     lanes' two largest values) bounds the L-th largest value from below; the few values at or
//     above it are ranked in shared memory.
//  2. The pairs of sorted ranks (i, j) with (i + 1)(j + 1) <= K (the staircase, about K ln K
//     pairs) are ranked by (score desc, id asc). Without ties every pair of the top K is there:
//     the pairs it dominates score at least as much and are also in the top K.
//  3. The first K are the answer when the (K+1)-th of the staircase scores below the K-th (tau)
//     and no pair just outside it (i, floor(K / (i + 1))), which dominates every pair outside,
//     reaches tau. Otherwise (ties whose id order decides), or with more than kWarpCandidates
//     values at the bound of an axis, the CTA runs the block algorithm on the token.
// The fused variant first normalises the logits in place (batch norm), then takes log_softmax.
// ---------------------------------------------------------------------------------------------

constexpr int kWarpMaxK = 31;
constexpr int kWarpMaxAxis = 1024;
constexpr int kWarpsPerCta = 4;  // 128 threads: also the block algorithm's count for K <= 64
constexpr int kWarpCandidates = 64;
constexpr int kStairSlots = 4;  // staircase pairs per lane: sum_{i <= 31} floor(31 / i) = 113
constexpr unsigned kFull = 0xffffffffu;

struct WarpBuffers {
  union {
    struct {
      uint64_t cand[2][kWarpCandidates];  // per axis: (key, index) at or above the bound
      float cand_val[2][kWarpCandidates];  // their log-probs
    } axis;
    struct {
      uint64_t entry[32 * kStairSlots];  // (pair key, expert id)
      float score[32 * kStairSlots];
    } stair;
  };
  float list_rank[2][32];  // per axis, by sorted rank: the ranked value (NaN as -inf)
  float list_val[2][32];   // the log-prob
  int list_id[2][32];      // the index
  uint64_t sorted[32];     // the staircase's first K + 1 entries, in order
  float sorted_score[32];
};

// The float a key stands for (NaN was ranked as -inf and -0 as +0: the rank value).
__device__ __forceinline__ float key_value(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}
__device__ __forceinline__ uint32_t entry_key(uint64_t e) {
  return ~static_cast<uint32_t>(e >> 32);
}

// Ranks of the entries e[0, kSlots) among buf[0, n) (entries are distinct).
template <int kSlots>
__device__ __forceinline__ void count_below(const uint64_t* buf, int n, const uint64_t (&e)[4],
                                            int (&r)[4]) {
  for (int c = 0; c < n; ++c) {
    const uint64_t o = buf[c];
#pragma unroll
    for (int s = 0; s < kSlots; ++s) r[s] += o < e[s];
  }
}

// The candidates of one axis from its log-probs v (NaN past the row of n): the values at or above
// the l-th largest lane maximum, appended to cand / cand_val as (key, index) entries when there
// are at most kWarpCandidates. Returns their number. The few appended are read again from
// memory, v = row[i] - shift as v was made, so that v need not stay in registers.
template <int kItems, bool kVec>
__device__ __forceinline__ int axis_candidates(const float (&v)[kItems], const float* row,
                                               float shift, int n, int l, uint64_t* cand,
                                               float* cand_val) {
  using Row = WarpRow<kItems, kVec>;
  const int lane = threadIdx.x & 31;
  float x = -INFINITY;
#pragma unroll
  for (int q = 0; q < kItems; ++q) x = fmaxf(x, v[q]);  // NaN skipped: it ranks as -inf
  float thr = -INFINITY;  // -inf: every entry of the row
  if (l < n && l <= 16) {
    // The l-th largest lane maximum, by a bitonic sort of the maxima (descending).
#pragma unroll
    for (int size = 2; size <= 32; size <<= 1) {
#pragma unroll
      for (int stride = size >> 1; stride > 0; stride >>= 1) {
        const float y = __shfl_xor_sync(kFull, x, stride);
        x = ((lane & stride) == 0) == ((lane & size) == 0) ? fmaxf(x, y) : fminf(x, y);
      }
    }
    thr = __shfl_sync(kFull, x, l - 1);
  } else if (l < n) {
    // For l > 16 the l-th lane maximum is too low a bound (near the smallest maximum): the l-th
    // largest of the lanes' two largest values instead, by a bitwise search over their keys. A
    // lane's second value is -inf when it has no second (a bound of -inf takes every entry).
    float m1 = -INFINITY, m2 = -INFINITY;
#pragma unroll
    for (int q = 0; q < kItems; ++q) {
      const float w = v[q] != v[q] ? -INFINITY : v[q];  // NaN (and past the row) as -inf
      m2 = fmaxf(m2, fminf(m1, w));
      m1 = fmaxf(m1, w);
    }
    const uint32_t k1 = order_key(m1), k2 = order_key(m2);
    uint32_t key = 0;
    for (int bit = 31; bit >= 0; --bit) {
      const uint32_t c = key | (1u << bit);
      const int at_least =
          __popc(__ballot_sync(kFull, k1 >= c)) + __popc(__ballot_sync(kFull, k2 >= c));
      if (at_least >= l) key = c;
    }
    thr = key_value(key);
  }
  const bool all = thr == -INFINITY;
  uint32_t mask = 0;  // this lane's items at the bound
#pragma unroll
  for (int q = 0; q < kItems; ++q) {
    const bool p = all ? Row::valid(q, lane, n) : v[q] >= thr;  // NaN past the row fails >=
    mask |= static_cast<uint32_t>(p) << q;
  }
  const int mine = __popc(mask);
  const int total = __reduce_add_sync(kFull, mine);
  if (total > kWarpCandidates) return total;
  int end = mine;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(kFull, end, o);
    if (lane >= o) end += y;
  }
  int pos = end - mine;
  while (mask != 0) {
    const int q = __ffs(mask) - 1;
    mask &= mask - 1;
    const int i = Row::index(q, lane);
    const float x = row[i] - shift;
    cand[pos] = make_entry(order_key(x), static_cast<uint32_t>(i));
    cand_val[pos] = x;
    ++pos;
  }
  return total;
}

// The selection of one token from both axes' candidates in b (at most kWarpCandidates each).
// False, with nothing written, when the block algorithm must decide.
__device__ __forceinline__ bool warp_select_pairs(int nr, int nc, int k, int total_r, int total_c,
                                                  int64_t t, WarpBuffers& b,
                                                  int32_t* __restrict__ indices,
                                                  float* __restrict__ scores,
                                                  float* __restrict__ gates, GateMode mode) {
  const int lane = threadIdx.x & 31;
  const int total[2] = {total_r, total_c};
  const int l[2] = {min(nr, k + 1), min(nc, k + 1)};
  __syncwarp();  // the candidates are in shared memory

  // 1. Per axis the top l candidates by rank: the sorted lists.
#pragma unroll
  for (int a = 0; a < 2; ++a) {
    const uint64_t* cand = b.axis.cand[a];
    uint64_t e[4] = {lane < total[a] ? cand[lane] : kPadEntry,
                     lane + 32 < total[a] ? cand[lane + 32] : kPadEntry, kPadEntry, kPadEntry};
    int r[4] = {0, 0, 0, 0};
    count_below<2>(cand, total[a], e, r);
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      if (e[s] != kPadEntry && r[s] < l[a]) {
        b.list_rank[a][r[s]] = key_value(entry_key(e[s]));
        b.list_val[a][r[s]] = b.axis.cand_val[a][lane + 32 * s];
        b.list_id[a][r[s]] = static_cast<int>(entry_id(e[s]));
      }
    }
  }
  __syncwarp();  // the lists are complete; the candidates' space takes the staircase
  float rank[2], val[2];
  int id[2];
#pragma unroll
  for (int a = 0; a < 2; ++a) {
    const bool in = lane < l[a];
    rank[a] = in ? b.list_rank[a][lane] : -INFINITY;
    val[a] = in ? b.list_val[a][lane] : 0.0f;
    id[a] = in ? b.list_id[a][lane] : 0;
  }

  // 2. The staircase: row i (lane i) holds its first min(N_c, K / (i + 1)) columns.
  const int ra = min(nr, k);
  const int width = lane < ra ? min(nc, k / (lane + 1)) : 0;
  int end = width;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(kFull, end, o);
    if (lane >= o) end += y;
  }
  const int start = end - width;
  const int count = __shfl_sync(kFull, end, 31);
  uint64_t e[4];
  float sc[4];
#pragma unroll
  for (int s = 0; s < kStairSlots; ++s) {
    e[s] = kPadEntry;
    sc[s] = 0.0f;
    if (s * 32 < count) {  // warp-uniform
      const int c = s * 32 + lane;
      int i = 0;  // the last row starting at or before c
#pragma unroll
      for (int step = 16; step > 0; step >>= 1) {
        if (__shfl_sync(kFull, start, i + step) <= c) i += step;
      }
      const int j = (c - __shfl_sync(kFull, start, i)) & 31;
      const float kr = __shfl_sync(kFull, rank[0], i), kc = __shfl_sync(kFull, rank[1], j);
      const float vr = __shfl_sync(kFull, val[0], i), vc = __shfl_sync(kFull, val[1], j);
      const int ir = __shfl_sync(kFull, id[0], i), ic = __shfl_sync(kFull, id[1], j);
      if (c < count) {
        e[s] = make_entry(sum_key(kr, kc),
                          static_cast<uint32_t>(ir) * static_cast<uint32_t>(nc) +
                              static_cast<uint32_t>(ic));
        sc[s] = __fadd_rn(vr, vc);
      }
      b.stair.entry[c] = e[s];
      b.stair.score[c] = sc[s];
    }
  }
  __syncwarp();
  int r[4] = {0, 0, 0, 0};
  if (count <= 64) {
    count_below<2>(b.stair.entry, count, e, r);
  } else {
    count_below<4>(b.stair.entry, count, e, r);
  }
#pragma unroll
  for (int s = 0; s < kStairSlots; ++s) {
    if (e[s] != kPadEntry && r[s] <= k) {
      b.sorted[r[s]] = e[s];
      b.sorted_score[r[s]] = sc[s];
    }
  }
  __syncwarp();

  // 3. Exact unless a tie at tau could reach outside the first K.
  const uint32_t tau = entry_key(b.sorted[k - 1]);
  const bool tie = count > k && entry_key(b.sorted[k]) == tau;
  const int fj = k / (lane + 1);  // row `lane`'s first column outside the staircase
  const float fc = __shfl_sync(kFull, rank[1], fj & 31);
  const bool reach = lane <= min(k, nr - 1) && fj < nc && sum_key(rank[0], fc) >= tau;
  if (__any_sync(kFull, tie || reach)) return false;

  float score = -INFINITY;
  if (lane < k) {
    score = b.sorted_score[lane];
    indices[t * k + lane] = static_cast<int32_t>(entry_id(b.sorted[lane]));
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
  return true;
}

struct WarpSelectArgs {
  SelectShape sh;  // the block algorithm's buffers, for the tokens the warps leave
  int64_t tokens;
  const float* row_logp;  // plain: the log-probs [T, N_r]; fused: where the left tokens' go
  const float* col_logp;
  float* row_logits;  // fused: the logits [T, N_r], normalised in place
  float* col_logits;
  const float* stats;  // fused, batch norm: NormStats layout (mean_hi, mean_lo, rstd)
  int32_t* indices;
  float* scores;
  float* gates;
  GateMode mode;
};

// Dynamic shared memory of the warp kernels: the warps' buffers, which the block algorithm's
// take over after the barrier.
size_t warp_kernel_smem(const SelectShape& sh) {
  return std::max(sh.bytes, kWarpsPerCta * sizeof(WarpBuffers));
}

template <int kItems, bool kVec, bool kFused, int kMinCtas>
__global__ void __launch_bounds__(kWarpsPerCta * 32, kMinCtas)
    select_topk_warp_kernel(const __grid_constant__ WarpSelectArgs args) {
  kernel_prologue();
  extern __shared__ __align__(16) char smem[];
  __shared__ int left[kWarpsPerCta];
  using Row = WarpRow<kItems, kVec>;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  WarpBuffers& b = reinterpret_cast<WarpBuffers*>(smem)[warp];
  const int nr = args.sh.nr, nc = args.sh.nc, k = args.sh.k, columns = nr + nc;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + warp;
  bool done = true;
  if (t < args.tokens) {
    int total_r = 0, total_c = 0;
    float lse_r = 0.0f, lse_c = 0.0f;
    // One axis at a time: a row's values are the largest part of the registers.
#pragma unroll 1
    for (int a = 0; a < 2; ++a) {
      const int n = a == 0 ? nr : nc;
      float v[kItems];
      float lse = 0.0f;
      const float* row;  // where v comes from: v = row - lse
      if constexpr (kFused) {
        float* z = a == 0 ? args.row_logits + t * nr : args.col_logits + t * nc;
        row = z;
        Row::load(z, n, lane, v);
        if (args.stats != nullptr) {
          const float* s = args.stats + (a == 0 ? 0 : nr);
          Row::normalise(v, n, lane, s, s + columns, s + 2 * columns);
          Row::store(z, n, lane, v);
        }
        lse = Row::log_sum_exp(v, n, lane);
#pragma unroll
        for (int q = 0; q < kItems; ++q) v[q] -= lse;  // NaN past the row stays NaN
      } else {
        row = a == 0 ? args.row_logp + t * nr : args.col_logp + t * nc;
        Row::load(row, n, lane, v);
      }
      const int total = axis_candidates<kItems, kVec>(v, row, lse, n, min(n, k + 1),
                                                      b.axis.cand[a], b.axis.cand_val[a]);
      if (a == 0) {
        total_r = total;
        lse_r = lse;
      } else {
        total_c = total;
        lse_c = lse;
      }
    }
    done = total_r <= kWarpCandidates && total_c <= kWarpCandidates &&
           warp_select_pairs(nr, nc, k, total_r, total_c, t, b, args.indices, args.scores,
                             args.gates, args.mode);
    if (kFused && !done) {  // the block algorithm reads log-probs from memory: the same z - lse
#pragma unroll 1
      for (int a = 0; a < 2; ++a) {
        const int n = a == 0 ? nr : nc;
        const float lse = a == 0 ? lse_r : lse_c;
        float z[kItems];
        Row::load(a == 0 ? args.row_logits + t * nr : args.col_logits + t * nc, n, lane, z);
#pragma unroll
        for (int q = 0; q < kItems; ++q) z[q] -= lse;
        Row::store(const_cast<float*>(a == 0 ? args.row_logp + t * nr : args.col_logp + t * nc),
                   n, lane, z);
      }
    }
  }
  if (lane == 0) left[warp] = done ? 0 : 1;
  __syncthreads();  // every warp is done with its buffers: the block algorithm may take them
  for (int w = 0; w < kWarpsPerCta; ++w) {
    if (left[w] != 0) {  // CTA-uniform
      select_token_fallback(args.sh, static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + w,
                            args.row_logp, args.col_logp, args.indices, args.scores, args.gates,
                            args.mode, smem);
    }
  }
}

// The bucket kernel runs where the block algorithm's buffers fit shared memory (it leaves tokens
// to that kernel) and its own do too.
bool use_bucket_kernel(const SelectShape& sh) {
  return fits_shared(sh) && make_bucket_shape(sh).bytes <= kSharedBudget;
}

bool use_warp_kernel(const LayerConfig& cfg) {
  return cfg.top_k <= kWarpMaxK && cfg.grid_rows <= kWarpMaxAxis &&
         cfg.grid_cols <= kWarpMaxAxis;
}

// CTAs per SM the warp kernels are compiled for (the register cap). 16 and 32 values per lane:
// 6 (80 registers), or 4 (128) or 5 (96) with OMNIMOE_ROUTER_WARP_CTAS=4 or 5. 4 and 8 values:
// 8 (64 registers: T = 4096 tokens fit one wave of 132 SMs, where 6 left a second), or 4
// with OMNIMOE_ROUTER_WARP_CTAS=4 (the earlier build), for timing.
int warp_ctas_per_sm() {
  static const int ctas = [] {
    const int64_t n = detail::env_int("OMNIMOE_ROUTER_WARP_CTAS", 4, 5);
    return n != 0 ? static_cast<int>(n) : 6;
  }();
  return ctas;
}

template <bool kFused>
void launch_warp_select(const WarpSelectArgs& args, bool vec, cudaStream_t stream) {
  const SelectShape& sh = args.sh;
  const unsigned grid = static_cast<unsigned>(ceil_div(args.tokens, kWarpsPerCta));
  auto launch = [&](auto kernel) {
    const size_t smem = warp_kernel_smem(sh);
    if (smem > 48 * 1024) {
      OMNIMOE_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              static_cast<int>(smem)));
    }
    launch_kernel(kFused ? "router_forward (normalise, log_softmax, select)"
                         : "router_select_topk (warp per token)",
                  kernel, dim3(grid), dim3(kWarpsPerCta * 32), smem, stream, args);
  };
  auto launch_items = [&](auto vec_tag) {
    constexpr bool kVec = decltype(vec_tag)::value;
    const int items = warp_row_items(std::max(sh.nr, sh.nc));
    const int ctas = warp_ctas_per_sm();
    if (items == 4 && ctas == 4) launch(select_topk_warp_kernel<4, kVec, kFused, 4>);
    else if (items == 4) launch(select_topk_warp_kernel<4, kVec, kFused, 8>);
    else if (items == 8 && ctas == 4) launch(select_topk_warp_kernel<8, kVec, kFused, 4>);
    else if (items == 8) launch(select_topk_warp_kernel<8, kVec, kFused, 8>);
    else if (items == 16 && ctas == 4) launch(select_topk_warp_kernel<16, kVec, kFused, 4>);
    else if (items == 16 && ctas == 5) launch(select_topk_warp_kernel<16, kVec, kFused, 5>);
    else if (items == 16) launch(select_topk_warp_kernel<16, kVec, kFused, 6>);
    else if (ctas == 4) launch(select_topk_warp_kernel<32, kVec, kFused, 4>);
    else if (ctas == 5) launch(select_topk_warp_kernel<32, kVec, kFused, 5>);
    else launch(select_topk_warp_kernel<32, kVec, kFused, 6>);
  };
  if (vec) {
    launch_items(std::true_type{});
  } else {
    launch_items(std::false_type{});
  }
}

// 16-byte rows: every lane holds values of both axes (N >= 128) and the rows are aligned.
bool warp_vector_rows(const SelectShape& sh, const void* a, const void* b) {
  return sh.nr >= 128 && sh.nc >= 128 && vector_rows(a, sh.nr) && vector_rows(b, sh.nc);
}

}  // namespace

size_t select_workspace_bytes(const LayerConfig& cfg, int64_t tokens) {
  if (tokens == 0 || use_warp_kernel(cfg)) return 0;
  const SelectShape sh = make_select_shape(cfg);
  if (use_bucket_kernel(sh)) return static_cast<size_t>(tokens) * sizeof(int);  // tokens left
  return fits_shared(sh) ? 0
                         : static_cast<size_t>(std::min<int64_t>(tokens, kGlobalCtas)) * sh.bytes;
}

bool select_fuses_normalise(const LayerConfig& cfg) { return use_warp_kernel(cfg); }

void launch_normalise_select(const LayerConfig& cfg, int64_t tokens, float* row_logits,
                             float* col_logits, const float* stats, float* row_logp,
                             float* col_logp, int32_t* indices, float* scores, float* gates,
                             GateMode mode, cudaStream_t stream) {
  if (tokens == 0) return;
  WarpSelectArgs args{};
  args.sh = make_select_shape(cfg);
  args.tokens = tokens;
  args.row_logp = row_logp;
  args.col_logp = col_logp;
  args.row_logits = row_logits;
  args.col_logits = col_logits;
  args.stats = stats;
  args.indices = indices;
  args.scores = scores;
  args.gates = gates;
  args.mode = mode;
  const bool vec = warp_vector_rows(args.sh, row_logits, col_logits) &&
                   warp_vector_rows(args.sh, row_logp, col_logp);
  launch_warp_select<true>(args, vec, stream);
}

void launch_select(const LayerConfig& cfg, int64_t tokens, const float* row_logp,
                   const float* col_logp, int32_t* indices, float* scores, float* gates,
                   GateMode mode, void* workspace, cudaStream_t stream) {
  if (tokens == 0) return;
  const SelectShape sh = make_select_shape(cfg);
  if (use_warp_kernel(cfg)) {
    WarpSelectArgs args{};
    args.sh = sh;
    args.tokens = tokens;
    args.row_logp = row_logp;
    args.col_logp = col_logp;
    args.indices = indices;
    args.scores = scores;
    args.gates = gates;
    args.mode = mode;
    launch_warp_select<false>(args, warp_vector_rows(sh, row_logp, col_logp), stream);
    return;
  }
  if (fits_shared(sh)) {
    int* left = nullptr;
    unsigned grid = static_cast<unsigned>(tokens);
    if (use_bucket_kernel(sh)) {
      const BucketShape bs = make_bucket_shape(sh);
      left = static_cast<int*>(workspace);
      auto launch = [&](auto kernel) {
        // Tokens in flight hide the per-token chain of barriers: as many CTAs as shared memory
        // allows.
        OMNIMOE_CUDA_CHECK(cudaFuncSetAttribute(kernel,
                                                cudaFuncAttributePreferredSharedMemoryCarveout,
                                                cudaSharedmemCarveoutMaxShared));
        if (bs.bytes > 48 * 1024) {
          OMNIMOE_CUDA_CHECK(cudaFuncSetAttribute(
              kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bs.bytes)));
        }
        launch_kernel("router_select_topk (buckets)", kernel, dim3(static_cast<unsigned>(tokens)),
                      dim3(bs.threads), bs.bytes, stream, bs, row_logp, col_logp, indices, scores,
                      gates, mode, left);
      };
      if (bs.threads == 128) launch(select_topk_bucket_kernel<128, 8>);
      else if (bs.threads == 256) launch(select_topk_bucket_kernel<256, 4>);
      else launch(select_topk_bucket_kernel<512, 2>);
      // The few tokens left (ties at tau the candidates cannot settle): a small persistent grid.
      grid = static_cast<unsigned>(std::min<int64_t>(tokens, kLeftCtas));
    }
    if (sh.bytes > 48 * 1024) {
      OMNIMOE_CUDA_CHECK(cudaFuncSetAttribute(select_topk_kernel<true>,
                                              cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              static_cast<int>(sh.bytes)));
    }
    launch_kernel("router_select_topk", select_topk_kernel<true>, dim3(grid), dim3(sh.threads),
                  sh.bytes, stream, sh, tokens, row_logp, col_logp, indices, scores, gates, mode,
                  static_cast<char*>(nullptr), static_cast<const int*>(left));
  } else {
    const int grid = static_cast<int>(std::min<int64_t>(tokens, kGlobalCtas));
    launch_kernel("router_select_topk", select_topk_kernel<false>, dim3(grid),
                  dim3(std::min(sh.threads, kGlobalThreads)), 0, stream, sh, tokens, row_logp,
                  col_logp, indices, scores, gates, mode, static_cast<char*>(workspace),
                  static_cast<const int*>(nullptr));
  }
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
