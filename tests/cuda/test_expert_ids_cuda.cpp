// An expert id outside [0, N) handed to a CUDA op stops the kernel that reads it with a
// device-side assert (the CPU backend throws Error instead: tests/cpu/test_errors.cpp). Each
// case runs in a child process, a GoogleTest death test in the "threadsafe" style: the child
// re-runs this binary, so it owns a fresh CUDA context, which the assert leaves unusable. The
// child must print the op, the id and the range, and a synchronisation after the op must return
// cudaErrorAssert (a CUDA call inside the op may fail first, e.g. a cuBLASLt product launched
// after the kernel stopped); every execution path that reads ids from the caller is covered.
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>

#include "cuda_test_support.h"

namespace omnimoe::test {
namespace {

// i32 [T, K] ids, distinct per token, with the one at [1, 0] replaced by `bad`.
HostTensor ids_with(int64_t tokens, int64_t K, int64_t N, int32_t bad) {
  HostTensor idx(DType::i32, {tokens, K});
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t k = 0; k < K; ++k) idx.set(t * K + k, static_cast<double>((t * 7 + k) % N));
  }
  idx.set(1 * K + 0, bad);
  return idx;
}

// The death test's statement: runs op on a fresh stream, then synchronises the device and exits
// 3, printing what the op threw and what the synchronisation returned (device printf writes to
// stdout, so stdout joins stderr first).
[[noreturn]] void run_expecting_assert(const std::function<void(const Exec&)>& op) {
  dup2(STDERR_FILENO, STDOUT_FILENO);
  try {
    CudaStream stream;
    op(cuda_exec(stream.get()));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "op threw: %s\n", e.what());
  }
  const cudaError_t err = cudaDeviceSynchronize();  // also flushes the device's printf buffer
  std::fflush(stdout);
  std::fprintf(stderr, "synchronize: %s\n", cudaGetErrorName(err));
  std::fflush(stderr);
  std::_Exit(3);
}

// What the child must print: our message, then the synchronisation's error.
std::string expected_output(const char* op, int32_t bad, int64_t n) {
  return std::string("omnimoe: ") + op + ": expert id " + std::to_string(bad) +
         " is outside \\[0, " + std::to_string(n) + "\\).*synchronize: cudaErrorAssert";
}

class ExpertIdsCuda : public ::testing::Test {
 protected:
  void SetUp() override { GTEST_FLAG_SET(death_test_style, "threadsafe"); }
};

// experts_forward and experts_backward on each execution path, bf16, d = 64.
void expect_experts_assert(const char* path, int64_t nr, int64_t nc, int64_t K, int32_t bad,
                           bool backward) {
  SCOPED_TRACE(std::string("path ") + path + (backward ? ", backward" : ", forward"));
  const LayerConfig cfg = make_config(64, nr, nc, K);
  const int64_t T = 40, N = cfg.num_experts(), d = cfg.hidden;
  const DType dt = DType::bf16;
  auto op = [&](const Exec& e) {
    setenv("OMNIMOE_EXPERTS_PATH", path, 1);
    DeviceTensor x(make_random(dt, {T, d}, 1)), up(make_random(dt, {N, d}, 2)),
        down(make_random(dt, {N, d}, 3)), idx(ids_with(T, K, N, bad)),
        gates(make_random(DType::f32, {T, K}, 4, 0, 0.1, 1.0)), y(HostTensor(dt, {T, d})),
        preact(make_random(DType::f32, {T, K}, 5));
    if (!backward) {
      DeviceBuffer ws(experts_forward_workspace_bytes(cfg, T, dt, e));
      experts_forward(cfg, x.view(), {up.view(), down.view()}, idx.view(), gates.view(), y.view(),
                      false, preact.view(), ws.buffer(), e);
      return;
    }
    DeviceTensor offsets(HostTensor(DType::i32, {N + 1})), order(HostTensor(DType::i32, {T * K}));
    offsets.poison();
    order.poison();
    DeviceTensor dy(make_random(dt, {T, d}, 6)), dx(HostTensor(dt, {T, d})),
        dup(HostTensor(dt, {N, d})), ddown(HostTensor(dt, {N, d})),
        dgates(HostTensor(DType::f32, {T, K}));
    DeviceBuffer ws(experts_backward_workspace_bytes(cfg, T, dt, e));
    experts_backward(cfg, x.view(), {up.view(), down.view()}, idx.view(), gates.view(),
                     preact.view(), {offsets.view(), order.view()}, dy.view(), dx.view(), false,
                     {dup.view(), ddown.view()}, dgates.view(), ws.buffer(), e);
  };
  EXPECT_EXIT(run_expecting_assert(op), ::testing::ExitedWithCode(3),
              expected_output("experts", bad, N));
}

TEST_F(ExpertIdsCuda, ExpertsForward_gather_dense_tiled) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  expect_experts_assert("gather", 8, 8, 4, 64, false);
  expect_experts_assert("gather", 8, 8, 4, -1, false);
  expect_experts_assert("dense", 8, 8, 4, 70, false);
  expect_experts_assert("tiled", 8, 8, 4, -5, false);
}

TEST_F(ExpertIdsCuda, ExpertsBackward_gather_dense_tiled) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  expect_experts_assert("gather", 8, 8, 4, 64, true);
  expect_experts_assert("dense", 8, 8, 4, -2, true);
  expect_experts_assert("tiled", 8, 8, 4, 1000, true);
}

// Both builds: per-tile sorts (small pairs x N) and the histogram + radix sort (N = 2^20).
TEST_F(ExpertIdsCuda, ScheduleBuild_tiles_and_radix) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  for (const int64_t grid : {int64_t{8}, int64_t{1024}}) {
    const LayerConfig cfg = make_config(8, grid, grid, 4);
    const int64_t T = 40, N = cfg.num_experts();
    const int32_t bad = static_cast<int32_t>(N);
    SCOPED_TRACE("N = " + std::to_string(N));
    auto op = [&](const Exec& e) {
      DeviceTensor idx(ids_with(T, 4, N, bad)), offsets(HostTensor(DType::i32, {N + 1})),
          order(HostTensor(DType::i32, {T * 4}));
      DeviceBuffer ws(schedule_workspace_bytes(cfg, T, e));
      schedule_build(cfg, idx.view(), {offsets.view(), order.view()}, ws.buffer(), e);
    };
    EXPECT_EXIT(run_expecting_assert(op), ::testing::ExitedWithCode(3),
                expected_output("schedule_build", bad, N));
  }
}

// Both gate-gradient kernels: one warp per token (K <= 32) and one block per token (K = 48).
TEST_F(ExpertIdsCuda, RouterBackward_warp_and_block) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  for (const int64_t K : {int64_t{5}, int64_t{48}}) {
    const LayerConfig cfg = router_config(16, 9, 11, K);
    const int64_t T = 40, N = cfg.num_experts(), d = cfg.hidden;
    const DType dt = DType::f32;
    const int32_t bad = -7;
    SCOPED_TRACE("K = " + std::to_string(K));
    auto op = [&](const Exec& e) {
      DeviceTensor x(make_random(dt, {T, d}, 1)), wr(make_random(dt, {9, d}, 2)),
          wc(make_random(dt, {11, d}, 3)), zr(make_random(DType::f32, {T, 9}, 4)),
          zc(make_random(DType::f32, {T, 11}, 5)), rr(make_random(DType::f32, {9}, 6, 0, 0.5, 1)),
          rc(make_random(DType::f32, {11}, 7, 0, 0.5, 1)), idx(ids_with(T, K, N, bad)),
          scores(make_random(DType::f32, {T, K}, 8)),
          gates(make_random(DType::f32, {T, K}, 9, 0, 0.1, 1.0)),
          dgates(make_random(DType::f32, {T, K}, 10)), dx(HostTensor(dt, {T, d})),
          grow(HostTensor(dt, {9, d})), gcol(HostTensor(dt, {11, d}));
      DeviceBuffer ws(router_backward_workspace_bytes(cfg, T, dt, e));
      router_backward(cfg, x.view(), {wr.view(), wc.view()}, true,
                      {zr.view(), zc.view(), rr.view(), rc.view()},
                      {idx.view(), scores.view(), gates.view()}, dgates.view(), dx.view(), false,
                      {grow.view(), gcol.view()}, ws.buffer(), e);
    };
    EXPECT_EXIT(run_expecting_assert(op), ::testing::ExitedWithCode(3),
                expected_output("router_backward", bad, N));
  }
}

}  // namespace
}  // namespace omnimoe::test
