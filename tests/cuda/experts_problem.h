// What the CUDA experts tests share (test_experts_cuda.cpp, test_experts_dense_cuda.cpp,
// test_experts_tiled_cuda.cpp): environment overrides for a scope, uniform routings, the
// schedule by a host counting sort, and every tensor of one experts call on both backends with
// its comparison against the CPU.
#pragma once

#include <omnimoe/omnimoe.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "cuda_test_support.h"

namespace omnimoe::test {

// Sets an environment variable for the scope (nullptr: unsets it), restoring the previous value.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = std::string(old);
    if (value) {
      setenv(name, value, 1);
    } else {
      unsetenv(name);
    }
  }
  ~ScopedEnv() {
    if (old_) {
      setenv(name_, old_->c_str(), 1);
    } else {
      unsetenv(name_);
    }
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  const char* name_;
  std::optional<std::string> old_;
};

constexpr const char* kExpertsPathVar = "OMNIMOE_EXPERTS_PATH";

// i32 [T, K]: K distinct experts per token, uniform over [0, pool) (pool < N leaves experts
// nobody chose, whose gradient rows must be zero). `first`, when >= 0, becomes every token's
// first choice (drawn or not), after the same draws.
inline HostTensor uniform_indices(int64_t tokens, int64_t K, int64_t pool, uint64_t seed,
                                  int32_t first = -1) {
  HostTensor idx(DType::i32, {tokens, K});
  std::mt19937_64 rng(seed);
  std::vector<int32_t> ids(static_cast<size_t>(pool));
  for (int64_t t = 0; t < tokens; ++t) {
    std::iota(ids.begin(), ids.end(), 0);
    for (int64_t k = 0; k < K; ++k) {  // partial Fisher-Yates: a uniform K-subset
      std::uniform_int_distribution<int64_t> pick(k, pool - 1);
      std::swap(ids[k], ids[pick(rng)]);
    }
    if (first >= 0) std::iter_swap(ids.begin(), std::find(ids.begin(), ids.end(), first));
    for (int64_t k = 0; k < K; ++k) idx.set(t * K + k, ids[k]);
  }
  return idx;
}

// The schedule by a stable counting sort on the host (the experts tests do not depend on
// schedule_build): offsets i32 [N + 1], pair order i32 [T * K].
inline void host_schedule(const HostTensor& indices, int64_t N, HostTensor& offsets,
                          HostTensor& order) {
  const int64_t pairs = indices.numel();
  offsets = HostTensor(DType::i32, {N + 1});
  order = HostTensor(DType::i32, {pairs});
  std::vector<int64_t> count(static_cast<size_t>(N + 1), 0);
  for (int64_t p = 0; p < pairs; ++p) ++count[static_cast<size_t>(indices.get(p)) + 1];
  for (int64_t e = 0; e < N; ++e) count[e + 1] += count[e];
  for (int64_t e = 0; e <= N; ++e) offsets.set(e, static_cast<double>(count[e]));
  for (int64_t p = 0; p < pairs; ++p) {
    order.set(count[static_cast<size_t>(indices.get(p))]++, static_cast<double>(p));
  }
}

// The shape of one experts call and how its rows are padded.
struct ExpertsShape {
  DType dtype;
  int64_t tokens, hidden, grid_rows, grid_cols, top_k;
  Activation act;
  int64_t pad;      // row padding of x, y, dy, dx, W and dV
  bool pad_tables;  // V and dW padded too
};

// Every tensor of one experts call, on both backends, from `indices` (i32 [T, K]) and `seed`.
struct ExpertsProblem {
  LayerConfig cfg;
  DType dtype;
  int64_t T, d, N, K, busiest = 0;
  std::vector<int64_t> unchosen;
  MirroredTensor x, up, down, indices, gates, offsets, order, dy;
  MirroredTensor y, preact, dx, dup, ddown, dgates;

  ExpertsProblem(const ExpertsShape& c, const HostTensor& routing, uint64_t seed)
      : dtype(c.dtype),
        T(c.tokens),
        d(c.hidden),
        N(c.grid_rows * c.grid_cols),
        K(c.top_k),
        // W scaled so pre-activations are O(1); V, x, dy O(1); gates in [0.05, 1).
        x(make_random(c.dtype, {c.tokens, c.hidden}, seed + 1, c.pad)),
        up(make_random(c.dtype, {N, c.hidden}, seed + 2, c.pad,
                       -std::sqrt(3.0 / static_cast<double>(c.hidden)),
                       std::sqrt(3.0 / static_cast<double>(c.hidden)))),
        down(make_random(c.dtype, {N, c.hidden}, seed + 3, c.pad_tables ? c.pad : 0)),
        indices(routing),
        gates(make_random(DType::f32, {c.tokens, c.top_k}, seed + 5, 0, 0.05, 1.0)),
        offsets(HostTensor(DType::i32, {N + 1})),
        order(HostTensor(DType::i32, {c.tokens * c.top_k})),
        dy(make_random(c.dtype, {c.tokens, c.hidden}, seed + 6, c.pad)),
        y(HostTensor(c.dtype, {c.tokens, c.hidden}, c.pad)),
        preact(HostTensor(DType::f32, {c.tokens, c.top_k})),
        dx(HostTensor(c.dtype, {c.tokens, c.hidden}, c.pad)),
        dup(HostTensor(c.dtype, {N, c.hidden}, c.pad_tables ? c.pad : 0)),
        ddown(HostTensor(c.dtype, {N, c.hidden}, c.pad)),
        dgates(HostTensor(DType::f32, {c.tokens, c.top_k})) {
    cfg.hidden = c.hidden;
    cfg.grid_rows = c.grid_rows;
    cfg.grid_cols = c.grid_cols;
    cfg.top_k = c.top_k;
    cfg.act = c.act;
    host_schedule(indices.host, N, offsets.host, order.host);
    offsets.device.copy_from(offsets.host);
    order.device.copy_from(order.host);
    std::vector<int64_t> count(static_cast<size_t>(N), 0);
    for (int64_t p = 0; p < T * K; ++p) ++count[static_cast<size_t>(indices.host.get(p))];
    busiest = T > 0 ? *std::max_element(count.begin(), count.end()) : 0;
    for (int64_t e = 0; e < N; ++e) {
      if (count[e] == 0) unchosen.push_back(e);
    }
  }

  ExpertWeights weights(const Exec& e) const { return {up.view(e), down.view(e)}; }
  Schedule schedule(const Exec& e) const { return {offsets.view(e), order.view(e)}; }

  void forward(bool accumulate, const Exec& e) {
    Scratch ws(e, experts_forward_workspace_bytes(cfg, T, dtype, e));
    experts_forward(cfg, x.view(e), weights(e), indices.view(e), gates.view(e), y.view(e),
                    accumulate, preact.view(e), ws.buffer(), e);
  }
  void backward(bool accumulate_dx, const Exec& e) {
    Scratch ws(e, experts_backward_workspace_bytes(cfg, T, dtype, e));
    experts_backward(cfg, x.view(e), weights(e), indices.view(e), gates.view(e), preact.view(e),
                     schedule(e), dy.view(e), dx.view(e), accumulate_dx,
                     {dup.view(e), ddown.view(e)}, dgates.view(e), ws.buffer(), e);
  }

  // y and dx start poisoned, or random (the same on both sides) when the op adds to them.
  void reset_outputs(bool accumulate, uint64_t seed) {
    for (MirroredTensor* t : {&y, &dx}) {
      if (accumulate) {
        t->host.fill_uniform(seed++);
        t->device.copy_from(t->host);
      } else {
        t->poison();
      }
    }
    for (MirroredTensor* t : {&preact, &dup, &ddown, &dgates}) t->poison();
  }

  // The six outputs of a device forward then backward under `e` (outputs poisoned first),
  // fetched after the stream finishes: runs to compare bitwise.
  std::array<HostTensor, 6> run_device(const Exec& e) {
    reset_outputs(false, 0);
    forward(false, e);
    backward(false, e);
    OMNIMOE_TEST_CUDA_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(e.stream)));
    return {y.fetch(), preact.fetch(), dx.fetch(), dup.fetch(), ddown.fetch(), dgates.fetch()};
  }

  // Backward reads the CPU's preact on both sides, so both start from the same saved state.
  void share_cpu_preact() {
    preact.device.copy_from(preact.host);
    OMNIMOE_TEST_CUDA_CHECK(cudaDeviceSynchronize());
  }

  // Products behind an output element that sums `outer` weighted rows. In 16-bit storage the
  // final rounding dominates and `outer` is the count; in f32 / f64 the d-term dot inside each
  // row's coefficient (x . W or dy . V, summed in another order on each side) dominates.
  int64_t terms(int64_t outer) const {
    const bool wide = dtype == DType::f32 || dtype == DType::f64;
    return std::max<int64_t>(1, wide ? outer * d : outer);
  }

  void expect_forward_close() {
    // preact is a d-term fp32 dot on both sides.
    expect_close(y.fetch(), y.host, tolerance_for(dtype, terms(K)), "y");
    expect_close(preact.fetch(), preact.host, tolerance_for(DType::f32, d), "preact");
  }
  void expect_backward_close() {
    expect_close(dx.fetch(), dx.host, tolerance_for(dtype, terms(K)), "dx");
    expect_close(dgates.fetch(), dgates.host, tolerance_for(DType::f32, d), "dgates");
    const HostTensor dup_got = dup.fetch(), ddown_got = ddown.fetch();
    expect_close(dup_got, dup.host, tolerance_for(dtype, terms(busiest)), "grads.up (dW)");
    expect_close(ddown_got, ddown.host, tolerance_for(dtype, terms(busiest)), "grads.down (dV)");
    for (int64_t e : unchosen) {
      for (int64_t j = 0; j < d; ++j) {
        ASSERT_EQ(dup_got.at(e, j), 0.0) << "dW row of unchosen expert " << e;
        ASSERT_EQ(ddown_got.at(e, j), 0.0) << "dV row of unchosen expert " << e;
      }
    }
  }
};

// Two runs of ExpertsProblem::run_device, output by output.
inline void expect_runs_bitwise_equal(const std::array<HostTensor, 6>& a,
                                      const std::array<HostTensor, 6>& b) {
  const char* names[6] = {"y", "preact", "dx", "grads.up", "grads.down", "dgates"};
  for (int i = 0; i < 6; ++i) expect_bitwise_equal(a[i], b[i], names[i]);
}

}  // namespace omnimoe::test
