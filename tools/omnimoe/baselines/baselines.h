// The baselines `omnimoe bench` times beside the layer on CUDA (benchmark code, not library
// code): the expert branch computed token by token (as PEER and the public reference do) and
// densely with a mask, and a dense SwiGLU with the layer's active parameters. Built only with
// CUDA; plain C++ here so bench.cpp can call it.
#pragma once

#include <omnimoe/omnimoe.h>

#include <string>
#include <vector>

#include "configs.h"
#include "counts.h"
#include "platform.h"
#include "report.h"

namespace omnimoe::tool {

// Device views of one rotation set: x [T, d], W and V [N, d], indices i32 [T, K], gates f32.
struct ExpertBranchInputs {
  TensorView x, up, down, indices, gates;
};

// Appends the baseline rows (each with its samples, or the reason it could not run) and the
// cross-checks of their outputs. `library_y` holds the library's experts_forward of set 0
// without accumulation (empty when that op is missing). Never throws.
void run_baselines(Platform& platform, const BenchConfig& config,
                   const std::vector<ExpertBranchInputs>& sets, const LayerWork& work, int warmup,
                   int iters, const TensorView& library_y, std::vector<Row>& rows,
                   std::vector<std::string>& notes);

}  // namespace omnimoe::tool
