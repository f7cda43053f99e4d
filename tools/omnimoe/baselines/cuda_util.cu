#include <string>

#include "baselines/cuda_util.cuh"

namespace omnimoe::tool {

void throw_cuda(const char* call, const char* error_name, const char* message) {
  throw Error(std::string(call) + " failed: " + error_name + " (" + message + ")");
}

}  // namespace omnimoe::tool
