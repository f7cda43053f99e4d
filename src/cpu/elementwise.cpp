// Elementwise ops of the CPU backend.
#include "backend/backend.h"
#include "cpu/cpu_common.h"

namespace omnimoe::cpu {

void tensor_add(const TensorView& dst, const TensorView& src, const Exec& exec) {
  const int64_t rows = dst.shape[0], cols = dst.shape[1];
  dispatch_storage(dst.dtype, [&](auto tag) {
    using T = decltype(tag);
#pragma omp parallel for num_threads(thread_count(exec)) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      T* out = row_ptr<T>(dst, r);
      const T* in = row_ptr<const T>(src, r);
      for (int64_t c = 0; c < cols; ++c) {
        if constexpr (std::is_same_v<T, double>) {
          out[c] += in[c];
        } else {
          out[c] = from_float<T>(to_float(out[c]) + to_float(in[c]));
        }
      }
    }
  });
}

}  // namespace omnimoe::cpu
