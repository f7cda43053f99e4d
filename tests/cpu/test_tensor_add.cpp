// The CPU backend's tensor_add (its join of the layer's two branches, cpu_common.h):
// dst += src with one rounding from float (double for f64), any row strides, bit for bit.
#include <gtest/gtest.h>

#include <cstring>
#include <string>

#include "backend/backend.h"
#include "cpu/cpu_common.h"
#include "test_support.h"

namespace omnimoe::test {
namespace {

struct AddCase {
  DType dtype;
  int64_t rows, cols, dst_pad, src_pad;
};

class TensorAddCpu : public ::testing::TestWithParam<AddCase> {};

TEST_P(TensorAddCpu, MatchesOneRoundedSum) {
  const AddCase c = GetParam();
  HostTensor dst(c.dtype, {c.rows, c.cols}, c.dst_pad);
  HostTensor src(c.dtype, {c.rows, c.cols}, c.src_pad);
  dst.fill_uniform(11, -2.0, 2.0);
  src.fill_uniform(12, -2.0, 2.0);
  HostTensor want(c.dtype, {c.rows, c.cols}, c.dst_pad);
  for (int64_t i = 0; i < want.numel(); ++i) {
    const double sum = c.dtype == DType::f64
                           ? dst.get(i) + src.get(i)
                           : static_cast<double>(static_cast<float>(dst.get(i)) +
                                                 static_cast<float>(src.get(i)));
    want.set(i, sum);  // set rounds to the storage dtype
  }
  cpu::tensor_add(dst.view(), src.view(), cpu_exec(2));
  for (int64_t i = 0; i < want.numel(); ++i) {
    const double a = dst.get(i), b = want.get(i);
    ASSERT_EQ(std::memcmp(&a, &b, sizeof(double)), 0) << "element " << i << ": " << a << " vs "
                                                       << b;
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, TensorAddCpu,
                         ::testing::Values(AddCase{DType::bf16, 33, 64, 0, 0},
                                           AddCase{DType::bf16, 17, 37, 3, 5},
                                           AddCase{DType::f16, 9, 40, 8, 0},
                                           AddCase{DType::f32, 5, 7, 0, 1},
                                           AddCase{DType::f64, 1, 19, 2, 0}),
                         [](const auto& info) {
                           const AddCase& c = info.param;
                           return std::string(dtype_name(c.dtype)) + "_rows" +
                                  std::to_string(c.rows) + "_cols" + std::to_string(c.cols) +
                                  "_dstpad" + std::to_string(c.dst_pad) + "_srcpad" +
                                  std::to_string(c.src_pad);
                         });

}  // namespace
}  // namespace omnimoe::test
