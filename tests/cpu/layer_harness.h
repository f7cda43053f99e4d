// Inputs, parameters and buffers for the experts, MLP and layer tests of the CPU backend:
// random routings, a host-built schedule, and one owning set of layer tensors.
#pragma once

#include <gtest/gtest.h>
#include <omnimoe/omnimoe.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "reference.h"
#include "test_support.h"

namespace omnimoe::test {

// Raw bytes for the saved state and workspaces (malloc alignment: >= 16 bytes).
struct Bytes {
  std::vector<uint8_t> v;
  explicit Bytes(size_t n = 0) : v(n) {}
  Buffer buffer() { return {v.empty() ? nullptr : v.data(), v.size()}; }
};

// A copy of `src` in another dtype (dense rows).
inline HostTensor converted(const HostTensor& src, DType dtype, int64_t row_padding = 0) {
  HostTensor out(dtype, src.shape(), row_padding);
  for (int64_t i = 0; i < src.numel(); ++i) out.set(i, src.get(i));
  return out;
}

// How a routing spreads the tokens over the experts.
enum class Spread {
  random,   // K distinct experts per token, uniform over all N
  half,     // only experts [0, N/2) are chosen: the others must get zero gradients
  one_hot,  // every token's first choice is expert N/2: all tokens on one expert
};

inline const char* spread_name(Spread s) {
  return s == Spread::random ? "random" : s == Spread::half ? "half" : "onehot";
}

// i32 [T, K] indices, distinct per token.
inline HostTensor random_indices(int64_t tokens, int64_t K, int64_t N, Spread spread,
                                 uint64_t seed) {
  HostTensor idx(DType::i32, {tokens, K});
  std::mt19937_64 rng(seed);
  const int64_t pool = spread == Spread::half ? std::max<int64_t>(K, N / 2) : N;
  const int64_t hot = N / 2;
  std::vector<int32_t> ids(static_cast<size_t>(pool));
  for (int64_t t = 0; t < tokens; ++t) {
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), rng);
    if (spread == Spread::one_hot) {
      std::iter_swap(ids.begin(), std::find(ids.begin(), ids.end(), static_cast<int32_t>(hot)));
    }
    for (int64_t k = 0; k < K; ++k) idx.set(t * K + k, ids[k]);
  }
  return idx;
}

// f32 [T, K] gates in [0.05, 1).
inline HostTensor random_gates(int64_t tokens, int64_t K, uint64_t seed) {
  HostTensor g(DType::f32, {tokens, K});
  g.fill_uniform(seed, 0.05, 1.0);
  return g;
}

// The expert-centric schedule built on the host by a stable counting sort, so the experts tests
// do not depend on schedule_build.
struct HostSchedule {
  HostTensor offsets, order;
  Schedule view() const { return {offsets.view(), order.view()}; }
};

inline HostSchedule host_schedule(const HostTensor& indices, int64_t N) {
  const int64_t pairs = indices.numel();
  HostSchedule s{HostTensor(DType::i32, {N + 1}), HostTensor(DType::i32, {pairs})};
  std::vector<int64_t> count(static_cast<size_t>(N + 1), 0);
  for (int64_t p = 0; p < pairs; ++p) ++count[static_cast<size_t>(indices.get(p)) + 1];
  for (int64_t e = 0; e < N; ++e) count[e + 1] += count[e];
  for (int64_t e = 0; e <= N; ++e) s.offsets.set(e, static_cast<double>(count[e]));
  for (int64_t p = 0; p < pairs; ++p) {
    s.order.set(count[static_cast<size_t>(indices.get(p))]++, static_cast<double>(p));
  }
  return s;
}

inline reference::Routing routing_of(const HostTensor& indices, const HostTensor& gates) {
  reference::Routing r;
  for (int64_t i = 0; i < indices.numel(); ++i) {
    r.indices.push_back(static_cast<int32_t>(indices.get(i)));
    r.gates.push_back(gates.get(i));
  }
  return r;
}

// Asserts got ~ want under `tol`, with the comparison's description on failure.
inline void expect_close(const char* what, const std::vector<double>& got,
                         const std::vector<double>& want, Tolerance tol) {
  const Comparison c = compare(got, want, tol);
  EXPECT_LE(c.worst_ratio, 1.0) << what << ": " << c.describe();
}

inline void expect_all_zero(const char* what, const HostTensor& t, int64_t row_begin,
                            int64_t row_end) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    for (int64_t c = 0; c < t.cols(); ++c) {
      ASSERT_EQ(t.at(r, c), 0.0) << what << " row " << r << " col " << c;
    }
  }
}

// Every tensor of one layer, with its views. Weights are scaled so pre-activations are O(1).
struct LayerData {
  LayerConfig cfg;
  DType dtype;
  int64_t tokens;
  HostTensor x, w_r, w_c, up, down, gate_p, up_p, down_p;
  HostTensor row_mean, row_var, col_mean, col_var;  // f32 running statistics

  LayerData(const LayerConfig& c, DType dt, int64_t T, int64_t pad, uint64_t seed)
      : cfg(c), dtype(dt), tokens(T) {
    const int64_t d = c.hidden, N = c.num_experts(), I = c.intermediate;
    const double a = std::sqrt(3.0 / static_cast<double>(d));
    x = HostTensor(dt, {T, d}, pad);
    x.fill_uniform(seed + 1, -1.0, 1.0);
    w_r = HostTensor(dt, {c.grid_rows, d}, pad);
    w_r.fill_uniform(seed + 2, -a, a);
    w_c = HostTensor(dt, {c.grid_cols, d});
    w_c.fill_uniform(seed + 3, -a, a);
    up = HostTensor(dt, {N, d}, pad);
    up.fill_uniform(seed + 4, -a, a);
    down = HostTensor(dt, {N, d});
    down.fill_uniform(seed + 5, -1.0, 1.0);
    if (I > 0) {
      const double b = std::sqrt(3.0 / static_cast<double>(I));
      gate_p = HostTensor(dt, {I, d}, pad);
      gate_p.fill_uniform(seed + 6, -a, a);
      up_p = HostTensor(dt, {I, d});
      up_p.fill_uniform(seed + 7, -a, a);
      down_p = HostTensor(dt, {d, I}, pad);
      down_p.fill_uniform(seed + 8, -b, b);
    }
    row_mean = HostTensor(DType::f32, {c.grid_rows});
    row_mean.fill_uniform(seed + 9, -0.3, 0.3);
    row_var = HostTensor(DType::f32, {c.grid_rows});
    row_var.fill_uniform(seed + 10, 0.5, 2.0);
    col_mean = HostTensor(DType::f32, {c.grid_cols});
    col_mean.fill_uniform(seed + 11, -0.3, 0.3);
    col_var = HostTensor(DType::f32, {c.grid_cols});
    col_var.fill_uniform(seed + 12, 0.5, 2.0);
  }

  LayerWeights weights() const {
    LayerWeights w;
    w.router = {w_r.view(), w_c.view()};
    w.experts = {up.view(), down.view()};
    if (cfg.intermediate > 0) w.mlp = {gate_p.view(), up_p.view(), down_p.view()};
    return w;
  }
  RouterNormState norm() const {
    return {row_mean.view(), row_var.view(), col_mean.view(), col_var.view()};
  }
  // The tensors finite differences perturb, by name, in the order of LayerGrads.
  std::vector<std::pair<const char*, HostTensor*>> inputs() {
    std::vector<std::pair<const char*, HostTensor*>> v = {
        {"x", &x}, {"W_r", &w_r}, {"W_c", &w_c}, {"W", &up}, {"V", &down}};
    if (cfg.intermediate > 0) {
      v.push_back({"W_gate", &gate_p});
      v.push_back({"W_up", &up_p});
      v.push_back({"W_down", &down_p});
    }
    return v;
  }
};

// Gradient tensors shaped like LayerData's, poisoned.
struct LayerGradData {
  HostTensor dx, w_r, w_c, up, down, gate_p, up_p, down_p;

  LayerGradData(const LayerData& L, int64_t pad) {
    auto like = [&](const HostTensor& t, int64_t p) {
      HostTensor g(t.dtype(), t.shape(), p);
      g.poison();
      return g;
    };
    dx = like(L.x, pad);
    w_r = like(L.w_r, pad);
    w_c = like(L.w_c, 0);
    up = like(L.up, 0);
    down = like(L.down, pad);
    if (L.cfg.intermediate > 0) {
      gate_p = like(L.gate_p, 0);
      up_p = like(L.up_p, pad);
      down_p = like(L.down_p, 0);
    }
  }
  LayerGrads grads(const LayerConfig& cfg) const {
    LayerGrads g;
    g.router = {w_r.view(), w_c.view()};
    g.experts = {up.view(), down.view()};
    if (cfg.intermediate > 0) g.mlp = {gate_p.view(), up_p.view(), down_p.view()};
    return g;
  }
  // Same order as LayerData::inputs().
  std::vector<const HostTensor*> all(const LayerConfig& cfg) const {
    std::vector<const HostTensor*> v = {&dx, &w_r, &w_c, &up, &down};
    if (cfg.intermediate > 0) {
      v.push_back(&gate_p);
      v.push_back(&up_p);
      v.push_back(&down_p);
    }
    return v;
  }
};

// Runs layer_forward with freshly sized buffers; keeps the saved state for backward.
struct LayerRun {
  Bytes saved, workspace;
  HostTensor y;

  void forward(const LayerData& L, bool training, int64_t pad, const Exec& exec) {
    saved = Bytes(layer_saved_bytes(L.cfg, L.tokens, L.dtype));
    workspace = Bytes(std::max(layer_forward_workspace_bytes(L.cfg, L.tokens, L.dtype, exec),
                               layer_backward_workspace_bytes(L.cfg, L.tokens, L.dtype, exec)));
    y = HostTensor(L.dtype, {L.tokens, L.cfg.hidden}, pad);
    y.poison();
    std::fill(saved.v.begin(), saved.v.end(), uint8_t{0xff});
    layer_forward(L.cfg, L.x.view(), L.weights(), L.norm(), training, y.view(), saved.buffer(),
                  workspace.buffer(), exec);
  }
  void backward(const LayerData& L, bool training, const HostTensor& dy, LayerGradData& g,
                const Exec& exec) {
    layer_backward(L.cfg, L.x.view(), L.weights(), training, saved.buffer(), dy.view(), g.dx.view(),
                   g.grads(L.cfg), workspace.buffer(), exec);
  }
  LayerSaved views(const LayerData& L) {
    return layer_saved_views(L.cfg, L.tokens, L.dtype, saved.buffer(), Device::cpu());
  }
};

}  // namespace omnimoe::test
