#!/usr/bin/env python3
"""Top source lines of an ncu source-page CSV (ncu -i R --page source --csv --print-source X).

Usage: ncu_top_lines.py CSV [N]. Prints the columns, then the N rows with the most warp stall
samples and the N with the most executed instructions (a kernel's rows follow its name line)."""
import csv
import sys


def main():
    path, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 40
    text = open(path, errors="replace").read().splitlines()
    blocks, cur = [], None
    for line in text:
        if line.startswith(('"#', '"Address', '"Line')):  # a table's header row
            cur = [line]
            blocks.append(cur)
        elif cur is not None and line.startswith('"'):
            cur.append(line)
        elif line.strip():
            print("|", line[:200])
    for b in blocks:
        rows = list(csv.reader(b))
        head, body = rows[0], rows[1:]
        print("columns:", head)
        def col(*names):
            for i, h in enumerate(head):
                if all(x.lower() in h.lower() for x in names):
                    return i
            return None
        def num(r, i):
            try:
                return float(r[i].replace(",", ""))
            except (ValueError, IndexError, TypeError):
                return 0.0
        src = col("source") or 1
        for label, i in (("stall samples", col("warp stall sampling (all")),
                         ("instructions executed", col("instructions executed"))):
            if i is None:
                continue
            total = sum(num(r, i) for r in body) or 1.0
            print(f"== top {n} by {label} (total {total:.0f})")
            for r in sorted(body, key=lambda r: -num(r, i))[:n]:
                print(f"{100 * num(r, i) / total:5.1f}%  {r[0][:8]:>8}  {r[src][:150]}")


main()
