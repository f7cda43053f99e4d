// The CUDA atomic-experts ops: choose the execution per call, then run it.
//
// gather (experts_gather.cu): token by token, each token reads its K expert rows. Nothing is
//   shared between tokens, which is right when few tokens share an expert (m = T*K/N small).
// tiled (experts_tiled.cu): expert by expert over the schedule, each expert row read once per
//   tile of its tokens, on tensor cores; right when many tokens share an expert.
// dense (experts_dense.cu): products over all N experts on cuBLASLt, the chosen entries masked;
//   right when the routing is dense (K/N of a few percent) and the storage is bf16 / f16.
// Forward and backward are separate calls and may take different paths (both keep the same
// saved preact). OMNIMOE_EXPERTS_PATH=gather|tiled|dense forces one (tests, benchmarks).
#include <cstdlib>
#include <cstring>
#include <string>

#include "backend/backend.h"
#include "cuda/cuda_common.cuh"
#include "cuda/experts_dense.cuh"
#include "cuda/experts_gather.cuh"
#include "cuda/experts_tiled.cuh"

namespace omnimoe::cuda {
namespace {

enum class ExpertsPath { gather, tiled, dense };
enum class Direction { forward, backward };

// Tokens per expert (m = T*K/N) from which the tiled path is chosen, per direction. Measured on
// an H100, bf16, d = 1024, T = 4096, routings made by router_forward
// (tests/cuda/test_experts_cuda_timing.cpp), ms gather | tiled:
//   m = 5.1 (N = 320^2, K = 128):  fwd 0.69 | 1.07   bwd 1.33 | 4.11
//   m = 10.2 (K = 256):            fwd 1.35 | 1.22   bwd 2.50 | 4.42
//   m = 20.5 (K = 512):            fwd 2.69 | 1.83   bwd 4.89 | 5.71
//   m = 164 (K = 4096):            fwd 21.2 | 6.9    bwd 38.2 | 15.5
// Forward crosses between 5 and 10; backward (a line through its two points) near 25. Session
// 12's tiled kernels (ExpertsTiledCudaTiming, same card): m = 20.5 fwd 2.68 | 1.67, bwd
// 4.43 | 4.63; m = 82 (T = 16384) fwd 10.7 | 5.37, bwd 18.5 | 11.35; m = 164 fwd 21.2 | 6.30,
// bwd 33.7 | 13.9: the backward still favours gather at m = 20.5 (m = 5 and 10 not rerun).
constexpr double kTiledForwardMinTokensPerExpert = 8.0;
constexpr double kTiledBackwardMinTokensPerExpert = 25.0;

// Density K/N from which the dense path is chosen (bf16 / f16), both directions: the measured
// crossover on the tool bench (H100, bf16, N = 320^2, d = 1024, T = 4096), ms dense-masked |
// tiled: K/N = 4% (K = 4096) 3.19 | 8.34; K/N = 0.5% (K = 512) 2.49 | 1.93.
constexpr double kDenseMinDensity = 0.02;
// And from this many tokens per expert: the dense products read every table row once, the
// gather reads T*K rows, so below m = 1 the gather moves fewer bytes whatever the density (not
// measured; 2 leaves room for the GEMMs' low efficiency on few token rows).
constexpr double kDenseMinTokensPerExpert = 2.0;

// The device the choice is made for: the current one (the workspace queries take no Exec).
int current_device() {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return device;
}

ExpertsPath choose_path(const LayerConfig& cfg, int64_t tokens, DType dtype, Direction dir) {
  const bool tiled_ok = experts_tiled_supports(cfg, tokens, dtype);
  if (const char* forced = std::getenv("OMNIMOE_EXPERTS_PATH"); forced && *forced) {
    if (std::strcmp(forced, "gather") == 0) return ExpertsPath::gather;
    if (std::strcmp(forced, "dense") == 0) {
      OMNIMOE_CHECK(experts_dense_supports(cfg, tokens, dtype), "experts: OMNIMOE_EXPERTS_PATH="
                    "dense, but the dense execution runs only bf16 and f16 storage, got ",
                    dtype_name(dtype));
      return ExpertsPath::dense;
    }
    if (std::strcmp(forced, "tiled") == 0) {
      OMNIMOE_CHECK(tiled_ok, "experts: OMNIMOE_EXPERTS_PATH=tiled, but the tiled execution does "
                    "not handle this call (dtype ", dtype_name(dtype), ", T = ", tokens, ", ",
                    cfg.describe(), ")");
      return ExpertsPath::tiled;
    }
    OMNIMOE_FAIL("experts: OMNIMOE_EXPERTS_PATH must be \"gather\", \"tiled\" or \"dense\", "
                 "got \"", forced, "\"");
  }
  // Tables that fit in L2 twice over (ref-quickstart: N = 4096, 16 MB) make every gathered row
  // an L2 hit: gather ran 0.096 ms forward there against 0.32 ms tiled (H100, bf16).
  const double table_bytes = 2.0 * static_cast<double>(cfg.num_experts()) *
                             static_cast<double>(cfg.hidden) * static_cast<double>(dtype_size(dtype));
  if (table_bytes * 2.0 <= static_cast<double>(l2_bytes(current_device()))) {
    return ExpertsPath::gather;
  }
  const double tokens_per_expert =
      static_cast<double>(tokens) * static_cast<double>(cfg.top_k) /
      static_cast<double>(cfg.num_experts());
  const double density =
      static_cast<double>(cfg.top_k) / static_cast<double>(cfg.num_experts());
  if (experts_dense_supports(cfg, tokens, dtype) && density >= kDenseMinDensity &&
      tokens_per_expert >= kDenseMinTokensPerExpert) {
    return ExpertsPath::dense;
  }
  const double threshold = dir == Direction::forward ? kTiledForwardMinTokensPerExpert
                                                     : kTiledBackwardMinTokensPerExpert;
  return tiled_ok && tokens_per_expert >= threshold ? ExpertsPath::tiled : ExpertsPath::gather;
}

}  // namespace

// "gather", "tiled" or "dense" when both directions run the same path, else
// "<forward>+<backward>".
const char* experts_execution(const LayerConfig& cfg, int64_t tokens, DType dtype) {
  static const char* const names[3][3] = {
      {"gather", "gather+tiled", "gather+dense"},
      {"tiled+gather", "tiled", "tiled+dense"},
      {"dense+gather", "dense+tiled", "dense"}};
  const ExpertsPath f = choose_path(cfg, tokens, dtype, Direction::forward);
  const ExpertsPath b = choose_path(cfg, tokens, dtype, Direction::backward);
  return names[static_cast<int>(f)][static_cast<int>(b)];
}

size_t experts_forward_workspace_bytes(const LayerConfig& cfg, int64_t tokens, DType dtype) {
  switch (choose_path(cfg, tokens, dtype, Direction::forward)) {
    case ExpertsPath::tiled: return experts_tiled_forward_workspace_bytes(cfg, tokens, dtype);
    case ExpertsPath::dense: return experts_dense_forward_workspace_bytes(cfg, tokens, dtype);
    default: return experts_gather_forward_workspace_bytes(cfg, tokens, dtype);
  }
}

void experts_forward(const LayerConfig& cfg, const TensorView& x, const ExpertWeights& weights,
                     const TensorView& indices, const TensorView& gates, const TensorView& y,
                     bool accumulate, const TensorView& preact, Buffer workspace,
                     const Exec& exec) {
  const int64_t tokens = x.shape[0];
  const ExpertsPath path = choose_path(cfg, tokens, x.dtype, Direction::forward);
  if (path == ExpertsPath::tiled) {
    experts_tiled_forward(cfg, x, weights, indices, gates, y, accumulate, preact,
                          workspace, exec);
  } else if (path == ExpertsPath::dense) {
    experts_dense_forward(cfg, x, weights, indices, gates, y, accumulate, preact,
                          workspace, exec);
  } else {
    experts_gather_forward(cfg, x, weights, indices, gates, y, accumulate, preact,
                           workspace, exec);
  }
}

size_t experts_backward_workspace_bytes(const LayerConfig& cfg, int64_t tokens, DType dtype) {
  switch (choose_path(cfg, tokens, dtype, Direction::backward)) {
    case ExpertsPath::tiled: return experts_tiled_backward_workspace_bytes(cfg, tokens, dtype);
    case ExpertsPath::dense: return experts_dense_backward_workspace_bytes(cfg, tokens, dtype);
    default: return experts_gather_backward_workspace_bytes(cfg, tokens, dtype);
  }
}

bool experts_backward_reads_schedule(const LayerConfig& cfg, int64_t tokens, DType dtype) {
  return choose_path(cfg, tokens, dtype, Direction::backward) == ExpertsPath::gather;
}

void experts_backward(const LayerConfig& cfg, const TensorView& x, const ExpertWeights& weights,
                      const TensorView& indices, const TensorView& gates,
                      const TensorView& preact, const Schedule& schedule, const TensorView& dy,
                      const TensorView& dx, bool accumulate_dx, const ExpertWeights& grads,
                      const TensorView& dgates, Buffer workspace, const Exec& exec) {
  const int64_t tokens = x.shape[0];
  const ExpertsPath path = choose_path(cfg, tokens, x.dtype, Direction::backward);
  if (path == ExpertsPath::tiled) {
    experts_tiled_backward(cfg, x, weights, indices, gates, preact, schedule, dy, dx,
                           accumulate_dx, grads, dgates, workspace, exec);
  } else if (path == ExpertsPath::dense) {
    experts_dense_backward(cfg, x, weights, indices, gates, preact, schedule, dy, dx,
                           accumulate_dx, grads, dgates, workspace, exec);
  } else {
    experts_gather_backward(cfg, x, weights, indices, gates, preact, schedule, dy, dx,
                            accumulate_dx, grads, dgates, workspace, exec);
  }
}

}  // namespace omnimoe::cuda
