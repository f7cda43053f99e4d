// The family of check macros. Messages name the argument, the expectation and the value:
//   OMNIMOE_CHECK(k >= 1, "top_k must be in [1, ", n, "], got ", k);
#pragma once

#include <omnimoe/error.h>

#include <sstream>
#include <string>
#include <utility>

namespace omnimoe::detail {

template <typename... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}

[[noreturn]] void throw_error(const char* file, int line, const std::string& message);

}  // namespace omnimoe::detail

#define OMNIMOE_CHECK(cond, ...)                                                          \
  do {                                                                                    \
    if (!(cond)) {                                                                        \
      ::omnimoe::detail::throw_error(__FILE__, __LINE__,                                  \
                                     ::omnimoe::detail::concat(__VA_ARGS__));             \
    }                                                                                     \
  } while (0)

#define OMNIMOE_FAIL(...) \
  ::omnimoe::detail::throw_error(__FILE__, __LINE__, ::omnimoe::detail::concat(__VA_ARGS__))
