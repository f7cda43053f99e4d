// Timing of the shared MLP at ref-quickstart's size, beside the GEMM rate measured in the same
// process. Disabled by default; run with
//   omnimoe_cuda_tests --gtest_also_run_disabled_tests --gtest_filter='*MlpCudaTiming*'
#include <omnimoe/omnimoe.h>

#include <cstdio>

#include "cuda/gemm.h"
#include "cuda_test_support.h"

namespace omnimoe::test {
namespace {

constexpr int kWarmup = 5, kIters = 20;  // median_ms's warm-up and timed calls

DeviceTensor random_device(DType dt, int64_t rows, int64_t cols, uint64_t seed, double bound) {
  return upload(make_random(dt, {rows, cols}, seed, 0, -bound, bound));
}

TEST(MlpCudaTiming, DISABLED_bf16_T4096_d1024_I4096) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  const DType dt = DType::bf16;
  const int64_t T = 4096, d = 1024, I = 4096;
  CudaStream stream;
  const Exec e = cuda_exec(stream.get());

  // The GEMM rate: 8192^3 and the MLP's own [T, d] x [d, I] shape.
  {
    const int64_t n = 8192;
    DeviceTensor a = random_device(dt, n, n, 1, 1.0), b = random_device(dt, n, n, 2, 1.0);
    DeviceTensor c = upload(HostTensor(dt, {n, n}));
    DeviceBuffer ws(cuda::gemm_workspace_bytes());
    const double ms = median_ms(
        [&] { cuda::gemm(a.view(), false, b.view(), true, c.view(), 1, 0, ws.buffer(), e); },
        kWarmup, kIters, stream.get());
    std::printf("gemm bf16 8192^3 (NT): %.3f ms, %.1f TFLOP/s\n", ms,
                2.0 * n * n * n / ms * 1e-9);
  }
  DeviceTensor x = random_device(dt, T, d, 1, 1.0);
  DeviceTensor wg = random_device(dt, I, d, 2, 0.03), wu = random_device(dt, I, d, 3, 0.03);
  DeviceTensor wd = random_device(dt, d, I, 4, 0.015);
  DeviceTensor y = upload(HostTensor(dt, {T, d})), dy = random_device(dt, T, d, 5, 1.0);
  DeviceTensor dx = upload(HostTensor(dt, {T, d}));
  DeviceTensor g = upload(HostTensor(dt, {T, I})), u = upload(HostTensor(dt, {T, I}));
  DeviceTensor dwg = upload(HostTensor(dt, {I, d})), dwu = upload(HostTensor(dt, {I, d}));
  DeviceTensor dwd = upload(HostTensor(dt, {d, I}));
  // Each GEMM of the MLP on its own: where forward and backward spend their time.
  {
    DeviceBuffer ws(cuda::gemm_workspace_bytes());
    DeviceTensor h = random_device(dt, T, I, 6, 1.0);
    struct Step {
      const char* what;
      const DeviceTensor *a, *b, *c;
      bool ta, tb;
    };
    const Step steps[] = {
        {"fwd  gate_pre = x Wg^T    ", &x, &wg, &g, false, true},
        {"fwd  y = h Wd^T           ", &h, &wd, &y, false, true},
        {"bwd  dh = dy Wd           ", &dy, &wd, &g, false, false},
        {"bwd  dWd = dy^T h         ", &dy, &h, &dwd, true, false},
        {"bwd  dWg = d_gate^T x     ", &h, &x, &dwg, true, false},
        {"bwd  dx = d_gate Wg       ", &h, &wg, &dx, false, false},
    };
    for (const Step& st : steps) {
      const double ms = median_ms(
          [&] {
            cuda::gemm(st.a->view(), st.ta, st.b->view(), st.tb, st.c->view(), 1, 0, ws.buffer(),
                       e);
          },
          kWarmup, kIters, stream.get());
      std::printf("gemm %s %.3f ms, %.1f TFLOP/s\n", st.what, ms, 2.0 * T * d * I / ms * 1e-9);
    }
  }
  const LayerConfig cfg = make_config(d, 1, 1, 1, I);
  DeviceBuffer fws(mlp_forward_workspace_bytes(cfg, T, dt, e));
  DeviceBuffer bws(mlp_backward_workspace_bytes(cfg, T, dt, e));
  const double fwd = median_ms(
      [&] {
        mlp_forward(cfg, x.view(), {wg.view(), wu.view(), wd.view()}, y.view(), false,
                    {g.view(), u.view()}, fws.buffer(), e);
      },
      kWarmup, kIters, stream.get());
  const double bwd = median_ms(
      [&] {
        mlp_backward(cfg, x.view(), {wg.view(), wu.view(), wd.view()}, {g.view(), u.view()},
                     dy.view(), dx.view(), false, {dwg.view(), dwu.view(), dwd.view()},
                     bws.buffer(), e);
      },
      kWarmup, kIters, stream.get());
  const double flop = 2.0 * T * d * I;
  std::printf("mlp_forward  bf16 T=%ld d=%ld I=%ld: %.3f ms, %.1f TFLOP/s (3 GEMMs)\n", long(T),
              long(d), long(I), fwd, 3 * flop / fwd * 1e-9);
  std::printf("mlp_backward bf16 T=%ld d=%ld I=%ld: %.3f ms, %.1f TFLOP/s (6 GEMMs)\n", long(T),
              long(d), long(I), bwd, 6 * flop / bwd * 1e-9);
  EXPECT_TRUE(download(y).all_finite());
  EXPECT_TRUE(download(dwg).all_finite());
}

}  // namespace
}  // namespace omnimoe::test
