#!/usr/bin/env bash
# One GPU session for the `omnimoe` tool: build it, check the layer on CUDA against the CPU,
# run memcheck and racecheck over a small bench (the baselines' kernels included), then bench
# the named GPU configs, one process each (a failing op cannot poison the others' context).
# Logs and the merged JSON go to $OUT. Usage: scripts/device/tool_bench.sh [config ...]
set -uo pipefail
OUT=${OUT:-/tmp/omnimoe_out}
mkdir -p "$OUT" /tmp/omnimoe_json
configs=("$@")
if [ ${#configs[@]} -eq 0 ]; then
  configs=(ref-quickstart paper-k512-t1k paper-k512-t4k paper-k512-t16k paper-k4096-t1k
           paper-k4096-t4k pool-1m-k16 pool-1m-k256)
fi

start=$(date +%s)
if ! { cmake -S . -B build-dev -G Ninja -DCMAKE_BUILD_TYPE=Release -DOMNIMOE_TESTS=OFF &&
       ninja -C build-dev -j16 omnimoe_tool; } > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  exit 1
fi
echo "build: $(( $(date +%s) - start )) s"
tool=./build-dev/omnimoe

timeout 120 $tool check --device cuda --dtype bf16 2>&1 | tee "$OUT/check.log" | tail -20

small=(bench --device cuda --config cpu-small --dtype bf16 --warmup 0 --iters 1 --skip-ceilings)
for t in memcheck racecheck; do
  timeout 100 compute-sanitizer --tool $t --error-exitcode 9 $tool "${small[@]}" \
    > "$OUT/sanitizer_$t.log" 2>&1
  echo "compute-sanitizer $t: rc $? ($(grep -c 'ERROR SUMMARY: 0' "$OUT/sanitizer_$t.log") clean summaries)"
  grep -E "ERROR SUMMARY|Invalid|Race" "$OUT/sanitizer_$t.log" | head -5
done

for c in "${configs[@]}"; do
  timeout 150 $tool bench --device cuda --config "$c" --warmup 5 --iters 20 \
    --json "/tmp/omnimoe_json/$c.json" >> "$OUT/bench.txt" 2>> "$OUT/bench_progress.log"
  echo "bench $c: rc $? at $(( $(date +%s) - start )) s"
done
jsons=()
for c in "${configs[@]}"; do
  [ -f "/tmp/omnimoe_json/$c.json" ] && jsons+=("/tmp/omnimoe_json/$c.json")
done
python3 - "$OUT/bench_all.json" "${jsons[@]}" <<'PY'
import json, sys
merged = None
for path in sys.argv[2:]:
    d = json.load(open(path))
    if merged is None:
        merged = d
    else:
        merged["runs"] += d["runs"]
json.dump(merged, open(sys.argv[1], "w"), indent=1)
PY
cat "$OUT/bench.txt"
