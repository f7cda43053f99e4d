// cuBLASLt behind the row-major gemm() of gemm.h. cuBLASLt is column-major: a row-major [r, c]
// matrix with row stride ld is the column-major [c, r] matrix with leading dimension ld, so
// row-major C = op(A) op(B) is computed as column-major C^T = op(B)^T op(A)^T, B first.
#include <cublasLt.h>

#include <algorithm>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>

#include "core/env.h"
#include "cuda/cuda_common.cuh"
#include "cuda/gemm.h"

namespace omnimoe::cuda {
namespace {

#define OMNIMOE_CUBLASLT_CHECK(call)                                                      \
  do {                                                                                    \
    const cublasStatus_t omnimoe_status_ = (call);                                        \
    if (omnimoe_status_ != CUBLAS_STATUS_SUCCESS) {                                       \
      cudaGetLastError(); /* any runtime error behind it: reported here, not by the next call */ \
      OMNIMOE_FAIL("cuBLASLt call ", #call, " failed: ", cublasLtGetStatusName(omnimoe_status_), \
                   " (", cublasLtGetStatusString(omnimoe_status_), ")");                  \
    }                                                                                     \
  } while (0)

constexpr size_t kWorkspaceBytes = size_t{32} << 20;  // what cuBLAS asks for on Hopper
constexpr uintptr_t kMaxAlignment = 256;

cudaDataType_t cuda_type(DType dtype) {
  switch (dtype) {
    case DType::f32: return CUDA_R_32F;
    case DType::f64: return CUDA_R_64F;
    case DType::bf16: return CUDA_R_16BF;
    case DType::f16: return CUDA_R_16F;
    default: break;
  }
  OMNIMOE_FAIL("gemm: unsupported dtype ", dtype_name(dtype), " (expected f32, f64, bf16 or f16)");
}

// Largest power of two (<= 256) dividing the address: cuBLASLt assumes 256 unless told.
uint32_t alignment_of(const void* p) {
  uintptr_t a = kMaxAlignment;
  while (a > 1 && reinterpret_cast<uintptr_t>(p) % a != 0) a /= 2;
  return static_cast<uint32_t>(a);
}

// One handle per device, created on first use and kept for the life of the process (destroying
// it at exit could run after the CUDA context is gone).
cublasLtHandle_t handle_for(int device) {
  static std::mutex mutex;
  static std::map<int, cublasLtHandle_t> handles;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = handles.find(device);
  if (it != handles.end()) return it->second;
  cublasLtHandle_t h = nullptr;
  OMNIMOE_CUBLASLT_CHECK(cublasLtCreate(&h));
  handles.emplace(device, h);
  return h;
}

// Everything that decides the descriptors and the algorithm.
struct PlanKey {
  int device;
  int a_type, c_type;
  bool trans_a, trans_b;
  int64_t m, n, k, lda, ldb, ldc;
  int64_t ld_addend;  // the added matrix's row stride when it is not D; else 0
  uint32_t align_a, align_b, align_c;
  size_t workspace;
  int sm_count;  // 0: all
  int batch;     // products in one launch (gemm_pair: 2), their operands evenly spaced
  int64_t stride_a, stride_b, stride_c;  // elements from one product's operand to the next's
  auto tie() const {
    return std::tie(device, a_type, c_type, trans_a, trans_b, m, n, k, lda, ldb, ldc, ld_addend,
                    align_a, align_b, align_c, workspace, sm_count, batch, stride_a, stride_b,
                    stride_c);
  }
  bool operator<(const PlanKey& o) const { return tie() < o.tie(); }
};

// Descriptors and the heuristic's choice for one key; immutable once built.
struct Plan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t first = nullptr, second = nullptr, out = nullptr;
  cublasLtMatrixLayout_t in = nullptr;  // the added matrix's, when it is not D's
  cublasLtMatmulAlgo_t algo{};
  bool f64 = false;
  bool found = true;  // false: no algorithm for a batched key (gemm_pair then runs two products)
  cublasLtMatrixLayout_t added() const { return in ? in : out; }
  ~Plan() {
    if (in) cublasLtMatrixLayoutDestroy(in);
    if (out) cublasLtMatrixLayoutDestroy(out);
    if (second) cublasLtMatrixLayoutDestroy(second);
    if (first) cublasLtMatrixLayoutDestroy(first);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

std::unique_ptr<Plan> build_plan(cublasLtHandle_t handle, const PlanKey& key) {
  auto plan = std::make_unique<Plan>();
  const auto ab = static_cast<cudaDataType_t>(key.a_type);
  const auto ct = static_cast<cudaDataType_t>(key.c_type);
  plan->f64 = ab == CUDA_R_64F;
  // Plain FP32 (no TF32) for f32 inputs: the CPU backend is the oracle.
  const cublasComputeType_t compute = plan->f64 ? CUBLAS_COMPUTE_64F : CUBLAS_COMPUTE_32F;
  const cudaDataType_t scale = plan->f64 ? CUDA_R_64F : CUDA_R_32F;
  OMNIMOE_CUBLASLT_CHECK(cublasLtMatmulDescCreate(&plan->op, compute, scale));

  // cuBLASLt's first operand is our B, its second is our A (see the top of the file).
  const cublasOperation_t op_first = key.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_second = key.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  if (key.sm_count > 0) {
    const int32_t sms = key.sm_count;
    OMNIMOE_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(
        plan->op, CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET, &sms, sizeof(sms)));
  }
  OMNIMOE_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_TRANSA,
                                                        &op_first, sizeof(op_first)));
  OMNIMOE_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_TRANSB,
                                                        &op_second, sizeof(op_second)));

  // Stored shapes, column-major: B row-major [k, n] (or [n, k]) is [n, k] (or [k, n]).
  const uint64_t m = key.m, n = key.n, k = key.k;
  OMNIMOE_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&plan->first, ab, key.trans_b ? k : n,
                                                    key.trans_b ? n : k, key.ldb));
  OMNIMOE_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&plan->second, ab, key.trans_a ? m : k,
                                                    key.trans_a ? k : m, key.lda));
  OMNIMOE_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&plan->out, ct, n, m, key.ldc));
  if (key.ld_addend > 0) {
    OMNIMOE_CUBLASLT_CHECK(cublasLtMatrixLayoutCreate(&plan->in, ct, n, m, key.ld_addend));
  }
  if (key.batch > 1) {
    const int32_t count = key.batch;
    const std::pair<cublasLtMatrixLayout_t, int64_t> strided[3] = {
        {plan->first, key.stride_b}, {plan->second, key.stride_a}, {plan->out, key.stride_c}};
    for (const auto& [layout, stride] : strided) {
      OMNIMOE_CUBLASLT_CHECK(cublasLtMatrixLayoutSetAttribute(
          layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof(count)));
      OMNIMOE_CUBLASLT_CHECK(cublasLtMatrixLayoutSetAttribute(
          layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof(stride)));
    }
  }

  cublasLtMatmulPreference_t pref = nullptr;
  OMNIMOE_CUBLASLT_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  // Destroys the preference however this function exits.
  std::unique_ptr<cublasLtMatmulPreferenceOpaque_t, cublasStatus_t (*)(cublasLtMatmulPreference_t)>
      pref_owner(pref, cublasLtMatmulPreferenceDestroy);
  const uint64_t ws = key.workspace;
  OMNIMOE_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
  const uint32_t aligns[4] = {key.align_b, key.align_a, key.align_c, key.align_c};
  const cublasLtMatmulPreferenceAttributes_t align_attrs[4] = {
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
  for (int i = 0; i < 4; ++i) {
    OMNIMOE_CUBLASLT_CHECK(
        cublasLtMatmulPreferenceSetAttribute(pref, align_attrs[i], &aligns[i], sizeof(uint32_t)));
  }

  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  OMNIMOE_CUBLASLT_CHECK(cublasLtMatmulAlgoGetHeuristic(handle, plan->op, plan->first,
                                                        plan->second, plan->added(), plan->out,
                                                        pref, 1, &result, &found));
  if (found == 0 && key.batch > 1) {
    plan->found = false;
    return plan;
  }
  OMNIMOE_CHECK(found > 0, "gemm: cuBLASLt found no algorithm for m=", key.m, " n=", key.n,
                " k=", key.k, " (", key.trans_a ? "A^T" : "A", " * ", key.trans_b ? "B^T" : "B",
                ", lda=", key.lda, " ldb=", key.ldb, " ldc=", key.ldc, ")");
  plan->algo = result.algo;
  return plan;
}

// Plans are built once per key and never freed, so a returned pointer stays valid.
const Plan& plan_for(cublasLtHandle_t handle, const PlanKey& key) {
  static std::mutex mutex;
  static std::map<PlanKey, std::unique_ptr<Plan>> plans;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = plans.find(key);
  if (it == plans.end()) it = plans.emplace(key, build_plan(handle, key)).first;
  return *it->second;
}

// C = beta * C for k = 0 (no products); beta = 0 writes zeros without reading C.
template <typename T>
__global__ void scale_rows_kernel(T* c, int64_t rows, int64_t cols, int64_t ldc, float beta) {
  const int64_t total = rows * cols;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    T* p = c + (i / cols) * ldc + i % cols;
    *p = beta == 0.0f ? store_float<T>(0.0f) : store_float<T>(beta * load_float(*p));
  }
}

template <>
__global__ void scale_rows_kernel<double>(double* c, int64_t rows, int64_t cols, int64_t ldc,
                                          float beta) {
  const int64_t total = rows * cols;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    double* p = c + (i / cols) * ldc + i % cols;
    *p = beta == 0.0f ? 0.0 : double(beta) * *p;
  }
}

void scale_rows(const TensorView& c, float beta, cudaStream_t stream) {
  if (beta == 1.0f) return;
  const int64_t rows = c.shape[0], cols = c.shape[1];
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(rows * cols, threads), 4096));
  dispatch_storage(c.dtype, [&](auto tag) {
    using T = decltype(tag);
    scale_rows_kernel<T><<<blocks, threads, 0, stream>>>(static_cast<T*>(c.data), rows, cols,
                                                         c.strides[0], beta);
  });
  OMNIMOE_CUDA_CHECK_LAUNCH("scale_rows_kernel");
}

void check_operand(const char* name, const TensorView& t) {
  OMNIMOE_CHECK(t.ndim == 2, "gemm: ", name, " must be 2-D, got ", t.ndim, " dimensions");
  OMNIMOE_CHECK(t.strides[1] == 1 || t.shape[1] <= 1, "gemm: ", name,
                " must have a contiguous last dimension (stride 1), got stride ", t.strides[1]);
  OMNIMOE_CHECK(t.strides[0] >= t.shape[1] || t.shape[0] <= 1, "gemm: ", name,
                " row stride must be >= its columns (", t.shape[1], "), got ", t.strides[0]);
}

}  // namespace

size_t gemm_workspace_bytes() { return kWorkspaceBytes; }

namespace {

// A second product's operands, `a`, `b` and `c` elements after the first's (gemm_pair).
struct SecondProduct {
  int64_t a, b, c;
  uint32_t align_a, align_b, align_c;  // of the second product's pointers
};

// C = alpha op(A) op(B) + beta * (addend ? *addend : C), and the same for `second` in the same
// launch when given. False (nothing issued) when cuBLASLt has no algorithm for the pair.
bool gemm_into(const TensorView& a, bool trans_a, const TensorView& b, bool trans_b,
               const TensorView* addend, const TensorView& c, float alpha, float beta,
               Buffer workspace, const Exec& exec, const SecondProduct* second = nullptr) {
  check_operand("A", a);
  check_operand("B", b);
  check_operand("C", c);
  if (addend) {
    check_operand("the addend", *addend);
    OMNIMOE_CHECK(addend->dtype == c.dtype && addend->shape[0] == c.shape[0] &&
                      addend->shape[1] == c.shape[1],
                  "gemm: the addend must have D's dtype and shape (", dtype_name(c.dtype), " [",
                  c.shape[0], ", ", c.shape[1], "]), got ", dtype_name(addend->dtype), " [",
                  addend->shape[0], ", ", addend->shape[1], "]");
  }
  const int64_t m = trans_a ? a.shape[1] : a.shape[0];
  const int64_t k = trans_a ? a.shape[0] : a.shape[1];
  const int64_t kb = trans_b ? b.shape[1] : b.shape[0];
  const int64_t n = trans_b ? b.shape[0] : b.shape[1];
  OMNIMOE_CHECK(kb == k, "gemm: inner dimensions differ: op(A) is [", m, ", ", k, "], op(B) is [",
                kb, ", ", n, "]");
  OMNIMOE_CHECK(c.shape[0] == m && c.shape[1] == n, "gemm: C must have shape [", m, ", ", n,
                "], got [", c.shape[0], ", ", c.shape[1], "]");
  OMNIMOE_CHECK(a.dtype == b.dtype, "gemm: A and B must share a dtype, got ",
                dtype_name(a.dtype), " and ", dtype_name(b.dtype));
  OMNIMOE_CHECK(c.dtype == a.dtype || (c.dtype == DType::f32 && a.dtype != DType::f64),
                "gemm: C must have A's dtype (", dtype_name(a.dtype),
                ") or f32 (not with f64 inputs), got ", dtype_name(c.dtype));
  const cudaDataType_t ab_type = cuda_type(a.dtype);
  const cudaDataType_t c_type = cuda_type(c.dtype);

  DeviceGuard guard(exec);
  const cudaStream_t stream = stream_of(exec);
  if (m == 0 || n == 0) return true;
  if (k == 0) {  // no products: C = beta * C (or beta * addend)
    if (addend && beta != 0.0f) {
      const size_t elem = dtype_size(c.dtype);
      const size_t width = static_cast<size_t>(n) * elem;
      OMNIMOE_CUDA_CHECK(cudaMemcpy2DAsync(
          c.data, static_cast<size_t>(std::max(c.strides[0], n)) * elem, addend->data,
          static_cast<size_t>(std::max(addend->strides[0], n)) * elem, width,
          static_cast<size_t>(m), cudaMemcpyDeviceToDevice, stream));
    }
    scale_rows(c, beta, stream);
    return true;
  }

  // The caller's workspace, aligned up to 256 bytes for cuBLASLt.
  const uintptr_t raw = reinterpret_cast<uintptr_t>(workspace.data);
  const uintptr_t aligned = (raw + kMaxAlignment - 1) / kMaxAlignment * kMaxAlignment;
  const size_t lost = workspace.data ? aligned - raw : 0;
  // Capped so that callers with different slack share one plan.
  const size_t ws_bytes = std::min(workspace.bytes > lost ? workspace.bytes - lost : 0,
                                   kWorkspaceBytes);
  void* ws_ptr = ws_bytes > 0 ? reinterpret_cast<void*>(aligned) : nullptr;

  PlanKey key{};
  key.device = exec.device.index;
  key.a_type = ab_type;
  key.c_type = c_type;
  key.trans_a = trans_a;
  key.trans_b = trans_b;
  key.m = m;
  key.n = n;
  key.k = k;
  // A leading dimension must cover the stored rows even for a single-row view.
  key.lda = std::max(a.strides[0], a.shape[1]);
  key.ldb = std::max(b.strides[0], b.shape[1]);
  key.ldc = std::max(c.strides[0], c.shape[1]);
  if (addend && std::max(addend->strides[0], n) != key.ldc) {
    key.ld_addend = std::max(addend->strides[0], n);
  }
  key.align_a = alignment_of(a.data);
  key.align_b = alignment_of(b.data);
  key.align_c = std::min(alignment_of(c.data), addend ? alignment_of(addend->data) : 256u);
  key.workspace = ws_bytes;
  key.sm_count = exec.sm_count;
  key.batch = 1;
  if (second != nullptr) {
    key.batch = 2;
    key.stride_a = second->a;
    key.stride_b = second->b;
    key.stride_c = second->c;
    key.align_a = std::min(key.align_a, second->align_a);
    key.align_b = std::min(key.align_b, second->align_b);
    key.align_c = std::min(key.align_c, second->align_c);
  }

  const cublasLtHandle_t handle = handle_for(exec.device.index);
  const Plan& plan = plan_for(handle, key);
  if (!plan.found) return false;
  const double alpha64 = alpha, beta64 = beta;
  const void* alpha_ptr = plan.f64 ? static_cast<const void*>(&alpha64) : &alpha;
  const void* beta_ptr = plan.f64 ? static_cast<const void*>(&beta64) : &beta;
  OMNIMOE_CUBLASLT_CHECK(cublasLtMatmul(handle, plan.op, alpha_ptr, b.data, plan.first, a.data,
                                        plan.second, beta_ptr, addend ? addend->data : c.data,
                                        plan.added(), c.data, plan.out, &plan.algo, ws_ptr,
                                        ws_bytes, stream));
  return true;
}

}  // namespace

void gemm(const TensorView& a, bool trans_a, const TensorView& b, bool trans_b,
          const TensorView& c, float alpha, float beta, Buffer workspace, const Exec& exec) {
  gemm_into(a, trans_a, b, trans_b, nullptr, c, alpha, beta, workspace, exec);
}

void gemm(const TensorView& a, bool trans_a, const TensorView& b, bool trans_b,
          const TensorView& addend, const TensorView& d, float alpha, float beta,
          Buffer workspace, const Exec& exec) {
  gemm_into(a, trans_a, b, trans_b, &addend, d, alpha, beta, workspace, exec);
}

namespace {

bool same_layout(const TensorView& x, const TensorView& y) {
  return x.dtype == y.dtype && x.ndim == 2 && y.ndim == 2 && x.shape[0] == y.shape[0] &&
         x.shape[1] == y.shape[1] && x.strides[0] == y.strides[0] && x.strides[1] == y.strides[1];
}

// Elements from `first` to `second` when the difference is whole and not negative; else -1.
int64_t element_offset(const TensorView& first, const TensorView& second) {
  const auto bytes =
      reinterpret_cast<intptr_t>(second.data) - reinterpret_cast<intptr_t>(first.data);
  const auto elem = static_cast<intptr_t>(dtype_size(first.dtype));
  return bytes >= 0 && bytes % elem == 0 ? static_cast<int64_t>(bytes / elem) : -1;
}

// OMNIMOE_GEMM_PAIR=separate runs every pair as two products (to time both ways).
bool pairs_batched() {
  static const bool batched = !detail::env_equals("OMNIMOE_GEMM_PAIR", "separate");
  return batched;
}

}  // namespace

bool gemm_pair(const TensorView (&a)[2], bool trans_a, const TensorView (&b)[2], bool trans_b,
               const TensorView (&c)[2], float alpha, float beta, Buffer workspace,
               const Exec& exec) {
  const int64_t off_a = element_offset(a[0], a[1]), off_b = element_offset(b[0], b[1]),
                off_c = element_offset(c[0], c[1]);
  const int64_t k = a[0].ndim == 2 ? a[0].shape[trans_a ? 0 : 1] : 0;
  // The second C must start past the first's last element: the two are written together.
  const int64_t c_extent =
      c[0].ndim == 2 ? (c[0].shape[0] - 1) * c[0].strides[0] + c[0].shape[1] : 0;
  const bool batched = pairs_batched() && same_layout(a[0], a[1]) && same_layout(b[0], b[1]) &&
                       same_layout(c[0], c[1]) && off_a >= 0 && off_b >= 0 &&
                       off_c >= c_extent && k > 0 && a[0].dtype != DType::f64;
  if (batched) {
    const SecondProduct second{off_a,
                               off_b,
                               off_c,
                               alignment_of(a[1].data),
                               alignment_of(b[1].data),
                               alignment_of(c[1].data)};
    if (gemm_into(a[0], trans_a, b[0], trans_b, nullptr, c[0], alpha, beta, workspace, exec,
                  &second)) {
      return true;
    }
  }
  gemm(a[0], trans_a, b[0], trans_b, c[0], alpha, beta, workspace, exec);
  gemm(a[1], trans_a, b[1], trans_b, c[1], alpha, beta, workspace, exec);
  return false;
}

}  // namespace omnimoe::cuda
