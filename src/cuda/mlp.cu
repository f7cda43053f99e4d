// CUDA shared SwiGLU MLP: the projections are cuBLASLt GEMMs (gemm.h); the activation and its
// gradient are one vectorised elementwise kernel each, fp32 math (fp64 for f64 storage).
//
// Workspace (each region 256-byte aligned):
//   forward:  h [T, I]                     | cuBLASLt workspace
//   backward: h [T, I] | [d_gate | dh, then d_up in place] [T, 2I] | cuBLASLt workspace
// When W_up follows W_gate in memory (one [2I, d] tensor) the backward's two dx products run as
// one, and when grads.up follows grads.gate, the two weight-gradient products; the forward's
// input products stay two (the saved gate_pre and up_pre are separate dense matrices).
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
  kernel_prologue();
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
// u once, over [rows, cols]: g, u and h dense, dh, d_gate and d_up with row stride ld (d_gate and
// d_up side by side in one matrix). d_up may alias dh (each element is read before it is
// written, by the same thread). V > 1 needs cols and ld multiples of V and 16-byte bases.
template <typename T, int V>
__global__ void swiglu_backward_kernel(const T* __restrict__ g, const T* __restrict__ u,
                                       const T* dh, T* __restrict__ h, T* __restrict__ d_gate,
                                       T* d_up, int64_t rows, int64_t cols, int64_t ld) {
  kernel_prologue();
  using Acc = acc_t<T>;
  using P = Pack<T, V>;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  const int64_t row_packs = cols / V, packs = rows * row_packs;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < packs; i += step) {
    const int64_t r = i / row_packs;
    const int64_t dense = i * V, strided = r * ld + (i - r * row_packs) * V;
    const P gp = *reinterpret_cast<const P*>(g + dense);
    const P up = *reinterpret_cast<const P*>(u + dense);
    const P dp = *reinterpret_cast<const P*>(dh + strided);
    P hp, dgp, dup;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const Acc z = to_acc(gp.v[j]), s = sigmoid(z), uv = to_acc(up.v[j]), d = to_acc(dp.v[j]);
      hp.v[j] = from_acc<T>(z * s * uv);
      dgp.v[j] = from_acc<T>(d * uv * s * (Acc(1) + z * (Acc(1) - s)));
      dup.v[j] = from_acc<T>(d * z * s);
    }
    *reinterpret_cast<P*>(h + dense) = hp;
    *reinterpret_cast<P*>(d_gate + strided) = dgp;
    *reinterpret_cast<P*>(d_up + strided) = dup;
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
      launch_kernel("swiglu_forward_kernel", swiglu_forward_kernel<T, V>,
                    dim3(grid_for(ceil_div(n, V), threads)), dim3(threads), 0, stream, gt, ut, ht,
                    n);
    } else {
      launch_kernel("swiglu_forward_kernel", swiglu_forward_kernel<T, 1>,
                    dim3(grid_for(n, threads)), dim3(threads), 0, stream, gt, ut, ht, n);
    }
  });
}

// g, u, h dense [rows, cols]; dh, d_gate, d_up with row stride ld.
void swiglu_backward(DType dtype, const void* g, const void* u, const void* dh, void* h,
                     void* d_gate, void* d_up, int64_t rows, int64_t cols, int64_t ld,
                     cudaStream_t stream) {
  if (rows * cols == 0) return;
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
    if (cols % V == 0 && ld % V == 0 && aligned16(g) && aligned16(u) && aligned16(dh) &&
        aligned16(h) && aligned16(d_gate) && aligned16(d_up)) {
      launch_kernel("swiglu_backward_kernel", swiglu_backward_kernel<T, V>,
                    dim3(grid_for(rows * cols / V, threads)), dim3(threads), 0, stream, gt, ut,
                    dht, ht, dgt, dut, rows, cols, ld);
    } else {
      launch_kernel("swiglu_backward_kernel", swiglu_backward_kernel<T, 1>,
                    dim3(grid_for(rows * cols, threads)), dim3(threads), 0, stream, gt, ut, dht,
                    ht, dgt, dut, rows, cols, ld);
    }
  });
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

  // One launch when the weights and the saved matrices are evenly spaced (the layer's are).
  gemm_pair({x, x}, false, {weights.gate, weights.up}, true, {saved.gate_pre, saved.up_pre}, 1.0f,
            0.0f, gemm_ws, exec);
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
  const TensorView h = TensorView::matrix(carve.take(activation_bytes(cfg, tokens, dt)), dt, tokens,
                                          I, I, exec.device);
  // d_gate | d_up side by side in one [T, 2I] matrix, so that the two weight-gradient products
  // run as one when the gradients are stacked, and the two dx products as one (inner dimension
  // 2I) when the weights are. dh goes where d_up will be and becomes it in place.
  const TensorView d_gate_up = TensorView::matrix(carve.take(2 * activation_bytes(cfg, tokens, dt)),
                                                  dt, tokens, 2 * I, 2 * I, exec.device);
  const TensorView d_gate = cols_of(d_gate_up, 0, I);
  const TensorView d_up = cols_of(d_gate_up, I, I);
  const TensorView& dh = d_up;
  const Buffer gemm_ws = carve.rest();

  // With T = 0 the weight-gradient GEMMs have k = 0 and write zeros.
  gemm(dy, false, weights.down, false, dh, 1.0f, 0.0f, gemm_ws, exec);  // [T, I] = dy W_down
  swiglu_backward(dt, saved.gate_pre.data, saved.up_pre.data, dh.data, h.data, d_gate.data,
                  d_up.data, tokens, I, 2 * I, stream);
  gemm(dy, true, h, false, grads.down, 1.0f, 0.0f, gemm_ws, exec);  // [d, I] = dy^T h
  const TensorView grads_gate_up = stacked_rows(grads.gate, grads.up);
  if (grads_gate_up.data != nullptr) {
    gemm(d_gate_up, true, x, false, grads_gate_up, 1.0f, 0.0f, gemm_ws, exec);  // [2I, d]
  } else {
    gemm(d_gate, true, x, false, grads.gate, 1.0f, 0.0f, gemm_ws, exec);  // [I, d]
    gemm(d_up, true, x, false, grads.up, 1.0f, 0.0f, gemm_ws, exec);
  }
  // The dx products last, so the other branch has the longest to finish.
  if (addend) (*join)();
  const float beta = addend != nullptr || accumulate_dx ? 1.0f : 0.0f;
  const TensorView w_gate_up = stacked_rows(weights.gate, weights.up);
  const TensorView& in = w_gate_up.data != nullptr ? d_gate_up : d_gate;
  const TensorView& w = w_gate_up.data != nullptr ? w_gate_up : weights.gate;
  if (addend) {
    gemm(in, false, w, false, *addend, dx, 1.0f, beta, gemm_ws, exec);
  } else {
    gemm(in, false, w, false, dx, 1.0f, beta, gemm_ws, exec);
  }
  if (w_gate_up.data == nullptr) {
    gemm(d_up, false, weights.up, false, dx, 1.0f, 1.0f, gemm_ws, exec);
  }
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
