// The OMNIMOE_* switches that select an alternative behaviour for timing (docs/design.md lists
// them): read from the environment, never in a kernel.
#pragma once

#include <cstdlib>
#include <cstring>

namespace omnimoe::detail {

// Whether environment variable `name` is set to exactly `value`.
inline bool env_equals(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, value) == 0;
}

}  // namespace omnimoe::detail
