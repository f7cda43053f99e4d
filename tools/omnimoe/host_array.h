// A host array of any storage dtype, read and written as double (for `omnimoe check`, the
// synthetic routing and the baseline cross-checks).
#pragma once

#include <omnimoe/omnimoe.h>

#include <cstdint>
#include <vector>

namespace omnimoe::tool {

class HostArray {
 public:
  HostArray() = default;
  HostArray(DType dtype, int64_t numel);

  DType dtype() const { return dtype_; }
  int64_t numel() const { return numel_; }
  size_t bytes() const { return storage_.size(); }
  void* data() { return storage_.data(); }
  const void* data() const { return storage_.data(); }

  double get(int64_t i) const;
  void set(int64_t i, double value);
  void fill_uniform(uint64_t seed, float lo, float hi);
  // The same values in another dtype (rounded when it is narrower).
  HostArray converted(DType dtype) const;
  std::vector<double> to_vector() const;

 private:
  DType dtype_ = DType::f32;
  int64_t numel_ = 0;
  std::vector<uint8_t> storage_;
};

}  // namespace omnimoe::tool
