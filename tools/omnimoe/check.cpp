// `omnimoe check`: one training forward and backward on the chosen backend and on the CPU
// backend in f32 from the same inputs; every output and gradient is compared under the
// tolerance policy of docs/testing.md.
#include <omnimoe/omnimoe.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <exception>
#include <functional>
#include <limits>
#include <set>

#include "commands.h"
#include "core/tolerance.h"
#include "host_array.h"
#include "layer_setup.h"
#include "platform.h"

namespace omnimoe::tool {

namespace {

const char* kCheckHelp = R"(Usage: omnimoe check [flags]

Runs one training forward and backward of the layer on --device, and on the CPU backend in f32
from the same random inputs (drawn in --dtype, so both sides see the same values). Prints, for
every output and gradient, the largest error against the tolerance policy of docs/testing.md
(|got - want| <= atol + rtol |want|, widened by sqrt of the terms summed); exit code 1 when any
exceeds it. Tokens whose selected experts differ between the two runs (near-ties) are
reported and left out of y, dx and the expert gradients they touch.

  --device cpu|cuda|cuda:N   default cuda when a CUDA device is visible, else cpu
  --config NAME          default cpu-small; names: %s
  --tokens T --hidden d --grid RxC --top-k K --intermediate I   override the config's shape
  --dtype bf16|f16|f32|f64   storage type on --device (default bf16)
  --act silu|gelu|relu   --gating softmax|joint   --router-norm batch|none
  --seed N               seed of the random inputs (default 1)
  --threads N            CPU: OpenMP threads

Exit codes: 0 within tolerance, 1 a tolerance exceeded or a run failed, 2 bad flags or a
missing device.
)";

HostArray download(Platform& p, const TensorView& t) {
  HostArray h(t.dtype, t.numel());
  p.copy_to_host(h.data(), t.data, h.bytes());
  return h;
}

void poison(Platform& p, const TensorView& t) {
  HostArray h(t.dtype, t.numel());
  for (int64_t i = 0; i < h.numel(); ++i) h.set(i, std::numeric_limits<double>::quiet_NaN());
  p.copy_to_device(t.data, h.data(), h.bytes());
}

// The sorted expert ids of each token.
std::vector<std::vector<int32_t>> routing_sets(Platform& p, const LayerSetup& s) {
  const int64_t T = s.config.tokens, K = s.config.layer.top_k;
  const HostArray idx = download(p, s.sets[0].views.routing.indices);
  std::vector<std::vector<int32_t>> out(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k = 0; k < K; ++k) out[t].push_back(static_cast<int32_t>(idx.get(t * K + k)));
    std::sort(out[t].begin(), out[t].end());
  }
  return out;
}

struct Result {
  std::string name;
  int64_t terms = 0;
  Tolerance tol{};
  double worst_ratio = 0.0, max_abs = 0.0, rel_l2 = 0.0;
  int64_t worst_index = -1, compared = 0;
  double got = 0.0, want = 0.0;
  bool nan = false;
};

// `skip_row(r)`: rows left out (tokens or experts touched by a routing difference).
Result compare(const std::string& name, const HostArray& got, const HostArray& want, int64_t cols,
               Tolerance tol, int64_t terms, const std::function<bool(int64_t)>& skip_row) {
  Result r;
  r.name = name;
  r.terms = terms;
  r.tol = tol;
  double num = 0.0, den = 0.0;
  for (int64_t i = 0; i < want.numel(); ++i) {
    if (skip_row && skip_row(i / cols)) continue;
    const double g = got.get(i), w = want.get(i);
    const double err = std::fabs(g - w);
    double ratio = err / (tol.atol + tol.rtol * std::fabs(w));
    if (std::isnan(g) || std::isnan(w)) {
      r.nan = true;
      ratio = std::numeric_limits<double>::infinity();
    }
    if (!(ratio <= r.worst_ratio)) {
      r.worst_ratio = ratio;
      r.worst_index = i;
      r.got = g;
      r.want = w;
    }
    r.max_abs = std::max(r.max_abs, err);
    num += (g - w) * (g - w);
    den += w * w;
    ++r.compared;
  }
  r.rel_l2 = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  return r;
}

}  // namespace

int run_check(const std::vector<std::string>& args) {
  const Flags f(args, kLayerFlags, {});
  if (f.help()) {
    std::printf(kCheckHelp, config_names().c_str());
    return 0;
  }
  // cpu-small on every device: the CPU oracle must stay quick.
  const LayerOptions o = resolve_layer_options(f, false, "cpu-small", "bf16");
  const BenchConfig c = o.configs.front();
  const bool cuda = o.device.type == DeviceType::cuda;
  std::unique_ptr<Platform> dev =
      cuda ? make_cuda_platform(o.device.index) : make_cpu_platform(o.threads);
  std::unique_ptr<Platform> cpu = make_cpu_platform(o.threads);
  BenchConfig oracle_config = c;
  oracle_config.dtype = DType::f32;

  std::printf("omnimoe check: %s, T=%lld %s\n", c.name.c_str(), static_cast<long long>(c.tokens),
              c.layer.describe().c_str());
  std::printf("  %s on %s against the CPU backend in f32, seed %llu\n", dtype_name(c.dtype),
              dev->device_name().c_str(), static_cast<unsigned long long>(o.seed));
  std::fflush(stdout);

  LayerSetup run(*dev, c, 1, o.seed);
  LayerSetup oracle(*cpu, oracle_config, 1, o.seed);
  // The oracle reads exactly the values the run reads: its inputs rounded to the run's dtype.
  const auto run_inputs = run.inputs();
  const auto oracle_inputs = oracle.inputs();
  for (size_t i = 0; i < run_inputs.size(); ++i) {
    const HostArray values = download(*dev, run_inputs[i].second).converted(DType::f32);
    cpu->copy_to_device(oracle_inputs[i].second.data, values.data(), values.bytes());
  }
  const auto run_outputs = run.outputs();
  const auto oracle_outputs = oracle.outputs();
  for (size_t i = 0; i < run_outputs.size(); ++i) {
    if (run_outputs[i].first.find("running") != std::string::npos) continue;  // inputs too
    poison(*dev, run_outputs[i].second);
    poison(*cpu, oracle_outputs[i].second);
  }

  auto forward_backward = [](LayerSetup& s) {
    const LayerConfig& l = s.config.layer;
    InputSet& in = s.sets[0];
    layer_forward(l, in.x, in.weights, in.norm, true, s.shared.y, in.saved, s.shared.workspace,
                  s.exec);
    layer_backward(l, in.x, in.weights, true, in.saved, in.dy, s.shared.dx, s.shared.grads,
                   s.shared.workspace, s.exec);
    s.platform.synchronize();
  };
  try {
    forward_backward(oracle);
  } catch (const std::exception& e) {
    std::printf("FAIL: the CPU backend's forward and backward failed: %s\n", e.what());
    return 1;
  }
  try {
    forward_backward(run);
  } catch (const std::exception& e) {
    std::printf("FAIL: forward and backward on %s failed: %s\n", device_name(o.device), e.what());
    return 1;
  }

  // Routing: tokens whose expert sets differ are near-ties decided by rounding.
  const auto got_sets = routing_sets(*dev, run), want_sets = routing_sets(*cpu, oracle);
  std::set<int64_t> token_differs;
  std::set<int64_t> expert_touched;
  for (size_t t = 0; t < got_sets.size(); ++t) {
    if (got_sets[t] != want_sets[t]) {
      token_differs.insert(static_cast<int64_t>(t));
      expert_touched.insert(got_sets[t].begin(), got_sets[t].end());
      expert_touched.insert(want_sets[t].begin(), want_sets[t].end());
    }
  }
  std::printf("  routing: %lld of %lld tokens chose the same experts\n",
              static_cast<long long>(c.tokens - static_cast<int64_t>(token_differs.size())),
              static_cast<long long>(c.tokens));

  const LayerConfig& l = c.layer;
  const int64_t T = c.tokens;
  std::vector<Result> results;
  for (size_t i = 0; i < run_outputs.size(); ++i) {
    const std::string& name = run_outputs[i].first;
    const TensorView& view = run_outputs[i].second;
    // Terms as tests/cuda/test_layer_cuda.cpp counts them: what feeds each element.
    int64_t terms = T;  // weight gradients sum over the tokens
    DType tol_dtype = c.dtype;
    std::function<bool(int64_t)> skip;
    if (name == "y") {
      terms = l.top_k + l.intermediate;
      skip = [&](int64_t r) { return token_differs.count(r) > 0; };
    } else if (name == "dx") {
      terms = l.top_k + l.intermediate + l.grid_rows + l.grid_cols;
      skip = [&](int64_t r) { return token_differs.count(r) > 0; };
    } else if (name == "d up_embed.weight" || name == "d down_embed.weight") {
      skip = [&](int64_t r) { return expert_touched.count(r) > 0; };
    } else if (name.find("running") != std::string::npos) {
      terms = l.hidden;  // f32 statistics of f32 logits, whatever the storage type
      tol_dtype = DType::f32;
    }
    const int64_t cols = view.ndim == 2 ? view.shape[1] : 1;
    results.push_back(compare(name, download(*dev, view), download(*cpu, oracle_outputs[i].second),
                              cols, tolerance_for(tol_dtype, terms), terms, skip));
  }

  std::printf("\n  %-24s %7s %9s %9s %12s %11s %11s\n", "output", "terms", "rtol", "atol",
              "max abs err", "rel L2 err", "worst ratio");
  int failed = 0;
  for (const Result& r : results) {
    const bool ok = r.worst_ratio <= 1.0 && !r.nan;
    if (!ok) ++failed;
    std::printf("  %-24s %7lld %9.2e %9.2e %12.3e %11.3e %11.3g  %s", r.name.c_str(),
                static_cast<long long>(r.terms), r.tol.rtol, r.tol.atol, r.max_abs, r.rel_l2,
                r.worst_ratio, ok ? "ok" : "FAIL");
    if (!ok) {
      std::printf(" (element %lld: got %.6g, want %.6g%s)", static_cast<long long>(r.worst_index),
                  r.got, r.want, r.nan ? ", NaN" : "");
    }
    std::printf("\n");
  }
  if (!token_differs.empty()) {
    std::printf(
        "  note: %zu token(s) chose different experts (near-ties); their rows of y and dx "
        "and %zu experts' gradient rows were left out\n",
        token_differs.size(), expert_touched.size());
  }
  if (failed) {
    std::printf("\nFAIL: %d of %zu outputs exceed the tolerance\n", failed, results.size());
    return 1;
  }
  std::printf("\nPASS: every output within tolerance\n");
  return 0;
}

}  // namespace omnimoe::tool
