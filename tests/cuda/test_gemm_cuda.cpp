// cuda::gemm (cuBLASLt) against a double-precision product of the same stored inputs.
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "cuda/gemm.h"
#include "cuda_test_support.h"

namespace omnimoe::test {
namespace {

struct GemmCase {
  DType ab;
  DType c;
  bool trans_a, trans_b;
  int64_t m, n, k;
  int64_t padding;  // extra elements per row of A, B and C
  bool shifted;     // views start one element into their rows: pointers only dtype-aligned
  float alpha, beta;
  int sm_count = 0;  // Exec::sm_count: products sized for fewer SMs (another branch beside)
  bool addend = false;  // D = alpha AB + beta E into a poisoned D, E another matrix (C != D)
};

std::string case_name(const GemmCase& g) {
  std::string s = std::string(dtype_name(g.ab));
  if (g.c != g.ab) s += std::string("_C") + dtype_name(g.c);
  s += std::string("_") + (g.trans_a ? "T" : "N") + (g.trans_b ? "T" : "N");
  s += "_m" + std::to_string(g.m) + "_n" + std::to_string(g.n) + "_k" + std::to_string(g.k);
  if (g.padding) s += "_pad" + std::to_string(g.padding);
  if (g.shifted) s += "_shifted";
  s += g.beta == 0.0f ? "_beta0" : "_beta1";
  if (g.alpha != 1.0f) s += "_alpha";
  if (g.sm_count) s += "_sm" + std::to_string(g.sm_count);
  if (g.addend) s += "_addend";
  return s;
}

// A view of `d`, optionally starting one element into each row (cols - 1 columns then).
TensorView shifted_view(const DeviceTensor& d, bool shifted) {
  TensorView v = d.view();
  if (shifted) {
    v.data = static_cast<char*>(v.data) + dtype_size(v.dtype);
    v.shape[1] -= 1;
  }
  return v;
}

// Logical element (r, c) of the (possibly shifted) view of `h`.
double host_at(const HostTensor& h, bool shifted, int64_t r, int64_t c) {
  return h.at(r, c + (shifted ? 1 : 0));
}

class GemmCuda : public ::testing::TestWithParam<GemmCase> {};

TEST_P(GemmCuda, MatchesDoubleProduct) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  const GemmCase g = GetParam();
  const int64_t sh = g.shifted ? 1 : 0;
  const int64_t a_rows = g.trans_a ? g.k : g.m, a_cols = g.trans_a ? g.m : g.k;
  const int64_t b_rows = g.trans_b ? g.n : g.k, b_cols = g.trans_b ? g.k : g.n;
  HostTensor a = make_random(g.ab, {a_rows, a_cols + sh}, 11, g.padding);
  HostTensor b = make_random(g.ab, {b_rows, b_cols + sh}, 12, g.padding);
  HostTensor c(g.c, {g.m, g.n + sh}, g.padding);
  if (g.beta == 0.0f || g.addend) {
    c.poison();  // beta = 0 must not read C; with an addend C is only written
  } else {
    c.fill_uniform(13);
  }
  // The addend's rows: D's stride, or (cases with A transposed) a longer one.
  const HostTensor e = make_random(g.c, {g.m, g.n + sh}, 14, g.padding + (g.trans_a ? 5 : 0));
  DeviceTensor da = upload(a), db = upload(b), dc = upload(c), de = upload(e);

  DeviceBuffer ws(cuda::gemm_workspace_bytes());
  CudaStream stream;
  Exec exec = cuda_exec(stream.get());
  exec.sm_count = g.sm_count;
  if (g.addend) {
    cuda::gemm(shifted_view(da, g.shifted), g.trans_a, shifted_view(db, g.shifted), g.trans_b,
               shifted_view(de, g.shifted), shifted_view(dc, g.shifted), g.alpha, g.beta,
               ws.buffer(), exec);
  } else {
    cuda::gemm(shifted_view(da, g.shifted), g.trans_a, shifted_view(db, g.shifted), g.trans_b,
               shifted_view(dc, g.shifted), g.alpha, g.beta, ws.buffer(), exec);
  }
  stream.synchronize();
  const HostTensor got = download(dc);
  if (g.addend) EXPECT_EQ(download(de).to_vector(), e.to_vector()) << "the addend was written";

  std::vector<double> got_v, want_v;
  for (int64_t i = 0; i < g.m; ++i) {
    for (int64_t j = 0; j < g.n; ++j) {
      double s = 0.0;
      for (int64_t p = 0; p < g.k; ++p) {
        const double av = g.trans_a ? host_at(a, g.shifted, p, i) : host_at(a, g.shifted, i, p);
        const double bv = g.trans_b ? host_at(b, g.shifted, j, p) : host_at(b, g.shifted, p, j);
        s += av * bv;
      }
      double want = g.alpha * s;
      if (g.beta != 0.0f) want += g.beta * host_at(g.addend ? e : c, g.shifted, i, j);
      want_v.push_back(want);
      got_v.push_back(host_at(got, g.shifted, i, j));
    }
  }
  const Comparison cmp = compare(got_v, want_v, tolerance_for(g.c, g.k));
  EXPECT_LE(cmp.worst_ratio, 1.0) << cmp.describe();

  // The skipped first column of a shifted view and the row padding stay as they were.
  if (g.shifted) {
    for (int64_t i = 0; i < g.m; ++i) {
      const double before = c.at(i, 0), after = got.at(i, 0);
      EXPECT_TRUE((std::isnan(before) && std::isnan(after)) || before == after)
          << "column 0 of row " << i << " was written";
    }
  }
}

std::vector<GemmCase> gemm_cases() {
  std::vector<GemmCase> cases;
  for (DType ab : {DType::f32, DType::f64, DType::bf16, DType::f16}) {
    for (int t = 0; t < 4; ++t) {
      for (float beta : {0.0f, 1.0f}) {
        cases.push_back({ab, ab, (t & 1) != 0, (t & 2) != 0, 37, 53, 129, 0, false, 1.0f, beta});
      }
      // Strided rows, and pointers only aligned to the element size.
      cases.push_back({ab, ab, (t & 1) != 0, (t & 2) != 0, 41, 23, 67, 3, false, 1.0f, 0.0f});
      cases.push_back({ab, ab, (t & 1) != 0, (t & 2) != 0, 19, 33, 45, 1, true, 1.0f, 1.0f});
    }
    cases.push_back({ab, ab, false, true, 1, 1, 1, 0, false, 1.0f, 0.0f});
    cases.push_back({ab, ab, false, false, 257, 129, 300, 0, false, -0.5f, 1.0f});
  }
  // fp32 output from 16-bit inputs.
  for (DType ab : {DType::bf16, DType::f16}) {
    cases.push_back({ab, DType::f32, false, true, 37, 53, 129, 0, false, 1.0f, 0.0f});
    cases.push_back({ab, DType::f32, true, false, 37, 53, 129, 2, false, 1.0f, 1.0f});
  }
  // Sized for a few SMs, as the layer's MLP is while the expert branch runs beside it.
  for (DType ab : {DType::bf16, DType::f32}) {
    cases.push_back({ab, ab, false, true, 257, 129, 300, 0, false, 1.0f, 0.0f, 16});
    cases.push_back({ab, ab, true, false, 130, 520, 96, 0, false, 1.0f, 1.0f, 1});
  }
  // Another matrix added (the layer's join: y = h W_down^T + the experts' y).
  for (DType ab : {DType::bf16, DType::f32}) {
    cases.push_back({ab, ab, false, true, 257, 129, 300, 0, false, 1.0f, 1.0f, 0, true});
    cases.push_back({ab, ab, true, false, 41, 23, 67, 3, true, -0.5f, 1.0f, 0, true});
  }
  cases.push_back({DType::bf16, DType::bf16, false, true, 37, 53, 129, 2, false, 1.0f, 0.0f, 0,
                   true});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Cases, GemmCuda, ::testing::ValuesIn(gemm_cases()),
                         [](const ::testing::TestParamInfo<GemmCase>& info) {
                           return case_name(info.param);
                         });

// gemm_pair: two products of one shape. Operands evenly spaced in memory (the second B and C
// rows after the first's, A shared) run as one batched launch; otherwise as two products.
struct PairCase {
  const char* name;
  DType ab, c;
  bool trans_a, trans_b;
  int64_t m, n, k, padding;
  float beta;
  bool b_reversed;     // B's second matrix before its first: two products
  int64_t c_gap_rows;  // rows between the two Cs; -1: the second C overlaps the first
  bool want_batched;
};

class GemmPairCuda : public ::testing::TestWithParam<PairCase> {};

TEST_P(GemmPairCuda, BothProductsMatchDoubleProducts) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  const PairCase g = GetParam();
  const int64_t a_rows = g.trans_a ? g.k : g.m, a_cols = g.trans_a ? g.m : g.k;
  const int64_t b_rows = g.trans_b ? g.n : g.k, b_cols = g.trans_b ? g.k : g.n;
  const HostTensor a = make_random(g.ab, {a_rows, a_cols}, 21, g.padding);
  const HostTensor b = make_random(g.ab, {2 * b_rows, b_cols}, 22, g.padding);
  // Both Cs in one matrix: rows [0, m) and [m + gap, 2m + gap) (gap -1: they share a row).
  const int64_t c1_row = g.m + g.c_gap_rows;
  HostTensor c = make_random(g.c, {c1_row + g.m, g.n}, 23, g.padding);
  if (g.beta == 0.0f) c.poison();
  DeviceTensor da = upload(a), db = upload(b), dc = upload(c);
  const TensorView b0 = row_block(db.view(), g.b_reversed ? b_rows : 0, b_rows);
  const TensorView b1 = row_block(db.view(), g.b_reversed ? 0 : b_rows, b_rows);
  const TensorView c0 = row_block(dc.view(), 0, g.m), c1 = row_block(dc.view(), c1_row, g.m);

  DeviceBuffer ws(cuda::gemm_workspace_bytes());
  CudaStream stream;
  const bool batched = cuda::gemm_pair({da.view(), da.view()}, g.trans_a, {b0, b1}, g.trans_b,
                                       {c0, c1}, 1.0f, g.beta, ws.buffer(),
                                       cuda_exec(stream.get()));
  stream.synchronize();
  const char* how = std::getenv("OMNIMOE_GEMM_PAIR");
  const bool forced_separate = how != nullptr && std::string(how) == "separate";
  EXPECT_EQ(batched, g.want_batched && !forced_separate);
  const HostTensor got = download(dc);

  std::vector<double> got_v, want_v;
  for (int product = 0; product < 2; ++product) {
    const int64_t b_row0 = (product == 1) != g.b_reversed ? b_rows : 0;
    const int64_t c_row0 = product == 0 ? 0 : c1_row;
    for (int64_t i = 0; i < g.m; ++i) {
      for (int64_t j = 0; j < g.n; ++j) {
        if (g.c_gap_rows < 0 && product == 0 && i >= c1_row) continue;  // overwritten by the second
        double s = 0.0;
        for (int64_t p = 0; p < g.k; ++p) {
          const double av = g.trans_a ? a.at(p, i) : a.at(i, p);
          const double bv = g.trans_b ? b.at(b_row0 + j, p) : b.at(b_row0 + p, j);
          s += av * bv;
        }
        want_v.push_back(s + (g.beta != 0.0f ? g.beta * c.at(c_row0 + i, j) : 0.0));
        got_v.push_back(got.at(c_row0 + i, j));
      }
    }
  }
  const Comparison cmp = compare(got_v, want_v, tolerance_for(g.c, g.k));
  EXPECT_LE(cmp.worst_ratio, 1.0) << cmp.describe();
  // Rows between the two Cs stay as they were.
  for (int64_t i = g.m; i < c1_row; ++i) {
    for (int64_t j = 0; j < g.n; ++j) {
      const double before = c.at(i, j), after = got.at(i, j);
      EXPECT_TRUE((std::isnan(before) && std::isnan(after)) || before == after)
          << "row " << i << " between the two products was written";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Cases, GemmPairCuda,
    ::testing::Values(
        // The router's logits: bf16 x times [W_r; W_c]^T into consecutive f32 matrices.
        PairCase{"logits_bf16_Cf32_NT", DType::bf16, DType::f32, false, true, 37, 53, 129, 0,
                 0.0f, false, 0, true},
        PairCase{"f16_NT_padded_gap", DType::f16, DType::f16, false, true, 41, 24, 72, 3, 0.0f,
                 false, 5, true},
        PairCase{"f32_NN_beta1", DType::f32, DType::f32, false, false, 19, 33, 45, 2, 1.0f,
                 false, 0, true},
        PairCase{"bf16_TN", DType::bf16, DType::bf16, true, false, 64, 40, 96, 0, 0.0f, false,
                 0, true},
        // Not batched: B's second before its first, or Cs that overlap.
        PairCase{"bf16_NT_reversed_B", DType::bf16, DType::bf16, false, true, 37, 53, 129, 0,
                 0.0f, true, 0, false},
        PairCase{"bf16_NT_overlapping_C", DType::bf16, DType::bf16, false, true, 37, 53, 129, 0,
                 0.0f, false, -1, false},
        PairCase{"f64_NT", DType::f64, DType::f64, false, true, 17, 9, 33, 0, 0.0f, false, 0,
                 false}),
    [](const ::testing::TestParamInfo<PairCase>& info) { return std::string(info.param.name); });

// k = 0: no products. beta = 0 writes zeros (a weight gradient over zero tokens), beta = 1 keeps C.
TEST(GemmCudaEmpty, bf16_k0_beta0_writes_zeros_beta1_keeps_C) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  HostTensor a(DType::bf16, {0, 7}), b(DType::bf16, {0, 5});
  HostTensor c(DType::bf16, {7, 5}, 2);
  c.poison();
  DeviceTensor da = upload(a), db = upload(b), dc = upload(c);
  DeviceBuffer ws(cuda::gemm_workspace_bytes());
  CudaStream stream;
  cuda::gemm(da.view(), true, db.view(), false, dc.view(), 1.0f, 0.0f, ws.buffer(),
             cuda_exec(stream.get()));
  stream.synchronize();
  HostTensor zeros = download(dc);
  for (double v : zeros.to_vector()) ASSERT_EQ(v, 0.0);

  HostTensor c1 = make_random(DType::bf16, {7, 5}, 3, 2);
  dc.copy_from(c1);
  cuda::gemm(da.view(), true, db.view(), false, dc.view(), 1.0f, 1.0f, ws.buffer(),
             cuda_exec(stream.get()));
  stream.synchronize();
  EXPECT_EQ(download(dc).to_vector(), c1.to_vector());

  // With an addend: D = beta * addend.
  dc.copy_from(c);  // poisoned again
  DeviceTensor de = upload(c1);
  cuda::gemm(da.view(), true, db.view(), false, de.view(), dc.view(), 1.0f, 1.0f, ws.buffer(),
             cuda_exec(stream.get()));
  stream.synchronize();
  EXPECT_EQ(download(dc).to_vector(), c1.to_vector());
}

TEST(GemmCudaErrors, mismatched_inner_dimension_and_dtype_throw) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  HostTensor a(DType::f32, {4, 5}), b(DType::f32, {6, 3}), c(DType::f32, {4, 3});
  HostTensor b16(DType::bf16, {5, 3});
  DeviceTensor da = upload(a), db = upload(b), dc = upload(c), db16 = upload(b16);
  const Exec exec = cuda_exec(nullptr);
  EXPECT_THROW(cuda::gemm(da.view(), false, db.view(), false, dc.view(), 1, 0, {}, exec), Error);
  EXPECT_THROW(cuda::gemm(da.view(), false, db16.view(), false, dc.view(), 1, 0, {}, exec),
               Error);
}

// The call records into a CUDA graph (no host synchronisation, no allocation) and replays.
TEST(GemmCudaGraph, bf16_NT_m64_n96_k128_captured_and_replayed) {
  OMNIMOE_SKIP_WITHOUT_GPU();
  HostTensor a = make_random(DType::bf16, {64, 128}, 1), b = make_random(DType::bf16, {96, 128}, 2);
  HostTensor c(DType::bf16, {64, 96});
  c.poison();
  DeviceTensor da = upload(a), db = upload(b), dc = upload(c);
  DeviceBuffer ws(cuda::gemm_workspace_bytes());
  CudaStream stream;
  // Warm the plan cache outside the capture, as a real caller would on its first step.
  cuda::gemm(da.view(), false, db.view(), true, dc.view(), 1, 0, ws.buffer(),
             cuda_exec(stream.get()));
  stream.synchronize();
  dc.poison();
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t instance = nullptr;
  OMNIMOE_TEST_CUDA_CHECK(cudaStreamBeginCapture(stream.get(), cudaStreamCaptureModeGlobal));
  cuda::gemm(da.view(), false, db.view(), true, dc.view(), 1, 0, ws.buffer(),
             cuda_exec(stream.get()));
  OMNIMOE_TEST_CUDA_CHECK(cudaStreamEndCapture(stream.get(), &graph));
  OMNIMOE_TEST_CUDA_CHECK(cudaGraphInstantiate(&instance, graph, 0));
  OMNIMOE_TEST_CUDA_CHECK(cudaGraphLaunch(instance, stream.get()));
  stream.synchronize();
  cudaGraphExecDestroy(instance);
  cudaGraphDestroy(graph);
  const HostTensor got = download(dc);
  std::vector<double> want;
  for (int64_t i = 0; i < 64; ++i) {
    for (int64_t j = 0; j < 96; ++j) {
      double s = 0;
      for (int64_t p = 0; p < 128; ++p) s += a.at(i, p) * b.at(j, p);
      want.push_back(s);
    }
  }
  const Comparison cmp = compare(got.to_vector(), want, tolerance_for(DType::bf16, 128));
  EXPECT_LE(cmp.worst_ratio, 1.0) << cmp.describe();
}

}  // namespace
}  // namespace omnimoe::test
