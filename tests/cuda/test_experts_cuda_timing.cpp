// Timing of the CUDA experts ops, each execution path, at the pool and paper shapes, beside the
// device copy bandwidth measured in the same process. Disabled by default; run with
//   omnimoe_cuda_tests --gtest_also_run_disabled_tests --gtest_filter='*ExpertsCudaTiming*'
// Bytes counted: per pair one W row and one V row (what a gather reads), plus x/dy in, y/dx out,
// the per-pair f32/i32 arrays; backward also the pass over the schedule (x and dy rows per pair,
// all N rows of dW and dV written). "floor" counts each distinct expert row once instead.
#include <omnimoe/omnimoe.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <cstdlib>
#include <random>
#include <unordered_set>
#include <vector>

#include "cuda_test_support.h"

namespace omnimoe::test {
namespace {

constexpr int kWarmup = 3, kIters = 15;  // median_ms's warm-up and timed calls

// Device copy bandwidth, bytes read + written per second.
double copy_gbps(cudaStream_t stream) {
  const size_t bytes = size_t{1} << 30;
  DeviceBuffer a(bytes), b(bytes);
  OMNIMOE_TEST_CUDA_CHECK(cudaMemsetAsync(a.data(), 1, bytes, stream));
  const double ms = median_ms(
      [&] {
        OMNIMOE_TEST_CUDA_CHECK(
            cudaMemcpyAsync(b.data(), a.data(), bytes, cudaMemcpyDeviceToDevice, stream));
      },
      kWarmup, kIters, stream);
  return 2.0 * bytes / (ms * 1e-3) / 1e9;
}

// A dense bf16 [rows, cols] matrix in device memory.
struct DeviceMatrix {
  DeviceBuffer buffer;
  TensorView view;
  DeviceMatrix(int64_t rows, int64_t cols)
      : buffer(static_cast<size_t>(rows * cols) * 2),
        view(TensorView::contiguous(buffer.data(), DType::bf16, {rows, cols}, Device::cuda(0))) {
    buffer.poison();
  }
};

// A large table: a random 32 MB block uploaded once and repeated (distinct addresses, so no
// cache sees the repetition), values in +-bound.
DeviceMatrix big_table(int64_t rows, int64_t cols, uint64_t seed, double bound) {
  DeviceMatrix t(rows, cols);
  const int64_t block_rows = std::min<int64_t>(rows, (int64_t{32} << 20) / (cols * 2));
  const HostTensor block = make_random(DType::bf16, {block_rows, cols}, seed, 0, -bound, bound);
  const size_t row_bytes = static_cast<size_t>(cols) * 2;
  for (int64_t r = 0; r < rows; r += block_rows) {
    const int64_t n = std::min(block_rows, rows - r);
    OMNIMOE_TEST_CUDA_CHECK(cudaMemcpy(static_cast<char*>(t.buffer.data()) + r * row_bytes,
                                       block.data(), n * row_bytes, cudaMemcpyHostToDevice));
  }
  return t;
}

struct TimingShape {
  const char* name;
  int64_t tokens, hidden, grid_rows, grid_cols, top_k;
};

// f32 [n] on the device, every element `value`.
DeviceTensor f32_filled(int64_t n, double value) {
  HostTensor h(DType::f32, {n});
  h.fill(value);
  return DeviceTensor(h);
}

// routing: "uniform" draws K distinct experts per token uniformly; "router" runs router_forward
// (batch norm, training) on random x and router weights, so each token's experts cluster in its
// top grid rows and columns, as in the layer.
void time_shape(const TimingShape& s, const char* routing, double copy) {
  const int64_t T = s.tokens, d = s.hidden, K = s.top_k, N = s.grid_rows * s.grid_cols;
  const int64_t P = T * K;
  const LayerConfig cfg = make_config(d, s.grid_rows, s.grid_cols, K);
  const bool by_router = std::string(routing) == "router";

  CudaStream stream;
  const Exec e = cuda_exec(stream.get());
  DeviceTensor x(make_random(DType::bf16, {T, d}, 3)), dy(make_random(DType::bf16, {T, d}, 4));
  DeviceTensor d_idx(HostTensor(DType::i32, {T, K}));
  DeviceTensor gates(make_random(DType::f32, {T, K}, 6, 0, 0.05, 1.0));
  DeviceTensor d_off(HostTensor(DType::i32, {N + 1})), d_order(HostTensor(DType::i32, {P}));
  const Schedule sched{d_off.view(), d_order.view()};
  HostTensor idx(DType::i32, {T, K});
  if (by_router) {
    const double b = std::sqrt(3.0 / static_cast<double>(d));
    DeviceTensor w_r(make_random(DType::bf16, {s.grid_rows, d}, 7, 0, -b, b));
    DeviceTensor w_c(make_random(DType::bf16, {s.grid_cols, d}, 8, 0, -b, b));
    DeviceTensor rm = f32_filled(s.grid_rows, 0.0), rv = f32_filled(s.grid_rows, 1.0);
    DeviceTensor cm = f32_filled(s.grid_cols, 0.0), cv = f32_filled(s.grid_cols, 1.0);
    DeviceTensor scores(HostTensor(DType::f32, {T, K}));
    DeviceTensor row_logits(HostTensor(DType::f32, {T, s.grid_rows}));
    DeviceTensor col_logits(HostTensor(DType::f32, {T, s.grid_cols}));
    DeviceTensor row_rstd = f32_filled(s.grid_rows, 1.0), col_rstd = f32_filled(s.grid_cols, 1.0);
    DeviceBuffer ws(std::max(router_forward_workspace_bytes(cfg, T, DType::bf16, e),
                             schedule_workspace_bytes(cfg, T, e)));
    router_forward(cfg, x.view(), {w_r.view(), w_c.view()},
                   {rm.view(), rv.view(), cm.view(), cv.view()}, true,
                   {d_idx.view(), scores.view(), gates.view()},
                   {row_logits.view(), col_logits.view(), row_rstd.view(), col_rstd.view()},
                   ws.buffer(), e);
    schedule_build(cfg, d_idx.view(), sched, ws.buffer(), e);
    stream.synchronize();
    d_idx.copy_to(idx);
  } else {
    // K distinct uniform experts per token; schedule by a host counting sort.
    HostTensor offsets(DType::i32, {N + 1}), order(DType::i32, {P});
    std::mt19937_64 rng(5);
    std::uniform_int_distribution<int32_t> pick(0, static_cast<int32_t>(N - 1));
    auto* ids = static_cast<int32_t*>(idx.data());
    std::unordered_set<int32_t> chosen;
    for (int64_t t = 0; t < T; ++t) {
      chosen.clear();
      for (int64_t k = 0; k < K; ++k) {
        int32_t v = pick(rng);
        while (!chosen.insert(v).second) v = pick(rng);
        ids[t * K + k] = v;
      }
    }
    std::vector<int32_t> count(static_cast<size_t>(N + 1), 0);
    for (int64_t p = 0; p < P; ++p) ++count[ids[p] + 1];
    for (int64_t v = 0; v < N; ++v) count[v + 1] += count[v];
    std::memcpy(offsets.data(), count.data(), (N + 1) * 4);
    for (int64_t p = 0; p < P; ++p) static_cast<int32_t*>(order.data())[count[ids[p]]++] = p;
    d_idx.copy_from(idx);
    d_off.copy_from(offsets);
    d_order.copy_from(order);
  }
  int64_t distinct = 0;
  {
    std::vector<uint8_t> seen(static_cast<size_t>(N), 0);
    const auto* ids = static_cast<const int32_t*>(idx.data());
    for (int64_t p = 0; p < P; ++p) seen[ids[p]] = 1;
    for (uint8_t v : seen) distinct += v;
  }

  const double a = std::sqrt(3.0 / static_cast<double>(d));
  DeviceMatrix up = big_table(N, d, 1, a), down = big_table(N, d, 2, 1.0);
  DeviceMatrix dup(N, d), ddown(N, d);
  DeviceTensor y(HostTensor(DType::bf16, {T, d})), dx(HostTensor(DType::bf16, {T, d}));
  DeviceTensor preact(HostTensor(DType::f32, {T, K})), dgates(HostTensor(DType::f32, {T, K}));

  const double row = static_cast<double>(d) * 2;
  const double fwd_bytes = P * 2 * row + 2 * T * row + P * 12.0;
  const double fwd_floor = distinct * 2 * row + 2 * T * row + P * 12.0;
  const double bwd_bytes = (P * 2 * row + 2 * T * row + P * 24.0) +       // token pass
                           (P * 2 * row + 2 * N * row + N * 4.0 + P * 12.0);  // schedule pass
  const double m = static_cast<double>(P) / N;
  struct Row {
    const char* path;
  };
  const Row rows[] = {{"gather"}, {"tiled"}};
  for (const Row& r : rows) {
    setenv("OMNIMOE_EXPERTS_PATH", r.path, 1);
    const char* ran = nullptr;
    try {
      ran = experts_execution(cfg, T, DType::bf16, e);
    } catch (const Error&) {
      std::printf("%-16s %-7s m=%7.3f %-6s | n/a (path does not handle this call)\n", s.name,
                  routing, m, r.path);
      continue;
    }
    DeviceBuffer fws(experts_forward_workspace_bytes(cfg, T, DType::bf16, e));
    DeviceBuffer bws(experts_backward_workspace_bytes(cfg, T, DType::bf16, e));
    const int reps = P * d > (int64_t{1} << 31) ? 5 : 15;
    const double f_ms = median_ms(
        [&] {
          experts_forward(cfg, x.view(), {up.view, down.view}, d_idx.view(), gates.view(),
                          y.view(), false, preact.view(), fws.buffer(), e);
        },
        2, reps, stream.get());
    const double b_ms = median_ms(
        [&] {
          experts_backward(cfg, x.view(), {up.view, down.view}, d_idx.view(), gates.view(),
                           preact.view(), sched, dy.view(), dx.view(), false,
                           {dup.view, ddown.view}, dgates.view(), bws.buffer(), e);
        },
        2, reps, stream.get());
    const double f_gbps = fwd_bytes / (f_ms * 1e-3) / 1e9;
    const double b_gbps = bwd_bytes / (b_ms * 1e-3) / 1e9;
    std::printf(
        "%-16s %-7s m=%7.3f %-6s | fwd %8.4f ms %6.0f GB/s (%.2f of copy; floor %.4f ms) | "
        "bwd %8.4f ms %6.0f GB/s (%.2f of copy)\n",
        s.name, routing, m, ran, f_ms, f_gbps, f_gbps / copy,
        fwd_floor / (copy * 1e9) * 1e3, b_ms, b_gbps, b_gbps / copy);
  }
  unsetenv("OMNIMOE_EXPERTS_PATH");
  std::printf("%-16s %-7s default path: %s (distinct experts %lld of %lld)\n", s.name, routing,
              experts_execution(cfg, T, DType::bf16, e), static_cast<long long>(distinct),
              static_cast<long long>(N));
}

TEST(ExpertsCudaTiming, DISABLED_bf16_shapes) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  cudaDeviceProp prop{};
  OMNIMOE_TEST_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  CudaStream stream;
  const double copy = copy_gbps(stream.get());
  {
    const size_t bytes = size_t{4} << 30;
    DeviceBuffer b(bytes);
    const double ms = median_ms(
        [&] { OMNIMOE_TEST_CUDA_CHECK(cudaMemsetAsync(b.data(), 0, bytes, stream.get())); },
        kWarmup, kIters, stream.get());
    std::printf("device %s, copy %.0f GB/s (read + write), memset 4 GB %.3f ms = %.0f GB/s\n",
                prop.name, copy, ms, bytes / (ms * 1e-3) / 1e9);
  }
  const char* only = std::getenv("OMNIMOE_TIMING_SHAPE");
  if (only && !*only) only = nullptr;
  const TimingShape shapes[] = {
      {"pool-1m-k16", 4096, 1024, 1024, 1024, 16},  {"pool-1m-k256", 4096, 1024, 1024, 1024, 256},
      {"N102k-k32", 4096, 1024, 320, 320, 32},      {"N102k-k128", 4096, 1024, 320, 320, 128},
      {"N102k-k256", 4096, 1024, 320, 320, 256},    {"paper-k512-t4k", 4096, 1024, 320, 320, 512},
      {"ref-quickstart", 4096, 1024, 64, 64, 16},  {"paper-k4096-t4k", 4096, 1024, 320, 320, 4096},
  };
  for (const TimingShape& s : shapes) {
    if (only && std::string(only).find(s.name) == std::string::npos) continue;
    for (const char* routing : {"uniform", "router"}) time_shape(s, routing, copy);
  }
}

}  // namespace
}  // namespace omnimoe::test
