// Every check of the launchers fires with an omnimoe::Error whose message names the argument
// and the value that arrived; empty batches run without a crash; a CUDA exec without a GPU fails
// cleanly.
#include <gtest/gtest.h>
#include <omnimoe/omnimoe.h>

#include <functional>
#include <string>
#include <vector>

#include "layer_harness.h"
#include "test_support.h"

namespace omnimoe::test {
namespace {

// Runs fn; it must throw omnimoe::Error whose message contains every one of `parts`.
void expect_error(const std::function<void()>& fn, const std::vector<std::string>& parts,
                  int line) {
  SCOPED_TRACE("from line " + std::to_string(line));
  try {
    fn();
  } catch (const Error& e) {
    const std::string what = e.what();
    for (const std::string& p : parts) {
      EXPECT_NE(what.find(p), std::string::npos) << "message lacks \"" << p << "\": " << what;
    }
    return;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "threw a std::exception that is not omnimoe::Error: " << e.what();
    return;
  }
  ADD_FAILURE() << "no Error thrown; expected one mentioning \"" << parts.front() << "\"";
}
#define EXPECT_ERROR(stmt, ...) expect_error([&] { stmt; }, {__VA_ARGS__}, __LINE__)

// A tensor of the given shape and dtype with valid contents.
HostTensor tensor(DType dtype, std::vector<int64_t> shape, int64_t pad = 0) {
  HostTensor t(dtype, std::move(shape), pad);
  if (t.numel() > 0) t.fill_uniform(3, 0.0, 1.0);
  return t;
}

TensorView on_cuda(TensorView v) {
  v.device = Device::cuda(0);
  return v;
}

TensorView with_strides(TensorView v, int64_t row, int64_t col) {
  v.strides[0] = row;
  v.strides[1] = col;
  return v;
}

// Valid arguments for every op: d = 5, grid 3 x 4 (N = 12), K = 3, I = 6, T = 4.
struct Args {
  LayerConfig cfg = make_config(5, 3, 4, 3, 6);
  int64_t T = 4;
  HostTensor x = tensor(DType::f32, {4, 5});
  HostTensor up = tensor(DType::f32, {12, 5}), down = tensor(DType::f32, {12, 5});
  HostTensor indices = random_indices(4, 3, 12, Spread::random, 1);
  HostTensor gates = random_gates(4, 3, 2);
  HostSchedule schedule = host_schedule(indices, 12);
  HostTensor y = tensor(DType::f32, {4, 5}), preact = tensor(DType::f32, {4, 3});
  HostTensor dy = tensor(DType::f32, {4, 5}), dx = tensor(DType::f32, {4, 5});
  HostTensor dup = tensor(DType::f32, {12, 5}), ddown = tensor(DType::f32, {12, 5});
  HostTensor dgates = tensor(DType::f32, {4, 3});
  HostTensor wg = tensor(DType::f32, {6, 5}), wu = tensor(DType::f32, {6, 5}),
             wd = tensor(DType::f32, {5, 6});
  HostTensor gate_pre = tensor(DType::f32, {4, 6}), up_pre = tensor(DType::f32, {4, 6});
  HostTensor dwg = tensor(DType::f32, {6, 5}), dwu = tensor(DType::f32, {6, 5}),
             dwd = tensor(DType::f32, {5, 6});
  Exec exec = cpu_exec(1);

  ExpertWeights experts() const { return {up.view(), down.view()}; }
  MlpWeights mlp() const { return {wg.view(), wu.view(), wd.view()}; }
  MlpSaved mlp_saved() const { return {gate_pre.view(), up_pre.view()}; }
  MlpWeights mlp_grads() const { return {dwg.view(), dwu.view(), dwd.view()}; }

  void experts_fwd(const LayerConfig& c, const TensorView& x_, const ExpertWeights& w,
                   const TensorView& idx, const TensorView& g, const TensorView& y_,
                   const TensorView& pre, const Exec& e) {
    experts_forward(c, x_, w, idx, g, y_, false, pre, Buffer{}, e);
  }
  void experts_fwd() {
    experts_fwd(cfg, x.view(), experts(), indices.view(), gates.view(), y.view(), preact.view(),
                exec);
  }
  void experts_bwd(const TensorView& dy_, const TensorView& dx_, const ExpertWeights& g,
                   const TensorView& dg, const TensorView& pre) {
    experts_bwd(dy_, dx_, g, dg, pre, schedule.view());
  }
  void experts_bwd(const TensorView& dy_, const TensorView& dx_, const ExpertWeights& g,
                   const TensorView& dg, const TensorView& pre, const Schedule& s) {
    experts_backward(cfg, x.view(), experts(), indices.view(), gates.view(), pre, s, dy_, dx_,
                     false, g, dg, Buffer{}, exec);
  }
};

// ---------------------------------------------------------------------------------------------

TEST(ErrorsConfig, every_field_out_of_range_is_named_with_its_value) {
  LayerConfig c = make_config(5, 3, 4, 3, 6);
  EXPECT_NO_THROW(c.validate());
  c.hidden = 0;
  EXPECT_ERROR(c.validate(), "hidden (d)", "got 0");
  c = make_config(5, 0, 4, 3, 6);
  EXPECT_ERROR(c.validate(), "grid_rows (N_r)", "got 0");
  c = make_config(5, 3, -2, 3, 6);
  EXPECT_ERROR(c.validate(), "grid_cols (N_c)", "got -2");
  c = make_config(5, 3, 4, 0, 6);
  EXPECT_ERROR(c.validate(), "top_k", "N = 12", "got 0");
  c = make_config(5, 3, 4, 13, 6);
  EXPECT_ERROR(c.validate(), "top_k", "N = 12", "got 13");
  c = make_config(5, 3, 4, 3, -1);
  EXPECT_ERROR(c.validate(), "intermediate (I)", "got -1");
  c = make_config(5, 65536, 65536, 3, 6);
  EXPECT_ERROR(c.validate(), "N_r * N_c = 65536 * 65536", "32-bit");
  c = make_config(5, 3, 4, 3, 6);
  c.act = static_cast<Activation>(7);
  EXPECT_ERROR(c.validate(), "act", "got 7");
  c = make_config(5, 3, 4, 3, 6);
  c.gating = static_cast<Gating>(5);
  EXPECT_ERROR(c.validate(), "gating", "got 5");
  c = make_config(5, 3, 4, 3, 6);
  c.router_norm = static_cast<RouterNorm>(9);
  EXPECT_ERROR(c.validate(), "router_norm", "got 9");
  c = make_config(5, 3, 4, 3, 6);
  c.norm_eps = 0.0f;
  EXPECT_ERROR(c.validate(), "norm_eps", "got 0");
  c = make_config(5, 3, 4, 3, 6);
  c.norm_momentum = 1.5f;
  EXPECT_ERROR(c.validate(), "norm_momentum", "got 1.5");
  // Every op validates its config first.
  Args a;
  a.cfg.top_k = 0;
  EXPECT_ERROR(a.experts_fwd(), "top_k", "got 0");
  EXPECT_ERROR(layer_saved_bytes(a.cfg, 4, DType::f32), "top_k", "got 0");
}

TEST(ErrorsExec, bad_exec_fields_are_named) {
  Args a;
  a.exec.num_threads = -1;
  EXPECT_ERROR(a.experts_fwd(), "experts_forward", "exec.num_threads", "got -1");
  a.exec = cpu_exec();
  a.exec.sm_count = -2;
  EXPECT_ERROR(a.experts_fwd(), "experts_forward", "exec.sm_count must be >= 0", "got -2");
  a.exec = cpu_exec();
  a.exec.device.index = -1;
  EXPECT_ERROR(a.experts_fwd(), "exec.device.index", "got -1");
  a.exec = cpu_exec();
  a.exec.device.type = static_cast<DeviceType>(4);
  EXPECT_ERROR(a.experts_fwd(), "exec.device", "unknown type 4");
}

TEST(ErrorsTokenCount, T_times_K_beyond_int32_and_negative_T) {
  const LayerConfig cfg = make_config(1024, 64, 64, 4096, 0);
  const int64_t T = int64_t{1} << 20;  // T * K = 2^32
  const Exec exec;
  EXPECT_ERROR(experts_forward_workspace_bytes(cfg, T, DType::bf16, exec),
               "experts_forward_workspace_bytes", "T * K = 1048576 * 4096", "32-bit");
  EXPECT_ERROR(experts_backward_workspace_bytes(cfg, T, DType::bf16, exec), "T * K");
  EXPECT_ERROR(schedule_workspace_bytes(cfg, T, exec), "schedule_workspace_bytes", "T * K");
  EXPECT_ERROR(router_forward_workspace_bytes(cfg, T, DType::bf16, exec), "T * K");
  EXPECT_ERROR(layer_saved_bytes(cfg, T, DType::bf16), "layer_saved_bytes", "T * K");
  EXPECT_ERROR(layer_forward_workspace_bytes(cfg, T, DType::bf16, exec), "T * K");
  EXPECT_NO_THROW(layer_saved_bytes(cfg, T / 2 - 1, DType::bf16));
  EXPECT_ERROR(layer_saved_bytes(cfg, -1, DType::bf16), "token count T", "got -1");
  EXPECT_ERROR(layer_saved_bytes(cfg, 4, DType::i32), "layer_saved_bytes", "dtype", "got i32");
}

TEST(ErrorsExperts, forward_arguments_are_checked_by_name) {
  Args a;
  EXPECT_NO_THROW(a.experts_fwd());
  const LayerConfig& c = a.cfg;
  const ExpertWeights w = a.experts();
  const TensorView x = a.x.view(), idx = a.indices.view(), g = a.gates.view(), y = a.y.view(),
                   pre = a.preact.view();
  const Exec& e = a.exec;

  HostTensor x1d = tensor(DType::f32, {20});
  EXPECT_ERROR(a.experts_fwd(c, x1d.view(), w, idx, g, y, pre, e), "experts_forward", "x", "2-D",
               "got 1-D [20]");
  HostTensor x6 = tensor(DType::f32, {4, 6});
  EXPECT_ERROR(a.experts_fwd(c, x6.view(), w, idx, g, y, pre, e), "x must have shape [*, 5]",
               "got [4, 6]");
  HostTensor xi = tensor(DType::i32, {4, 5});
  EXPECT_ERROR(a.experts_fwd(c, xi.view(), w, idx, g, y, pre, e), "x must have dtype",
               "got i32");
  EXPECT_ERROR(a.experts_fwd(c, on_cuda(x), w, idx, g, y, pre, e), "x must be on cpu",
               "got cuda:0");
  TensorView xnull = x;
  xnull.data = nullptr;
  EXPECT_ERROR(a.experts_fwd(c, xnull, w, idx, g, y, pre, e), "x is a null pointer",
               "20 elements");
  HostTensor xwide = tensor(DType::f32, {4, 10});
  EXPECT_ERROR(a.experts_fwd(
                   c, with_strides(TensorView::contiguous(xwide.data(), DType::f32, {4, 5}), 10, 2),
                   w, idx, g, y, pre, e),
               "x must be contiguous in its last dimension", "got stride 2");
  EXPECT_ERROR(a.experts_fwd(c, with_strides(x, 3, 1), w, idx, g, y, pre, e),
               "x must have a row stride >= its 5 columns", "got 3");

  HostTensor up11 = tensor(DType::f32, {11, 5});
  EXPECT_ERROR(a.experts_fwd(c, x, {up11.view(), w.down}, idx, g, y, pre, e),
               "weights.up (W) must have shape [12, 5]", "got [11, 5]");
  HostTensor down16 = tensor(DType::f16, {12, 5});
  EXPECT_ERROR(a.experts_fwd(c, x, {w.up, down16.view()}, idx, g, y, pre, e),
               "weights.down (V) must have dtype f32", "got f16");
  EXPECT_ERROR(a.experts_fwd(c, x, {w.up, on_cuda(w.down)}, idx, g, y, pre, e),
               "weights.down (V) must be on cpu", "got cuda:0");

  HostTensor idx64 = tensor(DType::i64, {4, 3});
  EXPECT_ERROR(a.experts_fwd(c, x, w, idx64.view(), g, y, pre, e), "indices must have dtype i32",
               "got i64");
  HostTensor idx4 = tensor(DType::i32, {4, 4});
  EXPECT_ERROR(a.experts_fwd(c, x, w, idx4.view(), g, y, pre, e),
               "indices must have shape [4, 3]", "got [4, 4]");
  HostTensor idx_padded(DType::i32, {4, 3}, 1);
  EXPECT_ERROR(a.experts_fwd(c, x, w, idx_padded.view(), g, y, pre, e),
               "indices must be densely packed (row stride 3)", "got row stride 4");
  HostTensor g64 = tensor(DType::f64, {4, 3});
  EXPECT_ERROR(a.experts_fwd(c, x, w, idx, g64.view(), y, pre, e), "gates must have dtype f32",
               "got f64");
  HostTensor y3 = tensor(DType::f32, {3, 5});
  EXPECT_ERROR(a.experts_fwd(c, x, w, idx, g, y3.view(), pre, e), "y must have shape [4, 5]",
               "got [3, 5]");
  HostTensor prebf = tensor(DType::bf16, {4, 3});
  EXPECT_ERROR(a.experts_fwd(c, x, w, idx, g, y, prebf.view(), e), "preact must have dtype f32",
               "got bf16");

  // Ids outside [0, N) would read rows out of bounds: refused before y is written.
  for (const double bad : {12.0, -1.0}) {
    HostTensor idx_bad = a.indices;
    idx_bad.set(1 * 3 + 2, bad);
    a.y.poison();
    EXPECT_ERROR(a.experts_fwd(c, x, w, idx_bad.view(), g, y, pre, e), "experts_forward",
                 "indices must hold expert ids in [0, 12)",
                 "got " + std::to_string(static_cast<int>(bad)) + " at [1, 2]");
    EXPECT_FALSE(a.y.all_finite());
  }
}

TEST(ErrorsExperts, backward_arguments_are_checked_by_name) {
  Args a;
  a.experts_fwd();
  const TensorView dy = a.dy.view(), dx = a.dx.view(), dg = a.dgates.view(), pre = a.preact.view();
  const ExpertWeights grads{a.dup.view(), a.ddown.view()};
  EXPECT_NO_THROW(a.experts_bwd(dy, dx, grads, dg, pre));
  HostTensor dybf = tensor(DType::bf16, {4, 5});
  EXPECT_ERROR(a.experts_bwd(dybf.view(), dx, grads, dg, pre), "experts_backward",
               "dy must have dtype f32", "got bf16");
  HostTensor dx5 = tensor(DType::f32, {5, 5});
  EXPECT_ERROR(a.experts_bwd(dy, dx5.view(), grads, dg, pre), "dx must have shape [4, 5]",
               "got [5, 5]");
  HostTensor dup4 = tensor(DType::f32, {12, 4});
  EXPECT_ERROR(a.experts_bwd(dy, dx, {dup4.view(), grads.down}, dg, pre),
               "grads.up (dW) must have shape [12, 5]", "got [12, 4]");
  HostTensor ddown64 = tensor(DType::f64, {12, 5});
  EXPECT_ERROR(a.experts_bwd(dy, dx, {grads.up, ddown64.view()}, dg, pre),
               "grads.down (dV) must have dtype f32", "got f64");
  HostTensor dg2 = tensor(DType::f32, {4, 2});
  EXPECT_ERROR(a.experts_bwd(dy, dx, grads, dg2.view(), pre), "dgates must have shape [4, 3]",
               "got [4, 2]");
  const Schedule s = a.schedule.view();
  HostTensor off12(DType::i32, {12});
  EXPECT_ERROR(a.experts_bwd(dy, dx, grads, dg, pre, {off12.view(), s.pair_order}),
               "experts_backward", "schedule.expert_offsets must have shape [13]", "got [12]");
  HostTensor order11(DType::i32, {11});
  EXPECT_ERROR(a.experts_bwd(dy, dx, grads, dg, pre, {s.expert_offsets, order11.view()}),
               "schedule.pair_order must have shape [12]", "got [11]");
  HostTensor pre5 = tensor(DType::f32, {5, 3});
  EXPECT_ERROR(a.experts_bwd(dy, dx, grads, dg, pre5.view()), "preact must have shape [4, 3]",
               "got [5, 3]");
  TensorView dgnull = dg;
  dgnull.data = nullptr;
  EXPECT_ERROR(a.experts_bwd(dy, dx, grads, dgnull, pre), "dgates is a null pointer",
               "12 elements");
  a.indices.set(0, 12);
  EXPECT_ERROR(a.experts_bwd(dy, dx, grads, dg, pre), "experts_backward",
               "indices must hold expert ids in [0, 12)", "got 12 at [0, 0]");
}

TEST(ErrorsMlp, arguments_are_checked_by_name) {
  Args a;
  const Exec& e = a.exec;
  EXPECT_NO_THROW(
      mlp_forward(a.cfg, a.x.view(), a.mlp(), a.y.view(), false, a.mlp_saved(), Buffer{}, e));
  LayerConfig no_mlp = a.cfg;
  no_mlp.intermediate = 0;
  EXPECT_ERROR(
      mlp_forward(no_mlp, a.x.view(), a.mlp(), a.y.view(), false, a.mlp_saved(), Buffer{}, e),
      "mlp_forward", "intermediate (I) > 0", "I = 0");
  EXPECT_ERROR(mlp_backward(no_mlp, a.x.view(), a.mlp(), a.mlp_saved(), a.dy.view(), a.dx.view(),
                            false, a.mlp_grads(), Buffer{}, e),
               "mlp_backward", "I = 0");
  HostTensor wg6 = tensor(DType::f32, {6, 6});
  EXPECT_ERROR(mlp_forward(a.cfg, a.x.view(), {wg6.view(), a.wu.view(), a.wd.view()}, a.y.view(),
                           false, a.mlp_saved(), Buffer{}, e),
               "weights.gate must have shape [6, 5]", "got [6, 6]");
  EXPECT_ERROR(mlp_forward(a.cfg, a.x.view(), {a.wg.view(), a.wu.view(), a.wg.view()}, a.y.view(),
                           false, a.mlp_saved(), Buffer{}, e),
               "weights.down must have shape [5, 6]", "got [6, 5]");
  HostTensor wu16 = tensor(DType::f16, {6, 5});
  EXPECT_ERROR(mlp_forward(a.cfg, a.x.view(), {a.wg.view(), wu16.view(), a.wd.view()}, a.y.view(),
                           false, a.mlp_saved(), Buffer{}, e),
               "weights.up must have dtype f32", "got f16");
  HostTensor padded(DType::f32, {4, 6}, 2);
  EXPECT_ERROR(mlp_forward(a.cfg, a.x.view(), a.mlp(), a.y.view(), false,
                           {padded.view(), a.up_pre.view()}, Buffer{}, e),
               "saved.gate_pre must be densely packed (row stride 6)", "got row stride 8");
  HostTensor up_pre3 = tensor(DType::f32, {3, 6});
  EXPECT_ERROR(mlp_forward(a.cfg, a.x.view(), a.mlp(), a.y.view(), false,
                           {a.gate_pre.view(), up_pre3.view()}, Buffer{}, e),
               "saved.up_pre must have shape [4, 6]", "got [3, 6]");
  HostTensor ybf = tensor(DType::bf16, {4, 5});
  EXPECT_ERROR(
      mlp_forward(a.cfg, a.x.view(), a.mlp(), ybf.view(), false, a.mlp_saved(), Buffer{}, e),
      "y must have dtype f32", "got bf16");
  HostTensor dwd = tensor(DType::f32, {6, 5});
  EXPECT_ERROR(mlp_backward(a.cfg, a.x.view(), a.mlp(), a.mlp_saved(), a.dy.view(), a.dx.view(),
                            false, {a.dwg.view(), a.dwu.view(), dwd.view()}, Buffer{}, e),
               "grads.down must have shape [5, 6]", "got [6, 5]");
  EXPECT_ERROR(mlp_backward(a.cfg, a.x.view(), a.mlp(), a.mlp_saved(), on_cuda(a.dy.view()),
                            a.dx.view(), false, a.mlp_grads(), Buffer{}, e),
               "dy must be on cpu", "got cuda:0");
}

TEST(ErrorsRouter, arguments_are_checked_by_name) {
  Args a;
  const LayerConfig& c = a.cfg;
  HostTensor idx(DType::i32, {4, 3}), scores(DType::f32, {4, 3}), gates(DType::f32, {4, 3});
  HostTensor rl(DType::f32, {4, 3}), cl(DType::f32, {4, 4}), rr(DType::f32, {3}),
      cr(DType::f32, {4});
  LayerData L(c, DType::f32, 4, 0, 3);
  const RouterOutputs out{idx.view(), scores.view(), gates.view()};
  const RouterSaved saved{rl.view(), cl.view(), rr.view(), cr.view()};
  const RouterWeights w = L.weights().router;
  const RouterNormState norm = L.norm();
  auto fwd = [&](const RouterWeights& w_, const RouterNormState& n_, const RouterOutputs& o_,
                 const RouterSaved& s_, bool training) {
    router_forward(c, L.x.view(), w_, n_, training, o_, s_, Buffer{}, a.exec);
  };
  EXPECT_NO_THROW(fwd(w, norm, out, saved, true));
  HostTensor wr = tensor(DType::f32, {4, 5});
  EXPECT_ERROR(fwd({wr.view(), w.col}, norm, out, saved, true), "router_forward",
               "weights.row (W_r) must have shape [3, 5]", "got [4, 5]");
  HostTensor wc = tensor(DType::bf16, {4, 5});
  EXPECT_ERROR(fwd({w.row, wc.view()}, norm, out, saved, true),
               "weights.col (W_c) must have dtype f32", "got bf16");
  HostTensor mean2(DType::f32, {2});
  EXPECT_ERROR(fwd(w, {mean2.view(), norm.row_var, norm.col_mean, norm.col_var}, out, saved, true),
               "norm.row_mean must have shape [3]", "got [2]");
  EXPECT_ERROR(fwd(w, {norm.row_mean, norm.row_var, norm.col_mean, on_cuda(norm.col_var)}, out,
                   saved, false),
               "norm.col_var must be on cpu", "got cuda:0");
  HostTensor scores64 = tensor(DType::f64, {4, 3});
  EXPECT_ERROR(fwd(w, norm, {idx.view(), scores64.view(), gates.view()}, saved, true),
               "scores must have dtype f32", "got f64");
  HostTensor rl5(DType::f32, {4, 5});
  EXPECT_ERROR(fwd(w, norm, out, {rl5.view(), cl.view(), rr.view(), cr.view()}, true),
               "saved.row_logits must have shape [4, 3]", "got [4, 5]");
  EXPECT_ERROR(fwd(w, norm, out, {rl.view(), cl.view(), TensorView{}, cr.view()}, true),
               "saved.row_rstd must have shape [3]", "got []");
  // router_norm = none needs neither the running statistics nor the rstd.
  LayerConfig none = c;
  none.router_norm = RouterNorm::none;
  EXPECT_NO_THROW(router_forward(none, L.x.view(), w, RouterNormState{}, true, out,
                                 {rl.view(), cl.view(), TensorView{}, TensorView{}}, Buffer{},
                                 a.exec));

  // Selection alone.
  HostTensor lp64 = tensor(DType::f64, {4, 3});
  EXPECT_ERROR(
      router_select_topk(c, lp64.view(), cl.view(), idx.view(), scores.view(), Buffer{}, a.exec),
      "router_select_topk", "row_logp must have dtype f32", "got f64");
  HostTensor cl5(DType::f32, {5, 4});
  EXPECT_ERROR(
      router_select_topk(c, rl.view(), cl5.view(), idx.view(), scores.view(), Buffer{}, a.exec),
      "col_logp must have shape [4, 4]", "got [5, 4]");

  // Backward.
  fwd(w, norm, out, saved, true);
  HostTensor dgates = tensor(DType::f32, {4, 3}), dx = tensor(DType::f32, {4, 5});
  HostTensor gr = tensor(DType::f32, {3, 5}), gc = tensor(DType::f32, {4, 5});
  auto bwd = [&](const TensorView& dg, const RouterWeights& g) {
    router_backward(c, L.x.view(), w, true, saved, out, dg, dx.view(), false, g, Buffer{}, a.exec);
  };
  EXPECT_NO_THROW(bwd(dgates.view(), {gr.view(), gc.view()}));
  HostTensor dg4 = tensor(DType::f32, {4, 4});
  EXPECT_ERROR(bwd(dg4.view(), {gr.view(), gc.view()}), "router_backward",
               "dgates must have shape [4, 3]", "got [4, 4]");
  HostTensor gr16 = tensor(DType::f16, {3, 5});
  EXPECT_ERROR(bwd(dgates.view(), {gr16.view(), gc.view()}), "grads.row (dW_r) must have dtype f32",
               "got f16");
  EXPECT_ERROR(bwd(dgates.view(), {gr.view(), gr.view()}),
               "grads.col (dW_c) must have shape [4, 5]", "got [3, 5]");
  idx.set(3 * 3 + 1, -3);
  EXPECT_ERROR(bwd(dgates.view(), {gr.view(), gc.view()}), "router_backward",
               "out.indices must hold expert ids in [0, 12)", "got -3 at [3, 1]");
}

TEST(ErrorsSchedule, arguments_are_checked_by_name) {
  Args a;
  HostTensor off(DType::i32, {13}), order(DType::i32, {12});
  EXPECT_NO_THROW(
      schedule_build(a.cfg, a.indices.view(), {off.view(), order.view()}, Buffer{}, a.exec));
  HostTensor idxf = tensor(DType::f32, {4, 3});
  EXPECT_ERROR(schedule_build(a.cfg, idxf.view(), {off.view(), order.view()}, Buffer{}, a.exec),
               "schedule_build", "indices must have dtype i32", "got f32");
  HostTensor off14(DType::i32, {14});
  EXPECT_ERROR(
      schedule_build(a.cfg, a.indices.view(), {off14.view(), order.view()}, Buffer{}, a.exec),
      "schedule.expert_offsets must have shape [13]", "got [14]");
  a.indices.set(2 * 3, 40);
  EXPECT_ERROR(
      schedule_build(a.cfg, a.indices.view(), {off.view(), order.view()}, Buffer{}, a.exec),
      "schedule_build", "indices must hold expert ids in [0, 12)", "got 40 at [2, 0]");
}

// ---------------------------------------------------------------------------------------------
// The layer: buffers, the batch-norm token count.

struct LayerErrors : ::testing::Test {
  LayerConfig cfg = make_config(5, 3, 4, 3, 6);
  LayerData L{cfg, DType::f32, 4, 0, 9};
  Exec exec = cpu_exec(1);
  Bytes saved{layer_saved_bytes(cfg, 4, DType::f32)};
  Bytes ws{std::max(layer_forward_workspace_bytes(cfg, 4, DType::f32, exec),
                    layer_backward_workspace_bytes(cfg, 4, DType::f32, exec))};
  HostTensor y = tensor(DType::f32, {4, 5}), dy = tensor(DType::f32, {4, 5});
  LayerGradData g{L, 0};
};

TEST_F(LayerErrors, saved_and_workspace_buffers_are_checked) {
  EXPECT_NO_THROW(layer_forward(cfg, L.x.view(), L.weights(), L.norm(), true, y.view(),
                                saved.buffer(), ws.buffer(), exec));
  const size_t need = saved.v.size();
  EXPECT_ERROR(layer_forward(cfg, L.x.view(), L.weights(), L.norm(), true, y.view(),
                             Buffer{saved.v.data(), need - 1}, ws.buffer(), exec),
               "saved must hold at least " + std::to_string(need) + " bytes",
               "got " + std::to_string(need - 1));
  EXPECT_ERROR(layer_backward(cfg, L.x.view(), L.weights(), true, Buffer{saved.v.data(), 8},
                              dy.view(), g.dx.view(), g.grads(cfg), ws.buffer(), exec),
               "saved must hold at least", "got 8");
  Bytes big(need + 16);
  EXPECT_ERROR(layer_forward(cfg, L.x.view(), L.weights(), L.norm(), true, y.view(),
                             Buffer{big.v.data() + 1, need}, ws.buffer(), exec),
               "saved must be 16-byte aligned");
  EXPECT_ERROR(layer_forward(cfg, L.x.view(), L.weights(), L.norm(), true, y.view(),
                             Buffer{nullptr, need}, ws.buffer(), exec),
               "saved is a null pointer", std::to_string(need) + " bytes");

  // The backward workspace carries dgates (T * K floats): too small must be caught.
  const size_t bwd = layer_backward_workspace_bytes(cfg, 4, DType::f32, exec);
  ASSERT_GT(bwd, 0u);
  EXPECT_ERROR(layer_backward(cfg, L.x.view(), L.weights(), true, saved.buffer(), dy.view(),
                              g.dx.view(), g.grads(cfg), Buffer{ws.v.data(), bwd - 1}, exec),
               "layer_backward", "workspace must hold at least " + std::to_string(bwd),
               "got " + std::to_string(bwd - 1));
  EXPECT_ERROR(layer_backward(cfg, L.x.view(), L.weights(), true, saved.buffer(), dy.view(),
                              g.dx.view(), g.grads(cfg), Buffer{nullptr, bwd}, exec),
               "workspace is a null pointer");
  EXPECT_NO_THROW(layer_backward(cfg, L.x.view(), L.weights(), true, saved.buffer(), dy.view(),
                                 g.dx.view(), g.grads(cfg), ws.buffer(), exec));
}

TEST_F(LayerErrors, argument_errors_name_the_inner_op_argument) {
  HostTensor x6 = tensor(DType::f32, {4, 6});
  EXPECT_ERROR(layer_forward(cfg, x6.view(), L.weights(), L.norm(), true, y.view(), saved.buffer(),
                             ws.buffer(), exec),
               "layer_forward", "x must have shape [*, 5]", "got [4, 6]");
  HostTensor y3 = tensor(DType::f32, {3, 5});
  EXPECT_ERROR(layer_forward(cfg, L.x.view(), L.weights(), L.norm(), true, y3.view(),
                             saved.buffer(), ws.buffer(), exec),
               "y must have shape [4, 5]", "got [3, 5]");
  LayerWeights w = L.weights();
  HostTensor v16 = tensor(DType::f16, {12, 5});
  w.experts.down = v16.view();
  EXPECT_ERROR(layer_forward(cfg, L.x.view(), w, L.norm(), true, y.view(), saved.buffer(),
                             ws.buffer(), exec),
               "weights.down (V) must have dtype f32", "got f16");
  w = L.weights();
  w.mlp = MlpWeights{};  // the config asks for I = 6
  EXPECT_ERROR(layer_forward(cfg, L.x.view(), w, L.norm(), true, y.view(), saved.buffer(),
                             ws.buffer(), exec),
               "weights.gate", "got 0-D");
}

TEST(ErrorsLayerNorm, training_with_batch_norm_needs_two_tokens) {
  const LayerConfig cfg = make_config(5, 3, 4, 3, 6);
  LayerData L(cfg, DType::f32, 1, 0, 4);
  LayerRun run;
  EXPECT_ERROR(run.forward(L, /*training=*/true, 0, cpu_exec()), "router_norm=batch",
               "more than 1 token", "got 1");
  EXPECT_NO_THROW(run.forward(L, /*training=*/false, 0, cpu_exec()));
  LayerConfig none = cfg;
  none.router_norm = RouterNorm::none;
  LayerData N(none, DType::f32, 1, 0, 4);
  EXPECT_NO_THROW(run.forward(N, /*training=*/true, 0, cpu_exec()));
}

// ---------------------------------------------------------------------------------------------
// T = 0: forward writes nothing and does not crash; backward overwrites the weight gradients
// with zeros.

TEST(ErrorsEmptyBatch, T0_experts_forward_and_backward) {
  const LayerConfig cfg = make_config(5, 3, 4, 3, 0);
  HostTensor x(DType::f32, {0, 5}), y(DType::f32, {0, 5}), idx(DType::i32, {0, 3}),
      gates(DType::f32, {0, 3}), pre(DType::f32, {0, 3}), off(DType::i32, {13}),
      order(DType::i32, {0}), dx(DType::f32, {0, 5}), dg(DType::f32, {0, 3});
  off.fill(0);
  HostTensor up = tensor(DType::f32, {12, 5}), down = tensor(DType::f32, {12, 5});
  HostTensor dup(DType::f32, {12, 5}), ddown(DType::f32, {12, 5}, 2);
  dup.poison();
  ddown.poison();
  const Schedule s{off.view(), order.view()};
  EXPECT_NO_THROW(experts_forward(cfg, x.view(), {up.view(), down.view()}, idx.view(), gates.view(),
                                  y.view(), false, pre.view(), Buffer{}, cpu_exec()));
  EXPECT_NO_THROW(experts_backward(cfg, x.view(), {up.view(), down.view()}, idx.view(),
                                   gates.view(), pre.view(), s, y.view(), dx.view(), false,
                                   {dup.view(), ddown.view()}, dg.view(), Buffer{}, cpu_exec()));
  expect_all_zero("grads.up", dup, 0, 12);
  expect_all_zero("grads.down", ddown, 0, 12);
}

TEST(ErrorsEmptyBatch, T0_mlp_forward_and_backward) {
  const LayerConfig cfg = make_config(5, 3, 4, 3, 6);
  HostTensor x(DType::f32, {0, 5}), y(DType::f32, {0, 5}), gp(DType::f32, {0, 6}),
      upre(DType::f32, {0, 6}), dx(DType::f32, {0, 5});
  HostTensor wg = tensor(DType::f32, {6, 5}), wu = tensor(DType::f32, {6, 5}),
             wd = tensor(DType::f32, {5, 6});
  HostTensor dwg(DType::f32, {6, 5}), dwu(DType::f32, {6, 5}, 1), dwd(DType::f32, {5, 6});
  for (HostTensor* t : {&dwg, &dwu, &dwd}) t->poison();
  EXPECT_NO_THROW(mlp_forward(cfg, x.view(), {wg.view(), wu.view(), wd.view()}, y.view(), false,
                              {gp.view(), upre.view()}, Buffer{}, cpu_exec()));
  EXPECT_NO_THROW(mlp_backward(cfg, x.view(), {wg.view(), wu.view(), wd.view()},
                               {gp.view(), upre.view()}, y.view(), dx.view(), false,
                               {dwg.view(), dwu.view(), dwd.view()}, Buffer{}, cpu_exec()));
  expect_all_zero("grads.gate", dwg, 0, 6);
  expect_all_zero("grads.up", dwu, 0, 6);
  expect_all_zero("grads.down", dwd, 0, 5);
}

TEST(ErrorsEmptyBatch, T0_layer_forward_and_backward_zero_every_weight_gradient) {
  for (RouterNorm norm : {RouterNorm::batch, RouterNorm::none}) {
    for (bool training : {false, true}) {
      SCOPED_TRACE(std::string(router_norm_name(norm)) + (training ? " train" : " eval"));
      const LayerConfig cfg = make_config(5, 3, 4, 3, 6, Activation::silu, Gating::softmax, norm);
      LayerData L(cfg, DType::f32, 0, 0, 4);
      const auto mean_before = L.row_mean.to_vector();
      LayerRun run;
      EXPECT_NO_THROW(run.forward(L, training, 0, cpu_exec()));
      EXPECT_EQ(L.row_mean.to_vector(), mean_before) << "an empty batch moved the statistics";
      HostTensor dy(DType::f32, {0, 5});
      LayerGradData g(L, 1);
      EXPECT_NO_THROW(run.backward(L, training, dy, g, cpu_exec()));
      const auto grads = g.all(cfg);
      for (size_t i = 1; i < grads.size(); ++i) {  // [0] is dx, empty
        expect_all_zero(L.inputs()[i].first, *grads[i], 0, grads[i]->rows());
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// A CUDA exec on a machine without a GPU: a clean omnimoe::Error from every op, no crash.

TEST(ErrorsCuda, cuda_exec_without_a_gpu_fails_cleanly) {
  if (cuda_available()) GTEST_SKIP() << "a CUDA device is visible: covered by the CUDA tests";
  const LayerConfig cfg = make_config(5, 3, 4, 3, 6);
  LayerData L(cfg, DType::f32, 4, 0, 4);
  Exec exec;
  exec.device = Device::cuda(0);
  auto cuda_view = [](const HostTensor& t) { return on_cuda(t.view()); };
  LayerWeights w;
  w.router = {cuda_view(L.w_r), cuda_view(L.w_c)};
  w.experts = {cuda_view(L.up), cuda_view(L.down)};
  w.mlp = {cuda_view(L.gate_p), cuda_view(L.up_p), cuda_view(L.down_p)};
  const RouterNormState norm{cuda_view(L.row_mean), cuda_view(L.row_var), cuda_view(L.col_mean),
                             cuda_view(L.col_var)};
  HostTensor y(DType::f32, {4, 5});
  // Sizes may or may not be answered without a device; either way, no crash and only Error.
  auto query = [&](const std::function<size_t()>& fn) {
    try {
      return fn();
    } catch (const Error&) {
      return size_t{0};
    }
  };
  const size_t saved_bytes = layer_saved_bytes(cfg, 4, DType::f32);
  const size_t ws_bytes = std::max<size_t>(
      64, query([&] { return layer_forward_workspace_bytes(cfg, 4, DType::f32, exec); }));
  Bytes saved(saved_bytes), ws(ws_bytes);
  try {
    layer_forward(cfg, cuda_view(L.x), w, norm, true, cuda_view(y), saved.buffer(), ws.buffer(),
                  exec);
    ADD_FAILURE() << "layer_forward on a CUDA exec without a GPU returned normally";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_TRUE(what.find("CUDA") != std::string::npos || what.find("cuda") != std::string::npos)
        << what;
    std::printf("[ cuda exec, no GPU ] layer_forward: %s\n", what.c_str());
  }
  HostTensor idx = random_indices(4, 3, 12, Spread::random, 1), off(DType::i32, {13}),
             order(DType::i32, {12});
  EXPECT_THROW(
      schedule_build(cfg, cuda_view(idx), {cuda_view(off), cuda_view(order)}, ws.buffer(), exec),
      Error);
  HostTensor gp(DType::f32, {4, 6}), upre(DType::f32, {4, 6});
  EXPECT_THROW(mlp_forward(cfg, cuda_view(L.x), w.mlp, cuda_view(y), false,
                           {cuda_view(gp), cuda_view(upre)}, ws.buffer(), exec),
               Error);
  try {
    std::printf("[ cuda exec, no GPU ] experts_execution: %s\n",
                experts_execution(cfg, 4, DType::f32, exec));
  } catch (const Error& e) {
    std::printf("[ cuda exec, no GPU ] experts_execution: %s\n", e.what());
  }
}

}  // namespace
}  // namespace omnimoe::test
