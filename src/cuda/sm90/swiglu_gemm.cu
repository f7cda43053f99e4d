// The shared MLP's SwiGLU fused into the epilogues of two Hopper GEMMs (CUTLASS 3, TMA +
// wgmma, warp-specialized ping-pong), so that neither pass runs a separate elementwise kernel:
//   forward:  u = x W_up^T, stored, and h = silu(g) u from the stored g (the gate product);
//   backward: dh = dy W_down (never stored), then d_up = dh silu(g), d_gate = dh u silu'(g)
//             and h = silu(g) u (for dW_down), from the saved g and u.
// Each epilogue is a DAG of CUTLASS epilogue-visitor nodes: g and u are read once per tile
// (TMA loads), every output is a TMA store. Values are rounded to the storage type where the
// unfused path stores them (u, dh) before the SwiGLU math of swiglu_math.cuh, so both paths
// compute the same elementwise results from the same inputs.
//
// The kernels are in swiglu_gemm_kernels.cuh, one translation unit per tile configuration
// (swiglu_gemm_configs.h). Compiled for sm_90a only (an object library of its own,
// CMakeLists.txt), and only when the CUTLASS headers are there (scripts/install_deps.sh).
#include "cuda/sm90/swiglu_gemm.h"

#include <cstdlib>
#include <map>
#include <mutex>
#include <string>

#include "cuda/cuda_common.cuh"
#include "cuda/sm90/swiglu_gemm_configs.h"

namespace omnimoe::cuda {
namespace {

int sm_count_of(const Exec& exec) {
  if (exec.sm_count > 0) return exec.sm_count;
  static std::mutex mutex;
  static std::map<int, int> counts;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = counts.find(exec.device.index);
  if (it != counts.end()) return it->second;
  int n = 0;
  OMNIMOE_CUDA_CHECK(
      cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, exec.device.index));
  counts.emplace(exec.device.index, n);
  return n;
}

bool aligned(const TensorView& t) {
  return reinterpret_cast<uintptr_t>(t.data) % 16 == 0 && t.strides[1] == 1 &&
         (t.strides[0] * static_cast<int64_t>(dtype_size(t.dtype))) % 16 == 0;
}

using UpFn = void (*)(const TensorView&, const TensorView&, const TensorView&, const TensorView&,
                      const TensorView&, Buffer, int, const Exec&);
using DownGradFn = void (*)(const TensorView&, const TensorView&, const TensorView&,
                            const TensorView&, const TensorView&, const TensorView&,
                            const TensorView&, Buffer, int, const Exec&);
struct Config {
  const char* name;
  UpFn up;
  DownGradFn down_grad;
};

// The configuration OMNIMOE_SWIGLU_GEMM_CONFIG names, else the default (the first).
const Config& config() {
#define OMNIMOE_SWIGLU_GEMM_ENTRY(C) {#C, swiglu_up_gemm_##C, swiglu_down_grad_gemm_##C},
  static const Config configs[] = {OMNIMOE_SWIGLU_GEMM_CONFIGS(OMNIMOE_SWIGLU_GEMM_ENTRY)};
#undef OMNIMOE_SWIGLU_GEMM_ENTRY
  const char* v = std::getenv("OMNIMOE_SWIGLU_GEMM_CONFIG");
  if (!v || !*v) return configs[0];
  std::string names;
  for (const Config& c : configs) {
    if (std::string(v) == c.name) return c;
    names += std::string(names.empty() ? "" : ", ") + c.name;
  }
  OMNIMOE_FAIL("OMNIMOE_SWIGLU_GEMM_CONFIG is '", v, "' (expected one of ", names, ")");
}

void check_dtype(const char* op, DType dtype) {
  OMNIMOE_CHECK(dtype == DType::bf16 || dtype == DType::f16, op, ": dtype ", dtype_name(dtype),
                " (expected bf16 or f16)");
}

}  // namespace

bool swiglu_gemm_device_supported(int device) {
  static std::mutex mutex;
  static std::map<int, bool> known;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = known.find(device);
  if (it != known.end()) return it->second;
  int major = 0, minor = 0;
  OMNIMOE_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  OMNIMOE_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  const bool ok = major == 9 && minor == 0;  // the sm_90a code runs on sm_90 only
  known.emplace(device, ok);
  return ok;
}

bool swiglu_gemm_views_supported(std::initializer_list<const TensorView*> views) {
  for (const TensorView* v : views) {
    if (!aligned(*v)) return false;
    if (v->shape[0] > INT32_MAX || v->shape[1] > INT32_MAX) return false;
  }
  return true;
}

void swiglu_up_gemm(const TensorView& x, const TensorView& w_up, const TensorView& gate_pre,
                    const TensorView& up_pre, const TensorView& h, Buffer workspace,
                    const Exec& exec) {
  check_dtype("swiglu_up_gemm", x.dtype);
  config().up(x, w_up, gate_pre, up_pre, h, workspace, sm_count_of(exec), exec);
}

void swiglu_down_grad_gemm(const TensorView& dy, const TensorView& w_down,
                           const TensorView& gate_pre, const TensorView& up_pre,
                           const TensorView& d_gate, const TensorView& d_up, const TensorView& h,
                           Buffer workspace, const Exec& exec) {
  check_dtype("swiglu_down_grad_gemm", dy.dtype);
  config().down_grad(dy, w_down, gate_pre, up_pre, d_gate, d_up, h, workspace,
                     sm_count_of(exec), exec);
}

}  // namespace omnimoe::cuda
