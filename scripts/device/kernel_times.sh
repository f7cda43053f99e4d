#!/usr/bin/env bash
# Per-kernel device times of one bench config under ncu (kernels serialised, clocks left alone):
# where a layer's forward and backward spend their time, kernel by kernel. Needs build-dev
# (session_check.sh builds it). Usage: scripts/device/kernel_times.sh CONFIG [ROWS_REGEX]
# Output: $OUT/kernels_CONFIG.txt (ncu's per-kernel summary) and a short table on stdout.
set -u
c=${1:-ref-quickstart}
o=${OUT:-/tmp/omnimoe_out}/kernels_$c.txt
mkdir -p "$(dirname "$o")"
timeout 150 ncu --clock-control none --metrics gpu__time_duration.sum --print-summary per-kernel \
  ./build-dev/omnimoe bench --device cuda --config "$c" --warmup 0 --iters 1 --skip-baselines \
  --skip-ceilings > "$o" 2>&1
echo "ncu $c: rc $?"
# Kernel name, launches, average duration (ns or us as ncu prints them).
awk '/^  [^ ]/ && !/Section|----/ {name=$0} /gpu__time_duration.sum/ {print $NF, $(NF-1), name}' \
  "$o" | sort -k1,1 | head -60
