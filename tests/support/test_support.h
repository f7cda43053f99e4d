// Test helpers: owning host tensors, random fills, poisoning, and the tolerance policy.
#pragma once

#include <omnimoe/omnimoe.h>

#include "core/tolerance.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace omnimoe::test {

// An owning host tensor, row-major (optionally with padded rows to test strided views).
class HostTensor {
 public:
  HostTensor() = default;
  HostTensor(DType dtype, std::vector<int64_t> shape, int64_t row_padding = 0);

  TensorView view() const;  // a CPU view (with the padded row stride, if any)
  DType dtype() const { return dtype_; }
  const std::vector<int64_t>& shape() const { return shape_; }
  int64_t numel() const;
  // Leading dimensions collapse into rows; a 1-D tensor is one row.
  int64_t rows() const { return shape_.size() < 2 ? 1 : numel() / std::max<int64_t>(cols(), 1); }
  int64_t cols() const { return shape_.empty() ? 1 : shape_.back(); }
  int64_t row_stride() const { return row_stride_; }
  void* data() { return storage_.data(); }
  const void* data() const { return storage_.data(); }
  size_t bytes() const { return storage_.size(); }

  // Element access by logical flat index (row-major over the shape), as double.
  double get(int64_t flat) const;
  void set(int64_t flat, double value);
  double at(int64_t r, int64_t c) const { return get(r * cols() + c); }

  // Uniform in [lo, hi); never all zeros. Integer tensors get integers in [lo, hi).
  void fill_uniform(uint64_t seed, double lo = -1.0, double hi = 1.0);
  void fill(double value);
  // NaN for floats, 0x7fffffff-ish sentinel for integers: an element left unwritten fails.
  void poison();
  bool all_finite() const;
  std::vector<double> to_vector() const;  // logical elements as double

 private:
  int64_t offset(int64_t flat) const;
  DType dtype_ = DType::f32;
  std::vector<int64_t> shape_;
  int64_t row_stride_ = 0;
  std::vector<uint8_t> storage_;
};

// A layer configuration; inter = 0 means no shared MLP.
inline LayerConfig make_config(int64_t d, int64_t nr, int64_t nc, int64_t k, int64_t inter = 0,
                               Activation act = Activation::silu, Gating gating = Gating::softmax,
                               RouterNorm norm = RouterNorm::batch) {
  LayerConfig c;
  c.hidden = d;
  c.grid_rows = nr;
  c.grid_cols = nc;
  c.top_k = k;
  c.intermediate = inter;
  c.act = act;
  c.gating = gating;
  c.router_norm = norm;
  return c;
}

// The router's configuration (no shared MLP), gating and norm in front.
inline LayerConfig router_config(int64_t d, int64_t nr, int64_t nc, int64_t k,
                                 Gating gating = Gating::softmax,
                                 RouterNorm norm = RouterNorm::batch) {
  return make_config(d, nr, nc, k, 0, Activation::silu, gating, norm);
}

// "T40_Nr9_Nc12_K6": the size part of a test name.
inline std::string shape_name(int64_t T, int64_t nr, int64_t nc, int64_t k) {
  return "T" + std::to_string(T) + "_Nr" + std::to_string(nr) + "_Nc" + std::to_string(nc) +
         "_K" + std::to_string(k);
}

// Equal, or both NaN: for outputs that must match exactly, NaNs included.
inline bool same_or_both_nan(double a, double b) {
  return (std::isnan(a) && std::isnan(b)) || a == b;
}

// The message of the omnimoe::Error that fn throws; "" when it throws none.
template <typename Fn>
std::string error_of(Fn&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// A CPU Exec; threads = 0 is OpenMP's default.
inline Exec cpu_exec(int threads = 0) {
  Exec e;
  e.num_threads = threads;
  return e;
}

// The tolerance policy lives in src/core/tolerance.h (shared with `omnimoe check`).
using omnimoe::Tolerance;
using omnimoe::tolerance_for;

// Largest violation of the tolerance (<= 1 passes) and a description of where.
struct Comparison {
  double worst_ratio = 0.0;  // max |got - want| / (atol + rtol |want|)
  double max_abs_error = 0.0;
  int64_t worst_index = -1;
  double got = 0.0, want = 0.0;
  bool has_nan = false;
  std::string describe() const;
};
Comparison compare(const std::vector<double>& got, const std::vector<double>& want,
                   Tolerance tol);

// Router log-probabilities with non-finite values, for the selection tests of both backends:
// uniform in [-5, 0) (seeds `seed`, `seed` + 1), then about 30% of the entries NaN, +inf or -inf
// (seed + 2), and whole rows of one kind for the first four tokens: token 0 all NaN, 1 all -inf,
// 2 all +inf, 3 rows NaN and columns +inf. row f32 [T, N_r], col f32 [T, N_c], T >= 4.
void fill_non_finite_logp(HostTensor& row, HostTensor& col, uint64_t seed);

}  // namespace omnimoe::test
