#include <string>

#include "baselines/expert_branch.cuh"

namespace omnimoe::tool {

namespace {

template <typename T>
__global__ void gather_selected(const T* __restrict__ scores, int64_t lds,
                                const int* __restrict__ idx, int64_t ldi, int K, int64_t pairs,
                                float* __restrict__ selected) {
  const int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (p >= pairs) return;
  const int64_t t = p / K, k = p % K;
  selected[p] = to_f32(scores[t * lds + idx[t * ldi + k]]);
}

template <typename T>
__global__ void scatter_gated(T* __restrict__ scores, int64_t lds, const int* __restrict__ idx,
                              int64_t ldi, const float* __restrict__ gates, int64_t ldg, int K,
                              int64_t pairs, const float* __restrict__ selected, int act) {
  const int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (p >= pairs) return;
  const int64_t t = p / K, k = p % K;
  scores[t * lds + idx[t * ldi + k]] = from_f32<T>(activate(selected[p], act) * gates[t * ldg + k]);
}

}  // namespace

DenseMasked::DenseMasked(Platform& platform, const LayerConfig& cfg, int64_t tokens, DType dtype)
    : cfg_(cfg),
      tokens_(tokens),
      dtype_(dtype),
      scores_(platform, static_cast<size_t>(tokens * cfg.num_experts()) * dtype_size(dtype)),
      selected_(platform, static_cast<size_t>(tokens * cfg.top_k) * sizeof(float)),
      exec_(platform.exec()),
      workspace_(platform, cuda::gemm_workspace_bytes()) {}

void DenseMasked::forward(const ExpertBranchInputs& in, const TensorView& y, cudaStream_t stream) {
  const int64_t T = tokens_, N = cfg_.num_experts(), K = cfg_.top_k;
  const int64_t pairs = T * K;
  const Exec exec = exec_on(exec_, stream);
  const Buffer ws{workspace_.data(), workspace_.bytes()};
  const TensorView scores = TensorView::contiguous(scores_.data(), dtype_, {T, N}, exec.device);
  // S [T, N] = X [T, d] W^T (W is [N, d]).
  cuda::gemm(in.x, false, in.up, true, scores, 1.0f, 0.0f, ws, exec);
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>((pairs + threads - 1) / threads);
  dispatch_baseline_dtype(dtype_, [&](auto tag) {
    using Tp = decltype(tag);
    gather_selected<Tp><<<blocks, threads, 0, stream>>>(
        static_cast<const Tp*>(scores_.data()), N, static_cast<const int*>(in.indices.data),
        in.indices.strides[0], static_cast<int>(K), pairs, static_cast<float*>(selected_.data()));
    TOOL_CUDA_CHECK_LAUNCH("gather_selected");
    TOOL_CUDA_CHECK(cudaMemsetAsync(scores_.data(), 0, scores_.bytes(), stream));
    scatter_gated<Tp><<<blocks, threads, 0, stream>>>(
        static_cast<Tp*>(scores_.data()), N, static_cast<const int*>(in.indices.data),
        in.indices.strides[0], static_cast<const float*>(in.gates.data), in.gates.strides[0],
        static_cast<int>(K), pairs, static_cast<const float*>(selected_.data()),
        static_cast<int>(cfg_.act));
    TOOL_CUDA_CHECK_LAUNCH("scatter_gated");
  });
  // Y [T, d] = S [T, N] V (V is [N, d]).
  cuda::gemm(scores, false, in.down, false, y, 1.0f, 0.0f, ws, exec);
}

}  // namespace omnimoe::tool
