// The README's example: one OmniMoE layer, forward and backward, on the CPU.
#include <omnimoe/omnimoe.h>

#include <cstdio>
#include <random>
#include <vector>

int main() {
  using namespace omnimoe;
  LayerConfig cfg;
  cfg.hidden = 64;                       // d
  cfg.grid_rows = cfg.grid_cols = 16;    // N = 256 atomic experts
  cfg.top_k = 8;                         // K experts per token
  cfg.intermediate = 128;                // shared SwiGLU MLP
  const int64_t T = 32, d = cfg.hidden, N = cfg.num_experts(), I = cfg.intermediate;

  std::mt19937 rng(0);
  std::normal_distribution<float> normal(0.0f, 0.1f);
  auto randn = [&](int64_t n) { std::vector<float> v(n); for (auto& e : v) e = normal(rng); return v; };
  auto view = [](std::vector<float>& v, int64_t r, int64_t c) {
    return TensorView::contiguous(v.data(), DType::f32, {r, c});
  };

  std::vector<float> x = randn(T * d), w_r = randn(16 * d), w_c = randn(16 * d),
                     up = randn(N * d), down = randn(N * d), gate_p = randn(I * d),
                     up_p = randn(I * d), down_p = randn(d * I);
  std::vector<float> mean_r(16, 0.f), var_r(16, 1.f), mean_c(16, 0.f), var_c(16, 1.f);

  LayerWeights w;
  w.router = {view(w_r, 16, d), view(w_c, 16, d)};
  w.experts = {view(up, N, d), view(down, N, d)};
  w.mlp = {view(gate_p, I, d), view(up_p, I, d), view(down_p, d, I)};
  RouterNormState norm{TensorView::contiguous(mean_r.data(), DType::f32, {16}),
                       TensorView::contiguous(var_r.data(), DType::f32, {16}),
                       TensorView::contiguous(mean_c.data(), DType::f32, {16}),
                       TensorView::contiguous(var_c.data(), DType::f32, {16})};
  const Exec exec;  // CPU

  // The caller owns every buffer: ask for the sizes, allocate, run.
  std::vector<float> y(T * d);
  std::vector<unsigned char> saved(layer_saved_bytes(cfg, T, DType::f32));
  std::vector<unsigned char> ws(std::max(layer_forward_workspace_bytes(cfg, T, DType::f32, exec),
                                         layer_backward_workspace_bytes(cfg, T, DType::f32, exec)));
  try {
    layer_forward(cfg, view(x, T, d), w, norm, /*training=*/true, view(y, T, d),
                  {saved.data(), saved.size()}, {ws.data(), ws.size()}, exec);

    std::vector<float> dy = randn(T * d), dx(T * d), g_r(16 * d), g_c(16 * d), g_up(N * d),
                       g_down(N * d), g_gate_p(I * d), g_up_p(I * d), g_down_p(d * I);
    LayerGrads g;
    g.router = {view(g_r, 16, d), view(g_c, 16, d)};
    g.experts = {view(g_up, N, d), view(g_down, N, d)};
    g.mlp = {view(g_gate_p, I, d), view(g_up_p, I, d), view(g_down_p, d, I)};
    layer_backward(cfg, view(x, T, d), w, /*training=*/true, {saved.data(), saved.size()},
                   view(dy, T, d), view(dx, T, d), g, {ws.data(), ws.size()}, exec);

    const LayerSaved s = layer_saved_views(cfg, T, DType::f32, {saved.data(), saved.size()}, exec.device);
    const int32_t* idx = static_cast<const int32_t*>(s.routing.indices.data);
    std::printf("token 0 chose experts %d, %d, ...; y[0] = %f, dx[0] = %f\n", idx[0], idx[1],
                y[0], dx[0]);
  } catch (const Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return 0;
}
