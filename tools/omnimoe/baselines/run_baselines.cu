// Times the baselines with the same inputs, warm-up, iterations and input rotation as the
// library's rows, and cross-checks their outputs against each other and the library.
#include <cmath>
#include <cstdio>
#include <exception>
#include <memory>

#include "baselines/expert_branch.cuh"
#include "host_array.h"

namespace omnimoe::tool {

namespace {

std::vector<double> download(Platform& platform, const TensorView& t) {
  HostArray h(t.dtype, t.numel());
  platform.copy_to_host(h.data(), t.data, h.bytes());
  return h.to_vector();
}

// ||a - b|| / ||b||.
double relative_l2(const std::vector<double>& a, const std::vector<double>& b) {
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

}  // namespace

void run_baselines(Platform& platform, const BenchConfig& config,
                   const std::vector<ExpertBranchInputs>& sets, const LayerWork& work, int warmup,
                   int iters, const TensorView& library_y, std::vector<Row>& rows,
                   std::vector<std::string>& notes) {
  const LayerConfig& cfg = config.layer;
  const int64_t T = config.tokens, d = cfg.hidden;
  const DType dt = config.dtype;
  const cudaStream_t stream = static_cast<cudaStream_t>(platform.exec().stream);
  const int R = static_cast<int>(sets.size());
  auto progress = [&](const std::string& name) {
    std::fprintf(stderr, "  baseline: %s ...\n", name.c_str());
  };

  std::vector<std::pair<std::string, std::vector<double>>> outputs;
  auto keep_output = [&](const std::string& name, const TensorView& y) {
    try {
      outputs.push_back({name, download(platform, y)});
    } catch (const std::exception&) {
    }
  };

  // (a) token-centric.
  {
    Row row{"token-centric experts forward", "baseline"};
    row.flops = work.experts_forward.flops;
    row.bytes = work.experts_forward.bytes;
    row.note = "CTA per token gathers K rows of W and V: " +
               format_bytes(2.0 * T * cfg.top_k * d * dtype_size(dt)) + " of row reads";
    progress(row.name);
    try {
      DeviceArray ybuf(platform, static_cast<size_t>(T * d) * dtype_size(dt));
      const TensorView y = TensorView::contiguous(ybuf.data(), dt, {T, d}, platform.device());
      row.samples_ms = platform.time_ms(
          [&](int i) { token_centric_forward(cfg, dt, sets[i % R], y, stream); }, warmup, iters);
      token_centric_forward(cfg, dt, sets[0], y, stream);
      platform.synchronize();
      keep_output("token-centric", y);
    } catch (const std::exception& e) {
      row.error = e.what();
      row.samples_ms.clear();
    }
    rows.push_back(row);
  }

  // (b) dense-masked.
  {
    Row row{"dense-masked experts forward", "baseline"};
    row.flops = work.experts_forward.flops;
    row.bytes = work.experts_forward.bytes;
    const double dense_flops = 4.0 * T * cfg.num_experts() * d;
    char note[160];
    std::snprintf(note, sizeof note, "X W^T and S V over all N experts: %.3g TFLOP executed",
                  dense_flops / 1e12);
    row.note = note;
    progress(row.name);
    try {
      DeviceArray ybuf(platform, static_cast<size_t>(T * d) * dtype_size(dt));
      const TensorView y = TensorView::contiguous(ybuf.data(), dt, {T, d}, platform.device());
      DenseMasked dense(platform, cfg, T, dt);
      row.samples_ms =
          platform.time_ms([&](int i) { dense.forward(sets[i % R], y, stream); }, warmup, iters);
      dense.forward(sets[0], y, stream);
      platform.synchronize();
      keep_output("dense-masked", y);
    } catch (const std::exception& e) {
      row.error = e.what();
      row.samples_ms.clear();
    }
    rows.push_back(row);
  }

  // (c) dense SwiGLU of the same active parameters.
  {
    const int64_t inter = derive(config).dense_intermediate;
    Row fwd{"dense SwiGLU forward", "baseline"}, both{"dense SwiGLU forward+backward", "baseline"};
    fwd.flops = work.dense_forward.flops;
    fwd.bytes = work.dense_forward.bytes;
    both.flops = work.dense_forward_backward.flops;
    both.bytes = work.dense_forward_backward.bytes;
    fwd.note = "I' = " + std::to_string(inter) + ": 3 I' d = 2 K d + 3 I d active parameters";
    both.note = fwd.note;
    progress(fwd.name + " and backward");
    try {
      const size_t working = static_cast<size_t>(3 * inter * d + T * d) * dtype_size(dt);
      const int dense_sets = rotation_sets(working, platform.cache_bytes());
      DenseSwiglu dense(platform, T, d, inter, dt, dense_sets);
      try {
        fwd.samples_ms = platform.time_ms(
            [&](int i) { dense.forward(sets[i % R].x, i % dense_sets, stream); }, warmup, iters);
      } catch (const std::exception& e) {
        fwd.error = e.what();
        fwd.samples_ms.clear();
      }
      try {
        both.samples_ms = platform.time_ms(
            [&](int i) {
              dense.forward(sets[i % R].x, i % dense_sets, stream);
              dense.backward(sets[i % R].x, i % dense_sets, stream);
            },
            warmup, iters);
      } catch (const std::exception& e) {
        both.error = e.what();
        both.samples_ms.clear();
      }
    } catch (const std::exception& e) {
      fwd.error = both.error = e.what();
      fwd.samples_ms.clear();
      both.samples_ms.clear();
    }
    rows.push_back(fwd);
    rows.push_back(both);
  }

  // Cross-check: every expert-branch output of set 0 against the library's (or each other).
  if (library_y.data) keep_output("library experts_forward", library_y);
  if (outputs.size() >= 2) {
    const auto& ref = outputs.back();
    std::string line =
        "cross-check of the expert branch (set 0), relative L2 error against " + ref.first + ":";
    for (size_t i = 0; i + 1 < outputs.size(); ++i) {
      char buf[96];
      const double err = relative_l2(outputs[i].second, ref.second);
      std::snprintf(buf, sizeof buf, " %s %.2e%s", outputs[i].first.c_str(), err,
                    err > 5e-2 || !std::isfinite(err) ? " (DISAGREES)" : "");
      line += buf;
    }
    notes.push_back(line);
  }
}

}  // namespace omnimoe::tool
