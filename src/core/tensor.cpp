#include <omnimoe/omnimoe.h>

#include "core/check.h"

namespace omnimoe {

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::f32: return 4;
    case DType::f64: return 8;
    case DType::bf16: return 2;
    case DType::f16: return 2;
    case DType::i32: return 4;
    case DType::i64: return 8;
    case DType::u8: return 1;
  }
  OMNIMOE_FAIL("unknown dtype ", static_cast<int>(dtype));
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::f32: return "f32";
    case DType::f64: return "f64";
    case DType::bf16: return "bf16";
    case DType::f16: return "f16";
    case DType::i32: return "i32";
    case DType::i64: return "i64";
    case DType::u8: return "u8";
  }
  return "unknown";
}

const char* device_name(Device device) {
  static const char* cuda_names[] = {"cuda:0", "cuda:1", "cuda:2", "cuda:3",
                                     "cuda:4", "cuda:5", "cuda:6", "cuda:7"};
  if (device.type == DeviceType::cpu) return "cpu";
  if (device.index >= 0 && device.index < 8) return cuda_names[device.index];
  return "cuda:?";
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

bool TensorView::is_contiguous() const {
  int64_t expected = 1;
  for (int i = ndim - 1; i >= 0; --i) {
    if (shape[i] != 1 && strides[i] != expected) return false;
    expected *= shape[i];
  }
  return true;
}

TensorView TensorView::contiguous(void* data, DType dtype, std::initializer_list<int64_t> shape,
                                  Device device) {
  OMNIMOE_CHECK(shape.size() <= static_cast<size_t>(kMaxDims), "TensorView supports at most ",
                kMaxDims, " dimensions, got ", shape.size());
  TensorView v;
  v.data = data;
  v.dtype = dtype;
  v.device = device;
  v.ndim = static_cast<int>(shape.size());
  int i = 0;
  for (int64_t s : shape) v.shape[i++] = s;
  int64_t stride = 1;
  for (int d = v.ndim - 1; d >= 0; --d) {
    v.strides[d] = stride;
    stride *= v.shape[d];
  }
  return v;
}

TensorView TensorView::matrix(void* data, DType dtype, int64_t rows, int64_t cols,
                              int64_t row_stride, Device device) {
  TensorView v = contiguous(data, dtype, {rows, cols}, device);
  v.strides[0] = row_stride;
  return v;
}

const char* version() { return "0.1.0"; }

}  // namespace omnimoe
