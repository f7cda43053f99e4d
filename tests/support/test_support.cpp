#include "test_support.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>

#include "core/half.h"

namespace omnimoe::test {

HostTensor::HostTensor(DType dtype, std::vector<int64_t> shape, int64_t row_padding)
    : dtype_(dtype), shape_(std::move(shape)) {
  row_stride_ = cols() + row_padding;
  storage_.assign(static_cast<size_t>(rows() * row_stride_) * dtype_size(dtype_), 0);
}

int64_t HostTensor::numel() const {
  int64_t n = 1;
  for (int64_t s : shape_) n *= s;
  return n;
}

TensorView HostTensor::view() const {
  TensorView v;
  v.data = const_cast<uint8_t*>(storage_.data());
  v.dtype = dtype_;
  v.ndim = static_cast<int>(shape_.size());
  int64_t stride = 1;
  for (int d = v.ndim - 1; d >= 0; --d) {
    v.shape[d] = shape_[d];
    v.strides[d] = stride;
    stride *= shape_[d];
  }
  if (v.ndim == 2) v.strides[0] = row_stride_;
  v.device = Device::cpu();
  return v;
}

int64_t HostTensor::offset(int64_t flat) const {
  if (shape_.size() != 2) return flat;
  const int64_t c = cols();
  return (flat / c) * row_stride_ + flat % c;
}

double HostTensor::get(int64_t flat) const {
  const int64_t o = offset(flat);
  const uint8_t* p = storage_.data() + o * static_cast<int64_t>(dtype_size(dtype_));
  switch (dtype_) {
    case DType::f32: { float v; std::memcpy(&v, p, 4); return v; }
    case DType::f64: { double v; std::memcpy(&v, p, 8); return v; }
    case DType::bf16: { bf16_t v; std::memcpy(&v, p, 2); return to_float(v); }
    case DType::f16: { f16_t v; std::memcpy(&v, p, 2); return to_float(v); }
    case DType::i32: { int32_t v; std::memcpy(&v, p, 4); return v; }
    case DType::i64: { int64_t v; std::memcpy(&v, p, 8); return static_cast<double>(v); }
    case DType::u8: return *p;
  }
  return 0;
}

void HostTensor::set(int64_t flat, double value) {
  const int64_t o = offset(flat);
  uint8_t* p = storage_.data() + o * static_cast<int64_t>(dtype_size(dtype_));
  switch (dtype_) {
    case DType::f32: { float v = static_cast<float>(value); std::memcpy(p, &v, 4); break; }
    case DType::f64: { std::memcpy(p, &value, 8); break; }
    case DType::bf16: { bf16_t v = to_bf16(static_cast<float>(value)); std::memcpy(p, &v, 2); break; }
    case DType::f16: { f16_t v = to_f16(static_cast<float>(value)); std::memcpy(p, &v, 2); break; }
    case DType::i32: { int32_t v = static_cast<int32_t>(value); std::memcpy(p, &v, 4); break; }
    case DType::i64: { int64_t v = static_cast<int64_t>(value); std::memcpy(p, &v, 8); break; }
    case DType::u8: *p = static_cast<uint8_t>(value); break;
  }
}

void HostTensor::fill_uniform(uint64_t seed, double lo, double hi) {
  std::mt19937_64 rng(seed);
  const bool integer = dtype_ == DType::i32 || dtype_ == DType::i64 || dtype_ == DType::u8;
  std::uniform_real_distribution<double> dist(lo, hi);
  for (int64_t i = 0; i < numel(); ++i) {
    double v = dist(rng);
    if (integer) v = std::floor(v);
    set(i, v);
  }
  if (!integer && numel() > 0 && get(0) == 0.0) set(0, 0.5 * (lo + hi) + 0.25 * (hi - lo));
}

void HostTensor::fill(double value) {
  for (int64_t i = 0; i < numel(); ++i) set(i, value);
}

void HostTensor::poison() {
  // Poison the whole allocation, padding included.
  if (storage_.empty()) return;
  if (dtype_ == DType::i32 || dtype_ == DType::i64 || dtype_ == DType::u8) {
    std::memset(storage_.data(), 0x7f, storage_.size());
  } else {
    std::memset(storage_.data(), 0xff, storage_.size());  // all-ones: NaN in every float type
  }
}

bool HostTensor::all_finite() const {
  for (int64_t i = 0; i < numel(); ++i) {
    if (!std::isfinite(get(i))) return false;
  }
  return true;
}

std::vector<double> HostTensor::to_vector() const {
  std::vector<double> out(static_cast<size_t>(numel()));
  for (int64_t i = 0; i < numel(); ++i) out[i] = get(i);
  return out;
}

std::string Comparison::describe() const {
  std::ostringstream os;
  os << "worst ratio " << worst_ratio << " (1 = at tolerance) at index " << worst_index
     << ": got " << got << ", want " << want << "; max abs error " << max_abs_error
     << (has_nan ? "; NaN present" : "");
  return os.str();
}

Comparison compare(const std::vector<double>& got, const std::vector<double>& want,
                   Tolerance tol) {
  Comparison c;
  if (got.size() != want.size()) {
    c.worst_ratio = std::numeric_limits<double>::infinity();
    return c;
  }
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(got[i] - want[i]);
    double ratio = err / (tol.atol + tol.rtol * std::fabs(want[i]));
    if (std::isnan(got[i]) || std::isnan(want[i])) {
      c.has_nan = true;
      ratio = std::numeric_limits<double>::infinity();
    }
    if (!(ratio <= c.worst_ratio)) {
      c.worst_ratio = ratio;
      c.worst_index = static_cast<int64_t>(i);
      c.got = got[i];
      c.want = want[i];
    }
    if (err > c.max_abs_error) c.max_abs_error = err;
  }
  return c;
}

void fill_non_finite_logp(HostTensor& row, HostTensor& col, uint64_t seed) {
  constexpr double kInf = std::numeric_limits<double>::infinity();
  constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
  row.fill_uniform(seed, -5.0, 0.0);
  col.fill_uniform(seed + 1, -5.0, 0.0);
  std::mt19937_64 rng(seed + 2);
  std::uniform_int_distribution<int> what(0, 9);
  const double specials[] = {kNaN, kInf, -kInf};
  for (HostTensor* p : {&row, &col}) {
    for (int64_t i = 0; i < p->numel(); ++i) {
      const int w = what(rng);
      if (w < 3) p->set(i, specials[w]);
    }
  }
  const int64_t nr = row.cols(), nc = col.cols();
  for (int64_t i = 0; i < nr; ++i) {
    row.set(0 * nr + i, kNaN);
    row.set(1 * nr + i, -kInf);
    row.set(2 * nr + i, kInf);
    row.set(3 * nr + i, kNaN);
  }
  for (int64_t j = 0; j < nc; ++j) {
    col.set(0 * nc + j, kNaN);
    col.set(1 * nc + j, -kInf);
    col.set(2 * nc + j, kInf);
    col.set(3 * nc + j, kInf);
  }
}

}  // namespace omnimoe::test
