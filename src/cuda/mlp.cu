// CUDA shared SwiGLU MLP: the projections are cuBLASLt GEMMs (gemm.h); the activation and its
// gradient are one vectorised elementwise kernel each, fp32 math (fp64 for f64 storage).
//
// Workspace (each region 256-byte aligned):
//   forward:  h [T, I]                     | cuBLASLt workspace
//   backward: h [T, I] | d_gate [T, I] | dh, then d_up in place [T, I] | cuBLASLt workspace
// Later: when W_gate and W_up are adjacent in memory (one [2I, d] tensor), the two input GEMMs
// of forward and the two dx GEMMs of backward could each run as one.
#include <algorithm>
#include <type_traits>

#include "backend/backend.h"
#include "cuda/cuda_common.cuh"
#include "cuda/gemm.h"

namespace omnimoe::cuda {
namespace {

constexpr size_t kAlign = 256;

size_t align_up(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

size_t activation_bytes(const LayerConfig& cfg, int64_t tokens, DType dtype) {
  return align_up(static_cast<size_t>(tokens * cfg.intermediate) * dtype_size(dtype));
}

// Carves 256-byte-aligned pieces off the caller's workspace (the query adds kAlign of slack).
class Carver {
 public:
  explicit Carver(Buffer ws) : base_(reinterpret_cast<uintptr_t>(ws.data)), end_(base_ + ws.bytes) {
    base_ = (base_ + kAlign - 1) / kAlign * kAlign;
  }
  void* take(size_t bytes) {
    void* p = reinterpret_cast<void*>(base_);
    base_ += align_up(bytes);
    OMNIMOE_CHECK(base_ <= end_, "mlp: workspace too small (internal size mismatch)");
    return p;
  }
  Buffer rest() const { return {reinterpret_cast<void*>(base_), end_ - base_}; }

 private:
  uintptr_t base_, end_;
};

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
__device__ __forceinline__ acc_t<T> to_acc(T v) {
  if constexpr (std::is_same_v<T, double>) {
    return v;
  } else {
    return load_float(v);
  }
}

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> v) {
  if constexpr (std::is_same_v<T, double>) {
    return v;
  } else {
    return store_float<T>(v);
  }
}

__device__ __forceinline__ float sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }
__device__ __forceinline__ double sigmoid(double z) { return 1.0 / (1.0 + exp(-z)); }

// V consecutive elements, loaded and stored as one access.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// h = silu(g) * u over n elements. V > 1 needs every pointer 16-byte aligned.
template <typename T, int V>
__global__ void swiglu_forward_kernel(const T* __restrict__ g, const T* __restrict__ u,
                                      T* __restrict__ h, int64_t n) {
  using Acc = acc_t<T>;
  using P = Pack<T, V>;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  const int64_t packs = n / V;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < packs; i += step) {
    const P gp = reinterpret_cast<const P*>(g)[i];
    const P up = reinterpret_cast<const P*>(u)[i];
    P hp;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const Acc z = to_acc(gp.v[j]);
      hp.v[j] = from_acc<T>(z * sigmoid(z) * to_acc(up.v[j]));
    }
    reinterpret_cast<P*>(h)[i] = hp;
  }
  for (int64_t i = packs * V + blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += step) {
    const Acc z = to_acc(g[i]);
    h[i] = from_acc<T>(z * sigmoid(z) * to_acc(u[i]));
  }
}

// h = silu(g) * u (for dW_down), d_gate = dh * u * silu'(g), d_up = dh * silu(g), reading g and
// u once. d_up may alias dh (each element is read before it is written, by the same thread).
template <typename T, int V>
__global__ void swiglu_backward_kernel(const T* __restrict__ g, const T* __restrict__ u,
                                       const T* dh, T* __restrict__ h, T* __restrict__ d_gate,
                                       T* d_up, int64_t n) {
  using Acc = acc_t<T>;
  using P = Pack<T, V>;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  const int64_t packs = n / V;
  auto one = [](T gv, T uv, T dhv, T& hv, T& dg, T& du) {
    const Acc z = to_acc(gv), s = sigmoid(z), up = to_acc(uv), d = to_acc(dhv);
    hv = from_acc<T>(z * s * up);
    dg = from_acc<T>(d * up * s * (Acc(1) + z * (Acc(1) - s)));
    du = from_acc<T>(d * z * s);
  };
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < packs; i += step) {
    const P gp = reinterpret_cast<const P*>(g)[i];
    const P up = reinterpret_cast<const P*>(u)[i];
    const P dp = reinterpret_cast<const P*>(dh)[i];
    P hp, dgp, dup;
#pragma unroll
    for (int j = 0; j < V; ++j) one(gp.v[j], up.v[j], dp.v[j], hp.v[j], dgp.v[j], dup.v[j]);
    reinterpret_cast<P*>(h)[i] = hp;
    reinterpret_cast<P*>(d_gate)[i] = dgp;
    reinterpret_cast<P*>(d_up)[i] = dup;
  }
  for (int64_t i = packs * V + blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += step) {
    one(g[i], u[i], dh[i], h[i], d_gate[i], d_up[i]);
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

int grid_for(int64_t items, int threads) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(items, threads), 8192)));
}

void swiglu_forward(DType dtype, const void* g, const void* u, void* h, int64_t n,
                    cudaStream_t stream) {
  if (n == 0) return;
  dispatch_storage(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = 16 / sizeof(T);
    const int threads = 256;
    const T* gt = static_cast<const T*>(g);
    const T* ut = static_cast<const T*>(u);
    T* ht = static_cast<T*>(h);
    if (aligned16(g) && aligned16(u) && aligned16(h)) {
      swiglu_forward_kernel<T, V><<<grid_for(ceil_div(n, V), threads), threads, 0, stream>>>(
          gt, ut, ht, n);
    } else {
      swiglu_forward_kernel<T, 1><<<grid_for(n, threads), threads, 0, stream>>>(gt, ut, ht, n);
    }
  });
  OMNIMOE_CUDA_CHECK_LAUNCH("swiglu_forward_kernel");
}

void swiglu_backward(DType dtype, const void* g, const void* u, const void* dh, void* h,
                     void* d_gate, void* d_up, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  dispatch_storage(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = 16 / sizeof(T);
    const int threads = 256;
    const T* gt = static_cast<const T*>(g);
    const T* ut = static_cast<const T*>(u);
    const T* dht = static_cast<const T*>(dh);
    T* ht = static_cast<T*>(h);
    T* dgt = static_cast<T*>(d_gate);
    T* dut = static_cast<T*>(d_up);
    if (aligned16(g) && aligned16(u) && aligned16(dh) && aligned16(h) && aligned16(d_gate) &&
        aligned16(d_up)) {
      swiglu_backward_kernel<T, V><<<grid_for(ceil_div(n, V), threads), threads, 0, stream>>>(
          gt, ut, dht, ht, dgt, dut, n);
    } else {
      swiglu_backward_kernel<T, 1><<<grid_for(n, threads), threads, 0, stream>>>(gt, ut, dht, ht,
                                                                                 dgt, dut, n);
    }
  });
  OMNIMOE_CUDA_CHECK_LAUNCH("swiglu_backward_kernel");
}

}  // namespace

size_t mlp_forward_workspace_bytes(const LayerConfig& cfg, int64_t tokens, DType dtype) {
  return kAlign + activation_bytes(cfg, tokens, dtype) + gemm_workspace_bytes();
}

namespace {

// y = MLP(x) (+ y when accumulate, or + *addend after join() when addend is given).
void forward_impl(const LayerConfig& cfg, const TensorView& x, const MlpWeights& weights,
                  const TensorView& y, bool accumulate, const TensorView* addend,
                  const std::function<void()>* join, const MlpSaved& saved, Buffer workspace,
                  const Exec& exec) {
  DeviceGuard guard(exec);
  const cudaStream_t stream = stream_of(exec);
  const int64_t tokens = x.shape[0], I = cfg.intermediate;
  Carver carve(workspace);
  const TensorView h = TensorView::matrix(carve.take(activation_bytes(cfg, tokens, x.dtype)),
                                          x.dtype, tokens, I, I, exec.device);
  const Buffer gemm_ws = carve.rest();

  gemm(x, false, weights.gate, true, saved.gate_pre, 1.0f, 0.0f, gemm_ws, exec);
  gemm(x, false, weights.up, true, saved.up_pre, 1.0f, 0.0f, gemm_ws, exec);
  swiglu_forward(x.dtype, saved.gate_pre.data, saved.up_pre.data, h.data, tokens * I, stream);
  if (addend) {
    (*join)();
    gemm(h, false, weights.down, true, *addend, y, 1.0f, 1.0f, gemm_ws, exec);
    return;
  }
  gemm(h, false, weights.down, true, y, 1.0f, accumulate ? 1.0f : 0.0f, gemm_ws, exec);
}

}  // namespace

void mlp_forward(const LayerConfig& cfg, const TensorView& x, const MlpWeights& weights,
                 const TensorView& y, bool accumulate, const MlpSaved& saved, Buffer workspace,
                 const Exec& exec) {
  forward_impl(cfg, x, weights, y, accumulate, nullptr, nullptr, saved, workspace, exec);
}

void mlp_forward_joined(const LayerConfig& cfg, const TensorView& x, const MlpWeights& weights,
                        const TensorView& y, const TensorView& addend, const MlpSaved& saved,
                        const std::function<void()>& join, Buffer workspace, const Exec& exec) {
  forward_impl(cfg, x, weights, y, false, &addend, &join, saved, workspace, exec);
}

size_t mlp_backward_workspace_bytes(const LayerConfig& cfg, int64_t tokens, DType dtype) {
  return kAlign + 3 * activation_bytes(cfg, tokens, dtype) + gemm_workspace_bytes();
}

namespace {

// dx = dMLP (+ dx when accumulate_dx, or + *addend after join() when addend is given).
void backward_impl(const LayerConfig& cfg, const TensorView& x, const MlpWeights& weights,
                   const MlpSaved& saved, const TensorView& dy, const TensorView& dx,
                   bool accumulate_dx, const TensorView* addend, const std::function<void()>* join,
                   const MlpWeights& grads, Buffer workspace, const Exec& exec) {
  DeviceGuard guard(exec);
  const cudaStream_t stream = stream_of(exec);
  const int64_t tokens = x.shape[0], I = cfg.intermediate;
  const DType dt = x.dtype;
  Carver carve(workspace);
  auto activation = [&] {
    return TensorView::matrix(carve.take(activation_bytes(cfg, tokens, dt)), dt, tokens, I, I,
                              exec.device);
  };
  const TensorView h = activation();
  const TensorView d_gate = activation();
  const TensorView dh = activation();  // becomes d_up in place
  const TensorView& d_up = dh;
  const Buffer gemm_ws = carve.rest();

  // With T = 0 the weight-gradient GEMMs have k = 0 and write zeros.
  gemm(dy, false, weights.down, false, dh, 1.0f, 0.0f, gemm_ws, exec);  // [T, I] = dy W_down
  swiglu_backward(dt, saved.gate_pre.data, saved.up_pre.data, dh.data, h.data, d_gate.data,
                  d_up.data, tokens * I, stream);
  gemm(dy, true, h, false, grads.down, 1.0f, 0.0f, gemm_ws, exec);      // [d, I] = dy^T h
  gemm(d_gate, true, x, false, grads.gate, 1.0f, 0.0f, gemm_ws, exec);  // [I, d]
  gemm(d_up, true, x, false, grads.up, 1.0f, 0.0f, gemm_ws, exec);
  if (addend) {  // the dx products last, so the other branch has the longest to finish
    (*join)();
    gemm(d_gate, false, weights.gate, false, *addend, dx, 1.0f, 1.0f, gemm_ws, exec);
  } else {
    gemm(d_gate, false, weights.gate, false, dx, 1.0f, accumulate_dx ? 1.0f : 0.0f, gemm_ws,
         exec);
  }
  gemm(d_up, false, weights.up, false, dx, 1.0f, 1.0f, gemm_ws, exec);
}

}  // namespace

void mlp_backward(const LayerConfig& cfg, const TensorView& x, const MlpWeights& weights,
                  const MlpSaved& saved, const TensorView& dy, const TensorView& dx,
                  bool accumulate_dx, const MlpWeights& grads, Buffer workspace,
                  const Exec& exec) {
  backward_impl(cfg, x, weights, saved, dy, dx, accumulate_dx, nullptr, nullptr, grads,
                workspace, exec);
}

void mlp_backward_joined(const LayerConfig& cfg, const TensorView& x, const MlpWeights& weights,
                         const MlpSaved& saved, const TensorView& dy, const TensorView& dx,
                         const TensorView& addend, const MlpWeights& grads,
                         const std::function<void()>& join, Buffer workspace, const Exec& exec) {
  backward_impl(cfg, x, weights, saved, dy, dx, false, &addend, &join, grads, workspace, exec);
}

}  // namespace omnimoe::cuda
