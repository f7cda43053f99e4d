#!/usr/bin/env bash
# Dense experts on the device: build, the *ExpertsDense* tests, timings (the disabled dense
# timing test; the tool bench at paper-k4096-t4k and -t1k when the tool builds), the
# *ExpertsCuda* + *LayerCuda* tests, compute-sanitizer memcheck + racecheck on small dense
# cases (racecheck skips the slow many-chunk case; cuBLASLt's own split-K kernels report
# shared-memory hazards there, none in ours). Logs under $OUT (or ./experts_dense_out).
#   scripts/device/experts_dense_check.sh [all|tests|timing|sanitize]...
set -u
OUT=${OUT:-experts_dense_out}
steps=${*:-all}
has() { [[ " $steps " == *" all "* || " $steps " == *" $1 "* ]]; }
t0=$(date +%s)
mkdir -p "$OUT"
B=$(mktemp -d)
cmake -S . -B build-dev -G Ninja -DCMAKE_BUILD_TYPE=Release >"$B/cmake.log" 2>&1
ninja -C build-dev -j16 omnimoe_cuda_tests >"$B/build.log" 2>&1 ||
  { tail -40 "$B/build.log"; exit 1; }
ninja -C build-dev -j16 omnimoe_tool >"$B/build_tool.log" 2>&1 ||
  { echo "tool build failed (bench skipped):"; grep -m3 -E "error|undefined" "$B/build_tool.log"; }
echo "build: $(( $(date +%s) - t0 )) s"
bin=./build-dev/tests/omnimoe_cuda_tests
summary() { grep -E "^\[  (FAILED|PASSED|SKIPPED) |^\[==========\]|Failure|rror" "$1" | head -${2:-20}; }
if has tests; then
  timeout 40 $bin --gtest_filter='*ExpertsDense*' >"$OUT/tests_dense.log" 2>&1
  echo "dense tests rc=$?"; summary "$OUT/tests_dense.log" 30
fi
if has timing; then
  timeout 50 $bin --gtest_also_run_disabled_tests --gtest_filter='*ExpertsDenseCudaTiming*' \
    >"$OUT/timing.log" 2>&1
  echo "timing rc=$?"; grep -vE "^\[|^Running|^$|^Note" "$OUT/timing.log"
fi
if has tests; then
  timeout 60 $bin --gtest_filter='*ExpertsCuda*:*LayerCuda*' >"$OUT/tests.log" 2>&1
  echo "experts + layer tests rc=$?"; summary "$OUT/tests.log" 30
fi
if has sanitize; then
  san=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  f='*ExpertsDenseCuda.*/bf16_T257_d37_Nr19_Nc23_K7_silu_onechunk:*ExpertsDenseCuda.*/f16_T257_d37_Nr19_Nc23_K7_gelu_pad3_onechunk:*ExpertsDenseCuda.*/bf16_T257_d37_Nr19_Nc23_K7_gelu_chunk5:*ExpertsDenseCuda.*/bf16_T33_*'
  for tool in memcheck racecheck; do
    [ $tool = racecheck ] && f=${f/\*ExpertsDenseCuda.\*\/bf16_T257_d37_Nr19_Nc23_K7_gelu_chunk5:/}
    timeout 45 $san --tool $tool --error-exitcode 9 $bin --gtest_filter="$f" >"$OUT/sanitizer_$tool.log" 2>&1
    echo "sanitizer $tool rc=$?"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Hazard|Invalid|PASSED|FAILED" "$OUT/sanitizer_$tool.log" | head -6
  done
fi
if has timing; then
  for c in paper-k4096-t4k paper-k4096-t1k; do
    [ -x ./build-dev/omnimoe ] && [ $(( $(date +%s) - t0 )) -lt 170 ] || break
    echo "=== $c" >>"$OUT/bench.log"
    timeout 25 ./build-dev/omnimoe bench --device cuda --config $c --warmup 2 --iters 5 \
      >>"$OUT/bench.log" 2>&1
    echo "bench $c rc=$?"
  done
  [ -f "$OUT/bench.log" ] && grep -iE "experts|dense|path|execution" "$OUT/bench.log" | head -30
fi
echo "total: $(( $(date +%s) - t0 )) s"
