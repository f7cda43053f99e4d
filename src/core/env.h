// The OMNIMOE_* switches that select an alternative behaviour for timing (docs/design.md lists
// them): read from the environment, never in a kernel.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "core/check.h"

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

// Environment variable `name` as a count: -1 when unset or empty, else an integer >= 0 that is a
// multiple of `multiple`; any other value is an error naming the variable, what it must be and
// what it is (an override that silently fell back would time the wrong thing).
inline int64_t env_count(const char* name, int64_t multiple = 1) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return -1;
  char* end = nullptr;
  const long long n = std::strtoll(v, &end, 10);
  OMNIMOE_CHECK(*end == '\0' && n >= 0 && n % multiple == 0, name, " must be 0 or a positive ",
                multiple > 1 ? concat("multiple of ", multiple) : std::string("integer"),
                ", got \"", v, "\"");
  return n;
}

}  // namespace omnimoe::detail
