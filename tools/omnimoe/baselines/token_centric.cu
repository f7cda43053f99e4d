#include <string>

#include "baselines/expert_branch.cuh"

namespace omnimoe::tool {

namespace {

constexpr int kWarps = 4;

// 16 bytes of storage as floats.
template <typename T>
struct Pack;
template <>
struct Pack<__nv_bfloat16> {
  static constexpr int kElems = 8;
  __device__ static void unpack(const uint4& r, float* f) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&r);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 v = __bfloat1622float2(h[i]);
      f[2 * i] = v.x;
      f[2 * i + 1] = v.y;
    }
  }
};
template <>
struct Pack<__half> {
  static constexpr int kElems = 8;
  __device__ static void unpack(const uint4& r, float* f) {
    const __half2* h = reinterpret_cast<const __half2*>(&r);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 v = __half22float2(h[i]);
      f[2 * i] = v.x;
      f[2 * i + 1] = v.y;
    }
  }
};
template <>
struct Pack<float> {
  static constexpr int kElems = 4;
  __device__ static void unpack(const uint4& r, float* f) {
    f[0] = __uint_as_float(r.x);
    f[1] = __uint_as_float(r.y);
    f[2] = __uint_as_float(r.z);
    f[3] = __uint_as_float(r.w);
  }
};

// One CTA per token; each warp takes two experts at a time and issues all four rows (W and V
// of both) before it reduces, so each lane has CHUNKS * 4 16-byte loads in flight. Lane l owns
// 16-byte chunks l, l + 32, ... of every row; the warps' partial outputs are summed in shared
// memory at the end.
template <typename T, int CHUNKS>
__global__ void __launch_bounds__(kWarps * 32)
    token_centric_kernel(const T* __restrict__ x, int64_t ldx, const T* __restrict__ W, int64_t ldw,
                         const T* __restrict__ V, int64_t ldv, const int* __restrict__ idx,
                         int64_t ldi, const float* __restrict__ gates, int64_t ldg,
                         T* __restrict__ y, int64_t ldy, int K, int nchunks, int act) {
  constexpr int E = Pack<T>::kElems;
  extern __shared__ float partial[];  // [kWarps][nchunks * E]
  const int64_t t = blockIdx.x;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

  float xf[CHUNKS][E], acc[CHUNKS][E];
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int chunk = c * 32 + lane;
    uint4 raw = make_uint4(0, 0, 0, 0);
    if (chunk < nchunks) raw = *reinterpret_cast<const uint4*>(x + t * ldx + chunk * E);
    Pack<T>::unpack(raw, xf[c]);
#pragma unroll
    for (int j = 0; j < E; ++j) acc[c][j] = 0.0f;
  }

  // Two experts at a time while the registers allow (four rows in flight per lane), else one.
  constexpr int kAtOnce = CHUNKS <= 4 ? 2 : 1;
  const int* it = idx + t * ldi;
  const float* gt = gates + t * ldg;
  for (int k0 = kAtOnce * warp; k0 < K; k0 += kAtOnce * kWarps) {
    int64_t e[kAtOnce];
    bool live[kAtOnce];
#pragma unroll
    for (int a = 0; a < kAtOnce; ++a) {
      live[a] = k0 + a < K;
      e[a] = it[live[a] ? k0 + a : k0];
    }
    uint4 w[kAtOnce][CHUNKS], v[kAtOnce][CHUNKS];
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      const int chunk = c * 32 + lane;
      const bool in = chunk < nchunks;
#pragma unroll
      for (int a = 0; a < kAtOnce; ++a) {
        w[a][c] = in ? __ldg(reinterpret_cast<const uint4*>(W + e[a] * ldw + chunk * E))
                     : make_uint4(0, 0, 0, 0);
        v[a][c] = in ? __ldg(reinterpret_cast<const uint4*>(V + e[a] * ldv + chunk * E))
                     : make_uint4(0, 0, 0, 0);
      }
    }
    float s[kAtOnce];
#pragma unroll
    for (int a = 0; a < kAtOnce; ++a) {
      s[a] = 0.0f;
#pragma unroll
      for (int c = 0; c < CHUNKS; ++c) {
        float f[E];
        Pack<T>::unpack(w[a][c], f);
#pragma unroll
        for (int j = 0; j < E; ++j) s[a] = fmaf(xf[c][j], f[j], s[a]);
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
#pragma unroll
      for (int a = 0; a < kAtOnce; ++a) s[a] += __shfl_xor_sync(0xffffffffu, s[a], off);
    }
#pragma unroll
    for (int a = 0; a < kAtOnce; ++a) {
      const float h = live[a] ? activate(s[a], act) * gt[k0 + a] : 0.0f;
#pragma unroll
      for (int c = 0; c < CHUNKS; ++c) {
        float f[E];
        Pack<T>::unpack(v[a][c], f);
#pragma unroll
        for (int j = 0; j < E; ++j) acc[c][j] = fmaf(h, f[j], acc[c][j]);
      }
    }
  }

  const int width = nchunks * E;
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int chunk = c * 32 + lane;
    if (chunk < nchunks) {
#pragma unroll
      for (int j = 0; j < E; ++j) partial[warp * width + chunk * E + j] = acc[c][j];
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    float s = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += partial[w * width + i];
    y[t * ldy + i] = from_f32<T>(s);
  }
}

template <typename T, int CHUNKS>
void launch(const LayerConfig& cfg, const ExpertBranchInputs& in, const TensorView& y, int nchunks,
            cudaStream_t stream) {
  constexpr int E = Pack<T>::kElems;
  const int64_t T_ = in.x.shape[0];
  const size_t smem = static_cast<size_t>(kWarps) * nchunks * E * sizeof(float);
  if (smem > 48 * 1024) {
    TOOL_CUDA_CHECK(cudaFuncSetAttribute(token_centric_kernel<T, CHUNKS>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem)));
  }
  token_centric_kernel<T, CHUNKS><<<static_cast<unsigned>(T_), kWarps * 32, smem, stream>>>(
      static_cast<const T*>(in.x.data), in.x.strides[0], static_cast<const T*>(in.up.data),
      in.up.strides[0], static_cast<const T*>(in.down.data), in.down.strides[0],
      static_cast<const int*>(in.indices.data), in.indices.strides[0],
      static_cast<const float*>(in.gates.data), in.gates.strides[0], static_cast<T*>(y.data),
      y.strides[0], static_cast<int>(cfg.top_k), nchunks, static_cast<int>(cfg.act));
  TOOL_CUDA_CHECK_LAUNCH("token_centric_kernel");
}

}  // namespace

void token_centric_forward(const LayerConfig& cfg, DType dtype, const ExpertBranchInputs& in,
                           const TensorView& y, cudaStream_t stream) {
  dispatch_baseline_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int E = Pack<T>::kElems;
    const int64_t d = cfg.hidden;
    for (const TensorView* v : {&in.x, &in.up, &in.down, &y}) {
      if (d % E != 0 || v->strides[0] % E != 0 || reinterpret_cast<uintptr_t>(v->data) % 16) {
        throw Error("token-centric baseline: needs rows of 16-byte multiples (d % " +
                    std::to_string(E) + " == 0), got d = " + std::to_string(d));
      }
    }
    const int nchunks = static_cast<int>(d / E);
    const int per_lane = (nchunks + 31) / 32;
    if (per_lane <= 1) return launch<T, 1>(cfg, in, y, nchunks, stream);
    if (per_lane <= 2) return launch<T, 2>(cfg, in, y, nchunks, stream);
    if (per_lane <= 4) return launch<T, 4>(cfg, in, y, nchunks, stream);
    if (per_lane <= 8) return launch<T, 8>(cfg, in, y, nchunks, stream);
    throw Error("token-centric baseline: d = " + std::to_string(d) + " exceeds its " +
                std::to_string(8 * 32 * E) + " elements per row");
  });
}

}  // namespace omnimoe::tool
