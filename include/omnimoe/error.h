// The one error type of the library. Every failed check throws it; nothing aborts.
#pragma once

#include <stdexcept>
#include <string>

namespace omnimoe {

// Thrown for invalid arguments (message names the argument, what was expected and what
// arrived) and for failed CUDA calls (message names the call and the CUDA error).
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

}  // namespace omnimoe
