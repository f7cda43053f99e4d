// The sweep of `omnimoe bench --compare paper` (docs/compare.md): every method at its smallest
// activated budget over 1k..16k tokens, and over its budgets at 1k tokens. Each point builds the
// method (all memory through the Platform, so its bytes are counted), runs one untimed step,
// then times forward and forward+backward with CUDA events; medians go to JSON.
#include <omnimoe/omnimoe.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "commands.h"
#include "compare/compare.h"
#include "compare/compare_methods.cuh"
#include "host_array.h"
#include "platform.h"

namespace omnimoe::tool {

namespace {

using compare::MethodSpec;

struct MethodInfo {
  const char* name;
  const char* label;
  const char* budget_name;
  std::vector<int64_t> budgets;  // the smallest first
};

// SPEC.md, "The configurations the paper measures" (dense: the same active parameters).
const std::vector<MethodInfo>& methods() {
  static const std::vector<MethodInfo> m = {
      {"dense", "Dense SwiGLU", "I", {1024, 2048, 4096, 8192}},
      {"gshard", "GShard (128 x FFN 512)", "K", {2, 4, 8, 16}},
      {"deepseekmoe", "DeepSeekMoE (256 x FFN 256 + shared 1024)", "K", {4, 8, 16, 32}},
      {"pkm", "PKM (444^2 values)", "K", {2500, 5000, 10000, 25000}},
      {"peer", "PEER (320^2 single-neuron experts)", "K", {1250, 2500, 5000, 12500}},
      {"omnimoe", "OmniMoE (320^2 atomic experts + shared 1024)", "K", {512, 1024, 2048, 4096}},
  };
  return m;
}

struct Point {
  MethodSpec spec;
  int64_t active = 0;
  std::vector<double> fwd, both;
  size_t peak_bytes = 0, param_bytes = 0;
  std::string note, check, error;
  bool check_failed = false;
  double seconds = 0.0;
};

std::string utc_now() {
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

std::string esc(const std::string& s) {
  std::string o;
  for (const char c : s) {
    if (c == '"' || c == '\\') {
      o += '\\';
      o += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      o += ' ';
    } else {
      o += c;
    }
  }
  return o;
}

std::string num(double v) {
  if (!std::isfinite(v)) return "null";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.6g", v);
  return buf;
}

std::string samples(const std::vector<double>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + num(v[i]);
  return s + "]";
}

bool finite_and_nonzero(Platform& p, const TensorView& t) {
  HostArray h(t.dtype, t.numel());
  p.copy_to_host(h.data(), t.data, h.bytes());
  bool nonzero = false;
  for (int64_t i = 0; i < h.numel(); ++i) {
    const double v = h.get(i);
    if (!std::isfinite(v)) return false;
    nonzero = nonzero || v != 0.0;
  }
  return nonzero;
}

struct Report {
  std::string mode, device, details, date, commit, version;
  int warmup = 0, iters = 0;
  Ceilings ceilings;
  std::vector<Point> points;
  double elapsed_s = 0.0;
};

void write_report(const std::string& path, const Report& r) {
  std::ostringstream o;
  o << "{\n  \"tool\": \"omnimoe bench --compare " << esc(r.mode) << "\",\n";
  o << "  \"device\": \"" << esc(r.device) << "\",\n  \"device_details\": \"" << esc(r.details)
    << "\",\n  \"date\": \"" << r.date << "\",\n  \"git_commit\": \"" << esc(r.commit)
    << "\",\n  \"version\": \"" << esc(r.version) << "\",\n";
  o << "  \"dtype\": \"bf16\",\n  \"hidden\": 1024,\n  \"warmup\": " << r.warmup
    << ",\n  \"iters\": " << r.iters << ",\n  \"elapsed_s\": " << num(r.elapsed_s) << ",\n";
  o << "  \"memory_measure\": \"bytes the benchmark allocated for the point through its "
       "allocator: weights, weight gradients, inputs, outputs, saved activations and "
       "workspaces (cuBLASLt handle state not included); activation_bytes = peak_bytes - "
       "2 * param_bytes (everything but the weights and their gradients)\",\n";
  o << "  \"ceilings\": {\"copy_gbps\": " << num(r.ceilings.copy_gbps)
    << ", \"gemm_tflops\": " << num(r.ceilings.gemm_tflops) << "},\n";
  o << "  \"paper\": {\"gpu\": \"A100\", \"tokens\": 4096, \"omnimoe_ms\": 6.7, \"peer_ms\": 73, "
       "\"deepseekmoe_ms\": 102, \"speedup_over_peer\": 10.9, "
       "\"speedup_over_deepseekmoe\": 15.2},\n";
  o << "  \"methods\": [\n";
  for (size_t i = 0; i < methods().size(); ++i) {
    const MethodInfo& m = methods()[i];
    o << "    {\"name\": \"" << m.name << "\", \"label\": \"" << esc(m.label)
      << "\", \"budget_name\": \"" << m.budget_name << "\", \"budgets\": "
      << "[";
    for (size_t j = 0; j < m.budgets.size(); ++j) o << (j ? ", " : "") << m.budgets[j];
    o << "]}" << (i + 1 < methods().size() ? "," : "") << "\n";
  }
  o << "  ],\n  \"points\": [\n";
  for (size_t i = 0; i < r.points.size(); ++i) {
    const Point& p = r.points[i];
    o << "    {\"method\": \"" << p.spec.method << "\", \"tokens\": " << p.spec.tokens
      << ", \"budget\": " << p.spec.budget << ", \"active_params\": " << p.active
      << ", \"forward_ms\": " << (p.fwd.empty() ? "null" : num(median(p.fwd)))
      << ", \"forward_backward_ms\": " << (p.both.empty() ? "null" : num(median(p.both)))
      << ", \"peak_bytes\": " << p.peak_bytes << ", \"param_bytes\": " << p.param_bytes
      << ", \"activation_bytes\": "
      << (p.peak_bytes > 2 * p.param_bytes ? p.peak_bytes - 2 * p.param_bytes : 0)
      << ", \"forward_samples_ms\": " << samples(p.fwd)
      << ", \"forward_backward_samples_ms\": " << samples(p.both)
      << ", \"seconds\": " << num(p.seconds) << ", \"note\": \"" << esc(p.note)
      << "\", \"check\": \"" << esc(p.check)
      << "\", \"check_failed\": " << (p.check_failed ? "true" : "false")
      << ", \"error\": " << (p.error.empty() ? "null" : "\"" + esc(p.error) + "\"") << "}"
      << (i + 1 < r.points.size() ? "," : "") << "\n";
  }
  o << "  ]\n}\n";
  const std::filesystem::path parent = std::filesystem::path(path).parent_path();
  if (!parent.empty()) {
    std::error_code ec;
    std::filesystem::create_directories(parent, ec);
  }
  std::ofstream f(path);
  if (!f) throw Error("cannot write " + path);
  f << o.str();
}

void set_experts_path(const char* path) {
  if (path) {
    setenv("OMNIMOE_EXPERTS_PATH", path, 1);
  } else {
    unsetenv("OMNIMOE_EXPERTS_PATH");
  }
}

}  // namespace

int run_compare(const Flags& f) {
  // MODE or MODE:method,method (a subset, e.g. for a sanitizer run).
  std::string mode = f.text("compare", "paper");
  std::string only;
  if (const size_t colon = mode.find(':'); colon != std::string::npos) {
    only = "," + mode.substr(colon + 1) + ",";
    mode = mode.substr(0, colon);
  }
  if (mode != "paper" && mode != "smoke") {
    throw UsageError("--compare must be paper or smoke (optionally :method,method), got '" + mode +
                     "'");
  }
  for (size_t b = 1, e; b < only.size(); b = e + 1) {
    e = only.find(',', b);
    const std::string name = only.substr(b, e - b);
    bool known = false;
    for (const MethodInfo& m : methods()) known = known || name == m.name;
    if (!known) throw UsageError("--compare: no method named '" + name + "'");
  }
  const LayerOptions lo = resolve_layer_options(f, true, "", "");
  if (lo.device.type != DeviceType::cuda) throw UsageError("--compare needs --device cuda");
  const bool smoke = mode == "smoke";
  const int warmup = static_cast<int>(f.integer("warmup", smoke ? 1 : 5, 0, 1000));
  const int iters = static_cast<int>(f.integer("iters", smoke ? 3 : 20, 1, 1000));
  const double limit_s = static_cast<double>(f.integer("compare-time-limit", 540, 1, 100000));
  const std::string json = f.text("json", "bench/results/compare-" + mode + ".json");

  const auto start = std::chrono::steady_clock::now();
  auto elapsed = [&] {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  std::unique_ptr<Platform> p = make_cuda_platform(lo.device.index);
  Report r;
  r.mode = mode;
  r.device = p->device_name();
  r.details = p->device_details();
  r.date = utc_now();
  r.commit = git_commit();
  r.version = version();
  r.warmup = warmup;
  r.iters = iters;
  std::fprintf(stderr, "omnimoe bench --compare %s on %s (commit %s)\n", mode.c_str(),
               r.device.c_str(), r.commit.c_str());
  if (!f.has("skip-ceilings")) r.ceilings = p->measure_ceilings(DType::bf16);

  // The points: per method the smallest budget over the tokens, then the budgets at 1k tokens
  // (--tokens T: every point at T instead).
  const int64_t fixed_tokens = f.integer("tokens", 0, 2, int64_t{1} << 20);
  const int64_t budget_tokens = fixed_tokens ? fixed_tokens : 1024;
  std::vector<int64_t> tokens = {1024, 2048, 4096, 8192, 16384};
  if (smoke || fixed_tokens) tokens = {budget_tokens};
  // Largest budgets last: a point that fails the device (out of memory, a fault) then costs the
  // fewest others.
  auto wanted = [&](const MethodInfo& m) {
    return only.empty() || only.find("," + std::string(m.name) + ",") != std::string::npos;
  };
  std::vector<MethodSpec> specs;
  for (const MethodInfo& m : methods()) {
    if (!wanted(m)) continue;
    for (const int64_t t : tokens) specs.push_back({m.name, t, m.budgets[0]});
  }
  for (size_t b = 1; b < (smoke ? 2 : 4); ++b) {
    for (const MethodInfo& m : methods()) {
      if (wanted(m)) specs.push_back({m.name, budget_tokens, m.budgets[b]});
    }
  }

  const char* saved_path = std::getenv("OMNIMOE_EXPERTS_PATH");
  const std::string saved_path_value = saved_path ? saved_path : "";
  int failures = 0;
  std::string checked;  // methods whose forward was checked on the host
  for (size_t i = 0; i < specs.size(); ++i) {
    Point pt;
    pt.spec = specs[i];
    pt.active = compare::active_params(pt.spec.method, pt.spec.budget, 1024);
    std::fprintf(stderr, "  [%zu/%zu] %-11s T=%-5lld budget=%-6lld ...", i + 1, specs.size(),
                 pt.spec.method.c_str(), static_cast<long long>(pt.spec.tokens),
                 static_cast<long long>(pt.spec.budget));
    std::fflush(stderr);
    if (elapsed() > limit_s) {
      pt.error = "skipped: the sweep passed --compare-time-limit";
      std::fprintf(stderr, " skipped\n");
      r.points.push_back(pt);
      continue;
    }
    // PEER is token-centric: force the library's gather execution of the atomic experts.
    set_experts_path(pt.spec.method == "peer" ? "gather"
                     : saved_path             ? saved_path_value.c_str()
                                              : nullptr);
    const auto t0 = std::chrono::steady_clock::now();
    const size_t base = p->allocated_bytes();
    p->reset_peak();
    try {
      std::unique_ptr<compare::Method> m = compare::make_method(*p, pt.spec, 1 + i);
      pt.param_bytes = m->param_bytes;
      m->forward();
      m->backward();
      p->synchronize();
      // Few iterations for slow points so the whole sweep stays in its budget.
      const auto probe = p->time_ms(
          [&](int) {
            m->forward();
            m->backward();
          },
          0, 1);
      const int n = std::max(3, std::min(iters, static_cast<int>(3000.0 / (probe[0] + 1e-3))));
      const int w = std::min(warmup, n);
      pt.fwd = p->time_ms([&](int) { m->forward(); }, w, n);
      pt.both = p->time_ms(
          [&](int) {
            m->forward();
            m->backward();
          },
          w, n);
      p->synchronize();
      pt.peak_bytes = p->peak_bytes() - base;
      pt.note = m->note();
      if (!finite_and_nonzero(*p, m->output()) || !finite_and_nonzero(*p, m->input_grad())) {
        pt.check = "y or dx not finite, or all zero";
        pt.check_failed = true;
      }
      // The host check of each method's forward, once, at its first point.
      if (checked.find("," + pt.spec.method + ",") == std::string::npos) {
        checked += "," + pt.spec.method + ",";
        m->forward();
        m->backward();
        const std::string c = m->check(pt.check_failed);
        if (!c.empty()) pt.check += (pt.check.empty() ? "" : "; ") + c;
      }
    } catch (const std::exception& e) {
      pt.error = e.what();
      pt.fwd.clear();
      pt.both.clear();
      ++failures;
      try {
        p->synchronize();
      } catch (const std::exception&) {
      }
    }
    pt.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (pt.error.empty()) {
      std::fprintf(stderr, " fwd %.3f ms, fwd+bwd %.3f ms, %.0f MiB%s (%.1f s)\n", median(pt.fwd),
                   median(pt.both), pt.peak_bytes / 1048576.0,
                   pt.check_failed ? ", CHECK FAILED" : "", pt.seconds);
    } else {
      std::fprintf(stderr, " n/a: %s\n", pt.error.c_str());
    }
    if (pt.check_failed) ++failures;
    if (!pt.check.empty()) std::fprintf(stderr, "      check: %s\n", pt.check.c_str());
    r.points.push_back(pt);
    r.elapsed_s = elapsed();
    write_report(json, r);
  }
  set_experts_path(saved_path ? saved_path_value.c_str() : nullptr);
  r.elapsed_s = elapsed();
  write_report(json, r);

  // The table: method, tokens, budget, active params, fwd, fwd+bwd, memory.
  std::printf("%-12s %6s %7s %8s %10s %12s %10s\n", "method", "T", "budget", "active", "fwd ms",
              "fwd+bwd ms", "MiB");
  for (const Point& pt : r.points) {
    if (!pt.error.empty()) {
      std::printf("%-12s %6lld %7lld %7.1fM  n/a (%s)\n", pt.spec.method.c_str(),
                  static_cast<long long>(pt.spec.tokens), static_cast<long long>(pt.spec.budget),
                  pt.active / 1e6, pt.error.c_str());
      continue;
    }
    std::printf("%-12s %6lld %7lld %7.1fM %10.3f %12.3f %10.0f\n", pt.spec.method.c_str(),
                static_cast<long long>(pt.spec.tokens), static_cast<long long>(pt.spec.budget),
                pt.active / 1e6, median(pt.fwd), median(pt.both), pt.peak_bytes / 1048576.0);
  }
  std::fprintf(stderr,
               "omnimoe bench --compare: %zu points in %.0f s; wrote %s\n"
               "  figures: python3 scripts/compare_paper.py %s\n",
               r.points.size(), r.elapsed_s, json.c_str(), json.c_str());
  return failures ? 1 : 0;
}

}  // namespace omnimoe::tool
