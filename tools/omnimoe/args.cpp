#include "args.h"

#include <cerrno>
#include <cstdlib>

namespace omnimoe::tool {

namespace {

bool parse_int(const std::string& s, int64_t& out) {
  if (s.empty()) return false;
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(s.c_str(), &end, 10);
  if (errno != 0 || end != s.c_str() + s.size()) return false;
  out = v;
  return true;
}

}  // namespace

Flags::Flags(const std::vector<std::string>& args, const std::set<std::string>& valued,
             const std::set<std::string>& switches) {
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "--help" || a == "-h") {
      help_ = true;
      continue;
    }
    if (a.size() < 3 || a.compare(0, 2, "--") != 0) {
      throw UsageError("unexpected argument '" + a + "' (flags start with --)");
    }
    std::string name = a.substr(2), value;
    bool has_value = false;
    const size_t eq = name.find('=');
    if (eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      has_value = true;
    }
    if (switches.count(name)) {
      if (has_value) throw UsageError("--" + name + " takes no value");
      switches_seen_.insert(name);
      continue;
    }
    if (!valued.count(name)) throw UsageError("unknown flag --" + name);
    if (!has_value) {
      if (i + 1 >= args.size()) throw UsageError("--" + name + " needs a value");
      value = args[++i];
    }
    if (values_.count(name)) throw UsageError("--" + name + " given twice");
    values_[name] = value;
  }
}

bool Flags::has(const std::string& name) const {
  return values_.count(name) || switches_seen_.count(name);
}

std::string Flags::text(const std::string& name, const std::string& fallback) const {
  auto it = values_.find(name);
  return it == values_.end() ? fallback : it->second;
}

int64_t Flags::integer(const std::string& name, int64_t fallback, int64_t min, int64_t max) const {
  auto it = values_.find(name);
  if (it == values_.end()) return fallback;
  int64_t v = 0;
  if (!parse_int(it->second, v) || v < min || v > max) {
    throw UsageError("--" + name + " must be an integer in [" + std::to_string(min) + ", " +
                     std::to_string(max) + "], got '" + it->second + "'");
  }
  return v;
}

void parse_grid(const std::string& text, int64_t& rows, int64_t& cols) {
  const size_t x = text.find('x');
  if (x == std::string::npos || !parse_int(text.substr(0, x), rows) ||
      !parse_int(text.substr(x + 1), cols) || rows < 1 || cols < 1) {
    throw UsageError("--grid must be ROWSxCOLS with positive integers, e.g. 320x320, got '" + text +
                     "'");
  }
}

}  // namespace omnimoe::tool
