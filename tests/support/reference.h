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

// The logits x W^T ([T, n], w is [n, d]), batch-normalised when cfg.router_norm = batch:
// training uses the batch mean and biased variance and updates `running_*` (momentum, unbiased
// variance, as torch.nn.BatchNorm1d); evaluation uses `running_*`. `rstd`, when given, receives
// the 1/sqrt(var + eps) used (left empty for router_norm = none).
Matrix router_logits(const LayerConfig& cfg, const Matrix& x, int64_t tokens, const Matrix& w,
                     int64_t n, bool training, std::vector<double>* running_mean,
                     std::vector<double>* running_var, std::vector<double>* rstd = nullptr);

// log_softmax of (optionally batch-normalised) logits, per token; `running_*` as in
// RouterNormState (updated when training); returns [T, n] log-probabilities.
Matrix router_logp(const LayerConfig& cfg, const Matrix& x, int64_t tokens, const Matrix& w,
                   int64_t n, bool training, std::vector<double>* running_mean,
                   std::vector<double>* running_var);

// The gates of one token's K scores: softmax over them, or exp(S) for gating = joint.
std::vector<double> router_gates(const LayerConfig& cfg, const double* scores, int64_t k);

// Top K over all N pair sums (computed in float, as the spec's fp32 scores), ties by smaller id;
// a NaN sum ranks as -inf (the score keeps the NaN).
Routing select(const LayerConfig& cfg, const std::vector<float>& row_logp,
               const std::vector<float>& col_logp, int64_t tokens);

double activate(Activation act, double z);

// y = mlp(x) + experts(x), the layer as the sum of its parts.
Matrix experts(const LayerConfig& cfg, const Matrix& x, int64_t tokens, const Matrix& up,
               const Matrix& down, const Routing& routing);
Matrix mlp(const LayerConfig& cfg, const Matrix& x, int64_t tokens, const Matrix& gate,
           const Matrix& up, const Matrix& down);

}  // namespace omnimoe::test::reference
