// Brute-force router of SPEC.md steps 1 to 6, in double: every one of the N pair scores is formed
// and ranked.
#include <algorithm>
#include <cmath>
#include <limits>

#include "reference.h"

namespace omnimoe::test::reference {

Matrix router_logits(const LayerConfig& cfg, const Matrix& x, int64_t tokens, const Matrix& w,
                     int64_t n, bool training, std::vector<double>* running_mean,
                     std::vector<double>* running_var, std::vector<double>* rstd) {
  const int64_t d = cfg.hidden;
  Matrix s(static_cast<size_t>(tokens * n), 0.0);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t i = 0; i < n; ++i) {
      double a = 0.0;
      for (int64_t j = 0; j < d; ++j) a += x[t * d + j] * w[i * d + j];
      s[t * n + i] = a;
    }
  }
  if (rstd) rstd->clear();
  if (cfg.router_norm == RouterNorm::none) return s;
  if (rstd) rstd->assign(static_cast<size_t>(n), 0.0);
  const double eps = cfg.norm_eps, momentum = cfg.norm_momentum;
  for (int64_t i = 0; i < n; ++i) {
    double mean, var;
    if (training) {
      mean = 0.0;
      for (int64_t t = 0; t < tokens; ++t) mean += s[t * n + i];
      mean /= static_cast<double>(tokens);
      double sq = 0.0;
      for (int64_t t = 0; t < tokens; ++t) sq += (s[t * n + i] - mean) * (s[t * n + i] - mean);
      var = sq / static_cast<double>(tokens);
      (*running_mean)[i] = (1.0 - momentum) * (*running_mean)[i] + momentum * mean;
      (*running_var)[i] =
          (1.0 - momentum) * (*running_var)[i] + momentum * sq / static_cast<double>(tokens - 1);
    } else {
      mean = (*running_mean)[i];
      var = (*running_var)[i];
    }
    const double r = 1.0 / std::sqrt(var + eps);
    if (rstd) (*rstd)[i] = r;
    for (int64_t t = 0; t < tokens; ++t) s[t * n + i] = (s[t * n + i] - mean) * r;
  }
  return s;
}

Matrix router_logp(const LayerConfig& cfg, const Matrix& x, int64_t tokens, const Matrix& w,
                   int64_t n, bool training, std::vector<double>* running_mean,
                   std::vector<double>* running_var) {
  Matrix z = router_logits(cfg, x, tokens, w, n, training, running_mean, running_var);
  for (int64_t t = 0; t < tokens; ++t) {
    double* row = z.data() + t * n;
    double m = -std::numeric_limits<double>::infinity();
    for (int64_t i = 0; i < n; ++i) m = std::max(m, row[i]);
    double sum = 0.0;
    for (int64_t i = 0; i < n; ++i) sum += std::exp(row[i] - m);
    const double lse = m + std::log(sum);
    for (int64_t i = 0; i < n; ++i) row[i] -= lse;
  }
  return z;
}

std::vector<double> router_gates(const LayerConfig& cfg, const double* scores, int64_t k) {
  std::vector<double> g(static_cast<size_t>(k));
  if (cfg.gating == Gating::joint) {
    for (int64_t q = 0; q < k; ++q) g[q] = std::exp(scores[q]);
    return g;
  }
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t q = 0; q < k; ++q) {
    if (scores[q] > m) m = scores[q];
  }
  double sum = 0.0;
  for (int64_t q = 0; q < k; ++q) {
    g[q] = std::exp(scores[q] - m);
    sum += g[q];
  }
  for (int64_t q = 0; q < k; ++q) g[q] /= sum;
  return g;
}

Routing select(const LayerConfig& cfg, const std::vector<float>& row_logp,
               const std::vector<float>& col_logp, int64_t tokens) {
  const int64_t nr = cfg.grid_rows, nc = cfg.grid_cols, n = cfg.num_experts(), K = cfg.top_k;
  Routing r;
  r.indices.resize(static_cast<size_t>(tokens * K));
  r.scores.resize(static_cast<size_t>(tokens * K));
  r.gates.resize(static_cast<size_t>(tokens * K));
  std::vector<float> key(static_cast<size_t>(n));
  std::vector<int32_t> order(static_cast<size_t>(n));
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t e = 0; e < n; ++e) {
      const float s = row_logp[t * nr + e / nc] + col_logp[t * nc + e % nc];
      key[e] = std::isnan(s) ? -std::numeric_limits<float>::infinity() : s;
      order[e] = static_cast<int32_t>(e);
    }
    // Ordered by (key desc, id asc); only the first K positions are needed.
    std::partial_sort(order.begin(), order.begin() + K, order.end(), [&](int32_t a, int32_t b) {
      return key[a] > key[b] || (key[a] == key[b] && a < b);
    });
    for (int64_t k = 0; k < K; ++k) {
      const int32_t e = order[k];
      r.indices[t * K + k] = e;
      r.scores[t * K + k] = row_logp[t * nr + e / nc] + col_logp[t * nc + e % nc];
    }
    const std::vector<double> g = router_gates(cfg, r.scores.data() + t * K, K);
    std::copy(g.begin(), g.end(), r.gates.begin() + t * K);
  }
  return r;
}

}  // namespace omnimoe::test::reference
