// The OMNIMOE_* switches that select an alternative behaviour for timing (docs/design.md lists
// them): read from the environment, never in a kernel.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace omnimoe::detail {

// Whether environment variable `name` is set to exactly `value`.
inline bool env_equals(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, value) == 0;
}

// Environment variable `name` as an integer in [lo, hi], or 0 when unset or outside.
inline int64_t env_int(const char* name, int64_t lo, int64_t hi) {
  const char* v = std::getenv(name);
  const long long n = v == nullptr ? 0 : std::strtoll(v, nullptr, 10);
  return n >= lo && n <= hi ? n : 0;
}

}  // namespace omnimoe::detail
