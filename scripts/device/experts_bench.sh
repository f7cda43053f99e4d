#!/usr/bin/env bash
# Tiled experts on the device: build, tests, timings of the paper shapes, and compute-sanitizer
# (memcheck, racecheck) on small cases. Logs under $OUT (or ./experts_bench_out).
#   scripts/device/experts_bench.sh [all|tests|timing|sanitize]...
set -u
OUT=${OUT:-experts_bench_out}
mkdir -p "$OUT"
steps=${*:-all}
has() { [[ " $steps " == *" all "* || " $steps " == *" $1 "* ]]; }
t0=$(date +%s)
cmake -S . -B build-dev -G Ninja -DCMAKE_BUILD_TYPE=Release >"$OUT/cmake.log" 2>&1
ninja -C build-dev -j16 omnimoe_cuda_tests >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
bin=./build-dev/tests/omnimoe_cuda_tests
if has tests; then
  timeout 120 $bin --gtest_filter='*ExpertsTiled*' >"$OUT/tests.log" 2>&1
  echo "tests rc=$?"; grep -E "^\[  (FAILED|PASSED) |FAILED|Failure|error" "$OUT/tests.log" | head -30
fi
if has timing; then
  OMNIMOE_TILED_SHAPES=${OMNIMOE_TILED_SHAPES:-paper-k512-t4k,paper-k4096-t4k} timeout 150 $bin \
    --gtest_also_run_disabled_tests --gtest_filter='ExpertsTiledCudaTiming.*' >"$OUT/timing.log" 2>&1
  echo "timing rc=$?"; grep -vE "^\[|^Running|^$" "$OUT/timing.log"
fi
if has sanitize; then
  san=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  f='*ExpertsTiledCuda.*/bf16_T257_d37_Nr19_Nc23_K7_silu_cartesian:*ExpertsTiledCuda.*/f16_T257_d37_Nr19_Nc23_K7_gelu_cartesian_pad3'
  for tool in memcheck racecheck; do
    timeout 100 $san --tool $tool --error-exitcode 9 $bin --gtest_filter="$f" >"$OUT/sanitizer_$tool.log" 2>&1
    echo "sanitizer $tool rc=$?"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Hazard|Invalid" "$OUT/sanitizer_$tool.log" | head -5
  done
fi
echo "total: $(( $(date +%s) - t0 )) s"
