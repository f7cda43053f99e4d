// Brute-force definitions of SPEC.md, written apart from the CPU backend, in double precision.
// Slow on purpose: the router scores all N experts, the experts run token by token.
#pragma once

#include <omnimoe/omnimoe.h>

#include <cstdint>
#include <vector>

namespace omnimoe::test::reference {

using Matrix = std::vector<double>;  // row-major

struct Routing {
  std::vector<int32_t> indices;  // [T, K]
  std::vector<double> scores;    // [T, K]
  std::vector<double> gates;     // [T, K]
};

// log_softmax of (optionally batch-normalised) logits, per token; `running_*` as in
// RouterNormState (updated when training); returns [T, n] log-probabilities.
Matrix router_logp(const LayerConfig& cfg, const Matrix& x, int64_t tokens, const Matrix& w,
                   int64_t n, bool training, std::vector<double>* running_mean,
                   std::vector<double>* running_var);

// Top K over all N pair sums (computed in float, as the spec's fp32 scores), ties by smaller id.
Routing select(const LayerConfig& cfg, const std::vector<float>& row_logp,
               const std::vector<float>& col_logp, int64_t tokens);

double activate(Activation act, double z);

// y = mlp(x) + experts(x), the layer as the sum of its parts.
Matrix experts(const LayerConfig& cfg, const Matrix& x, int64_t tokens, const Matrix& up,
               const Matrix& down, const Routing& routing);
Matrix mlp(const LayerConfig& cfg, const Matrix& x, int64_t tokens, const Matrix& gate,
           const Matrix& up, const Matrix& down);

}  // namespace omnimoe::test::reference
