// The subcommands of `omnimoe` and the options they share.
#pragma once

#include <omnimoe/omnimoe.h>

#include <cstdint>
#include <string>
#include <vector>

#include "args.h"
#include "configs.h"

namespace omnimoe::tool {

// Flags every command that runs the layer takes.
extern const std::set<std::string> kLayerFlags;

struct LayerOptions {
  Device device;
  std::vector<BenchConfig> configs;  // one, or every GPU config for --config all
  uint64_t seed = 1;
  int threads = 0;
};

// Reads --device, --config and the shape flags (which override the config's values), --dtype,
// --act, --gating, --router-norm, --seed, --threads. Throws UsageError naming the flag, also
// for --device cuda on a machine or build without CUDA.
// Empty defaults mean: the device's default config (ref-quickstart on CUDA, cpu-small on the
// CPU) and the config's dtype.
LayerOptions resolve_layer_options(const Flags& flags, bool allow_all,
                                   const std::string& config_fallback,
                                   const std::string& default_dtype);

// Git commit the tool was configured from ("unknown" outside a checkout).
std::string git_commit();

int run_bench(const std::vector<std::string>& args);
int run_check(const std::vector<std::string>& args);

}  // namespace omnimoe::tool
