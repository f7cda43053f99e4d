#include "baselines/expert_branch.cuh"
#include "uniform.h"

namespace omnimoe::tool {

namespace {

__device__ __forceinline__ float sigmoid(float v) { return 1.0f / (1.0f + __expf(-v)); }

// A [T, I] = silu(H[:, :I]) * H[:, I:] with H [T, 2I].
template <typename T>
__global__ void swiglu_forward(const T* __restrict__ h, T* __restrict__ a, int64_t tokens,
                               int64_t inter) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= tokens * inter) return;
  const int64_t t = i / inter, j = i % inter;
  const float g = to_f32(h[t * 2 * inter + j]), u = to_f32(h[t * 2 * inter + inter + j]);
  a[i] = from_f32<T>(g * sigmoid(g) * u);
}

// dH from dA: d gate = dA * u * silu'(g), d up = dA * silu(g).
template <typename T>
__global__ void swiglu_backward(const T* __restrict__ h, const T* __restrict__ da,
                                T* __restrict__ dh, int64_t tokens, int64_t inter) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= tokens * inter) return;
  const int64_t t = i / inter, j = i % inter;
  const float g = to_f32(h[t * 2 * inter + j]), u = to_f32(h[t * 2 * inter + inter + j]);
  const float s = sigmoid(g), grad = to_f32(da[i]);
  dh[t * 2 * inter + j] = from_f32<T>(grad * u * s * (1.0f + g * (1.0f - s)));
  dh[t * 2 * inter + inter + j] = from_f32<T>(grad * g * s);
}

}  // namespace

DenseSwiglu::DenseSwiglu(Platform& platform, int64_t tokens, int64_t hidden, int64_t inter,
                         DType dtype, int sets)
    : tokens_(tokens),
      hidden_(hidden),
      inter_(inter),
      dtype_(dtype),
      exec_(platform.exec()),
      workspace_(platform, cuda::gemm_workspace_bytes()) {
  const int64_t T = tokens, d = hidden, I = inter;
  const size_t s = dtype_size(dtype);
  const Device dev = platform.device();
  for (int i = 0; i < sets; ++i) {
    weights_.emplace_back(platform, static_cast<size_t>(3 * I * d) * s);
    const float a = 1.0f / sqrtf(static_cast<float>(d)), b = 1.0f / sqrtf(static_cast<float>(I));
    char* w = static_cast<char*>(weights_.back().data());
    platform.fill_uniform(TensorView::contiguous(w, dtype, {2 * I, d}, dev), 100 + 2 * i, -a, a);
    platform.fill_uniform(
        TensorView::contiguous(w + static_cast<size_t>(2 * I * d) * s, dtype, {d, I}, dev),
        101 + 2 * i, -b, b);
  }
  activations_ = DeviceArray(platform, static_cast<size_t>(T * (3 * I + d)) * s);
  gradients_ = DeviceArray(platform, static_cast<size_t>(2 * T * d + 3 * T * I + 3 * I * d) * s);
  platform.fill_uniform(TensorView::contiguous(gradients_.data(), dtype, {T, d}, dev), 99, -1.0f,
                        1.0f);  // dY
}

TensorView DenseSwiglu::view(void* data, int64_t rows, int64_t cols) const {
  return TensorView::contiguous(data, dtype_, {rows, cols}, exec_.device);
}

void DenseSwiglu::forward(const TensorView& x, int set, cudaStream_t stream) {
  const int64_t T = tokens_, d = hidden_, I = inter_;
  const size_t s = dtype_size(dtype_);
  char* w = static_cast<char*>(weights_[set].data());
  char* act = static_cast<char*>(activations_.data());
  void* h = act;
  void* a = act + static_cast<size_t>(2 * T * I) * s;
  void* y = act + static_cast<size_t>(3 * T * I) * s;
  const Exec exec = exec_on(exec_, stream);
  const Buffer ws{workspace_.data(), workspace_.bytes()};
  cuda::gemm(x, false, view(w, 2 * I, d), true, view(h, T, 2 * I), 1.0f, 0.0f, ws, exec);
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>((T * I + threads - 1) / threads);
  dispatch_baseline_dtype(dtype_, [&](auto tag) {
    using Tp = decltype(tag);
    swiglu_forward<Tp>
        <<<blocks, threads, 0, stream>>>(static_cast<const Tp*>(h), static_cast<Tp*>(a), T, I);
    TOOL_CUDA_CHECK_LAUNCH("swiglu_forward");
  });
  cuda::gemm(view(a, T, I), false, view(w + static_cast<size_t>(2 * I * d) * s, d, I), true,
             view(y, T, d), 1.0f, 0.0f, ws, exec);
}

void DenseSwiglu::backward(const TensorView& x, int set, cudaStream_t stream) {
  const int64_t T = tokens_, d = hidden_, I = inter_;
  const size_t s = dtype_size(dtype_);
  char* w = static_cast<char*>(weights_[set].data());
  void* w_gu = w;
  void* w_down = w + static_cast<size_t>(2 * I * d) * s;
  char* act = static_cast<char*>(activations_.data());
  void* h = act;
  void* a = act + static_cast<size_t>(2 * T * I) * s;
  char* g = static_cast<char*>(gradients_.data());
  void* dy = g;
  void* da = g + static_cast<size_t>(T * d) * s;
  void* dh = g + static_cast<size_t>(T * d + T * I) * s;
  void* dx = g + static_cast<size_t>(T * d + 3 * T * I) * s;
  void* dw_gu = g + static_cast<size_t>(2 * T * d + 3 * T * I) * s;
  void* dw_down = g + static_cast<size_t>(2 * T * d + 3 * T * I + 2 * I * d) * s;
  const Exec exec = exec_on(exec_, stream);
  const Buffer ws{workspace_.data(), workspace_.bytes()};
  cuda::gemm(view(dy, T, d), false, view(w_down, d, I), false, view(da, T, I), 1.0f, 0.0f, ws,
             exec);  // dA = dY W_down
  cuda::gemm(view(dy, T, d), true, view(a, T, I), false, view(dw_down, d, I), 1.0f, 0.0f, ws,
             exec);  // dW_down = dY^T A
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>((T * I + threads - 1) / threads);
  dispatch_baseline_dtype(dtype_, [&](auto tag) {
    using Tp = decltype(tag);
    swiglu_backward<Tp><<<blocks, threads, 0, stream>>>(
        static_cast<const Tp*>(h), static_cast<const Tp*>(da), static_cast<Tp*>(dh), T, I);
    TOOL_CUDA_CHECK_LAUNCH("swiglu_backward");
  });
  cuda::gemm(view(dh, T, 2 * I), false, view(w_gu, 2 * I, d), false, view(dx, T, d), 1.0f, 0.0f,
             ws, exec);  // dX = dH W_gu
  cuda::gemm(view(dh, T, 2 * I), true, x, false, view(dw_gu, 2 * I, d), 1.0f, 0.0f, ws,
             exec);  // dW_gu = dH^T X
}

}  // namespace omnimoe::tool
