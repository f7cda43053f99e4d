// Argument checks shared by every launcher. Each names the op and the argument:
//   "router_forward: x must have shape [T, 1024], got [4096, 1000]"
#pragma once

#include <omnimoe/omnimoe.h>

#include <string>

namespace omnimoe::detail {

std::string shape_string(const TensorView& t);

// A 2-D view of the given shape and dtype on `device`, last dimension contiguous, any row
// stride >= cols. rows or cols < 0 means "any" (the value is not checked).
void check_matrix(const char* op, const char* name, const TensorView& t, int64_t rows,
                  int64_t cols, DType dtype, Device device);
// Like check_matrix, and densely packed (row stride == cols).
void check_dense_matrix(const char* op, const char* name, const TensorView& t, int64_t rows,
                        int64_t cols, DType dtype, Device device);
// A dense 1-D view of n elements.
void check_vector(const char* op, const char* name, const TensorView& t, int64_t n, DType dtype,
                  Device device);
// x's dtype must be a floating storage type the layer supports (f32, f64, bf16, f16).
void check_storage_dtype(const char* op, const char* name, DType dtype);
void check_exec(const char* op, const Exec& exec);
void check_buffer(const char* op, const char* name, Buffer buffer, size_t needed);
// T * K and T * d must fit the 32-bit pair and row indices the kernels use.
void check_token_count(const char* op, const LayerConfig& cfg, int64_t tokens);
// What every query (*_workspace_bytes, experts_execution) checks: cfg, exec, the token count.
void check_query(const char* op, const LayerConfig& cfg, int64_t tokens, const Exec& exec);
// What every op taking x [T, d] checks first: cfg, exec, x (any row stride, a storage dtype),
// the token count. Returns T.
int64_t check_input(const char* op, const LayerConfig& cfg, const TensorView& x,
                    const Exec& exec);
// schedule.expert_offsets [N + 1] and schedule.pair_order [T * K], dense i32.
void check_schedule(const char* op, const LayerConfig& cfg, int64_t tokens,
                    const Schedule& schedule, Device device);

}  // namespace omnimoe::detail
