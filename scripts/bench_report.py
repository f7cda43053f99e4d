#!/usr/bin/env python3
"""The results table and figure of one merged `omnimoe bench` JSON (bench/results/*.json).

    python3 scripts/bench_report.py bench/results/<run>.json [--figure docs/figures/<name>.png]

Prints the markdown table of docs/results.md (medians in ms, each layer row's time over the
floor its own process measured, and, where the JSON has them, the host's time to issue one eager
layer call) and, with --figure, draws time / floor of the layer's forward and forward+backward
per config beside the issue's 6x line (matplotlib).
"""
import argparse
import json
import sys

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


# The eager layer rows, with the label of their extra columns.
LAYER_ROWS = {"layer forward": "fwd", "layer forward+backward": "fwd+bwd"}


def table(data):
    # host_issue_ms is optional (JSON from before it was measured has none): its columns appear
    # when any run has it.
    host = any("host_issue_ms" in r for run in data["runs"] for r in run["rows"])
    head = ["config", "path"]
    for name, label in COLUMNS:
        head.append(label)
        if name in LAYER_ROWS:
            head.append(f"{LAYER_ROWS[name]} / floor")
            if host:
                head.append(f"{LAYER_ROWS[name]} host issue")
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for run in data["runs"]:
        rows = rows_by_name(run)
        cells = [run["config"]["name"], run["experts_execution"]]
        for name, _ in COLUMNS:
            r = rows.get(name) or {}
            cells.append(fmt(r["median_ms"]) if r else "n/a")
            if name in LAYER_ROWS:
                cells.append(f"{r['time_over_floor']:.1f}x" if "time_over_floor" in r else "-")
                if host:
                    cells.append(fmt(r["host_issue_ms"]) if "host_issue_ms" in r else "-")
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
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            sys.exit("bench_report.py: --figure needs matplotlib (python3 -m pip install matplotlib)")
        figure(data, a.figure)


if __name__ == "__main__":
    main()
