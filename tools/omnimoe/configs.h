// The named benchmark configurations (docs/cli.md) and the one the command line describes.
#pragma once

#include <omnimoe/omnimoe.h>

#include <string>
#include <vector>

namespace omnimoe::tool {

struct BenchConfig {
  std::string name;  // a named config, or "custom"
  int64_t tokens = 0;
  LayerConfig layer;
  DType dtype = DType::bf16;
  bool gpu = true;  // meant for a GPU (`--config all` runs these)
};

// In the order `--config all` runs them; cpu-small (the CPU default) last.
const std::vector<BenchConfig>& named_configs();
// nullptr when there is no such name.
const BenchConfig* find_config(const std::string& name);
// "ref-quickstart, paper-k512-t1k, ..." for messages.
std::string config_names();
// The default of a device: ref-quickstart on CUDA, cpu-small on the CPU.
const BenchConfig& default_config(DeviceType device);

// Derived sizes of PERF-NOTES.md.
struct Derived {
  int64_t experts = 0;             // N
  int64_t pairs = 0;               // P = T * K
  double tokens_per_expert = 0;    // m = P / N
  double density = 0;              // K / N
  int64_t active_params = 0;       // 2 K d + 3 I d (the router's (N_r + N_c) d not counted)
  int64_t dense_intermediate = 0;  // I' of the dense SwiGLU with the same active parameters
};
Derived derive(const BenchConfig& c);

DType parse_dtype(const std::string& name);  // bf16, f16, f32, f64

}  // namespace omnimoe::tool
