// What `omnimoe bench` measured: rows of timings with their work counts, printed as a table and
// written as JSON.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "configs.h"
#include "platform.h"

namespace omnimoe::tool {

struct Row {
  std::string name;   // "experts forward"
  std::string group;  // "layer", "op", "baseline"
  std::string error;  // non-empty: the row did not run (printed as n/a with this message)
  std::vector<double> samples_ms;
  // Host wall time of issuing each call (the eager layer rows); empty where not measured.
  std::vector<double> host_issue_ms;
  double flops = 0.0;
  double bytes = 0.0;
  std::string note;

  bool ok() const { return error.empty() && !samples_ms.empty(); }
  double median_ms() const { return median(samples_ms); }
};

struct RunReport {
  BenchConfig config;
  Derived derived;
  int64_t distinct_experts = 0;
  std::string experts_path;    // omnimoe::experts_execution
  std::string routing_source;  // where the indices of the op rows and baselines came from
  std::string layer_issue;     // how the eager layer rows issue their kernels (graph replay or not)
  int warmup = 0, iters = 0, rotation_sets = 1;
  size_t saved_bytes = 0, forward_workspace_bytes = 0, backward_workspace_bytes = 0;
  size_t layer_peak_bytes = 0;     // everything the tool allocated for the library rows
  size_t baseline_peak_bytes = 0;  // the same, while the baselines ran
  std::vector<Row> rows;
  std::vector<std::string> notes;  // cross-checks and warnings
};

struct BenchReport {
  std::string device_type;  // "cpu", "cuda"
  std::string device_name, device_details;
  std::string date;  // UTC, ISO 8601
  std::string git_commit;
  std::string version;
  Ceilings ceilings;
  std::vector<RunReport> runs;
};

// Floor of a row: the larger of flops / rate and bytes / bandwidth (0 when not measured).
double floor_ms(const Row& row, const Ceilings& ceilings);

void print_run(std::FILE* out, const BenchReport& report, const RunReport& run);
// Throws omnimoe::Error when the file cannot be written.
void write_json(const std::string& path, const BenchReport& report);

std::string format_bytes(double bytes);  // "1.23 GiB"

}  // namespace omnimoe::tool
