#include "core/check.h"

#include <cstring>

namespace omnimoe::detail {

void throw_error(const char* file, int line, const std::string& message) {
  // Keep the path short: from "src/" on.
  const char* short_file = std::strstr(file, "src/");
  throw Error("omnimoe: " + message + " [" + (short_file ? short_file : file) + ":" +
              std::to_string(line) + "]");
}

}  // namespace omnimoe::detail
