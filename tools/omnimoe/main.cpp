// omnimoe: benchmark and check the OmniMoE layer from the command line (docs/cli.md).
#include <omnimoe/omnimoe.h>

#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "args.h"
#include "commands.h"

namespace {

// Library messages already start with "omnimoe: ".
const char* without_prefix(const char* message) {
  const std::string prefix = "omnimoe: ";
  return std::string(message).compare(0, prefix.size(), prefix) == 0 ? message + prefix.size()
                                                                     : message;
}

const char* kHelp = R"(omnimoe %s: benchmark and check the OmniMoE layer.

Usage:
  omnimoe bench [flags]   time the layer, its ops and (on CUDA) baselines; print a table
  omnimoe check [flags]   compare a backend's forward and backward with the CPU backend
  omnimoe --version       print the version and the commit it was built from
  omnimoe --help          this text; 'omnimoe <command> --help' lists a command's flags

Exit codes: 0 success; 1 a check exceeded its tolerance or a run failed; 2 bad flags, or a
device this machine or build lacks. See docs/cli.md.
)";

}  // namespace

int main(int argc, char** argv) {
  using namespace omnimoe::tool;
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty()) {
    std::fprintf(stderr, kHelp, omnimoe::version());
    return 2;
  }
  const std::string command = args[0];
  args.erase(args.begin());
  try {
    if (command == "--help" || command == "-h" || command == "help") {
      std::printf(kHelp, omnimoe::version());
      return 0;
    }
    if (command == "--version") {
      std::printf("omnimoe %s (commit %s)\n", omnimoe::version(), git_commit().c_str());
      return 0;
    }
    if (command == "bench") return run_bench(args);
    if (command == "check") return run_check(args);
    throw UsageError("unknown command '" + command + "'");
  } catch (const UsageError& e) {
    const bool known = command == "bench" || command == "check";
    std::fprintf(stderr, "omnimoe: %s\nRun 'omnimoe %s--help' for usage.\n",
                 without_prefix(e.what()), known ? (command + " ").c_str() : "");
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "omnimoe: error: %s\n", without_prefix(e.what()));
    return 1;
  }
}
