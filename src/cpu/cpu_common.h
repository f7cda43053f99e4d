// Shared pieces of the CPU backend: typed element access, dtype dispatch, a plain GEMM and the
// activations. Plain loops, wide accumulation (float, or double for f64 storage), OpenMP.
#pragma once

#include <omnimoe/omnimoe.h>
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "core/check.h"
#include "core/half.h"

namespace omnimoe::cpu {

// Accumulation type for a storage type: double for f64, float otherwise.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Calls fn(T{}) with T the C++ storage type of `dtype` (float, double, bf16_t, f16_t).
template <typename Fn>
decltype(auto) dispatch_storage(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::f32: return fn(float{});
    case DType::f64: return fn(double{});
    case DType::bf16: return fn(bf16_t{});
    case DType::f16: return fn(f16_t{});
    default: break;
  }
  OMNIMOE_FAIL("cpu backend: unsupported storage dtype ", dtype_name(dtype));
}

template <typename T>
inline T* row_ptr(const TensorView& t, int64_t row) {
  return static_cast<T*>(t.data) + row * t.strides[0];
}

// OpenMP threads for this call.
inline int thread_count(const Exec& exec) {
  return exec.num_threads > 0 ? exec.num_threads : omp_get_max_threads();
}

// Throws Error naming `op` and `arg` at the first id of the [pairs / top_k, top_k] matrix `ids`
// outside [0, n): used as a row index it would read or write out of bounds. Called before
// anything is written.
inline void check_expert_ids(const char* op, const char* arg, const int32_t* ids, int64_t pairs,
                             int64_t top_k, int64_t n) {
  for (int64_t p = 0; p < pairs; ++p) {
    OMNIMOE_CHECK(ids[p] >= 0 && ids[p] < n, op, ": ", arg, " must hold expert ids in [0, ", n,
                  "), got ", ids[p], " at [", p / top_k, ", ", p % top_k, "]");
  }
}

// dst += src for [T, d] views of one storage dtype with any row strides; float math (double for
// f64), one rounding (elementwise.cpp): the join of the layer's two branches (mlp_*_joined).
void tensor_add(const TensorView& dst, const TensorView& src, const Exec& exec);

// C(i, j) = [C(i, j) +] sum_k A(i, k) * B(k, j), where A(i, k) = a[i*sa0 + k*sa1] and
// B(k, j) = b[k*sb0 + j*sb1]; C is row-major with row stride ldc. Parallel over rows of C.
template <typename Acc, typename TA, typename TB, typename TC>
void gemm(int64_t M, int64_t N, int64_t K, const TA* a, int64_t sa0, int64_t sa1, const TB* b,
          int64_t sb0, int64_t sb1, TC* c, int64_t ldc, bool accumulate, int threads) {
  if (M == 0 || N == 0) return;
  const bool dot_form = sa1 == 1 && sb0 == 1;  // both operands contiguous along k
#pragma omp parallel num_threads(threads)
  {
    std::vector<Acc> row(static_cast<size_t>(N));
#pragma omp for schedule(static)
    for (int64_t i = 0; i < M; ++i) {
      if (dot_form) {
        const TA* ai = a + i * sa0;
        for (int64_t j = 0; j < N; ++j) {
          const TB* bj = b + j * sb1;
          // Eight partial sums in a fixed order: the compiler vectorises them (one running sum
          // cannot be reordered under strict IEEE rules), and the result stays deterministic.
          constexpr int kLanes = 8;
          Acc part[kLanes] = {};
          int64_t k = 0;
          for (; k + kLanes <= K; k += kLanes) {
            for (int l = 0; l < kLanes; ++l) {
              part[l] += Acc(to_float(ai[k + l])) * Acc(to_float(bj[k + l]));
            }
          }
          Acc s = 0;
          for (; k < K; ++k) s += Acc(to_float(ai[k])) * Acc(to_float(bj[k]));
          for (int l = 0; l < kLanes; ++l) s += part[l];
          row[j] = s;
        }
      } else {
        for (int64_t j = 0; j < N; ++j) row[j] = 0;
        for (int64_t k = 0; k < K; ++k) {
          const Acc aik = Acc(to_float(a[i * sa0 + k * sa1]));
          const TB* bk = b + k * sb0;
          for (int64_t j = 0; j < N; ++j) row[j] += aik * Acc(to_float(bk[j * sb1]));
        }
      }
      TC* ci = c + i * ldc;
      for (int64_t j = 0; j < N; ++j) {
        const Acc v = accumulate ? Acc(to_float(ci[j])) + row[j] : row[j];
        ci[j] = from_double<TC>(static_cast<double>(v));
      }
    }
  }
}

// act(z) and d act / dz.
template <typename Acc>
inline Acc activate(Activation act, Acc z) {
  switch (act) {
    case Activation::silu: return z / (Acc(1) + std::exp(-z));
    case Activation::gelu: return Acc(0.5) * z * (Acc(1) + std::erf(z * Acc(M_SQRT1_2)));
    case Activation::relu: return z > Acc(0) ? z : Acc(0);
  }
  return z;
}

template <typename Acc>
inline Acc activate_grad(Activation act, Acc z) {
  switch (act) {
    case Activation::silu: {
      const Acc s = Acc(1) / (Acc(1) + std::exp(-z));
      return s * (Acc(1) + z * (Acc(1) - s));
    }
    case Activation::gelu: {
      const Acc cdf = Acc(0.5) * (Acc(1) + std::erf(z * Acc(M_SQRT1_2)));
      const Acc pdf = std::exp(Acc(-0.5) * z * z) * Acc(0.3989422804014327);  // 1/sqrt(2 pi)
      return cdf + z * pdf;
    }
    case Activation::relu: return z > Acc(0) ? Acc(1) : Acc(0);
  }
  return Acc(1);
}

}  // namespace omnimoe::cpu
