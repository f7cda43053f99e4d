#!/usr/bin/env python3
"""Figures and tables of the paper's efficiency comparison (docs/compare.md).

  python3 scripts/compare_paper.py bench/results/compare-paper.json
      draws docs/figures/compare-{tokens,budget,memory}.png and prints the markdown tables
  python3 scripts/compare_paper.py --run build/omnimoe [--json PATH]
      first runs `omnimoe bench --compare paper --json PATH` on the current GPU, then draws

Every figure carries the GPU, the date and the commit of the run it came from.
"""
import argparse
import json
import os
import re
import subprocess
import sys

ORDER = ["dense", "gshard", "deepseekmoe", "pkm", "peer", "omnimoe"]
STYLE = {
    "dense": ("tab:gray", "s"),
    "gshard": ("tab:blue", "^"),
    "deepseekmoe": ("tab:purple", "v"),
    "pkm": ("tab:orange", "D"),
    "peer": ("tab:red", "o"),
    "omnimoe": ("tab:green", "*"),
}


def load(path):
    with open(path) as f:
        data = json.load(f)
    data["by_method"] = {m["name"]: m for m in data["methods"]}
    return data


def ok(p, key):
    return p.get("error") is None and p.get(key) is not None


def token_series(data, method, key):
    smallest = data["by_method"][method]["budgets"][0]
    pts = [p for p in data["points"] if p["method"] == method and p["budget"] == smallest]
    pts = [p for p in pts if ok(p, key)]
    pts.sort(key=lambda p: p["tokens"])
    return [p["tokens"] for p in pts], [p[key] for p in pts]


def budget_series(data, method, key):
    pts = [p for p in data["points"] if p["method"] == method and p["tokens"] == 1024]
    pts = [p for p in pts if ok(p, key)]
    pts.sort(key=lambda p: p["active_params"])
    return [p["active_params"] / 1e6 for p in pts], [p[key] for p in pts]


def stamp(fig, data):
    commit = data.get("git_commit", "unknown")
    fig.text(0.01, 0.01,
             f"{data['device']} ({data.get('device_details', '')}) | {data['date']} | "
             f"commit {commit} | bf16, d = 1024, median of {data.get('iters')} runs",
             fontsize=7, color="0.35", ha="left", va="bottom")


def label(data, m):
    return data["by_method"][m]["label"]


def draw(data, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    written = []
    panels = [("forward_ms", "forward (ms)"), ("forward_backward_ms", "forward + backward (ms)")]

    def figure(series, xlabel, title, name, keys, log_x=True):
        fig, axes = plt.subplots(1, len(keys), figsize=(6.2 * len(keys), 4.6))
        axes = axes if len(keys) > 1 else [axes]
        for ax, (key, ylabel) in zip(axes, keys):
            for m in ORDER:
                if m not in data["by_method"]:
                    continue
                xs, ys = series(data, m, key)
                if not xs:
                    continue
                color, marker = STYLE[m]
                ax.plot(xs, ys, marker=marker, color=color, label=label(data, m))
            if log_x:
                ax.set_xscale("log", base=2)
                ticks = sorted({p["tokens"] for p in data["points"]})
                ax.set_xticks(ticks)
                ax.set_xticklabels([f"{t // 1024}k" if t % 1024 == 0 else str(t) for t in ticks])
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(title)
        stamp(fig, data)
        fig.tight_layout(rect=(0, 0.04, 1, 1))
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    figure(token_series, "tokens", "Layer latency vs tokens (each method at its smallest "
           "activated budget)", "compare-tokens.png", panels)
    figure(budget_series, "activated parameters (M)", "Layer latency vs activated parameters "
           "(1,024 tokens)", "compare-budget.png", panels, log_x=False)

    # Memory: vs tokens and vs activated parameters; all of it, then without the weights and
    # their gradients.
    fig, grid = plt.subplots(2, 2, figsize=(12.4, 8.6))
    cells = []
    for row, (key, what) in enumerate((("peak_bytes", "all memory of the step"),
                                       ("activation_bytes", "activations + workspaces"))):
        cells.append((grid[row][0], token_series, "tokens (smallest budget)", True, key, what))
        cells.append((grid[row][1], budget_series, "activated parameters (M), 1,024 tokens",
                      False, key, what))
    axes = [grid[0][0]]
    for ax, series, xlabel, log_x, key, what in cells:
        for m in ORDER:
            if m not in data["by_method"]:
                continue
            xs, ys = series(data, m, key)
            pairs = [(x, y) for x, y in zip(xs, ys) if y]
            if not pairs:
                continue
            color, marker = STYLE[m]
            ax.plot([x for x, _ in pairs], [y / 2**30 for _, y in pairs], marker=marker,
                    color=color, label=label(data, m))
        if log_x:
            ax.set_xscale("log", base=2)
            ticks = sorted({p["tokens"] for p in data["points"]})
            ax.set_xticks(ticks)
            ax.set_xticklabels([f"{t // 1024}k" if t % 1024 == 0 else str(t) for t in ticks])
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{what} (GiB)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Device memory of one training step: top, everything the layer allocated "
                 "(weights, gradients, activations, workspaces); bottom, without weights and "
                 "gradients", fontsize=10)
    stamp(fig, data)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path = os.path.join(out_dir, "compare-memory.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)
    return written


def point(data, method, tokens, budget=None):
    if budget is None:
        budget = data["by_method"][method]["budgets"][0]
    for p in data["points"]:
        if p["method"] == method and p["tokens"] == tokens and p["budget"] == budget:
            return p
    return None


def fmt_ms(v):
    return "n/a" if v is None else (f"{v:.3f}" if v < 10 else f"{v:.1f}")


def tables(data):
    lines = []
    lines.append(f"Run: {data['device']}, {data['date']}, commit {data.get('git_commit')}, "
                 f"{data.get('elapsed_s', 0):.0f} s for the sweep.\n")
    # Speed-ups at 4,096 tokens.
    omni = point(data, "omnimoe", 4096)
    lines.append("| OmniMoE at 4,096 tokens vs | forward (ours) | forward+backward (ours) | "
                 "paper (A100) |")
    lines.append("| --- | --- | --- | --- |")
    for m, paper in (("peer", "10.9x (73 ms vs 6.7 ms)"), ("deepseekmoe", "15.2x (102 ms vs 6.7 ms)")):
        other = point(data, m, 4096)
        cells = []
        for key in ("forward_ms", "forward_backward_ms"):
            if omni and other and ok(omni, key) and ok(other, key):
                cells.append(f"{other[key] / omni[key]:.2f}x ({fmt_ms(other[key])} ms vs "
                             f"{fmt_ms(omni[key])} ms)")
            else:
                cells.append("n/a")
        lines.append(f"| {label(data, m)} | {cells[0]} | {cells[1]} | {paper} |")
    lines.append("")
    # Every point.
    lines.append("| method | tokens | budget | active params | forward ms | fwd+bwd ms | "
                 "memory GiB | activations GiB | note |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for m in ORDER:
        bn = data["by_method"][m]["budget_name"]
        for p in sorted((p for p in data["points"] if p["method"] == m),
                        key=lambda p: (p["budget"], p["tokens"])):
            if p.get("error"):
                lines.append(f"| {m} | {p['tokens']} | {bn}={p['budget']} | "
                             f"{p['active_params'] / 1e6:.1f}M | n/a | n/a | n/a | n/a | "
                             f"{p['error'][:80]} |")
                continue
            flag = " check FAILED" if p.get("check_failed") else ""
            note = p.get("note", "")
            for pattern in (r"experts path (\S+)", r"(\d+ of \d+ pairs dropped)"):
                found = re.search(pattern, note)
                if found:
                    flag = (found.group(0) if "dropped" in pattern else f"path {found.group(1)}") + flag
            lines.append(f"| {m} | {p['tokens']} | {bn}={p['budget']} | "
                         f"{p['active_params'] / 1e6:.1f}M | {fmt_ms(p['forward_ms'])} | "
                         f"{fmt_ms(p['forward_backward_ms'])} | {p['peak_bytes'] / 2**30:.2f} | "
                         f"{p.get('activation_bytes', 0) / 2**30:.3f} | {flag} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="?", default="bench/results/compare-paper.json")
    ap.add_argument("--run", metavar="OMNIMOE", help="run this omnimoe binary's sweep first")
    ap.add_argument("--mode", default="paper", choices=["paper", "smoke"])
    ap.add_argument("--out", default="docs/figures", help="folder of the PNGs")
    ap.add_argument("--tables", metavar="PATH", help="also write the markdown tables here")
    args = ap.parse_args()
    if args.run:
        rc = subprocess.call([args.run, "bench", "--compare", args.mode, "--json", args.json])
        if rc not in (0, 1):
            sys.exit(rc)
    data = load(args.json)
    for path in draw(data, args.out):
        print("wrote", path, file=sys.stderr)
    text = tables(data)
    print(text)
    if args.tables:
        with open(args.tables, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
