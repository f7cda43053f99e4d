// The tolerance policy (docs/testing.md), shared by the tests and `omnimoe check`:
// |got - want| <= atol + rtol * |want|, per storage dtype, widened by sqrt(terms summed).
#pragma once

#include <omnimoe/tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace omnimoe {

struct Tolerance {
  double rtol;
  double atol;
};

inline Tolerance tolerance_for(DType dtype, int64_t terms) {
  const double growth = std::sqrt(static_cast<double>(std::max<int64_t>(terms, 1)));
  switch (dtype) {
    case DType::f64: return {1e-10 * growth, 1e-12 * growth};
    case DType::f32: return {2e-5 * growth, 1e-6 * growth};
    case DType::bf16: return {1.6e-2, 1e-2 * growth};
    case DType::f16: return {2e-3, 1e-3 * growth};
    default: return {0.0, 0.0};
  }
}

}  // namespace omnimoe
