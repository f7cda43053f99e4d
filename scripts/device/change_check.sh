#!/usr/bin/env bash
# One call for a kernel change, from carried builds (build-carry/build.txz = the change,
# build-carry/base.txz = before it; scripts/device/pack_builds.sh packs them): DET_REPEAT
# repeats of the tiled determinism test (default none), every CUDA test, memcheck and racecheck on SANITIZE_FILTER (default: the router's select tests and the
# layer's overlap tests; SANITIZE_TIMEOUT seconds each, default 120: racecheck on the 58 tiled
# tests needs more), an A/B of the two builds (ab_bench.sh on AB_CONFIGS, AB_ENVS, AB_ITERS), then
# BENCH_CONFIGS benched with JSON by the change if its tests passed (else by the base), then
# PROFILE=1: a line-level ncu profile of the selection (prof_select.sh). PY_FILES="test_cuda.py
# ..." also builds the Python package from the working tree (in the background from the start;
# the A/B waits for it) and runs those test files after the benches (tests/python/device_check.sh).
# Everything lands in $OUT/check.tgz. Variant builds for the A/B: build-carry/variants/*.txz (below).
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/cuda/lib
final_out=${OUT:-/tmp/omnimoe_out}
O="$final_out/check"
mkdir -p "$O/json" build-dev build-base
trap 'tar czf "$final_out/check.tgz" -C "$final_out" check && rm -rf "$O"' EXIT
python3 -m tarfile -e build-carry/build.txz build-dev &&
  python3 -m tarfile -e build-carry/base.txz build-base || exit 1
# Extra builds for the A/B only: build-carry/variants/NAME.txz, each holding `omnimoe` (xz: ~9 MB
# a build, so several fit the carry beside the two tarballs), benched as build-NAME.
variants=""
for v in build-carry/variants/*.txz; do
  [ -e "$v" ] || continue
  n=$(basename "$v" .txz)
  mkdir -p "build-$n" && python3 -m tarfile -e "$v" "build-$n" && variants="$variants build-$n/omnimoe"
done
if [ -n "${PY_FILES:-}" ]; then
  (OMNIMOE_PY_VENV=none OMNIMOE_PY_CUDA=ON OMNIMOE_PY_VERBOSE=1 OMNIMOE_PY_BUILD_ONLY=1 \
     CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) nice -n 19 ./tests/python/run.sh > "$O/python_build.log" 2>&1
   echo "python package build: rc $?" >> "$O/python_build.log") &
  py_build=$!
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$O/gpu.txt"
bin=build-dev/tests/omnimoe_cuda_tests
if [ "${DET_REPEAT:-0}" -gt 0 ]; then  # the tiled path's determinism test, repeated
  timeout 120 $bin --gtest_filter='ExpertsTiledCudaDeterminism.*' --gtest_repeat="$DET_REPEAT" \
    --gtest_brief=1 > "$O/determinism.log" 2>&1
  echo "determinism x$DET_REPEAT: rc $? failures $(grep -c '^\[  FAILED' "$O/determinism.log")"
fi
timeout 200 $bin --gtest_brief=1 > "$O/cuda_tests.log" 2>&1
rc=$?
echo "cuda tests: rc $rc"; grep -E "^\[  FAILED|^\[  PASSED|SKIPPED \]" "$O/cuda_tests.log" | head -20
f=${SANITIZE_FILTER:-'*LayerGraphReplay*:*LayerOverlapCuda*:Shapes/RouterCudaSelect.*T100_Nr320*:BucketShapes/*:RouterCudaSelectTies.MixedTokens_T41*:RouterCudaSelectNonFinite.*-*ErrorPendingBefore*'}
for t in memcheck racecheck; do
  timeout ${SANITIZE_TIMEOUT:-120} compute-sanitizer --tool $t --error-exitcode 9 $bin --gtest_filter="$f" \
    --gtest_brief=1 > "$O/sanitizer_$t.log" 2>&1
  echo "$t rc $? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$O/sanitizer_$t.log" | tail -1)"
done
if [ -n "${PY_FILES:-}" ]; then
  wait $py_build; tail -n 1 "$O/python_build.log"
fi
OUT="$O" AB_BINS="build-base/omnimoe build-dev/omnimoe$variants" AB_ROUNDS=${AB_ROUNDS:-1} \
  AB_ITERS=${AB_ITERS:-15} \
  bash scripts/device/ab_bench.sh
b=build-dev; [ $rc -eq 0 ] || b=build-base
echo "benched with $b" | tee "$O/benched_with.txt"
for c in ${BENCH_CONFIGS:-}; do
  timeout 90 $b/omnimoe bench --device cuda --config "$c" --warmup 5 --iters 20 \
    --json "$O/json/$c.json" >> "$O/bench.txt" 2>> "$O/bench_progress.log"
  echo "bench $c: rc $?"
done
[ -f "$O/bench.txt" ] && grep -E "omnimoe bench:|^  (layer forward  |layer forward\+backward  |router select|experts forward|baseline: token)" "$O/bench.txt" | cut -c1-100
[ "${PROFILE:-0}" = 1 ] && OUT="$O" bash scripts/device/prof_select.sh
if [ -n "${PY_FILES:-}" ]; then
  OUT="$O" DEVICE_SKIP_BUILD=1 DEVICE_TEST_FILES="$PY_FILES" timeout 240 \
    bash tests/python/device_check.sh 2>&1 | grep "device_check" | tail -n 20
fi
exit 0
