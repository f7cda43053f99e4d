// Dense matrix products for the CUDA backend through cuBLASLt (router logits and gradients,
// the shared MLP, baselines). Row-major views in, fp32 accumulation whatever the storage type.
#pragma once

#include <omnimoe/omnimoe.h>

namespace omnimoe::cuda {

// C = alpha * op(A) * op(B) + beta * C with row-major 2-D views (inner stride 1, any row
// stride). op(A) is [m, k]: A is [m, k], or [k, m] when trans_a. op(B) is [k, n]: B is [k, n],
// or [n, k] when trans_b. A and B share a dtype (f32, f64, bf16, f16); C has A's dtype or f32.
// beta = 0 never reads C (it may hold NaN). Capturable in a CUDA graph; no allocation: the
// cuBLASLt workspace comes from `workspace` (gemm_workspace_bytes()).
void gemm(const TensorView& a, bool trans_a, const TensorView& b, bool trans_b,
          const TensorView& c, float alpha, float beta, Buffer workspace, const Exec& exec);
// D = alpha * op(A) * op(B) + beta * addend: the same product written to another matrix than the
// one it adds (a join of two branches without a separate add). addend has D's shape and dtype
// (any row stride) and does not overlap D.
void gemm(const TensorView& a, bool trans_a, const TensorView& b, bool trans_b,
          const TensorView& addend, const TensorView& d, float alpha, float beta,
          Buffer workspace, const Exec& exec);
// Two products of one shape and layout, C_i = alpha * op(A_i) * op(B_i) + beta * C_i, as one
// batched cuBLASLt launch when each operand's second matrix lies a fixed whole number of
// elements at or after its first (A_1 may be A_0), the second C past the first, k > 0 and the
// inputs are not f64; otherwise as two products. Returns whether they ran as one launch.
// Small products (the router's two logits products) fill twice the SMs in one launch.
bool gemm_pair(const TensorView (&a)[2], bool trans_a, const TensorView (&b)[2], bool trans_b,
               const TensorView (&c)[2], float alpha, float beta, Buffer workspace,
               const Exec& exec);
size_t gemm_workspace_bytes();

}  // namespace omnimoe::cuda
