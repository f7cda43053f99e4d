// Every buffer one layer needs on a platform, allocated by the tool from the sizes the API's
// queries return, filled with random values (never zeros).
#pragma once

#include <omnimoe/omnimoe.h>

#include <string>
#include <utility>
#include <vector>

#include "configs.h"
#include "platform.h"

namespace omnimoe::tool {

// What one forward and backward read: inputs, weights, norm statistics, and the saved buffer.
// The bench rotates through several of these when they would fit in the cache.
struct InputSet {
  DeviceArray arena;
  TensorView x, dy;
  LayerWeights weights;
  RouterNormState norm;
  Buffer saved;
  LayerSaved views;   // the saved buffer carved by layer_saved_views
  Schedule schedule;  // of the saved routing, for the op-level rows (the layer builds its own)
};

// What every set shares: outputs, gradients and scratch.
struct SharedBuffers {
  DeviceArray arena;
  TensorView y, dx;
  TensorView dgates;  // f32 [T, K], the input of router_backward and output of experts_backward
  LayerGrads grads;
  Buffer workspace;
};

class LayerSetup {
 public:
  // Allocates `sets` input sets and the shared buffers, and fills them (set i from seed + i).
  LayerSetup(Platform& platform, const BenchConfig& config, int sets, uint64_t seed);

  // Bytes of one input set (its working set, the saved buffer included).
  static size_t input_set_bytes(const BenchConfig& config);

  // Runs layer_forward on every set so the saved buffers hold what backward needs, then builds
  // each set's schedule; when an op is missing on this backend, fills its part another way
  // (routing drawn at random on the host, a host-built schedule, random activations). Returns
  // where the routing came from.
  std::string prepare();

  // Experts that at least one token of set 0 chose.
  int64_t distinct_experts() const;

  // The tensors of set 0 that are inputs, and every output and gradient, by name.
  std::vector<std::pair<std::string, TensorView>> inputs() const;
  std::vector<std::pair<std::string, TensorView>> outputs() const;

  Platform& platform;
  BenchConfig config;
  Exec exec;
  std::vector<InputSet> sets;
  SharedBuffers shared;
  size_t saved_bytes = 0;
  size_t forward_workspace_bytes = 0;
  size_t backward_workspace_bytes = 0;
  std::vector<std::string> notes;  // workspace queries that failed, fallbacks taken

 private:
  void fill_set(InputSet& s, uint64_t seed);
  void synthetic_routing(InputSet& s, uint64_t seed);
  void host_schedule(InputSet& s);
  uint64_t seed_;
};

}  // namespace omnimoe::tool
