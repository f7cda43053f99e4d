#include <omnimoe/omnimoe.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "core/check.h"

namespace omnimoe {

const char* activation_name(Activation act) {
  switch (act) {
    case Activation::silu: return "silu";
    case Activation::gelu: return "gelu";
    case Activation::relu: return "relu";
  }
  return "unknown";
}

const char* gating_name(Gating gating) {
  return gating == Gating::softmax ? "softmax" : gating == Gating::joint ? "joint" : "unknown";
}

const char* router_norm_name(RouterNorm norm) {
  return norm == RouterNorm::batch ? "batch" : norm == RouterNorm::none ? "none" : "unknown";
}

Activation parse_activation(const std::string& name) {
  if (name == "silu" || name == "swish") return Activation::silu;
  if (name == "gelu") return Activation::gelu;
  if (name == "relu") return Activation::relu;
  OMNIMOE_FAIL("act must be one of silu, gelu, relu; got \"", name, "\"");
}

Gating parse_gating(const std::string& name) {
  if (name == "softmax") return Gating::softmax;
  if (name == "joint") return Gating::joint;
  OMNIMOE_FAIL("gating must be softmax or joint; got \"", name, "\"");
}

RouterNorm parse_router_norm(const std::string& name) {
  if (name == "batch") return RouterNorm::batch;
  if (name == "none") return RouterNorm::none;
  OMNIMOE_FAIL("router_norm must be batch or none; got \"", name, "\"");
}

void LayerConfig::validate() const {
  constexpr int64_t kMax32 = std::numeric_limits<int32_t>::max();
  OMNIMOE_CHECK(hidden >= 1, "hidden (d) must be >= 1, got ", hidden);
  OMNIMOE_CHECK(grid_rows >= 1, "grid_rows (N_r) must be >= 1, got ", grid_rows);
  OMNIMOE_CHECK(grid_cols >= 1, "grid_cols (N_c) must be >= 1, got ", grid_cols);
  OMNIMOE_CHECK(grid_rows <= kMax32 / grid_cols, "num_experts N_r * N_c = ", grid_rows, " * ",
                grid_cols, " exceeds the 32-bit expert id range (", kMax32, ")");
  OMNIMOE_CHECK(top_k >= 1 && top_k <= num_experts(), "top_k must be in [1, N = ",
                num_experts(), "], got ", top_k);
  OMNIMOE_CHECK(intermediate >= 0, "intermediate (I) must be >= 0 (0 disables the shared MLP), got ",
                intermediate);
  OMNIMOE_CHECK(act == Activation::silu || act == Activation::gelu || act == Activation::relu,
                "act must be silu, gelu or relu, got ", static_cast<int>(act));
  OMNIMOE_CHECK(gating == Gating::softmax || gating == Gating::joint,
                "gating must be softmax or joint, got ", static_cast<int>(gating));
  OMNIMOE_CHECK(router_norm == RouterNorm::batch || router_norm == RouterNorm::none,
                "router_norm must be batch or none, got ", static_cast<int>(router_norm));
  OMNIMOE_CHECK(std::isfinite(norm_eps) && norm_eps > 0.0f, "norm_eps must be > 0, got ",
                norm_eps);
  OMNIMOE_CHECK(std::isfinite(norm_momentum) && norm_momentum >= 0.0f && norm_momentum <= 1.0f,
                "norm_momentum must be in [0, 1], got ", norm_momentum);
}

std::string LayerConfig::describe() const {
  return detail::concat("d=", hidden, " grid=", grid_rows, "x", grid_cols, " K=", top_k,
                        " I=", intermediate, " act=", activation_name(act), " gating=",
                        gating_name(gating), " norm=", router_norm_name(router_norm));
}

}  // namespace omnimoe
