// FLOPs and the fewest bytes each benchmark row must move (docs/cli.md explains every term).
#pragma once

#include <cstdint>

#include "configs.h"

namespace omnimoe::tool {

struct Work {
  double flops = 0.0;
  double bytes = 0.0;
};
inline Work operator+(Work a, Work b) { return {a.flops + b.flops, a.bytes + b.bytes}; }

struct LayerWork {
  Work router_forward, router_select, schedule, experts_forward, mlp_forward;
  Work router_backward, experts_backward, mlp_backward;
  Work layer_forward, layer_forward_backward;
  Work dense_forward, dense_forward_backward;  // the dense SwiGLU of I' (baseline c)
};

// `distinct_experts`: experts that at least one token chose (their W and V rows are read).
LayerWork count_work(const BenchConfig& c, int64_t distinct_experts);

}  // namespace omnimoe::tool
