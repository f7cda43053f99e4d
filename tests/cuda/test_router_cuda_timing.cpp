// Timing of the router selection, the whole router forward and backward, and the schedule at the
// PERF-NOTES shapes. Prints, never asserts a time. Disabled by default; run with
//   omnimoe_cuda_tests --gtest_also_run_disabled_tests --gtest_filter='*RouterCudaTiming*'
// For a profiler: OMNIMOE_ROUTER_TIMING_SHAPE=pool-1m-k16 times that shape alone, and
// OMNIMOE_ROUTER_TIMING_ITERS=2 sets the timed calls (warm-up: 1 then).
#include <omnimoe/omnimoe.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "cuda_test_support.h"

namespace omnimoe::test {
namespace {

// median_ms's warm-up and timed calls.
int timed_calls() {
  const char* v = std::getenv("OMNIMOE_ROUTER_TIMING_ITERS");
  return v != nullptr && std::atoi(v) > 0 ? std::atoi(v) : 20;
}
int warmup_calls() { return timed_calls() < 20 ? 1 : 3; }

// log_softmax of standard normal logits, per row: what the router feeds the selection.
HostTensor random_logp(int64_t tokens, int64_t n, uint64_t seed) {
  HostTensor h(DType::f32, {tokens, n});
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<double> row(static_cast<size_t>(n));
  for (int64_t t = 0; t < tokens; ++t) {
    double m = -1e300, s = 0;
    for (auto& v : row) m = std::max(m, v = normal(rng));
    for (double v : row) s += std::exp(v - m);
    for (int64_t j = 0; j < n; ++j) h.set(t * n + j, row[j] - m - std::log(s));
  }
  return h;
}

struct Shape {
  const char* name;
  int64_t tokens, nr, nc, k;
};

const Shape kShapes[] = {
    {"pool-1m-k16", 4096, 1024, 1024, 16},
    {"pool-1m-k256", 4096, 1024, 1024, 256},
    {"paper-k512-t4k", 4096, 320, 320, 512},
    {"paper-k4096-t4k", 4096, 320, 320, 4096},
    {"paper-k512-t16k", 16384, 320, 320, 512},
    {"pool-1m-k64", 4096, 1024, 1024, 64},
};

TEST(RouterCudaTiming, DISABLED_select_forward_backward_schedule) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  CudaStream stream;
  const Exec e = cuda_exec(stream.get());
  const DType dt = DType::bf16;
  const int64_t d = 1024;
  std::printf("%-16s %10s %10s %10s %10s %10s %10s\n", "shape", "select", "sel GB/s", "forward",
              "backward", "schedule", "out MB");
  const char* only = std::getenv("OMNIMOE_ROUTER_TIMING_SHAPE");
  const int kWarmup = warmup_calls(), kIters = timed_calls();
  for (const Shape& s : kShapes) {
    if (only != nullptr && std::strcmp(only, s.name) != 0) continue;
    const LayerConfig cfg = make_config(d, s.nr, s.nc, s.k);
    const int64_t T = s.tokens, K = s.k;
    // Three input sets, rotated, so the inputs do not sit in L2 between calls.
    std::vector<DeviceTensor> rows, cols;
    for (int i = 0; i < 3; ++i) {
      rows.emplace_back(random_logp(T, s.nr, 10 + i));
      cols.emplace_back(random_logp(T, s.nc, 20 + i));
    }
    DeviceTensor idx(HostTensor(DType::i32, {T, K})), sc(HostTensor(DType::f32, {T, K}));
    DeviceTensor gates(HostTensor(DType::f32, {T, K}));
    DeviceBuffer sws(router_select_workspace_bytes(cfg, T, e));
    const double sel = median_ms(
        [&](int i) {
          router_select_topk(cfg, rows[i % 3].view(), cols[i % 3].view(), idx.view(), sc.view(),
                             sws.buffer(), e);
        },
        kWarmup, kIters, stream.get());
    const double bytes = 4.0 * T * (s.nr + s.nc) + 8.0 * T * K;

    // The whole router on bf16 x [T, 1024].
    DeviceTensor x(make_random(dt, {T, d}, 1));
    const double b = 3.0 / std::sqrt(double(d));
    DeviceTensor wr(make_random(dt, {s.nr, d}, 2, 0, -b, b)), wc(make_random(dt, {s.nc, d}, 3, 0, -b, b));
    DeviceTensor rm(make_random(DType::f32, {s.nr}, 4)), rv(make_random(DType::f32, {s.nr}, 5, 0, 0.5, 1.5));
    DeviceTensor cm(make_random(DType::f32, {s.nc}, 6)), cv(make_random(DType::f32, {s.nc}, 7, 0, 0.5, 1.5));
    DeviceTensor zr(HostTensor(DType::f32, {T, s.nr})), zc(HostTensor(DType::f32, {T, s.nc}));
    DeviceTensor rr(HostTensor(DType::f32, {s.nr})), rc(HostTensor(DType::f32, {s.nc}));
    DeviceBuffer fws(router_forward_workspace_bytes(cfg, T, dt, e));
    const RouterSaved saved{zr.view(), zc.view(), rr.view(), rc.view()};
    const RouterOutputs out{idx.view(), sc.view(), gates.view()};
    const double fwd = median_ms(
        [&](int) {
          router_forward(cfg, x.view(), {wr.view(), wc.view()},
                         {rm.view(), rv.view(), cm.view(), cv.view()}, true, out, saved,
                         fws.buffer(), e);
        },
        kWarmup, kIters, stream.get());
    DeviceTensor dg(make_random(DType::f32, {T, K}, 8)), dx(HostTensor(dt, {T, d}));
    DeviceTensor gr(HostTensor(dt, {s.nr, d})), gc(HostTensor(dt, {s.nc, d}));
    DeviceBuffer bws(router_backward_workspace_bytes(cfg, T, dt, e));
    const double bwd = median_ms(
        [&](int) {
          router_backward(cfg, x.view(), {wr.view(), wc.view()}, true, saved, out, dg.view(),
                          dx.view(), false, {gr.view(), gc.view()}, bws.buffer(), e);
        },
        kWarmup, kIters, stream.get());
    DeviceTensor off(HostTensor(DType::i32, {cfg.num_experts() + 1}));
    DeviceTensor order(HostTensor(DType::i32, {T * K}));
    DeviceBuffer schws(schedule_workspace_bytes(cfg, T, e));
    const double sch = median_ms(
        [&](int) {
          schedule_build(cfg, idx.view(), {off.view(), order.view()}, schws.buffer(), e);
        },
        kWarmup, kIters, stream.get());
    std::printf("%-16s %8.4fms %10.0f %8.4fms %8.4fms %8.4fms %10.1f\n", s.name, sel,
                bytes / sel * 1e-6, fwd, bwd, sch, 8.0 * T * K * 1e-6);
    EXPECT_TRUE(download(gates).all_finite()) << s.name;
  }
}

}  // namespace
}  // namespace omnimoe::test
