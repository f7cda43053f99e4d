#!/usr/bin/env bash
# The lead's GPU session, in two calls on one warm machine (the build directory survives between
# calls there):
#   integration.sh tests  - build everything, every CUDA test, sanitizers on the newest kernels
#   integration.sh bench  - tool check + bench of every named config (tool_bench.sh), the paper
#                           comparison, and the Python package's CUDA tests
# Logs under $OUT; OMNIMOE_GIT_COMMIT names the commit (the device copy has no .git).
set -uo pipefail
stage=${1:-tests}
# Everything is written under $OUT/$stage and packed into $OUT/$stage.tgz at the end (the device
# tool brings back at most 8 files).
final_out=${OUT:-/tmp/omnimoe_out}
OUT="$final_out/$stage"
mkdir -p "$OUT"
trap 'tar czf "$final_out/$stage.tgz" -C "$final_out" "$stage" && rm -rf "$OUT"' EXIT
start=$(date +%s)
since() { echo "$(( $(date +%s) - start )) s"; }

if [ "$stage" = tests ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
  if ! { cmake -S . -B build-dev -G Ninja -DCMAKE_BUILD_TYPE=Release \
           -DOMNIMOE_GIT_COMMIT="${OMNIMOE_GIT_COMMIT:-unknown}" &&
         ninja -C build-dev -j16; } > "$OUT/build.log" 2>&1; then
    grep -E "error|FAILED" "$OUT/build.log" | head -30
    exit 1
  fi
  echo "build: $(since)"
  timeout 360 ./build-dev/tests/omnimoe_cuda_tests --gtest_brief=1 > "$OUT/cuda_tests.log" 2>&1
  echo "cuda tests: rc $? at $(since)"
  grep -E "^\[  FAILED|^\[  PASSED|tests ran|SKIPPED \]" "$OUT/cuda_tests.log" | tail -25
  small="${SANITIZE_FILTER:-*LayerOverlapCuda*:*ExpertsDenseCuda*T257*}"
  for t in memcheck racecheck; do
    timeout 100 compute-sanitizer --tool $t --error-exitcode 9 ./build-dev/tests/omnimoe_cuda_tests \
      --gtest_filter="$small" --gtest_brief=1 > "$OUT/sanitizer_$t.log" 2>&1
    echo "compute-sanitizer $t: rc $? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitizer_$t.log" | tail -1)"
  done
  echo "done: $(since)"
elif [ "$stage" = bench ]; then
  bash scripts/device/tool_bench.sh > "$OUT/tool_bench.log" 2>&1
  echo "tool_bench: rc $? at $(since)"
  cp "$OUT/bench_all.json" "$OUT/bench.json" 2>/dev/null
  timeout 120 python3 scripts/compare_paper.py --run build-dev/omnimoe > "$OUT/compare.log" 2>&1
  echo "compare: rc $? at $(since)"; tail -5 "$OUT/compare.log"
  OUT="$OUT/python" timeout 200 bash tests/python/device_check.sh > "$OUT/python.log" 2>&1
  echo "python: rc $? at $(since)"; grep "device_check:" "$OUT/python.log"
  cp bench/results/compare-paper.json "$OUT/" 2>/dev/null
  cp docs/figures/compare-*.png "$OUT/" 2>/dev/null
  cat "$OUT/bench.txt" 2>/dev/null | tail -80
fi
