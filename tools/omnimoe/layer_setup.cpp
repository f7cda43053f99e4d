#include "layer_setup.h"

#include <algorithm>
#include <cmath>
#include <exception>
#include <numeric>

#include "host_array.h"
#include "uniform.h"

namespace omnimoe::tool {

namespace {

// The tensors of one input set, carved from `base` (nullptr: only measure).
struct SetLayout {
  TensorView x, dy, row, col, up, down, gate, mlp_up, mlp_down;
  TensorView row_mean, row_var, col_mean, col_var;
  Schedule schedule;
  Buffer saved;
  size_t bytes = 0;
};

SetLayout lay_out_set(const BenchConfig& c, void* base, Device device, size_t saved_bytes) {
  const LayerConfig& l = c.layer;
  const int64_t T = c.tokens, d = l.hidden, N = l.num_experts(), I = l.intermediate;
  Carver cv(base, device);
  SetLayout s;
  s.x = cv.matrix(c.dtype, T, d);
  s.dy = cv.matrix(c.dtype, T, d);
  s.row = cv.matrix(c.dtype, l.grid_rows, d);
  s.col = cv.matrix(c.dtype, l.grid_cols, d);
  s.up = cv.matrix(c.dtype, N, d);
  s.down = cv.matrix(c.dtype, N, d);
  if (I > 0) {
    s.gate = cv.matrix(c.dtype, I, d);
    s.mlp_up = cv.matrix(c.dtype, I, d);
    s.mlp_down = cv.matrix(c.dtype, d, I);
  }
  s.row_mean = cv.vector(DType::f32, l.grid_rows);
  s.row_var = cv.vector(DType::f32, l.grid_rows);
  s.col_mean = cv.vector(DType::f32, l.grid_cols);
  s.col_var = cv.vector(DType::f32, l.grid_cols);
  s.schedule.pair_order = cv.vector(DType::i32, T * l.top_k);
  s.schedule.expert_offsets = cv.vector(DType::i32, N + 1);
  s.saved = cv.buffer(saved_bytes);
  s.bytes = cv.bytes();
  return s;
}

size_t saved_bytes_of(const BenchConfig& c) {
  return layer_saved_bytes(c.layer, c.tokens, c.dtype);
}

// A workspace query that fails (an op this backend lacks may refuse) counts as 0 bytes.
template <typename Fn>
size_t query(std::vector<std::string>& notes, const char* what, Fn&& fn) {
  try {
    return fn();
  } catch (const std::exception& e) {
    notes.push_back(std::string(what) + " failed: " + e.what());
    return 0;
  }
}

}  // namespace

size_t LayerSetup::input_set_bytes(const BenchConfig& config) {
  return lay_out_set(config, nullptr, Device::cpu(), saved_bytes_of(config)).bytes;
}

LayerSetup::LayerSetup(Platform& p, const BenchConfig& c, int num_sets, uint64_t seed)
    : platform(p), config(c), exec(p.exec()), seed_(seed) {
  const LayerConfig& l = c.layer;
  const int64_t T = c.tokens, d = l.hidden, N = l.num_experts(), I = l.intermediate;
  l.validate();
  saved_bytes = saved_bytes_of(c);

  const DType dt = c.dtype;
  forward_workspace_bytes =
      std::max({query(notes, "layer_forward_workspace_bytes",
                      [&] { return layer_forward_workspace_bytes(l, T, dt, exec); }),
                query(notes, "router_forward_workspace_bytes",
                      [&] { return router_forward_workspace_bytes(l, T, dt, exec); }),
                query(notes, "router_select_workspace_bytes",
                      [&] { return router_select_workspace_bytes(l, T, exec); }),
                query(notes, "schedule_workspace_bytes",
                      [&] { return schedule_workspace_bytes(l, T, exec); }),
                query(notes, "experts_forward_workspace_bytes",
                      [&] { return experts_forward_workspace_bytes(l, T, dt, exec); }),
                I > 0 ? query(notes, "mlp_forward_workspace_bytes",
                              [&] { return mlp_forward_workspace_bytes(l, T, dt, exec); })
                      : size_t{0}});
  backward_workspace_bytes =
      std::max({query(notes, "layer_backward_workspace_bytes",
                      [&] { return layer_backward_workspace_bytes(l, T, dt, exec); }),
                query(notes, "router_backward_workspace_bytes",
                      [&] { return router_backward_workspace_bytes(l, T, dt, exec); }),
                query(notes, "experts_backward_workspace_bytes",
                      [&] { return experts_backward_workspace_bytes(l, T, dt, exec); }),
                I > 0 ? query(notes, "mlp_backward_workspace_bytes",
                              [&] { return mlp_backward_workspace_bytes(l, T, dt, exec); })
                      : size_t{0}});
  const size_t workspace =
      std::max({forward_workspace_bytes, backward_workspace_bytes, size_t{256}});

  // Shared outputs, gradients and scratch.
  auto lay_out_shared = [&](void* base) {
    Carver cv(base, exec.device);
    SharedBuffers b;
    b.y = cv.matrix(dt, T, d);
    b.dx = cv.matrix(dt, T, d);
    b.dgates = cv.matrix(DType::f32, T, l.top_k);
    b.grads.router = {cv.matrix(dt, l.grid_rows, d), cv.matrix(dt, l.grid_cols, d)};
    b.grads.experts = {cv.matrix(dt, N, d), cv.matrix(dt, N, d)};
    if (I > 0) b.grads.mlp = {cv.matrix(dt, I, d), cv.matrix(dt, I, d), cv.matrix(dt, d, I)};
    b.workspace = cv.buffer(workspace);
    return std::make_pair(std::move(b), cv.bytes());
  };
  shared.arena = DeviceArray(platform, lay_out_shared(nullptr).second);
  {
    DeviceArray arena = std::move(shared.arena);
    shared = lay_out_shared(arena.data()).first;
    shared.arena = std::move(arena);
  }
  // Outputs are overwritten by the ops; random values keep an accumulating op off garbage.
  uint64_t k = seed * 7919 + 1000;
  platform.fill_uniform(shared.y, k++, -1.0f, 1.0f);
  platform.fill_uniform(shared.dx, k++, -1.0f, 1.0f);
  platform.fill_uniform(shared.dgates, k++, -0.1f, 0.1f);

  const size_t set_bytes = input_set_bytes(c);
  for (int i = 0; i < num_sets; ++i) {
    InputSet s;
    s.arena = DeviceArray(platform, set_bytes);
    const SetLayout L = lay_out_set(c, s.arena.data(), exec.device, saved_bytes);
    s.x = L.x;
    s.dy = L.dy;
    s.weights.router = {L.row, L.col};
    s.weights.experts = {L.up, L.down};
    if (I > 0) s.weights.mlp = {L.gate, L.mlp_up, L.mlp_down};
    s.norm = {L.row_mean, L.row_var, L.col_mean, L.col_var};
    s.saved = L.saved;
    s.views = layer_saved_views(l, T, dt, s.saved, exec.device);
    s.schedule = L.schedule;
    fill_set(s, seed + static_cast<uint64_t>(i));
    sets.push_back(std::move(s));
  }
  platform.synchronize();
}

void LayerSetup::fill_set(InputSet& s, uint64_t seed) {
  const LayerConfig& l = config.layer;
  const float d = static_cast<float>(l.hidden);
  uint64_t k = seed * 7919;
  auto fill = [&](const TensorView& t, float lo, float hi) {
    if (t.data) platform.fill_uniform(t, k, lo, hi);
    ++k;
  };
  // Scales keep every pre-activation of order one: x . W[e] has variance about 1/3.
  fill(s.x, -1.0f, 1.0f);
  fill(s.dy, -1.0f, 1.0f);
  const float a = std::sqrt(3.0f / d), b = 1.0f / std::sqrt(d);
  fill(s.weights.router.row, -a, a);
  fill(s.weights.router.col, -a, a);
  fill(s.weights.experts.up, -a, a);
  fill(s.weights.experts.down, -b, b);
  if (l.intermediate > 0) {
    const float c = 1.0f / std::sqrt(static_cast<float>(l.intermediate));
    fill(s.weights.mlp.gate, -a, a);
    fill(s.weights.mlp.up, -a, a);
    fill(s.weights.mlp.down, -c, c);
  }
  fill(s.norm.row_mean, -0.1f, 0.1f);
  fill(s.norm.row_var, 0.5f, 1.5f);
  fill(s.norm.col_mean, -0.1f, 0.1f);
  fill(s.norm.col_var, 0.5f, 1.5f);
}

void LayerSetup::synthetic_routing(InputSet& s, uint64_t seed) {
  const int64_t T = config.tokens, K = config.layer.top_k, N = config.layer.num_experts();
  // Token t takes experts base_t + k * step (mod N): distinct because gcd(step, N) = 1.
  int64_t step = std::max<int64_t>(1, static_cast<int64_t>(0.618 * static_cast<double>(N)));
  while (std::gcd(step, N) != 1) ++step;
  HostArray idx(DType::i32, T * K), scores(DType::f32, T * K), gates(DType::f32, T * K);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t base = static_cast<int64_t>(mix64(seed * 104729 + t) % static_cast<uint64_t>(N));
    for (int64_t j = 0; j < K; ++j) {
      const int64_t p = t * K + j;
      idx.set(p, static_cast<double>((base + j * step) % N));
      scores.set(p, -std::log(2.0 + j));  // descending, like the router's
      gates.set(p, uniform_at(seed, static_cast<uint64_t>(p), 0.5f, 1.5f) / K);
    }
  }
  const RouterOutputs& r = s.views.routing;
  platform.copy_to_device(r.indices.data, idx.data(), idx.bytes());
  platform.copy_to_device(r.scores.data, scores.data(), scores.bytes());
  platform.copy_to_device(r.gates.data, gates.data(), gates.bytes());
  uint64_t k = seed * 31 + 17;
  platform.fill_uniform(s.views.router.row_logits, k++, -1.0f, 1.0f);
  platform.fill_uniform(s.views.router.col_logits, k++, -1.0f, 1.0f);
  if (s.views.router.row_rstd.data) {
    platform.fill_uniform(s.views.router.row_rstd, k++, 0.5f, 1.5f);
    platform.fill_uniform(s.views.router.col_rstd, k++, 0.5f, 1.5f);
  }
}

void LayerSetup::host_schedule(InputSet& s) {
  const int64_t P = config.tokens * config.layer.top_k, N = config.layer.num_experts();
  std::vector<int32_t> idx(static_cast<size_t>(P)), order(static_cast<size_t>(P));
  std::vector<int32_t> offsets(static_cast<size_t>(N + 1), 0);
  platform.copy_to_host(idx.data(), s.views.routing.indices.data, idx.size() * 4);
  for (int32_t e : idx) ++offsets[static_cast<size_t>(e) + 1];
  std::partial_sum(offsets.begin(), offsets.end(), offsets.begin());
  std::vector<int32_t> next(offsets.begin(), offsets.end() - 1);
  for (int64_t p = 0; p < P; ++p) order[next[idx[p]]++] = static_cast<int32_t>(p);  // stable
  platform.copy_to_device(s.schedule.pair_order.data, order.data(), order.size() * 4);
  platform.copy_to_device(s.schedule.expert_offsets.data, offsets.data(), offsets.size() * 4);
}

std::string LayerSetup::prepare() {
  const LayerConfig& l = config.layer;
  const bool has_mlp = l.intermediate > 0;
  std::string router_error;
  for (size_t i = 0; i < sets.size(); ++i) {
    InputSet& s = sets[i];
    const auto build_schedule = [&] {
      try {
        schedule_build(l, s.views.routing.indices, s.schedule, shared.workspace, exec);
        platform.synchronize();
      } catch (const std::exception&) {
        host_schedule(s);
      }
    };
    try {
      layer_forward(l, s.x, s.weights, s.norm, true, shared.y, s.saved, shared.workspace, exec);
      platform.synchronize();
      build_schedule();
      continue;
    } catch (const std::exception&) {
      // Op by op below: each missing op's output is made another way.
    }
    const LayerSaved& v = s.views;
    try {
      router_forward(l, s.x, s.weights.router, s.norm, true, v.routing, v.router, shared.workspace,
                     exec);
      platform.synchronize();
    } catch (const std::exception& e) {
      router_error = e.what();
      synthetic_routing(s, seed_ + i);
    }
    build_schedule();
    if (has_mlp) {
      try {
        mlp_forward(l, s.x, s.weights.mlp, shared.y, false, v.mlp, shared.workspace, exec);
        platform.synchronize();
      } catch (const std::exception&) {
        platform.fill_uniform(v.mlp.gate_pre, seed_ * 13 + i, -1.0f, 1.0f);
        platform.fill_uniform(v.mlp.up_pre, seed_ * 17 + i, -1.0f, 1.0f);
      }
    }
    try {
      experts_forward(l, s.x, s.weights.experts, v.routing.indices, v.routing.gates,
                      shared.y, has_mlp, v.expert_preact, shared.workspace, exec);
      platform.synchronize();
    } catch (const std::exception&) {
      platform.fill_uniform(v.expert_preact, seed_ * 19 + i, -1.0f, 1.0f);
    }
  }
  platform.synchronize();
  if (router_error.empty())
    return std::string("omnimoe::router_forward on ") + device_name(exec.device);
  return "synthetic, drawn on the host (router_forward n/a: " + router_error + ")";
}

int64_t LayerSetup::distinct_experts() const {
  const int64_t P = config.tokens * config.layer.top_k, N = config.layer.num_experts();
  std::vector<int32_t> idx(static_cast<size_t>(P));
  platform.copy_to_host(idx.data(), sets[0].views.routing.indices.data, idx.size() * 4);
  std::vector<char> seen(static_cast<size_t>(N), 0);
  int64_t distinct = 0;
  for (int32_t e : idx) {
    if (e >= 0 && e < N && !seen[e]) {
      seen[e] = 1;
      ++distinct;
    }
  }
  return distinct;
}

std::vector<std::pair<std::string, TensorView>> LayerSetup::inputs() const {
  const InputSet& s = sets[0];
  std::vector<std::pair<std::string, TensorView>> v = {
      {"x", s.x},
      {"dy", s.dy},
      {"router_gate_x.weight", s.weights.router.row},
      {"router_gate_y.weight", s.weights.router.col},
      {"up_embed.weight", s.weights.experts.up},
      {"down_embed.weight", s.weights.experts.down},
      {"row running mean", s.norm.row_mean},
      {"row running var", s.norm.row_var},
      {"col running mean", s.norm.col_mean},
      {"col running var", s.norm.col_var}};
  if (config.layer.intermediate > 0) {
    v.push_back({"gate_proj.weight", s.weights.mlp.gate});
    v.push_back({"up_proj.weight", s.weights.mlp.up});
    v.push_back({"down_proj.weight", s.weights.mlp.down});
  }
  return v;
}

std::vector<std::pair<std::string, TensorView>> LayerSetup::outputs() const {
  const InputSet& s = sets[0];
  std::vector<std::pair<std::string, TensorView>> v = {
      {"y", shared.y},
      {"dx", shared.dx},
      {"d router_gate_x.weight", shared.grads.router.row},
      {"d router_gate_y.weight", shared.grads.router.col},
      {"d up_embed.weight", shared.grads.experts.up},
      {"d down_embed.weight", shared.grads.experts.down}};
  if (config.layer.intermediate > 0) {
    v.push_back({"d gate_proj.weight", shared.grads.mlp.gate});
    v.push_back({"d up_proj.weight", shared.grads.mlp.up});
    v.push_back({"d down_proj.weight", shared.grads.mlp.down});
  }
  if (config.layer.router_norm == RouterNorm::batch) {
    v.push_back({"row running mean", s.norm.row_mean});
    v.push_back({"row running var", s.norm.row_var});
    v.push_back({"col running mean", s.norm.col_mean});
    v.push_back({"col running var", s.norm.col_var});
  }
  return v;
}

}  // namespace omnimoe::tool
