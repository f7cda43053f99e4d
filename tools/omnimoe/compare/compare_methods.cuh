// The layers the comparison times, each owning its weights, gradients, saved activations and
// workspace (allocated through the Platform, so the bytes are counted). forward() then
// backward() is one training step; neither synchronises the host.
#pragma once

#include <omnimoe/omnimoe.h>

#include <memory>
#include <string>
#include <vector>

#include "platform.h"

namespace omnimoe::tool::compare {

struct MethodSpec {
  std::string method;  // dense, gshard, deepseekmoe, pkm, peer, omnimoe
  int64_t tokens = 0;
  int64_t budget = 0;  // K, or the intermediate size I' for dense
};

class Method {
 public:
  virtual ~Method() = default;
  virtual void forward() = 0;
  virtual void backward() = 0;  // after a forward
  // What ran (paths, capacity, dropped pairs); called after the timing.
  virtual std::string note() { return ""; }
  // Compares a few tokens of the last forward and backward with a host computation; "" when
  // not implemented. Sets failed when an error is above the bf16 tolerance.
  virtual std::string check(bool& failed) { return ""; }
  // y and dx of the last step, for a finiteness check.
  virtual TensorView output() const = 0;
  virtual TensorView input_grad() const = 0;
  size_t param_bytes = 0;  // weights only (their gradients are as large again)
};

std::unique_ptr<Method> make_method(Platform& platform, const MethodSpec& spec, uint64_t seed);

// Parameters a token activates (router weights not counted), per docs/compare.md.
int64_t active_params(const std::string& method, int64_t budget, int64_t d);

}  // namespace omnimoe::tool::compare
