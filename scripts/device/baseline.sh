#!/usr/bin/env bash
# A first look on a fresh device machine: build everything, every CUDA test, the router timing
# test, the Python package's CUDA check, and the tool bench of the given configs (default: the
# three with targets). BASELINE_PYTHON=0 skips the Python check. Everything lands in
# $OUT/baseline.tgz.
set -uo pipefail
final_out=${OUT:-/tmp/omnimoe_out}
O="$final_out/baseline"
mkdir -p "$O"
trap 'tar czf "$final_out/baseline.tgz" -C "$final_out" baseline && rm -rf "$O"' EXIT
start=$(date +%s)
since() { echo "$(( $(date +%s) - start )) s"; }
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv | tee "$O/gpu.txt"
if ! { cmake -S . -B build-dev -G Ninja -DCMAKE_BUILD_TYPE=Release \
         -DOMNIMOE_GIT_COMMIT="${OMNIMOE_GIT_COMMIT:-unknown}" && ninja -C build-dev -j16; } \
       > "$O/build.log" 2>&1; then
  grep -E "error|FAILED" "$O/build.log" | head -30; exit 1
fi
echo "build: $(since)"
timeout 300 ./build-dev/tests/omnimoe_cuda_tests --gtest_brief=1 > "$O/cuda_tests.log" 2>&1
echo "cuda tests: rc $? at $(since)"
grep -E "^\[  FAILED|^\[  PASSED|tests ran|SKIPPED \]" "$O/cuda_tests.log" | tail -25
timeout 60 ./build-dev/tests/omnimoe_cuda_tests --gtest_also_run_disabled_tests \
  --gtest_filter='RouterCudaTiming.*' > "$O/router_timing.log" 2>&1
echo "router timing: rc $? at $(since)"; grep -v "^\[" "$O/router_timing.log" | tail -20
if [ "${BASELINE_PYTHON:-1}" = 1 ]; then
  OUT="$O/python" timeout 300 bash tests/python/device_check.sh > "$O/python.log" 2>&1
  echo "python: rc $? at $(since)"; grep "device_check:\|passed\|failed\|Error" "$O/python.log" | head -30
fi
if [ "$#" -gt 0 ]; then configs=("$@"); else configs=(ref-quickstart pool-1m-k16 paper-k4096-t4k); fi
OUT="$O/bench" timeout 400 bash scripts/device/tool_bench.sh "${configs[@]}" > "$O/bench.log" 2>&1
echo "bench: rc $? at $(since)"; cat "$O/bench/bench.txt" 2>/dev/null | tail -60
