// The layer's configuration: the symbols of SPEC.md and its options.
#pragma once

#include <cstdint>
#include <string>

namespace omnimoe {

enum class Activation : int { silu, gelu, relu };  // gelu is the exact (erf) form
enum class Gating : int { softmax, joint };        // softmax: SPEC Eq. 2; joint: exp(S)
enum class RouterNorm : int { batch, none };       // batch norm of the logits over tokens

const char* activation_name(Activation act);
const char* gating_name(Gating gating);
const char* router_norm_name(RouterNorm norm);
// Parse "silu"/"gelu"/"relu", "softmax"/"joint", "batch"/"none"; throws Error naming `what`.
Activation parse_activation(const std::string& name);
Gating parse_gating(const std::string& name);
RouterNorm parse_router_norm(const std::string& name);

struct LayerConfig {
  int64_t hidden = 0;        // d
  int64_t grid_rows = 0;     // N_r
  int64_t grid_cols = 0;     // N_c
  int64_t top_k = 0;         // K, in [1, N_r * N_c]
  int64_t intermediate = 0;  // I of the shared SwiGLU MLP; 0 disables it
  Activation act = Activation::silu;
  Gating gating = Gating::softmax;
  RouterNorm router_norm = RouterNorm::batch;
  float norm_eps = 1e-5f;
  float norm_momentum = 0.1f;

  int64_t num_experts() const { return grid_rows * grid_cols; }  // N
  // Throws Error naming the first field that is out of range.
  void validate() const;
  // "d=1024 grid=320x320 K=512 I=1024 act=silu gating=softmax norm=batch".
  std::string describe() const;
};

}  // namespace omnimoe
