#!/usr/bin/env bash
# One call for a selection-kernel change, from carried builds (build-carry/build.tgz = the
# change, build-carry/base.tgz = before it): the CUDA tests, memcheck and racecheck on the
# router's select tests and the layer's overlap tests, an A/B of the two builds
# (bin_ab.sh), then a line-level ncu profile of the change (prof_select.sh).
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/lib
mkdir -p build-dev build-base "$OUT"
tar xzf build-carry/build.tgz -C build-dev && tar xzf build-carry/base.tgz -C build-base || exit 1
bin=build-dev/tests/omnimoe_cuda_tests
timeout 200 $bin --gtest_brief=1 > "$OUT/cuda_tests.log" 2>&1
echo "cuda tests: rc $?"; grep -E "^\[  FAILED|^\[  PASSED|SKIPPED \]" "$OUT/cuda_tests.log" | head -20
f=${SANITIZE_FILTER:-'*LayerGraphReplay*:*LayerOverlapCuda*:Shapes/RouterCudaSelect.*T100_Nr320*:BucketShapes/*:RouterCudaSelectTies.MixedTokens_T41*:RouterCudaSelectNonFinite.*-*ErrorPendingBefore*'}
for t in memcheck racecheck; do
  timeout 120 compute-sanitizer --tool $t --error-exitcode 9 $bin --gtest_filter="$f" \
    --gtest_brief=1 > "$OUT/sanitizer_$t.log" 2>&1
  echo "$t rc $? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitizer_$t.log" | tail -1)"
done
bash scripts/device/bin_ab.sh
[ -n "${PROFILE:-1}" ] && bash scripts/device/prof_select.sh
