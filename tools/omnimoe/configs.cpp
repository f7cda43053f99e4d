#include "configs.h"

#include <algorithm>
#include <cmath>

namespace omnimoe::tool {

namespace {

BenchConfig make(const char* name, int64_t tokens, int64_t d, int64_t rows, int64_t cols, int64_t k,
                 int64_t inter, DType dtype, bool gpu) {
  BenchConfig c;
  c.name = name;
  c.tokens = tokens;
  c.layer.hidden = d;
  c.layer.grid_rows = rows;
  c.layer.grid_cols = cols;
  c.layer.top_k = k;
  c.layer.intermediate = inter;
  c.dtype = dtype;
  c.gpu = gpu;
  return c;
}

}  // namespace

const std::vector<BenchConfig>& named_configs() {
  static const std::vector<BenchConfig> configs = {
      make("ref-quickstart", 4096, 1024, 64, 64, 16, 4096, DType::bf16, true),
      make("paper-k512-t1k", 1024, 1024, 320, 320, 512, 1024, DType::bf16, true),
      make("paper-k512-t4k", 4096, 1024, 320, 320, 512, 1024, DType::bf16, true),
      make("paper-k512-t16k", 16384, 1024, 320, 320, 512, 1024, DType::bf16, true),
      make("paper-k4096-t1k", 1024, 1024, 320, 320, 4096, 1024, DType::bf16, true),
      make("paper-k4096-t4k", 4096, 1024, 320, 320, 4096, 1024, DType::bf16, true),
      make("pool-1m-k16", 4096, 1024, 1024, 1024, 16, 1024, DType::bf16, true),
      make("pool-1m-k256", 4096, 1024, 1024, 1024, 256, 1024, DType::bf16, true),
      // Small enough that the whole bench finishes well inside a minute on 2 CPU cores.
      make("cpu-small", 512, 256, 32, 32, 16, 512, DType::f32, false),
  };
  return configs;
}

const BenchConfig* find_config(const std::string& name) {
  for (const BenchConfig& c : named_configs()) {
    if (c.name == name) return &c;
  }
  return nullptr;
}

std::string config_names() {
  std::string s;
  for (const BenchConfig& c : named_configs()) s += (s.empty() ? "" : ", ") + c.name;
  return s;
}

const BenchConfig& default_config(DeviceType device) {
  return *find_config(device == DeviceType::cuda ? "ref-quickstart" : "cpu-small");
}

Derived derive(const BenchConfig& c) {
  Derived r;
  const LayerConfig& l = c.layer;
  r.experts = l.num_experts();
  r.pairs = c.tokens * l.top_k;
  r.tokens_per_expert = r.experts ? static_cast<double>(r.pairs) / r.experts : 0.0;
  r.density = r.experts ? static_cast<double>(l.top_k) / r.experts : 0.0;
  r.active_params = 2 * l.top_k * l.hidden + 3 * l.intermediate * l.hidden;
  // 3 I' d = 2 K d + 3 I d, so I' = I + 2K/3, rounded to a multiple of 64 (tensor-core tiles).
  const double exact = static_cast<double>(l.intermediate) + 2.0 * l.top_k / 3.0;
  r.dense_intermediate = std::max<int64_t>(64, std::llround(exact / 64.0) * 64);
  return r;
}

DType parse_dtype(const std::string& name) {
  if (name == "bf16") return DType::bf16;
  if (name == "f16") return DType::f16;
  if (name == "f32") return DType::f32;
  if (name == "f64") return DType::f64;
  throw Error("--dtype must be bf16, f16, f32 or f64, got '" + name + "'");
}

}  // namespace omnimoe::tool
