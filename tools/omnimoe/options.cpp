#include <omnimoe/omnimoe.h>

#include "commands.h"
#include "omnimoe_git_commit.h"  // generated at build time (cmake/git_commit.cmake)

namespace omnimoe::tool {

const std::set<std::string> kLayerFlags = {
    "config", "tokens", "hidden", "grid",        "top-k", "dtype",  "intermediate",
    "device", "act",    "gating", "router-norm", "seed",  "threads"};

std::string git_commit() {
  const std::string c = OMNIMOE_GIT_COMMIT;
  return c.empty() ? "unknown" : c;
}

namespace {

Device parse_device(const Flags& f) {
  const std::string text = f.text("device", cuda_available() ? "cuda" : "cpu");
  if (text == "cpu") return Device::cpu();
  int index = 0;
  if (text.compare(0, 5, "cuda:") == 0) {
    try {
      size_t used = 0;
      index = std::stoi(text.substr(5), &used);
      if (used != text.size() - 5 || index < 0) throw UsageError("");
    } catch (const std::exception&) {
      throw UsageError("--device must be cpu, cuda or cuda:N, got '" + text + "'");
    }
  } else if (text != "cuda") {
    throw UsageError("--device must be cpu, cuda or cuda:N, got '" + text + "'");
  }
#ifndef OMNIMOE_WITH_CUDA
  throw UsageError("--device " + text +
                   ": this omnimoe was built without CUDA (no CUDA toolkit when it was "
                   "configured); use --device cpu");
#else
  if (!cuda_available()) {
    throw UsageError("--device " + text +
                     ": no CUDA device is visible on this machine; use --device cpu");
  }
#endif
  return Device::cuda(index);
}

}  // namespace

LayerOptions resolve_layer_options(const Flags& f, bool allow_all,
                                   const std::string& config_fallback,
                                   const std::string& default_dtype) {
  LayerOptions o;
  o.device = parse_device(f);
  o.seed = static_cast<uint64_t>(f.integer("seed", 1, 0, INT64_MAX));
  o.threads = static_cast<int>(f.integer("threads", 0, 0, 4096));

  const std::string name = f.text("config", config_fallback);
  const bool shape_flags = f.has("tokens") || f.has("hidden") || f.has("grid") || f.has("top-k") ||
                           f.has("intermediate");
  if (name == "all") {
    if (!allow_all) throw UsageError("--config all is for bench only");
    if (o.device.type != DeviceType::cuda) {
      throw UsageError("--config all runs the GPU configs and needs --device cuda");
    }
    if (shape_flags) throw UsageError("--config all takes no shape flags");
    for (const BenchConfig& c : named_configs()) {
      if (c.gpu) o.configs.push_back(c);
    }
  } else if (!name.empty()) {
    const BenchConfig* c = find_config(name);
    if (!c)
      throw UsageError("--config: no config named '" + name + "'; known: " + config_names() +
                       (allow_all ? ", all" : ""));
    o.configs.push_back(*c);
  } else {
    o.configs.push_back(default_config(o.device.type));
  }

  for (BenchConfig& c : o.configs) {
    if (shape_flags) {
      c.name = name.empty() ? "custom" : name + "+custom";
      constexpr int64_t kMax = int64_t{1} << 40;
      c.tokens = f.integer("tokens", c.tokens, 1, kMax);
      c.layer.hidden = f.integer("hidden", c.layer.hidden, 1, kMax);
      c.layer.top_k = f.integer("top-k", c.layer.top_k, 1, kMax);
      c.layer.intermediate = f.integer("intermediate", c.layer.intermediate, 0, kMax);
      if (f.has("grid")) parse_grid(f.text("grid", ""), c.layer.grid_rows, c.layer.grid_cols);
    }
    try {
      if (f.has("dtype")) {
        c.dtype = parse_dtype(f.text("dtype", ""));
      } else if (!default_dtype.empty()) {
        c.dtype = parse_dtype(default_dtype);
      }
      if (f.has("act")) c.layer.act = parse_activation(f.text("act", ""));
      if (f.has("gating")) c.layer.gating = parse_gating(f.text("gating", ""));
      if (f.has("router-norm")) c.layer.router_norm = parse_router_norm(f.text("router-norm", ""));
      c.layer.validate();
      if (c.layer.router_norm == RouterNorm::batch && c.tokens < 2) {
        throw Error(
            "--tokens must be at least 2 with --router-norm batch (training uses the "
            "batch statistics)");
      }
    } catch (const Error& e) {
      throw UsageError(e.what());
    }
  }
  return o;
}

}  // namespace omnimoe::tool
