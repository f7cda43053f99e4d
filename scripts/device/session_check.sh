#!/usr/bin/env bash
# One device call that checks a whole tree and measures it, within one call's limit (the
# lead's session script; it replaced baseline.sh and integration.sh): build, every
# CUDA test, memcheck and racecheck on small cases of the newest kernels, the bench of the
# configs with targets, the Python package's CUDA tests, then the other configs while time
# remains (SESSION_SECONDS, default 540). Everything lands in $OUT/session.tgz.
#   BENCH_FIRST / BENCH_REST   the configs benched before / after the Python tests
#   PY_FILES                   the Python test files (default test_cuda.py test_errors.py; none)
#   TRACE_CONFIGS              configs to trace kernel by kernel (kernel_trace.sh), after the benches
#   PREBUILT                   a tarball of build-dev's omnimoe and tests/omnimoe_cuda_tests: no build
set -uo pipefail
final_out=${OUT:-/tmp/omnimoe_out}
O="$final_out/session"
mkdir -p "$O/json"
trap 'tar czf "$final_out/session.tgz" -C "$final_out" session && rm -rf "$O"' EXIT
start=$(date +%s)
since() { echo $(( $(date +%s) - start )); }
budget=${SESSION_SECONDS:-540}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$O/gpu.txt"
if [ -n "${PREBUILT:-}" ]; then  # binaries built elsewhere (a tarball of omnimoe, tests/omnimoe_cuda_tests)
  mkdir -p build-dev && tar xzf "$PREBUILT" -C build-dev || exit 1
  export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
elif ! { cmake -S . -B build-dev -G Ninja -DCMAKE_BUILD_TYPE=Release \
         -DOMNIMOE_GIT_COMMIT="${OMNIMOE_GIT_COMMIT:-unknown}" &&
       ninja -C build-dev -j16 omnimoe_cuda_tests omnimoe_tool; } > "$O/build.log" 2>&1; then
  grep -E "error|FAILED" "$O/build.log" | head -30; exit 1
fi
echo "build: $(since) s"
bin=./build-dev/tests/omnimoe_cuda_tests
timeout 240 $bin --gtest_brief=1 > "$O/cuda_tests.log" 2>&1
echo "cuda tests: rc $? at $(since) s"
grep -E "^\[  FAILED|^\[  PASSED|SKIPPED \]" "$O/cuda_tests.log" | head -30
small="${SANITIZE_FILTER:-*MixedTokens*:*ExpertsDenseCuda.*/bf16_T33_*:*LayerOverlapCuda*}"
for t in memcheck racecheck; do
  timeout 60 compute-sanitizer --tool $t --error-exitcode 9 $bin --gtest_filter="$small" \
    --gtest_brief=1 > "$O/sanitizer_$t.log" 2>&1
  echo "compute-sanitizer $t: rc $? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$O/sanitizer_$t.log" | tail -1) at $(since) s"
done
bench() {
  timeout 90 ./build-dev/omnimoe bench --device cuda --config "$1" --warmup 5 --iters 20 \
    --json "$O/json/$1.json" >> "$O/bench.txt" 2>> "$O/bench_progress.log"
  echo "bench $1: rc $? at $(since) s"
}
for c in ${BENCH_FIRST:-ref-quickstart pool-1m-k16 paper-k4096-t4k}; do bench $c; done
if [ "${PY_FILES:-}" != none ]; then
  OUT="$O/python" DEVICE_TEST_FILES="${PY_FILES:-test_cuda.py test_errors.py}" timeout 280 \
    bash tests/python/device_check.sh > "$O/python.log" 2>&1
  echo "python: rc $? at $(since) s"; grep "device_check:" "$O/python.log" | head -20
fi
for c in ${BENCH_REST-paper-k4096-t1k pool-1m-k256 paper-k512-t1k paper-k512-t4k paper-k512-t16k}; do
  [ "$(since)" -lt "$budget" ] || { echo "bench $c: skipped (time)"; continue; }
  bench $c
done
for c in ${TRACE_CONFIGS:-}; do OUT="$O" bash scripts/device/kernel_trace.sh "$c"; done
grep -E "omnimoe bench:|^  (layer|router|experts|MLP|schedule|baseline: (token|dense-masked))" \
  "$O/bench.txt" | cut -c1-80
