#include "core/validate.h"

#include <cstdint>
#include <limits>

#include "core/check.h"

namespace omnimoe::detail {

std::string shape_string(const TensorView& t) {
  std::string s = "[";
  for (int i = 0; i < t.ndim; ++i) {
    if (i) s += ", ";
    s += std::to_string(t.shape[i]);
  }
  return s + "]";
}

static std::string expected_shape(int64_t rows, int64_t cols) {
  auto dim = [](int64_t v) { return v < 0 ? std::string("*") : std::to_string(v); };
  return "[" + dim(rows) + ", " + dim(cols) + "]";
}

static void check_common(const char* op, const char* name, const TensorView& t, DType dtype,
                         Device device) {
  OMNIMOE_CHECK(t.dtype == dtype, op, ": ", name, " must have dtype ", dtype_name(dtype),
                ", got ", dtype_name(t.dtype));
  OMNIMOE_CHECK(t.device == device, op, ": ", name, " must be on ", device_name(device),
                ", got ", device_name(t.device));
  OMNIMOE_CHECK(t.data != nullptr || t.numel() == 0, op, ": ", name,
                " is a null pointer with ", t.numel(), " elements");
}

void check_matrix(const char* op, const char* name, const TensorView& t, int64_t rows,
                  int64_t cols, DType dtype, Device device) {
  OMNIMOE_CHECK(t.ndim == 2, op, ": ", name, " must be 2-D with shape ",
                expected_shape(rows, cols), ", got ", t.ndim, "-D ", shape_string(t));
  OMNIMOE_CHECK((rows < 0 || t.shape[0] == rows) && (cols < 0 || t.shape[1] == cols), op, ": ",
                name, " must have shape ", expected_shape(rows, cols), ", got ",
                shape_string(t));
  check_common(op, name, t, dtype, device);
  OMNIMOE_CHECK(t.shape[1] <= 1 || t.strides[1] == 1, op, ": ", name,
                " must be contiguous in its last dimension (stride 1), got stride ",
                t.strides[1]);
  OMNIMOE_CHECK(t.shape[0] <= 1 || t.strides[0] >= t.shape[1], op, ": ", name,
                " must have a row stride >= its ", t.shape[1], " columns, got ", t.strides[0]);
}

void check_dense_matrix(const char* op, const char* name, const TensorView& t, int64_t rows,
                        int64_t cols, DType dtype, Device device) {
  check_matrix(op, name, t, rows, cols, dtype, device);
  OMNIMOE_CHECK(t.shape[0] <= 1 || t.strides[0] == t.shape[1], op, ": ", name,
                " must be densely packed (row stride ", t.shape[1], "), got row stride ",
                t.strides[0]);
}

void check_vector(const char* op, const char* name, const TensorView& t, int64_t n, DType dtype,
                  Device device) {
  OMNIMOE_CHECK(t.ndim == 1 && t.shape[0] == n, op, ": ", name, " must have shape [", n,
                "], got ", shape_string(t));
  check_common(op, name, t, dtype, device);
  OMNIMOE_CHECK(n <= 1 || t.strides[0] == 1, op, ": ", name, " must be contiguous, got stride ",
                t.strides[0]);
}

void check_storage_dtype(const char* op, const char* name, DType dtype) {
  OMNIMOE_CHECK(dtype == DType::f32 || dtype == DType::f64 || dtype == DType::bf16 ||
                    dtype == DType::f16,
                op, ": ", name, " must have dtype f32, f64, bf16 or f16, got ", dtype_name(dtype));
}

void check_exec(const char* op, const Exec& exec) {
  OMNIMOE_CHECK(exec.device.type == DeviceType::cpu || exec.device.type == DeviceType::cuda, op,
                ": exec.device has an unknown type ", static_cast<int>(exec.device.type));
  OMNIMOE_CHECK(exec.device.index >= 0, op, ": exec.device.index must be >= 0, got ",
                exec.device.index);
  OMNIMOE_CHECK(exec.num_threads >= 0, op, ": exec.num_threads must be >= 0, got ",
                exec.num_threads);
  OMNIMOE_CHECK(exec.sm_count >= 0, op, ": exec.sm_count must be >= 0 (0 = all SMs), got ",
                exec.sm_count);
}

void check_buffer(const char* op, const char* name, Buffer buffer, size_t needed) {
  OMNIMOE_CHECK(buffer.bytes >= needed, op, ": ", name, " must hold at least ", needed,
                " bytes, got ", buffer.bytes);
  OMNIMOE_CHECK(buffer.data != nullptr || needed == 0, op, ": ", name,
                " is a null pointer but ", needed, " bytes are needed");
}

void check_token_count(const char* op, const LayerConfig& cfg, int64_t tokens) {
  constexpr int64_t kMax32 = std::numeric_limits<int32_t>::max();
  OMNIMOE_CHECK(tokens >= 0, op, ": the token count T must be >= 0, got ", tokens);
  OMNIMOE_CHECK(tokens <= kMax32 / cfg.top_k, op, ": T * K = ", tokens, " * ", cfg.top_k,
                " exceeds the 32-bit pair index range (", kMax32, ")");
}

void check_query(const char* op, const LayerConfig& cfg, int64_t tokens, const Exec& exec) {
  cfg.validate();
  check_exec(op, exec);
  check_token_count(op, cfg, tokens);
}

int64_t check_input(const char* op, const LayerConfig& cfg, const TensorView& x,
                    const Exec& exec) {
  cfg.validate();
  check_exec(op, exec);
  check_matrix(op, "x", x, -1, cfg.hidden, x.dtype, exec.device);
  check_storage_dtype(op, "x", x.dtype);
  const int64_t tokens = x.shape[0];
  check_token_count(op, cfg, tokens);
  return tokens;
}

void check_schedule(const char* op, const LayerConfig& cfg, int64_t tokens,
                    const Schedule& schedule, Device device) {
  check_vector(op, "schedule.expert_offsets", schedule.expert_offsets, cfg.num_experts() + 1,
               DType::i32, device);
  check_vector(op, "schedule.pair_order", schedule.pair_order, tokens * cfg.top_k, DType::i32,
               device);
}

}  // namespace omnimoe::detail
