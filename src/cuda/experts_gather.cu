// Token-centric (gather) execution of the atomic experts (see experts_gather.cuh).
//
// A row of d elements is cut into chunks of VEC elements (16 bytes when every row involved is
// 16-byte aligned, else single elements). A group of `tpt` threads (32..256, a power of two;
// one warp for rows of up to 128 chunks, d = 1024 in bf16) serves one token, each thread holding
// CPT chunks of the token's input and output rows in registers. Per group of KB experts the threads issue all their loads of the W and V rows
// at once, form partial dot products, reduce them across the group (shuffles, then shared
// memory), and accumulate the weighted rows of the other table in fp32. Every sum runs in a
// fixed order, so results are bitwise repeatable. Rows longer than 1024 chunks take a split
// path: one kernel for the dot products, one for the weighted sums.
#include "cuda/experts_gather.cuh"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <type_traits>

#include "backend/backend.h"
#include "cuda/cuda_common.cuh"
#include "cuda/experts_activation.cuh"

namespace omnimoe::cuda {
namespace {

constexpr int kBlock = 256;          // threads per block, every kernel here
constexpr int kMaxFusedChunks = 1024;  // chunks per row the register-resident kernel holds
constexpr int kGradPairsInFlight = 4;  // pairs the dW/dV pass loads before it sums them
// The dW/dV pass loads pair records 32 ahead when experts average more than
// kGradPairsInFlight pairs (m = T * K / N): an iteration then waits on one load instead of two,
// each expert once more, so experts of at most U pairs lose. Measured (H100, experts backward,
// session 7, ahead against not, one card): m = 16 0.137-0.138 ms against 0.144-0.148,
// m = 5.1 1.35 against 1.37-1.38, m = 1 4.32 against 4.01 (m = 20.5: 4.38 against 4.83 in
// the 4a4ca18 table, another card).

// fp32 accumulation, fp64 for f64 storage (as the CPU oracle does).
template <typename T>
using acc_of = std::conditional_t<std::is_same_v<T, double>, double, float>;

__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ double widen(double v) { return v; }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T narrow(acc_of<T> v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else {
    return v;
  }
}

// VEC consecutive elements, loaded and stored as one access (16 bytes when VEC * size is 16).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Chunk {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Chunk<T, VEC> zero_chunk() {
  Chunk<T, VEC> c;
#pragma unroll
  for (int i = 0; i < VEC; ++i) c.v[i] = narrow<T>(acc_of<T>(0));
  return c;
}

// Read-only loads (x, dy, W, V do not change during a kernel): the non-coherent path.
template <typename T, int VEC>
__device__ __forceinline__ Chunk<T, VEC> load_chunk(const T* p) {
  Chunk<T, VEC> c;
  if constexpr (sizeof(Chunk<T, VEC>) == 16) {
    const int4 raw = __ldg(reinterpret_cast<const int4*>(p));
    memcpy(&c, &raw, 16);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) c.v[i] = p[i];
  }
  return c;
}

template <typename T, int VEC>
__device__ __forceinline__ void store_chunk(T* p, const Chunk<T, VEC>& c) {
  *reinterpret_cast<Chunk<T, VEC>*>(p) = c;
}

// out chunk = [out +] acc, rounded once to the storage type.
template <typename T, int VEC>
__device__ __forceinline__ void write_row_chunk(T* p, const acc_of<T> (&acc)[VEC],
                                                bool accumulate) {
  Chunk<T, VEC> o;
  if (accumulate) {
    const Chunk<T, VEC> old = *reinterpret_cast<const Chunk<T, VEC>*>(p);
#pragma unroll
    for (int i = 0; i < VEC; ++i) o.v[i] = narrow<T>(widen(old.v[i]) + acc[i]);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) o.v[i] = narrow<T>(acc[i]);
  }
  store_chunk<T, VEC>(p, o);
}

// The token pass, forward or backward. Forward: in = x, dot table W, sum table V, out = y;
// the dot gives preact z, the coefficient is g * act(z). Backward: in = dy, dot table V, sum
// table W, out = dx; the dot gives s = dy . V[e], dgates = act(z) * s, the coefficient is
// da = g * s * act'(z) (saved for the dW pass).
template <typename T>
struct TokenPass {
  const T* in;
  int64_t in_stride;
  const T* dot_table;
  int64_t dot_stride;
  const T* sum_table;
  int64_t sum_stride;
  T* out;
  int64_t out_stride;
  bool accumulate;
  const int32_t* indices;  // [T, K]
  int64_t num_experts;     // ids outside [0, num_experts) stop the kernel
  const float* gates;      // [T, K]
  float* preact;           // [T, K]: written forward, read backward
  float* dgates;           // [T, K], backward only
  acc_of<T>* coef;         // [T, K]: backward da; the split path's coefficients
  acc_of<T>* gh;           // [T, K]: backward g * act(z), for the dV pass
  const T* x;              // backward with f64 storage: z = x . W[e] is recomputed in double
  int64_t x_stride;        // (the saved preact is only f32), as the CPU oracle does
  int64_t tokens;
  int top_k;
  int nchunks;   // ceil(d / VEC)
  int tpt_log2;  // threads per token = 1 << tpt_log2, in [32, kBlock]
  Activation act;
};

// Backward with f64 storage also forms z = x . W[e] (see TokenPass::x).
template <typename T, bool BACKWARD>
constexpr bool kRecomputesPreact = BACKWARD && std::is_same_v<T, double>;

// The per-pair step after the dot product: writes what the pass saves, returns the coefficient
// of the summed row. `z_exact` is the recomputed pre-activation (kRecomputesPreact only).
template <typename T, bool BACKWARD>
__device__ __forceinline__ acc_of<T> pair_epilogue(const TokenPass<T>& p, int64_t pair,
                                                   acc_of<T> dot, acc_of<T> z_exact,
                                                   bool writer) {
  using A = acc_of<T>;
  const A g = static_cast<A>(p.gates[pair]);
  if constexpr (!BACKWARD) {
    if (writer) p.preact[pair] = static_cast<float>(dot);
    return g * activate(p.act, dot);
  } else {
    const A z = kRecomputesPreact<T, BACKWARD> ? z_exact : static_cast<A>(p.preact[pair]);
    const A h = activate(p.act, z);
    const A da = g * dot * activate_grad(p.act, z);
    if (writer) {
      p.dgates[pair] = static_cast<float>(h * dot);
      p.coef[pair] = da;
      p.gh[pair] = g * h;
    }
    return da;
  }
}

template <typename T, int VEC, int CPT, int KB, bool BACKWARD, int MIN_BLOCKS = 1>
__global__ void __launch_bounds__(kBlock, MIN_BLOCKS) gather_token_kernel(const TokenPass<T> p) {
  kernel_prologue();
  using A = acc_of<T>;
  using C = Chunk<T, VEC>;
  constexpr int kWarps = kBlock / 32;
  constexpr bool kZ = kRecomputesPreact<T, BACKWARD>;
  constexpr int NR = kZ ? 2 * KB : KB;  // sums reduced per expert group
  __shared__ A partials[2][kWarps][NR];  // double-buffered: one barrier per expert group

  const int tpt = 1 << p.tpt_log2;
  const int group = threadIdx.x >> p.tpt_log2;
  const int lane = threadIdx.x & (tpt - 1);
  const int64_t t = static_cast<int64_t>(blockIdx.x) * (kBlock >> p.tpt_log2) + group;
  const bool valid = t < p.tokens;  // invalid groups still join every barrier
  const int K = p.top_k;
  const int32_t* idx_row = p.indices + (valid ? t : 0) * K;

  C in[CPT];
#pragma unroll
  for (int c = 0; c < CPT; ++c) {
    const int chunk = lane + c * tpt;
    in[c] = valid && chunk < p.nchunks ? load_chunk<T, VEC>(p.in + t * p.in_stride + chunk * VEC)
                                       : zero_chunk<T, VEC>();
  }
  C xs[kZ ? CPT : 1];
  if constexpr (kZ) {
#pragma unroll
    for (int c = 0; c < CPT; ++c) {
      const int chunk = lane + c * tpt;
      xs[c] = valid && chunk < p.nchunks ? load_chunk<T, VEC>(p.x + t * p.x_stride + chunk * VEC)
                                         : zero_chunk<T, VEC>();
    }
  }
  A acc[CPT][VEC];
#pragma unroll
  for (int c = 0; c < CPT; ++c) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[c][i] = A(0);
  }

  int e_next[KB];
  BadExpertId bad;
#pragma unroll
  for (int j = 0; j < KB; ++j) {
    e_next[j] = valid && j < K ? expert_id_or_skip(idx_row[j], p.num_experts, bad) : -1;
  }

  int buf = 0;
  for (int k0 = 0; k0 < K; k0 += KB) {
    int e[KB];
#pragma unroll
    for (int j = 0; j < KB; ++j) e[j] = e_next[j];
    C dot_rows[KB][CPT], sum_rows[KB][CPT];
#pragma unroll
    for (int j = 0; j < KB; ++j) {
#pragma unroll
      for (int c = 0; c < CPT; ++c) {
        const int chunk = lane + c * tpt;
        const bool live = e[j] >= 0 && chunk < p.nchunks;
        dot_rows[j][c] = live ? load_chunk<T, VEC>(p.dot_table + e[j] * p.dot_stride + chunk * VEC)
                              : zero_chunk<T, VEC>();
        sum_rows[j][c] = live ? load_chunk<T, VEC>(p.sum_table + e[j] * p.sum_stride + chunk * VEC)
                              : zero_chunk<T, VEC>();
      }
    }
    // The next group's ids travel while this group's rows arrive.
#pragma unroll
    for (int j = 0; j < KB; ++j) {
      const int k = k0 + KB + j;
      e_next[j] = valid && k < K ? expert_id_or_skip(idx_row[k], p.num_experts, bad) : -1;
    }

    A part[NR];
#pragma unroll
    for (int j = 0; j < KB; ++j) {
      A s = A(0);
#pragma unroll
      for (int c = 0; c < CPT; ++c) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) s += widen(in[c].v[i]) * widen(dot_rows[j][c].v[i]);
      }
      part[j] = s;
      if constexpr (kZ) {
        A z = A(0);
#pragma unroll
        for (int c = 0; c < CPT; ++c) {
#pragma unroll
          for (int i = 0; i < VEC; ++i) z += widen(xs[c].v[i]) * widen(sum_rows[j][c].v[i]);
        }
        part[KB + j] = z;
      }
    }
#pragma unroll
    for (int j = 0; j < NR; ++j) {
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) part[j] += __shfl_xor_sync(0xffffffffu, part[j], off);
    }
    if (tpt > 32) {
      const int warp = threadIdx.x >> 5;
      if ((threadIdx.x & 31) == 0) {
#pragma unroll
        for (int j = 0; j < NR; ++j) partials[buf][warp][j] = part[j];
      }
      __syncthreads();
      const int first = group * (tpt >> 5);
#pragma unroll
      for (int j = 0; j < NR; ++j) {
        A s = A(0);
        for (int w = 0; w < (tpt >> 5); ++w) s += partials[buf][first + w][j];
        part[j] = s;
      }
      buf ^= 1;
    }

#pragma unroll
    for (int j = 0; j < KB; ++j) {
      if (e[j] < 0) continue;
      // (The inner test keeps the index in range when kZ is false.)
      const A coef = pair_epilogue<T, BACKWARD>(p, t * K + k0 + j, part[j],
                                                kZ ? part[kZ ? KB + j : j] : A(0), lane == 0);
#pragma unroll
      for (int c = 0; c < CPT; ++c) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[c][i] += coef * widen(sum_rows[j][c].v[i]);
      }
    }
  }

  report_bad_expert_id(bad, p.num_experts, "experts");
  if (!valid) return;
#pragma unroll
  for (int c = 0; c < CPT; ++c) {
    const int chunk = lane + c * tpt;
    if (chunk < p.nchunks) {
      write_row_chunk<T, VEC>(p.out + t * p.out_stride + chunk * VEC, acc[c], p.accumulate);
    }
  }
}

// Split path, step 1 (rows too long for registers): one block per token forms the K dot
// products, saves what the pass saves, and writes each pair's coefficient to p.coef.
template <typename T, int VEC, bool BACKWARD>
__global__ void __launch_bounds__(kBlock) split_dot_kernel(const TokenPass<T> p) {
  kernel_prologue();
  using A = acc_of<T>;
  constexpr int KB = 4;
  constexpr int kWarps = kBlock / 32;
  constexpr bool kZ = kRecomputesPreact<T, BACKWARD>;
  constexpr int NR = kZ ? 2 * KB : KB;
  __shared__ A partials[2][kWarps][NR];
  const int64_t t = blockIdx.x;
  const int K = p.top_k;
  int buf = 0;
  BadExpertId bad;
  for (int k0 = 0; k0 < K; k0 += KB) {
    int e[KB];
#pragma unroll
    for (int j = 0; j < KB; ++j) {
      e[j] = k0 + j < K ? expert_id_or_skip(p.indices[t * K + k0 + j], p.num_experts, bad) : -1;
    }
    A part[NR] = {};
    for (int chunk = threadIdx.x; chunk < p.nchunks; chunk += kBlock) {
      const Chunk<T, VEC> in = load_chunk<T, VEC>(p.in + t * p.in_stride + chunk * VEC);
#pragma unroll
      for (int j = 0; j < KB; ++j) {
        if (e[j] < 0) continue;
        const Chunk<T, VEC> w =
            load_chunk<T, VEC>(p.dot_table + e[j] * p.dot_stride + chunk * VEC);
#pragma unroll
        for (int i = 0; i < VEC; ++i) part[j] += widen(in.v[i]) * widen(w.v[i]);
        if constexpr (kZ) {
          const Chunk<T, VEC> xc = load_chunk<T, VEC>(p.x + t * p.x_stride + chunk * VEC);
          const Chunk<T, VEC> u =
              load_chunk<T, VEC>(p.sum_table + e[j] * p.sum_stride + chunk * VEC);
#pragma unroll
          for (int i = 0; i < VEC; ++i) part[KB + j] += widen(xc.v[i]) * widen(u.v[i]);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < NR; ++j) {
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) part[j] += __shfl_xor_sync(0xffffffffu, part[j], off);
    }
    if ((threadIdx.x & 31) == 0) {
#pragma unroll
      for (int j = 0; j < NR; ++j) partials[buf][threadIdx.x >> 5][j] = part[j];
    }
    __syncthreads();
    if (threadIdx.x == 0) {
#pragma unroll
      for (int j = 0; j < KB; ++j) {
        if (e[j] < 0) continue;
        A s = A(0), z = A(0);
        for (int w = 0; w < kWarps; ++w) s += partials[buf][w][j];
        if constexpr (kZ) {
          for (int w = 0; w < kWarps; ++w) z += partials[buf][w][KB + j];
        }
        const int64_t pair = t * K + k0 + j;
        p.coef[pair] = pair_epilogue<T, BACKWARD>(p, pair, s, z, true);
      }
    }
    buf ^= 1;
  }
  report_bad_expert_id(bad, p.num_experts, "experts");
}

// Split path, step 2: out[t, chunk] = [out +] sum_k coef[t, k] * sum_table[e_k, chunk] (step 1
// checked the ids).
template <typename T, int VEC>
__global__ void __launch_bounds__(kBlock) split_sum_kernel(const TokenPass<T> p) {
  kernel_prologue();
  using A = acc_of<T>;
  const int64_t blocks_per_row = (p.nchunks + kBlock - 1) / kBlock;
  const int64_t t = blockIdx.x / blocks_per_row;
  const int chunk = static_cast<int>((blockIdx.x % blocks_per_row) * kBlock + threadIdx.x);
  if (chunk >= p.nchunks) return;
  const int K = p.top_k;
  A acc[VEC] = {};
  for (int k = 0; k < K; ++k) {
    const int64_t pair = t * K + k;
    const A coef = p.coef[pair];
    const Chunk<T, VEC> v =
        load_chunk<T, VEC>(p.sum_table + p.indices[pair] * p.sum_stride + chunk * VEC);
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] += coef * widen(v.v[i]);
  }
  write_row_chunk<T, VEC>(p.out + t * p.out_stride + chunk * VEC, acc, p.accumulate);
}

// The expert pass of backward: dW[e] = sum da_p x_t, dV[e] = sum g_p h_p dy_t over the pairs
// p = (t, k) of expert e in schedule order (tokens ascending); rows of unchosen experts get
// zeros. A group of tpt threads owns one (expert, column slab) at a time, grid-stride.
template <typename T>
struct ExpertPass {
  const T* x;
  int64_t x_stride;
  const T* dy;
  int64_t dy_stride;
  T* dw;
  int64_t dw_stride;
  T* dv;
  int64_t dv_stride;
  const int32_t* offsets;     // [N + 1]
  const int32_t* pair_order;  // [T * K]
  const acc_of<T>* da;        // [T, K] from the token pass
  const acc_of<T>* gh;        // [T, K] g * act(z) from the token pass
  int64_t num_experts;
  int64_t tokens;
  int top_k;
  int nchunks;
  int slabs;  // column slabs per row: ceil(nchunks / tpt)
  int tpt_log2;
  int64_t items_per_group;  // consecutive (expert, slab) items per thread group
};

// The dW / dV sums of U pairs whose coefficients and rows are loaded.
template <typename T, int VEC, int U>
__device__ __forceinline__ void sum_pairs(acc_of<T> (&aw)[VEC], acc_of<T> (&av)[VEC],
                                          const acc_of<T> (&da)[U], const acc_of<T> (&gh)[U],
                                          const Chunk<T, VEC> (&xs)[U],
                                          const Chunk<T, VEC> (&dys)[U]) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      aw[v] += da[u] * widen(xs[u].v[v]);
      av[v] += gh[u] * widen(dys[u].v[v]);
    }
  }
}

// dW = sum da x and dV = sum g h dy per expert, over its pairs in schedule order (one fixed
// order: bitwise deterministic), U pairs' rows in flight. kPairsAhead: each warp first loads the
// next 32 pairs' tokens and coefficients, a lane each, and shuffles them, so an iteration's row
// loads wait on registers instead of on a pair index first; the extra step per expert costs
// experts of few pairs more than it saves (see kGradPairsInFlight).
template <typename T, int VEC, int U, bool kPairsAhead>
__global__ void __launch_bounds__(kBlock) expert_grads_kernel(const ExpertPass<T> p) {
  kernel_prologue();
  using A = acc_of<T>;
  using C = Chunk<T, VEC>;
  constexpr unsigned kFull = 0xffffffffu;
  const int tpt = 1 << p.tpt_log2;  // >= 32: a group is whole warps, each walks the same pairs
  const int lane = threadIdx.x & (tpt - 1), warp_lane = threadIdx.x & 31;
  const int64_t group =
      static_cast<int64_t>(blockIdx.x) * (kBlock >> p.tpt_log2) + (threadIdx.x >> p.tpt_log2);
  // Each group walks a contiguous range of (expert, slab) items: neighbouring offsets share
  // cache lines, and the dW / dV rows it writes are contiguous.
  const int64_t items = p.num_experts * p.slabs;
  const int64_t first = group * p.items_per_group;
  const int64_t last = min(items, first + p.items_per_group);
  int64_t next_expert = first / p.slabs;  // one division; the walk below only counts
  int slab = static_cast<int>(first - next_expert * p.slabs);
  for (int64_t item = first; item < last; ++item) {
    const int64_t e = next_expert;
    const int chunk = slab * tpt + lane;
    if (++slab == p.slabs) {
      slab = 0;
      ++next_expert;
    }
    // Lanes past the row stay in the loop: they take part in the shuffles.
    const bool in_row = chunk < p.nchunks;
    // T = 0: the schedule was never built; every row is zero.
    const int begin = p.tokens > 0 ? p.offsets[e] : 0;
    const int end = p.tokens > 0 ? p.offsets[e + 1] : 0;
    A aw[VEC] = {}, av[VEC] = {};
    if constexpr (kPairsAhead) {
      for (int base = begin; base < end; base += 32) {
        const int count = min(32, end - base);
        int my_t = 0;  // pair / K < 2^31: pair ids are int32
        A my_da = A(0), my_gh = A(0);
        if (warp_lane < count) {
          const int pair = p.pair_order[base + warp_lane];
          my_t = pair / p.top_k;
          my_da = p.da[pair];
          my_gh = p.gh[pair];
        }
        for (int i = 0; i < count; i += U) {
          A da[U], gh[U];
          C xs[U], dys[U];
#pragma unroll
          for (int u = 0; u < U; ++u) {
            const int src = (i + u) & 31;
            const int64_t t = __shfl_sync(kFull, my_t, src);  // widened for the row address
            da[u] = __shfl_sync(kFull, my_da, src);
            gh[u] = __shfl_sync(kFull, my_gh, src);
            if (i + u < count && in_row) {
              xs[u] = load_chunk<T, VEC>(p.x + t * p.x_stride + chunk * VEC);
              dys[u] = load_chunk<T, VEC>(p.dy + t * p.dy_stride + chunk * VEC);
            } else {
              da[u] = A(0);
              gh[u] = A(0);
              xs[u] = zero_chunk<T, VEC>();
              dys[u] = zero_chunk<T, VEC>();
            }
          }
          sum_pairs<T, VEC, U>(aw, av, da, gh, xs, dys);
        }
      }
    } else if (in_row) {
      for (int i = begin; i < end; i += U) {
        A da[U], gh[U];
        C xs[U], dys[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (i + u < end) {
            const int pair = p.pair_order[i + u];
            const int64_t t = pair / p.top_k;
            da[u] = p.da[pair];
            gh[u] = p.gh[pair];
            xs[u] = load_chunk<T, VEC>(p.x + t * p.x_stride + chunk * VEC);
            dys[u] = load_chunk<T, VEC>(p.dy + t * p.dy_stride + chunk * VEC);
          } else {
            da[u] = A(0);
            gh[u] = A(0);
            xs[u] = zero_chunk<T, VEC>();
            dys[u] = zero_chunk<T, VEC>();
          }
        }
        sum_pairs<T, VEC, U>(aw, av, da, gh, xs, dys);
      }
    }
    if (in_row) {
      write_row_chunk<T, VEC>(p.dw + e * p.dw_stride + chunk * VEC, aw, false);
      write_row_chunk<T, VEC>(p.dv + e * p.dv_stride + chunk * VEC, av, false);
    }
  }
}

// ---- host side ------------------------------------------------------------------------------

int sm_count(int device) {
  static std::atomic<int> cache[64];
  if (device < 0 || device >= 64) device = 0;
  int n = cache[device].load(std::memory_order_relaxed);
  if (n == 0) {
    OMNIMOE_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

bool rows_aligned_16(const TensorView& t) {
  const size_t elem = dtype_size(t.dtype);
  return reinterpret_cast<uintptr_t>(t.data) % 16 == 0 &&
         (static_cast<size_t>(t.strides[0]) * elem) % 16 == 0;
}

// How a row of d elements is cut: VEC elements per chunk, CPT chunks per thread, tpt threads.
struct RowPlan {
  bool wide = false;  // 16-byte chunks
  int nchunks = 0;
  int cpt = 1;
  int tpt_log2 = 5;
  bool fused = true;  // the register-resident token kernel (else the split path)
};

int log2_at_least(int n) {  // smallest l with (1 << l) >= n
  int l = 0;
  while ((1 << l) < n) ++l;
  return l;
}

template <typename T>
RowPlan plan_rows(int64_t d, bool aligned) {
  constexpr int kWideVec = 16 / sizeof(T);
  RowPlan r;
  r.wide = aligned && d % kWideVec == 0;
  const int vec = r.wide ? kWideVec : 1;
  r.nchunks = static_cast<int>((d + vec - 1) / vec);
  r.fused = r.nchunks <= kMaxFusedChunks;
  // Up to 4 chunks per thread, so that a warp serves a whole row of up to 128 chunks (d = 1024
  // in bf16) without block barriers; longer rows take 2..8 warps per token.
  r.cpt = r.nchunks <= 32 ? 1 : r.nchunks <= 64 ? 2 : 4;
  const int per_thread = (r.nchunks + r.cpt - 1) / r.cpt;
  r.tpt_log2 = std::min(std::max(log2_at_least(per_thread), 5), log2_at_least(kBlock));
  return r;
}

// Launches the token pass (fused, or the split path's two kernels).
template <typename T, int VEC, bool BACKWARD>
void launch_token_pass(const TokenPass<T>& p, const RowPlan& plan, cudaStream_t stream) {
  if (p.tokens == 0) return;
  if (!plan.fused) {
    OMNIMOE_CHECK(p.tokens <= INT32_MAX, "experts gather: token count exceeds the grid");
    split_dot_kernel<T, VEC, BACKWARD><<<static_cast<unsigned>(p.tokens), kBlock, 0, stream>>>(p);
    OMNIMOE_CUDA_CHECK_LAUNCH("split_dot_kernel");
    const int64_t blocks = p.tokens * ceil_div(p.nchunks, kBlock);
    OMNIMOE_CHECK(blocks <= INT32_MAX, "experts gather: grid too large");
    split_sum_kernel<T, VEC><<<static_cast<unsigned>(blocks), kBlock, 0, stream>>>(p);
    OMNIMOE_CUDA_CHECK_LAUNCH("split_sum_kernel");
    return;
  }
  const int64_t tokens_per_block = kBlock >> plan.tpt_log2;
  const int64_t blocks = ceil_div(p.tokens, tokens_per_block);
  OMNIMOE_CHECK(blocks <= INT32_MAX, "experts gather: grid too large");
  const unsigned grid = static_cast<unsigned>(blocks);
  // KB * CPT = 4: eight 16-byte rows in flight per thread, and registers for 2-3 blocks per SM
  // (measured on H100 against 8 and 16 in flight, and against 128 threads per token).
  switch (plan.cpt) {
    case 1:
      // f64 needs the registers of two blocks per SM.
      launch_kernel("gather_token_kernel",
                    gather_token_kernel<T, VEC, 1, 4, BACKWARD, sizeof(T) == 8 ? 2 : 3>,
                    dim3(grid), dim3(kBlock), 0, stream, p);
      break;
    case 2:
      launch_kernel("gather_token_kernel", gather_token_kernel<T, VEC, 2, 2, BACKWARD, 2>,
                    dim3(grid), dim3(kBlock), 0, stream, p);
      break;
    default:
      launch_kernel("gather_token_kernel", gather_token_kernel<T, VEC, 4, 1, BACKWARD, 2>,
                    dim3(grid), dim3(kBlock), 0, stream, p);
      break;
  }
}

template <typename T>
size_t coef_bytes(const LayerConfig& cfg, int64_t tokens) {
  return static_cast<size_t>(tokens * cfg.top_k) * sizeof(acc_of<T>);
}

template <typename T>
void forward_typed(const LayerConfig& cfg, const TensorView& x, const ExpertWeights& w,
                   const TensorView& indices, const TensorView& gates, const TensorView& y,
                   bool accumulate, const TensorView& preact, Buffer workspace,
                   const Exec& exec) {
  const bool aligned =
      rows_aligned_16(x) && rows_aligned_16(w.up) && rows_aligned_16(w.down) && rows_aligned_16(y);
  const RowPlan plan = plan_rows<T>(cfg.hidden, aligned);
  TokenPass<T> p{};
  p.in = static_cast<const T*>(x.data);
  p.in_stride = x.strides[0];
  p.dot_table = static_cast<const T*>(w.up.data);
  p.dot_stride = w.up.strides[0];
  p.sum_table = static_cast<const T*>(w.down.data);
  p.sum_stride = w.down.strides[0];
  p.out = static_cast<T*>(y.data);
  p.out_stride = y.strides[0];
  p.accumulate = accumulate;
  p.indices = static_cast<const int32_t*>(indices.data);
  p.num_experts = cfg.num_experts();
  p.gates = static_cast<const float*>(gates.data);
  p.preact = static_cast<float*>(preact.data);
  p.coef = static_cast<acc_of<T>*>(workspace.data);  // split path only
  p.tokens = x.shape[0];
  p.top_k = static_cast<int>(cfg.top_k);
  p.nchunks = plan.nchunks;
  p.tpt_log2 = plan.tpt_log2;
  p.act = cfg.act;
  const cudaStream_t stream = stream_of(exec);
  if (plan.wide) {
    launch_token_pass<T, 16 / sizeof(T), false>(p, plan, stream);
  } else {
    launch_token_pass<T, 1, false>(p, plan, stream);
  }
}

template <typename T, int VEC>
void launch_expert_pass(ExpertPass<T> p, int device, cudaStream_t stream) {
  if (p.num_experts == 0) return;
  const int64_t groups_per_block = kBlock >> p.tpt_log2;
  const int64_t items = p.num_experts * p.slabs;
  // About four waves of resident groups (measured: one resident wave left the pool shapes'
  // backward 10% slower).
  const int64_t groups = static_cast<int64_t>(sm_count(device)) * (2048 / kBlock) *
                         groups_per_block * 4;
  p.items_per_group = std::max<int64_t>(1, ceil_div(items, groups));
  const int64_t blocks = ceil_div(ceil_div(items, p.items_per_group), groups_per_block);
  OMNIMOE_CHECK(blocks <= INT32_MAX, "experts gather: grid too large");
  const dim3 grid(static_cast<unsigned>(blocks));
  if (p.tokens * p.top_k > int64_t{kGradPairsInFlight} * p.num_experts) {
    launch_kernel("expert_grads_kernel", expert_grads_kernel<T, VEC, kGradPairsInFlight, true>,
                  grid, dim3(kBlock), 0, stream, p);
  } else {
    launch_kernel("expert_grads_kernel", expert_grads_kernel<T, VEC, kGradPairsInFlight, false>,
                  grid, dim3(kBlock), 0, stream, p);
  }
}

template <typename T>
void backward_typed(const LayerConfig& cfg, const TensorView& x, const ExpertWeights& w,
                    const TensorView& indices, const TensorView& gates,
                    const TensorView& preact, const Schedule& schedule, const TensorView& dy,
                    const TensorView& dx, bool accumulate_dx, const ExpertWeights& grads,
                    const TensorView& dgates, Buffer workspace, const Exec& exec) {
  const int64_t tokens = x.shape[0];
  const cudaStream_t stream = stream_of(exec);
  // Workspace: da then g * h, per pair.
  auto* da = static_cast<acc_of<T>*>(workspace.data);
  auto* gh = da + tokens * cfg.top_k;

  // Token pass: s, dgates, da, dx.
  const bool token_aligned = rows_aligned_16(dy) && rows_aligned_16(w.up) &&
                             rows_aligned_16(w.down) && rows_aligned_16(dx) &&
                             rows_aligned_16(x);
  const RowPlan plan = plan_rows<T>(cfg.hidden, token_aligned);
  TokenPass<T> p{};
  p.in = static_cast<const T*>(dy.data);
  p.in_stride = dy.strides[0];
  p.dot_table = static_cast<const T*>(w.down.data);
  p.dot_stride = w.down.strides[0];
  p.sum_table = static_cast<const T*>(w.up.data);
  p.sum_stride = w.up.strides[0];
  p.out = static_cast<T*>(dx.data);
  p.out_stride = dx.strides[0];
  p.accumulate = accumulate_dx;
  p.indices = static_cast<const int32_t*>(indices.data);
  p.num_experts = cfg.num_experts();
  p.gates = static_cast<const float*>(gates.data);
  p.preact = static_cast<float*>(preact.data);
  p.dgates = static_cast<float*>(dgates.data);
  p.coef = da;
  p.gh = gh;
  p.x = static_cast<const T*>(x.data);
  p.x_stride = x.strides[0];
  p.tokens = tokens;
  p.top_k = static_cast<int>(cfg.top_k);
  p.nchunks = plan.nchunks;
  p.tpt_log2 = plan.tpt_log2;
  p.act = cfg.act;
  if (plan.wide) {
    launch_token_pass<T, 16 / sizeof(T), true>(p, plan, stream);
  } else {
    launch_token_pass<T, 1, true>(p, plan, stream);
  }

  // Expert pass: dW, dV in schedule order.
  const bool expert_aligned = rows_aligned_16(x) && rows_aligned_16(dy) &&
                              rows_aligned_16(grads.up) && rows_aligned_16(grads.down);
  const RowPlan gplan = plan_rows<T>(cfg.hidden, expert_aligned);
  ExpertPass<T> q{};
  q.x = static_cast<const T*>(x.data);
  q.x_stride = x.strides[0];
  q.dy = static_cast<const T*>(dy.data);
  q.dy_stride = dy.strides[0];
  q.dw = static_cast<T*>(grads.up.data);
  q.dw_stride = grads.up.strides[0];
  q.dv = static_cast<T*>(grads.down.data);
  q.dv_stride = grads.down.strides[0];
  q.offsets = static_cast<const int32_t*>(schedule.expert_offsets.data);
  q.pair_order = static_cast<const int32_t*>(schedule.pair_order.data);
  q.da = da;
  q.gh = gh;
  q.num_experts = cfg.num_experts();
  q.tokens = tokens;
  q.top_k = static_cast<int>(cfg.top_k);
  q.nchunks = gplan.nchunks;
  q.tpt_log2 = std::min(std::max(log2_at_least(gplan.nchunks), 5), log2_at_least(kBlock));
  q.slabs = static_cast<int>(ceil_div(gplan.nchunks, int64_t{1} << q.tpt_log2));
  if (gplan.wide) {
    launch_expert_pass<T, 16 / sizeof(T)>(q, exec.device.index, stream);
  } else {
    launch_expert_pass<T, 1>(q, exec.device.index, stream);
  }
}

}  // namespace

size_t experts_gather_forward_workspace_bytes(const LayerConfig& cfg, int64_t tokens,
                                              DType dtype) {
  // Only the split path (rows over kMaxFusedChunks chunks; single-element chunks when rows are
  // not 16-byte aligned) keeps the pair coefficients.
  if (cfg.hidden <= kMaxFusedChunks) return 0;
  return dispatch_storage(dtype, [&](auto tag) { return coef_bytes<decltype(tag)>(cfg, tokens); });
}

void experts_gather_forward(const LayerConfig& cfg, const TensorView& x,
                            const ExpertWeights& weights, const TensorView& indices,
                            const TensorView& gates, const TensorView& y, bool accumulate,
                            const TensorView& preact, Buffer workspace, const Exec& exec) {
  const DeviceGuard guard(exec);
  dispatch_storage(x.dtype, [&](auto tag) {
    forward_typed<decltype(tag)>(cfg, x, weights, indices, gates, y, accumulate, preact,
                                 workspace, exec);
  });
}

size_t experts_gather_backward_workspace_bytes(const LayerConfig& cfg, int64_t tokens,
                                               DType dtype) {
  // da and g * h per pair.
  return 2 * dispatch_storage(dtype,
                              [&](auto tag) { return coef_bytes<decltype(tag)>(cfg, tokens); });
}

void experts_gather_backward(const LayerConfig& cfg, const TensorView& x,
                             const ExpertWeights& weights, const TensorView& indices,
                             const TensorView& gates, const TensorView& preact,
                             const Schedule& schedule, const TensorView& dy, const TensorView& dx,
                             bool accumulate_dx, const ExpertWeights& grads,
                             const TensorView& dgates, Buffer workspace, const Exec& exec) {
  const DeviceGuard guard(exec);
  dispatch_storage(x.dtype, [&](auto tag) {
    backward_typed<decltype(tag)>(cfg, x, weights, indices, gates, preact, schedule, dy, dx,
                                  accumulate_dx, grads, dgates, workspace, exec);
  });
}

}  // namespace omnimoe::cuda
