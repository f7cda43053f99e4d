#!/usr/bin/env python3
"""Reads a kernel timeline from scripts/device/kernel_trace.sh and shows one call of the layer.

Kernels are ordered by launch (CUPTI correlation id). A call starts at each launch of a kernel
whose name matches --first (the first kernel the layer launches); the report shows the median
call's kernels with start and end relative to the call's first start, their stream, and the
time the device had no kernel of that call running (gaps on the critical path).

  python3 scripts/trace_report.py trace.csv --names       # the kernels and their launch counts
  python3 scripts/trace_report.py trace.csv --first REGEX [--skip N] [--calls N]
"""
import argparse
import csv
import re
import statistics


def short(name, width=60):
    name = re.sub(r"\(.*", "", name)  # drop the argument list
    name = re.sub(r"^void ", "", name)
    return name if len(name) <= width else name[: width - 3] + "..."


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--first", help="regex of the first kernel of one call (needed unless --names)")
    ap.add_argument("--skip", type=int, default=0, help="calls to skip (warm-up, other rows)")
    ap.add_argument("--calls", type=int, default=10, help="calls to take after the skipped ones")
    ap.add_argument("--names", action="store_true", help="list distinct kernel names and exit")
    a = ap.parse_args()
    rows = []
    with open(a.csv) as f:
        for r in csv.DictReader(f):
            rows.append((int(r["correlation"]), int(r["stream"]), int(r["start_ns"]),
                         int(r["end_ns"]), int(r["grid"]), r["name"]))
    rows.sort()
    if a.names:
        seen = {}
        for r in rows:
            seen[short(r[5], 100)] = seen.get(short(r[5], 100), 0) + 1
        for n, c in seen.items():
            print(f"{c:6d} {n}")
        return
    if not a.first:
        ap.error("--first is needed (run with --names to see the kernels)")
    pat = re.compile(a.first)
    starts = [i for i, r in enumerate(rows) if pat.search(r[5])]
    calls = [rows[s:e] for s, e in zip(starts, starts[1:] + [len(rows)])]
    calls = calls[a.skip: a.skip + a.calls]
    if not calls:
        raise SystemExit("no calls matched")
    spans = []
    for c in calls:
        t0 = min(r[2] for r in c)
        spans.append((max(r[3] for r in c) - t0) / 1e3)
    med = sorted(range(len(calls)), key=lambda i: spans[i])[len(calls) // 2]
    print(f"{len(calls)} calls of {len(calls[0])} kernels; span us: median "
          f"{statistics.median(spans):.1f}, min {min(spans):.1f}, max {max(spans):.1f}")
    c = calls[med]
    t0 = min(r[2] for r in c)
    streams = sorted({r[1] for r in c})
    print(f"median call (#{med}), streams {streams}; times in us from its first start")
    print(f"{'start':>7} {'end':>7} {'dur':>6} {'str':>4} {'grid':>7}  kernel")
    for r in sorted(c, key=lambda r: r[2]):
        print(f"{(r[2]-t0)/1e3:7.1f} {(r[3]-t0)/1e3:7.1f} {(r[3]-r[2])/1e3:6.1f} {r[1]:4d} "
              f"{r[4]:7d}  {short(r[5])}")
    # Device time with none of this call's kernels running.
    idle, busy_until = 0.0, t0
    for r in sorted(c, key=lambda r: r[2]):
        if r[2] > busy_until:
            idle += r[2] - busy_until
        busy_until = max(busy_until, r[3])
    per_stream = {s: sum(r[3] - r[2] for r in c if r[1] == s) / 1e3 for s in streams}
    print(f"idle inside the call: {idle/1e3:.1f} us; kernel time per stream: " +
          ", ".join(f"{s}: {v:.1f}" for s, v in per_stream.items()))


if __name__ == "__main__":
    main()
