#!/usr/bin/env python3
"""The results table and figure of one merged `omnimoe bench` JSON (bench/results/*.json).

    python3 scripts/bench_report.py bench/results/<run>.json [--figure docs/figures/<name>.png]

Prints the markdown table of docs/results.md (medians in ms, each layer row's time over the
floor its own process measured) and, with --figure, draws time / floor of the layer's forward
and forward+backward per config beside the issue's 6x line (matplotlib).
"""
import argparse
import json

COLUMNS = [
    ("layer forward", "layer fwd"),
    ("layer forward, CUDA graph", "fwd, graph"),
    ("layer forward+backward", "layer fwd+bwd"),
    ("layer forward+backward, CUDA graph", "fwd+bwd, graph"),
    ("router forward", "router fwd"),
    ("router select", "router select"),
    ("schedule build", "schedule"),
    ("experts forward", "experts fwd"),
    ("MLP forward", "MLP fwd"),
    ("experts backward", "experts bwd"),
    ("token-centric experts forward", "token-centric fwd"),
    ("dense-masked experts forward", "dense-masked fwd"),
]


def rows_by_name(run):
    return {r["name"]: r for r in run["rows"] if r.get("status") == "ok"}


def fmt(ms):
    return f"{ms:.3g}"


def table(data):
    head = ["config", "path"] + [c[1] for c in COLUMNS[:1]] + ["fwd / floor"] + \
        [c[1] for c in COLUMNS[1:3]] + ["fwd+bwd / floor"] + [c[1] for c in COLUMNS[3:]]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for run in data["runs"]:
        rows = rows_by_name(run)
        cells = [run["config"]["name"], run["experts_execution"]]
        for i, (name, _) in enumerate(COLUMNS):
            r = rows.get(name)
            cells.append(fmt(r["median_ms"]) if r else "n/a")
            if name in ("layer forward", "layer forward+backward") and r:
                cells.append(f"{r['time_over_floor']:.1f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(data, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, fwd, both = [], [], []
    for run in data["runs"]:
        rows = rows_by_name(run)
        names.append(run["config"]["name"])
        fwd.append(rows["layer forward"]["time_over_floor"])
        both.append(rows["layer forward+backward"]["time_over_floor"])
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar([i - 0.2 for i in x], fwd, width=0.4, label="forward")
    ax.bar([i + 0.2 for i in x], both, width=0.4, label="forward+backward")
    ax.axhline(6, color="k", linestyle="--", linewidth=1, label="6x (issue's forward limit)")
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel("median time / floor")
    ax.set_title(f"omnimoe bench, {data['device']['name']}, {data['git_commit']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json")
    p.add_argument("--figure")
    a = p.parse_args()
    with open(a.json) as f:
        data = json.load(f)
    print(table(data))
    if a.figure:
        figure(data, a.figure)


if __name__ == "__main__":
    main()
