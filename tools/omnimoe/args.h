// Command-line flags: "--name value" or "--name=value". Anything unknown or malformed throws
// UsageError, which main turns into a message and exit code 2.
#pragma once

#include <cstdint>
#include <map>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

namespace omnimoe::tool {

class UsageError : public std::runtime_error {
 public:
  explicit UsageError(const std::string& message) : std::runtime_error(message) {}
};

class Flags {
 public:
  // `valued`: flags that take a value; `switches`: flags that stand alone. --help/-h is always
  // accepted.
  Flags(const std::vector<std::string>& args, const std::set<std::string>& valued,
        const std::set<std::string>& switches);

  bool help() const { return help_; }
  bool has(const std::string& name) const;
  std::string text(const std::string& name, const std::string& fallback) const;
  // An integer in [min, max]; the message names the flag.
  int64_t integer(const std::string& name, int64_t fallback, int64_t min, int64_t max) const;

 private:
  std::map<std::string, std::string> values_;
  std::set<std::string> switches_seen_;
  bool help_ = false;
};

// "320x320" -> (320, 320).
void parse_grid(const std::string& text, int64_t& rows, int64_t& cols);

}  // namespace omnimoe::tool
