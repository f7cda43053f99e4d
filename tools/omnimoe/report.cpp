#include "report.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>

namespace omnimoe::tool {

double floor_ms(const Row& row, const Ceilings& c) {
  if (!c.measured || c.gemm_tflops <= 0 || c.copy_gbps <= 0) return 0.0;
  const double compute_ms = row.flops / (c.gemm_tflops * 1e12) * 1e3;
  const double memory_ms = row.bytes / (c.copy_gbps * 1e9) * 1e3;
  return std::max(compute_ms, memory_ms);
}

std::string format_bytes(double bytes) {
  char buf[64];
  if (bytes >= 1024.0 * 1024 * 1024) {
    std::snprintf(buf, sizeof buf, "%.2f GiB", bytes / (1024.0 * 1024 * 1024));
  } else if (bytes >= 1024.0 * 1024) {
    std::snprintf(buf, sizeof buf, "%.1f MiB", bytes / (1024.0 * 1024));
  } else {
    std::snprintf(buf, sizeof buf, "%.1f KiB", bytes / 1024.0);
  }
  return buf;
}

namespace {

std::string fixed(double v, int digits) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", digits, v);
  return buf;
}

// Three significant digits at least, never scientific: 0.00123, 1.23, 123.
std::string readable(double v) {
  if (v == 0.0) return "0";
  const double a = std::fabs(v);
  const int digits = a >= 100 ? 0 : a >= 10 ? 1 : a >= 1 ? 2 : a >= 0.1 ? 3 : a >= 0.01 ? 4 : 5;
  return fixed(v, digits);
}

std::string pad(const std::string& s, size_t width, bool right) {
  if (s.size() >= width) return s;
  const std::string fill(width - s.size(), ' ');
  return right ? fill + s : s + fill;
}

std::string shorten(const std::string& s, size_t width) {
  std::string one_line = s;
  std::replace(one_line.begin(), one_line.end(), '\n', ' ');
  return one_line.size() <= width ? one_line : one_line.substr(0, width - 3) + "...";
}

}  // namespace

void print_run(std::FILE* out, const BenchReport& report, const RunReport& run) {
  const BenchConfig& c = run.config;
  const Derived& der = run.derived;
  const bool floors = report.ceilings.measured;
  std::fprintf(out, "\nomnimoe bench: %s on %s (%s)\n", c.name.c_str(), report.device_name.c_str(),
               report.device_details.c_str());
  std::fprintf(out, "  layer    T=%lld %s dtype=%s\n", static_cast<long long>(c.tokens),
               c.layer.describe().c_str(), dtype_name(c.dtype));
  std::fprintf(out,
               "  sizes    N=%lld  P=T*K=%lld  m=P/N=%.3g tokens per expert  density K/N=%.3g%%"
               "  distinct experts chosen %lld\n",
               static_cast<long long>(der.experts), static_cast<long long>(der.pairs),
               der.tokens_per_expert, 100.0 * der.density,
               static_cast<long long>(run.distinct_experts));
  std::fprintf(out, "  experts  execution path: %s; routing of the op rows: %s\n",
               run.experts_path.c_str(), run.routing_source.c_str());
  std::fprintf(out, "  issue    eager layer calls: %s\n", run.layer_issue.c_str());
  const bool cuda = report.device_type == "cuda";
  std::fprintf(out,
               "  timing   median of %d runs after %d warm-up runs, %s; %d rotating input set%s; "
               "host issue: %s\n",
               run.iters, run.warmup, cuda ? "CUDA events" : "steady clock", run.rotation_sets,
               run.rotation_sets == 1 ? "" : "s",
               cuda ? "steady clock, each call behind an untimed one" : "the same, timed again");
  std::fprintf(out,
               "  memory   peak %s allocated for the layer rows (saved %s, workspace fwd %s, "
               "bwd %s)",
               format_bytes(static_cast<double>(run.layer_peak_bytes)).c_str(),
               format_bytes(static_cast<double>(run.saved_bytes)).c_str(),
               format_bytes(static_cast<double>(run.forward_workspace_bytes)).c_str(),
               format_bytes(static_cast<double>(run.backward_workspace_bytes)).c_str());
  if (run.baseline_peak_bytes) {
    std::fprintf(out, "; %s with the baselines",
                 format_bytes(static_cast<double>(run.baseline_peak_bytes)).c_str());
  }
  std::fprintf(out, "\n");
  const Ceilings& ce = report.ceilings;
  if (ce.measured) {
    std::fprintf(out,
                 "  ceilings %.0f GB/s device copy (read + write, %s), %.0f TFLOP/s %s GEMM "
                 "(cuBLASLt, %lld^3)\n",
                 ce.copy_gbps, format_bytes(ce.copy_bytes).c_str(), ce.gemm_tflops,
                 dtype_name(ce.gemm_dtype), static_cast<long long>(ce.gemm_size));
  } else if (!ce.error.empty()) {
    std::fprintf(out, "  ceilings not measured: %s\n", ce.error.c_str());
  }

  // GFLOP/s on the CPU, where TFLOP/s would be all zeros.
  const bool giga = report.device_type == "cpu";
  const std::vector<std::string> head = {
      "row",  "median ms", "host issue ms", giga ? "GFLOP/s" : "TFLOP/s",
      "GB/s", "floor ms",  "time/floor",    "note"};
  std::vector<std::vector<std::string>> table;
  for (const Row& r : run.rows) {
    std::vector<std::string> cells(head.size());
    cells[0] = (r.group == "baseline" ? "baseline: " : "") + r.name;
    if (!r.ok()) {
      cells[1] = "n/a";
      cells[7] = shorten(r.error.empty() ? "not run" : r.error, 110);
    } else {
      const double ms = r.median_ms();
      cells[1] = readable(ms);
      cells[2] = r.host_issue_ms.empty() ? "-" : readable(median(r.host_issue_ms));
      cells[3] = r.flops > 0 ? readable(r.flops / (ms * 1e-3) / (giga ? 1e9 : 1e12)) : "-";
      cells[4] = r.bytes > 0 ? readable(r.bytes / (ms * 1e-3) / 1e9) : "-";
      const double fl = floor_ms(r, ce);
      cells[5] = floors && fl > 0 ? readable(fl) : "-";
      cells[6] = floors && fl > 0 ? readable(ms / fl) : "-";
      cells[7] = r.note;
    }
    table.push_back(cells);
  }
  std::vector<size_t> width(head.size());
  for (size_t i = 0; i < head.size(); ++i) width[i] = head[i].size();
  for (const auto& cells : table) {
    for (size_t i = 0; i + 1 < cells.size(); ++i) width[i] = std::max(width[i], cells[i].size());
  }
  auto print_cells = [&](const std::vector<std::string>& cells) {
    std::string line = "  ";
    for (size_t i = 0; i < cells.size(); ++i) {
      const bool last = i + 1 == cells.size();
      line += last ? cells[i] : pad(cells[i], width[i], i > 0) + "  ";
    }
    while (!line.empty() && line.back() == ' ') line.pop_back();
    std::fprintf(out, "%s\n", line.c_str());
  };
  std::fprintf(out, "\n");
  print_cells(head);
  for (const auto& cells : table) print_cells(cells);
  for (const std::string& n : run.notes) std::fprintf(out, "  note: %s\n", n.c_str());
  std::fflush(out);
}

// --- JSON ------------------------------------------------------------------------------------

namespace {

std::string quote(const std::string& s) {
  std::string o = "\"";
  for (const char ch : s) {
    switch (ch) {
      case '"':
        o += "\\\"";
        break;
      case '\\':
        o += "\\\\";
        break;
      case '\n':
        o += "\\n";
        break;
      case '\t':
        o += "\\t";
        break;
      default:
        if (static_cast<unsigned char>(ch) < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", ch);
          o += buf;
        } else {
          o += ch;
        }
    }
  }
  return o + "\"";
}

std::string number(double v) {
  if (!std::isfinite(v)) return "null";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.15g", v);
  return buf;
}

std::string integer(int64_t v) { return std::to_string(v); }

std::string numbers(const std::vector<double>& v) {
  std::string o = "[";
  for (size_t i = 0; i < v.size(); ++i) o += (i ? ", " : "") + number(v[i]);
  return o + "]";
}

// Fields of one JSON object, written on one line each.
class Object {
 public:
  explicit Object(int indent) : indent_(indent) {}
  Object& add(const std::string& key, const std::string& raw_value) {
    fields_.push_back(quote(key) + ": " + raw_value);
    return *this;
  }
  Object& str(const std::string& key, const std::string& v) { return add(key, quote(v)); }
  Object& num(const std::string& key, double v) { return add(key, number(v)); }
  Object& num(const std::string& key, int64_t v) { return add(key, integer(v)); }
  Object& boolean(const std::string& key, bool v) { return add(key, v ? "true" : "false"); }
  std::string text() const {
    const std::string in(indent_ + 2, ' ');
    std::string o = "{\n";
    for (size_t i = 0; i < fields_.size(); ++i) {
      o += in + fields_[i] + (i + 1 < fields_.size() ? ",\n" : "\n");
    }
    return o + std::string(indent_, ' ') + "}";
  }

 private:
  int indent_;
  std::vector<std::string> fields_;
};

std::string array(const std::vector<std::string>& items, int indent) {
  if (items.empty()) return "[]";
  const std::string in(indent + 2, ' ');
  std::string o = "[\n";
  for (size_t i = 0; i < items.size(); ++i) {
    o += in + items[i] + (i + 1 < items.size() ? ",\n" : "\n");
  }
  return o + std::string(indent, ' ') + "]";
}

std::string row_json(const Row& r, const Ceilings& ce, int indent) {
  Object o(indent);
  o.str("name", r.name).str("group", r.group).str("status", r.ok() ? "ok" : "n/a");
  if (!r.ok()) o.str("message", r.error);
  o.num("flops", r.flops).num("bytes", r.bytes);
  if (r.ok()) {
    const double ms = r.median_ms();
    o.num("median_ms", ms);
    o.num("min_ms", *std::min_element(r.samples_ms.begin(), r.samples_ms.end()));
    o.num("max_ms", *std::max_element(r.samples_ms.begin(), r.samples_ms.end()));
    o.num("tflops", r.flops / (ms * 1e-3) / 1e12);
    o.num("gbps", r.bytes / (ms * 1e-3) / 1e9);
    const double fl = floor_ms(r, ce);
    if (fl > 0) o.num("floor_ms", fl).num("time_over_floor", ms / fl);
    o.add("samples_ms", numbers(r.samples_ms));
    if (!r.host_issue_ms.empty()) {
      o.num("host_issue_ms", median(r.host_issue_ms));
      o.add("host_issue_samples_ms", numbers(r.host_issue_ms));
    }
  }
  if (!r.note.empty()) o.str("note", r.note);
  return o.text();
}

std::string run_json(const RunReport& run, const Ceilings& ce, int indent) {
  const BenchConfig& c = run.config;
  Object cfg(indent + 2);
  cfg.str("name", c.name)
      .num("tokens", c.tokens)
      .num("hidden", c.layer.hidden)
      .num("grid_rows", c.layer.grid_rows)
      .num("grid_cols", c.layer.grid_cols)
      .num("top_k", c.layer.top_k)
      .num("intermediate", c.layer.intermediate)
      .str("act", activation_name(c.layer.act))
      .str("gating", gating_name(c.layer.gating))
      .str("router_norm", router_norm_name(c.layer.router_norm))
      .str("dtype", dtype_name(c.dtype));
  Object der(indent + 2);
  der.num("experts", run.derived.experts)
      .num("pairs", run.derived.pairs)
      .num("tokens_per_expert", run.derived.tokens_per_expert)
      .num("density", run.derived.density)
      .num("distinct_experts", run.distinct_experts)
      .num("active_params", run.derived.active_params)
      .num("dense_intermediate", run.derived.dense_intermediate);
  Object timing(indent + 2);
  timing.num("warmup", static_cast<int64_t>(run.warmup))
      .num("iters", static_cast<int64_t>(run.iters))
      .num("rotation_sets", static_cast<int64_t>(run.rotation_sets))
      .str("statistic", "median");
  Object mem(indent + 2);
  mem.num("layer_peak_bytes", static_cast<int64_t>(run.layer_peak_bytes))
      .num("baseline_peak_bytes", static_cast<int64_t>(run.baseline_peak_bytes))
      .num("saved_bytes", static_cast<int64_t>(run.saved_bytes))
      .num("forward_workspace_bytes", static_cast<int64_t>(run.forward_workspace_bytes))
      .num("backward_workspace_bytes", static_cast<int64_t>(run.backward_workspace_bytes));
  std::vector<std::string> rows, notes;
  for (const Row& r : run.rows) rows.push_back(row_json(r, ce, indent + 4));
  for (const std::string& n : run.notes) notes.push_back(quote(n));
  Object o(indent);
  o.add("config", cfg.text())
      .add("derived", der.text())
      .str("experts_execution", run.experts_path)
      .str("routing", run.routing_source)
      .str("layer_issue", run.layer_issue)
      .add("timing", timing.text())
      .add("memory", mem.text())
      .add("rows", array(rows, indent + 2))
      .add("notes", array(notes, indent + 2));
  return o.text();
}

}  // namespace

void write_json(const std::string& path, const BenchReport& report) {
  Object dev(2);
  dev.str("type", report.device_type)
      .str("name", report.device_name)
      .str("details", report.device_details);
  Object ce(2);
  const Ceilings& c = report.ceilings;
  ce.boolean("measured", c.measured);
  if (c.measured) {
    ce.num("copy_gbps", c.copy_gbps)
        .num("copy_bytes", c.copy_bytes)
        .num("gemm_tflops", c.gemm_tflops)
        .num("gemm_size", c.gemm_size)
        .str("gemm_dtype", dtype_name(c.gemm_dtype));
  } else if (!c.error.empty()) {
    ce.str("error", c.error);
  }
  std::vector<std::string> runs;
  for (const RunReport& r : report.runs) runs.push_back(run_json(r, c, 4));
  Object top(0);
  top.str("tool", "omnimoe bench")
      .str("version", report.version)
      .str("git_commit", report.git_commit)
      .str("date", report.date)
      .add("device", dev.text())
      .add("ceilings", ce.text())
      .add("runs", array(runs, 2));

  std::ofstream f(path);
  if (!f) throw Error("--json: cannot open '" + path + "' for writing");
  f << top.text() << "\n";
  if (!f) throw Error("--json: writing '" + path + "' failed");
}

}  // namespace omnimoe::tool
