#include <string>

#include "baselines/cuda_util.cuh"

namespace omnimoe::tool {

void throw_cuda(const char* call, const char* error_name, const char* message) {
  throw Error(std::string(call) + " failed: " + error_name + " (" + message + ")");
}

namespace {

cudaDataType_t cuda_type(DType dtype) {
  switch (dtype) {
    case DType::bf16:
      return CUDA_R_16BF;
    case DType::f16:
      return CUDA_R_16F;
    case DType::f32:
      return CUDA_R_32F;
    default:
      break;
  }
  throw Error(std::string("LtGemm: unsupported dtype ") + dtype_name(dtype));
}

}  // namespace

LtGemm::LtGemm(size_t workspace_bytes) : workspace_bytes_(workspace_bytes) {
  TOOL_CUBLAS_CHECK(cublasLtCreate(&handle_));
  TOOL_CUDA_CHECK(cudaMalloc(&workspace_, workspace_bytes_));
}

LtGemm::~LtGemm() {
  for (auto& [key, p] : plans_) {
    cublasLtMatrixLayoutDestroy(p.a);
    cublasLtMatrixLayoutDestroy(p.b);
    cublasLtMatrixLayoutDestroy(p.c);
    cublasLtMatmulDescDestroy(p.op);
  }
  cudaFree(workspace_);
  cublasLtDestroy(handle_);
}

// Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T, and a row-major matrix read
// column-major is its transpose: so B goes first, each keeping its own transpose flag.
LtGemm::Plan& LtGemm::plan(DType dtype, int64_t lda, bool trans_a, int64_t ldb, bool trans_b,
                           int64_t ldc, int64_t m, int64_t n, int64_t k) {
  const Key key{static_cast<int>(dtype), lda, ldb, trans_a, ldc, m, n, k, trans_b};
  auto it = plans_.find(key);
  if (it != plans_.end()) return it->second;

  Plan p;
  const cudaDataType_t t = cuda_type(dtype);
  TOOL_CUBLAS_CHECK(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t op_first = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_second = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  TOOL_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &op_first,
                                                   sizeof op_first));
  TOOL_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &op_second,
                                                   sizeof op_second));
  // First operand (B): column-major n x k, stored k x n when transposed.
  TOOL_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.a, t, trans_b ? k : n, trans_b ? n : k, ldb));
  // Second operand (A): column-major k x m, stored m x k when transposed.
  TOOL_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.b, t, trans_a ? m : k, trans_a ? k : m, lda));
  TOOL_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.c, t, n, m, ldc));

  cublasLtMatmulPreference_t pref = nullptr;
  TOOL_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  TOOL_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace_bytes_, sizeof workspace_bytes_));
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  const cublasStatus_t st =
      cublasLtMatmulAlgoGetHeuristic(handle_, p.op, p.a, p.b, p.c, p.c, pref, 1, &result, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  if (st != CUBLAS_STATUS_SUCCESS || found == 0) {
    cublasLtMatrixLayoutDestroy(p.a);
    cublasLtMatrixLayoutDestroy(p.b);
    cublasLtMatrixLayoutDestroy(p.c);
    cublasLtMatmulDescDestroy(p.op);
    throw Error("cuBLASLt has no algorithm for a " + std::to_string(m) + " x " + std::to_string(n) +
                " x " + std::to_string(k) + " " + dtype_name(dtype) + " product");
  }
  p.algo = result.algo;
  return plans_.emplace(key, p).first->second;
}

void LtGemm::run(DType dtype, const void* a, int64_t lda, bool trans_a, const void* b, int64_t ldb,
                 bool trans_b, void* c, int64_t ldc, int64_t m, int64_t n, int64_t k,
                 cudaStream_t stream) {
  Plan& p = plan(dtype, lda, trans_a, ldb, trans_b, ldc, m, n, k);
  const float alpha = 1.0f, beta = 0.0f;
  TOOL_CUBLAS_CHECK(cublasLtMatmul(handle_, p.op, &alpha, b, p.a, a, p.b, &beta, c, p.c, c, p.c,
                                   &p.algo, workspace_, workspace_bytes_, stream));
}

}  // namespace omnimoe::tool
