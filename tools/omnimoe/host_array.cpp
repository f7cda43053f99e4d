#include "host_array.h"

#include <cstring>

#include "core/half.h"
#include "uniform.h"

namespace omnimoe::tool {

HostArray::HostArray(DType dtype, int64_t numel)
    : dtype_(dtype), numel_(numel), storage_(static_cast<size_t>(numel) * dtype_size(dtype)) {}

double HostArray::get(int64_t i) const {
  const uint8_t* p = storage_.data() + i * static_cast<int64_t>(dtype_size(dtype_));
  switch (dtype_) {
    case DType::f32: {
      float v;
      std::memcpy(&v, p, 4);
      return v;
    }
    case DType::f64: {
      double v;
      std::memcpy(&v, p, 8);
      return v;
    }
    case DType::bf16: {
      bf16_t v;
      std::memcpy(&v, p, 2);
      return to_float(v);
    }
    case DType::f16: {
      f16_t v;
      std::memcpy(&v, p, 2);
      return to_float(v);
    }
    case DType::i32: {
      int32_t v;
      std::memcpy(&v, p, 4);
      return v;
    }
    case DType::i64: {
      int64_t v;
      std::memcpy(&v, p, 8);
      return static_cast<double>(v);
    }
    case DType::u8:
      return *p;
  }
  return 0.0;
}

void HostArray::set(int64_t i, double value) {
  uint8_t* p = storage_.data() + i * static_cast<int64_t>(dtype_size(dtype_));
  switch (dtype_) {
    case DType::f32: {
      float v = static_cast<float>(value);
      std::memcpy(p, &v, 4);
      break;
    }
    case DType::f64: {
      std::memcpy(p, &value, 8);
      break;
    }
    case DType::bf16: {
      bf16_t v = to_bf16(static_cast<float>(value));
      std::memcpy(p, &v, 2);
      break;
    }
    case DType::f16: {
      f16_t v = to_f16(static_cast<float>(value));
      std::memcpy(p, &v, 2);
      break;
    }
    case DType::i32: {
      int32_t v = static_cast<int32_t>(value);
      std::memcpy(p, &v, 4);
      break;
    }
    case DType::i64: {
      int64_t v = static_cast<int64_t>(value);
      std::memcpy(p, &v, 8);
      break;
    }
    case DType::u8:
      *p = static_cast<uint8_t>(value);
      break;
  }
}

void HostArray::fill_uniform(uint64_t seed, float lo, float hi) {
  for (int64_t i = 0; i < numel_; ++i) set(i, uniform_at(seed, static_cast<uint64_t>(i), lo, hi));
}

HostArray HostArray::converted(DType dtype) const {
  HostArray out(dtype, numel_);
  for (int64_t i = 0; i < numel_; ++i) out.set(i, get(i));
  return out;
}

std::vector<double> HostArray::to_vector() const {
  std::vector<double> out(static_cast<size_t>(numel_));
  for (int64_t i = 0; i < numel_; ++i) out[i] = get(i);
  return out;
}

}  // namespace omnimoe::tool
