// Brute-force experts and shared MLP of SPEC.md steps 7 and 8, in double, token by token.
#include <cmath>

#include "reference.h"

namespace omnimoe::test::reference {

double activate(Activation act, double z) {
  switch (act) {
    case Activation::silu:
      return z / (1.0 + std::exp(-z));
    case Activation::gelu:
      return 0.5 * z * (1.0 + std::erf(z / std::sqrt(2.0)));
    case Activation::relu:
      return z > 0.0 ? z : 0.0;
  }
  return z;
}

Matrix experts(const LayerConfig& cfg, const Matrix& x, int64_t tokens, const Matrix& up,
               const Matrix& down, const Routing& routing) {
  const int64_t d = cfg.hidden, K = cfg.top_k;
  Matrix y(static_cast<size_t>(tokens * d), 0.0);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t e = routing.indices[t * K + k];
      double a = 0.0;
      for (int64_t j = 0; j < d; ++j) a += x[t * d + j] * up[e * d + j];
      const double h = routing.gates[t * K + k] * activate(cfg.act, a);
      for (int64_t j = 0; j < d; ++j) y[t * d + j] += h * down[e * d + j];
    }
  }
  return y;
}

Matrix mlp(const LayerConfig& cfg, const Matrix& x, int64_t tokens, const Matrix& gate,
           const Matrix& up, const Matrix& down) {
  const int64_t d = cfg.hidden, I = cfg.intermediate;
  Matrix y(static_cast<size_t>(tokens * d), 0.0);
  std::vector<double> h(static_cast<size_t>(I));
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t i = 0; i < I; ++i) {
      double g = 0.0, u = 0.0;
      for (int64_t j = 0; j < d; ++j) {
        g += gate[i * d + j] * x[t * d + j];
        u += up[i * d + j] * x[t * d + j];
      }
      h[i] = g / (1.0 + std::exp(-g)) * u;
    }
    for (int64_t j = 0; j < d; ++j) {
      double s = 0.0;
      for (int64_t i = 0; i < I; ++i) s += down[j * I + i] * h[i];
      y[t * d + j] = s;
    }
  }
  return y;
}

}  // namespace omnimoe::test::reference
