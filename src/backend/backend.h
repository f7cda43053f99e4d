// Backend entry points (CPU and CUDA share one list) and the dispatch used by the launchers.
#pragma once

#include <omnimoe/omnimoe.h>

#include <functional>

#include "core/check.h"

namespace omnimoe {
namespace cpu {
#include "backend/backend_ops.inc"
}  // namespace cpu
#ifdef OMNIMOE_WITH_CUDA
namespace cuda {
#include "backend/backend_ops.inc"
}  // namespace cuda
#endif
}  // namespace omnimoe

// Calls backend::fn(args...) for the backend of `exec`; on a build without CUDA, a CUDA exec
// fails with an Error that says so.
#ifdef OMNIMOE_WITH_CUDA
#define OMNIMOE_DISPATCH(exec, fn, ...)                                              \
  ((exec).device.type == ::omnimoe::DeviceType::cpu ? ::omnimoe::cpu::fn(__VA_ARGS__) \
                                                   : ::omnimoe::cuda::fn(__VA_ARGS__))
#else
#define OMNIMOE_DISPATCH(exec, fn, ...)                                                   \
  ((exec).device.type == ::omnimoe::DeviceType::cpu                                       \
       ? ::omnimoe::cpu::fn(__VA_ARGS__)                                                  \
       : (OMNIMOE_FAIL(#fn ": this build of omnimoe has no CUDA backend (built without a " \
                       "CUDA toolkit); use Device::cpu()"),                               \
          ::omnimoe::cpu::fn(__VA_ARGS__)))
#endif
