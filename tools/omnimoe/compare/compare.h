// `omnimoe bench --compare paper`: the paper's efficiency comparison (docs/compare.md). Dense,
// GShard, DeepSeekMoE, PKM, PEER and OmniMoE layers, forward and forward+backward, swept over
// tokens and activated parameters on one GPU; writes JSON for scripts/compare_paper.py.
// Built only with CUDA; plain C++ here so bench.cpp can call it.
#pragma once

#include "args.h"

namespace omnimoe::tool {

// Runs the sweep named by --compare: "paper", or "smoke" (two points per method), optionally
// followed by ":method,method" to run a subset. Each method's forward is checked on the host at
// its first point. Reads --device, --warmup, --iters, --json, --skip-ceilings, --tokens (every
// point at that many tokens) and --compare-time-limit (seconds; later points are recorded as
// skipped). Returns the exit code: 1 when a point failed or a check did not pass.
int run_compare(const Flags& flags);

}  // namespace omnimoe::tool
