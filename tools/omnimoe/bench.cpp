// `omnimoe bench`: times the layer, its ops and (on CUDA) the baselines; prints a table and
// optionally writes JSON. Each row that cannot run prints n/a with the reason; none aborts.
#include <omnimoe/omnimoe.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <exception>
#include <functional>

#include "commands.h"
#include "counts.h"
#include "layer_setup.h"
#include "platform.h"
#include "report.h"
#ifdef OMNIMOE_WITH_CUDA
#include "baselines/baselines.h"
#include "compare/compare.h"
#endif

namespace omnimoe::tool {

namespace {

const char* kBenchHelp = R"(Usage: omnimoe bench [--config NAME | shape flags] [flags]

Times one OmniMoE layer: forward, forward+backward, and each op (router, schedule, experts,
MLP, and their backwards). Prints median times, achieved TFLOP/s and GB/s, memory, and which
experts execution path ran. For the two eager layer rows it also prints the host's time to issue
one call ("host issue ms"): at or above the device time of the same call (its CUDA graph row),
the eager row times the host's launches, not the device. On CUDA it also measures the hardware
ceilings in the same run (device copy bandwidth, cuBLASLt GEMM rate), the floor of every row
and time/floor, and times three baselines: a token-centric expert branch, a dense-masked expert
branch, and a dense SwiGLU with the same active parameters. Progress goes to stderr, the table
to stdout.

Layer:
  --config NAME          a named config, or 'all' (every GPU config; CUDA only). Default:
                         ref-quickstart on CUDA, cpu-small on the CPU. Names:
                         %s
  --tokens T             shape flags override the config's values
  --hidden d
  --grid RxC             expert grid N_r x N_c, e.g. 320x320
  --top-k K
  --intermediate I       shared SwiGLU MLP size; 0 drops the MLP
  --dtype bf16|f16|f32|f64   storage type (default: the config's)
  --act silu|gelu|relu   --gating softmax|joint   --router-norm batch|none

Run:
  --device cpu|cuda|cuda:N   default cuda when a CUDA device is visible, else cpu
  --warmup N             untimed runs first (default 5 on CUDA, 1 on the CPU)
  --iters N              timed runs; medians are reported (default 20 on CUDA, 5 on the CPU)
  --threads N            CPU: OpenMP threads (default: OpenMP's)
  --seed N               seed of the random inputs (default 1)
  --skip-baselines       CUDA: leave out the baseline rows
  --skip-ceilings        CUDA: do not measure the ceilings (no floors; for quick or
                         sanitizer runs)
  --json PATH            also write everything measured as JSON
  --compare paper|smoke  CUDA: run the paper's efficiency comparison instead (Dense, GShard,
                         DeepSeekMoE, PKM, PEER, OmniMoE; docs/compare.md); JSON default
                         bench/results/compare-paper.json; --compare-time-limit S (default 540)

Exit codes: 0 done (rows that could not run print n/a), 2 bad flags or a missing device.
See docs/cli.md for the configs and how FLOPs, bytes and floors are counted.
)";

struct BenchOptions {
  LayerOptions layer;
  int warmup = 0, iters = 0;
  bool baselines = true;
  bool ceilings = true;
  std::string json;
};

std::string utc_now() {
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

struct RowSpec {
  RowSpec(const char* n, const char* g, Work w, std::function<void(int)> f, std::string note_ = "",
          bool graph_ = false)
      : name(n), group(g), work(w), fn(std::move(f)), note(std::move(note_)), graph(graph_) {}
  const char* name;
  const char* group;
  Work work;
  std::function<void(int)> fn;
  std::string note;
  bool graph;               // time replays of fn(0) captured in a CUDA graph
  bool host_issue = false;  // also time the host's issue of one call (Platform::host_issue_ms)
};

Row time_row(Platform& p, const RowSpec& spec, int warmup, int iters, size_t index, size_t count) {
  Row row;
  row.name = spec.name;
  row.group = spec.group;
  row.flops = spec.work.flops;
  row.bytes = spec.work.bytes;
  row.note = spec.note;
  std::fprintf(stderr, "  [%zu/%zu] %s ...", index + 1, count, spec.name);
  std::fflush(stderr);
  const auto start = std::chrono::steady_clock::now();
  try {
    row.samples_ms = spec.graph ? p.time_graph_ms(spec.fn, warmup, iters)
                                : p.time_ms(spec.fn, warmup, iters);
    if (spec.host_issue) row.host_issue_ms = p.host_issue_ms(spec.fn, iters);
    p.synchronize();
  } catch (const std::exception& e) {
    row.error = e.what();
    row.samples_ms.clear();
    row.host_issue_ms.clear();
    try {
      p.synchronize();
    } catch (const std::exception&) {
    }
  }
  if (row.ok() && !row.host_issue_ms.empty()) {
    std::fprintf(stderr, " %.4g ms, host issue %.4g ms (%.1f s)\n", row.median_ms(),
                 median(row.host_issue_ms), seconds_since(start));
  } else if (row.ok()) {
    std::fprintf(stderr, " %.4g ms (%.1f s)\n", row.median_ms(), seconds_since(start));
  } else {
    std::fprintf(stderr, " n/a\n");
  }
  return row;
}

RunReport bench_one(Platform& p, const BenchConfig& c, const BenchOptions& o) {
  RunReport run;
  run.config = c;
  run.derived = derive(c);
  run.warmup = o.warmup;
  run.iters = o.iters;
  const auto start = std::chrono::steady_clock::now();
  std::fprintf(stderr, "omnimoe bench: %s (T=%lld %s %s)\n", c.name.c_str(),
               static_cast<long long>(c.tokens), c.layer.describe().c_str(), dtype_name(c.dtype));

  p.reset_peak();
  const int sets = rotation_sets(LayerSetup::input_set_bytes(c), p.cache_bytes());
  run.rotation_sets = sets;
  std::fprintf(stderr, "  allocating %d input set%s of %s and the shared buffers\n", sets,
               sets == 1 ? "" : "s",
               format_bytes(static_cast<double>(LayerSetup::input_set_bytes(c))).c_str());
  LayerSetup setup(p, c, sets, o.layer.seed);
  run.saved_bytes = setup.saved_bytes;
  run.forward_workspace_bytes = setup.forward_workspace_bytes;
  run.backward_workspace_bytes = setup.backward_workspace_bytes;
  std::fprintf(stderr, "  preparing: a forward of every set fills the saved buffers\n");
  run.routing_source = setup.prepare();
  run.distinct_experts = setup.distinct_experts();
  try {
    run.experts_path = experts_execution(c.layer, c.tokens, c.dtype, setup.exec);
  } catch (const std::exception& e) {
    run.experts_path = std::string("n/a (") + e.what() + ")";
  }
  const char* replay_env = std::getenv("OMNIMOE_GRAPH_REPLAY");
  const bool replay_off = replay_env != nullptr && std::strcmp(replay_env, "off") == 0;
  run.layer_issue = p.device().type != DeviceType::cuda ? "direct (CPU)"
                    : !setup.exec.graph_replay || replay_off
                        ? "kernel launches (graph replay off)"
                        : "graph replay of the layer's kernels (Exec::graph_replay)";
  const LayerWork w = count_work(c, run.distinct_experts);

  const LayerConfig& l = c.layer;
  const Exec exec = setup.exec;
  const bool mlp = l.intermediate > 0;
  SharedBuffers& b = setup.shared;
  auto set = [&](int i) -> InputSet& { return setup.sets[static_cast<size_t>(i % sets)]; };

  std::vector<RowSpec> specs;
  specs.push_back({"layer forward", "layer", w.layer_forward, [&](int i) {
                     InputSet& s = set(i);
                     layer_forward(l, s.x, s.weights, s.norm, true, b.y, s.saved, b.workspace,
                                   exec);
                   }});
  specs.push_back(
      {"layer forward+backward", "layer", w.layer_forward_backward, [&](int i) {
         InputSet& s = set(i);
         layer_forward(l, s.x, s.weights, s.norm, true, b.y, s.saved, b.workspace, exec);
         layer_backward(l, s.x, s.weights, true, s.saved, s.dy, b.dx, b.grads, b.workspace, exec);
       }});
  // Timed eagerly, these two may be bound by the host's launches rather than the device.
  specs[0].host_issue = specs[1].host_issue = true;
  if (p.device().type == DeviceType::cuda) {
    // The same two calls replayed from a CUDA graph: device time without launch overhead.
    specs.push_back({"layer forward, CUDA graph", "layer", w.layer_forward, specs[0].fn,
                     "set 0 captured once, replayed", true});
    specs.push_back({"layer forward+backward, CUDA graph", "layer", w.layer_forward_backward,
                     specs[1].fn, "set 0 captured once, replayed", true});
  }
  specs.push_back({"router forward", "op", w.router_forward, [&](int i) {
                     InputSet& s = set(i);
                     router_forward(l, s.x, s.weights.router, s.norm, true, s.views.routing,
                                    s.views.router, b.workspace, exec);
                   }});
  // On the saved normalised logits: log-softmax shifts each token's row and column by a
  // constant, which moves every pair sum alike, so the same experts come out at the same cost.
  specs.push_back({"router select", "op", w.router_select, [&](int i) {
                     InputSet& s = set(i);
                     router_select_topk(l, s.views.router.row_logits, s.views.router.col_logits,
                                        s.views.routing.indices, s.views.routing.scores,
                                        b.workspace, exec);
                   }});
  specs.push_back({"schedule build", "op", w.schedule, [&](int i) {
                     InputSet& s = set(i);
                     schedule_build(l, s.views.routing.indices, s.schedule, b.workspace,
                                    exec);
                   }});
  specs.push_back({"experts forward", "op", w.experts_forward,
                   [&](int i) {
                     InputSet& s = set(i);
                     experts_forward(l, s.x, s.weights.experts, s.views.routing.indices,
                                     s.views.routing.gates, b.y, mlp,
                                     s.views.expert_preact, b.workspace, exec);
                   },
                   "path " + run.experts_path});
  if (mlp) {
    specs.push_back({"MLP forward", "op", w.mlp_forward, [&](int i) {
                       InputSet& s = set(i);
                       mlp_forward(l, s.x, s.weights.mlp, b.y, false, s.views.mlp, b.workspace,
                                   exec);
                     }});
  }
  specs.push_back({"router backward", "op", w.router_backward, [&](int i) {
                     InputSet& s = set(i);
                     router_backward(l, s.x, s.weights.router, true, s.views.router,
                                     s.views.routing, b.dgates, b.dx, true, b.grads.router,
                                     b.workspace, exec);
                   }});
  specs.push_back({"experts backward", "op", w.experts_backward,
                   [&](int i) {
                     InputSet& s = set(i);
                     experts_backward(l, s.x, s.weights.experts, s.views.routing.indices,
                                      s.views.routing.gates, s.views.expert_preact,
                                      s.schedule, s.dy, b.dx, mlp, b.grads.experts, b.dgates,
                                      b.workspace, exec);
                   },
                   "path " + run.experts_path});
  if (mlp) {
    specs.push_back({"MLP backward", "op", w.mlp_backward, [&](int i) {
                       InputSet& s = set(i);
                       mlp_backward(l, s.x, s.weights.mlp, s.views.mlp, s.dy, b.dx, false,
                                    b.grads.mlp, b.workspace, exec);
                     }});
  }
  // Let clocks and the memory system settle before the first row: its first samples were up
  // to 2.5x the later ones (pool-1m-k16 forward, H100). Half a second of whole layers.
  if (p.device().type == DeviceType::cuda) {
    const auto settle = std::chrono::steady_clock::now();
    try {
      for (int i = 0; i < 1000 && seconds_since(settle) < 0.5; ++i) {
        specs[1].fn(i);
        p.synchronize();
      }
    } catch (const std::exception&) {
      try {  // the layer rows report the error
        p.synchronize();
      } catch (const std::exception&) {
      }
    }
  }
  for (size_t i = 0; i < specs.size(); ++i) {
    run.rows.push_back(time_row(p, specs[i], o.warmup, o.iters, i, specs.size()));
  }
  run.layer_peak_bytes = p.peak_bytes();

#ifdef OMNIMOE_WITH_CUDA
  if (o.baselines && p.device().type == DeviceType::cuda) {
    std::vector<ExpertBranchInputs> inputs;
    for (const InputSet& s : setup.sets) {
      inputs.push_back({s.x, s.weights.experts.up, s.weights.experts.down, s.views.routing.indices,
                        s.views.routing.gates});
    }
    // The library's expert branch alone (no accumulation), for the cross-check.
    DeviceArray library_buf(p, static_cast<size_t>(c.tokens * l.hidden) * dtype_size(c.dtype));
    TensorView library_y =
        TensorView::contiguous(library_buf.data(), c.dtype, {c.tokens, l.hidden}, p.device());
    try {
      const InputSet& s = setup.sets[0];
      experts_forward(l, s.x, s.weights.experts, s.views.routing.indices, s.views.routing.gates,
                      library_y, false, s.views.expert_preact, b.workspace, exec);
      p.synchronize();
    } catch (const std::exception&) {
      library_y = TensorView{};
    }
    run_baselines(p, c, inputs, w, o.warmup, o.iters, library_y, run.rows, run.notes);
    run.baseline_peak_bytes = p.peak_bytes();
  }
#endif
  for (const std::string& n : setup.notes) run.notes.push_back(n);
  std::fprintf(stderr, "  done in %.1f s\n", seconds_since(start));
  return run;
}

}  // namespace

int run_bench(const std::vector<std::string>& args) {
  std::set<std::string> valued = kLayerFlags;
  valued.insert({"warmup", "iters", "json", "compare", "compare-time-limit"});
  const Flags f(args, valued, {"skip-baselines", "skip-ceilings"});
  if (f.help()) {
    std::printf(kBenchHelp, config_names().c_str());
    return 0;
  }
  if (f.has("compare")) {
#ifdef OMNIMOE_WITH_CUDA
    return run_compare(f);
#else
    throw UsageError("--compare runs on CUDA; this omnimoe was built without CUDA");
#endif
  }
  BenchOptions o;
  o.layer = resolve_layer_options(f, true, "", "");
  const bool cuda = o.layer.device.type == DeviceType::cuda;
  o.warmup = static_cast<int>(f.integer("warmup", cuda ? 5 : 1, 0, 100000));
  o.iters = static_cast<int>(f.integer("iters", cuda ? 20 : 5, 1, 100000));
  o.baselines = !f.has("skip-baselines");
  o.ceilings = !f.has("skip-ceilings");
  o.json = f.text("json", "");

  std::unique_ptr<Platform> p =
      cuda ? make_cuda_platform(o.layer.device.index) : make_cpu_platform(o.layer.threads);
  BenchReport report;
  report.device_type = cuda ? "cuda" : "cpu";
  report.device_name = p->device_name();
  report.device_details = p->device_details();
  report.date = utc_now();
  report.git_commit = git_commit();
  report.version = version();
  if (cuda && o.ceilings) {
    std::fprintf(stderr, "omnimoe bench: measuring the ceilings of %s\n",
                 report.device_name.c_str());
    report.ceilings = p->measure_ceilings(o.layer.configs.front().dtype);
  }

  int failures = 0;
  for (const BenchConfig& c : o.layer.configs) {
    try {
      report.runs.push_back(bench_one(*p, c, o));
      print_run(stdout, report, report.runs.back());
    } catch (const std::exception& e) {
      // A config that cannot even be set up (out of memory, say): report it, go on.
      std::fprintf(stderr, "omnimoe bench: %s could not run: %s\n", c.name.c_str(), e.what());
      ++failures;
    }
    if (!o.json.empty()) write_json(o.json, report);
  }
  if (!o.json.empty()) std::fprintf(stderr, "omnimoe bench: wrote %s\n", o.json.c_str());
  return failures ? 1 : 0;
}

}  // namespace omnimoe::tool
