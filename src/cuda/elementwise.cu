// Elementwise ops of the CUDA backend.
#include <algorithm>
#include <type_traits>

#include "backend/backend.h"
#include "cuda/cuda_common.cuh"

namespace omnimoe::cuda {
namespace {

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// dst += src, V elements per thread step (16-byte loads where the layout allows); grid-stride.
template <typename T, int V>
__global__ void tensor_add_kernel(T* __restrict__ dst, int64_t dst_stride,
                                  const T* __restrict__ src, int64_t src_stride, int64_t rows,
                                  int64_t cols) {
  const int64_t packs_per_row = cols / V;
  const int64_t total = rows * packs_per_row;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = i / packs_per_row, c = (i - r * packs_per_row) * V;
    auto* out = reinterpret_cast<Pack<T, V>*>(dst + r * dst_stride + c);
    const auto in = *reinterpret_cast<const Pack<T, V>*>(src + r * src_stride + c);
    Pack<T, V> acc = *out;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if constexpr (std::is_same_v<T, double>) {
        acc.v[k] += in.v[k];
      } else {
        acc.v[k] = store_float<T>(load_float(acc.v[k]) + load_float(in.v[k]));
      }
    }
    *out = acc;
  }
}

template <typename T, int V>
void launch_add(const TensorView& dst, const TensorView& src, cudaStream_t stream) {
  const int64_t rows = dst.shape[0], cols = dst.shape[1];
  const int threads = 256;
  const int64_t total = rows * (cols / V);
  const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(total, threads), 4096));
  tensor_add_kernel<T, V><<<blocks, threads, 0, stream>>>(
      static_cast<T*>(dst.data), dst.strides[0], static_cast<const T*>(src.data), src.strides[0],
      rows, cols);
  OMNIMOE_CUDA_CHECK_LAUNCH("tensor_add_kernel");
}

}  // namespace

void tensor_add(const TensorView& dst, const TensorView& src, const Exec& exec) {
  const int64_t rows = dst.shape[0], cols = dst.shape[1];
  if (rows == 0 || cols == 0) return;
  DeviceGuard guard(exec);
  const cudaStream_t stream = stream_of(exec);
  dispatch_storage(dst.dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = 16 / sizeof(T);
    const bool packed = cols % V == 0 && dst.strides[0] % V == 0 && src.strides[0] % V == 0 &&
                        reinterpret_cast<uintptr_t>(dst.data) % 16 == 0 &&
                        reinterpret_cast<uintptr_t>(src.data) % 16 == 0;
    if (packed) {
      launch_add<T, V>(dst, src, stream);
    } else {
      launch_add<T, 1>(dst, src, stream);
    }
  });
}

}  // namespace omnimoe::cuda
